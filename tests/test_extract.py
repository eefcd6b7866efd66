"""``vggfeat extract`` end to end, against Keras's own VGG16 and ``preprocess_input``."""

from __future__ import annotations

import os

import h5py
import keras
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import vggfeat
from tests.conftest import reference_model, stored_paths
from vggfeat import network as network_module
from vggfeat.cli import ExitCode, cli
from vggfeat.pipeline import Interrupted, Progress, extract

#: A cut that is quick on tiny images.
TINY = ["--layer", "pool1", "--image-size", "32", "--weights", "random"]


def invoke(*args: str, input: str | None = None):
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


def make_images(folder, count: int, size: int = 32, seed: int = 0) -> list[str]:
    """``count`` lossless images of random pixels; their paths in discovery order."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        path = folder / f"img{index:03d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return paths


def pixels_of(paths) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])


def keras_features(depth: int, include_top: bool, size: int, layer: str, pixels, pool=None):
    """Keras's own model and ``preprocess_input`` on float32 pixels: the reference."""
    model = reference_model(depth, include_top, size)
    cut = keras.Model(model.input, model.get_layer(layer).output)
    preprocess = {16: keras.applications.vgg16, 19: keras.applications.vgg19}[depth]
    features = np.asarray(cut(preprocess.preprocess_input(pixels.astype("float32"))))
    if pool:
        features = getattr(np, pool)(features, axis=(1, 2))
    return features


