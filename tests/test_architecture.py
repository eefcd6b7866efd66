"""The VGG table against ``keras.applications`` and the paper."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from vggfeat.architecture import DEPTHS, vgg
from vggfeat.errors import ImageSizeError, UnknownLayerError

REFERENCES = {16: keras.applications.VGG16, 19: keras.applications.VGG19}


def _layers(model):
    return [
        (layer.name, tuple(layer.output.shape[1:]), layer.count_params())
        for layer in model.layers
        if not isinstance(layer, keras.layers.InputLayer)
    ]


@pytest.mark.parametrize("depth", [16, 19])
def test_full_model_equals_keras_applications(depth):
    architecture = vgg(depth)
    ours = architecture.build(224, architecture.layer("fc8"))
    reference = REFERENCES[depth](weights=None)
    assert _layers(ours) == _layers(reference)
    assert ours.count_params() == reference.count_params()
    assert ours.get_layer("predictions").activation is keras.activations.softmax


@pytest.mark.parametrize("depth", [16, 19])
def test_catalogue_equals_keras_applications(depth):
    reference = _layers(REFERENCES[depth](weights=None))
    catalogue = vgg(depth).catalogue(224)
    assert [(f.layer.name, f.output_shape, f.params) for f in catalogue.layers] == reference
    assert catalogue.params == {16: 138_357_544, 19: 143_667_240}[depth]


@pytest.mark.parametrize("image_size", [32, 57, 100])
def test_conv_cuts_are_fully_convolutional(image_size):
    reference = keras.applications.VGG16(
        weights=None, include_top=False, input_shape=(image_size, image_size, 3)
    )
    architecture = vgg(16)
    ours = architecture.build(image_size, architecture.layer("pool5"))
    assert _layers(ours) == _layers(reference)
    catalogue = architecture.catalogue(image_size)
    assert [(f.layer.name, f.output_shape, f.params) for f in catalogue.layers] == _layers(
        reference
    )
    batch = np.zeros((1, image_size, image_size, 3), "float32")
    assert ours(batch).shape[1:] == catalogue.layers[-1].output_shape


def test_vgg11_and_vgg13_match_the_paper():
    # Table 2 of Simonyan & Zisserman: 133 million parameters for both A and B.
    for depth in (11, 13):
        catalogue = vgg(depth).catalogue()
        assert round(catalogue.params / 1e6) == 133
        assert catalogue.params == vgg(depth).build(224, vgg(depth).layer("fc8")).count_params()
    assert vgg(11).conv_count == 8 and vgg(13).conv_count == 10


def test_macs_of_a_convolution():
    facts = vgg(16).catalogue(224).facts(vgg(16).layer("conv1_2"))
    assert facts.macs == 224 * 224 * 3 * 3 * 64 * 64


@pytest.mark.parametrize("depth", DEPTHS)
def test_names_follow_keras_and_caffe(depth):
    architecture = vgg(depth)
    last_conv = {11: 2, 13: 2, 16: 3, 19: 4}[depth]
    assert architecture.layer(f"conv5_{last_conv}").name == f"block5_conv{last_conv}"
    assert architecture.layer("pool5").name == "block5_pool"
    assert architecture.layer("fc6").name == "fc1"
    assert architecture.layer("FC7").name == "fc2"
    assert architecture.layer("fc8").name == "predictions"
    assert architecture.layer("block3_conv1").alias == "conv3_1"
    names = [layer.name for layer in architecture.layers]
    assert set(architecture.cut_points) == set(names) | {
        layer.alias for layer in architecture.layers
    }


def test_unknown_layer_lists_the_valid_ones():
    with pytest.raises(UnknownLayerError, match="conv5_4") as error:
        vgg(16).layer("conv5_4")
    assert "pool5" in str(error.value) and "fc7" in str(error.value)


def test_classifier_layers_need_224():
    architecture = vgg(16)
    with pytest.raises(ImageSizeError, match="fc7 needs 224x224"):
        architecture.build(160, architecture.layer("fc7"))
    with pytest.raises(ImageSizeError, match="at least 32x32"):
        architecture.catalogue(31)
    assert all(not f.layer.is_top for f in architecture.catalogue(160).layers)


def test_unknown_depth():
    with pytest.raises(UnknownLayerError, match="VGG15"):
        vgg(15)


@pytest.mark.parametrize("cut", ["conv1_1", "pool1", "conv3_3", "fc7"])
def test_what_one_image_may_take_is_counted_from_keras_own_shapes(cut):
    """Activations: at the largest layer, its input and output together, plus the outputs
    kept for the cut, float32; workspace: the widest convolution's input as 3x3 patches."""
    model = keras.applications.VGG16(weights=None)
    architecture = vgg(16)
    layer = architecture.layer(cut)
    names = [entry.name for entry in model.layers]
    upto = model.layers[1 : names.index(layer.name) + 1]
    sizes = [4 * int(np.prod(entry.output.shape[1:])) for entry in upto]
    pixels = 224 * 224 * 3
    inputs = [4 * pixels, *sizes[:-1]]
    live = [pixels + i + o for i, o in zip(inputs, sizes, strict=True)]  # uint8 pixels kept
    patches = [
        4 * 9 * int(np.prod(entry.input.shape[1:]))
        for entry in upto
        if isinstance(entry, keras.layers.Conv2D)
    ]
    catalogue = architecture.catalogue(224)
    assert catalogue.activation_bytes([layer]) == max(live)
    assert catalogue.workspace_bytes([layer]) == max(patches)
    assert catalogue.image_bytes([layer]) == max(live) + max(patches)
