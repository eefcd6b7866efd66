"""What loading PyTorch's weights costs against Keras's own file of the same network.

    python benchmarks/weights.py                  # VGG16 through fc7, 7 loads of each file
    python benchmarks/weights.py --profile smoke  # VGG11 through pool5, seconds

Makes one set of random VGG16 weights (with the classifier: 553 MB of
float32) and writes it twice: as a safetensors file in torchvision's layout
and, through Keras's own writer, as a legacy Keras ``.h5`` file (the layout
Keras publishes). Each load is a fresh process that imports TensorFlow, then
builds the network cut at fc7 with the file's weights
(``vggfeat.weights.build_with_weights``): the time of that call, and the
process's peak resident memory (``ru_maxrss``) against its memory before it.
The files take turns, after one untimed read of each puts both in the page
cache. The goal: the safetensors file loads in at most 1.2x the time of the
``.h5`` file, with a peak no higher.

Appends its table to benchmarks/RESULTS.md unless ``--no-record``.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import ROOT, profile_main


@dataclass(frozen=True)
class Profile:
    depth: int
    layer: str
    image_size: int
    loads: int


PROFILES = {
    "cpu": Profile(16, "fc7", 224, 7),
    "smoke": Profile(11, "pool5", 32, 1),
}

#: One load, in a process of its own: JSON of seconds and resident memory (MB).
CHILD = """
import json, resource, sys, time
from vggfeat.runtime import start
start("tensorflow")
from vggfeat.architecture import vgg
from vggfeat.weights import build_with_weights

def resident_mb():
    with open("/proc/self/status") as status:
        line = next(l for l in status if l.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024

path, depth, layer, size = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
architecture = vgg(depth)
before = resident_mb()
started = time.perf_counter()
model, _ = build_with_weights(architecture, size, architecture.layer(layer), path)
seconds = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "before_mb": before, "peak_mb": peak}))
"""


def torchvision_weights(depth: int, classifier: bool) -> dict[str, np.ndarray]:
    """Random weights in torchvision's layout, He-scaled, float32."""
    from vggfeat.architecture import BLOCK_DEPTHS, BLOCK_WIDTHS

    rng = np.random.default_rng(0)
    state: dict[str, np.ndarray] = {}
    index, channels = 0, 3
    for convs, width in zip(BLOCK_DEPTHS[depth], BLOCK_WIDTHS, strict=True):
        for _ in range(convs):
            kernel = rng.standard_normal((width, channels, 3, 3), np.float32)
            state[f"features.{index}.weight"] = kernel * np.float32(np.sqrt(2 / (9 * channels)))
            state[f"features.{index}.bias"] = rng.uniform(-0.1, 0.1, width).astype(np.float32)
            index, channels = index + 2, width
        index += 1  # the pool
    if classifier:
        for number, (out, inputs) in zip(
            (0, 3, 6), ((4096, 25088), (4096, 4096), (1000, 4096)), strict=True
        ):
            weight = rng.standard_normal((out, inputs), np.float32)
            weight *= np.float32(np.sqrt(2 / inputs))
            state[f"classifier.{number}.weight"] = weight
            state[f"classifier.{number}.bias"] = rng.uniform(-0.1, 0.1, out).astype(np.float32)
    return state


def make_files(profile: Profile, folder: Path) -> dict[str, Path]:
    """The same weights as safetensors (torchvision's layout) and as Keras's legacy .h5."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format
    from safetensors.numpy import save_file

    from vggfeat.architecture import vgg
    from vggfeat.runtime import start
    from vggfeat.weights import build_with_weights

    start("tensorflow")
    torch_file = folder / f"vgg{profile.depth}.safetensors"
    save_file(torchvision_weights(profile.depth, profile.layer.startswith("fc")), str(torch_file))
    architecture = vgg(profile.depth)
    model, _ = build_with_weights(
        architecture, profile.image_size, architecture.layer(profile.layer), str(torch_file)
    )
    keras_file = folder / f"vgg{profile.depth}.h5"
    with h5py.File(keras_file, "w") as file:
        legacy_h5_format.save_weights_to_hdf5_group(file, model)
    return {"Keras legacy .h5": keras_file, "safetensors, torchvision's layout": torch_file}


def load(path: Path, profile: Profile) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(profile.depth), profile.layer,
         str(profile.image_size)],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(profile_name: str, folder: Path) -> list[str]:
    from vggfeat.runtime import backend_version, describe_cpu

    profile = PROFILES[profile_name]
    files = make_files(profile, folder)
    for path in files.values():
        path.read_bytes()  # into the page cache, untimed
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in files}
    for turn in range(profile.loads):
        for name, path in files.items():
            runs[name].append(load(path, profile))
            print(turn, name, runs[name][-1], flush=True)
    lines = [
        f"## Weights: loading cost, profile {profile_name}, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"{describe_cpu()}; TensorFlow {backend_version('tensorflow')}. VGG{profile.depth} cut "
        f"at {profile.layer} at {profile.image_size}x{profile.image_size}, random weights: "
        f"{profile.loads} loads of each file, each in a fresh process, the files taking turns; "
        "the median load, and the highest peak of resident memory.",
        "",
        "| file | size (MB) | load (s) | x .h5 | memory before (MB) | peak (MB) | peak - before "
        "(MB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    baseline = statistics.median(run["seconds"] for run in runs["Keras legacy .h5"])
    for name, path in files.items():
        seconds = statistics.median(run["seconds"] for run in runs[name])
        before = statistics.median(run["before_mb"] for run in runs[name])
        peak = max(run["peak_mb"] for run in runs[name])
        lines.append(
            f"| {name} | {path.stat().st_size / 1e6:,.0f} | {seconds:.2f} | "
            f"{seconds / baseline:.2f} | {before:,.0f} | {peak:,.0f} | {peak - before:,.0f} |"
        )
    return [*lines, ""]


def main() -> None:
    profile_main(__doc__, PROFILES, measure)


if __name__ == "__main__":
    main()
