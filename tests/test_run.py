"""`run()` with stdin: a child that exits early or writes before it reads
neither breaks nor deadlocks the caller (real commands, 8 MiB of input)."""

from __future__ import annotations

import pytest

from imagesmith.errors import BuildError
from imagesmith.host.run import run

BIG = b"x" * (8 * 1024 * 1024)  # far more than a pipe holds


@pytest.mark.parametrize("capture", [False, True])
def test_child_that_exits_without_reading_is_reported_by_its_exit_code(capture: bool) -> None:
    with pytest.raises(BuildError, match="early failed with exit code 3"):
        run(["sh", "-c", "exit 3"], input=BIG, capture=capture, what="early")
    assert run(["head", "-c", "1"], input=BIG, capture=True).stdout == b"x"


@pytest.mark.parametrize("capture", [False, True])
def test_child_that_fills_its_output_before_reading_does_not_deadlock(capture: bool) -> None:
    script = "head -c 4194304 /dev/zero; wc -c"
    result = run(["sh", "-c", script], input=BIG, capture=capture)
    if capture:
        assert result.stdout.endswith(f"{len(BIG)}\n".encode())
