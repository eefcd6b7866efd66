"""``--engine ray``: the same file as the local engine, on a local instance and on a cluster.

Every cluster here runs on this machine, is started by the test and shut down
by it; what a killed driver leaves behind is found among the test's own
descendants, never by name. Runs that stop on purpose compute on JAX, which
starts in half the time TensorFlow does; the engine does the same on either.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vggfeat
from tests.conftest import absolute_paths, descendants, save_safetensors, torchvision_state
from vggfeat import ray_engine
from vggfeat.pipeline import extract
from vggfeat.ray_engine import RayOptions
from vggfeat.terminal import print_summary

ray = pytest.importorskip("ray", reason="Ray comes with the 'test' extra")
from ray.cluster_utils import Cluster  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
#: Two heads on one layer, one with a parameter: the actors receive the cuts as the driver
#: made them.
OPTIONS = {
    "layers": ["pool1", "pool1:gem"],
    "pool": "avg",
    "head_parameters": {"gem_p": 2.5},
    "image_size": 32,
    "weights": "random",
}
#: Seconds of --stall-timeout: far longer than starting a network actor takes on 2 cores
#: that another test file keeps busy (over 20 s has been seen).
STALL = 120
FLAGS = ["--layer", "pool1", "--layer", "pool1:gem", "--gem-p", "2.5", "--pool", "avg"]
FLAGS += ["--image-size", "32", "--weights", "random"]


def make_photos(folder: Path, count: int, broken: int = 3) -> Path:
    """JPEGs of mixed sizes with smooth content and noise, as photos compress; some broken."""
    rng = np.random.default_rng(count)
    folder.mkdir(parents=True)
    for index in range(count):
        height, width = (int(v) for v in rng.integers(40, 160, 2))
        ramp = np.linspace(0, 255, width)[None, :, None] * rng.random(3)
        noise = rng.normal(0, 20, (height, width, 3))
        pixels = np.clip(ramp + noise + rng.integers(0, 80), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:03d}.jpg", quality=85)
    for index in range(broken):
        (folder / f"{index:03d}-broken.jpg").write_bytes(b"\xff\xd8\xff" + bytes(50))
    if broken:
        (folder / "!gone.jpg").symlink_to(folder / "nowhere.jpg")  # the first input, missing
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder and the local engine's output for it: the reference."""
    folder = tmp_path_factory.mktemp("ray")
    images = make_photos(folder / "photos", 60)
    reference = folder / "local.h5"
    extract([images], reference, **OPTIONS)
    return images, reference


def assert_same_file(output: Path, reference: Path, rtol=1e-5) -> None:
    """The same rows, failures and features; ``rtol`` 1e-4 where JAX computed one of them."""
    got, expected = vggfeat.load(output), vggfeat.load(reference)
    assert absolute_paths(got.paths, output) == absolute_paths(expected.paths, reference)
    assert absolute_paths(got.failed, output) == absolute_paths(expected.failed, reference)
    assert list(got.failed.values()) == list(expected.failed.values())
    assert list(got.features) == list(expected.features) == ["pool1", "pool1:gem"]
    for layer, values in expected.features.items():
        np.testing.assert_allclose(
            got.features[layer], values, rtol=rtol, atol=rtol * np.abs(values).max()
        )


def command(images: Path, output: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "vggfeat", "extract", str(images), "-o", str(output),
        *FLAGS, "--engine", "ray", "--commit-every", "8", "--batch-size", "4", *extra,
    ]  # fmt: skip


def wait_for_parts(process: subprocess.Popen, output: Path, count: int, limit: float = 120):
    parts = output.with_name(output.name + ".parts")
    deadline = time.monotonic() + limit
    while len(list(parts.glob("part-*.npz"))) < count and process.poll() is None:
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.05)


