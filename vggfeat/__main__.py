"""``vggfeat`` and ``python -m vggfeat``: Ctrl-C and SIGTERM end it cleanly from its first line.

Before anything is imported, SIGTERM is made to stop the command as Ctrl-C
does; a signal that arrives before a command has anything to keep exits 130
(Ctrl-C) or 143 (SIGTERM), as one after it does.
"""

from __future__ import annotations

import signal
import sys


def main() -> None:
    from vggfeat.interrupts import Terminated, raise_terminated

    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        try:
            from vggfeat.cli import cli

            cli(prog_name="vggfeat")
        finally:
            # The command is over; a signal now would only kill the interpreter as it
            # exits (Python restores the default handlers then), with nothing to keep.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            _forget_caught_interrupts()
    except KeyboardInterrupt:
        sys.stderr.write("Stopped.\n")
        sys.exit(130)
    except Terminated:
        sys.stderr.write("Stopped.\n")
        sys.exit(143)


def _forget_caught_interrupts() -> None:
    """Keep the exit status the command chose after a Ctrl-C it handled.

    CPython marks a KeyboardInterrupt that leaves code run from a string (the
    methods ``dataclasses`` and ``namedtuple`` generate, at import) as
    unhandled, even when it is caught further up, and then ends the process by
    SIGINT when it exits, instead of with the status asked for. Running a string
    that completes clears the mark.
    """
    exec("pass", {})


if __name__ == "__main__":
    main()
