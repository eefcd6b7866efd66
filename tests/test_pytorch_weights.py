"""Weights in PyTorch's layouts (torchvision's and timm's safetensors files), with and without
batch norm, against a NumPy forward pass written in PyTorch's own terms.

The reference knows nothing of Keras or of vggfeat: NCHW arrays, cross-correlation with
PyTorch's (out, in, kh, kw) kernels, batch norm in eval mode with eps 1e-5, pool5's map
flattened as (C, H, W) before fc6 (timm's fc1 computed as the 7x7 convolution it is), and
torchvision's preprocessing from ``keras.applications``' own ``preprocess_input``. The
weights are random, saved in each layout with ``safetensors.numpy``; no torch is needed.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from keras.applications import imagenet_utils
from PIL import Image

import vggfeat
from tests.conftest import (
    TORCHVISION_CFGS,
    save_safetensors,
    timm_state,
    torchvision_state,
)
from vggfeat.errors import WeightsMismatchError, WeightsUnavailableError
from vggfeat.images import decode_image
from vggfeat.preprocessing import PREPROCESSINGS

EPSILON = 1e-5
VARIANTS = [(depth, batch_norm) for depth in (11, 13, 16, 19) for batch_norm in (False, True)]


# The reference --------------------------------------------------------------------------


def conv3x3(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """PyTorch's Conv2d(kernel 3, padding 1): cross-correlation, NCHW."""
    n, channels, height, width = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    patches = np.stack(
        [padded[:, :, i : i + height, j : j + width] for i in range(3) for j in range(3)], axis=2
    ).reshape(n, channels * 9, height * width)
    out = np.einsum("ok,nkp->nop", weight.reshape(len(weight), -1).astype(np.float64), patches)
    return out.reshape(n, -1, height, width) + bias[None, :, None, None]


def batch_norm(x: np.ndarray, state: dict, module: str) -> np.ndarray:
    """PyTorch's BatchNorm2d in eval mode."""
    mean, var = state[f"{module}.running_mean"], state[f"{module}.running_var"]
    scale, shift = state[f"{module}.weight"], state[f"{module}.bias"]
    normalised = (x - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + EPSILON)
    return normalised * scale[None, :, None, None] + shift[None, :, None, None]


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """PyTorch's Linear, (out, in) weights, in float64 a slice of rows at a time."""
    rows = [x @ weight[i : i + 512].astype(np.float64).T for i in range(0, len(weight), 512)]
    return np.concatenate(rows, axis=1) + bias


def reference(
    state: dict, depth: int, with_norm: bool, pixels: np.ndarray, mode: str = "torch"
) -> dict[str, np.ndarray]:
    """Every conv unit's (after its ReLU), pool's and fc's output, NHWC for the maps as vggfeat
    stores them, from uint8 RGB pixels (n, h, w, 3)."""
    x = imagenet_utils.preprocess_input(pixels.astype(np.float32), mode=mode)
    x = np.transpose(x, (0, 3, 1, 2)).astype(np.float64)
    outputs, index, block, unit = {}, 0, 1, 1
    for entry in TORCHVISION_CFGS[depth]:
        if entry == "M":
            n, c, h, w = x.shape
            x = x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))
            outputs[f"pool{block}"] = x
            index, block, unit = index + 1, block + 1, 1
            continue
        x = conv3x3(x, state[f"features.{index}.weight"], state[f"features.{index}.bias"])
        if with_norm:
            x = batch_norm(x, state, f"features.{index + 1}")
        x = relu(x)
        outputs[f"conv{block}_{unit}"] = x
        index, unit = index + (3 if with_norm else 2), unit + 1
    if "classifier.0.weight" in state:
        x = relu(linear(x.reshape(len(x), -1), state["classifier.0.weight"],
                        state["classifier.0.bias"]))  # fmt: skip
        outputs["fc6"] = x
        outputs["fc7"] = relu(linear(x, state["classifier.3.weight"], state["classifier.3.bias"]))
        logits = linear(outputs["fc7"], state["classifier.6.weight"], state["classifier.6.bias"])
        outputs["fc8"] = softmax(logits)
    if "pre_logits.fc1.weight" in state:
        kernel = state["pre_logits.fc1.weight"].astype(np.float64)  # (4096, 512, 7, 7)
        x = relu(np.einsum("nchw,ochw->no", x, kernel) + state["pre_logits.fc1.bias"])
        outputs["fc6"] = x
        fc2 = state["pre_logits.fc2.weight"][:, :, 0, 0]
        outputs["fc7"] = relu(linear(x, fc2, state["pre_logits.fc2.bias"]))
        logits = linear(outputs["fc7"], state["head.fc.weight"], state["head.fc.bias"])
        outputs["fc8"] = softmax(logits)
    return {
        name: np.transpose(value, (0, 2, 3, 1)) if value.ndim == 4 else value
        for name, value in outputs.items()
    }


