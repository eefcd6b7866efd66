"""The VGG family as data.

One table of convolutions per block (configurations A, B, D and E of
Simonyan & Zisserman, 2015) yields every network: its layers with their Keras
names and paper/Caffe aliases, the catalogue of shapes, parameters and
multiply-adds at an input size, the valid cut points, and the Keras model.
With batch norm (torchvision's ``vgg16_bn``), each convolution is followed
by a BatchNormalization in inference mode, and the convolution's ReLU comes
after it; a conv cut is still the output of that ReLU, where a plain VGG's is.

The Keras names (``block1_conv1`` ... ``block5_pool``, ``flatten``, ``fc1``,
``fc2``, ``predictions``) are those of ``keras.applications.VGG16``/``VGG19``:
the published weight files are laid out by them.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from vggfeat.errors import ImageSizeError, UnknownLayerError
from vggfeat.heads import HEADS

if TYPE_CHECKING:
    from collections.abc import Iterable

    import keras

#: Convolutions in each of the five blocks, by network depth.
BLOCK_DEPTHS: dict[int, tuple[int, ...]] = {
    11: (1, 1, 2, 2, 2),
    13: (2, 2, 2, 2, 2),
    16: (2, 2, 3, 3, 3),
    19: (2, 2, 4, 4, 4),
}
DEPTHS = tuple(BLOCK_DEPTHS)
BLOCK_WIDTHS = (64, 128, 256, 512, 512)
FC_WIDTH = 4096
CLASSES = 1000

#: The fully connected layers were trained on the 7x7x512 map of a 224x224 input.
TOP_IMAGE_SIZE = 224
#: The smallest input that leaves pool5 a 1x1 map (Keras's own minimum).
MIN_IMAGE_SIZE = 32

LayerKind = Literal["conv", "norm", "pool", "flatten", "dense"]
#: Batch norm's epsilon in torchvision's VGGs (PyTorch's default); Keras's is 1e-3.
BATCH_NORM_EPSILON = 1e-5


@dataclass(frozen=True)
class Layer:
    """One layer of a VGG network, as the table defines it."""

    name: str
    """Keras name, e.g. ``block5_conv3`` or ``fc2``."""
    alias: str
    """Paper/Caffe name, e.g. ``conv5_3`` or ``fc7``."""
    kind: LayerKind
    width: int
    """Output channels (conv, norm, pool) or units (dense); 0 for flatten."""
    activation: str | None = None
    output: str = ""
    """The Keras layer whose output a cut here takes, if not this one: a convolution
    with batch norm has its ReLU after the norm (``block1_conv1_bn_relu``)."""

    @property
    def is_top(self) -> bool:
        """Whether the layer belongs to the classifier, which needs 224x224 input."""
        return self.kind in ("flatten", "dense")

    @property
    def has_map(self) -> bool:
        """Whether the output is a map over space, (H, W, C), that a head may pool."""
        return self.kind in ("conv", "pool")

    @property
    def has_weights(self) -> bool:
        return self.kind in ("conv", "norm", "dense")

    @property
    def is_cut_point(self) -> bool:
        """Whether ``--layer`` may name it: a batch norm is inside its convolution's cut."""
        return self.kind != "norm"

    @property
    def output_name(self) -> str:
        """The Keras layer whose output is this layer's features."""
        return self.output or self.name


@dataclass(frozen=True)
class LayerFacts:
    """A layer's shape and cost at one input size."""

    layer: Layer
    output_shape: tuple[int, ...]
    """Per image, without the batch axis: (H, W, C) or (units,)."""
    params: int
    macs: int
    """Multiply-adds per image."""

    def feature_size(self, head: str) -> int:
        """Values stored per image for this layer under the head named ``head``
        (a fully connected layer has none)."""
        if not self.layer.has_map:
            return math.prod(self.output_shape)
        return math.prod(HEADS[head].shape(self.output_shape))


