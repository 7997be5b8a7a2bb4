"""Work in a background thread that never holds up the process's exit.

A Ctrl-C must end a build within a second; a ThreadPoolExecutor's workers are
joined when the interpreter exits, so a 4 GB copy or hash in one would hold
the exit up until it is done. These threads are daemons: the process leaves
them behind, and their result is read through a Future.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


def in_background(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
    """Start `fn(*args, **kwargs)` in a daemon thread; its result or exception
    arrives in the returned Future."""
    future: Future[T] = Future()

    def work() -> None:
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # handed to whoever reads the result
            future.set_exception(e)

    threading.Thread(target=work, name=f"bg-{fn.__name__}", daemon=True).start()
    return future


def settle(*futures: Future[Any] | None) -> None:
    """Wait for each of `futures` to end, however it ends."""
    for future in futures:
        if future is not None:
            with contextlib.suppress(Exception):  # its error was someone else's to report
                future.result()
