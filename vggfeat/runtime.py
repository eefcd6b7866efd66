"""The backend room: which Keras backend, which device, their versions, and out-of-memory.

Keras 3 runs one model on TensorFlow or JAX; the backend must be chosen
before ``keras`` is first imported, and one process keeps it. Everything else
in vggfeat speaks ``keras.ops`` and NumPy, and asks here.

TensorFlow's C++ start-up writes CUDA probes and CPU-feature notes straight to
file descriptor 2, before its own log level is read, so setting
``TF_CPP_MIN_LOG_LEVEL`` alone does not silence them. Unless the user asks
for those notes (``TF_CPP_MIN_LOG_LEVEL`` 0 or 1), standard error is muted at
the descriptor while a backend starts; Python exceptions still arrive as usual.
JAX would take 75 % of a GPU's memory at start; unless the user says otherwise
it takes what it needs, so that several networks can share a GPU.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import ModuleType

from vggfeat.errors import OptionError, VggfeatError
from vggfeat.interrupts import signals_deferred

BACKENDS = ("tensorflow", "jax")
BACKEND_NAMES = {"tensorflow": "TensorFlow", "jax": "JAX"}
INSTALL = {
    "tensorflow": "pip install 'tensorflow>=2.21,<2.22'",
    "jax": "pip install 'jax>=0.6'",
}
GPU_INSTALL = {
    "tensorflow": "pip install 'tensorflow[and-cuda]' (Linux; TensorFlow has no GPU build for "
    "Windows)",
    "jax": "pip install -U 'jax[cuda12]' (or jax[cuda13], matching the driver)",
}


class BackendError(VggfeatError):
    """A backend or device that cannot be had."""


@dataclass(frozen=True)
class Device:
    """Where a network computes."""

    kind: str
    """``cpu`` or ``gpu``."""
    index: int
    name: str
    """What it is, e.g. ``NVIDIA H200`` or ``CPU, 2 cores, AVX512_BF16``."""

    @property
    def label(self) -> str:
        return f"{self.name} (GPU {self.index})" if self.kind == "gpu" else self.name


def default_backend() -> str:
    """``KERAS_BACKEND`` where set (as Keras does), else TensorFlow."""
    chosen = os.environ.get("KERAS_BACKEND", "").strip().lower()
    if chosen and chosen not in BACKENDS:
        raise OptionError(
            f"KERAS_BACKEND={os.environ['KERAS_BACKEND']} is not a backend vggfeat runs on "
            f"({', '.join(BACKENDS)}); pass --backend, or unset KERAS_BACKEND"
        )
    return chosen or "tensorflow"


def installed(backend: str) -> bool:
    try:
        return importlib.util.find_spec(backend) is not None
    except ValueError:  # a module set to None in sys.modules: as good as missing
        return False


def require(backend: str) -> None:
    """Fail at once, naming the install command, when ``backend`` is unknown or missing."""
    if backend not in BACKENDS:
        raise OptionError(f"--backend {backend} is not one of {', '.join(BACKENDS)}")
    if not installed(backend):
        other = next(b for b in BACKENDS if b != backend)
        raise BackendError(
            f"the {backend} backend needs {backend}, which is not installed: "
            f"{INSTALL[backend]}, or use --backend {other}"
        )


@cache
def start(backend: str) -> ModuleType:
    """Import Keras on ``backend``, quietly, once; the ``keras`` module.

    Refuses a second backend in a process whose Keras already runs on another.
    """
    require(backend)
    loaded = sys.modules.get("keras")
    if loaded is not None and loaded.backend.backend() != backend:
        raise BackendError(
            f"Keras already runs on {loaded.backend.backend()} in this process; --backend "
            f"{backend} needs a new process (or KERAS_BACKEND={backend} before importing keras)"
        )
    os.environ["KERAS_BACKEND"] = backend
    library(backend)
    try:
        with _quiet():
            import keras
    except ImportError as error:
        raise BackendError(
            f"keras cannot be imported ({error}); reinstall it: pip install -U keras"
        ) from None
    return keras


def keras_module() -> ModuleType:
    """Keras, on the backend it already runs on, else on the default one."""
    loaded = sys.modules.get("keras")
    return loaded if loaded is not None else start(default_backend())


@cache
def library(backend: str) -> ModuleType:
    """The backend's own module (``tensorflow`` or ``jax``), started quietly with its devices."""
    require(backend)
    if backend == "jax":
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    try:
        with _quiet():
            if backend == "tensorflow":
                import tensorflow as module

                module.config.list_physical_devices()
            else:
                import jax as module

                module.devices()
    except ImportError as error:
        raise BackendError(
            f"{backend} is installed but cannot be imported ({error}); reinstall it: "
            f"{INSTALL[backend]}"
        ) from None
    return module


@contextmanager
def _quiet() -> Iterator[None]:
    """A library's import: its start-up notes on file descriptor 2 muted, unless the user
    asks for them, and Ctrl-C or SIGTERM held until it is done. An import stopped midway
    leaves a half-made module that the next import trips on, and a KeyboardInterrupt
    raised in a finaliser there is printed (to the muted stderr) and lost."""
    level = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
    quiet = level is None or level.strip() not in ("0", "1")
    with signals_deferred(), muted_stderr(enabled=quiet):
        if level is None:
            os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
        try:
            yield
        finally:
            if level is None:
                # Child processes (a user's subprocess, say) start with the user's setting.
                del os.environ["TF_CPP_MIN_LOG_LEVEL"]


