"""Nothing lost: kills, signals, full disks, file-size limits, locks, memory, updates.

These tests run ``vggfeat extract`` in child processes and break it from the
outside, then check that the same command finishes the job with exactly the
rows, order, features and failures of a run that was never disturbed.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vggfeat
from tests.conftest import absolute_paths
from vggfeat.errors import VggfeatError
from vggfeat.network import FeatureNetwork
from vggfeat.pipeline import extract

ROOT = Path(__file__).resolve().parent.parent
#: A cheap cut whose rows are big enough (4x4x512 float32, 32 KB) to fill a small disk.
OPTIONS = [
    "--layer",
    "pool4",
    "--image-size",
    "64",
    "--weights",
    "random",
    "--seed",
    "3",
    "--batch-size",
    "2",
    "--commit-every",
    "4",
    "--quiet",
]


def make_photos(folder: Path, count: int, broken: int = 2) -> Path:
    rng = np.random.default_rng(count)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), np.uint8)).save(
            folder / f"{index:04d}.png"
        )
    for index in range(broken):
        (folder / f"{index:04d}-broken.jpg").write_text("not an image")
    return folder


def command(photos: Path, output: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vggfeat",
        "extract",
        str(photos),
        "-o",
        str(output),
        *OPTIONS,
        *extra,
    ]


def start(photos: Path, output: Path, *extra: str, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        command(photos, output, *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        **popen,
    )


def finish(photos: Path, output: Path, *extra: str, **run) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(photos, output, *extra),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        **run,
    )


def parts_of(output: Path) -> list[Path]:
    return sorted(output.with_name(output.name + ".parts").glob("part-*.npz"))


def wait_for_parts(process: subprocess.Popen, output: Path, count: int, limit: float = 120):
    """Wait until ``output`` has ``count`` committed parts, or the process ends."""
    deadline = time.monotonic() + limit
    while len(parts_of(output)) < count and process.poll() is None:
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.01)


def assert_same_result(output: Path, reference: Path) -> None:
    got, expected = vggfeat.load(output), vggfeat.load(reference)
    assert absolute_paths(got.paths, output) == absolute_paths(expected.paths, reference)
    assert len(set(got.paths)) == len(got.paths)
    assert dict(zip(absolute_paths(got.failed, output), got.failed.values(), strict=True)) == dict(
        zip(absolute_paths(expected.failed, reference), expected.failed.values(), strict=True)
    )
    for name, values in expected.features.items():
        np.testing.assert_allclose(got.features[name], values, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    """A folder of images and the output of one undisturbed run over it."""
    folder = tmp_path_factory.mktemp("clean")
    photos = make_photos(folder / "photos", 160)
    output = folder / "clean.h5"
    result = finish(photos, output)
    assert result.returncode == 0, result.stderr
    return photos, output


def test_kill_9_at_random_moments_then_resume(clean_run, tmp_path):
    photos, reference = clean_run
    output = tmp_path / "killed.h5"
    rng = np.random.default_rng(2026)
    left = []
    for _ in range(12):
        process = start(photos, output)
        # Some kills land during start-up, the rest after 1-3 more parts are safe.
        more = int(rng.integers(0, 4))
        if more:
            wait_for_parts(process, output, len(parts_of(output)) + more)
            time.sleep(float(rng.uniform(0, 0.05)))
        else:
            time.sleep(float(rng.uniform(0.2, 2.5)))
        process.kill()
        process.wait()
        parts_folder = output.with_name(output.name + ".parts")
        left.append((len(parts_of(output)), len(list(parts_folder.glob("*.tmp"))), output.exists()))
    result = finish(photos, output)
    assert result.returncode == 0, result.stderr
    assert_same_result(output, reference)
    assert not output.with_name(output.name + ".parts").exists()
    # At least some kills hit a run that had committed work and more to do.
    assert sum(1 for count, _, done in left if count and not done) >= 5, left
    print("parts, temporary files, output present after each kill:", left)


def test_two_shards_at_once_killed_and_continued_equal_a_single_run(clean_run, tmp_path):
    photos, reference = clean_run
    output = tmp_path / "sharded.h5"
    rng = np.random.default_rng(7)
    for _ in range(3):
        shards = [start(photos, output, "--shard", f"{k}/2") for k in (1, 2)]
        wait_for_parts(shards[0], output, len(parts_of(output)) + int(rng.integers(1, 4)))
        for process in shards:
            time.sleep(float(rng.uniform(0, 0.3)))
            process.kill()
            process.wait()
        assert not output.exists()
    shards = [start(photos, output, "--shard", f"{k}/2") for k in (1, 2)]
    for process in shards:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
    assert_same_result(output, reference)
    assert not output.with_name(output.name + ".parts").exists()
    written = output.stat().st_mtime_ns
    assert finish(photos, output).returncode == 0
    assert output.stat().st_mtime_ns == written  # a plain run afterwards finds nothing new


@pytest.mark.parametrize(("number", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_and_sigterm_keep_completed_work(clean_run, tmp_path, number, code):
    photos, reference = clean_run
    output = tmp_path / "stopped.h5"
    process = start(photos, output)
    wait_for_parts(process, output, 2)
    process.send_signal(number)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr
    assert "Completed work is kept in" in stderr and "run the same command" in stderr
    kept = len(parts_of(output))
    assert kept >= 2 and not output.exists()
    result = finish(photos, output)
    assert result.returncode == 0, result.stderr
    assert_same_result(output, reference)


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
    )
    return result.returncode == 0


def test_full_disk_is_reported_and_resumed_after_space_is_freed(clean_run, tmp_path):
    photos, reference = clean_run
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "22m"):
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        output = disk / "features.h5"
        result = finish(photos, output)
        assert result.returncode == 1, result.stderr
        assert "free on the disk holding" in result.stderr
        assert "free some space and run the same command to continue" in result.stderr
        assert "Traceback" not in result.stderr
        kept = parts_of(output)
        assert kept, "work done before the disk filled must be kept"
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        result = finish(photos, output)
        assert result.returncode == 0, result.stderr
        assert_same_result(output, reference)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.parametrize("limit_kb", [100, 1200])
def test_file_size_limit_fails_cleanly_and_resumes(clean_run, tmp_path, limit_kb):
    # 100 KB stops the first part (4 rows of 32 KB); 1200 KB lets parts through
    # and stops the assembly of the output, which HDF5 writes.
    photos, reference = clean_run
    output = tmp_path / "limited.h5"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_kb * 1024, limit_kb * 1024))

    result = finish(photos, output, preexec_fn=limit)
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    assert "run the same command to continue" in result.stderr, result.stderr
    assert not output.exists()
    result = finish(photos, output)
    assert result.returncode == 0, result.stderr
    assert_same_result(output, reference)


def test_a_second_writer_is_refused_and_a_dead_ones_lock_is_taken_over(clean_run, tmp_path):
    photos, reference = clean_run
    output = tmp_path / "locked.h5"
    first = start(photos, output)
    wait_for_parts(first, output, 1)
    started = time.monotonic()
    second = finish(photos, output)
    assert second.returncode == 1
    assert f"is in use by process {first.pid}" in second.stderr
    assert time.monotonic() - started < 10  # refused at once, before any network
    first.kill()
    first.wait()
    result = finish(photos, output)
    assert result.returncode == 0, result.stderr
    assert_same_result(output, reference)


def test_unwritable_output_fails_before_any_network(tmp_path):
    # pytest's own temporary folders are private to root; this one must be reachable.
    shared = Path(tempfile.mkdtemp(prefix="vggfeat-"))
    shared.chmod(0o755)
    private = shared / "private"
    private.mkdir(mode=0o700)
    try:
        _check_refused_as_nobody(private)
    finally:
        shutil.rmtree(shared)


def _check_refused_as_nobody(private: Path) -> None:
    drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    if (
        shutil.which("setpriv") is None
        or subprocess.run(
            [*drop, sys.executable, "-c", "import vggfeat"], cwd=ROOT, capture_output=True
        ).returncode
    ):
        pytest.skip("cannot run vggfeat as an unprivileged user here")
    started = time.monotonic()
    result = subprocess.run(
        [
            *drop,
            sys.executable,
            "-m",
            "vggfeat",
            "extract",
            str(ROOT / "sample_images"),
            "-o",
            str(private / "out.h5"),
            "--weights",
            "random",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == f"Error: cannot write output {private}/out.h5: " + (
        f"no permission to write in {private}"
    )
    assert time.monotonic() - started < 10


def test_running_out_of_memory_halves_the_batch(tmp_path, monkeypatch):
    import tensorflow as tf

    photos = make_photos(tmp_path / "photos", 9, broken=0)
    options = {"layers": ["pool2"], "image_size": 32, "weights": "random", "pool": "avg"}
    small = extract([photos], tmp_path / "small.h5", batch_size=2, **options)
    run = FeatureNetwork._run

    def fails_above_two(self, pixels):
        if self.batch_size > 2:
            raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
        return run(self, pixels)

    monkeypatch.setattr(FeatureNetwork, "_run", fails_above_two)
    summary = extract([photos], tmp_path / "backed-off.h5", batch_size=8, **options)
    assert (summary.batch_size, summary.requested_batch_size) == (2, 8)
    assert summary.stored == small.stored == 9
    np.testing.assert_array_equal(
        vggfeat.load(tmp_path / "backed-off.h5").features["pool2"],
        vggfeat.load(tmp_path / "small.h5").features["pool2"],
    )

    def always_fails(self, pixels):
        raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")

    monkeypatch.setattr(FeatureNetwork, "_run", always_fails)
    with pytest.raises(VggfeatError, match="out of memory computing even one image"):
        extract([photos], tmp_path / "hopeless.h5", batch_size=4, **options)


def test_update_replaces_changed_rows_in_place_and_prune_drops_vanished(tmp_path):
    photos = make_photos(tmp_path / "photos", 5, broken=1)
    options = {"layers": ["pool2"], "image_size": 32, "weights": "random", "pool": "max"}
    output = tmp_path / "f.h5"
    extract([photos], output, **options)
    before = vggfeat.load(output)

    changed, vanished, added = photos / "0001.png", photos / "0003.png", photos / "0009.png"
    Image.new("RGB", (40, 56), (200, 10, 10)).save(changed)
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    vanished.unlink()
    Image.new("RGB", (40, 56), (10, 10, 200)).save(added)

    plain = extract([photos], output, **options)
    assert (plain.computed, plain.stored, plain.replaced) == (1, 1, 0)
    assert vggfeat.load(output).paths == [*before.paths, "photos/0009.png"]

    updated = extract([photos], output, update=True, **options)
    after = vggfeat.load(output)
    assert (updated.computed, updated.stored, updated.replaced) == (1, 0, 1)
    assert after.paths == [*before.paths, "photos/0009.png"]  # replaced where it was
    fresh = extract([changed], tmp_path / "fresh.h5", **options)
    assert fresh.computed == 1
    row = after.paths.index("photos/0001.png")
    np.testing.assert_array_equal(
        after.features["pool2"][row], vggfeat.load(tmp_path / "fresh.h5").features["pool2"][0]
    )
    untouched = [i for i, p in enumerate(before.paths) if p != "photos/0001.png"]
    np.testing.assert_array_equal(
        after.features["pool2"][untouched], before.features["pool2"][untouched]
    )
    assert "photos/0003.png" in after.paths

    pruned = extract([photos], output, prune=True, **options)
    assert (pruned.computed, pruned.dropped, pruned.rows) == (0, 1, 5)
    assert "photos/0003.png" not in vggfeat.load(output).paths
    assert vggfeat.load(output).failed == before.failed


def test_a_run_killed_after_its_output_was_in_place_is_not_counted_twice(tmp_path, monkeypatch):
    photos = make_photos(tmp_path / "photos", 4, broken=0)
    options = {"layers": ["pool1"], "image_size": 32, "weights": "random"}
    output = tmp_path / "f.h5"
    # As if killed between renaming the output in and removing the parts.
    monkeypatch.setattr("vggfeat.store.shutil.rmtree", lambda *args, **kwargs: None)
    extract([photos], output, **options)
    assert parts_of(output)
    monkeypatch.undo()
    again = extract([photos], output, **options)
    assert (again.computed, again.stored, again.rows) == (0, 0, 4)
    assert vggfeat.load(output).paths == sorted(f"photos/{p.name}" for p in photos.glob("*.png"))
    assert not parts_of(output)
