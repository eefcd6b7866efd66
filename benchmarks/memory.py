"""Peak memory of ``vggfeat extract`` per cut, and of ``vggfeat export`` on a large layer.

    python benchmarks/memory.py                  # a few minutes on 2 cores
    python benchmarks/memory.py --export-gb 10   # a 10 GB layer to export

Each measurement is a child process; its peak resident memory is the
``ru_maxrss`` that ``wait4`` reports for it. Files are made in children too:
a child forked from a large parent would start with the parent's size.

1. ``extract`` of 64 photos (640x480 JPEGs) at 224x224, cut at conv5_3, pool5
   and fc7: with seeded random weights and the default batch size; with a
   weights file (the legacy ``.h5`` layout Keras publishes, saved here from
   ``keras.applications.VGG16``: 553 MB with the top); and with that file and
   ``--batch-size 32``.
2. ``export`` of an unpooled conv5_3 layer, (14, 14, 512) float32 a row, of
   ``--export-gb`` GB, written through the store's own writer, to standard
   output (``/dev/null``) as npy, fvecs and parquet, and the first tenth of it
   as csv.

Appends the table to benchmarks/RESULTS.md unless ``--no-record``.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from continue_file import synthetic_rows  # noqa: E402
from run import show_and_record  # noqa: E402

from vggfeat.store.hdf5 import appending, create  # noqa: E402
from vggfeat.store.layout import LayerSpec, Layout, Settings  # noqa: E402

CUTS = ("conv5_3", "pool5", "fc7")
MAP = (14, 14, 512)


def child(*args: str) -> tuple[float, float]:
    """Run ``vggfeat ARGS``; its peak resident memory in MB and its wall seconds."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "vggfeat", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"vggfeat {' '.join(args)} failed:\n{process.stderr.read().decode()}")
    return usage.ru_maxrss / 1024, seconds


def make_photos(folder: Path, count: int = 64) -> Path:
    if folder.exists():
        return folder
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(count):
        pixels = rng.integers(0, 256, (480, 640, 3), np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:03d}.jpg", quality=90)
    return folder


def make_in_child(*args: str) -> None:
    """Run this script's ``--make`` mode in a child, so this process stays small."""
    subprocess.run([sys.executable, __file__, "--make", *args], check=True)