def test_fc7_and_pool5_equal_keras_vgg16(tmp_path, weight_files):
    paths = make_images(tmp_path / "photos", 3, size=224)
    weights = str(weight_files(16, True))
    output = tmp_path / "features.h5"
    result = invoke(
        "extract",
        str(tmp_path / "photos"),
        "-o",
        str(output),
        "--layer",
        "fc7",
        "--layer",
        "pool5",
        "--weights",
        weights,
        "--batch-size",
        "2",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    loaded_paths, features = vggfeat.load(output)
    assert loaded_paths == stored_paths(paths, output)
    pixels = pixels_of(paths)
    for name, layer in (("fc7", "fc2"), ("pool5", "block5_pool")):
        expected = keras_features(16, True, 224, layer, pixels)
        np.testing.assert_allclose(
            features[name], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max()
        )


def test_rows_align_with_paths_across_batches_and_a_padded_last_batch(tmp_path, weight_files):
    paths = make_images(tmp_path / "photos", 7)
    output = tmp_path / "f.h5"
    summary = extract(
        [tmp_path / "photos"],
        output,
        layers=["pool1"],
        pool="avg",
        image_size=32,
        batch_size=3,
        weights=weight_files(16),
        workers=3,
    )
    assert (summary.computed, summary.stored, summary.rows, summary.failures) == (7, 7, 7, ())
    loaded = vggfeat.load(output)
    assert loaded.paths == stored_paths(paths, output)
    expected = keras_features(16, False, 32, "block1_pool", pixels_of(paths), pool="mean")
    np.testing.assert_allclose(loaded.features["pool1"], expected, rtol=1e-5, atol=1e-4)


def test_several_layers_in_one_pass_and_pooling_shapes(tmp_path, weight_files):
    make_images(tmp_path / "photos", 2, size=40)
    weights = weight_files(16)
    common = {"image_size": 40, "weights": weights}
    extract(
        [tmp_path / "photos"],
        tmp_path / "both.h5",
        layers=["conv2_1", "block1_pool"],
        pool="none",
        **common,
    )
    extract([tmp_path / "photos"], tmp_path / "max.h5", layers=["conv2_1"], pool="max", **common)
    extract([tmp_path / "photos"], tmp_path / "one.h5", layers=["block1_pool"], **common)
    both = vggfeat.load(tmp_path / "both.h5").features
    assert both["conv2_1"].shape == (2, 20, 20, 128)
    assert both["pool1"].shape == (2, 20, 20, 64)  # the Keras name stored as the layer's own
    np.testing.assert_array_equal(
        both["pool1"], vggfeat.load(tmp_path / "one.h5").features["pool1"]
    )
    np.testing.assert_allclose(
        vggfeat.load(tmp_path / "max.h5").features["conv2_1"],
        both["conv2_1"].max(axis=(1, 2)),
        rtol=1e-6,
    )


def test_file_attributes_and_dataset_layout(tmp_path):
    make_images(tmp_path / "photos", 2)
    output = tmp_path / "f.h5"
    summary = extract(
        [tmp_path / "photos"],
        output,
        layers=["conv1_2"],
        pool="avg",
        image_size=32,
        weights="random",
        seed=5,
        dtype="float16",
        compression="lzf",  # only h5py reads LZF: written as gzip, and said so
    )
    assert summary.notices == (
        "--compression lzf: only h5py reads it; writing gzip, which every HDF5 reader has "
        "(a file already in lzf is continued in it)",
    )
    with h5py.File(output) as file:
        attrs = dict(file.attrs)
        dataset = file["features/conv1_2"]
        assert dataset.dtype == np.float16 and dataset.compression == "gzip"
        assert dataset.chunks is not None and dataset.maxshape == (None, 64)
        assert dict(dataset.attrs) == {"keras_layer": "block1_conv2", "pooling": "avg"}
        assert file["paths"].asstr()[()].tolist() == ["photos/img000.png", "photos/img001.png"]
        assert len(file["failed/paths"]) == 0 and list(file["committed"]) == [2, 0]
    assert attrs["depth"] == 16 and list(attrs["layers"]) == ["conv1_2"]
    assert (attrs["weights"], attrs["seed"], attrs["pooling"]) == ("random", 5, "avg")
    assert (attrs["image_size"], attrs["resize"], attrs["dtype"]) == (32, "squash", "float16")
    assert attrs["precision"] == attrs["compute_dtype"] == "float32"
    assert attrs["format_version"] == 3
    assert "103.939" in attrs["preprocessing"]
    assert attrs["keras_version"] == keras.__version__
    assert attrs["vggfeat_version"] == vggfeat.__version__
    for key in ("tensorflow_version", "created", "command", "weights_file", "weights_sha256"):
        assert key in attrs


def test_failures_are_recorded_and_strict_exits_3(tmp_path):
    paths = make_images(tmp_path / "photos", 2)
    (tmp_path / "photos" / "broken.jpg").write_text("not an image")
    args = ["extract", str(tmp_path / "photos"), "-o", str(tmp_path / "f.h5"), *TINY]
    result = invoke(*args)
    assert result.exit_code == 0
    assert "2 new rows, 2 rows in all" in result.output
    assert "2 images computed, 1 failed, 0 already done" in result.output
    assert "broken.jpg: not an image" in result.output
    loaded = vggfeat.load(tmp_path / "f.h5")
    assert loaded.paths == stored_paths(paths, tmp_path / "f.h5")
    assert list(loaded.failed) == ["photos/broken.jpg"]
    result = invoke(*args, "--strict", "--overwrite")
    assert result.exit_code == ExitCode.SOME_FAILED


def test_every_decoding_case_lands_in_rows_or_failures(tmp_path):
    photos = tmp_path / "photos"
    make_images(photos, 1)
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(photos / "cmyk.jpg")
    Image.new("RGB", (40, 40)).save(photos / "png named.jpg", format="PNG")
    Image.new("RGBA", (40, 40), (1, 2, 3, 0)).save(photos / "ünïcödé 猫.png")
    (photos / "zero.jpg").write_bytes(b"")
    os.mkfifo(photos / "pipe.jpg")
    os.symlink(photos, photos / "loop")
    summary = extract(
        [photos], tmp_path / "f.h5", layers=["pool1"], image_size=32, weights="random"
    )
    loaded = vggfeat.load(tmp_path / "f.h5")
    names = [os.path.basename(p) for p in loaded.paths]
    assert names == ["cmyk.jpg", "img000.png", "png named.jpg", "ünïcödé 猫.png"]
    assert {os.path.basename(p): r for p, r in loaded.failed.items()} == {
        "pipe.jpg": "not a regular file (a FIFO)",
        "zero.jpg": "empty file",
    }
    assert len(summary.failures) == 2


def test_continuing_skips_what_is_done_and_matches_an_uninterrupted_run(tmp_path):
    paths = make_images(tmp_path / "photos", 7)
    options = {
        "layers": ["pool1"],
        "pool": "max",
        "image_size": 32,
        "weights": "random",
        "batch_size": 2,
    }
    clean = extract([tmp_path / "photos"], tmp_path / "clean.h5", **options)

    def interrupt_after_two_batches(progress: Progress) -> None:
        if progress.done >= 4:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted) as stopped:
        extract(
            [tmp_path / "photos"],
            tmp_path / "f.h5",
            on_progress=interrupt_after_two_batches,
            **options,
        )
    # Completed work waits in the parts folder; the output appears when all is done.
    assert stopped.value.exit_code == 130 and stopped.value.parts == tmp_path / "f.h5.parts"
    assert not (tmp_path / "f.h5").exists()
    resumed = extract([tmp_path / "photos"], tmp_path / "f.h5", **options)
    assert (resumed.computed, resumed.already, resumed.stored, resumed.rows) == (3, 4, 7, 7)
    loaded, reference = vggfeat.load(tmp_path / "f.h5"), vggfeat.load(clean.output)
    assert loaded.paths == reference.paths == stored_paths(paths, tmp_path / "f.h5")
    np.testing.assert_allclose(loaded.features["pool1"], reference.features["pool1"], rtol=1e-5)
    again = extract([tmp_path / "photos"], tmp_path / "f.h5", **options)
    assert (again.computed, again.stored, again.already) == (0, 0, 7)


