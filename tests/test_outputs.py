"""sha256_file hashes holes from memory: it must still be the file's SHA-256."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from imagesmith.disk.sparse import HASH_CHUNK, largest_file_problem, sha256_file

MiB = 1024 * 1024


def sparse_file(path: Path, size: int, data: list[tuple[int, bytes]]) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
        for offset, chunk in data:
            os.pwrite(f.fileno(), chunk, offset)
    return path


@pytest.mark.parametrize(
    "size, data",
    [
        (0, []),
        (3 * MiB, []),  # all hole
        (1000, [(0, b"x" * 1000)]),  # no hole
        (3 * HASH_CHUNK + 5, [(0, b"head"), (HASH_CHUNK + 7, b"middle" * 999)]),  # hole at the end
        (2 * HASH_CHUNK, [(2 * HASH_CHUNK - 3, b"end")]),  # hole at the start
        (9 * MiB, [(1 * MiB, os.urandom(5 * MiB))]),  # data longer than a chunk
    ],
)
def test_sparse_hash_is_the_files_sha256(
    tmp_path: Path, size: int, data: list[tuple[int, bytes]]
) -> None:
    path = sparse_file(tmp_path / "disk.raw", size, data)
    assert path.stat().st_size == size
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_size_probes_of_parallel_builds_do_not_collide(tmp_path: Path) -> None:
    """`--all -j 2` runs builds as threads of one process: each size probe
    needs its own name (a PID-named probe failed one build with EEXIST)."""
    problems: list[str] = []
    start = threading.Barrier(8)

    def probe() -> None:
        start.wait()
        for _ in range(50):
            problems.append(largest_file_problem(tmp_path, 2 << 30))

    threads = [threading.Thread(target=probe) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(problems) == {""}
    assert list(tmp_path.iterdir()) == []
