"""``--engine ray``: the same file as the local engine, on a local instance and on a cluster.

Every cluster here runs on this machine, is started by the test and shut down
by it; processes a killed driver leaves behind are found and ended.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
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
from vggfeat.pipeline import extract

ray = pytest.importorskip("ray", reason="Ray comes with the 'test' extra")
from ray.cluster_utils import Cluster  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OPTIONS = {"layers": ["pool1"], "pool": "avg", "image_size": 32, "weights": "random"}
FLAGS = ["--layer", "pool1", "--pool", "avg", "--image-size", "32", "--weights", "random"]


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


def assert_same_file(output: Path, reference: Path, layer: str = "pool1") -> None:
    got, expected = vggfeat.load(output), vggfeat.load(reference)
    assert absolute_paths(got.paths, output) == absolute_paths(expected.paths, reference)
    assert absolute_paths(got.failed, output) == absolute_paths(expected.failed, reference)
    assert list(got.failed.values()) == list(expected.failed.values())
    np.testing.assert_allclose(got.features[layer], expected.features[layer], rtol=1e-5, atol=1e-6)


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


def end_processes_under(folder: Path) -> None:
    """End what a killed driver's Ray instance left running (its processes name ``folder``)."""
    found = subprocess.run(["pgrep", "-f", str(folder)], capture_output=True, text=True)
    for pid in map(int, found.stdout.split()):
        if pid != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def ray_tmp():
    """A short folder for a Ray instance's sockets and logs (Unix socket paths are short)."""
    folder = Path(tempfile.mkdtemp(prefix="vr", dir="/tmp"))
    yield folder
    end_processes_under(folder)


def test_a_local_instance_writes_the_local_engines_file(photos, tmp_path):
    images, reference = photos
    output = tmp_path / "ray.h5"
    summary = extract([images], output, **OPTIONS, engine="ray", batch_size=4)
    assert (summary.engine, summary.computed, len(summary.failures)) == ("ray", 60, 4)
    assert sum(summary.rows_per_node.values()) == 60
    assert_same_file(output, reference)
    attributes = vggfeat.load(output).attributes
    assert attributes["engine"] == "ray" and '"nodes": 1' in attributes["cluster"]
    assert not ray.is_initialized()  # the instance vggfeat started is gone


def test_a_weights_file_reaches_every_actor_checked(photos, tmp_path, weight_files):
    images, _ = photos
    weights = weight_files(16)
    options = {**OPTIONS, "weights": weights}
    extract([images], tmp_path / "local.h5", **options)
    extract([images], tmp_path / "ray.h5", **options, engine="ray")
    assert_same_file(tmp_path / "ray.h5", tmp_path / "local.h5")
    local = vggfeat.load(tmp_path / "local.h5").attributes["weights_sha256"]
    assert vggfeat.load(tmp_path / "ray.h5").attributes["weights_sha256"] == local != ""


def test_a_weights_file_that_does_not_fit_is_one_line(photos, tmp_path, weight_files):
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
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    [line] = lines
    assert line.startswith("Error: weights file ") and line.endswith(
        "is not for VGG16; the file holds 16 conv layers, as VGG19 does (--depth 19)"
    )


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
    assert result.returncode in (1, 2) and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.returncode == 2 or "ray-address" in message


def test_sigterm_commits_and_exits_143(photos, tmp_path, ray_tmp):
    images, _ = photos
    output = tmp_path / "f.h5"
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
    heavy = ["--layer", "pool4", "--image-size", "128", "--commit-every", "4"]
    process = subprocess.Popen(
        [*command(images, output), *heavy], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True
    )
    wait_for_parts(process, output, 1)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "Completed work is kept in" in stderr


def test_something_that_listens_but_is_no_ray_cluster_fails_within_the_limit(tmp_path):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        images = make_photos(tmp_path / "photos", 1, broken=0)
        started = time.monotonic()
        result = subprocess.run(
            command(images, tmp_path / "f.h5", "--ray-address", f"127.0.0.1:{port}"),
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "VGGFEAT_RAY_CONNECT_SECONDS": "5"},
            timeout=120,
        )
    assert result.returncode == 1, result.stderr
    assert f"127.0.0.1:{port}" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert time.monotonic() - started < 60


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
    assert "pip install 'vggfeat[ray]'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_an_address_where_no_cluster_answers_fails_within_seconds(tmp_path):
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    images = make_photos(tmp_path / "photos", 1, broken=0)
    started = time.monotonic()
    result = subprocess.run(
        command(images, tmp_path / "f.h5", "--ray-address", f"127.0.0.1:{port}"),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 1
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr and time.monotonic() - started < 60
    assert not list(tmp_path.glob("f.h5*"))


def test_a_killed_worker_process_costs_nothing(photos, tmp_path, ray_tmp):
    images, reference = photos
    output = tmp_path / "f.h5"
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
    process = subprocess.Popen(
        command(images, output, "--quiet"), cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True
    )
    wait_for_parts(process, output, 1)
    workers = subprocess.run(["pgrep", "-f", "ray::MapWorker"], capture_output=True, text=True)
    for pid in map(int, workers.stdout.split()):
        os.kill(pid, signal.SIGKILL)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert workers.stdout.split(), "no network actor was found to kill"
    assert_same_file(output, reference)


def test_a_killed_driver_is_continued_by_the_same_command(photos, tmp_path, ray_tmp):
    images, reference = photos
    output = tmp_path / "f.h5"
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
    process = subprocess.Popen(command(images, output, "--quiet"), cwd=ROOT, env=env)
    wait_for_parts(process, output, 2)
    process.kill()
    process.wait()
    end_processes_under(ray_tmp)
    assert not output.exists()
    result = subprocess.run(
        command(images, output), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # Ray's messages never reach stdout
    assert_same_file(output, reference)


def test_nodes_lost_mid_run_stop_within_the_stall_timeout_and_a_rerun_completes(photos, tmp_path):
    images, _ = photos
    output = tmp_path / "f.h5"
    # A cut heavy enough that the run is still going when the nodes are lost.
    heavy = ["--layer", "pool4", "--image-size", "128"]
    reference = tmp_path / "local.h5"
    extract([images], reference, **{**OPTIONS, "layers": ["pool4"], "image_size": 128})
    # The head takes no work, so that once both workers are gone nothing can run.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        run = command(images, output, "--ray-address", cluster.address, "--stall-timeout", "15")
        run += [*heavy, "--commit-every", "4"]
        process = subprocess.Popen(run, cwd=ROOT, stderr=subprocess.PIPE, text=True)
        wait_for_parts(process, output, 1)
        cluster.remove_node(workers[0])
        cluster.remove_node(workers[1])
        stopped = time.monotonic()
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 1, stderr
        assert "no image was done for 15 s (--stall-timeout)" in stderr
        assert "completed work is kept" in stderr and "Traceback" not in stderr
        assert time.monotonic() - stopped < 60
        assert list(output.parent.glob("f.h5.parts/part-*.npz")) and not output.exists()
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        rerun = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr
    finally:
        cluster.shutdown()
    assert_same_file(output, reference, "pool4")
    assert len(set(vggfeat.load(output).paths)) == 60
