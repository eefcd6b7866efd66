"""Throughput and memory of vggfeat against the Keras recipe and the network alone.

    python benchmarks/run.py                 # the CPU suite, a few minutes
    python benchmarks/run.py --profile gpu   # the same on an NVIDIA GPU, bigger runs
    python benchmarks/run.py --profile smoke # seconds; what CI runs to keep this working

Measures, in one run on one machine, side by side:

 1. the network alone: the cut model on a ready uint8 batch (the upper bound);
 2. the Keras recipe one image at a time (load_img, img_to_array,
    preprocess_input, predict);
 3. the Keras recipe batched: every image loaded that way, then one predict;
 4. ``vggfeat extract`` end to end, steady state: two runs of different sizes,
    the difference in images over the difference in time, start-up apart;
 5. the same with ``--precision mixed``, and the cosine similarity of its
    features to float32's;
 6. decoding alone, by number of workers;
 7. peak resident memory of ``vggfeat extract`` at two folder sizes;
 8. ``vggfeat --help`` wall time.

Prints a table and appends it, with the machine's description, to
benchmarks/RESULTS.md (``--results`` elsewhere, ``--no-record`` nowhere).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_images"
#: Typical camera and web sizes, (width, height), cycled through when making the folder.
SIZES = [(500, 375), (640, 480), (1024, 768), (1600, 1200), (2048, 1536), (4000, 3000)]


@dataclass(frozen=True)
class Profile:
    """How big each measurement is."""

    layer: str
    image_size: int
    batch_size: int
    network_batches: int
    warm_up_mb: int
    single_images: int
    batched_images: int
    small_run: int
    large_run: int
    memory_runs: tuple[int, int]
    memory_image_size: int
    decode_workers: tuple[int, ...]


PROFILES = {
    "cpu": Profile("fc7", 224, 32, 8, 4096, 16, 128, 64, 320, (500, 5000), 64, (1, 2, 4)),
    "gpu": Profile(
        "fc7", 224, 256, 40, 16384, 32, 2048, 4096, 20480, (500, 5000), 64, (4, 8, 16, 32)
    ),
    "smoke": Profile("pool1", 32, 4, 2, 64, 4, 8, 8, 16, (20, 40), 32, (1, 2)),
}


@dataclass(frozen=True)
class Row:
    name: str
    images_per_second: float | None
    note: str = ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--work", type=Path, help="folder for images and outputs (a temp one)")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args()
    profile = PROFILES[args.profile]

    with tempfile.TemporaryDirectory(prefix="vggfeat-bench-") as temp:
        work = args.work or Path(temp)
        work.mkdir(parents=True, exist_ok=True)
        rows, facts = run_suite(profile, work)
    table = render(rows, facts, args.profile)
    print(table)
    if not args.no_record:
        with args.results.open("a") as results:
            results.write(table + "\n")
        print(f"appended to {args.results}")


def run_suite(profile: Profile, work: Path) -> tuple[list[Row], dict[str, str]]:
    photos = make_folder(work / "photos", profile.large_run)
    paths = sorted(str(p) for p in photos.glob("*.jpg"))
    facts = machine()
    warm_memory(profile.warm_up_mb)
    rows: list[Row] = []

    first = network_alone(profile, "float32")
    mixed_alone = network_alone(profile, "mixed")
    # vggfeat's own runs come before the Keras recipes, whose models this
    # process would otherwise hold in memory beside them.
    steady, startup, own, output_f32 = extract_steady(profile, photos, work, "float32")
    steady_mixed, startup_mixed, own_mixed, output_mixed = extract_steady(
        profile, photos, work, "mixed"
    )
    cosine = mean_cosine(output_f32, output_mixed, profile.layer)
    single = keras_single(profile, paths)
    recipe = keras_batched(profile, paths)
    # The upper bound is the better of two measurements, one on each side of the runs.
    second = network_alone(profile, "float32")
    network = max(first, second)
    rows += [
        Row(
            "1. network alone, float32",
            network,
            f"the better of {first:,.1f} (before the runs) and {second:,.1f} (after)",
        ),
        Row("1b. network alone, mixed", mixed_alone),
        Row("2. Keras recipe, one image at a time", single),
        Row("3. Keras recipe, batched", recipe),
        Row(
            "4. vggfeat extract, float32",
            steady,
            f"start-up {startup:.1f} s; vggfeat's own figure {own:,.1f} images/s",
        ),
        Row(
            "5. vggfeat extract, mixed",
            steady_mixed,
            f"start-up {startup_mixed:.1f} s; vggfeat's own figure {own_mixed:,.1f} images/s; "
            f"cosine to float32 {cosine:.5f}",
        ),
    ]
    for workers in profile.decode_workers:
        rows.append(
            Row(f"6. decoding alone, {workers} workers", decode_alone(paths, profile, workers))
        )
    small, large = profile.memory_runs
    memory = [peak_memory(profile, work, count) for count in (small, large)]
    rows.append(Row(f"7. peak memory, {small:,} images", None, f"{memory[0]:,.0f} MB"))
    rows.append(
        Row(
            f"7. peak memory, {large:,} images",
            None,
            f"{memory[1]:,.0f} MB ({(memory[1] / memory[0] - 1) * 100:+.1f} %)",
        )
    )
    rows.append(Row("8. vggfeat --help", None, f"{help_seconds():.2f} s"))
    facts |= {
        "ratio_e2e_to_network": f"{steady / network:.2f}",
        "ratio_mixed_to_batched_recipe": f"{steady_mixed / recipe:.2f}",
    }
    return rows, facts


def profile_main(
    doc: str, profiles: Iterable[str], measure: Callable[[str, Path], list[str]]
) -> None:
    """A benchmark's command line: ``--profile`` of ``profiles`` and ``--no-record``; runs
    ``measure(profile, scratch folder)`` and shows (and records) the table it returns."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--profile", choices=sorted(profiles), default="cpu")
    parser.add_argument("--no-record", action="store_true", help="Print only.")
    arguments = parser.parse_args()
    results = None if arguments.no_record else ROOT / "benchmarks" / "RESULTS.md"
    with tempfile.TemporaryDirectory() as temp:
        show_and_record(measure(arguments.profile, Path(temp)), results)


