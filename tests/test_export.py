"""``vggfeat export``: every format read back by a reader that is not vggfeat's, against
what h5py reads from the file; standard output, closed pipes and refusals."""

from __future__ import annotations

import csv
import io
import json
import os
import pty
import stat
import struct
import subprocess
import sys
import threading
import time
import warnings

import h5py
import numpy as np
import pyarrow.parquet
import pytest
from click.testing import CliRunner
from PIL import Image

import vggfeat
from tests.test_store import stop_after
from vggfeat import export as export_module
from vggfeat.cli import cli
from vggfeat.errors import VggfeatError
from vggfeat.pipeline import extract
from vggfeat.store import open_features

#: File names a shell pipeline or a CSV reader trips on.
NAMES = ["plain.png", "with,comma.png", 'a "quote".png', "tab\there.png", "new\nline.png",
         " space.png", "back\\slash.png"]  # fmt: skip


def run(*args: str):
    return CliRunner().invoke(cli, ["export", *args], catch_exceptions=False)


def make_folder(folder, names=NAMES):
    folder.mkdir()
    rng = np.random.default_rng(3)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), np.uint8)).save(folder / name)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), np.uint8)).save(
        os.path.join(os.fsencode(folder), b"caf\xe9.png")  # not UTF-8
    )
    (folder / "bad\tname\n.jpg").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def flat(tmp_path_factory):
    """Two average-pooled layers, float32: rows of 64 values."""
    work = tmp_path_factory.mktemp("flat")
    output = work / "flat.h5"
    extract([make_folder(work / "photos")], output, layers=["conv1_1", "conv1_2"], pool="avg",
            image_size=32, weights="random")  # fmt: skip
    return output


@pytest.fixture(scope="module")
def maps(tmp_path_factory):
    """One unpooled conv map, (16, 16, 64) per row, stored in float16: four rows."""
    work = tmp_path_factory.mktemp("maps")
    output = work / "maps.h5"
    extract([make_folder(work / "photos", NAMES[:3])], output, layers=["pool1"], image_size=32,
            weights="random", dtype="float16")  # fmt: skip
    return output


def stored(path, layer):
    """What h5py reads: the paths and the layer's rows."""
    with h5py.File(path) as file:
        count = int(file["committed"][0])
        paths = [p.decode() for p in file["paths"][:count]]
        return paths, file[f"features/{layer}"][:count]


def read_fvecs(data: bytes) -> np.ndarray:
    """The fvecs format as ANN benchmarks define it: per row, int32 d, then d float32."""
    rows, offset = [], 0
    while offset < len(data):
        (width,) = struct.unpack_from("<i", data, offset)
        rows.append(np.frombuffer(data, "<f4", width, offset + 4))
        offset += 4 + 4 * width
    return np.array(rows)


def tsv_unescape(field: str) -> str:
    pairs = {"\\\\": "\\", "\\t": "\t", "\\n": "\n", "\\r": "\r"}
    out, index = [], 0
    while index < len(field):
        pair = field[index : index + 2]
        if pair in pairs:
            out.append(pairs[pair])
            index += 2
        else:
            out.append(field[index])
            index += 1
    return "".join(out)


def test_npy_to_stdout_is_the_array_h5py_reads(flat, maps):
    paths, values = stored(flat, "conv1_2")
    result = run(str(flat), "--layer", "conv1_2", "--format", "npy")
    assert result.exit_code == 0, result.stderr
    read = np.load(io.BytesIO(result.stdout_bytes))
    assert read.dtype == np.float32 and read.shape == (len(paths), 64)
    np.testing.assert_array_equal(read, values)
    # A conv map keeps its axes, and float16 stays float16.
    _, values = stored(maps, "pool1")
    read = np.load(io.BytesIO(run(str(maps), "--format", "npy").stdout_bytes))
    assert read.dtype == np.float16 and read.shape == (4, 16, 16, 64)
    np.testing.assert_array_equal(read, values)