@dataclass(frozen=True)
class Catalogue:
    """Every layer of one network at one input size, with totals."""

    depth: int
    image_size: int
    layers: tuple[LayerFacts, ...]

    @property
    def params(self) -> int:
        return sum(facts.params for facts in self.layers)

    @property
    def macs(self) -> int:
        return sum(facts.macs for facts in self.layers)

    def weight_shapes(self) -> dict[str, list[tuple[int, ...]]]:
        """Each weighted layer's variables at this input size: [kernel, bias] shapes."""
        shapes: dict[str, list[tuple[int, ...]]] = {}
        previous: tuple[int, ...] = (self.image_size, self.image_size, 3)
        for facts in self.layers:
            layer = facts.layer
            if layer.kind == "conv":
                shapes[layer.name] = [(3, 3, previous[-1], layer.width), (layer.width,)]
            elif layer.kind == "norm":
                shapes[layer.name] = [(layer.width,)] * 4  # scale, shift, mean, variance
            elif layer.kind == "dense":
                shapes[layer.name] = [(math.prod(previous), layer.width), (layer.width,)]
            previous = facts.output_shape
        return shapes

    def activation_bytes(self, cuts: Sequence[Layer]) -> int:
        """Bytes of float32 activations one image needs at the peak of a forward pass to the
        deepest of ``cuts``: each layer's input and output live together, and the output
        of every requested layer is kept until the end."""
        deepest = max(self.layers.index(self.facts(layer)) for layer in cuts)
        image = self.image_size * self.image_size * 3
        previous = image * 4  # the preprocessed input, float32
        kept = peak = image  # the uint8 pixels
        for facts in self.layers[: deepest + 1]:
            output = math.prod(facts.output_shape) * 4
            peak = max(peak, kept + previous + output)
            if facts.layer in cuts:
                kept += output
            previous = output
        return peak

    def workspace_bytes(self, cuts: Sequence[Layer]) -> int:
        """Bytes one image may need besides its activations, at the widest convolution up to
        the deepest of ``cuts``: its input unfolded into 3x3 patches (im2col), float32, which
        a CPU backend may make whole for a large batch (TensorFlow asked for 35 GB for 300
        images at 224x224, exactly 300 of conv1_2's)."""
        deepest = max(self.layers.index(self.facts(layer)) for layer in cuts)
        largest = 0
        previous: tuple[int, ...] = (self.image_size, self.image_size, 3)
        for facts in self.layers[: deepest + 1]:
            if facts.layer.kind == "conv":
                height, width, channels = previous
                largest = max(largest, height * width * 9 * channels * 4)
            previous = facts.output_shape
        return largest

    def image_bytes(self, cuts: Sequence[Layer]) -> int:
        """Bytes one image of a batch may take at the peak of a forward pass to ``cuts``."""
        return self.activation_bytes(cuts) + self.workspace_bytes(cuts)

    def facts(self, layer: Layer) -> LayerFacts:
        for facts in self.layers:
            if facts.layer == layer:
                return facts
        raise ImageSizeError(
            f"{layer.alias} ({layer.name}) needs {TOP_IMAGE_SIZE}x{TOP_IMAGE_SIZE} input, "
            f"not {self.image_size}x{self.image_size}"
        )


