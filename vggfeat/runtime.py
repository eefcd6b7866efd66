"""TensorFlow, imported once, quietly, and only when a network is needed.

TensorFlow's C++ start-up writes CUDA probes and CPU-feature notes straight to
file descriptor 2, before its own log level is read, so setting
``TF_CPP_MIN_LOG_LEVEL`` alone does not silence them. Unless the user has set
that variable, standard error is muted at the descriptor while TensorFlow
starts; Python exceptions still arrive as usual.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path


@cache
def tensorflow():
    """The ``tensorflow`` module, started with its devices found."""
    quiet = "TF_CPP_MIN_LOG_LEVEL" not in os.environ
    with muted_stderr(enabled=quiet):
        if quiet:
            os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
        try:
            import keras  # noqa: F401  (Keras starts TensorFlow's Python side too)
            import tensorflow as tf

            tf.config.list_physical_devices()
        finally:
            if quiet:
                # Child processes (a user's subprocess, say) start with the user's setting.
                del os.environ["TF_CPP_MIN_LOG_LEVEL"]
    return tf


def gpus() -> list:
    """The GPUs TensorFlow can use."""
    return tensorflow().config.list_physical_devices("GPU")


def cpu_has_fast_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512_BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@contextmanager
def muted_stderr(enabled: bool = True) -> Iterator[None]:
    """Standard error silenced at the file descriptor, for libraries that write there directly."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