def test_csv_reads_back_with_the_csv_module_whatever_the_names(flat):
    paths, values = stored(flat, "conv1_1")
    result = run(str(flat), "--layer", "conv1_1", "--format", "csv")
    assert result.exit_code == 0, result.stderr
    rows = list(csv.reader(io.StringIO(result.stdout_bytes.decode(), newline="")))
    assert rows[0] == ["path"] + [f"conv1_1_{i}" for i in range(64)]
    assert [row[0] for row in rows[1:]] == paths
    assert "photos/new\nline.png" in paths and "photos/caf\\xe9.png" in paths
    read = np.array([[float(v) for v in row[1:]] for row in rows[1:]], np.float32)
    np.testing.assert_array_equal(read, values)  # enough digits to give back every float32


def test_tsv_is_one_line_per_row_and_flattens_conv_maps_in_c_order(maps):
    paths, values = stored(maps, "pool1")
    result = run(str(maps), "--format", "tsv", "--no-header")
    lines = result.stdout_bytes.decode().splitlines()
    assert len(lines) == len(paths)
    fields = [line.split("\t") for line in lines]
    assert [tsv_unescape(f[0]) for f in fields] == paths
    read = np.array([[float(v) for v in f[1:]] for f in fields]).astype(np.float16)
    np.testing.assert_array_equal(read, values.reshape(len(paths), -1))
    assert read.shape[1] == 16 * 16 * 64


def test_tsv_cut_and_no_paths(flat):
    _, values = stored(flat, "conv1_1")
    lines = run(str(flat), "--layer", "conv1_1", "--format", "tsv").stdout_bytes.decode()
    header, *rows = lines.splitlines()
    assert header.split("\t")[:2] == ["path", "conv1_1_0"]
    assert "photos/tab\\there.png" in [row.split("\t")[0] for row in rows]
    bare = run(str(flat), "--layer", "conv1_1", "--format", "csv", "--no-paths", "--no-header")
    read = np.loadtxt(io.StringIO(bare.stdout_bytes.decode()), delimiter=",", dtype=np.float32)
    np.testing.assert_array_equal(read, values)


def test_jsonl_is_one_json_object_per_line(flat):
    paths, values = stored(flat, "conv1_2")
    result = run(str(flat), "--layer", "conv1_2", "--format", "jsonl")
    objects = [json.loads(line) for line in result.stdout_bytes.decode().splitlines()]
    assert [o["path"] for o in objects] == paths
    np.testing.assert_array_equal(np.array([o["conv1_2"] for o in objects], np.float32), values)


def test_fvecs_and_paths_to_a_file_aligned_with_the_rows(flat, tmp_path):
    paths, values = stored(flat, "conv1_1")
    target, names = tmp_path / "out.fvecs", tmp_path / "paths.txt"
    result = run(str(flat), "--layer", "conv1_1", "-o", str(target), "--paths-to", str(names))
    assert result.exit_code == 0, result.stderr
    wrote = f"Wrote {target}: {len(paths)} rows of conv1_1 (avg, 64 float32) as fvecs"
    assert wrote in result.stderr
    np.testing.assert_array_equal(read_fvecs(target.read_bytes()), values)
    lines = names.read_text().splitlines()
    assert [tsv_unescape(line) for line in lines] == paths
    assert sorted(os.listdir(tmp_path)) == ["out.fvecs", "paths.txt"]  # no temporary left


