"""The store: one identity per image, refusals that change nothing, continuing in place, shards.

Each test here failed on the store that assembled a new file from parts on
every run (issue 8). Tiny images and a conv cut keep them fast.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pty
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import vggfeat
from vggfeat import network as network_module
from vggfeat.cli import ExitCode, cli
from vggfeat.errors import OptionError, VggfeatError
from vggfeat.pipeline import Interrupted, Progress, extract
from vggfeat.store import RunWriter
from vggfeat.store import journal as store_journal
from vggfeat.store import writer as store_writer

ROOT = Path(__file__).resolve().parent.parent
OPTIONS = {"layers": ["pool1"], "pool": "avg", "image_size": 32, "weights": "random"}
FLAGS = ["--layer", "pool1", "--pool", "avg", "--image-size", "32", "--weights", "random"]


def make_images(folder, count: int, seed: int = 0, start: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(start, start + count):
        path = folder / f"img{index:03d}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(path)
        paths.append(str(path))
    return paths


def keras_version() -> str:
    return version("keras")


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def interrupt_after(count: int):
    def stop(progress: Progress) -> None:
        if progress.done >= count:
            raise KeyboardInterrupt

    return stop


def stop_after(count: int, photos, output, every: int = 2, **options) -> None:
    """An extract that commits every ``every`` images, stopped as by Ctrl-C after ``count``."""
    with pytest.raises(Interrupted):
        extract(
            [photos],
            output,
            **{**OPTIONS, **options},
            commit_every=every,
            batch_size=every,
            on_progress=interrupt_after(count),
        )


def listing(folder) -> dict[str, float]:
    """Every file under ``folder`` with its modification time."""
    return {
        os.path.join(root, name): os.stat(os.path.join(root, name)).st_mtime_ns
        for root, _, names in os.walk(folder)
        for name in names
    }


def parts(output) -> list[str]:
    return sorted(p.name for p in output.with_name(output.name + ".parts").glob("part-*.npz"))


# 1. Refusals change nothing on disk ---------------------------------------------------------


def test_a_refused_command_leaves_nothing_and_blocks_nothing(tmp_path):
    make_images(tmp_path / "photos", 2)
    args = ["extract", str(tmp_path / "photos"), "-o", str(tmp_path / "a.h5"), "--quiet"]
    assert invoke(*args, *FLAGS).exit_code == 0
    before = listing(tmp_path)
    refused = invoke(*args, *FLAGS, "--layer", "pool2")
    assert refused.exit_code == ExitCode.ERROR
    assert "other settings" in refused.output
    assert listing(tmp_path) == before
    again = invoke(*args, *FLAGS)
    assert again.exit_code == 0, again.output


def test_an_unfinished_run_of_other_settings_is_named_not_silently_blocking(tmp_path):
    make_images(tmp_path / "photos", 6)
    output = tmp_path / "a.h5"
    extract([tmp_path / "photos"], output, **OPTIONS)
    stop_after(
        2,
        tmp_path / "photos",
        output,
        every=1,
        pool="max",
        overwrite=True,
        command="vggfeat extract photos -o a.h5 --pool max --overwrite",
    )
    kept = parts(output)
    assert kept
    before = listing(tmp_path)
    with pytest.raises(VggfeatError) as refused:
        extract([tmp_path / "photos"], output, **OPTIONS)
    message = str(refused.value)
    assert "unfinished run with --overwrite with other settings" in message
    assert "the head of pool1 max in the unfinished run, avg now" in message
    assert f"delete {output}.parts" in message
    assert "finish it first (vggfeat extract photos -o a.h5 --pool max --overwrite)" in message
    assert listing(tmp_path) == before
    # Finishing the unfinished run uses its parts.
    done = extract([tmp_path / "photos"], output, **{**OPTIONS, "pool": "max"}, overwrite=True)
    assert done.already >= 2 and done.rows == 6


def test_an_interrupted_overwrite_repeated_without_it_keeps_its_work(tmp_path):
    make_images(tmp_path / "photos", 6)
    output = tmp_path / "a.h5"
    extract([tmp_path / "photos"], output, **OPTIONS)
    stop_after(3, tmp_path / "photos", output, every=1, overwrite=True)
    kept = parts(output)
    with pytest.raises(VggfeatError, match="unfinished --overwrite run"):
        extract([tmp_path / "photos"], output, **OPTIONS)
    assert parts(output) == kept
    finished = extract([tmp_path / "photos"], output, **OPTIONS, overwrite=True)
    assert (finished.already, finished.computed, finished.rows) == (len(kept), 6 - len(kept), 6)


def test_damaged_newer_and_other_files_are_one_line_errors(tmp_path):
    make_images(tmp_path / "photos", 1)
    output = tmp_path / "a.h5"
    extract([tmp_path / "photos"], output, **OPTIONS)
    data = output.read_bytes()
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(data[: len(data) // 3])
    newer = tmp_path / "newer.h5"
    newer.write_bytes(data)
    with h5py.File(newer, "r+") as file:
        file.attrs["format_version"] = 99
    for name, expected in (("truncated.h5", "is damaged"), ("newer.h5", "format 99, newer")):
        result = invoke("extract", str(tmp_path / "photos"), "-o", str(tmp_path / name), *FLAGS)
        assert result.exit_code == ExitCode.ERROR
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0] and "Traceback" not in result.output
        assert not (tmp_path / f"{name}.parts").exists()
    with pytest.raises(VggfeatError, match="newer than this vggfeat reads"):
        vggfeat.load(newer)


def test_a_file_with_damaged_metadata_is_one_line_and_overwrite_replaces_it(tmp_path):
    make_images(tmp_path / "photos", 2)
    output = tmp_path / "a.h5"
    extract([tmp_path / "photos"], output, **OPTIONS)
    data = bytearray(output.read_bytes())
    data[600:1400] = np.random.default_rng(0).integers(0, 256, 800, np.uint8).tobytes()
    output.write_bytes(bytes(data))
    args = ["extract", str(tmp_path / "photos"), "-o", str(output), *FLAGS]
    refused = invoke(*args)
    assert refused.exit_code == ExitCode.ERROR and "is damaged" in refused.output
    assert len(refused.output.strip().splitlines()) == 1
    with pytest.raises(VggfeatError, match="is damaged"):
        vggfeat.open(output)
    replaced = invoke(*args, "--overwrite", "--quiet")
    assert replaced.exit_code == 0, replaced.output
    assert len(vggfeat.load(output).paths) == 2


# 2. One identity per image ------------------------------------------------------------------


def test_one_row_per_image_however_its_path_is_spelt(tmp_path, monkeypatch):
    make_images(tmp_path / "photos", 3)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "photos")
    output = tmp_path / "f.h5"
    monkeypatch.chdir(tmp_path)
    first = extract(["photos"], output, **OPTIONS)
    assert first.computed == 3
    stored = vggfeat.load(output).paths
    assert stored == ["photos/img000.png", "photos/img001.png", "photos/img002.png"]
    spellings = [
        (tmp_path, str(tmp_path / "photos")),
        (tmp_path, "./photos/"),
        (tmp_path, "link"),
        (tmp_path, "photos/../photos"),
        (tmp_path / "elsewhere", "../photos"),
    ]
    for folder, spelling in spellings:
        monkeypatch.chdir(folder)
        again = extract([spelling], output, **OPTIONS)
        assert (again.computed, again.already, again.rows) == (0, 3, 3), spelling
    monkeypatch.chdir(tmp_path / "elsewhere")
    both = extract(["../photos", str(tmp_path / "link")], output, **OPTIONS, prune=True)
    assert (both.computed, both.dropped, both.rows) == (0, 0, 3)
    assert vggfeat.load(output).paths == stored


def test_paths_outside_the_outputs_folder_are_absolute_and_found_again(tmp_path):
    photos = make_images(tmp_path / "photos", 2)
    (tmp_path / "out").mkdir()
    output = tmp_path / "out" / "f.h5"
    extract([tmp_path / "photos"], output, **OPTIONS)
    with vggfeat.open(output) as file:
        assert list(file.paths) == photos
        assert [file.locate(p) for p in file.paths] == photos


def test_a_prune_that_would_drop_every_row_asks_first(tmp_path):
    make_images(tmp_path / "photos", 2)
    (tmp_path / "photos" / "bad.jpg").write_text("no")  # a failure does not count as a row
    output = tmp_path / "f.h5"
    extract([tmp_path / "photos"], output, **OPTIONS)
    (tmp_path / "photos").rename(tmp_path / "moved")
    make_images(tmp_path / "other", 1, seed=3)
    with pytest.raises(VggfeatError, match="would drop all 2 rows"):
        extract([tmp_path / "other"], output, **OPTIONS, prune=True)
    assert vggfeat.load(output).paths == ["photos/img000.png", "photos/img001.png"]
    assert not (tmp_path / "f.h5.parts").exists()
    result = invoke("extract", str(tmp_path / "other"), "-o", str(output), *FLAGS, "--prune")
    assert result.exit_code == ExitCode.ERROR and "--yes" in result.output
    confirmed = extract([tmp_path / "other"], output, **OPTIONS, prune=True, yes=True)
    assert (confirmed.dropped, confirmed.stored, confirmed.rows) == (2, 1, 1)


def test_an_output_named_through_a_symlink_is_the_same_file(tmp_path):
    make_images(tmp_path / "real" / "photos", 2)
    output = tmp_path / "real" / "f.h5"
    extract([tmp_path / "real" / "photos"], output, **OPTIONS)
    (tmp_path / "link.h5").symlink_to(output)
    again = extract([tmp_path / "real" / "photos"], tmp_path / "link.h5", **OPTIONS)
    assert (again.computed, again.rows) == (0, 2)
    assert vggfeat.load(tmp_path / "link.h5").paths == ["photos/img000.png", "photos/img001.png"]
    assert (tmp_path / "link.h5").is_symlink()


def test_a_name_with_a_literal_backslash_escape_is_not_a_byte_that_is_not_utf8(tmp_path):
    folder = os.fsencode(tmp_path / "photos")
    os.makedirs(folder)
    for index, name in enumerate((b"lit\\xffname.png", b"lit\xffname.png", b"a\\b.png")):
        with open(os.path.join(folder, name), "wb") as file:
            Image.new("RGB", (32, 32), (index * 80, 9, 9)).save(file, format="PNG")
    output = tmp_path / "f.h5"
    first = extract([tmp_path / "photos"], output, **OPTIONS)
    assert (first.computed, first.rows) == (3, 3)
    with vggfeat.open(output) as file:
        found = sorted(os.fsencode(file.locate(p)) for p in file.paths)
    assert found == sorted(os.path.join(folder, n) for n in os.listdir(folder))
    assert extract([tmp_path / "photos"], output, **OPTIONS, prune=True).dropped == 0


def test_file_names_that_are_not_utf8_are_done_once_and_not_pruned(tmp_path):
    photos = tmp_path / "photos"
    make_images(photos, 1)
    odd = os.path.join(os.fsencode(photos), b"caf\xe9.png")
    with open(odd, "wb") as file:
        Image.new("RGB", (32, 32), (9, 9, 9)).save(file, format="PNG")
    output = tmp_path / "f.h5"
    first = extract([photos], output, **OPTIONS)
    assert first.computed == 2
    assert "photos/caf\\xe9.png" in vggfeat.load(output).paths
    again = extract([photos], output, **OPTIONS, prune=True)
    assert (again.computed, again.dropped, again.rows) == (0, 0, 2)


# 3-6. Updates, overwrites, failures and signals never double or lose a row --------------------


def test_update_of_an_image_already_in_a_part_gives_one_row(tmp_path):
    paths = make_images(tmp_path / "photos", 6)
    output = tmp_path / "f.h5"
    stop_after(4, tmp_path / "photos", output)
    assert parts(output)
    Image.new("RGB", (32, 32), (250, 0, 0)).save(paths[0])
    os.utime(paths[0], ns=(1, 10**18))
    finished = extract([tmp_path / "photos"], output, **OPTIONS, update=True)
    loaded = vggfeat.load(output)
    assert loaded.paths == [f"photos/img{i:03d}.png" for i in range(6)]
    assert (finished.computed, finished.rows) == (3, 6)
    extract([paths[0]], tmp_path / "fresh.h5", **OPTIONS)
    np.testing.assert_array_equal(
        loaded.features["pool1"][0], vggfeat.load(tmp_path / "fresh.h5").features["pool1"][0]
    )


def test_failures_alone_are_committed_and_reported(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(12):
        (photos / f"bad{index:02d}.jpg").write_text("not an image")
    reports: list[Progress] = []

    def watch(progress: Progress) -> None:
        reports.append(progress)
        if progress.failed >= 9:
            raise KeyboardInterrupt

    output = tmp_path / "f.h5"
    with pytest.raises(Interrupted):
        extract([photos], output, **OPTIONS, commit_every=4, on_progress=watch)
    assert [r.failed for r in reports if r.done] == list(range(1, 10))
    committed = output.with_name("f.h5.parts")
    kept = sum(len(np.load(p)["failed_paths"]) for p in committed.glob("part-*.npz"))
    assert kept == 9
    finished = extract([photos], output, **OPTIONS)
    assert (len(finished.failures), finished.rows) == (3, 0)
    assert len(vggfeat.load(output).failed) == 12


def test_a_signal_during_a_commit_waits_for_it_and_writes_rows_once(tmp_path, monkeypatch):
    make_images(tmp_path / "photos", 4)
    output = tmp_path / "f.h5"
    savez = np.savez

    def savez_then_signal(file, **arrays):
        savez(file, **arrays)
        if len(arrays["paths"]):
            os.kill(os.getpid(), signal.SIGINT)  # arrives in the middle of the commit

    monkeypatch.setattr("vggfeat.store.journal.np.savez", savez_then_signal)
    with pytest.raises(Interrupted):
        extract([tmp_path / "photos"], output, **OPTIONS, commit_every=2, batch_size=2)
    monkeypatch.undo()
    finished = extract([tmp_path / "photos"], output, **OPTIONS)
    assert vggfeat.load(output).paths == [f"photos/img{i:03d}.png" for i in range(4)]
    assert (finished.already, finished.rows) == (2, 4)


# 7-8, 10. What a file records and what a continued run must match -----------------------------


def test_a_run_that_only_assembles_records_versions_and_hash(tmp_path, weight_files, monkeypatch):
    make_images(tmp_path / "photos", 3)
    weights = weight_files(16)
    options = {**OPTIONS, "weights": weights}
    output = tmp_path / "f.h5"

    def killed(self, prune=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(RunWriter, "assemble", killed)
    with pytest.raises(Interrupted):
        extract([tmp_path / "photos"], output, **options)
    monkeypatch.undo()
    only = extract([tmp_path / "photos"], output, **options)
    assert (only.computed, only.stored, only.rows) == (0, 3, 3)
    attributes = vggfeat.load(output).attributes
    assert attributes["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    for key in ("vggfeat_version", "tensorflow_version", "keras_version"):
        assert attributes[key]


def test_rows_computed_in_other_precisions_are_not_mixed(tmp_path, monkeypatch):
    make_images(tmp_path / "photos", 1)
    output = tmp_path / "f.h5"
    extract([tmp_path / "photos"], output, **OPTIONS)
    monkeypatch.setattr(network_module, "cpu_has_fast_bfloat16", lambda: True)
    with pytest.raises(
        VggfeatError,
        match=r"computed in float32 in the file, in bfloat16 now \(--precision, --backend and "
        r"the device decide\)",
    ):
        extract([tmp_path / "photos"], output, **OPTIONS, precision="mixed")
    monkeypatch.setattr(network_module, "cpu_has_fast_bfloat16", lambda: False)
    same = extract([tmp_path / "photos"], output, **OPTIONS, precision="mixed")
    assert same.already == 1


def test_a_seed_means_nothing_to_weights_from_a_file(tmp_path, weight_files):
    make_images(tmp_path / "photos", 1)
    options = {**OPTIONS, "weights": weight_files(16)}
    output = tmp_path / "f.h5"
    extract([tmp_path / "photos"], output, **options)
    assert extract([tmp_path / "photos"], output, **options, seed=7).already == 1
    extract([tmp_path / "photos"], tmp_path / "r.h5", **OPTIONS, seed=1)
    with pytest.raises(VggfeatError, match="--seed 1 in the file, 2 now"):
        extract([tmp_path / "photos"], tmp_path / "r.h5", **OPTIONS, seed=2)


def test_the_pixel_limit_is_restored(tmp_path):
    from PIL import Image as PilImage

    limit = PilImage.MAX_IMAGE_PIXELS
    make_images(tmp_path / "photos", 1)
    extract([tmp_path / "photos"], tmp_path / "f.h5", **OPTIONS, max_pixels=limit * 10)
    assert limit == PilImage.MAX_IMAGE_PIXELS


def test_older_formats_are_read_and_not_continued(tmp_path):
    make_images(tmp_path / "photos", 1)
    old = tmp_path / "old.h5"
    text = h5py.string_dtype("utf-8")
    with h5py.File(old, "w") as file:  # format 2 as vggfeat 0.1.0 wrote it
        settings = {"depth": 16, "layers": ["pool1"], "pooling": "avg", "weights": "random"}
        file.attrs.update(format="vggfeat", format_version=2, settings=json.dumps(settings))
        file.create_dataset("paths", data=["photos/img000.png"], dtype=text)
        file.create_dataset("features/pool1", data=np.ones((1, 64), np.float32))
        file.create_dataset("failed/paths", (0,), text)
        file.create_dataset("failed/reasons", (0,), text)
    paths, features = vggfeat.load(old)
    assert paths == ["photos/img000.png"] and features["pool1"].shape == (1, 64)
    with pytest.raises(VggfeatError, match=r"older vggfeat \(format 2\)"):
        extract([tmp_path / "photos"], old, **OPTIONS)


# 11. Counts say what happened ------------------------------------------------------------------


def test_the_summary_counts_rows_failures_and_plurals(tmp_path):
    make_images(tmp_path / "photos", 1)
    (tmp_path / "photos" / "bad.jpg").write_text("no")
    args = ["extract", str(tmp_path / "photos"), "-o", str(tmp_path / "f.h5"), *FLAGS]
    first = invoke(*args).output
    assert "1 new row, 1 row in all" in first and "1 image computed, 1 failed" in first
    assert "Nothing new: the 1 image is already in" not in first
    make_images(tmp_path / "photos", 1, seed=1, start=1)
    second = invoke(*args).output
    assert "2 images already done; 1 to do." in second
    assert "1 new row, 2 rows in all" in second and "2 already done" in second


# 12. Continuing costs what is new; reading is lazy ---------------------------------------------


def test_continuing_appends_in_place(tmp_path):
    make_images(tmp_path / "photos", 40)
    output = tmp_path / "f.h5"
    extract([tmp_path / "photos"], output, **OPTIONS)
    inode, size = output.stat().st_ino, output.stat().st_size
    with h5py.File(output) as file:
        first_rows = file["features/pool1"][()]
    make_images(tmp_path / "photos", 2, seed=9, start=40)
    more = extract([tmp_path / "photos"], output, **OPTIONS)
    assert (more.computed, more.stored, more.rows) == (2, 2, 42)
    assert output.stat().st_ino == inode  # the same file, not a rewritten copy
    assert output.stat().st_size - size < 64 * 1024
    with h5py.File(output) as file:  # h5py alone, no swmr, reads it
        np.testing.assert_array_equal(file["features/pool1"][:40], first_rows)
        assert list(file["committed"]) == [42, 0] and len(file["paths"]) == 42


def test_open_reads_slices_and_the_rows_of_an_unfinished_run(tmp_path):
    make_images(tmp_path / "photos", 6)
    output = tmp_path / "f.h5"
    stop_after(4, tmp_path / "photos", output)
    with vggfeat.open(output) as file:
        assert (file.rows, file.pending) == (0, 4)
        assert file.paths[:] == [f"photos/img{i:03d}.png" for i in range(4)]
        partial = file.features["pool1"][1:3]
    extract([tmp_path / "photos"], output, **OPTIONS)
    with vggfeat.open(output) as file:
        assert (len(file.paths), file.pending, file.features["pool1"].shape) == (6, 0, (6, 64))
        assert vggfeat.load(output)[0] == file.paths[:]
        np.testing.assert_array_equal(file.features["pool1"][1:3], partial)
        assert file.paths[-1] == "photos/img005.png"
        np.testing.assert_array_equal(
            file.features["pool1"][[0, 5]], vggfeat.load(output).features["pool1"][[0, 5]]
        )


def test_open_shows_each_image_once_while_an_update_or_overwrite_is_unfinished(tmp_path):
    paths = make_images(tmp_path / "photos", 6)
    output = tmp_path / "f.h5"
    extract([tmp_path / "photos"], output, **OPTIONS)
    before = vggfeat.load(output)
    for path in paths:
        os.utime(path, ns=(1, 10**18))
    stop_after(4, tmp_path / "photos", output, update=True)
    stop_after(2, tmp_path / "photos", output, every=1, pool="max", overwrite=True)
    with vggfeat.open(output) as file:  # the --overwrite run's rows belong to another file
        assert (file.paths[:], file.pending) == (before.paths, 0)
        np.testing.assert_array_equal(file.features["pool1"][:], before.features["pool1"])


# 13. Shards -----------------------------------------------------------------------------------


def test_shards_one_after_another_equal_a_single_run(tmp_path):
    make_images(tmp_path / "photos", 7)
    (tmp_path / "photos" / "bad.jpg").write_text("no")
    single = tmp_path / "single.h5"
    extract([tmp_path / "photos"], single, **OPTIONS)
    output = tmp_path / "sharded.h5"
    first = extract([tmp_path / "photos"], output, **OPTIONS, shard="2/3")
    assert not first.assembled and first.waiting_for == (1, 3) and not output.exists()
    with pytest.raises(VggfeatError, match="split into 3 shards"):
        extract([tmp_path / "photos"], output, **OPTIONS, shard="1/2")
    extract([tmp_path / "photos"], output, **OPTIONS, shard="3/3")
    last = extract([tmp_path / "photos"], output, **OPTIONS, shard="1/3")
    assert last.assembled and last.rows == 7
    assert json.loads(vggfeat.load(output).attributes["rows_per_node"]) == {"local": 7}
    got, expected = vggfeat.load(output), vggfeat.load(single)
    assert got.paths == expected.paths and got.failed == expected.failed
    np.testing.assert_allclose(got.features["pool1"], expected.features["pool1"], rtol=1e-5)
    assert extract([tmp_path / "photos"], output, **OPTIONS).computed == 0


def test_a_plain_run_finishes_what_the_shards_left(tmp_path, monkeypatch):
    make_images(tmp_path / "photos", 5)
    output = tmp_path / "f.h5"
    extract([tmp_path / "photos"], output, **OPTIONS, shard="1/2")

    def killed(self, prune=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(RunWriter, "assemble", killed)
    with pytest.raises(Interrupted):
        extract([tmp_path / "photos"], output, **OPTIONS, shard="2/2")
    monkeypatch.undo()
    plain = extract([tmp_path / "photos"], output, **OPTIONS)
    assert (plain.computed, plain.assembled, plain.rows) == (0, True, 5)
    assert not output.with_name("f.h5.parts").exists()


def test_a_bad_shard_is_a_usage_error(tmp_path):
    make_images(tmp_path / "photos", 1)
    for shard in ("0/2", "3/2", "two"):
        result = invoke(
            "extract", str(tmp_path / "photos"), "-o", str(tmp_path / "f.h5"), "--shard", shard
        )
        assert result.exit_code == ExitCode.USAGE and "--shard" in result.output
    assert not list(tmp_path.glob("f.h5*"))  # the refusals above start nothing


# Issue 15: crash safety in the structure, canonical names, provenance per run ------------------


class _Exploding:
    """A batch's features whose conversion is interrupted, as by Ctrl-C at that moment."""

    def __len__(self) -> int:
        return 2

    def __array__(self, dtype=None, copy=None):
        raise KeyboardInterrupt