def show_and_record(lines: list[str], results: Path | None) -> None:
    """Print a table of results, and append it to ``results`` unless that is None."""
    print("\n".join(lines))
    if results is not None:
        with results.open("a") as file:
            file.write("\n" + "\n".join(lines))


def warm_memory(megabytes: int) -> None:
    """Touch (and free) memory before anything is timed.

    Virtual machines such as the ones this suite was first run on hand memory
    to the guest lazily: the first touch of fresh pages ran at about 60 MB/s
    there, adding seconds to whichever measurement came first.
    """
    block = np.ones(megabytes * (1 << 20) // 4, np.float32)
    del block


#: Distinct JPEGs in the folder; the rest are hard links to them, since encoding
#: thousands of 12-megapixel JPEGs would take longer than the suite itself.
DISTINCT_IMAGES = 384


def make_folder(
    folder: Path, count: int, sizes: list[tuple[int, int]] = SIZES, distinct: int = DISTINCT_IMAGES
) -> Path:
    """``count`` JPEGs made from sample_images at ``sizes``, made once.

    ``distinct`` of them are encoded, from the samples decoded once; the rest
    are hard links to those, which costs nothing.
    """
    folder.mkdir(parents=True, exist_ok=True)
    made = min(count, distinct)
    missing = [i for i in range(made) if not (folder / f"{i:06d}.jpg").exists()]
    if missing:
        sources = [Image.open(p).convert("RGB") for p in sorted(SAMPLES.glob("*/*.jpg"))]
        rng = np.random.default_rng(0)
        for index in missing:
            width, height = sizes[index % len(sizes)]
            image = sources[index % len(sources)].resize((width, height), Image.Resampling.BICUBIC)
            if rng.random() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            image.save(folder / f"{index:06d}.jpg", quality=int(rng.integers(80, 95)))
    for index in range(made, count):
        path = folder / f"{index:06d}.jpg"
        if not path.exists():
            os.link(folder / f"{index % made:06d}.jpg", path)
    return folder


def network_alone(profile: Profile, precision: str) -> float:
    from vggfeat.architecture import vgg
    from vggfeat.network import Cut, CutNetwork

    architecture = vgg(16)
    cut = Cut(profile.layer, architecture.layer(profile.layer))
    network = CutNetwork(
        architecture, [cut], profile.image_size, weights="random", precision=precision
    )
    network.set_batch_size(profile.batch_size)
    size = profile.image_size
    batch = np.random.default_rng(0).integers(0, 256, (profile.batch_size, size, size, 3), np.uint8)
    network(batch)
    started = time.perf_counter()
    for _ in range(profile.network_batches):
        network(batch)
    return profile.network_batches * profile.batch_size / (time.perf_counter() - started)


def keras_cut(profile: Profile):
    import keras

    from vggfeat.architecture import vgg

    size = profile.image_size
    model = keras.applications.VGG16(
        weights=None, include_top=profile.layer.startswith("fc"), input_shape=(size, size, 3)
    )
    return keras.Model(model.input, model.get_layer(vgg(16).layer(profile.layer).name).output)


def keras_load(path: str, size: int) -> np.ndarray:
    import keras

    image = keras.utils.load_img(path, target_size=(size, size))
    return keras.applications.vgg16.preprocess_input(keras.utils.img_to_array(image))


def keras_single(profile: Profile, paths: list[str]) -> float:
    model = keras_cut(profile)
    model.predict(keras_load(paths[0], profile.image_size)[None], verbose=0)
    started = time.perf_counter()
    for path in paths[: profile.single_images]:
        model.predict(keras_load(path, profile.image_size)[None], verbose=0)
    return profile.single_images / (time.perf_counter() - started)


def keras_batched(profile: Profile, paths: list[str]) -> float:
    model = keras_cut(profile)
    model.predict(
        np.stack([keras_load(paths[0], profile.image_size)] * profile.batch_size),
        batch_size=profile.batch_size,
        verbose=0,
    )
    started = time.perf_counter()
    images = np.stack([keras_load(p, profile.image_size) for p in paths[: profile.batched_images]])
    model.predict(images, batch_size=profile.batch_size, verbose=0)
    return profile.batched_images / (time.perf_counter() - started)


def extract_command(profile: Profile, inputs: list[str], output: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vggfeat",
        "extract",
        *inputs,
        "-o",
        str(output),
        "--overwrite",
        "--weights",
        "random",
        "--layer",
        profile.layer,
        "--image-size",
        str(profile.image_size),
        "--batch-size",
        str(profile.batch_size),
        *extra,
    ]


def timed_extract(
    profile: Profile, photos: Path, work: Path, count: int, precision: str, *extra: str
):
    listing = work / f"first-{count}.txt"
    listing.write_text("".join(f"{p}\n" for p in sorted(photos.glob("*.jpg"))[:count]))
    output = work / f"{precision}-{count}{'-'.join(('', *extra))}.h5"
    output.unlink(missing_ok=True)
    command = extract_command(
        profile, [], output, "--files-from", str(listing), "--precision", precision, *extra
    )
    started = time.perf_counter()
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    # vggfeat's own summary: "Time: T s, R images/s after start-up (...)".
    own = float(result.stderr.split(" images/s after start-up")[0].rsplit(", ", 1)[1])
    return seconds, own, output


def extract_steady(profile: Profile, photos: Path, work: Path, precision: str, *extra: str):
    """(images/s in steady state, start-up seconds, vggfeat's own figure, the larger output).

    Each size runs twice, alternately, and the faster of each pair counts:
    start-up varies by seconds from run to run (most of it is the first touch
    of fresh memory on a virtual machine), and the difference method needs it
    equal in both sizes.
    """
    small, large = [], []
    for _ in range(2):
        small.append(timed_extract(profile, photos, work, profile.small_run, precision, *extra))
        large.append(timed_extract(profile, photos, work, profile.large_run, precision, *extra))
    small_seconds = min(seconds for seconds, _, _ in small)
    large_seconds, _, output = min(large, key=lambda run: run[0])
    rate = (profile.large_run - profile.small_run) / (large_seconds - small_seconds)
    reported = max(own for _, own, _ in large)
    return rate, small_seconds - profile.small_run / rate, reported, output


def mean_cosine(first: Path, second: Path, layer: str) -> float:
    import vggfeat

    a, b = vggfeat.load(first).features[layer], vggfeat.load(second).features[layer]
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean((a * b).sum(axis=1) / np.where(norms == 0, 1, norms)))