def test_a_local_instance_writes_the_local_engines_file(photos, tmp_path, monkeypatch, capsys):
    images, _ = photos
    # Weights from PyTorch's world with batch norm: the actors receive any source.
    weights = save_safetensors(torchvision_state(16, True), tmp_path / "vgg16_bn.safetensors")
    options = {**OPTIONS, "weights": weights, "batch_norm": True, "backend": "jax"}
    extract([images], tmp_path / "local.h5", **{**options, "backend": "tensorflow"})
    # The first commit takes 3 s while a stall limit of 1 s is in force: the driver's own
    # writing is not waiting for the cluster, and must not stop the run.
    watchdogs: list = []

    class Recorded(ray_engine.Watchdog):
        def __init__(self, limit: float) -> None:
            super().__init__(limit)
            watchdogs.append(self)

    savez, slow = np.savez, [True]

    def slow_first_commit(file, **arrays):
        if slow and slow.pop():
            running = watchdogs[-1]  # the run's, made after the connection's
            running.limit = 1.0
            time.sleep(3)
            running.limit = STALL
        savez(file, **arrays)

    monkeypatch.setattr(ray_engine, "Watchdog", Recorded)
    monkeypatch.setattr("vggfeat.store.journal.np.savez", slow_first_commit)
    output = tmp_path / "ray.h5"
    engine = RayOptions(stall_timeout=STALL)
    summary = extract([images], output, **options, engine=engine, batch_size=4, commit_every=8)
    assert not slow  # the slow commit happened
    assert (summary.engine, summary.computed, len(summary.failures)) == ("ray", 60, 4)
    # The driver's time, in parts that add up to the wall time; the actors' networks, which
    # compute side by side, apart from them.
    print_summary(summary)
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("Time:")]
    found = re.fullmatch(
        r"Time: ([\d.]+) s, [\d.]+ images/s after start-up \(start-up ([\d.]+) s, waiting for "
        r"the cluster ([\d.]+) s, writing ([\d.]+) s; networks on the cluster ([\d.]+) s, "
        r"summed over the actors\)\. File: [\d.]+ MB\.",
        line,
    )
    assert found, line
    total, startup, waiting, writing, networks = map(float, found.groups())
    assert startup + waiting + writing <= total + 0.15, line  # each rounded to 0.1 s
    assert startup > 0 and writing >= 3 and networks > 0, line  # the slow commit: writing
    timings = summary.timings
    assert (timings.network, timings.network_elsewhere is not None) == (0, True)
    assert timings.startup + timings.waiting + timings.writing == pytest.approx(summary.seconds)
    assert sum(summary.rows_per_node.values()) == 60
    assert_same_file(output, tmp_path / "local.h5", rtol=1e-4)
    attributes = vggfeat.load(output).attributes
    assert attributes["engine"] == "ray" and '"nodes": 1' in attributes["cluster"]
    sha256 = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert attributes["weights_sha256"] == sha256  # what every actor checked it received
    assert not ray.is_initialized()  # the instance vggfeat started is gone


def test_a_weights_file_that_does_not_fit_is_one_line_before_ray_starts(
    photos, tmp_path, weight_files
):
    images, _ = photos
    result = subprocess.run(
        command(images, tmp_path / "f.h5", "--weights", str(weight_files(19)), "--quiet"),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        # As a user runs it: conftest's TF_CPP_MIN_LOG_LEVEL would count as the user's choice.
        env={k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"},
    )
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("Error: weights file ") and line.endswith(
        "is not for VGG16; the file holds 16 conv layers, as VGG19 does (--depth 19)"
    )
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--actors", "2"], "--actors works with --engine ray only"),
        (["--stall-timeout", "5", "--verbose"], "--stall-timeout and --verbose work with"),
        (["--engine", "ray", "--stall-timeout", "nan"], "--stall-timeout must be a number"),
        (["--engine", "ray", "--ray-address", "127.0.0.1:99999"], "is not auto, HOST:PORT"),
    ],
)
def test_bad_engine_options_are_usage_errors(tmp_path, options, message):
    result = subprocess.run(
        [sys.executable, "-m", "vggfeat", "extract", str(tmp_path), *FLAGS, *options],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_something_that_listens_but_is_no_ray_cluster_fails_within_the_limit(tmp_path):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        images = make_photos(tmp_path / "photos", 1, broken=0)
        result = subprocess.run(
            command(images, tmp_path / "f.h5", "--ray-address", f"127.0.0.1:{port}"),
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "VGGFEAT_RAY_CONNECT_SECONDS": "5"},
            timeout=120,  # the limit is 5 s: a run that waits for ever fails here
        )
    assert result.returncode == 1, result.stderr
    assert f"no Ray cluster answered at 127.0.0.1:{port} within 5 s" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_without_ray_the_engine_is_refused_before_tensorflow(tmp_path):
    probe = (
        "import sys; sys.modules['ray'] = None\n"
        "from vggfeat.cli import cli\n"
        "try:\n"
        f"    cli(['extract', {str(tmp_path)!r}, '--engine', 'ray'])\n"
        "except SystemExit as stop:\n"
        "    print('exit', stop.code, 'tensorflow' in sys.modules)\n"
    )
    (tmp_path / "a.png").write_bytes(b"")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.stdout.strip() == "exit 1 False", result.stderr
    assert "pip install 'ray[data]>=2.60,<3'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_an_address_where_no_cluster_answers_fails_within_seconds(tmp_path):
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    images = make_photos(tmp_path / "photos", 1, broken=0)
    result = subprocess.run(
        command(images, tmp_path / "f.h5", "--ray-address", f"127.0.0.1:{port}"),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 1
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("f.h5*"))