def test_parquet_reads_back_with_pyarrow(flat, maps, tmp_path):
    paths, values = stored(flat, "conv1_1")
    result = run(str(flat), "--layer", "conv1_1", "--format", "parquet")
    table = pyarrow.parquet.read_table(io.BytesIO(result.stdout_bytes))
    assert table.column_names == ["path", "conv1_1"]
    assert table.column("path").to_pylist() == paths
    np.testing.assert_array_equal(np.array(table.column("conv1_1").to_pylist()), values)
    # A map is flattened, its shape kept in the metadata, float16 widened to float32.
    run(str(maps), "-o", str(tmp_path / "maps.parquet"), "--no-paths")
    table = pyarrow.parquet.read_table(tmp_path / "maps.parquet")
    assert table.column_names == ["pool1"]
    assert json.loads(table.schema.metadata[b"vggfeat.shape"]) == [16, 16, 64]
    _, values = stored(maps, "pool1")
    read = np.array(table.column("pool1").to_pylist(), np.float32)
    np.testing.assert_array_equal(read, values.reshape(4, -1).astype(np.float32))


def test_parquet_without_pyarrow_is_one_line(flat, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    result = run(str(flat), "--layer", "conv1_1", "--format", "parquet")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "Error: --format parquet needs pyarrow: pip install pyarrow"
    ]


def test_l2_normalised_rows_have_unit_length(flat, maps):
    _, values = stored(flat, "conv1_1")
    result = run(str(flat), "--layer", "conv1_1", "--format", "npy", "--normalize", "l2")
    read = np.load(io.BytesIO(result.stdout_bytes))
    expected = values / np.linalg.norm(values, axis=1, keepdims=True)
    np.testing.assert_allclose(read, expected, rtol=1e-6)
    _, values = stored(maps, "pool1")
    read = np.load(io.BytesIO(run(str(maps), "--format", "npy", "--normalize", "l2").stdout_bytes))
    assert read.dtype == np.float32 and read.shape == (4, 16, 16, 64)
    flat_values = values.reshape(4, -1).astype(np.float32)
    expected = flat_values / np.linalg.norm(flat_values, axis=1, keepdims=True)
    np.testing.assert_allclose(read.reshape(4, -1), expected, rtol=1e-6)


def test_rows_are_streamed_in_chunks_with_the_same_result(flat, monkeypatch):
    whole = run(str(flat), "--layer", "conv1_1", "--format", "npy").stdout_bytes
    monkeypatch.setattr(export_module, "CHUNK_BYTES", 3 * 64 * 4)  # three rows at a time
    reads = []
    original = open_features

    def counting(path):
        file = original(path)
        column = file.features["conv1_1"]
        read = column._slice
        column._slice = lambda start, stop: reads.append(stop - start) or read(start, stop)
        return file

    monkeypatch.setattr(export_module, "open_features", counting)
    assert run(str(flat), "--layer", "conv1_1", "--format", "npy").stdout_bytes == whole
    assert reads[1:] == [3, 3, 2]  # after the one row that tells the shape


def test_a_closed_pipe_ends_quietly_with_exit_0(maps):
    environment = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    for format in ("csv", "npy", "parquet"):
        process = subprocess.Popen(
            [sys.executable, "-m", "vggfeat", "export", str(maps), "--format", format],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=environment,
        )
        process.stdout.read(100)  # | head -c 100
        process.stdout.close()
        assert process.wait(timeout=60) == 0, format
        assert process.stderr.read() == b"", format


def test_binary_formats_refuse_a_terminal(maps):
    primary, secondary = pty.openpty()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "vggfeat", "export", str(maps), "--format", "npy"],
            stdout=secondary,
            stderr=subprocess.PIPE,
            timeout=60,
        )
    finally:
        os.close(primary)
        os.close(secondary)
    assert result.returncode == 2
    assert b"npy is binary and standard output is a terminal" in result.stderr


