"""How vggfeat stops: Ctrl-C and SIGTERM end a command cleanly, never midway through a
step that must be whole (a commit, a backend's import)."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any


class Terminated(BaseException):
    """SIGTERM arrived; the run stops as on Ctrl-C."""


def raise_terminated(_signum: int, _frame: object) -> None:
    """A SIGTERM handler: stop as Ctrl-C stops."""
    raise Terminated


@contextlib.contextmanager
def stopping_on_signals() -> Iterator[None]:
    """SIGTERM raises ``Terminated``, so that work stops as on Ctrl-C and cleans up; a
    file-size limit fails a write (an error naming the file) instead of killing us; and a
    stop that lands where Python cannot raise it is kept for ``raise_kept_stop``."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, raise_terminated),
        signal.SIGXFSZ: signal.signal(signal.SIGXFSZ, signal.SIG_IGN),
    }
    hook = sys.unraisablehook
    sys.unraisablehook = _keep_stops
    try:
        yield
    finally:
        sys.unraisablehook = hook
        _kept.clear()
        for number, handler in previous.items():
            signal.signal(number, handler)


#: Stops that landed where Python cannot raise them, oldest first.
_kept: list[type[BaseException]] = []


def _keep_stops(unraisable: Any) -> None:
    """A Ctrl-C or SIGTERM can land in a garbage-collector callback or a finaliser (JAX
    has one), where Python prints the exception and goes on: the stop would be lost.
    It is kept instead, unprinted, and raised at the run's next safe point."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt | Terminated):
        _kept.append(type(unraisable.exc_value))
        return
    sys.__unraisablehook__(unraisable)


def raise_kept_stop() -> None:
    """Raise the Ctrl-C or SIGTERM that landed where it could not be raised, if one did."""
    if _kept:
        stop = _kept[0]
        _kept.clear()
        raise stop


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
