"""The ``vggfeat`` command through Click's runner, and its start-up cost."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from importlib.metadata import version

from click.testing import CliRunner

from vggfeat.architecture import vgg
from vggfeat.cli import cli
from vggfeat.weights import PUBLISHED


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_info_table_lists_every_layer_and_the_totals(keras_home):
    result = invoke("info")
    assert result.exit_code == 0, result.output
    for layer in vgg(16).layers:
        assert layer.name in result.output and layer.alias in result.output
    assert "138,357,544 parameters" in result.output
    assert "15.47 G multiply-adds" in result.output
    assert "missing, downloaded on first use" in result.output


def test_info_depth_19_and_a_small_input():
    result = invoke("info", "--depth", "19", "--image-size", "64")
    assert result.exit_code == 0, result.output
    assert "VGG19 at 64x64" in result.output and "block5_conv4" in result.output
    assert "fc1" not in result.output and "need 224x224" in result.output


def test_info_json_matches_keras_applications_vgg19(keras_home):
    import keras

    facts = json.loads(invoke("info", "--depth", "19", "--json").output)
    model = keras.applications.VGG19(weights=None)  # the reference: Keras's own network
    listed = [layer["name"] for layer in facts["layers"]]
    assert listed == [layer.name for layer in model.layers[1:]]
    macs = 0
    for entry, layer in zip(facts["layers"], model.layers[1:], strict=True):
        shape = tuple(layer.output.shape[1:])
        assert (tuple(entry["output_shape"]), entry["params"]) == (shape, layer.count_params())
        # Multiply-adds from the shapes: a kernel's weights once per output position.
        weights = math.prod(layer.kernel.shape) if hasattr(layer, "kernel") else 0
        positions = math.prod(shape[:-1]) if len(shape) == 3 else 1
        assert entry["macs"] == weights * positions
        macs += weights * positions
        pooled = shape[-1] if len(shape) == 3 else math.prod(shape)
        heads = ("avg", "max", "gem", "rmac") if len(shape) == 3 else ()
        assert entry["feature_size"] == {"none": math.prod(shape)} | dict.fromkeys(heads, pooled)
    assert facts["total_params"] == model.count_params() == 143_667_240
    assert facts["total_macs"] == macs
    assert facts["cut_points"][-3:] == ["fc6", "fc7", "fc8"]
    assert {w["file"] for w in facts["imagenet_weights"]} == {
        "vgg19_weights_tf_dim_ordering_tf_kernels.h5",
        "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
    }
    assert not any(w["cached"] for w in facts["imagenet_weights"])


def test_info_reports_a_cached_weight_file(keras_home):
    cached = keras_home / "models" / PUBLISHED[16, False].fname
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"\0" * 2_500_000)
    facts = json.loads(invoke("info", "--json").output)
    entry = next(w for w in facts["imagenet_weights"] if w["file"] == cached.name)
    assert entry == {**entry, "cached": True, "size_bytes": 2_500_000, "path": str(cached)}
    assert "cached, 2.5 MB" in invoke("info").output


def test_info_vgg11_says_keras_publishes_no_weights():
    result = invoke("info", "--depth", "11")
    assert "Keras publishes none for VGG11" in result.output
    assert json.loads(invoke("info", "--depth", "13", "--json").output)["imagenet_weights"] == []


def test_usage_errors():
    result = invoke("info", "--depth", "15")
    assert result.exit_code == 2 and "'15' is not one of '11', '13', '16', '19'" in result.output
    result = invoke("info", "--image-size", "16")
    assert result.exit_code == 2
    assert result.output.strip() == (
        "Error: --image-size 16 is too small: VGG16 needs at least 32x32 "
        "so that pool5 keeps one pixel"
    )


def test_clicks_own_usage_errors_are_one_line_naming_the_help():
    # Click would print the usage, a hint and a blank line around the error.
    cases = {
        ("extract", "photos", "--seed", "abc"): (
            "Error: Invalid value for '--seed': 'abc' is not a valid integer; "
            "see 'vggfeat extract --help'"
        ),
        ("export",): "Error: Missing argument 'FILE'; see 'vggfeat export --help'",
        ("frobnicate",): "Error: No such command 'frobnicate'; see 'vggfeat --help'",
        ("--bogus",): "Error: No such option '--bogus'; see 'vggfeat --help'",
        ("show", "a.h5", "b.h5"): (
            "Error: Got unexpected extra argument (b.h5); see 'vggfeat show --help'"
        ),
    }
    for args, line in cases.items():
        result = CliRunner().invoke(cli, list(args), prog_name="vggfeat")
        assert (result.exit_code, result.stderr) == (2, line + "\n"), args


def test_help_version_and_short_help():
    assert invoke("-h").output == invoke("--help").output
    assert "vggfeat info --depth 19" in invoke("--help").output
    assert "Examples" in invoke("info", "-h").output
    assert invoke("--version").output.strip() == f"vggfeat, version {version('vggfeat')}"


def test_module_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "vggfeat", "--version"], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == f"vggfeat, version {version('vggfeat')}"


def test_help_and_argument_errors_do_not_import_tensorflow(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "file").write_text("")
    (tmp_path / "empty").mkdir()
    image = str(tmp_path / "a.png")
    calls = [
        ["--help"],
        ["info", "-h"],
        ["info", "--depth", "7"],
        ["info"],
        ["extract", "-h"],
        ["extract", str(tmp_path / "missing")],
        ["extract", image, "--layer", "fc9"],
        ["extract", image, "--image-size", "64"],
        ["extract", image, "-o", str(tmp_path / "file" / "out.h5")],
        ["extract", str(tmp_path / "empty")],
        ["extract", image, "--layer", "fc2", "--layer", "FC7"],
        ["extract", image, "--device", "tpu"],
        ["extract", image, "--batch-size", "many"],
        ["extract", image, "--engine", "ray", "--stall-timeout", "0"],
        ["extract", image, "--seed", "-1"],
    ]
    probe = (
        "import sys, json\n"
        "from click.testing import CliRunner\n"
        "from vggfeat.cli import cli\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules\n"
        f"for args in {calls!r}:\n"
        "    result = CliRunner().invoke(cli, args)\n"
        "    print(json.dumps([result.exit_code, result.output.splitlines()[-1:]]))\n"
        "loaded = sorted(m for m in ('tensorflow', 'keras') if m in sys.modules)\n"
        "print(','.join(loaded) or 'none')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    *answers, loaded = result.stdout.splitlines()
    assert loaded == "none"
    codes = [json.loads(answer)[0] for answer in answers]
    assert codes == [0, 0, 2, 0, 0, 1, 2, 2, 1, 1, 2, 2, 2, 2, 2]
    errors = [json.loads(answer)[1][0] for answer in answers[5:]]
    assert "missing does not exist" in errors[0]
    assert "VGG16 has no layer 'fc9'" in errors[1]
    assert "fc7 needs 224x224 input" in errors[2]
    assert errors[3].startswith(f"Error: cannot write output {tmp_path}/file/out.h5")
    assert "no images found in the inputs" in errors[4]
    assert errors[5] == "Error: --layer FC7 and --layer fc2 are the same layer"
    assert errors[6] == "Error: --device tpu is not cpu, gpu or gpu:N"
    assert "'many' is not a number of images (1 or more) or auto" in errors[7]
    assert errors[8] == "Error: --stall-timeout must be a number of seconds more than 0"
    assert errors[9] == "Error: --seed must be from 0 to 4,294,967,295, not -1"


def test_a_closed_pipe_ends_quietly_with_exit_0():
    # The reader is gone before the command starts: its first write meets a closed pipe.
    commands = ["info --depth 19", "info --json", "--help", "--version", "show --help"]
    for command in commands:
        reader, writer = os.pipe()
        os.close(reader)
        try:
            result = subprocess.run(
                [sys.executable, "-m", "vggfeat", *command.split()],
                stdout=writer,
                stderr=subprocess.PIPE,
                text=True,
                # A user's TF_CPP_MIN_LOG_LEVEL=3 asks for quiet, as no setting does.
                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
            )
        finally:
            os.close(writer)
        assert result.returncode == 0, (command, result.stderr)
        assert result.stderr == "", command


def test_show_describes_a_file_as_h5py_reads_it(tmp_path):
    import h5py
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(3):
        Image.new("RGB", (40, 40), (index * 60, 9, 9)).save(photos / f"{index}.png")
    (photos / "bad.jpg").write_text("no")
    (photos / "worse.jpg").write_text("")
    output = tmp_path / "f.h5"
    args = ["--layer", "pool1", "--layer", "conv1_1", "--pool", "avg", "--image-size", "32"]
    assert invoke("extract", str(photos), "-o", str(output), *args, "--weights", "random",
                  "--quiet").exit_code == 0  # fmt: skip
    facts = json.loads(invoke("show", str(output), "--json").output)
    with h5py.File(output) as file:
        rows, failures = file["committed"][()]
        assert (facts["rows"], facts["failures"], facts["pending"]) == (rows, failures, 0)
        for layer in facts["layers"]:
            dataset = file[f"features/{layer['name']}"]
            assert layer["shape"] == list(dataset.shape[1:])
            assert (layer["dtype"], layer["pooling"]) == (str(dataset.dtype), "avg")
            assert layer["bytes_on_disk"] == dataset.id.get_storage_size() > 0
        failed = dict(
            zip(file["failed/paths"].asstr()[()], file["failed/reasons"].asstr()[()], strict=True)
        )
    assert [layer["name"] for layer in facts["layers"]] == ["pool1", "conv1_1"]
    assert facts["failed"] == {
        "empty file": 1,
        next(r for r in failed.values() if r != "empty file"): 1,
    }
    assert facts["attributes"]["weights"] == "random"
    listed = invoke("show", str(output), "--failed").output.splitlines()
    assert dict(line.split("\t") for line in listed) == failed
    plain = invoke("show", str(output)).output
    assert plain.startswith(f"{output}: 3 rows, 2 failed") and "pool1: 64 float32" in plain


def test_show_refuses_other_files_in_one_line(tmp_path):
    (tmp_path / "notes.h5").write_text("notes")
    result = invoke("show", str(tmp_path / "notes.h5"))
    assert result.exit_code == 1
    assert (
        result.output.strip() == f"Error: {tmp_path / 'notes.h5'} is not a vggfeat file (not HDF5)"
    )


def test_progress_without_a_terminal_says_the_time_left_once_it_is_measured(capsys, monkeypatch):
    from vggfeat.pipeline import Progress
    from vggfeat.terminal import ProgressView

    monkeypatch.setattr(ProgressView, "PLAIN_EVERY", 0.0)  # a line per update

    with ProgressView(quiet=False) as view:
        view.update(Progress(done=0, failed=0, total=1000, elapsed=0.0, already=256))
        # The first results after a minute of start-up (Ray's actors building their
        # networks), then too little time to measure a rate over: no time left is said.
        view.update(Progress(done=8, failed=0, total=1000, elapsed=60.0))
        view.update(Progress(done=12, failed=0, total=1000, elapsed=61.0))
        view.update(Progress(done=108, failed=2, total=1000, elapsed=80.0))
        view.update(Progress(done=1000, failed=2, total=1000, elapsed=258.4))
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "256 images already done; 1,000 to do.",
        "8/1,000 images, 0.1 images/s, 0 failed",  # not "2 h 04 min left"
        "12/1,000 images, 0.2 images/s, 0 failed",
        "108/1,000 images, 5.0 images/s, 2 failed, 3 min left",  # 892 images at 5 a second
        "1,000/1,000 images, 5.0 images/s, 2 failed",
    ]


def test_extract_carries_on_when_the_reader_of_its_messages_goes_away(tmp_path):
    import h5py
    from PIL import Image

    (tmp_path / "photos").mkdir()
    for index in range(3):
        Image.new("RGB", (40, 30), (index * 60, 90, 200)).save(tmp_path / "photos" / f"{index}.png")
    reader, writer = os.pipe()
    os.close(reader)  # as '2>&1 | head -1' once head has gone
    try:
        result = subprocess.run(
            [sys.executable, "-m", "vggfeat", "extract", str(tmp_path / "photos"), "-o",
             str(tmp_path / "f.h5"), "--layer", "conv1_1", "--pool", "avg", "--image-size",
             "32", "--weights", "random", "--backend", "jax"],
            stdout=subprocess.DEVNULL,
            stderr=writer,
        )  # fmt: skip
    finally:
        os.close(writer)
    assert result.returncode == 0
    with h5py.File(tmp_path / "f.h5") as file:
        assert file["committed"][0] == 3