def test_other_settings_are_refused_unless_overwrite(tmp_path):
    make_images(tmp_path / "photos", 1)
    args = [
        "extract",
        str(tmp_path / "photos"),
        "-o",
        str(tmp_path / "f.h5"),
        "--image-size",
        "32",
        "--weights",
        "random",
        "--quiet",
    ]
    assert invoke(*args, "--layer", "pool1").exit_code == 0
    result = invoke(*args, "--layer", "pool2")
    assert result.exit_code == ExitCode.ERROR
    assert "--layer pool1 in the file, pool2 now" in result.output
    assert "--overwrite" in result.output
    assert invoke(*args, "--layer", "pool2", "--overwrite").exit_code == 0
    assert list(vggfeat.load(tmp_path / "f.h5").features) == ["pool2"]


def test_files_from_stdin(tmp_path):
    paths = make_images(tmp_path / "photos", 3)
    result = invoke(
        "extract",
        "--files-from",
        "-",
        "-o",
        str(tmp_path / "f.h5"),
        *TINY,
        input=f"{paths[2]}\n{paths[0]}\n",
    )
    assert result.exit_code == 0, result.output
    assert vggfeat.load(tmp_path / "f.h5").paths == ["photos/img002.png", "photos/img000.png"]


def test_fc_layers_at_another_size_fail_clearly(tmp_path):
    make_images(tmp_path / "photos", 1)
    result = invoke(
        "extract", str(tmp_path / "photos"), "--image-size", "64", "-o", str(tmp_path / "f.h5")
    )
    assert result.exit_code == ExitCode.USAGE
    assert "fc7 needs 224x224 input" in result.output
    assert not (tmp_path / "f.h5").exists()


