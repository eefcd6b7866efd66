"""Nothing lost: kills, signals, full disks, file-size limits, locks, memory, updates.

These tests run ``vggfeat extract`` in child processes and break it from the
outside, then check that the same command finishes the job with exactly the
rows, order, features and failures of a run that was never disturbed.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vggfeat
from tests.conftest import absolute_paths, write_features
from vggfeat.atomic import write_error
from vggfeat.errors import VggfeatError
from vggfeat.network import CutNetwork
from vggfeat.pipeline import Interrupted, extract

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
    # The store is what these tests break; JAX starts in half the time TensorFlow does.
    "--backend",
    "jax",
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
    photos = make_photos(folder / "photos", 48)
    output = folder / "clean.h5"
    result = finish(photos, output)
    assert result.returncode == 0, result.stderr
    return photos, output


#: How the random interruptions stop a run, and the exit status each leaves.
STOPS = [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGKILL, -signal.SIGKILL)]


#: Rounds of the random interruptions: 16 in the suite (about a minute and a half on two
#: cores); VGGFEAT_TEST_INTERRUPTIONS=200 soaks the store by hand for an hour or so.
ROUNDS = int(os.environ.get("VGGFEAT_TEST_INTERRUPTIONS", "16"))


def test_random_interruptions_lose_nothing_and_double_nothing(tmp_path):
    """ROUNDS runs, the first third sometimes as two shards at once, each stopped by SIGINT,
    SIGTERM or kill -9 at a random moment, committing every 1 or 2 images; photos are
    added half way, so that later runs append to a finished file in place. Then plain
    runs until one has nothing new (the photos added while a sharded run was unfinished
    come with the run after the one that finishes it): the file is what one undisturbed
    run over the photos writes, and no run said a part was damaged.

    A moment is a random time into start-up, or a random instant once 1-3 more parts
    are committed. (The first 0.1 s are the interpreter's own: a signal then ends Python
    before any line of vggfeat runs.)"""
    photos = make_photos(tmp_path / "photos", 40)
    output = tmp_path / "stopped.h5"
    rng = np.random.default_rng(15)
    seen = []
    for round_ in range(ROUNDS):
        if round_ == ROUNDS // 2:
            make_photos(tmp_path / "more", 12).rename(photos / "zz-added")
        shards = (
            [f"{k}/2" for k in (1, 2)] if round_ < ROUNDS // 3 and rng.random() < 0.6 else [None]
        )
        every = str(int(rng.integers(1, 3)))
        runs = [
            start(photos, output, "--commit-every", every, *(["--shard", s] if s else []))
            for s in shards
        ]
        for process in runs:
            number, code = STOPS[int(rng.integers(len(STOPS)))]
            _stop_at_a_random_moment(process, output, number, rng)
            _, stderr = process.communicate(timeout=300)
            seen.append(process.returncode)
            assert process.returncode in (0, code), (round_, number, stderr)
            assert "damaged" not in stderr and "Traceback" not in stderr, stderr
            if process.returncode in (130, 143):
                assert stderr.startswith("Stopped."), stderr
    # Plain runs until one has nothing new: the one that finishes an unfinished sharded
    # run writes what that run listed, and the photos added meanwhile come with the next.
    said = []
    for _ in range(3):
        result = finish(photos, output)
        said.append(result.stderr)
        assert result.returncode == 0, result.stderr
        if result.stderr.startswith("Nothing new"):
            break
    print("The plain runs said:", *said, sep="\n")  # shown if the test fails
    reference = tmp_path / "reference.h5"
    assert finish(photos, reference).returncode == 0
    assert_same_result(output, reference)
    assert not output.with_name(output.name + ".parts").exists()
    assert sum(1 for code in seen if code) >= ROUNDS // 2, seen  # most were really stopped


def test_a_ctrl_c_in_generated_code_still_exits_130_not_by_the_signal(tmp_path):
    """A Ctrl-C can land in code Python runs from a string (a dataclass's generated
    methods, made as a module is imported). Caught, it must still end the command with
    "Stopped." and 130: CPython would otherwise end the process by SIGINT as it exits
    (found by the random interruptions above, once in about fifty stops)."""
    (tmp_path / "ctrl_c_in_generated_code.py").write_text(
        "import vggfeat.cli\n"
        "from vggfeat.__main__ import main\n"
        "def command(**_):\n"
        "    exec('raise KeyboardInterrupt', {})  # where the signal landed\n"
        "vggfeat.cli.cli = command\n"
        "main()\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "ctrl_c_in_generated_code"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert (result.returncode, result.stderr) == (130, "Stopped.\n")


def test_a_ctrl_c_in_a_garbage_collector_callback_still_stops_the_run(tmp_path, capsys):
    """JAX runs a callback at every garbage collection. A Ctrl-C landing there is printed
    by Python as 'Exception ignored' and lost (found by the random interruptions, on CI):
    the run must stop at its next batch all the same, keep its work, print nothing."""
    photos = make_photos(tmp_path / "photos", 8, broken=0)
    options = {"layers": ["pool1"], "image_size": 32, "weights": "random", "batch_size": 2}
    armed = []

    def ctrl_c_in_callback(phase, info):
        if armed and phase == "start":
            armed.clear()
            raise KeyboardInterrupt  # as the signal handler would, here

    def arm_after_two_images(progress):
        if progress.done >= 2 and not armed:
            armed.append(True)

    gc.callbacks.append(ctrl_c_in_callback)
    try:
        with pytest.raises(Interrupted) as stopped:
            # Allocation keeps collections coming, as a run's own does.
            extract([photos], tmp_path / "f.h5", commit_every=2, **options,
                    on_progress=lambda p: (arm_after_two_images(p), gc.collect()))  # fmt: skip
    finally:
        gc.callbacks.remove(ctrl_c_in_callback)
    assert stopped.value.exit_code == 130
    assert "Exception ignored" not in capsys.readouterr().err
    assert parts_of(tmp_path / "f.h5")  # what was computed is kept
    done = extract([photos], tmp_path / "f.h5", **options)
    assert 0 < done.already < 8 and done.already + done.computed == 8


def _stop_at_a_random_moment(process, output: Path, number: int, rng) -> None:
    if rng.random() < 0.5:
        time.sleep(float(rng.uniform(0.1, 3.0)))
    else:
        wait_for_parts(process, output, len(parts_of(output)) + int(rng.integers(1, 4)))
        time.sleep(float(rng.uniform(0, 0.05)))
    if process.poll() is None:
        process.send_signal(number)


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
    )
    return result.returncode == 0


def test_full_disk_is_reported_and_resumed_after_space_is_freed(clean_run, tmp_path):
    photos, reference = clean_run
    disk = tmp_path / "disk"
    # 16 MB are always left free; the run needs a little more than the rest.
    if not _mount_tmpfs(disk, "17m"):
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
    second = watching_imports(command(photos, output)[3:])
    assert (second.returncode, second.stdout) == (1, "tensorflow not imported"), second.stderr
    assert f"is in use by process {first.pid}" in second.stderr  # at once, before any network
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
    result = watching_imports(
        ["extract", str(ROOT / "sample_images"), "-o", str(private / "out.h5"), "--weights",
         "random"],
        prefix=drop,
    )  # fmt: skip
    assert (result.returncode, result.stdout) == (1, "tensorflow not imported")
    assert result.stderr.strip() == f"Error: cannot write output {private}/out.h5: " + (
        f"no permission to write in {private}; write the output elsewhere with -o"
    )
    features = write_features(private.parent / "f.h5", ["a.png"], np.ones((1, 4), np.float32))
    _each_write_refused(drop, private, features, f"no permission to write in {private}")


def _each_write_refused(prefix: list[str], folder: Path, features: Path, why: str) -> None:
    """Run, under ``prefix``, each command of ``_writes_in`` and check it is refused, exit 1,
    in its one line giving ``why``."""
    for args, refused in _writes_in(folder, features):
        result = subprocess.run(
            [*prefix, sys.executable, "-m", "vggfeat", *args], cwd=ROOT, capture_output=True,
            text=True, timeout=300,
        )  # fmt: skip
        assert (result.returncode, result.stderr.strip()) == (1, refused(why)), args


def _writes_in(folder: Path, features: Path) -> list[tuple[list[str], Callable[[str], str]]]:
    """A command of each kind that writes a file in ``folder``, and the line it is refused
    with, given the reason."""
    return [
        (["export", str(features), "-o", str(folder / "f.csv")],
         lambda why: f"Error: cannot write {folder}/f.csv: {why}; write it elsewhere with -o"),
        (["export", str(features), "-o", os.devnull, "--format", "csv", "--paths-to",
          str(folder / "p.txt")],
         lambda why: f"Error: cannot write {folder}/p.txt: {why}; write it elsewhere with "
         "--paths-to"),
        (["duplicates", str(features), "--html", str(folder / "d.html")],
         lambda why: f"Error: --html {folder}/d.html: {why}; write the page elsewhere with "
         "--html"),
    ]  # fmt: skip


def read_only(folder: Path) -> list[str]:
    """A command prefix that runs its command with ``folder`` mounted read-only: a bind
    mount in a user and mount namespace of the command's own, gone when it ends."""
    remount = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && exec "$@"'
    prefix = ["unshare", "-rm", "sh", "-c", remount, str(folder)]
    probe = subprocess.run([*prefix, "touch", str(folder / "probe")], capture_output=True)
    if shutil.which("unshare") is None or "Read-only file system" not in probe.stderr.decode():
        pytest.skip(f"cannot mount a folder read-only here (unshare -rm): {probe.stderr!r}")
    return prefix


