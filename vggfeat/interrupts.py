"""How vggfeat stops: Ctrl-C and SIGTERM end a command cleanly, never midway through a
step that must be whole (a commit, a backend's import)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Terminated(BaseException):
    """SIGTERM arrived; the run stops as on Ctrl-C."""


def raise_terminated(_signum: int, _frame: object) -> None:
    """A SIGTERM handler: stop as Ctrl-C stops."""
    raise Terminated


@contextlib.contextmanager
def stopping_on_signals() -> Iterator[None]:
    """SIGTERM raises ``Terminated``, so that work stops as on Ctrl-C and cleans up; a
    file-size limit fails a write (an error naming the file) instead of killing us."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, raise_terminated),
        signal.SIGXFSZ: signal.signal(signal.SIGXFSZ, signal.SIG_IGN),
    }
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block is done, then deliver them (main thread only).

    Masking the signal would not do: the process's other threads would take it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {number: signal.signal(number, lambda n, _: caught.append(n)) for number in held}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for waiting in dict.fromkeys(caught):
            signal.raise_signal(waiting)
