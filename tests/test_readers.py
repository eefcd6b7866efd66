"""vggfeat's files in readers that are not h5py: HDF5's own h5dump and R's hdf5r.

Each reader reads the same files, one for every ``--compression`` offered and one in
``--dtype float16``, and must see exactly what h5py sees.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.conftest import stored_paths
from tests.test_extract import make_images
from vggfeat.pipeline import extract


@dataclass(frozen=True)
class Written:
    """A file as ``vggfeat extract`` wrote it, and the options it was asked for."""

    path: Path
    images: tuple[str, ...]
    compression: str
    dtype: str


@pytest.fixture(
    scope="module",
    params=[("none", "float32"), ("gzip", "float32"), ("lzf", "float32"), ("none", "float16")],
    ids=["none", "gzip", "lzf", "float16"],
)
def written(request, tmp_path_factory) -> Written:
    """Three images and one failure, through a pooled conv layer and a whole pool layer."""
    compression, dtype = request.param
    folder = tmp_path_factory.mktemp(f"{compression}-{dtype}")
    images = make_images(folder / "photos", 3)
    (folder / "photos" / "broken.jpg").write_text("not an image")
    output = folder / "f.h5"
    extract([folder / "photos"], output, layers=["conv1_1:avg", "pool1"], image_size=32,
            weights="random", compression=compression, dtype=dtype)  # fmt: skip
    return Written(output, tuple(images), compression, dtype)


def test_hdf5s_own_h5dump_reads_every_compression_offered_and_float16(written, tmp_path):
    h5dump = shutil.which("h5dump")
    if h5dump is None:
        pytest.skip("h5dump is not installed here (Debian's hdf5-tools; .ci/run installs it)")
    output, raw = written.path, tmp_path / "values.txt"
    with h5py.File(output) as file:
        paths = file["paths"].asstr()[:].tolist()
        for name, dataset in file["features"].items():
            assert dataset.compression == {"none": None}.get(written.compression, "gzip")
            done = subprocess.run(
                [h5dump, "-d", f"/features/{name}", "-m", "%.9g", "-y", "-w", "0", "-o", str(raw),
                 str(output)],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            values = [float(v) for v in re.split(r"[,\s]+", raw.read_text().strip()) if v]
            expected = dataset[: int(file["committed"][0])]
            read = np.array(values).astype(dataset.dtype).reshape(expected.shape)
            assert np.array_equal(read, expected), name
    # Paths print as they are: null-terminated, not padded with \000 to their width.
    done = subprocess.run(
        [h5dump, "-d", "/paths", "-y", "-w", "0", "-o", str(raw), str(output)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (
        re.findall(r'"([^"]*)"', raw.read_text()) == paths == stored_paths(written.images, output)
    )


#: R_READER's exit status when R lacks hdf5r.
NO_HDF5R = 3
NO_HDF5R_HERE = "R's hdf5r is not installed (apt-get install r-cran-hdf5r; .ci/run installs it)"
#: Prints each dataset as ``== <name> <R's dimensions>``, then its values one a line in
#: h5py's order: hdf5r reverses the axes (R's arrays are column-major) and aperm() turns
#: them back, so that R's values run in Fortran's order. Numbers to 9 significant digits,
#: which bring a float32 back exactly.
R_READER = r"""
if (!requireNamespace("hdf5r", quietly = TRUE)) quit(status = 3)
library(hdf5r)
file <- H5File$new(commandArgs(TRUE)[1], mode = "r")
show <- function(name) {
    values <- file[[name]]$read()
    shape <- if (is.null(dim(values))) length(values) else dim(values)
    if (length(shape) > 1) values <- aperm(values)
    text <- if (is.integer(values) || is.character(values)) values else sprintf("%.9g", values)
    writeLines(c(paste("==", name, paste(shape, collapse = " ")), text))
}
for (name in c("paths", "committed", "failed/paths", "failed/reasons")) show(name)
for (name in file[["features"]]$names) show(paste0("features/", name))
"""


def read_in_r(path: Path) -> dict[str, tuple[tuple[int, ...], list[str]]]:
    """Every dataset R_READER prints: its dimensions as R has them, and its values as text.

    Skips the test when R or its hdf5r package is missing.
    """
    rscript = shutil.which("Rscript")
    if rscript is None:
        pytest.skip(NO_HDF5R_HERE)
    done = subprocess.run(
        [rscript, "--vanilla", "-e", R_READER, str(path)], capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    if done.returncode == NO_HDF5R:
        pytest.skip(NO_HDF5R_HERE)
    assert done.returncode == 0, done.stderr
    datasets: dict[str, tuple[tuple[int, ...], list[str]]] = {}
    for line in done.stdout.splitlines():
        if line.startswith("== "):
            name, *shape = line.removeprefix("== ").split(" ")
            datasets[name] = (tuple(int(n) for n in shape), [])
        else:
            datasets[name][1].append(line)
    return datasets


def test_rs_hdf5r_reads_every_compression_offered_and_float16(written):
    in_r = read_in_r(written.path)
    with h5py.File(written.path) as file:
        features = [f"features/{name}" for name in file["features"]]
        assert list(in_r) == ["paths", "committed", "failed/paths", "failed/reasons", *features]
        assert file["failed/paths"].shape == (1,)
        assert all(file[name].dtype == written.dtype for name in features)
        for name, (shape, lines) in in_r.items():
            dataset = file[name]
            assert shape == dataset.shape[::-1], name
            if dataset.dtype.kind == "S":
                assert lines == dataset.asstr()[:].tolist(), name
            else:
                values = np.array(lines, float if dataset.dtype.kind == "f" else dataset.dtype)
                read = values.astype(dataset.dtype).reshape(dataset.shape, order="F")
                assert np.array_equal(read, dataset[()]), name
