"""The network on JAX as well as TensorFlow: the same features, the device named, errors clear.

Keras keeps one backend per process and this one runs TensorFlow (the
reference models), so every JAX run here is a child process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import vggfeat
from tests.test_extract import keras_features, make_images, pixels_of
from vggfeat import network
from vggfeat.cli import cli
from vggfeat.pipeline import extract

pytest.importorskip("jax", reason="JAX comes with the 'test' extra")

ROOT = Path(__file__).resolve().parent.parent


#: The package whose version each backend reports.
PACKAGES = {"tensorflow": "tensorflow", "jax": "jaxlib"}


def assert_names_this_cpu(name: str) -> None:
    """``CPU, N cores[, FEATURE]``: N as the kernel counts them, FEATURE one this CPU has."""
    cpu, cores, *feature = name.split(", ")
    assert (cpu, cores) == ("CPU", f"{os.cpu_count()} cores"), name
    flags = set(Path("/proc/cpuinfo").read_text().split())
    assert all(f.lower() in flags for f in feature) and len(feature) <= 1, name


def vggfeat_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vggfeat", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


def test_jax_features_equal_keras_applications(tmp_path, weight_files):
    paths = make_images(tmp_path / "photos", 3, size=224)
    output = tmp_path / "jax.h5"
    result = vggfeat_cli(
        "extract", str(tmp_path / "photos"), "-o", str(output), "--backend", "jax",
        "--layer", "fc7", "--layer", "pool5", "--weights", str(weight_files(16, True)),
        "--batch-size", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    loaded = vggfeat.load(output)
    device = loaded.attributes["device"]
    assert loaded.attributes["backend"] == "jax"
    assert device.endswith(f", float32, JAX {version('jaxlib')}")
    assert_names_this_cpu(device.removesuffix(f", float32, JAX {version('jaxlib')}"))
    assert f"Computed by: {device}." in result.stderr
    pixels = pixels_of(paths)
    for name, layer in (("fc7", "fc2"), ("pool5", "block5_pool")):
        expected = keras_features(16, True, 224, layer, pixels)
        np.testing.assert_allclose(
            loaded.features[name], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max()
        )


def test_jax_and_tensorflow_agree_on_a_pooled_conv_cut_in_both_precisions(
    tmp_path, weight_files, monkeypatch
):
    # TensorFlow computes mixed in bfloat16 as on a CPU with AVX512_BF16, forced here: on
    # a CPU without it, mixed would be float32 and the comparison could not fail.
    monkeypatch.setattr(network, "cpu_has_fast_bfloat16", lambda: True)
    paths = make_images(tmp_path / "photos", 5, size=32)
    common = ["--layer", "conv4_2", "--pool", "avg", "--image-size", "32", "--batch-size", "2"]
    common += ["--weights", str(weight_files(16))]
    outputs = {}
    for precision in ("float32", "mixed"):
        output = tmp_path / f"jax-{precision}.h5"
        result = vggfeat_cli(
            "extract", str(tmp_path / "photos"), "-o", str(output), *common,
            "--precision", precision, env={"KERAS_BACKEND": "jax"},
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        outputs["jax", precision] = vggfeat.load(output)
        # This process runs TensorFlow already.
        output = tmp_path / f"tensorflow-{precision}.h5"
        extract([tmp_path / "photos"], output, layers=["conv4_2"], pool="avg", image_size=32,
                batch_size=2, weights=weight_files(16), precision=precision)  # fmt: skip
        outputs["tensorflow", precision] = vggfeat.load(output)
    expected = keras_features(16, False, 32, "block4_conv2", pixels_of(paths), pool="mean")
    for backend in ("tensorflow", "jax"):
        got = outputs[backend, "float32"].features["conv4_2"]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
        mixed = outputs[backend, "mixed"].features["conv4_2"]
        cosine = (mixed * got).sum(1) / np.linalg.norm(mixed, axis=1) / np.linalg.norm(got, axis=1)
        assert cosine.min() >= 0.999
    # XLA's CPU bfloat16 is slower than its float32: JAX keeps mixed runs on a CPU in float32.
    assert outputs["jax", "mixed"].attributes["compute_dtype"] == "float32"
    assert outputs["tensorflow", "mixed"].attributes["compute_dtype"] == "bfloat16"


def test_a_backend_that_is_not_installed_is_one_line_before_any_work(tmp_path):
    probe = (
        "import sys; sys.modules['jax'] = None\n"
        "from vggfeat.cli import cli\n"
        "try:\n"
        f"    cli(['extract', {str(ROOT / 'sample_images')!r}, '-o', {str(tmp_path / 'f.h5')!r},"
        " '--backend', 'jax'])\n"
        "except SystemExit as stop:\n"
        "    print('exit', stop.code, 'tensorflow' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.stdout.strip() == "exit 1 False", result.stderr
    assert result.stderr.strip() == (
        "Error: the jax backend needs jax, which is not installed: pip install 'jax>=0.6', "
        "or use --backend tensorflow"
    )
    assert not list(tmp_path.iterdir())


def test_devices_lists_each_backend_and_says_why_no_gpu():
    result = vggfeat_cli("devices", "--json")
    assert result.returncode == 0, result.stderr
    facts = {entry["backend"]: entry for entry in json.loads(result.stdout)}
    assert set(facts) == {"tensorflow", "jax"}
    for backend, entry in facts.items():
        assert entry["installed"] and entry["version"] == version(PACKAGES[backend])
        [cpu] = [device for device in entry["devices"] if device["kind"] == "cpu"]
        assert cpu["id"] == "cpu"
        assert_names_this_cpu(cpu["name"])
        gpus = [d for d in entry["devices"] if d["kind"] == "gpu"]
        assert bool(gpus) != bool(entry["no_gpu_because"])
    plain = CliRunner().invoke(cli, ["devices"])  # in this process: no second start-up
    assert plain.exit_code == 0, plain.output
    for backend, entry in facts.items():
        assert (
            f"{backend} {entry['version']}:\n  cpu: {entry['devices'][-1]['name']}" in plain.output
        )


def test_a_device_that_is_not_there_is_refused(tmp_path):
    result = vggfeat_cli(
        "extract", str(ROOT / "sample_images"), "-o", str(tmp_path / "f.h5"),
        "--layer", "pool1", "--image-size", "32", "--weights", "random",
        "--backend", "jax", "--device", "gpu:3",
    )  # fmt: skip
    if "sees no such GPU" not in result.stderr:
        pytest.skip("this machine has a fourth GPU")
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "--device gpu:3" in result.stderr and "--device cpu" in result.stderr


def test_jax_running_out_of_memory_is_recognised():
    probe = (
        "import jax.numpy as jnp\n"
        "from vggfeat.runtime import is_out_of_memory\n"
        "try:\n"
        "    jnp.ones((1 << 22, 1 << 22), jnp.float32).block_until_ready()\n"
        "except Exception as error:\n"
        "    print(type(error).__name__, is_out_of_memory(error))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
    )
    assert result.stdout.split()[-1] == "True", (result.stdout, result.stderr)
    assert not __import__("vggfeat.runtime").runtime.is_out_of_memory(ValueError("RESOURCE"))


def test_an_unknown_keras_backend_is_a_usage_error(tmp_path):
    result = vggfeat_cli(
        "extract", str(ROOT / "sample_images"), "-o", str(tmp_path / "f.h5"),
        env={"KERAS_BACKEND": "torch"},
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "Error: KERAS_BACKEND=torch is not a backend vggfeat runs on (tensorflow, jax); "
        "pass --backend, or unset KERAS_BACKEND"
    ]


def test_a_backend_that_cannot_be_imported_is_one_line_and_devices_lists_the_rest(tmp_path):
    probe = (
        "import sys; sys.modules['jaxlib'] = None\n"
        "from vggfeat.cli import cli\n"
        "try:\n"
        "    cli(sys.argv[1:])\n"
        "except SystemExit as stop:\n"
        "    print('exit', stop.code)\n"
    )
    run = [sys.executable, "-c", probe]
    extract = subprocess.run(
        [*run, "extract", str(ROOT / "sample_images"), "-o", str(tmp_path / "f.h5"),
         "--backend", "jax", "--layer", "pool1", "--image-size", "32", "--weights", "random"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert extract.stdout.strip().endswith("exit 1"), extract.stderr
    [line] = extract.stderr.strip().splitlines()
    assert "jax is installed but cannot be imported" in line
    devices = subprocess.run(
        [*run, "devices", "--json"], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    facts = {e["backend"]: e for e in json.loads(devices.stdout.rsplit("exit", 1)[0])}
    assert "cannot be imported" in facts["jax"]["no_gpu_because"]
    assert [d["kind"] for d in facts["tensorflow"]["devices"]][-1:] == ["cpu"]