def test_a_read_only_mount_is_said_so_and_a_finished_file_there_has_nothing_new(tmp_path):
    photos = make_photos(tmp_path / "photos", 3, broken=0)
    output = tmp_path / "features.h5"
    extract = ["extract", str(photos), "--layer", "pool1", "--pool", "avg", "--image-size",
               "32", "--weights", "random", "--backend", "jax"]  # fmt: skip
    made = subprocess.run(
        [sys.executable, "-m", "vggfeat", *extract, "-o", str(output), "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    before = sorted(os.listdir(tmp_path)), output.read_bytes()
    mounted = read_only(tmp_path)
    again = watching_imports([*extract, "-o", str(output)], prefix=mounted)
    assert (again.returncode, again.stdout) == (0, "tensorflow not imported"), again.stderr
    assert again.stderr.strip() == f"Nothing new: all 3 images are already in {output} (3 rows)."
    new = watching_imports([*extract, "-o", str(tmp_path / "new.h5")], prefix=mounted)
    assert (new.returncode, new.stdout) == (1, "tensorflow not imported")
    assert new.stderr.strip() == (
        f"Error: cannot write output {tmp_path}/new.h5: {tmp_path} is on a read-only file "
        "system; write the output elsewhere with -o"
    )
    _each_write_refused(mounted, tmp_path, output, f"{tmp_path} is on a read-only file system")
    assert (sorted(os.listdir(tmp_path)), output.read_bytes()) == before


def test_a_write_refused_part_way_names_its_cause(tmp_path):
    target, kept = tmp_path / "part.npz", "completed work is kept in x.parts"
    for code, cause in ((errno.EROFS, f"{tmp_path} is on a read-only file system"),
                        (errno.EACCES, f"no permission to write in {tmp_path}")):  # fmt: skip
        error = write_error(OSError(code, os.strerror(code)), target, tmp_path / "x", kept)
        assert str(error) == (
            f"cannot write {target}: {cause}; {kept}: run the same command again once it can "
            "be written"
        )
    # A folder given relative to here is named in full: "." says nothing.
    error = write_error(PermissionError(errno.EACCES, "no"), Path("part.npz"), Path("x"), kept)
    assert f"no permission to write in {Path.cwd()};" in str(error)


#: Runs the command line as ``vggfeat`` does, then says whether TensorFlow was imported.
PROBE = """
import sys
from vggfeat.__main__ import main
try:
    main()
except SystemExit as stop:
    code = stop.code
print("tensorflow", "imported" if "tensorflow" in sys.modules else "not imported", end="")
sys.exit(code)
"""


def watching_imports(args: list[str], prefix: list[str] = ()) -> subprocess.CompletedProcess:
    """``vggfeat ARGS``; its stdout says whether it imported TensorFlow on the way."""
    return subprocess.run(
        [*prefix, sys.executable, "-c", PROBE, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def test_running_out_of_memory_halves_the_batch(tmp_path, monkeypatch):
    import tensorflow as tf

    photos = make_photos(tmp_path / "photos", 9, broken=0)
    options = {"layers": ["pool2"], "image_size": 32, "weights": "random", "pool": "avg"}
    small = extract([photos], tmp_path / "small.h5", batch_size=2, **options)
    run = CutNetwork._run

    def fails_above_two(self, pixels):
        if self.batch_size > 2:
            raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
        return run(self, pixels)

    monkeypatch.setattr(CutNetwork, "_run", fails_above_two)
    summary = extract([photos], tmp_path / "backed-off.h5", batch_size=8, **options)
    assert (summary.batch_size, summary.requested_batch_size) == (2, 8)
    assert summary.stored == small.stored == 9
    np.testing.assert_array_equal(
        vggfeat.load(tmp_path / "backed-off.h5").features["pool2"],
        vggfeat.load(tmp_path / "small.h5").features["pool2"],
    )

    def always_fails(self, pixels):
        raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")

    monkeypatch.setattr(CutNetwork, "_run", always_fails)
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
    monkeypatch.setattr("vggfeat.store.writer.remove_folder", lambda folder: [])
    extract([photos], output, **options)
    assert parts_of(output)
    monkeypatch.undo()
    again = extract([photos], output, **options)
    assert (again.computed, again.stored, again.rows) == (0, 0, 4)
    assert vggfeat.load(output).paths == sorted(f"photos/{p.name}" for p in photos.glob("*.png"))
    assert not parts_of(output)


def test_completed_images_that_could_not_be_kept_are_said_not_dropped_silently(
    tmp_path, monkeypatch
):
    from vggfeat.local_engine import LocalEngine

    photos = make_photos(tmp_path / "photos", 6, broken=0)
    run = LocalEngine.run

    def breaks_on_the_third_batch(self, paths):
        for number, result in enumerate(run(self, paths)):
            if number == 2:
                raise VggfeatError("the network broke")
            yield result

    def full_disk(file, **arrays):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(LocalEngine, "run", breaks_on_the_third_batch)
    monkeypatch.setattr("vggfeat.store.journal.np.savez", full_disk)
    options = {"layers": ["pool1"], "image_size": 32, "weights": "random", "batch_size": 2}
    with pytest.raises(VggfeatError, match="the network broke") as raised:
        extract([photos], tmp_path / "f.h5", commit_every=100, **options)
    [note] = raised.value.__notes__
    assert note.startswith("The last 4 images computed could not be kept (no space left")
    assert note.endswith("the same command computes them again.")


def test_a_batch_too_big_for_the_memory_left_is_capped_not_killed(tmp_path):
    """Under a memory limit (a control group, as in a container or a SLURM job), a batch of
    every image at once would end in the kernel's OOM killer or std::bad_alloc."""
    photos = make_photos(tmp_path / "photos", 96, broken=0)
    limit = 1_300_000_000  # what TensorFlow and the network take, and room for a few images
    with memory_limited(limit) as enter:
        result = subprocess.run(
            [sys.executable, "-m", "vggfeat", "extract", str(photos), "-o",
             str(tmp_path / "f.h5"), "--layer", "conv1_1", "--pool", "avg", "--weights", "random",
             "--batch-size", "100000"],
            capture_output=True, text=True, cwd=ROOT, timeout=600, preexec_fn=enter,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    [note] = [line for line in result.stderr.splitlines() if line.startswith("Note:")]
    capped = int(re.search(r"computing (\d+) images at a time", note)[1])
    assert note.startswith("Note: --batch-size 100000: 96 images at a time need about")
    assert 1 <= capped < 96
    # The rows are right: the first eight as a run of those alone computes them.
    first = sorted(photos.iterdir())[:8]
    extract(first, tmp_path / "reference.h5", layers=["conv1_1"], pool="avg", weights="random")
    got, expected = vggfeat.load(tmp_path / "f.h5"), vggfeat.load(tmp_path / "reference.h5")
    assert got.paths[:8] == expected.paths and len(got.paths) == 96
    np.testing.assert_allclose(got.features["conv1_1"][:8], expected.features["conv1_1"], rtol=1e-5)


@contextlib.contextmanager
def memory_limited(limit: int):
    """A memory control group of its own with ``limit`` bytes; yields what a child runs to
    enter it (``preexec_fn``). Skips where control groups cannot be made (not root)."""
    ours = re.search(r"^\d+:[\w,]*memory[\w,]*:(.*)$", Path("/proc/self/cgroup").read_text(), re.M)
    group = Path("/sys/fs/cgroup/memory" + (ours[1] if ours else "/")) / f"vggfeat-{os.getpid()}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit))
    except OSError as error:
        pytest.skip(f"cannot make a memory control group here: {error}")

    def enter() -> None:
        (group / "cgroup.procs").write_text(str(os.getpid()))

    try:
        yield enter
    finally:
        group.rmdir()