def test_an_interrupt_while_a_batch_joins_the_buffer_commits_whole_batches_only(
    tmp_path, monkeypatch
):
    from vggfeat.local_engine import LocalEngine

    make_images(tmp_path / "photos", 6)
    output = tmp_path / "f.h5"
    run = LocalEngine.run

    def interrupted_on_the_second_batch(self, paths):
        for number, result in enumerate(run(self, paths)):
            yield replace(result, features=(_Exploding(),)) if number == 1 else result

    monkeypatch.setattr(LocalEngine, "run", interrupted_on_the_second_batch)
    with pytest.raises(Interrupted):
        extract([tmp_path / "photos"], output, **OPTIONS, batch_size=2, commit_every=10)
    monkeypatch.undo()
    with np.load(output.with_name("f.h5.parts") / parts(output)[0]) as part:
        assert len(part["paths"]) == len(part["features_0"]) == 2  # the first batch, whole
    finished = extract([tmp_path / "photos"], output, **OPTIONS)
    assert (finished.already, finished.computed, finished.rows) == (2, 4, 6)
    extract([tmp_path / "photos"], tmp_path / "clean.h5", **OPTIONS)
    clean = vggfeat.load(tmp_path / "clean.h5").features["pool1"]
    np.testing.assert_allclose(vggfeat.load(output).features["pool1"], clean, rtol=1e-5)