def make_weights(path: Path) -> Path:
    """VGG16 with the top, in the legacy layout, by Keras's own writer."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import h5py
    import keras
    from keras.src.legacy.saving import legacy_h5_format

    model = keras.applications.VGG16(weights=None, include_top=True)
    with h5py.File(path, "w") as file:
        legacy_h5_format.save_weights_to_hdf5_group(file, model)
    return path


def rows_of(gigabytes: float) -> int:
    return max(1, int(gigabytes * 1e9 / (int(np.prod(MAP)) * 4)))


def make_large_file(path: Path, gigabytes: float) -> None:
    """A vggfeat file of unpooled conv5_3 rows, about ``gigabytes`` GB."""
    row_bytes = int(np.prod(MAP)) * 4
    rows = rows_of(gigabytes)
    settings = Settings(
        depth=16, layers=("conv5_3",), pooling="none", weights="random", weights_file="",
        weights_sha256="", seed=0, image_size=224, resize="squash", compute_dtype="float32",
        dtype="float32",
    )  # fmt: skip
    layout = Layout(settings, (LayerSpec("conv5_3", "block5_conv3", "none", MAP),), "none", {})
    create(path, layout, 256)
    rng = np.random.default_rng(0)
    block = max(1, (256 << 20) // row_bytes)
    with appending(path) as writer:
        for start in range(0, rows, block):
            count = min(block, rows - start)
            paths = [f"photos/{i:08d}.jpg" for i in range(start, start + count)]
            writer.add(synthetic_rows(paths, rng.random((count, *MAP), np.float32)))
            writer.commit()


def extract_table(work: Path) -> list[str]:
    photos = make_photos(work / "photos")
    weights = work / "vgg16_top.h5"
    make_in_child("weights", str(weights))
    lines = [
        "| cut | weights | batch | peak memory | wall time |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for cut in CUTS:
        for label, options in [
            ("random", ["--weights", "random"]),
            ("file (553 MB)", ["--weights", str(weights)]),
            ("file (553 MB)", ["--weights", str(weights), "--batch-size", "32"]),
        ]:
            output = work / f"{cut}.h5"
            peak, seconds = child(
                "extract", str(photos), "-o", str(output), "--layer", cut, "-q", *options
            )
            output.unlink()
            batch = options[-1] if "--batch-size" in options else "default (8)"
            lines.append(f"| {cut} | {label} | {batch} | {peak:,.0f} MB | {seconds:.1f} s |")
            print(lines[-1], flush=True)
    return lines


def activations_table(work: Path) -> list[str]:
    """What each image adds to the peak, against the catalogue's count of its activations:
    the ratio is ``vggfeat.memory.ACTIVATION_FACTOR``'s measurement."""
    from vggfeat.architecture import vgg

    photos = make_photos(work / "photos")
    catalogue = vgg(16).catalogue(224)
    lines = [
        "",
        "What one more image in a batch costs at its peak (64 photos at 224x224, random "
        "weights; the slope between batches of 8 and 32), against the bytes of activations "
        "the catalogue counts for one image (`Catalogue.activation_bytes`):",
        "",
        "| cut | batch 8 | batch 32 | per image, measured | per image, counted | ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for cut in ("pool1", "conv3_3", "pool5", "fc7"):
        peaks = []
        for batch in (8, 32):
            output = work / f"{cut}-{batch}.h5"
            peak, _ = child("extract", str(photos), "-o", str(output), "--layer", cut, "-q",
                            "--weights", "random", "--batch-size", str(batch))  # fmt: skip
            output.unlink()
            peaks.append(peak)
        measured = (peaks[1] - peaks[0]) / 24
        counted = catalogue.activation_bytes([vgg(16).layer(cut)]) / 1e6
        lines.append(
            f"| {cut} | {peaks[0]:,.0f} MB | {peaks[1]:,.0f} MB | {measured:,.1f} MB | "
            f"{counted:,.1f} MB | {measured / counted:.2f} |"
        )
        print(lines[-1], flush=True)
    return lines


def export_table(work: Path, gigabytes: float) -> list[str]:
    large = work / "large.h5"
    make_in_child("large", str(large), str(gigabytes))
    rows = rows_of(gigabytes)
    size = large.stat().st_size
    lines = [
        "",
        f"`vggfeat export` of {rows:,} rows of conv5_3 unpooled (14x14x512 float32, "
        f"{size / 1e9:.2f} GB on disk) to standard output:",
        "",
        "| format | rows | peak memory | wall time | MB/s of features |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    cases = [("npy", rows), ("fvecs", rows), ("parquet", rows), ("csv", max(1, rows // 10))]
    for format, count in cases:
        source = large
        if count < rows:
            source = work / "tenth.h5"
            make_in_child("large", str(source), str(gigabytes / 10))
        peak, seconds = child("export", str(source), "--format", format)
        megabytes = count * np.prod(MAP) * 4 / 1e6
        lines.append(
            f"| {format} | {count:,} | {peak:,.0f} MB | {seconds:.1f} s | "
            f"{megabytes / seconds:,.0f} |"
        )
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export-gb", type=float, default=2.0)
    parser.add_argument("--skip-extract", action="store_true")
    parser.add_argument(
        "--activations-only", action="store_true", help="only what one more image costs"
    )
    parser.add_argument("--folder", type=Path, help="where to work (default: a temporary folder)")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--make", nargs="+", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.make:
        what, path, *size = arguments.make
        if what == "weights":
            make_weights(Path(path))
        else:
            make_large_file(Path(path), float(size[0]))
        return

    with tempfile.TemporaryDirectory(dir=arguments.folder) as scratch:
        work = Path(scratch)
        lines = [
            f"## Peak memory, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
            "",
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}. `vggfeat extract` of 64 photos (640x480 "
            "JPEGs) at 224x224, float32, TensorFlow on the CPU:",
            "",
        ]
        if arguments.activations_only:
            lines += activations_table(work)
        else:
            if not arguments.skip_extract:
                lines += extract_table(work)
            lines += activations_table(work)
            lines += export_table(work, arguments.export_gb)
        lines.append("")
    show_and_record(lines, None if arguments.no_record else arguments.results)


if __name__ == "__main__":
    main()
