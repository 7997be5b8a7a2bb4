"""The command line: `imagesmith VERB ...`.

Only this module turns errors into messages and exit codes: 0 success,
1 a build or test failed, 2 a usage or config error, 130 interrupted. The
parser is parser.py, what each verb does is commands.py.
"""

from __future__ import annotations

import signal
import sys

from imagesmith import log
from imagesmith.cli.parser import build_parser
from imagesmith.errors import ImagesmithError


def interrupt_on_sigterm() -> None:
    """SIGTERM (from `kill`, a CI timeout, systemd) and SIGHUP (the terminal
    closed) clean up like Ctrl-C."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    log.set_verbose(args.verbose)
    interrupt_on_sigterm()
    try:
        return int(args.func(args))
    except ImagesmithError as e:
        print(f"imagesmith: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("imagesmith: interrupted; cleaned up", file=sys.stderr)
        return 130