def test_a_part_whose_arrays_disagree_is_set_aside_and_its_images_computed_again(tmp_path):
    make_images(tmp_path / "photos", 6)
    output = tmp_path / "f.h5"
    stop_after(4, tmp_path / "photos", output)
    folder = output.with_name("f.h5.parts")
    damaged = folder / parts(output)[0]
    with np.load(damaged) as part:
        arrays = dict(part)
    arrays["features_0"] = arrays["features_0"][:1]  # more paths than rows of features
    with open(damaged, "wb") as file:
        np.savez(file, **arrays)
    with vggfeat.open(output) as file:  # a reader leaves it out and says so
        assert file.pending == 2 and len(file.damaged) == 1
        assert file.damaged[0].startswith(f"{damaged} is damaged")
    notices: list[str] = []
    finished = extract([tmp_path / "photos"], output, **OPTIONS, on_notice=notices.append)
    assert (finished.already, finished.computed, finished.rows) == (2, 4, 6)
    [notice] = notices
    assert notice.startswith(f"{damaged} is damaged") and "computed again" in notice
    extract([tmp_path / "photos"], tmp_path / "clean.h5", **OPTIONS)
    got, clean = vggfeat.load(output), vggfeat.load(tmp_path / "clean.h5")
    # The images of the part set aside take their rows after those that were kept.
    order = np.argsort(got.paths)
    assert [got.paths[i] for i in order] == clean.paths
    np.testing.assert_allclose(got.features["pool1"][order], clean.features["pool1"], rtol=1e-5)