def decode_alone(paths: list[str], profile: Profile, workers: int) -> float:
    from vggfeat.images import decode_image

    def decode(path: str):
        return decode_image(path, profile.image_size)

    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(decode, paths))
    return len(paths) / (time.perf_counter() - started)


def peak_memory(profile: Profile, work: Path, count: int) -> float:
    """Peak resident MB of one ``vggfeat extract`` over ``count`` small images (a conv cut)."""
    folder = work / f"small-{count}"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(count)
    for index in range(count):
        path = folder / f"{index:06d}.jpg"
        if not path.exists():
            Image.fromarray(rng.integers(0, 256, (96, 128, 3), np.uint8)).save(path)
    command = [
        sys.executable,
        "-m",
        "vggfeat",
        "extract",
        str(folder),
        "-o",
        str(work / "memory.h5"),
        "--overwrite",
        "--weights",
        "random",
        "--layer",
        "pool5",
        "--pool",
        "avg",
        "--image-size",
        str(profile.memory_image_size),
    ]
    probe = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, *command], check=True, capture_output=True, text=True
    )
    return int(result.stdout.split()[-1]) / 1024


def help_seconds() -> float:
    times = []
    for _ in range(5):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "vggfeat", "--help"], check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def machine() -> dict[str, str]:
    from vggfeat.runtime import tensorflow

    tf = tensorflow()
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or platform.machine(),
    )
    gpus = []
    try:
        query = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
        )
        gpus = [line.strip() for line in query.stdout.splitlines() if line.strip()]
    except (OSError, subprocess.CalledProcessError):
        pass
    return {
        "date": datetime.now(UTC).isoformat(timespec="minutes"),
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "gpu": ", ".join(gpus) or "none",
        "tensorflow": tf.__version__,
        "python": platform.python_version(),
    }


def render(rows: list[Row], facts: dict[str, str], profile: str) -> str:
    network = rows[0].images_per_second
    recipe = next(r.images_per_second for r in rows if r.name.startswith("3."))
    lines = [
        f"## {facts['date']}, profile {profile}",
        "",
        f"Machine: {facts['cpu']}; GPU: {facts['gpu']}; TensorFlow {facts['tensorflow']}, "
        f"Python {facts['python']}.",
        "",
        "| measurement | images/s | x network alone | x batched recipe | note |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        rate = row.images_per_second
        cells = (
            ["", "", ""]
            if rate is None
            else [f"{rate:,.1f}", f"{rate / network:.2f}", f"{rate / recipe:.2f}"]
        )
        lines.append(f"| {row.name} | {' | '.join(cells)} | {row.note} |")
    lines.append("")
    lines.append("Raw: " + json.dumps(facts))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