@dataclass(frozen=True)
class Architecture:
    """One member of the VGG family: its layers in order, input to predictions."""

    depth: int
    layers: tuple[Layer, ...]
    batch_norm: bool = False

    @property
    def name(self) -> str:
        """``VGG16``, or ``VGG16-BN`` with batch norm."""
        return f"VGG{self.depth}" + ("-BN" if self.batch_norm else "")

    @property
    def conv_count(self) -> int:
        return sum(1 for layer in self.layers if layer.kind == "conv")

    @property
    def cut_points(self) -> tuple[str, ...]:
        """Every name ``layer()`` accepts: aliases first, then the Keras names."""
        cuts = [layer for layer in self.layers if layer.is_cut_point]
        aliases = [layer.alias for layer in cuts]
        names = [layer.name for layer in cuts if layer.name not in aliases]
        return tuple(aliases + names)

    def through(self, up_to: Layer) -> tuple[Layer, ...]:
        """The layers a network cut at ``up_to`` is made of, from the first: with batch norm,
        a convolution's cut takes in the norm after it."""
        end = self.layers.index(up_to) + 1
        if end < len(self.layers) and self.layers[end].kind == "norm":
            end += 1
        return self.layers[:end]

    def layer(self, name: str) -> Layer:
        """The layer called ``name``, by Keras name or alias, in any case."""
        wanted = name.strip().lower()
        for index, layer in enumerate(self.layers):
            if wanted not in (layer.name, layer.alias):
                continue
            if layer.is_cut_point:
                return layer
            conv = self.layers[index - 1].alias
            raise UnknownLayerError(
                f"{name} is a batch norm, not a cut point: {conv} is taken after it and its ReLU"
            )
        names = list(self.cut_points)
        close = difflib.get_close_matches(name.strip().lower(), names, n=1, cutoff=0.6)
        guess = f"did you mean {close[0]}? " if close else ""
        raise UnknownLayerError(
            f"{self.name} has no layer {name!r}; {guess}choose one of: {', '.join(self.cut_points)}"
        )

    def check_image_size(self, layers: Iterable[Layer], image_size: int) -> None:
        """Raise ``ImageSizeError`` unless every layer can take ``image_size`` input."""
        if image_size < MIN_IMAGE_SIZE:
            raise ImageSizeError(
                f"--image-size {image_size} is too small: {self.name} needs at least "
                f"{MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE} so that pool5 keeps one pixel"
            )
        top = [layer.alias for layer in layers if layer.is_top]
        if top and image_size != TOP_IMAGE_SIZE:
            raise ImageSizeError(
                f"{' and '.join(top)} {'needs' if len(top) == 1 else 'need'} "
                f"{TOP_IMAGE_SIZE}x{TOP_IMAGE_SIZE} input, as the fully "
                f"connected layers were trained on pool5's 7x7x512 map; use --image-size "
                f"{TOP_IMAGE_SIZE}, or a convolutional cut such as pool5 at {image_size}"
            )

    def catalogue(self, image_size: int = TOP_IMAGE_SIZE) -> Catalogue:
        """Shapes and costs of every layer available at ``image_size``.

        The classifier layers (flatten, fc6, fc7, fc8) are included only at 224.
        """
        self.check_image_size([], image_size)
        facts = []
        shape: tuple[int, ...] = (image_size, image_size, 3)
        for layer in self.layers:
            if layer.is_top and image_size != TOP_IMAGE_SIZE:
                break
            params, macs, shape = _layer_cost(layer, shape)
            facts.append(LayerFacts(layer, shape, params, macs))
        return Catalogue(self.depth, image_size, tuple(facts))

    def build(
        self,
        image_size: int,
        up_to: Layer,
        seed: int = 0,
        dtype: str | None = None,
        initial: Mapping[str, Sequence[Callable]] | None = None,
    ) -> keras.Model:
        """The Keras model from the input through ``up_to``, weights drawn under ``seed``.

        Each layer's initialisers get their own seed derived from ``seed`` and
        the layer's position, so a layer's random weights do not depend on
        where the network is cut. ``initial`` gives a layer (by Keras name)
        its own (kernel, bias) initialisers instead: weights from a file are
        the variables' first values, never zeros overwritten.

        ``dtype`` is a Keras dtype policy such as ``"mixed_bfloat16"``; float32 by default.
        """
        from vggfeat.runtime import keras_module

        keras = keras_module()

        self.check_image_size([up_to], image_size)
        inputs = keras.Input(shape=(image_size, image_size, 3), name="input_layer")
        x = inputs
        for index, layer in enumerate(self.through(up_to)):
            initialisers = (initial or {}).get(layer.name) or _drawn(layer, seed * 1000 + index)
            x = _keras_layer(keras, layer, initialisers, dtype)(x)
            if layer.kind == "norm":
                x = keras.layers.Activation("relu", name=f"{layer.name}_relu", dtype=dtype)(x)
        return keras.Model(inputs, x, name=f"vgg{self.depth}" + ("_bn" if self.batch_norm else ""))