def test_a_restarting_shard_leaves_the_files_other_shards_are_writing_alone(tmp_path):
    make_images(tmp_path / "photos", 4)
    output = tmp_path / "f.h5"
    extract([tmp_path / "photos"], output, **OPTIONS, shard="1/2")
    folder = output.with_name("f.h5.parts")
    # Shard 2's process is alive (it holds its lock) and is writing its 123rd part: a name in
    # which a careless pattern for shard 1's leftovers (*-0001*.tmp) finds "-0001" too.
    holder = os.open(folder / "shard-0002.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        being_written = [
            folder / "part-0002-000123.npz.tmp",
            folder / "part-0002-000123.npz.4242-0badcafe.tmp",
            folder / "shard-0002.json.4242-0badcafe.tmp",
        ]
        for name in being_written:
            name.write_bytes(b"half of a part")
        again = extract([tmp_path / "photos"], output, **OPTIONS, shard="1/2")
        assert not again.assembled and again.waiting_for == (2,)
        assert [name.exists() for name in being_written] == [True, True, True]
    finally:
        os.close(holder)


def test_confirming_a_prune_of_every_row_at_the_terminal_keeps_files_from(tmp_path):
    make_images(tmp_path / "photos", 2)
    output = tmp_path / "f.h5"
    extract([tmp_path / "photos"], output, **OPTIONS)
    (tmp_path / "photos").rename(tmp_path / "moved")
    listed = make_images(tmp_path / "other", 2, seed=5)
    (tmp_path / "list.txt").write_text("\n".join(listed) + "\n")
    command = [sys.executable, "-m", "vggfeat", "extract", "--files-from",
               str(tmp_path / "list.txt"), "-o", str(output), *FLAGS, "--prune",
               "--backend", "jax"]  # fmt: skip
    transcript = _at_a_terminal(command, answer=b"y\n", after=b"Drop them")
    assert "would drop all 2 rows" in transcript, transcript
    loaded = vggfeat.load(output)
    assert loaded.paths == ["other/img000.png", "other/img001.png"], transcript


