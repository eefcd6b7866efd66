"""Shared fixtures: reference models from ``keras.applications`` and weight files saved from them.

No test reaches the network: weight files are made here, in both layouts
Keras writes, from seeded reference models whose biases are made non-zero so
that a bias lost or swapped shows in the outputs.
"""

from __future__ import annotations

import contextlib
import os
import signal
from functools import cache
from pathlib import Path

import h5py
import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def stored_paths(paths, output) -> list[str]:
    """Paths as a file at ``output`` stores them: relative to its folder (all tests stay inside)."""
    return [os.path.relpath(path, Path(output).parent) for path in paths]


def absolute_paths(paths, output) -> list[str]:
    """Stored paths made absolute again, by joining them to the folder of the file at ``output``."""
    return [os.path.normpath(os.path.join(Path(output).parent, path)) for path in paths]


@cache
def reference_model(depth: int, include_top: bool, image_size: int = 224, seed: int = 1):
    """``keras.applications.VGG16``/``VGG19`` with seeded kernels and non-zero biases.

    Cached for the session: tests read these models and never change them.
    """
    import keras

    keras.utils.set_random_seed(seed)
    build = {16: keras.applications.VGG16, 19: keras.applications.VGG19}[depth]
    model = build(weights=None, include_top=include_top, input_shape=(image_size, image_size, 3))
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if getattr(layer, "bias", None) is not None:
            layer.bias.assign(rng.uniform(-0.1, 0.1, layer.bias.shape).astype("float32"))
    return model


def save_legacy(model, path: Path) -> Path:
    """Save weights in the legacy ``.h5`` layout Keras publishes, with Keras's own writer."""
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "w") as file:
        legacy_h5_format.save_weights_to_hdf5_group(file, model)
    return path


def save_keras3(model, path: Path) -> Path:
    """Save weights in the Keras 3 ``.weights.h5`` layout."""
    model.save_weights(path)
    return path


@pytest.fixture(scope="session")
def weight_files(tmp_path_factory):
    """Builds and caches weight files by (depth, include_top, layout)."""
    folder = tmp_path_factory.mktemp("weights")
    made: dict[tuple[int, bool, str], Path] = {}

    def get(depth: int, include_top: bool = False, layout: str = "legacy") -> Path:
        key = (depth, include_top, layout)
        if key not in made:
            # Conv weights do not depend on the input size; 32 keeps the reference cheap.
            model = reference_model(depth, include_top, 224 if include_top else 32)
            top = "top" if include_top else "notop"
            if layout == "legacy":
                made[key] = save_legacy(model, folder / f"vgg{depth}_{top}.h5")
            else:
                made[key] = save_keras3(model, folder / f"vgg{depth}_{top}.weights.h5")
        return made[key]

    return get


@pytest.fixture
def keras_home(tmp_path, monkeypatch):
    """An empty Keras cache, and no way to the network for the published files."""
    home = tmp_path / "keras-home"
    monkeypatch.setenv("KERAS_HOME", str(home))
    monkeypatch.setattr("vggfeat.weights._RELEASES", (tmp_path / "no-such-server").as_uri())
    return home


#: prctl's request to make a process adopt its descendants' orphans (Linux).
PR_SET_CHILD_SUBREAPER = 36


def processes() -> dict[int, tuple[bytes, int]]:
    """Every process on the machine: its state (``b"Z"`` a zombie) and its parent's PID."""
    table = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except (OSError, ValueError):
            continue
        if entry.isdigit():
            table[int(entry)] = (fields[0], int(fields[1]))
    return table


def descendants(root: int) -> dict[int, str]:
    """Every running process descended from ``root`` (zombies left out), with its command."""
    parents = {
        pid: parent for pid, (state, parent) in processes().items() if state not in (b"Z", b"X")
    }
    found: dict[int, str] = {}
    waiting = [root]
    while waiting:
        parent = waiting.pop()
        for pid in [p for p, ppid in parents.items() if ppid == parent and p not in found]:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                    found[pid] = cmdline.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            waiting.append(pid)
    return found


@pytest.fixture
def adopted():
    """This test process adopts what its children leave behind when they are killed (a
    child subreaper), so a test can see what a killed run left, and end it at the end:
    processes it holds as their parent, never found by name."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        pytest.skip("this system cannot make a process adopt its orphans")
    try:
        yield lambda: descendants(os.getpid())
    finally:
        for _ in range(50):
            left = descendants(os.getpid())
            if not left:
                break
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for pid in left:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)  # ours once its parent is gone; else its parent's
        for pid in adopted_zombies():
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def adopted_zombies() -> list[int]:
    """Children of this process that have ended and wait to be taken away: the orphans it
    adopted (its own subprocesses are waited for by the tests that started them)."""
    me = os.getpid()
    return [pid for pid, (state, parent) in processes().items() if (state, parent) == (b"Z", me)]