def test_refusals_are_one_line_with_exit_2(flat, tmp_path):
    cases = {
        ("--format", "csv"): "holds 2 layers (conv1_1, conv1_2): choose one with --layer",
        ("--layer", "conv1-1", "--format", "csv"): "--layer conv1-1: did you mean conv1_1?",
        ("--layer", "conv1_1"): "give --format (npy, csv, tsv, jsonl, fvecs, parquet) for stand",
        ("--layer", "conv1_1", "-o", str(tmp_path / "x.bin")): "give --format",
        ("--layer", "conv1_1", "--format", "npy", "-o", str(flat)): "is the file being exported",
        ("--layer", "conv1_1", "--format", "npy", "-o", str(tmp_path / "c.csv")): (
            "--format npy, but -o " + str(tmp_path / "c.csv") + " is named as csv"
        ),
        # .txt is any text, not binary.
        ("--layer", "conv1_1", "--format", "npy", "-o", str(tmp_path / "c.txt")): (
            "--format npy, but -o " + str(tmp_path / "c.txt") + " is named as tsv"
        ),
    }
    for args, message in cases.items():
        result = run(str(flat), *args)
        assert result.exit_code == 2, args
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, args
    assert os.listdir(tmp_path) == []
    missing = run(str(flat), "--layer", "conv1_1", "-o", str(tmp_path / "no" / "x.csv"))
    assert missing.exit_code == 1 and "cannot write" in missing.stderr
    other = tmp_path / "other.h5"
    h5py.File(other, "w").close()
    assert run(str(other), "--format", "npy").exit_code == 1
    gone = run(str(tmp_path / "gone.h5"))  # said before any want of --format
    assert (gone.exit_code, gone.stderr) == (1, f"Error: {tmp_path / 'gone.h5'} does not exist\n")
    text = run(str(flat), "--layer", "conv1_1", "--format", "csv", "-o", str(tmp_path / "c.txt"))
    assert text.exit_code == 0 and (tmp_path / "c.txt").read_text().startswith("path,")


def test_an_interrupted_export_leaves_no_file(flat, tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "CHUNK_BYTES", 64 * 4)

    def interrupted(self, paths, values):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module._Npy, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_module.export(flat, tmp_path / "x.npy", "npy", layer="conv1_1")
    assert os.listdir(tmp_path) == []


def test_an_unfinished_run_exports_its_committed_rows_and_says_so(tmp_path):
    photos = make_folder(tmp_path / "photos", [f"{i}.png" for i in range(6)])
    output = tmp_path / "features.h5"
    stop_after(4, photos, output)
    with open_features(output) as file:
        expected = file.features["pool1"][:]
        paths = list(file.paths)
    assert 4 <= len(paths) < 7
    result = run(str(output), "--format", "npy")
    assert result.exit_code == 0
    np.testing.assert_array_equal(np.load(io.BytesIO(result.stdout_bytes)), expected)
    assert f"{len(paths)} of the rows are those it has committed so far" in result.stderr
    # show describes it from the run's plan as it would the finished file.
    facts = json.loads(CliRunner().invoke(cli, ["show", str(output), "--json"]).stdout)
    assert facts["rows"] == 0 and facts["pending"] == len(paths)
    assert facts["layers"] == [
        {"name": "pool1", "shape": [64], "dtype": "float32", "keras_layer": "block1_pool",
         "pooling": "avg", "bytes_on_disk": 0}
    ]  # fmt: skip
    assert facts["attributes"]["layers"] == ["pool1"]


def test_extract_refuses_outputs_in_other_formats():
    runner = CliRunner()
    for output, hint in [
        ("-", "'vggfeat export features.h5 --format npy' writes it to standard output"),
        ("f.npy", "write f.h5 and convert it with 'vggfeat export f.h5 -o f.npy'"),
        ("f.parquet", "'vggfeat export f.h5 -o f.parquet'"),
        (
            "x/f.pt",
            "write x/f.h5 and convert it with 'vggfeat export x/f.h5 --format npy -o x/f.npy'",
        ),
        ("f.h5.csv", "write f.h5 and convert it with 'vggfeat export f.h5 -o f.h5.csv'"),
        ("f.h5/", "-o f.h5/ names a folder"),
    ]:
        result = runner.invoke(cli, ["extract", "photos", "-o", output])
        assert result.exit_code == 2, output
        assert hint in result.stderr, output