def _at_a_terminal(command: list[str], answer: bytes, after: bytes) -> str:
    """Run ``command`` with a terminal as stdin and stderr; type ``answer`` once ``after``
    appears. What the terminal showed."""
    main, terminal = pty.openpty()
    process = subprocess.Popen(
        command, stdin=terminal, stderr=terminal, stdout=subprocess.DEVNULL, cwd=ROOT
    )
    os.close(terminal)
    shown = b""
    answered = False
    try:
        while True:
            ready, _, _ = select.select([main], [], [], 300)
            assert ready, f"the command went quiet: {shown!r}"
            try:
                chunk = os.read(main, 4096)
            except OSError:  # the command ended and closed the terminal
                break
            if not chunk:
                break
            shown += chunk
            if after in shown and not answered:
                os.write(main, answer)
                answered = True
        assert process.wait(timeout=120) == 0, shown
    finally:
        os.close(main)
        if process.poll() is None:
            process.kill()
            process.wait()
    return shown.decode(errors="replace")


def test_every_spelling_of_a_layer_continues_the_same_file(tmp_path):
    paths = make_images(tmp_path / "photos", 3)
    output = tmp_path / "f.h5"
    first = extract(paths[:1], output, **{**OPTIONS, "layers": ["POOL1"]})
    again = extract(paths[:2], output, **{**OPTIONS, "layers": ["block1_pool"]})
    last = extract(paths, output, **{**OPTIONS, "layers": [" Pool1 "]})
    assert (first.stored, again.stored, last.stored, last.rows) == (1, 1, 1, 3)
    with h5py.File(output) as file:
        assert list(file["features"]) == ["pool1"]
        assert json.loads(file.attrs["settings"])["layers"] == ["pool1"]
        assert file["features/pool1"].attrs["keras_layer"] == "block1_pool"
    # A file written before names were canonical keeps its own name for the layer.
    older = tmp_path / "older.h5"
    older.write_bytes(output.read_bytes())
    with h5py.File(older, "r+") as file:
        file.move("features/pool1", "features/Block1_Pool")
        settings = {**json.loads(file.attrs["settings"]), "layers": ["Block1_Pool"]}
        file.attrs["settings"] = json.dumps(settings)
    more = make_images(tmp_path / "photos", 1, seed=4, start=3)
    continued = extract([*paths, *more], older, **OPTIONS)
    assert (continued.computed, continued.rows) == (1, 4)
    loaded = vggfeat.load(older)
    assert list(loaded.features) == ["Block1_Pool"] and len(loaded.features["Block1_Pool"]) == 4
    np.testing.assert_array_equal(
        loaded.features["Block1_Pool"][:3], vggfeat.load(output).features["pool1"]
    )


