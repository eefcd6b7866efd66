"""What continuing a large file costs: bytes written and time to add a few images.

    python benchmarks/continue_file.py                  # 1,000,000 rows, 100 new images
    python benchmarks/continue_file.py --rows 20000     # smaller, seconds

Writes a file of ``--rows`` rows of a tiny layer (conv1_1 at 32x32, average
pooled: 64 floats a row) through the store's own writer, then runs
``vggfeat extract`` in a child process on a folder of ``--new`` new images
with the same settings, and reports the child's wall time and the bytes it
wrote to disk (``getrusage``'s ``ru_oublock``, in 512-byte blocks), next to
the size of the file: a store that rewrote the file would write at least that.
Appends the result to benchmarks/RESULTS.md unless ``--no-record``.
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

from run import show_and_record  # noqa: E402

from vggfeat.store.hdf5 import appending, create  # noqa: E402
from vggfeat.store.layout import LayerSpec, Layout, Rows, Settings  # noqa: E402

OPTIONS = ["--layer", "conv1_1", "--pool", "avg", "--image-size", "32", "--weights", "random"]


def synthetic_rows(paths: list[str], features: np.ndarray) -> Rows:
    """Rows of made-up images, as the store's writer takes them."""
    count = len(paths)
    return Rows(
        paths=paths,
        size=np.full(count, 1000, np.int64),
        mtime_ns=np.full(count, 1, np.int64),
        features=(features,),
        failed_paths=[],
        failed_reasons=[],
        failed_size=np.zeros(0, np.int64),
        failed_mtime_ns=np.zeros(0, np.int64),
    )


def make_file(path: Path, rows: int) -> None:
    """A vggfeat file of ``rows`` rows, as ``vggfeat extract`` with OPTIONS would write."""
    settings = Settings(
        depth=16,
        layers=("conv1_1",),
        pooling="avg",
        weights="random",
        weights_file="",
        weights_sha256="",
        seed=0,
        image_size=32,
        resize="squash",
        compute_dtype="float32",
        dtype="float32",
    )
    layout = Layout(settings, (LayerSpec("conv1_1", "block1_conv1", "avg", (64,)),), "none", {})
    create(path, layout, 256)
    rng = np.random.default_rng(0)
    block = 100_000
    with appending(path) as writer:
        for start in range(0, rows, block):
            count = min(block, rows - start)
            paths = [f"old/{i:08d}.png" for i in range(start, start + count)]
            writer.add(synthetic_rows(paths, rng.random((count, 64), np.float32)))
            writer.commit()


def continue_file(output: Path, photos: Path) -> tuple[float, int]:
    """Run ``vggfeat extract`` in a child; its wall seconds and bytes written."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "vggfeat", "extract", str(photos), "-o", str(output), *OPTIONS],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(process.stderr.read().decode())
    return seconds, usage.ru_oublock * 512


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--new", type=int, default=100)
    parser.add_argument("--folder", type=Path, help="where to work (default: a temporary folder)")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    parser.add_argument("--no-record", action="store_true")
    arguments = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=arguments.folder) as scratch:
        work = Path(scratch)
        output = work / "features.h5"
        made = time.perf_counter()
        make_file(output, arguments.rows)
        made = time.perf_counter() - made
        photos = work / "new"
        photos.mkdir()
        rng = np.random.default_rng(1)
        for index in range(arguments.new):
            Image.fromarray(rng.integers(0, 256, (48, 64, 3), np.uint8)).save(
                photos / f"{index:04d}.png"
            )
        size = output.stat().st_size
        os.sync()
        seconds, written = continue_file(output, photos)
        import h5py

        with h5py.File(output) as file:
            rows = int(file["committed"][0])
    assert rows == arguments.rows + arguments.new, rows
    lines = [
        f"## Continuing a large file, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}.",
        "",
        "| | |",
        "| --- | ---: |",
        f"| rows in the file | {arguments.rows:,} |",
        f"| file size | {size / 1e6:,.1f} MB |",
        f"| new images added | {arguments.new:,} |",
        f"| `vggfeat extract` wall time (start-up included) | {seconds:.1f} s |",
        f"| bytes the run wrote to disk (ru_oublock) | {written / 1e6:,.2f} MB |",
        f"| written / file size | {written / size:.4f} |",
        f"| time to make the file through the store | {made:.1f} s |",
        "",
    ]
    show_and_record(lines, None if arguments.no_record else arguments.results)


if __name__ == "__main__":
    main()
