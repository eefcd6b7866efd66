"""One identity per image, however its path is spelt.

A row is keyed by the image's path with every folder resolved (symlinks,
``..``, the working directory), relative to the folder holding the output, or
absolute when the image lies elsewhere. The file name itself is kept as it
is: a symlink to an image is its own row. Keys are valid UTF-8: a byte of a
name that is not is written ``\\xNN``, reversibly.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Stamp:
    """A file's size and modification time when it was read: what ``--update`` compares."""

    size: int
    mtime_ns: int


def output_path(path: str | os.PathLike) -> Path:
    """The output file, its own symlink resolved: one file has one parts folder and one lock."""
    path = Path(path)
    try:
        linked = path.is_symlink()
    except OSError:
        linked = False  # a folder we may not search: the writer's checks say so
    return Path(os.path.realpath(path)) if linked else path


def parts_folder(path: Path) -> Path:
    """Where a run on ``path`` keeps its committed work until the output is written."""
    return path.with_name(path.name + ".parts")


def home_of(path: Path) -> Path:
    """The folder keys are relative to: the output's, every link resolved."""
    return Path(os.path.realpath(path.absolute().parent))


class Identity:
    """Keys of images for one output, and the images of keys."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self._prefix = os.path.join(str(home), "")
        self._real_folders: dict[str, str] = {}

    def key(self, path: str) -> str:
        """The key of the image at ``path``: every folder resolved, relative to ``home``."""
        folder, name = os.path.split(os.path.abspath(path))
        real = self._real_folders.get(folder)
        if real is None:
            real = self._real_folders[folder] = os.path.realpath(folder)
        full = os.path.join(real, name)
        if full.startswith(self._prefix):
            full = full[len(self._prefix) :]
        return escape(full)

    def path(self, key: str) -> str:
        """The path of the image stored as ``key``, whether or not it still exists."""
        return os.path.join(self.home, unescape(key))

    def locate(self, key: str) -> str | None:
        """Where the image stored as ``key`` is now, or None if it is gone."""
        path = self.path(key)
        return path if os.path.lexists(path) else None


#: A backslash that could be read as an escape: before another, before xNN, or before a byte
#: that is not UTF-8 (which becomes \xNN itself).
_AMBIGUOUS_BACKSLASH = re.compile(r"\\(?=\\|x[0-9a-fA-F]{2}|[\udc80-\udcff])")
_UNDECODABLE = re.compile(r"[\udc80-\udcff]")
_ESCAPE = re.compile(rb"\\\\|\\x([0-9a-fA-F]{2})")


def escape(path: str) -> str:
    """A path as a key: valid UTF-8, each byte that is not shown as \\xNN.

    So that no two names are stored alike, a backslash that could be read as
    part of an escape is doubled; any other backslash stays as it is.
    """
    path = _AMBIGUOUS_BACKSLASH.sub(r"\\\\", path)
    return _UNDECODABLE.sub(lambda m: f"\\x{ord(m[0]) - 0xDC00:02x}", path)


def unescape(key: str) -> str:
    """The path ``escape`` made ``key`` of, as the file system names it."""
    if "\\" not in key:
        return key
    raw = _ESCAPE.sub(lambda m: b"\\" if m[1] is None else bytes([int(m[1], 16)]), key.encode())
    return os.fsdecode(raw)