def test_each_run_that_adds_rows_is_on_record_and_shown(tmp_path):
    make_images(tmp_path / "photos", 2)
    output = tmp_path / "f.h5"
    extract([tmp_path / "photos"], output, **OPTIONS, command="vggfeat extract first")
    make_images(tmp_path / "photos", 1, seed=2, start=2)
    extract([tmp_path / "photos"], output, **OPTIONS, command="vggfeat extract second")
    (tmp_path / "photos" / "img000.png").unlink()
    extract([tmp_path / "photos"], output, **OPTIONS, prune=True, command="vggfeat extract third")
    with h5py.File(output) as file:  # h5py alone reads the record
        runs = [json.loads(entry) for entry in file["runs"].asstr()[()]]
    assert [run["command"] for run in runs] == [f"vggfeat extract {n}" for n in
                                                ("first", "second", "third")]  # fmt: skip
    assert [(r["rows_added"], r["rows_dropped"]) for r in runs] == [(2, 0), (1, 0), (0, 1)]
    for run in runs:
        assert run["backend"] == "tensorflow" and run["keras_version"] == keras_version()
        assert run["started"] <= run["finished"]
    assert vggfeat.load(output).runs == runs
    shown = invoke("show", str(output)).output
    assert "run 2: " in shown and "1 row added" in shown and "vggfeat extract second" in shown
    assert json.loads(invoke("show", str(output), "--json").output)["runs"] == runs


def test_a_rerun_says_which_rows_name_files_that_are_gone(tmp_path):
    make_images(tmp_path / "photos", 3)
    args = ["extract", str(tmp_path / "photos"), "-o", str(tmp_path / "f.h5"), *FLAGS]
    assert invoke(*args).exit_code == 0
    (tmp_path / "photos" / "img001.png").unlink()
    result = invoke(*args)
    assert result.exit_code == 0
    assert "Nothing new: all 2 images are already in" in result.output
    assert (
        f"1 row of {tmp_path / 'f.h5'} names a file that no longer exists; --prune drops them."
        in result.output
    )
    pruned = invoke(*args, "--prune")
    assert "no longer exist" not in pruned.output and "1 dropped" in pruned.output


def test_every_shard_takes_its_share_of_the_list_the_run_started_with(tmp_path):
    make_images(tmp_path / "photos", 4)
    output = tmp_path / "f.h5"
    first = extract([tmp_path / "photos"], output, **OPTIONS, shard="1/2")
    assert (first.computed, first.waiting_for) == (2, (2,))
    # An image added now is not in the run's list: shard 2 does its share as planned.
    make_images(tmp_path / "photos", 1, seed=7, start=9)
    second = extract([tmp_path / "photos"], output, **OPTIONS, shard="2/2")
    assert (second.computed, second.rows, second.left_for_later) == (2, 4, 1)
    assert "img009.png" not in "".join(vggfeat.load(output).paths)
    assert extract([tmp_path / "photos"], output, **OPTIONS).stored == 1  # the next run adds it


def test_an_unfinished_run_takes_in_images_added_since_it_started(tmp_path):
    make_images(tmp_path / "photos", 4)
    output = tmp_path / "f.h5"
    stop_after(2, tmp_path / "photos", output)
    make_images(tmp_path / "photos", 2, seed=7, start=4)
    finished = extract([tmp_path / "photos"], output, **OPTIONS)
    assert (finished.already, finished.computed, finished.rows) == (2, 4, 6)
    assert vggfeat.load(output).paths == [f"photos/img{i:03d}.png" for i in range(6)]


def test_names_that_are_not_utf8_on_the_command_line_reach_the_file(tmp_path):
    make_images(tmp_path / "photos", 1)
    folder = os.path.join(os.fsencode(tmp_path), b"out\xff")
    os.mkdir(folder)
    image = os.path.join(os.fsencode(tmp_path), b"caf\xe9.png")
    with open(image, "wb") as file:
        Image.new("RGB", (32, 32), (9, 90, 9)).save(file, format="PNG")
    output = os.fsdecode(os.path.join(folder, b"f.h5"))
    command = ["vggfeat", "extract", os.fsdecode(image), "-o", output]  # as a shell passes it
    summary = extract([os.fsdecode(image)], output, **OPTIONS, command=shlex.join(command))
    assert (summary.computed, summary.rows) == (1, 1)
    loaded = vggfeat.load(output)
    assert loaded.paths == [f"{tmp_path}/caf\\xe9.png"]
    with h5py.File(output) as file:  # every reader sees valid UTF-8
        assert "caf\\xe9.png" in file.attrs["command"] and "out\\xff" in file.attrs["command"]
        assert "caf\\xe9.png" in json.loads(file["runs"].asstr()[0])["command"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"shard": "0/2"}, "--shard 0/2 is not K/N"),
        ({"engine": "spark"}, "--engine spark is not one of local, ray"),
        ({"seed": -1}, "--seed must be from 0 to 4,294,967,295, not -1"),
        ({"seed": 10**20}, "--seed must be from 0"),
        ({"batch_size": "8"}, "--batch-size '8' is not a whole number"),
        ({"layers": ("pool1", "block1_pool")}, "are the same layer"),
    ],
)
def test_options_refuse_what_cannot_work_when_made(tmp_path, values, message):
    with pytest.raises(OptionError, match=re.escape(message)):
        vggfeat.ExtractOptions((str(tmp_path),), str(tmp_path / "f.h5"), **{**OPTIONS, **values})
    assert not list(tmp_path.iterdir())