def tensorflow() -> ModuleType:
    """The ``tensorflow`` module, with Keras started on it."""
    start("tensorflow")
    return library("tensorflow")


def backend_version(backend: str) -> str:
    try:
        return version("jaxlib" if backend == "jax" else backend)
    except PackageNotFoundError:
        return ""


def devices(backend: str) -> list[Device]:
    """The devices ``backend`` can compute on, GPUs first (Keras not needed)."""
    found: list[Device] = []
    if backend == "tensorflow":
        tf = library("tensorflow")
        for index, gpu in enumerate(tf.config.list_physical_devices("GPU")):
            details = tf.config.experimental.get_device_details(gpu)
            found.append(Device("gpu", index, details.get("device_name", gpu.name)))
    else:
        jax = library("jax")
        found += [
            Device("gpu", index, device.device_kind)
            for index, device in enumerate(jax.devices())
            if device.platform == "gpu"
        ]
    found.append(Device("cpu", 0, describe_cpu()))
    return found


def choose_device(backend: str, wanted: str | None) -> Device:
    """The device ``--device`` names (``cpu``, ``gpu``, ``gpu:N``), else the first GPU, else CPU."""
    available = devices(backend)
    gpus = [device for device in available if device.kind == "gpu"]
    cpu = available[-1]
    if wanted is None:
        return gpus[0] if gpus else cpu
    choice = wanted.strip().lower()
    if choice == "cpu":
        return cpu
    if choice == "gpu" or choice.startswith("gpu:"):
        index = int(choice[4:]) if choice[4:].isdigit() else 0 if choice == "gpu" else -1
        if index < 0:
            raise OptionError(f"--device {wanted} is not cpu, gpu or gpu:N")
        if index < len(gpus):
            return gpus[index]
        why = gpu_absence(backend) if not gpus else f"it sees {len(gpus)} GPUs"
        raise BackendError(
            f"--device {wanted}: {backend} sees no such GPU ({why}); use --device cpu"
        )
    raise OptionError(f"--device {wanted} is not cpu, gpu or gpu:N")


def backend_facts(backend: str) -> dict:
    """For ``vggfeat devices``: installed or not, version, devices, and why no GPU if none."""
    facts: dict = {"backend": backend, "install": INSTALL[backend]}
    if not installed(backend):
        return facts | {"installed": False, "version": "", "devices": [], "no_gpu_because": ""}
    try:
        found = devices(backend)
    except BackendError as error:
        return facts | {
            "installed": True,
            "version": backend_version(backend),
            "devices": [],
            "no_gpu_because": str(error),
        }
    return facts | {
        "installed": True,
        "version": backend_version(backend),
        "devices": [
            {"id": f"gpu:{d.index}" if d.kind == "gpu" else "cpu", "kind": d.kind, "name": d.name}
            for d in found
        ],
        "no_gpu_because": "" if any(d.kind == "gpu" for d in found) else gpu_absence(backend),
    }


def gpu_absence(backend: str) -> str:
    """Why ``backend`` sees no GPU: none in the machine, or one it cannot reach, and the fix."""
    present = nvidia_gpus()
    if not present:
        return "this machine has no NVIDIA GPU that nvidia-smi lists"
    return (
        f"this machine has {len(present)} ({present[0]}), but this {backend} build cannot "
        f"use it; for a build that can: {GPU_INSTALL[backend]}"
    )


@cache
def nvidia_gpus() -> list[str]:
    """The NVIDIA GPUs the driver lists, whatever any library sees."""
    try:
        listed = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in listed.stdout.splitlines() if line.strip()]


def gpu_free_bytes(device: Device, backend: str) -> int | None:
    """Memory the backend can still allocate on a GPU; None where it does not say (TensorFlow:
    running out of memory then halves the batch instead)."""
    if backend != "jax":
        return None
    jax = library("jax")
    try:
        stats = jax.devices("gpu")[device.index].memory_stats() or {}
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    except (RuntimeError, KeyError, IndexError, TypeError, ValueError):
        return None


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is a device running out of memory, on either backend."""
    if type(error).__name__ == "ResourceExhaustedError":  # TensorFlow
        return True
    # JAX raises XlaRuntimeError (JaxRuntimeError in newer versions) with the status in words.
    return type(error).__name__.endswith("RuntimeError") and "RESOURCE_EXHAUSTED" in str(error)


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def cpu_has_fast_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512_BF16 or AMX)."""
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def describe_cpu() -> str:
    """``CPU, 2 cores, AVX512_BF16``: what the network computes on without a GPU."""
    notable = [
        name.upper()
        for name in ("avx512_bf16", "amx_bf16", "avx512f", "avx2")
        if name in cpu_flags()
    ]
    return ", ".join(["CPU", f"{os.cpu_count()} cores", *notable[:1]])


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