@pytest.mark.parametrize("fast_bfloat16", [True, False])
def test_mixed_precision_computes_what_it_records_as_keras_does(
    tmp_path, weight_files, monkeypatch, fast_bfloat16
):
    # Whether the CPU does bfloat16 fast is the machine's; both answers are tried here.
    monkeypatch.setattr(network_module, "cpu_has_fast_bfloat16", lambda: fast_bfloat16)
    paths = make_images(tmp_path / "photos", 2, size=32)
    options = {"layers": ["conv3_1"], "pool": "avg", "image_size": 32}
    extract([tmp_path / "photos"], tmp_path / "mixed.h5", precision="mixed",
            weights=weight_files(16), **options)  # fmt: skip
    loaded = vggfeat.load(tmp_path / "mixed.h5")
    computed_in = loaded.attributes["compute_dtype"]
    assert computed_in == ("bfloat16" if fast_bfloat16 else "float32")
    # Keras's own VGG16 under the dtype policy the file records is the reference.
    policy = "float32" if computed_in == "float32" else f"mixed_{computed_in}"
    pixels = pixels_of(paths).astype("float32")
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        model = keras.applications.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3))
    finally:
        keras.config.set_dtype_policy(previous)
    model.set_weights(reference_model(16, False, 32).get_weights())
    cut = keras.Model(model.input, model.get_layer("block3_conv1").output)
    expected = np.asarray(cut(keras.applications.vgg16.preprocess_input(pixels)), "float32")
    expected = expected.mean(axis=(1, 2))
    got = loaded.features["conv3_1"]
    scale = np.abs(expected).max()
    if computed_in == "float32":
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * scale)
    else:  # bfloat16 keeps 8 bits of mantissa: close to Keras's own bfloat16, not float32's
        np.testing.assert_allclose(got, expected, rtol=1e-2, atol=1e-2 * scale)
        full = keras_features(16, False, 32, "block3_conv1", pixels_of(paths), pool="mean")
        assert not np.allclose(got, full, rtol=1e-4, atol=1e-4 * scale)


def test_an_interrupted_overwrite_keeps_the_old_file_and_continues(tmp_path):
    make_images(tmp_path / "photos", 6)
    options = {"layers": ["pool1"], "image_size": 32, "weights": "random", "batch_size": 2}
    output = tmp_path / "f.h5"
    extract([tmp_path / "photos"], output, pool="avg", **options)

    def interrupt(progress: Progress) -> None:
        if progress.done >= 4:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted):
        extract(
            [tmp_path / "photos"],
            output,
            pool="max",
            overwrite=True,
            on_progress=interrupt,
            **options,
        )
    assert vggfeat.load(output).attributes["pooling"] == "avg"  # replaced only when complete
    again = extract([tmp_path / "photos"], output, pool="max", overwrite=True, **options)
    assert (again.already, again.computed, again.stored, again.rows) == (4, 2, 6, 6)
    assert vggfeat.load(output).attributes["pooling"] == "max"


def test_one_trace_for_every_batch_including_a_short_last_one():
    from vggfeat.architecture import vgg
    from vggfeat.network import Cut, CutNetwork

    architecture = vgg(16)
    cut = Cut("pool1", architecture.layer("pool1"))
    network = CutNetwork(architecture, [cut], 32, weights="random")
    network.set_batch_size(4)
    pixels = np.random.default_rng(0).integers(0, 256, (11, 32, 32, 3), np.uint8)
    whole = network(pixels)[0]  # batches of 4, 4 and a padded 3
    assert network.traces == 1
    one_by_one = np.concatenate([network(pixels[i : i + 1])[0] for i in range(len(pixels))])
    assert network.traces == 1
    np.testing.assert_allclose(whole, one_by_one, rtol=1e-5, atol=1e-5)


def test_an_output_that_is_not_a_vggfeat_file_is_left_alone(tmp_path):
    make_images(tmp_path / "photos", 1)
    (tmp_path / "notes.h5").write_text("my notes")
    h5py.File(tmp_path / "other.h5", "w").close()
    for name in ("notes.h5", "other.h5"):
        result = invoke("extract", str(tmp_path / "photos"), "-o", str(tmp_path / name), *TINY)
        assert result.exit_code == ExitCode.ERROR
        assert f"{tmp_path / name} is not a vggfeat file" in result.output
        assert sorted(os.listdir(tmp_path)) == ["notes.h5", "other.h5", "photos"]
    assert (tmp_path / "notes.h5").read_text() == "my notes"