def test_the_documented_pipe_into_numpy_works(maps):
    # A real pipe, not a buffer: numpy.load cannot seek in one, hence the BytesIO.
    reader = "import io, sys, numpy; print(numpy.load(io.BytesIO(sys.stdin.buffer.read())).shape)"
    command = (
        f"{sys.executable} -m vggfeat export {maps} --format npy | {sys.executable} -c '{reader}'"
    )
    result = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(4, 16, 16, 64)"


def test_devices_fifos_and_symlinks_are_written_through_not_replaced(flat, tmp_path):
    expected = run(str(flat), "--layer", "conv1_1", "--format", "tsv").stdout_bytes
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    result = run(str(flat), "--layer", "conv1_1", "--format", "tsv", "-o", str(fifo))
    reader.join(timeout=60)
    assert result.exit_code == 0, result.stderr
    assert received == [expected] and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    target, link = tmp_path / "runs" / "x.tsv", tmp_path / "latest.tsv"
    target.parent.mkdir()
    target.write_text("old")
    link.symlink_to(target)
    assert run(str(flat), "--layer", "conv1_1", "-o", str(link)).exit_code == 0
    assert link.is_symlink() and target.read_bytes() == expected
    assert sorted(os.listdir(target.parent)) == ["x.tsv"]


def test_a_long_output_name_that_the_file_system_takes_is_taken(flat, tmp_path):
    name = tmp_path / ("n" * 250 + ".csv")
    assert run(str(flat), "--layer", "conv1_1", "-o", str(name)).exit_code == 0
    assert name.stat().st_size > 0


