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


#: The test files that take longest, started first so that neither worker is left with
#: one of them at the end while the other idles (the manual's pages come next).
LONGEST_FIRST = ["test_reliability.py", "test_ray.py", "test_examples.py"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """One worker takes a test file whole, except the manual's pages, which any worker takes.

    A file's tests share their module's fixtures and never race each other (the
    ``loadgroup`` of pyproject.toml, with a file a group); each page of examples in
    test_examples.py is a run of its own, minutes of them in all, so they spread.
    """
    for item in items:
        file, _, _ = item.nodeid.partition("::")
        spreads = item.name.startswith("test_every_example_on_the_page_prints_what_it_shows")
        item.add_marker(pytest.mark.xdist_group(item.nodeid if spreads else file))
    rank = {name: place for place, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


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


#: torchvision's configurations, written out as its ``cfgs`` table has them: channels of each
#: convolution, "M" for each max pool. Independent of vggfeat's own table.
TORCHVISION_CFGS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", *[256] * 4, "M", *[512] * 4, "M", *[512] * 4, "M"],
}


def torchvision_state(
    depth: int, batch_norm: bool, classifier: bool = False, seed: int = 0
) -> dict[str, np.ndarray]:
    """A VGG's state dict in torchvision's layout (``features.N``, ``classifier.{0,3,6}``),
    random: He-scaled kernels, non-zero biases and batch-norm statistics away from the
    identity, so that anything swapped, lost or mis-ordered shows in the features."""
    rng = np.random.default_rng(seed)
    state: dict[str, np.ndarray] = {}
    index, channels = 0, 3
    for entry in TORCHVISION_CFGS[depth]:
        if entry == "M":
            index += 1
            continue
        scale = np.sqrt(2 / (channels * 9))
        state[f"features.{index}.weight"] = rng.normal(0, scale, (entry, channels, 3, 3))
        state[f"features.{index}.bias"] = rng.uniform(-0.1, 0.1, entry)
        if batch_norm:
            norm = f"features.{index + 1}"
            state[f"{norm}.weight"] = rng.uniform(0.5, 1.5, entry)
            state[f"{norm}.bias"] = rng.uniform(-0.2, 0.2, entry)
            state[f"{norm}.running_mean"] = rng.normal(0, 0.3, entry)
            state[f"{norm}.running_var"] = rng.uniform(0.5, 2.0, entry)
            state[f"{norm}.num_batches_tracked"] = np.array(1000, np.int64)
        index += 3 if batch_norm else 2
        channels = entry
    if classifier:
        for number, (out, inputs) in zip(
            (0, 3, 6), ((4096, 512 * 7 * 7), (4096, 4096), (1000, 4096)), strict=True
        ):
            weight = rng.standard_normal((out, inputs), np.float32)
            weight *= np.sqrt(2 / inputs)
            state[f"classifier.{number}.weight"] = weight
            state[f"classifier.{number}.bias"] = rng.uniform(-0.1, 0.1, out)
    return {
        key: value if value.dtype == np.int64 else value.astype(np.float32)
        for key, value in state.items()
    }


def timm_state(torchvision: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same weights in timm's layout: fc6 as ``pre_logits.fc1``, a 7x7 convolution over
    pool5's map; fc7 as ``pre_logits.fc2``, a 1x1 convolution; fc8 as ``head.fc``."""
    renamed = {
        "classifier.0": ("pre_logits.fc1", (4096, 512, 7, 7)),
        "classifier.3": ("pre_logits.fc2", (4096, 4096, 1, 1)),
        "classifier.6": ("head.fc", None),
    }
    state = {}
    for key, value in torchvision.items():
        module, _, name = key.rpartition(".")
        if module in renamed:
            new, shape = renamed[module]
            state[f"{new}.{name}"] = value.reshape(shape) if shape and name == "weight" else value
        else:
            state[key] = value
    return state


def save_safetensors(state: dict[str, np.ndarray], path: Path) -> Path:
    from safetensors.numpy import save_file

    save_file(state, str(path))
    return path


@pytest.fixture
def keras_home(tmp_path, monkeypatch):
    """An empty Keras cache, and no way to the network for the published files."""
    home = tmp_path / "keras-home"
    monkeypatch.setenv("KERAS_HOME", str(home))
    nowhere = (tmp_path / "no-such-server").as_uri()
    monkeypatch.setattr("vggfeat.weights.keras_files._RELEASES", nowhere)
    monkeypatch.setattr("vggfeat.weights.pytorch_files._HUB", nowhere)
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


def write_features(
    output: Path, paths: list[str], rows: np.ndarray, layer: str = "fc7", dtype: str = "float32"
) -> Path:
    """A vggfeat file holding ``rows`` ((N, D)) for ``paths`` as its one layer, written by the
    store itself, with no network: for tests of what reads features, whatever made them.
    ``paths`` are keys: relative to the file's folder, or absolute."""
    from vggfeat.store.hdf5 import appending, create, encoded_length, path_width
    from vggfeat.store.layout import LayerSpec, Layout, Rows, Settings

    settings = Settings(
        depth=16, layers=(layer,), pooling="none", weights="random", weights_file="",
        weights_sha256="", seed=0, image_size=224, resize="squash", compute_dtype="float32",
        dtype=dtype, heads=("none",),
    )  # fmt: skip
    spec = LayerSpec(layer, {"fc7": "fc2", "fc6": "fc1"}.get(layer, layer), "none", rows.shape[1:])
    layout = Layout(settings, (spec,), "none", {})
    create(output, layout, path_width(encoded_length(paths) if paths else 1))
    count = len(paths)
    with appending(output) as appender:
        unknown, none = np.full(count, -1, np.int64), np.zeros(0, np.int64)
        features = (rows.astype(dtype),)
        appender.add(Rows(list(paths), unknown, unknown, features, [], [], none, none))
        appender.commit()
    return output


def clustered(count: int, width: int, centres: int, spread: float, seed: int = 0) -> np.ndarray:
    """(count, width) float32 rows around ``centres`` random directions, ``spread`` apart
    from them: the shape of real features, which gather around what the images show."""
    rng = np.random.default_rng(seed)
    middles = rng.standard_normal((centres, width)).astype(np.float32)
    middles /= np.linalg.norm(middles, axis=1, keepdims=True)
    sizes = rng.integers(1, 6, centres)  # clusters of unequal sizes
    which = rng.choice(centres, count, p=sizes / sizes.sum())
    noise = rng.standard_normal((count, width)).astype(np.float32) * (spread / np.sqrt(width))
    return (middles[which] + noise).astype(np.float32)