def test_options_take_the_spellings_the_command_line_takes(tmp_path):
    options = vggfeat.ExtractOptions(
        tmp_path, tmp_path / "f.h5", layers="POOL1", batch_size="auto", shard="2/3", engine="local"
    )
    assert (options.inputs, options.layers, options.batch_size) == (
        (str(tmp_path),),
        ("pool1",),
        None,
    )
    assert (options.shard.index, options.shard.count, options.engine.name) == (2, 3, "local")


def test_a_shard_with_nothing_to_do_leaves_no_unfinished_run(tmp_path):
    make_images(tmp_path / "photos", 3)
    output = tmp_path / "f.h5"
    extract([tmp_path / "photos"], output, **OPTIONS)
    idle = extract([tmp_path / "photos"], output, **OPTIONS, shard="2/3")
    assert (idle.assembled, idle.computed, idle.already, idle.rows) == (True, 0, 3, 3)
    assert not output.with_name("f.h5.parts").exists()
    make_images(tmp_path / "photos", 1, seed=5, start=3)
    # Another split is free to start: of the one new image, shard 1/2's share is empty.
    first = extract([tmp_path / "photos"], output, **OPTIONS, shard="1/2")
    assert (first.computed, first.assembled, first.waiting_for) == (0, False, (2,))
    last = extract([tmp_path / "photos"], output, **OPTIONS, shard="2/2")
    assert (last.computed, last.stored, last.rows) == (1, 1, 4)


def test_a_part_of_another_run_is_refused_not_merged(tmp_path):
    make_images(tmp_path / "photos", 6)
    stop_after(2, tmp_path / "photos", tmp_path / "other.h5", seed=1)
    output = tmp_path / "f.h5"
    stop_after(2, tmp_path / "photos", output)
    stray = output.with_name("f.h5.parts") / "part-0001-000050.npz"
    stray.write_bytes((tmp_path / "other.h5.parts" / parts(tmp_path / "other.h5")[0]).read_bytes())
    notices: list[str] = []
    extract([tmp_path / "photos"], output, **OPTIONS, on_notice=notices.append)
    assert [n for n in notices if "belongs to another run" in n and str(stray) in n]
    extract([tmp_path / "photos"], tmp_path / "clean.h5", **OPTIONS)
    got, clean = vggfeat.load(output), vggfeat.load(tmp_path / "clean.h5")
    assert got.paths == clean.paths
    np.testing.assert_allclose(got.features["pool1"], clean.features["pool1"], rtol=1e-5)


def test_files_of_someone_else_in_the_parts_folder_are_left_and_named(tmp_path):
    make_images(tmp_path / "photos", 4)
    output = tmp_path / "f.h5"
    stop_after(2, tmp_path / "photos", output)
    folder = output.with_name("f.h5.parts")
    (folder / "notes.txt").write_text("mine")
    (folder / "part-0001-000011.npz.tmp").write_text("mine too")  # not a name vggfeat writes
    notices: list[str] = []
    extract([tmp_path / "photos"], output, **OPTIONS, on_notice=notices.append)
    assert sorted(os.listdir(folder)) == ["notes.txt", "part-0001-000011.npz.tmp"]
    assert (folder / "notes.txt").read_text() == "mine"
    assert notices == [f"{folder} holds files vggfeat did not write (notes.txt, "
                       "part-0001-000011.npz.tmp); they are left as they are, and the folder "
                       "with them"]  # fmt: skip


def test_a_folder_where_a_part_was_is_set_aside_and_left_when_the_output_is_written(tmp_path):
    make_images(tmp_path / "photos", 4)
    output = tmp_path / "f.h5"
    stop_after(2, tmp_path / "photos", output)
    folder = output.with_name("f.h5.parts")
    [first, *_] = parts(output)
    (folder / first).unlink()
    (folder / first).mkdir()
    command = ["extract", str(tmp_path / "photos"), "-o", str(output), *FLAGS]
    results = [invoke(*command), invoke(*command)]  # and a rerun on the finished file
    assert [result.exit_code for result in results] == [0, 0], results[0].output
    assert f"{first} is damaged (not a regular file)" in results[0].output
    assert f"vggfeat did not write ({first}.damaged)" in results[0].output
    assert os.listdir(folder) == [f"{first}.damaged"]
    paths = vggfeat.load(output).paths
    assert sorted(paths) == [f"photos/img{i:03d}.png" for i in range(4)]


def test_runs_with_nothing_to_do_touch_nothing_and_refuse_no_one(tmp_path):
    """Shards started at once on a finished output: each says nothing is new, none is
    refused, and nothing on disk changes, whatever the order they open in."""
    make_images(tmp_path / "photos", 4)
    output = tmp_path / "f.h5"
    extract([tmp_path / "photos"], output, **OPTIONS)
    before = output.stat().st_mtime_ns
    seen: list = []

    def the_other_shard_now(progress):
        if not seen:
            seen.append(sorted(os.listdir(tmp_path)))
            seen.append(extract([tmp_path / "photos"], output, **OPTIONS, shard="2/2"))

    first = extract(
        [tmp_path / "photos"], output, **OPTIONS, shard="1/2", on_progress=the_other_shard_now
    )
    assert seen[0] == ["f.h5", "photos"]
    for summary in (first, seen[1]):
        assert (summary.assembled, summary.computed, summary.already, summary.rows) == (
            True, 0, 4, 4,
        )  # fmt: skip
    assert sorted(os.listdir(tmp_path)) == ["f.h5", "photos"]
    assert output.stat().st_mtime_ns == before


def test_a_run_whose_folder_goes_as_it_joins_plans_again(tmp_path, monkeypatch):
    make_images(tmp_path / "photos", 3)
    output = tmp_path / "f.h5"
    real, gone = store_writer.claim, []

    def finished_meanwhile(folder, *args, **kwargs):
        if not gone:  # as when another process writes the output and removes the folder
            gone.append(shutil.rmtree(folder))
        return real(folder, *args, **kwargs)

    monkeypatch.setattr(store_writer, "claim", finished_meanwhile)
    summary = extract([tmp_path / "photos"], output, **OPTIONS)
    assert gone and (summary.computed, summary.rows) == (3, 3)
    assert len(vggfeat.load(output).paths) == 3


