"""The cut network and its heads, compiled once for one batch shape.

uint8 pixels go in; the Caffe preprocessing the ImageNet weights expect
(RGB to BGR, minus the ImageNet mean, no scaling, as
``keras.applications.vgg16.preprocess_input`` does), the network up to the
deepest requested layer, the optional spatial pooling and the cast back to
float32 all run inside one ``tf.function`` traced once: the last, short batch
is padded rather than traced again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import numpy as np

from vggfeat.architecture import Architecture, Catalogue, Layer
from vggfeat.errors import VggfeatError
from vggfeat.runtime import cpu_has_fast_bfloat16, gpus, tensorflow
from vggfeat.weights import WeightsRecord, apply_weights

Pooling = Literal["none", "avg", "max"]
Precision = Literal["float32", "mixed"]
PRECISIONS: tuple[Precision, ...] = ("float32", "mixed")

#: ImageNet's mean colour in BGR order, as ``keras.applications`` subtracts it.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
PREPROCESSING = (
    "caffe: RGB to BGR, minus the ImageNet mean (B 103.939, G 116.779, R 123.68), no scaling"
)


@dataclass(frozen=True)
class Cut:
    """One requested output: the name the user typed and the layer it means."""

    label: str
    layer: Layer

    def pools(self, pool: Pooling) -> bool:
        """Whether ``pool`` applies: only convolutional maps are pooled."""
        return pool != "none" and self.layer.kind in ("conv", "pool")

    def feature_shape(self, catalogue: Catalogue, pool: Pooling) -> tuple[int, ...]:
        """The shape of one image's features: the layer's output, or its channels if pooled."""
        shape = catalogue.facts(self.layer).output_shape
        return shape[-1:] if self.pools(pool) else shape


def compute_dtype(precision: Precision, on_gpu: bool) -> str:
    """The dtype the layers compute in, for mixed: float16 on a GPU, bfloat16 on a CPU.

    A CPU without bfloat16 units would only emulate it, slower than float32,
    so there mixed precision computes in float32.
    """
    if precision == "float32":
        return "float32"
    if on_gpu:
        return "float16"
    return "bfloat16" if cpu_has_fast_bfloat16() else "float32"


class NetworkOutOfMemory(VggfeatError):
    """The device ran out of memory on a batch; a smaller batch may fit."""


class FeatureNetwork:
    """VGG cut at one or more layers, as one function from uint8 batches to features."""

    def __init__(
        self,
        architecture: Architecture,
        cuts: list[Cut],
        image_size: int,
        batch_size: int,
        pool: Pooling = "none",
        weights: str | os.PathLike = "imagenet",
        seed: int = 0,
        precision: Precision = "float32",
    ) -> None:
        tensorflow()
        import keras

        self.cuts = cuts
        self.image_size = image_size
        self.pool = pool
        self.on_gpu = bool(gpus())
        self.compute_dtype = compute_dtype(precision, self.on_gpu)
        policy = None if self.compute_dtype == "float32" else f"mixed_{self.compute_dtype}"

        deepest = max((cut.layer for cut in cuts), key=architecture.layers.index)
        model = architecture.build(
            image_size, deepest, seed if weights == "random" else None, dtype=policy
        )
        self.weights: WeightsRecord = apply_weights(model, architecture, weights, seed)
        outputs = [model.get_layer(cut.layer.name).output for cut in cuts]
        self._model = keras.Model(model.input, outputs)
        self.set_batch_size(batch_size)

    def set_batch_size(self, batch_size: int) -> None:
        """Compile the function for batches of ``batch_size`` images (traced once, on first use)."""
        tf = tensorflow()
        mean = tf.constant(CAFFE_MEAN_BGR, tf.float32)
        pooling = {"avg": tf.reduce_mean, "max": tf.reduce_max}
        cuts, pool, model, size = self.cuts, self.pool, self._model, self.image_size

        @tf.function(
            input_signature=[tf.TensorSpec((batch_size, size, size, 3), tf.uint8)],
            reduce_retracing=False,
        )
        def forward(pixels):
            bgr = tf.reverse(tf.cast(pixels, tf.float32), axis=[-1]) - mean
            outputs = model(bgr, training=False)
            if len(cuts) == 1:
                outputs = [outputs]
            features = []
            for cut, output in zip(cuts, outputs, strict=True):
                output = tf.cast(output, tf.float32)
                if cut.pools(pool):
                    output = pooling[pool](output, axis=[1, 2])
                features.append(output)
            return features

        self.batch_size = batch_size
        # Trace now, so that start-up, not the first batch, pays for it.
        forward.get_concrete_function()
        self._forward = forward

    @property
    def traces(self) -> int:
        """How many times the function was traced; 1 after any number of batches."""
        return self._forward.experimental_get_tracing_count()

    def __call__(self, pixels: np.ndarray) -> list[np.ndarray]:
        """Features of a batch: (n, size, size, 3) uint8 in, one float32 array per cut out.

        A batch shorter than the batch size is padded, a longer one split.
        When the device runs out of memory, the batch size is halved for the
        rest of the run and the same images computed again, down to one image
        at a time; then ``VggfeatError``.
        """
        while True:
            try:
                return self._compute(pixels)
            except NetworkOutOfMemory as error:
                if self.batch_size == 1:
                    raise VggfeatError(
                        "out of memory computing even one image at a time; use a smaller "
                        "--image-size, an earlier --layer, or free the GPU's memory"
                    ) from error
                self.set_batch_size(self.batch_size // 2)

    def _compute(self, pixels: np.ndarray) -> list[np.ndarray]:
        tf = tensorflow()
        try:
            chunks = [
                self._run(pixels[start : start + self.batch_size])
                for start in range(0, len(pixels), self.batch_size)
            ]
        except tf.errors.ResourceExhaustedError as error:
            raise NetworkOutOfMemory(
                f"out of memory on a batch of {self.batch_size} images"
            ) from error
        return [np.concatenate(outputs) for outputs in zip(*chunks, strict=True)]

    def _run(self, pixels: np.ndarray) -> list[np.ndarray]:
        """One padded batch through the compiled function."""
        count = len(pixels)
        if count < self.batch_size:
            padding = np.zeros((self.batch_size - count, *pixels.shape[1:]), np.uint8)
            pixels = np.concatenate([pixels, padding])
        return [output.numpy()[:count] for output in self._forward(pixels)]