def assert_close(got: np.ndarray, expected: np.ndarray) -> None:
    """Equal to 1e-4 relative to the features' scale."""
    scale = np.abs(expected).max()
    assert scale > 0
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * scale)


# Fixtures -------------------------------------------------------------------------------


def make_photos(folder: Path, count: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        height, width = (int(v) for v in rng.integers(30, 90, 2))
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.png")
    return folder


def pixels_of(folder: Path, size: int) -> np.ndarray:
    """The pixels vggfeat's decoder gives the network (decoding is tested elsewhere)."""
    return np.stack([decode_image(str(path), size).pixels for path in sorted(folder.glob("*.png"))])


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return make_photos(tmp_path_factory.mktemp("photos") / "photos", 2, seed=3)


@pytest.fixture(scope="module")
def feature_files(tmp_path_factory):
    """torchvision-layout files without a classifier, by (depth, batch norm): their state and
    their path."""
    folder = tmp_path_factory.mktemp("pytorch")
    made: dict[tuple[int, bool], tuple[dict, Path]] = {}

    def get(depth: int, with_norm: bool) -> tuple[dict, Path]:
        if (depth, with_norm) not in made:
            state = torchvision_state(depth, with_norm, seed=depth + with_norm)
            name = f"vgg{depth}{'_bn' if with_norm else ''}.safetensors"
            made[depth, with_norm] = state, save_safetensors(state, folder / name)
        return made[depth, with_norm]

    return get


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vggfeat", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


# At conv cuts and pool5, every depth, with and without batch norm ------------------------


@pytest.mark.parametrize(("depth", "with_norm"), VARIANTS)
def test_conv_cut_and_pool5_equal_the_pytorch_reference(
    depth, with_norm, feature_files, photos, tmp_path
):
    state, path = feature_files(depth, with_norm)
    output = tmp_path / "f.h5"
    vggfeat.extract(
        photos, output, depth=depth, batch_norm=with_norm, weights=str(path),
        layers=["conv3_1", "pool5"], image_size=32, batch_size=2,
    )  # fmt: skip
    expected = reference(state, depth, with_norm, pixels_of(photos, 32))
    loaded = vggfeat.load(output)
    for layer in ("conv3_1", "pool5"):
        assert_close(loaded.features[layer], expected[layer])
    settings = json.loads(loaded.attributes["settings"])
    assert (settings["preprocessing"], settings["batch_norm"]) == ("torch", with_norm)
    assert loaded.attributes["preprocessing"].startswith("torch: RGB divided by 255")
    assert (loaded.attributes["weights"], loaded.attributes["weights_layout"]) == (
        "pytorch",
        "torchvision",
    )


# Through fc7 at 224, in both layouts, on both backends -----------------------------------


@pytest.fixture(scope="module")
def full_vgg11(tmp_path_factory):
    """VGG11 with its classifier in torchvision's layout, and with batch norm in timm's."""
    folder = tmp_path_factory.mktemp("full")
    plain = torchvision_state(11, False, classifier=True, seed=21)
    normed = timm_state(torchvision_state(11, True, classifier=True, seed=22))
    return {
        "torchvision": (plain, False, save_safetensors(plain, folder / "vgg11.safetensors")),
        "timm": (normed, True, save_safetensors(normed, folder / "vgg11_bn.safetensors")),
    }


def test_fc7_at_224_equals_the_reference_and_a_wrong_fc6_order_would_not(
    full_vgg11, photos, tmp_path
):
    state, with_norm, path = full_vgg11["torchvision"]
    output = tmp_path / "tf.h5"
    layers = ["pool5", "fc7", "fc8"]  # fc8: 1,000 rows, not a whole number of read slices
    vggfeat.extract(photos, output, depth=11, weights=str(path), layers=layers)
    pixels = pixels_of(photos, 224)
    expected = reference(state, 11, with_norm, pixels)
    got = vggfeat.load(output).features
    for layer in layers:
        assert_close(got[layer], expected[layer])

    # The classic silent bug: fc6's rows taken in Keras's (H, W, C) order unchanged.
    pool5_hwc = expected["pool5"].reshape(len(pixels), -1)
    fc6 = relu(linear(pool5_hwc, state["classifier.0.weight"], state["classifier.0.bias"]))
    wrong = relu(linear(fc6, state["classifier.3.weight"], state["classifier.3.bias"]))
    assert np.abs(wrong - expected["fc7"]).max() > 0.1 * np.abs(expected["fc7"]).max()

    # JAX computes the same from the same file.
    jax_output = tmp_path / "jax.h5"
    done = run_cli(
        "extract", str(photos), "-o", str(jax_output), "--depth", "11", "--weights", str(path),
        "--layer", "pool5", "--layer", "fc7", "--backend", "jax", "--quiet",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    from_jax = vggfeat.load(jax_output)
    assert from_jax.attributes["backend"] == "jax"
    for layer in ("pool5", "fc7"):
        assert_close(from_jax.features[layer], got[layer])


def test_a_timm_file_with_batch_norm_through_fc7(full_vgg11, photos, tmp_path):
    state, with_norm, path = full_vgg11["timm"]
    assert state["pre_logits.fc1.weight"].shape == (4096, 512, 7, 7)
    output = tmp_path / "timm.h5"
    vggfeat.extract(
        photos, output, depth=11, batch_norm=True, weights=str(path),
        layers=["conv5_2", "fc7", "fc8"],
    )  # fmt: skip
    expected = reference(state, 11, with_norm, pixels_of(photos, 224))
    loaded = vggfeat.load(output)
    for layer in ("conv5_2", "fc7", "fc8"):
        assert_close(loaded.features[layer], expected[layer])
    assert loaded.attributes["weights_layout"] == "timm"


# Preprocessing ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["caffe", "torch"])
def test_each_preprocessing_is_keras_own(name):
    pixels = np.random.default_rng(4).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    expected = imagenet_utils.preprocess_input(pixels.astype(np.float32), mode=name)
    got = np.asarray(PREPROCESSINGS[name](pixels))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-5)


def test_preprocessing_can_be_chosen_is_recorded_and_a_continuation_must_match(
    feature_files, photos, tmp_path
):
    state, path = feature_files(11, False)
    output = tmp_path / "caffe.h5"
    common = ["--depth", "11", "--weights", str(path), "--layer", "conv2_1", "--image-size", "32"]
    done = run_cli("extract", str(photos), "-o", str(output), *common, "--quiet",
                   "--preprocessing", "caffe")  # fmt: skip
    assert done.returncode == 0, done.stderr
    expected = reference(state, 11, False, pixels_of(photos, 32), mode="caffe")
    assert_close(vggfeat.load(output).features["conv2_1"], expected["conv2_1"])

    shown = run_cli("show", str(output))
    assert "  preprocessing: caffe: RGB to BGR, minus the ImageNet mean" in shown.stdout
    assert "  weights_layout: torchvision" in shown.stdout

    more = make_photos(photos.parent / "more", 1, seed=9)
    refused = run_cli("extract", str(more), "-o", str(output), *common)
    assert refused.returncode == 1
    assert "--preprocessing caffe in the file, torch now" in refused.stderr


# Mix-ups and refusals ---------------------------------------------------------------------


def test_batch_norm_against_no_batch_norm_is_refused_before_any_work(
    feature_files, photos, tmp_path
):
    _, normed = feature_files(11, True)
    _, plain = feature_files(11, False)
    common = ["--depth", "11", "--layer", "pool1", "--image-size", "32"]
    done = run_cli("extract", str(photos), "-o", str(tmp_path / "a.h5"), *common,
                   "--weights", str(normed))  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip().endswith("(a vgg11_bn file); add --batch-norm")
    assert done.stderr.count("\n") == 1
    done = run_cli("extract", str(photos), "-o", str(tmp_path / "b.h5"), *common,
                   "--weights", str(plain), "--batch-norm")  # fmt: skip
    assert done.returncode == 1
    assert "has no batch norm after its convolutions (a plain vgg11 file); leave out" in done.stderr
    assert not (tmp_path / "a.h5").exists() and not (tmp_path / "b.h5.parts").exists()


def _cut(path: Path | str, depth: int = 11, with_norm: bool = False, layer: str = "pool5"):
    from vggfeat.architecture import vgg
    from vggfeat.weights import build_with_weights

    architecture = vgg(depth, with_norm)
    return build_with_weights(architecture, 32, architecture.layer(layer), str(path))


def test_keras_imagenet_has_no_batch_norm_weights_and_says_where_to_get_them():
    with pytest.raises(WeightsUnavailableError, match="use --weights timm"):
        _cut("imagenet", depth=16, with_norm=True)


def test_a_file_that_does_not_fit_names_the_first_mismatch(feature_files, tmp_path):
    state, path = feature_files(13, False)
    with pytest.raises(WeightsMismatchError) as error:
        _cut(path, depth=11)
    assert "at block2_conv1 (conv2_1)" in str(error.value)  # VGG13 has conv1_2 there
    assert "expects (128, 64, 3, 3), (128,), the file's features.2 has (64, 64, 3, 3)" in str(
        error.value
    )  # in the file's own terms, (out, in, kh, kw)
    assert "as VGG13 does (--depth 13)" in str(error.value)

    missing = dict(state)
    del missing["features.5.bias"]
    with pytest.raises(WeightsMismatchError, match=r"features\.5\.weight but no features\.5\.bias"):
        _cut(save_safetensors(missing, tmp_path / "missing.safetensors"), depth=13)

    reshaped = dict(state)
    reshaped["features.0.weight"] = np.zeros((64, 3, 5, 5), np.float32)
    with pytest.raises(
        WeightsMismatchError,
        match=r"at block1_conv1 \(conv1_1\): the network expects \(64, 3, 3, 3\), \(64,\), "
        r"the file's features\.0 has \(64, 3, 5, 5\), \(64,\)",
    ):
        _cut(save_safetensors(reshaped, tmp_path / "reshaped.safetensors"), depth=13)

    with pytest.raises(WeightsMismatchError, match=r"no weights for fc1 \(fc6\)"):
        _cut(path, depth=13, layer="fc7")


def test_a_pytorch_pickle_is_refused_never_unpickled(photos, tmp_path):
    marker = tmp_path / "unpickled"

    class Opens:  # unpickling this creates the marker
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for name, content in (
        ("vgg16-397923af.pth", pickle.dumps(Opens(), protocol=4)),
        ("model.bin", b"PK\x03\x04" + bytes(60)),
        ("odd-name.weights", pickle.dumps(Opens(), protocol=2)),
    ):
        path = tmp_path / name
        path.write_bytes(content)
        done = run_cli("extract", str(photos), "-o", str(tmp_path / "f.h5"), "--weights",
                       str(path), "--layer", "pool1", "--image-size", "32")  # fmt: skip
        assert done.returncode == 1, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 3
        assert lines[0].startswith(f"Error: weights file {path} is a PyTorch pickle")
        assert lines[1] == "import torch, safetensors.torch"
        target = path.with_suffix(".safetensors")
        assert lines[2] == (
            f"safetensors.torch.save_file(torch.load({str(path)!r}, weights_only=True), "
            f"{str(target)!r})"
        )
    assert not marker.exists()


def test_tensors_numpy_cannot_read_are_refused_by_name(tmp_path):
    header = json.dumps({
        "features.0.weight": {"dtype": "BF16", "shape": [64, 3, 3, 3], "data_offsets": [0, 3456]},
        "features.0.bias": {"dtype": "F32", "shape": [64], "data_offsets": [3456, 3712]},
    }).encode()  # fmt: skip
    path = tmp_path / "bf16.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(3712))
    with pytest.raises(WeightsMismatchError, match=r"holds features\.0\.weight as BF16.*float32"):
        _cut(path)


def test_a_safetensors_file_of_another_network_is_refused(tmp_path):
    path = save_safetensors({"conv1.weight": np.zeros((64, 3, 7, 7), np.float32)},
                            tmp_path / "resnet.safetensors")  # fmt: skip
    with pytest.raises(WeightsMismatchError, match="not a VGG in torchvision's or timm's layout"):
        _cut(path)


def test_timm_weights_offline_say_what_to_do_and_a_file_put_there_is_used(
    keras_home, feature_files, photos, tmp_path
):
    with pytest.raises(WeightsUnavailableError) as error:
        _cut("timm", with_norm=True)
    message = str(error.value)
    assert (
        f"timm_vgg11_bn.tv_in1k.safetensors (about 531 MB) is not in {keras_home / 'models'}"
        in message
    )
    assert "/timm/vgg11_bn.tv_in1k/resolve/main/model.safetensors" in message
    assert "--weights PATH" in message

    state, path = feature_files(11, True)
    cached = keras_home / "models" / "timm_vgg11_bn.tv_in1k.safetensors"
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(path.read_bytes())
    output = tmp_path / "f.h5"
    vggfeat.extract(photos, output, depth=11, batch_norm=True, weights="timm",
                    layers=["pool5"], image_size=32)  # fmt: skip
    loaded = vggfeat.load(output)
    assert_close(
        loaded.features["pool5"], reference(state, 11, True, pixels_of(photos, 32))["pool5"]
    )
    assert (loaded.attributes["weights"], loaded.attributes["weights_file"]) == (
        "timm",
        cached.name,
    )
    assert loaded.attributes["weights_layout"] == "torchvision"  # read from the keys
    assert loaded.attributes["preprocessing"].startswith("torch:")


# Keras's layouts with batch norm -----------------------------------------------------------


@pytest.mark.parametrize("layout", ["legacy", "keras3"])
def test_a_batch_norm_network_saved_by_keras_loads_back(layout, tmp_path):
    from tests.conftest import save_keras3, save_legacy
    from vggfeat.architecture import vgg

    architecture = vgg(11, True)
    model = architecture.build(32, architecture.layer("pool5"), seed=5)
    rng = np.random.default_rng(5)
    for layer in model.layers:
        if layer.name.endswith("_bn"):
            layer.set_weights([rng.uniform(0.5, 1.5, v.shape) for v in layer.get_weights()])
    save = save_legacy if layout == "legacy" else save_keras3
    path = save(model, tmp_path / ("vgg11_bn.h5" if layout == "legacy" else "m.weights.h5"))
    loaded, record = _cut(path, with_norm=True)
    batch = np.random.default_rng(6).uniform(-50, 50, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_array_equal(loaded(batch), model(batch))
    assert (record.kind, record.layout, record.preprocessing) == ("file", "keras", "caffe")


# Finding the weights ------------------------------------------------------------------------


def test_info_shows_batch_norm_layers_and_names_the_published_files():
    done = run_cli("info", "--depth", "16", "--batch-norm", "--json")
    facts = json.loads(done.stdout)
    # torchvision's published count for vgg16_bn (its meta's num_params, which are
    # parameters), plus the running mean and variance of each of its 4,224 channels.
    assert facts["total_params"] == 138_365_992 + 2 * 4_224
    norms = [layer for layer in facts["layers"] if layer["kind"] == "norm"]
    assert len(norms) == 13 and norms[0]["alias"] == "bn1_1"
    assert "bn1_1" not in facts["cut_points"] and "conv1_1" in facts["cut_points"]
    assert facts["imagenet_weights"] == []
    sources = {entry["source"]: entry for entry in facts["pytorch_weights"]}
    assert sources["timm"]["name"] == "timm/vgg16_bn.tv_in1k"
    assert sources["timm"]["url"].endswith("/timm/vgg16_bn.tv_in1k/resolve/main/model.safetensors")
    assert sources["torchvision"]["file"] == "vgg16_bn-6c64b313.pth"

    text = run_cli("info", "--depth", "11").stdout
    assert "timm: timm/vgg11.tv_in1k, model.safetensors" in text
    assert "torchvision: vgg11, vgg11-8a719046.pth" in text
    assert "Keras publishes none for VGG11" in text


# What a new user's trial found ----------------------------------------------------------------


def test_the_output_is_never_the_weights_file(feature_files, photos, tmp_path):
    _, path = feature_files(11, False)
    victim = tmp_path / "victim.h5"
    victim.write_bytes(path.read_bytes())
    linked = tmp_path / "link.h5"
    linked.symlink_to(victim)
    expected = {
        victim: f"Error: -o {victim} is the weights file (--weights {victim}); name another output",
        linked: f"Error: -o {linked} is the weights file (--weights {victim}); name another output",
        tmp_path / "out.safetensors": "extract writes HDF5 only",
        tmp_path / "out.pth": "extract writes HDF5 only",
    }
    for output, message in expected.items():
        done = run_cli(
            "extract", str(photos), "--weights", str(victim), "-o", str(output), "--depth",
            "11", "--layer", "pool1", "--image-size", "32", "--overwrite",
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert message in done.stderr
    assert victim.read_bytes() == path.read_bytes()


def test_a_missing_or_odd_tensor_is_named(feature_files, tmp_path):
    state, _ = feature_files(11, True)
    no_weight = {k: v for k, v in state.items() if k != "features.8.weight"}
    with pytest.raises(WeightsMismatchError, match=r"features\.8\.bias but no features\.8\.weight"):
        _cut(save_safetensors(no_weight, tmp_path / "a.safetensors"), with_norm=True)
    no_stats = {k: v for k, v in state.items() if not k.startswith("features.5.running")}
    with pytest.raises(WeightsMismatchError, match=r"but no features\.5\.running_mean"):
        _cut(save_safetensors(no_stats, tmp_path / "b.safetensors"), with_norm=True)


def test_mix_ups_are_told_with_the_network_the_file_is_for(feature_files, tmp_path):
    _, normed = feature_files(11, True)
    with pytest.raises(
        WeightsMismatchError, match=r"\(a vgg11_bn file\); add --batch-norm and --depth 11"
    ):
        _cut(normed, depth=16)
    fc6_only = dict(feature_files(11, False)[0])
    fc6_only["classifier.0.weight"] = np.zeros((4096, 25088), np.float16)
    fc6_only["classifier.0.bias"] = np.zeros(4096, np.float16)
    path = save_safetensors(fc6_only, tmp_path / "fc6.safetensors")
    from vggfeat.architecture import vgg
    from vggfeat.weights import check_fits

    architecture = vgg(11)
    check_fits(architecture, 224, architecture.layer("fc6"), path)
    with pytest.raises(
        WeightsMismatchError, match=r"no weights for fc2 \(fc7\); the file's classifier ends at fc6"
    ):
        check_fits(architecture, 224, architecture.layer("fc7"), path)
    with pytest.raises(
        Exception, match="bn1_1 is a batch norm, not a cut point: conv1_1 is taken after it"
    ):
        vgg(11, True).layer("bn1_1")


def test_what_is_not_a_weights_file_is_said_as_it_is(feature_files, tmp_path):
    with pytest.raises(WeightsUnavailableError, match=r"weights file .* is a folder"):
        _cut(tmp_path)
    with pytest.raises(WeightsUnavailableError, match="--weights names nothing"):
        _cut("")
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(WeightsMismatchError, match="is neither a Keras weights file"):
        _cut(text)
    _, path = feature_files(11, False)
    cut_short = tmp_path / "short.safetensors"
    cut_short.write_bytes(path.read_bytes()[:100])
    with pytest.raises(WeightsMismatchError, match="is damaged or incomplete"):
        _cut(cut_short)
    from vggfeat.options import ExtractOptions

    assert ExtractOptions(["x"], weights="TIMM", depth=11).weights == "timm"


def test_a_file_is_known_by_its_contents_not_its_name(feature_files, photos, tmp_path):
    _, path = feature_files(11, False)
    copy = tmp_path / "renamed.safetensors"
    copy.write_bytes(path.read_bytes())
    output = tmp_path / "f.h5"
    options = {"depth": 11, "layers": ["pool1"], "image_size": 32}
    vggfeat.extract(photos, output, weights=str(path), **options)
    more = make_photos(tmp_path / "more", 1, seed=11)
    vggfeat.extract([photos, more], output, weights=str(copy), **options)
    assert vggfeat.load(output).features["pool1"].shape[0] == 3
    newer = make_photos(tmp_path / "newer", 1, seed=14)
    with pytest.raises(vggfeat.VggfeatError) as error:
        vggfeat.extract([newer], output, weights="random", **options)
    assert f"--weights {path.name} in the file, random now" in str(error.value)


def test_a_download_is_one_notice_and_quiet_means_quiet(keras_home, photos, tmp_path):
    common = ["extract", str(photos), "-o", str(tmp_path / "f.h5"), "--depth", "13",
              "--weights", "timm", "--layer", "pool1", "--image-size", "32"]  # fmt: skip
    env = {"KERAS_HOME": str(keras_home)}
    # The subprocess cannot see the fixture's stand-in server: it uses a proxy that refuses.
    env |= {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    loud = run_cli(*common, env=env)
    assert loud.returncode == 1
    lines = loud.stderr.strip().splitlines()
    assert lines[0].startswith("Note: downloading timm's timm/vgg13.tv_in1k file")
    assert lines[-1].startswith("Error: timm's timm/vgg13.tv_in1k file timm_vgg13.tv_in1k")
    assert "Downloading data from" not in loud.stderr
    quiet = run_cli(*common, "-q", env=env)
    assert quiet.returncode == 1
    assert quiet.stderr.count("\n") == 1 and quiet.stderr.startswith("Error: ")


def test_a_wrong_cached_timm_file_says_how_to_get_the_right_one(keras_home, feature_files):
    _, path = feature_files(16, False)
    cached = keras_home / "models" / "timm_vgg11.tv_in1k.safetensors"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(path.read_bytes())
    with pytest.raises(WeightsMismatchError) as error:
        _cut("timm")
    message = str(error.value)
    assert message.startswith(f"the cached file {cached} is not timm's timm/vgg11.tv_in1k (")
    assert message.endswith("delete it and vggfeat downloads it again, or put timm's "
                            "model.safetensors for VGG11 there")  # fmt: skip


def test_weights_holding_nan_are_refused_by_layer(feature_files, photos, tmp_path):
    state = dict(feature_files(11, False)[0])
    state["features.3.weight"] = state["features.3.weight"].copy()
    state["features.3.weight"][0, 0, 0, 0] = np.nan
    path = save_safetensors(state, tmp_path / "nan.safetensors")
    with pytest.raises(WeightsMismatchError, match=r"holds NaN or infinite values in features\.3"):
        vggfeat.extract(photos, tmp_path / "f.h5", depth=11, weights=str(path),
                        layers=["pool5"], image_size=32)  # fmt: skip
    assert not (tmp_path / "f.h5").exists()


def test_files_in_neither_layout_and_pickles_named_otherwise(feature_files, tmp_path):
    state = dict(feature_files(11, False)[0])
    state["classifier.6.bias"] = np.zeros(10, np.float32)
    state["head.fc.weight"] = np.zeros((10, 4096), np.float32)
    with pytest.raises(WeightsMismatchError, match="holds both torchvision's classifier"):
        _cut(save_safetensors(state, tmp_path / "mixed.safetensors"))
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"PK\x03\x04" + bytes(60))
    with pytest.raises(WeightsMismatchError) as error:
        _cut(fake)
    assert str(error.value).endswith(f"{str(tmp_path / 'fake.converted.safetensors')!r})")


def test_timm_weights_are_pinned_by_their_contents(keras_home, feature_files, photos, tmp_path):
    _, first = feature_files(11, False)
    cached = keras_home / "models" / "timm_vgg11.tv_in1k.safetensors"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(first.read_bytes())
    output = tmp_path / "f.h5"
    options = {"depth": 11, "layers": ["pool1"], "image_size": 32}
    vggfeat.extract(photos, output, weights="timm", **options)
    more = make_photos(tmp_path / "more", 1, seed=12)
    # The same bytes by their path continue the file: the contents are the weights.
    vggfeat.extract([photos, more], output, weights=str(first), **options)
    assert len(vggfeat.load(output).paths) == 3
    # Other numbers in the cache's place are other weights.
    state = dict(feature_files(11, False)[0])
    state["features.0.bias"] = state["features.0.bias"] + 1
    save_safetensors(state, cached)
    newer = make_photos(tmp_path / "newer", 1, seed=13)
    with pytest.raises(vggfeat.VggfeatError, match="the weights file's contents, SHA-256"):
        vggfeat.extract([photos, more, newer], output, weights="timm", **options)


def test_published_weights_are_fetched_on_the_runs_backend(
    keras_home, feature_files, photos, tmp_path
):
    # The download step starts Keras before the network does: on the run's backend, or the
    # network could not start on JAX in the same process.
    _, path = feature_files(11, False)
    cached = keras_home / "models" / "timm_vgg11.tv_in1k.safetensors"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(path.read_bytes())
    output = tmp_path / "jax.h5"
    done = run_cli(
        "extract", str(photos), "-o", str(output), "--depth", "11", "--weights", "timm",
        "--layer", "pool1", "--image-size", "32", "--backend", "jax", "-q",
        env={"KERAS_HOME": str(keras_home)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert vggfeat.load(output).attributes["backend"] == "jax"
