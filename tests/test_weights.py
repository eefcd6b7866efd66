"""Weight loading against ``keras.applications`` models, in both file layouts."""

from __future__ import annotations

import dataclasses
import hashlib

import h5py
import keras
import numpy as np
import pytest

from tests.conftest import reference_model, save_keras3, save_legacy
from vggfeat import weights as weights_module
from vggfeat.architecture import vgg
from vggfeat.errors import WeightsMismatchError, WeightsUnavailableError
from vggfeat.weights import PUBLISHED, build_with_weights, keras_cache_dir

LAYOUTS = ["legacy", "keras3"]


def _cut(depth: int, layer: str, image_size: int, weights, seed: int = 0):
    architecture = vgg(depth)
    return build_with_weights(architecture, image_size, architecture.layer(layer), weights, seed)


def _reference_output(depth: int, include_top: bool, image_size: int, layer: str, batch):
    reference = reference_model(depth, include_top, image_size)
    return keras.Model(reference.input, reference.get_layer(layer).output)(batch)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("depth", [16, 19])
def test_conv_weights_load_exactly(weight_files, layout, depth):
    batch = np.random.default_rng(0).uniform(0, 255, (2, 48, 48, 3)).astype("float32")
    path = weight_files(depth, False, layout)
    model, record = _cut(depth, "pool5", 48, path)
    expected = _reference_output(depth, False, 48, "block5_pool", batch)
    np.testing.assert_array_equal(model(batch), expected)
    assert record.kind == "file" and record.file == path.name
    assert record.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_full_weights_load_exactly_through_fc7(weight_files, layout):
    batch = np.random.default_rng(1).uniform(0, 255, (2, 224, 224, 3)).astype("float32")
    model, _ = _cut(16, "fc7", 224, weight_files(16, True, layout))
    np.testing.assert_allclose(
        model(batch), _reference_output(16, True, 224, "fc2", batch), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_file_of_another_depth_names_the_first_misfit(weight_files, layout):
    with pytest.raises(WeightsMismatchError) as error:
        _cut(16, "pool5", 32, weight_files(19, False, layout))
    message = str(error.value)
    assert "block4_conv1" in message and "VGG19" in message
    assert "(3, 3, 256, 512)" in message and "(3, 3, 256, 256)" in message

    with pytest.raises(
        WeightsMismatchError, match=r"block3_conv4.*\(3, 3, 256, 256\).*\(3, 3, 256, 512\)"
    ):
        _cut(19, "pool5", 32, weight_files(16, False, layout))


def test_file_of_another_depth_is_refused_even_when_the_cut_fits(weight_files):
    # VGG19's first eight convolutions have VGG16's shapes, but not its training.
    with pytest.raises(WeightsMismatchError, match=r"not for VGG16.*16 conv layers, as VGG19"):
        _cut(16, "conv3_1", 32, weight_files(19, False))


def test_no_top_file_serves_conv_cuts_only(weight_files):
    with pytest.raises(WeightsMismatchError, match=r"no weights for fc1 \(fc6\).*no-top"):
        _cut(16, "fc7", 224, weight_files(16, False))


def test_legacy_file_missing_a_layer_is_refused(weight_files, tmp_path):
    partial = tmp_path / "partial.h5"
    partial.write_bytes(weight_files(16, False).read_bytes())
    with h5py.File(partial, "a") as file:
        names = [n for n in file.attrs["layer_names"] if n not in (b"block3_conv2", "block3_conv2")]
        file.attrs["layer_names"] = names
        del file["block3_conv2"]
    with pytest.raises(WeightsMismatchError, match="block3_conv2"):
        _cut(16, "pool5", 32, partial)


def test_keras3_file_missing_a_bias_is_refused(weight_files, tmp_path):
    partial = tmp_path / "partial.weights.h5"
    partial.write_bytes(weight_files(16, False, "keras3").read_bytes())
    with h5py.File(partial, "a") as file:
        del file["layers/conv2d_4/vars/1"]
    with pytest.raises(
        WeightsMismatchError, match=r"block3_conv1 .*layers/conv2d_4 has \(3, 3, 128, 256\)$"
    ):
        _cut(16, "pool5", 32, partial)


def test_files_that_are_not_weights(tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    with pytest.raises(WeightsMismatchError, match="neither a Keras weights file"):
        _cut(16, "pool1", 32, text)
    empty = tmp_path / "empty.h5"
    h5py.File(empty, "w").close()
    with pytest.raises(WeightsMismatchError, match="neither Keras weights layout"):
        _cut(16, "pool1", 32, empty)
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        _cut(16, "pool1", 32, tmp_path / "missing.h5")


def test_random_weights_are_seeded_and_independent_of_the_cut():
    first, record = _cut(16, "pool5", 32, "random", seed=3)
    again, _ = _cut(16, "conv3_1", 32, "random", seed=3)
    other, _ = _cut(16, "pool5", 32, "random", seed=4)
    kernel = first.get_layer("block2_conv1").get_weights()[0]
    np.testing.assert_array_equal(kernel, again.get_layer("block2_conv1").get_weights()[0])
    assert not np.array_equal(kernel, other.get_layer("block2_conv1").get_weights()[0])
    assert (record.kind, record.seed) == ("random", 3)


def test_cache_folder_follows_keras(monkeypatch, tmp_path):
    from keras.src.backend import config

    assert keras_cache_dir() == type(keras_cache_dir())(config.keras_home())
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert keras_cache_dir() == tmp_path


def test_imagenet_offline_without_cache_says_what_to_do(keras_home):
    with pytest.raises(WeightsUnavailableError) as error:
        _cut(16, "pool5", 32, "imagenet")
    message = str(error.value)
    assert "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
    assert str(keras_home / "models") in message
    assert "--weights PATH" in message and "--weights random" in message


def test_a_download_is_reported_on_stderr_never_stdout(keras_home, capsys):
    with pytest.raises(WeightsUnavailableError):
        _cut(16, "pool5", 32, "imagenet")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "Downloading data from" in captured.err


def test_imagenet_top_file_is_asked_for_classifier_cuts(keras_home):
    with pytest.raises(WeightsUnavailableError, match=r"kernels\.h5 \(about 528 MB"):
        _cut(16, "fc7", 224, "imagenet")


def test_imagenet_file_in_the_cache_is_used_offline(keras_home, weight_files, monkeypatch):
    published = PUBLISHED[16, False]
    cached = keras_home / "models" / published.fname
    cached.parent.mkdir(parents=True)
    cached.write_bytes(weight_files(16, False).read_bytes())
    # The stand-in file has its own hash; Keras's get_file checks the cache against it.
    digest = hashlib.md5(cached.read_bytes()).hexdigest()
    monkeypatch.setitem(PUBLISHED, (16, False), dataclasses.replace(published, md5=digest))

    batch = np.random.default_rng(2).uniform(0, 255, (1, 32, 32, 3)).astype("float32")
    model, record = _cut(16, "pool5", 32, "imagenet")
    np.testing.assert_array_equal(
        model(batch), _reference_output(16, False, 32, "block5_pool", batch)
    )
    assert (record.kind, record.file) == ("imagenet", published.fname)


def test_vgg11_has_no_imagenet_weights(keras_home):
    with pytest.raises(WeightsUnavailableError, match="no ImageNet weights for VGG11"):
        _cut(11, "pool5", 32, "imagenet")


def test_vgg11_loads_its_own_file(tmp_path):
    architecture = vgg(11)
    source = architecture.build(32, architecture.layer("pool5"), seed=9)
    path = save_legacy(source, tmp_path / "vgg11.h5")
    model, _ = _cut(11, "pool5", 32, path)
    batch = np.ones((1, 32, 32, 3), "float32")
    np.testing.assert_array_equal(model(batch), source(batch))
    keras3 = save_keras3(source, tmp_path / "vgg11.weights.h5")
    np.testing.assert_array_equal(_cut(11, "pool5", 32, keras3)[0](batch), source(batch))


def test_published_hashes_are_keras_own():
    import inspect

    from keras.src.applications import vgg16, vgg19

    source = inspect.getsource(vgg16) + inspect.getsource(vgg19)
    for published in PUBLISHED.values():
        assert published.md5 in source
        assert published.url in (
            vgg16.WEIGHTS_PATH,
            vgg16.WEIGHTS_PATH_NO_TOP,
            vgg19.WEIGHTS_PATH,
            vgg19.WEIGHTS_PATH_NO_TOP,
        )
    assert weights_module.published_files(vgg(13)) == []
