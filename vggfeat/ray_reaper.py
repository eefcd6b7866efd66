"""Ends a local Ray instance when the vggfeat process that started it ends, however it ends.

Run as a script (it imports nothing of vggfeat's, so it starts at once)::

    python ray_reaper.py DRIVER_PID FOLDER

The driver starts it before its Ray instance, with FOLDER the instance's own
temporary folder, and keeps a pipe to its standard input. While the driver
lives, this process notes, several times a second, every process of the
instance: the driver's children that name FOLDER (Ray's servers) and all
their descendants (agents, workers), each with its start time. When standard
input closes (the driver closed the engine, or died, even by ``kill -9``), it
ends the ones still running, SIGTERM first and SIGKILL after two seconds, and
removes FOLDER. A PID is ended only if it still has the start time noted, so
a PID the system gave to another program since is never touched.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import sys
import time

POLL_SECONDS = 0.2
GRACE_SECONDS = 2.0


def _processes() -> dict[int, tuple[int, int]]:
    """Every running process but this one: (parent PID, start time in clock ticks).
    A zombie is left out: it has ended, and only its parent can take it away."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if fields[0] not in (b"Z", b"X"):
            found[int(entry)] = (int(fields[1]), int(fields[19]))
    return found


def _names(pid: int, folder: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return folder in cmdline.read()
    except OSError:
        return False


def _family(roots: set[int], table: dict[int, tuple[int, int]]) -> dict[int, int]:
    """``roots`` and all their descendants, each with its start time."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    family: dict[int, int] = {}
    waiting = [pid for pid in roots if pid in table]
    while waiting:
        pid = waiting.pop()
        if pid not in family:
            family[pid] = table[pid][1]
            waiting.extend(children.get(pid, []))
    return family


def _note(driver: int, folder: bytes, noted: dict[int, int]) -> None:
    table = _processes()
    roots = {pid for pid, (parent, _) in table.items() if parent == driver and _names(pid, folder)}
    noted.update(_family(roots | set(noted), table))


def _end(noted: dict[int, int]) -> None:
    """End every noted process still running as itself, and whatever it started since."""
    deadline = time.monotonic() + GRACE_SECONDS
    number = signal.SIGTERM
    while True:
        table = _processes()
        alive = {pid for pid, start in noted.items() if table.get(pid, (0, -1))[1] == start}
        family = _family(alive, table)
        if not family:
            return
        noted.update(family)
        for pid in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, number)
        time.sleep(0.1)
        if time.monotonic() > deadline:
            number = signal.SIGKILL


def main(arguments: list[str]) -> int:
    driver, folder = int(arguments[0]), arguments[1]
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, signal.SIG_IGN)  # the driver decides when the instance ends
    noted: dict[int, int] = {}
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], POLL_SECONDS)
        if ready and not os.read(sys.stdin.fileno(), 4096):
            break
        _note(driver, os.fsencode(folder), noted)
    _note(driver, os.fsencode(folder), noted)
    _end(noted)
    shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