def test_kill_9_a_lost_actor_and_sigterm_cost_nothing_and_leave_nothing_running(tmp_path, adopted):
    # Enough images that a run is still going when it is stopped.
    images = make_photos(tmp_path / "many", 160, broken=0)
    reference = tmp_path / "local.h5"
    extract([images], reference, **OPTIONS)
    output = tmp_path / "f.h5"
    run = command(images, output, "--backend", "jax", "--commit-every", "4")
    first = subprocess.Popen(run, cwd=ROOT, stderr=subprocess.DEVNULL)
    wait_for_parts(first, output, 1)  # its Ray instance is up: servers, agents, workers
    assert any("raylet" in line for line in descendants(first.pid).values())
    first.kill()
    first.wait()
    # Whatever the killed driver left is this test's child now; within 60 s none is left.
    deadline = time.monotonic() + 60
    while (left := adopted()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, list(left.values())

    committed = len(list(output.parent.glob("f.h5.parts/part-*.npz")))
    second = subprocess.Popen(
        run, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for_parts(second, output, committed + 1)
    # The network actors of the run this test started: its driver's descendants.
    actors = [pid for pid, line in descendants(second.pid).items() if "ray::MapWorker" in line]
    assert actors, ("no network actor was found to kill", second.poll())
    for pid in actors:
        os.kill(pid, signal.SIGKILL)  # Ray starts another; the run goes on
    wait_for_parts(second, output, committed + 2)
    second.send_signal(signal.SIGTERM)
    stdout, stderr = second.communicate(timeout=120)
    assert second.returncode == 143, stderr
    assert stdout == ""  # Ray's messages never reach stdout
    assert "Completed work is kept in" in stderr
    # Ray's stream was ended before Ray was shut down: nothing reached for Ray after the
    # stop (a stream left to the garbage collector started a new instance, left running).
    after = stderr.split("Completed work is kept in")[-1]
    assert "Ray instance" not in after and "Exception ignored" not in stderr, stderr
    deadline = time.monotonic() + 60
    while (left := adopted()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, list(left.values())

    # What Ray committed is finished by the local engine (it starts in seconds, not 20).
    local = [*run[: run.index("--engine")], *run[run.index("--engine") + 2 :]]
    last = subprocess.run(local, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert last.returncode == 0, last.stderr
    assert "already done" in last.stderr
    assert_same_file(output, reference, rtol=1e-4)


def test_mixed_precision_on_gpu_actors_computes_in_float16(photos, tmp_path):
    images, reference = photos
    # A node that says it has a GPU: the actors take it, and mixed precision means float16
    # there, whatever the driver's own CPU does fast.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 1})
    try:
        engine = RayOptions(address=cluster.address)
        output = tmp_path / "mixed.h5"
        extract([images], output, **OPTIONS, engine=engine, precision="mixed", batch_size=4)
    finally:
        cluster.shutdown()
    loaded = vggfeat.load(output)
    assert loaded.attributes["compute_dtype"] == "float16"
    assert json.loads(loaded.attributes["cluster"])["gpus_per_actor"] == 1
    full = vggfeat.load(reference).features["pool1"]
    mixed = loaded.features["pool1"]
    assert not np.array_equal(mixed, full)
    cosine = (mixed * full).sum(1) / np.linalg.norm(mixed, axis=1) / np.linalg.norm(full, axis=1)
    assert cosine.min() > 0.999


def test_a_cluster_where_no_network_can_start_stops_after_the_stall_timeout(photos, tmp_path):
    images, _ = photos
    output = tmp_path / "f.h5"
    # The head takes no work and there are no other nodes: nothing can ever run.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        run = command(images, output, "--ray-address", cluster.address, "--stall-timeout", "5")
        result = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        cluster.shutdown()
    assert result.returncode == 1, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("Error: no image was done for 5 s (--stall-timeout)")
    assert "completed work is kept" in line and not output.exists()
