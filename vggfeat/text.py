"""Text that UTF-8 can hold, for HDF5's strings and for messages."""

from __future__ import annotations

import re


def storable(text: str) -> str:
    """``text`` with each byte that is not UTF-8 (a surrogate, as Python reads such a byte
    of a file name or an argument) written ``\\xNN``, and any other lone surrogate as
    ``\\udNNN``: what UTF-8 can encode, and a person can read."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate no byte made
        return text.encode("utf-8", "backslashreplace").decode()


def tsv_field(text: str) -> str:
    """``text`` as one tab-separated field: backslash, tab, newline and return escaped."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def tsv_unescape(field: str) -> str:
    """The text ``tsv_field`` made ``field`` of."""
    if "\\" not in field:
        return field
    return re.sub(r"\\([\\tnr])", lambda m: _UNESCAPED[m[1]], field)


_UNESCAPED = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}


def printable(text: str) -> str:
    """``text`` for a message: tab, newline and backslash as in tsv, other control
    characters (a terminal's escape codes) and bytes that are not UTF-8 as ``\\xNN``."""
    escaped = "".join(
        f"\\x{ord(c):02x}" if ord(c) < 32 or 127 <= ord(c) < 160 else c for c in tsv_field(text)
    )
    return storable(escaped)