def test_load_reads_again_when_a_run_finishes_the_file_under_it(tmp_path, monkeypatch):
    make_images(tmp_path / "photos", 4)
    output = tmp_path / "f.h5"
    stop_after(2, tmp_path / "photos", output)
    real, finished = store_journal.Journal.column, []

    def finish_the_run_first(self, part, index, rows):
        if not finished:  # the run's last process writes the output, removing its parts
            finished.append(extract([tmp_path / "photos"], output, **OPTIONS))
        return real(self, part, index, rows)

    monkeypatch.setattr(store_journal.Journal, "column", finish_the_run_first)
    loaded = vggfeat.load(output)
    monkeypatch.undo()
    with h5py.File(output) as file:
        assert loaded.paths == file["paths"].asstr()[:].tolist()
        np.testing.assert_array_equal(loaded.features["pool1"], file["features/pool1"][:])
    assert finished and len(loaded.paths) == 4


def test_files_from_lines_end_at_a_newline_only(tmp_path):
    make_images(tmp_path / "photos", 2)
    odd = tmp_path / "photos" / "cr\rx.png"
    os.rename(tmp_path / "photos" / "img000.png", odd)
    listing_file = tmp_path / "list.txt"
    listing_file.write_bytes(
        os.fsencode(odd) + b"\n" + os.fsencode(tmp_path / "photos" / "img001.png") + b"\r\n"
    )
    output = tmp_path / "f.h5"
    result = invoke("extract", "--files-from", str(listing_file), "-o", str(output), *FLAGS)
    assert result.exit_code == 0, result.output
    loaded = vggfeat.load(output)
    assert (loaded.paths, loaded.failed) == (["photos/cr\rx.png", "photos/img001.png"], {})


def test_extract_takes_one_input_as_a_string_or_a_path(tmp_path):
    make_images(tmp_path / "photos", 2)
    for inputs, name in [(str(tmp_path / "photos"), "a.h5"), (tmp_path / "photos", "b.h5")]:
        summary = vggfeat.extract(inputs, tmp_path / name, **OPTIONS)
        assert (summary.computed, summary.rows) == (2, 2)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"image_size": "32"}, "--image-size '32' is not a whole number"),
        ({"image_size": None}, "--image-size None is not a whole number"),
        ({"depth": 16.0}, "--depth 16.0 is not a whole number"),
        ({"output": None}, "--output None is not a path"),
        ({"inputs": 5}, "inputs 5 is not a path or a list of paths"),
        ({"layers": [None]}, "--layer None is not a name"),
        ({"files_from": [5]}, "files_from line 5 is not a path"),
        ({"update": "yes"}, "--update 'yes' is not True or False"),
        ({"prune": 1}, "--prune 1 is not True or False"),
        ({"device": 0}, "--device 0 is not a name"),
    ],
)
def test_options_of_the_wrong_kind_are_refused_as_options(tmp_path, values, message):
    given = {"inputs": (str(tmp_path),), "output": str(tmp_path / "f.h5"), **OPTIONS, **values}
    with pytest.raises(OptionError, match=re.escape(message)):
        vggfeat.ExtractOptions(**given)


def test_options_take_bytes_as_the_file_system_has_them(tmp_path):
    name = os.fsencode(tmp_path / "caf\xe9.png")
    options = vggfeat.ExtractOptions(
        os.fsencode(tmp_path), tmp_path / "f.h5", **OPTIONS, files_from=[name + b"\r\n"]
    )
    assert options.inputs == (str(tmp_path),)
    assert options.files_from == (os.fsdecode(name),)


def test_a_prune_with_nothing_to_drop_touches_nothing_shards_included(tmp_path):
    make_images(tmp_path / "photos", 3)
    output = tmp_path / "f.h5"
    extract([tmp_path / "photos"], output, **OPTIONS)
    for shard in (None, "1/2"):
        summary = extract([tmp_path / "photos"], output, **OPTIONS, prune=True, shard=shard)
        assert (summary.assembled, summary.dropped, summary.rows) == (True, 0, 3)
        assert sorted(os.listdir(tmp_path)) == ["f.h5", "photos"]


def test_a_sharded_prune_is_finished_with_prune_or_refused(tmp_path):
    make_images(tmp_path / "photos", 4)
    output = tmp_path / "f.h5"
    extract([tmp_path / "photos"], output, **OPTIONS)
    os.remove(tmp_path / "photos" / "img001.png")
    first = extract([tmp_path / "photos"], output, **OPTIONS, prune=True, shard="1/2")
    assert (first.assembled, first.waiting_for) == (False, (2,))
    with pytest.raises(VggfeatError, match=r"has a --prune run unfinished in .*; add --prune"):
        extract([tmp_path / "photos"], output, **OPTIONS, shard="2/2")
    last = extract([tmp_path / "photos"], output, **OPTIONS, prune=True, shard="2/2")
    assert (last.assembled, last.dropped, last.rows) == (True, 1, 3)
    with h5py.File(output) as file:
        assert "photos/img001.png" not in file["paths"].asstr()[:].tolist()


def test_a_shard_that_finds_another_writing_the_output_says_so(tmp_path):
    make_images(tmp_path / "photos", 4)
    output = tmp_path / "f.h5"
    first = extract([tmp_path / "photos"], output, **OPTIONS, shard="1/2")
    assert first.waiting_for == (2,)
    # Another process writes the output now: it holds the lock on writing it.
    descriptor = os.open(tmp_path / "f.h5.parts" / "assemble.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        result = invoke("extract", str(tmp_path / "photos"), "-o", str(output), *FLAGS,
                        "--shard", "2/2")  # fmt: skip
    finally:
        os.close(descriptor)
    assert result.exit_code == 0, result.output
    assert (f"Shard 2/2 done: 2 images computed, 0 failed, 2 done before. Every shard is done; "
            f"another process is writing {output}.") in result.output  # fmt: skip


def test_an_empty_list_of_files_is_said_to_be_empty(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    result = CliRunner().invoke(
        cli, ["extract", "--files-from", str(tmp_path / "empty.txt"), *FLAGS]
    )
    assert result.exit_code == 1
    assert result.output.strip() == "Error: --files-from names no file: its list is empty"
