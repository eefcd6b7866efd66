"""Text that UTF-8 can hold, for HDF5's strings and for messages."""

from __future__ import annotations


def storable(text: str) -> str:
    """``text`` with each byte that is not UTF-8 (a surrogate, as Python reads such a byte
    of a file name or an argument) written ``\\xNN``, and any other lone surrogate as
    ``\\udNNN``: what UTF-8 can encode, and a person can read."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate no byte made
        return text.encode("utf-8", "backslashreplace").decode()