def test_outputs_that_would_overwrite_the_input_or_each_other_are_refused(
    flat, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    for args in (
        ["-o", "x.csv", "--paths-to", "x.csv"],
        ["-o", "x.csv", "--paths-to", "./x.csv"],
        ["-o", "sub/", "--format", "csv"],
        ["-o", str(flat.parent / "." / flat.name), "--format", "npy"],
    ):
        result = run(str(flat), "--layer", "conv1_1", *args)
        assert result.exit_code == 2, (args, result.stderr)
    assert os.listdir(tmp_path) == []
    # An unfinished first run has no file yet, only its parts: its name is still taken.
    photos = make_folder(tmp_path / "photos", [f"{i}.png" for i in range(6)])
    stop_after(4, photos, tmp_path / "pending.h5")
    result = run(str(tmp_path / "pending.h5"), "--format", "npy", "-o", "pending.h5")
    assert result.exit_code == 2 and "is the file being exported" in result.stderr
    assert not (tmp_path / "pending.h5").exists()


def test_paths_to_takes_a_file_not_standard_output(flat, tmp_path):
    # A reader that closes the pipe of paths early would leave the features unwritten.
    result = run(str(flat), "--layer", "conv1_1", "-o", str(tmp_path / "x.npy"), "--paths-to", "-")
    assert result.exit_code == 2 and "--paths-to takes a file name" in result.stderr
    assert os.listdir(tmp_path) == []


def test_paths_to_the_standard_output_by_another_name_is_refused(flat):
    # /dev/stdout is where the rows go: the two would mix in one stream.
    result = subprocess.run(
        [sys.executable, "-m", "vggfeat", "export", str(flat), "--layer", "conv1_1", "--format",
         "csv", "--paths-to", "/dev/stdout"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith("Error: --paths-to /dev/stdout is where the rows go too")


def test_a_layer_is_found_by_its_keras_name_too(flat):
    by_alias = run(str(flat), "--layer", "conv1_2", "--format", "npy").stdout_bytes
    assert run(str(flat), "--layer", "block1_conv2", "--format", "npy").stdout_bytes == by_alias


def test_l2_normalisation_survives_extreme_values():
    rows = np.array(
        [[1e30, 1e30, 0], [1e-30, 2e-30, 2e-30], [0, 0, 0], [3, 4, 0], [np.nan, 1, 1]],
        np.float32,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        normalised = export_module.unit_length(rows)
    np.testing.assert_allclose(np.linalg.norm(normalised[[0, 1, 3]], axis=1), 1, rtol=1e-6)
    np.testing.assert_allclose(normalised[3], [0.6, 0.8, 0], rtol=1e-6)
    assert not normalised[2].any() and np.isnan(normalised[4]).all()


def test_show_failed_is_one_line_per_failure_whatever_the_name(flat):
    result = CliRunner().invoke(cli, ["show", str(flat), "--failed"])
    assert result.exit_code == 0
    reason = "not an image in a supported format (JPEG, PNG, GIF, BMP, WebP, TIFF)"
    assert result.stdout.splitlines() == [f"photos/bad\\tname\\n.jpg\t{reason}"]
    as_json = json.loads(CliRunner().invoke(cli, ["show", str(flat), "--failed", "--json"]).stdout)
    assert as_json == {"photos/bad\tname\n.jpg": reason}


def test_sigterm_stops_an_export_and_removes_its_partial_file(maps, tmp_path):
    # Standard output is a pipe nobody reads: the export blocks with its --paths-to open.
    process = subprocess.Popen(
        [sys.executable, "-m", "vggfeat", "export", str(maps), "--format", "csv",
         "--paths-to", str(tmp_path / "paths.txt")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not any(tmp_path.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.terminate()  # at any moment once its partial file exists
    assert process.wait(timeout=60) == 143
    assert process.stderr.read().decode().strip().endswith("Stopped.")
    assert os.listdir(tmp_path) == []


def test_nothing_is_written_inside_the_work_folder_of_a_run(tmp_path):
    photos = make_folder(tmp_path / "photos", [f"{i}.png" for i in range(6)])
    output = tmp_path / "pending.h5"
    stop_after(4, photos, output)
    before = sorted(os.listdir(tmp_path / "pending.h5.parts"))
    part = tmp_path / "pending.h5.parts" / before[0]
    for args in (
        ["-o", str(part)],
        ["-o", str(tmp_path / "x.npy"), "--paths-to", str(part)],
        ["-o", str(tmp_path / "pending.h5.parts" / "new.npy")],
    ):
        result = run(str(output), "--format", "npy", *args)
        assert result.exit_code == 2 and "vggfeat's own work" in result.stderr
    assert sorted(os.listdir(tmp_path / "pending.h5.parts")) == before


def test_a_folder_that_merely_holds_a_run_json_is_written_to(flat, tmp_path):
    (tmp_path / "run.json").write_text('{"a": "file of the user\'s"}')
    result = run(str(flat), "--layer", "conv1_1", "-o", str(tmp_path / "x.npy"))
    assert result.exit_code == 0, result.stderr
    assert np.load(tmp_path / "x.npy").shape == (len(stored(flat, "conv1_1")[0]), 64)


def test_a_failed_export_replaces_neither_output(flat, tmp_path, monkeypatch):
    keep = tmp_path / "paths.txt"
    keep.write_text("old")
    real_flush = export_module._Named.flush

    def full_disk(self):
        if self._shown.endswith(".csv"):
            with export_module._naming(self._shown):
                raise OSError(28, "No space left on device")
        real_flush(self)

    monkeypatch.setattr(export_module._Named, "flush", full_disk)
    result = run(
        str(flat), "--layer", "conv1_1", "-o", str(tmp_path / "x.csv"), "--paths-to", str(keep)
    )
    assert result.exit_code == 1
    assert (
        result.stderr.strip()
        == f"Error: cannot write {tmp_path / 'x.csv'}: No space left on device"
    )
    assert keep.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["paths.txt"]


DAMAGES = {
    "truncated": lambda part, arrays: os.truncate(part, 500),
    # np.load would wait for a writer of a FIFO for ever.
    "a fifo": lambda part, arrays: (part.unlink(), os.mkfifo(part)),
    "npy, not npz": lambda part, arrays: (
        np.save(part.with_suffix(""), np.zeros(3)),
        os.replace(part.with_suffix(".npy"), part),
    ),
    "rows disagree": lambda part, arrays: np.savez(
        part, **{**arrays, "features_0": arrays["features_0"][:1]}
    ),
    "a dangling symlink": lambda part, arrays: (part.unlink(), part.symlink_to(part.parent)),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_part_is_one_line_and_its_images_are_computed_again(tmp_path, damage):
    photos = make_folder(tmp_path / "photos", [f"{i}.png" for i in range(6)])
    output = tmp_path / "pending.h5"
    stop_after(4, photos, output)
    part = sorted((tmp_path / "pending.h5.parts").glob("part-*.npz"))[0]
    with np.load(part) as data:
        DAMAGES[damage](part, dict(data))
    said = f"Note: {part} is damaged ("
    runner = CliRunner()
    shown = runner.invoke(cli, ["show", str(output)])
    assert shown.exit_code == 0
    assert shown.stdout.startswith(f"{output}: 0 rows, 0 failed, 2 committed by an unfinished")
    [note] = shown.stderr.splitlines()
    assert note.startswith(said) and note.endswith("its images are computed again")
    exported = runner.invoke(cli, ["export", str(output), "--format", "csv", "--no-header"])
    assert exported.exit_code == 0 and len(exported.stdout.splitlines()) == 2
    notes = [line for line in exported.stderr.splitlines() if line.startswith(said)]
    assert len(notes) == 1 and notes[0].endswith("the rows it holds are not in the export.")
    finished = runner.invoke(cli, ["extract", str(photos), "-o", str(output), "--layer",
                                   "pool1", "--pool", "avg", "--image-size", "32", "--weights",
                                   "random"])  # fmt: skip
    assert finished.exit_code == 0, finished.stderr
    [note] = [line for line in finished.stderr.splitlines() if line.startswith("Note:")]
    assert note.startswith(said) and note.endswith("its images are computed again")
    assert len(vggfeat.load(output).paths) == 7  # six, and caf\xe9.png


def test_a_file_whose_counts_exceed_its_rows_is_damaged(flat, tmp_path):
    copy = tmp_path / "copy.h5"
    copy.write_bytes(flat.read_bytes())
    with h5py.File(copy, "r+") as file:
        file["committed"][0] = 100
    for args in (
        ["show", str(copy)],
        ["export", str(copy), "--layer", "conv1_1", "--format", "npy"],
    ):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1 and "is damaged" in result.stderr, args
    assert CliRunner().invoke(cli, ["show", ""]).exit_code == 2


def test_short_writes_are_finished_and_a_write_that_takes_nothing_is_an_error():
    class Trickle(io.BytesIO):
        def write(self, data):
            return super().write(bytes(data[:7]))  # a full disk takes part of a write

    stream = Trickle()
    export_module._Named(stream, "out").write(b"0123456789" * 5)
    assert stream.getvalue() == b"0123456789" * 5

    class Full(io.BytesIO):
        def write(self, data):
            return 0

    with pytest.raises(VggfeatError, match="cannot write out: no more bytes could be written"):
        export_module._Named(Full(), "out").write(b"x")


def test_messages_show_names_without_terminal_codes():
    from vggfeat.terminal import printable

    assert printable("a\x1b[31mb\tc\nd\\e\x9b") == "a\\x1b[31mb\\tc\\nd\\\\e\\x9b"
    # A byte of a name that is not UTF-8, as Python reads it, is shown as the byte it is.
    assert printable(os.fsdecode(b"out \xe9\ndir")) == "out \\xe9\\ndir"


def test_extract_refuses_an_output_name_too_long_for_its_work_folder(tmp_path):
    result = CliRunner().invoke(cli, ["extract", "photos", "-o", str(tmp_path / ("a" * 250))])
    assert result.exit_code == 2 and "the file name is too long" in result.stderr