@cache
def vgg(depth: int, batch_norm: bool = False) -> Architecture:
    """The architecture of VGG11, 13, 16 or 19, with batch norm after each convolution if
    ``batch_norm`` (torchvision's ``vgg16_bn``)."""
    if depth not in BLOCK_DEPTHS:
        raise UnknownLayerError(
            f"there is no VGG{depth}; --depth takes {', '.join(map(str, DEPTHS))}"
        )
    layers: list[Layer] = []
    blocks = zip(BLOCK_DEPTHS[depth], BLOCK_WIDTHS, strict=True)
    for block, (convs, width) in enumerate(blocks, start=1):
        for index in range(1, convs + 1):
            name, alias = f"block{block}_conv{index}", f"conv{block}_{index}"
            if batch_norm:
                layers.append(Layer(name, alias, "conv", width, None, f"{name}_bn_relu"))
                layers.append(Layer(f"{name}_bn", f"bn{block}_{index}", "norm", width))
            else:
                layers.append(Layer(name, alias, "conv", width, "relu"))
        layers.append(Layer(f"block{block}_pool", f"pool{block}", "pool", width))
    layers += [
        Layer("flatten", "flatten", "flatten", 0),
        Layer("fc1", "fc6", "dense", FC_WIDTH, "relu"),
        Layer("fc2", "fc7", "dense", FC_WIDTH, "relu"),
        Layer("predictions", "fc8", "dense", CLASSES, "softmax"),
    ]
    return Architecture(depth, tuple(layers), batch_norm)


def _layer_cost(layer: Layer, shape: tuple[int, ...]) -> tuple[int, int, tuple[int, ...]]:
    """(parameters, multiply-adds, output shape) of ``layer`` on an input of ``shape``."""
    if layer.kind == "conv":
        height, width, channels = shape
        weights = 3 * 3 * channels * layer.width
        return weights + layer.width, height * width * weights, (height, width, layer.width)
    if layer.kind == "norm":
        # Inference folds the four numbers into one multiply-add per value.
        return 4 * layer.width, math.prod(shape), shape
    if layer.kind == "pool":
        height, width, channels = shape
        return 0, 0, (height // 2, width // 2, channels)
    if layer.kind == "flatten":
        return 0, 0, (math.prod(shape),)
    (inputs,) = shape
    return inputs * layer.width + layer.width, inputs * layer.width, (layer.width,)


def _keras_layer(
    keras: Any, layer: Layer, initialisers: Sequence[Callable | str], dtype: str | None
) -> keras.Layer:
    if layer.kind == "pool":
        return keras.layers.MaxPooling2D((2, 2), strides=(2, 2), name=layer.name, dtype=dtype)
    if layer.kind == "flatten":
        return keras.layers.Flatten(name=layer.name, dtype=dtype)
    if layer.kind == "norm":
        scale, shift, mean, variance = initialisers
        return keras.layers.BatchNormalization(
            epsilon=BATCH_NORM_EPSILON,
            gamma_initializer=scale,
            beta_initializer=shift,
            moving_mean_initializer=mean,
            moving_variance_initializer=variance,
            name=layer.name,
            dtype=dtype,
        )
    kernel, bias = initialisers
    options = {"kernel_initializer": kernel, "bias_initializer": bias, "dtype": dtype}
    if layer.kind == "conv":
        return keras.layers.Conv2D(
            layer.width,
            (3, 3),
            padding="same",
            activation=layer.activation,
            name=layer.name,
            **options,
        )
    return keras.layers.Dense(layer.width, activation=layer.activation, name=layer.name, **options)


def _drawn(layer: Layer, seed: int) -> Sequence[Callable | str]:
    """A layer's random initialisers: Glorot's, or for a batch norm Keras's identity."""
    if layer.kind == "norm":
        return ("ones", "zeros", "zeros", "ones")
    return _glorot(seed)


def _glorot(seed: int) -> tuple[Callable, str]:
    """Keras's default initialisers (Glorot uniform kernel, zero bias), drawn by NumPy: a
    seed gives the same weights on every backend (each backend's own generator differs)."""

    def draw(shape: tuple[int, ...], dtype: object = None) -> np.ndarray:
        receptive = math.prod(shape[:-2])
        limit = math.sqrt(6 / ((shape[-2] + shape[-1]) * receptive))
        # Drawn in float32 and scaled in place: fc6's kernel in float64 would be 822 MB.
        values = np.random.default_rng(seed).random(shape, np.float32)
        values *= 2 * limit
        values -= limit
        return values

    return draw, "zeros"
