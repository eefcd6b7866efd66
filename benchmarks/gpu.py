"""vggfeat on a GPU, on Keras's JAX backend: the network alone, end to end, memory, back-off.

    KERAS_BACKEND=jax python benchmarks/gpu.py --out OUTDIR      # what benchmarks/gpu.sh runs
    VGGFEAT_GPU_DRY_RUN=1 ...                                    # the same steps, tiny, on a CPU

VGG16 to fc7 in mixed precision (float16 on a GPU), measured in one process:

 1. the network alone on a ready batch, at batch 64, 128, 256 and 512;
 2. decoding alone, by workers, in threads and in processes (images/s, per core);
 3. ``vggfeat extract`` end to end on 20,000 JPEGs of about 500x375 and on
    2,000 camera-size ones (4000x3000), decode workers at 16;
 4. the GPU's peak memory, as JAX reports it;
 5. the out-of-memory back-off, with a batch too large for the card.

Prints one table and writes ``results.json`` and ``results.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import make_folder

DRY = os.environ.get("VGGFEAT_GPU_DRY_RUN") == "1"
LAYER, IMAGE_SIZE = ("pool1", 32) if DRY else ("fc7", 224)
BATCHES = (2, 4) if DRY else (64, 128, 256, 512)
REPEATS = 2 if DRY else 20
FOLDERS = (
    [
        ("ImageNet-like 500x375", 24, (500, 375)),
        ("camera-like (800x600 in the dry run)", 4, (800, 600)),
    ]
    if DRY
    else [("ImageNet-like 500x375", 20_000, (500, 375)), ("camera 4000x3000", 2_000, (4000, 3000))]
)
WORKERS = 2 if DRY else 16
DECODE_WORKERS = (1, 2) if DRY else (1, 4, 8, 16)
TOO_LARGE = 64 if DRY else 32_768


def network_alone(batch_size: int) -> float:
    network = build(batch_size)
    pixels = np.random.default_rng(0).integers(
        0, 256, (batch_size, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8
    )
    network(pixels)
    started = time.perf_counter()
    for _ in range(REPEATS):
        network(pixels)
    return REPEATS * batch_size / (time.perf_counter() - started)


def build(batch_size: int):
    from vggfeat.architecture import vgg
    from vggfeat.network import Cut, CutNetwork

    architecture = vgg(16)
    network = CutNetwork(
        architecture,
        [Cut(LAYER, architecture.layer(LAYER))],
        IMAGE_SIZE,
        weights="random",
        precision="mixed",
        backend="jax",
    )
    network.set_batch_size(batch_size)
    return network


def decode(path: str):
    from vggfeat.images import decode_image

    return decode_image(path, IMAGE_SIZE).path


def decode_alone(paths: list[str], workers: int, processes: bool) -> float:
    # Spawned, not forked: JAX's threads would deadlock a forked child.
    spawn = {"mp_context": multiprocessing.get_context("spawn")} if processes else {}
    pool = ProcessPoolExecutor if processes else ThreadPoolExecutor
    with pool(workers, **spawn) as executor:
        list(executor.map(decode, paths[: workers * 4]))  # start the workers
        started = time.perf_counter()
        list(executor.map(decode, paths, chunksize=8 if processes else 1))
    return len(paths) / (time.perf_counter() - started)


def end_to_end(folder: Path, output: Path, batch_size: int) -> tuple[float, int]:
    import vggfeat

    summary = vggfeat.extract(
        [folder],
        output,
        layers=[LAYER],
        image_size=IMAGE_SIZE,
        weights="random",
        precision="mixed",
        backend="jax",
        batch_size=batch_size,
        workers=WORKERS,
        overwrite=True,
    )
    return summary.images_per_second, summary.batch_size


def peak_memory() -> str:
    import jax

    stats = [d.memory_stats() or {} for d in jax.devices() if d.platform == "gpu"]
    peaks = [s.get("peak_bytes_in_use", 0) for s in stats]
    return f"{max(peaks) / 1e9:.1f} GB" if peaks else "no GPU"


def back_off() -> str:
    from vggfeat.runtime import devices

    if DRY or not any(d.kind == "gpu" for d in devices("jax")):
        return "not measured (needs a GPU)"
    network = build(TOO_LARGE)
    pixels = np.zeros((TOO_LARGE, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    started = time.perf_counter()
    network(pixels)
    seconds = time.perf_counter() - started
    return f"batch {TOO_LARGE:,} backed off to {network.batch_size:,} in {seconds:.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vggfeat-gpu")
    arguments = parser.parse_args()
    arguments.out.mkdir(parents=True, exist_ok=True)
    from vggfeat.runtime import backend_version, choose_device

    device = choose_device("jax", None)
    rows: list[tuple[str, str, str]] = []
    results: dict = {
        "dry_run": DRY,
        "device": device.label,
        "jax": backend_version("jax"),
        "cpus": os.cpu_count(),
        "date": datetime.now(UTC).isoformat(timespec="minutes"),
        "layer": LAYER,
    }

    def record(name: str, value: float | str, note: str = "") -> None:
        shown = f"{value:,.1f}" if isinstance(value, float) else value
        rows.append((name, shown, note))
        results[name] = value
        print(f"{name}: {shown} {note}", flush=True)

    best = 0.0
    for batch in BATCHES:
        rate = network_alone(batch)
        best = max(best, rate)
        record(f"network alone, batch {batch}", rate, "images/s")
    folders = []
    for name, count, size in FOLDERS:
        started = time.perf_counter()
        folder = make_folder(arguments.work / f"{size[0]}x{size[1]}", count, [size], distinct=64)
        folders.append((name, folder))
        print(f"made {count:,} images at {size} in {time.perf_counter() - started:.1f} s")
    paths = sorted(str(p) for p in folders[0][1].glob("*.jpg"))[: 400 if not DRY else 24]
    for processes in (False, True):
        for workers in DECODE_WORKERS:
            rate = decode_alone(paths, workers, processes)
            kind = "processes" if processes else "threads"
            record(f"decoding alone, {workers} {kind}", rate, f"{rate / workers:,.1f} per worker")
    for name, folder in folders:
        rate, batch = end_to_end(folder, arguments.work / "out.h5", BATCHES[-2])
        record(
            f"extract end to end, {name}", rate, f"x network alone {rate / best:.2f}, batch {batch}"
        )
    record("GPU peak memory", peak_memory())
    record("out-of-memory back-off", back_off())

    table = [
        f"## GPU benchmark{' (dry run on a CPU)' if DRY else ''}, {results['date']}",
        "",
        f"{device.label}; JAX {results['jax']}; {os.cpu_count()} cores; "
        f"Python {platform.python_version()}; VGG16 to {LAYER}, mixed precision.",
        "",
        "| measurement | value | note |",
        "| --- | ---: | --- |",
        *(f"| {name} | {value} | {note} |" for name, value, note in rows),
        "",
    ]
    print("\n".join(table))
    (arguments.out / "results.md").write_text("\n".join(table))
    (arguments.out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
