"""The cut network and its heads, compiled once for one batch shape, on TensorFlow or JAX.

uint8 pixels go in; the preprocessing the weights expect
(``vggfeat.preprocessing``: Caffe's for Keras's files, torchvision's for
PyTorch's), the network up to the deepest requested layer, the cast back to
float32 and each cut's head (``vggfeat.heads``) all run inside one compiled
function (``tf.function`` or ``jax.jit``), traced once: the last, short batch
is padded rather than traced again.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from vggfeat.architecture import Architecture, Catalogue, Layer
from vggfeat.errors import VggfeatError
from vggfeat.heads import NO_POOLING, Pooling
from vggfeat.preprocessing import preprocessing as preprocessing_named
from vggfeat.runtime import (
    BACKEND_NAMES,
    backend_version,
    choose_device,
    cpu_has_fast_bfloat16,
    default_backend,
    is_out_of_memory,
    library,
    start,
)
from vggfeat.weights import PreparedWeights, build_with_weights

PRECISIONS = ("float32", "mixed")
#: A network compiled for one batch shape: uint8 pixels in, one array per cut out.
Compiled = Callable[[np.ndarray], list[np.ndarray]]


@dataclass(frozen=True)
class Cut:
    """One requested output: its dataset's name, the layer it means and the head on its map
    (a fully connected layer's is ``none``)."""

    label: str
    layer: Layer
    pooling: Pooling = NO_POOLING

    def feature_shape(self, catalogue: Catalogue) -> tuple[int, ...]:
        """The shape of one image's features: the layer's output through the head."""
        return self.pooling.shape(catalogue.facts(self.layer).output_shape)


def compute_dtype(precision: str, device: str, backend: str) -> str:
    """The dtype the layers compute in: with mixed, float16 on a GPU; on a CPU, bfloat16
    only where it is fast: TensorFlow (oneDNN) on a CPU with AVX512_BF16 or AMX.

    Elsewhere bfloat16 would only be emulated, and XLA's CPU bfloat16 (JAX) was
    measured slower than its float32, so mixed precision computes in float32.
    """
    if precision == "float32":
        return "float32"
    if device == "gpu":
        return "float16"
    return "bfloat16" if backend == "tensorflow" and cpu_has_fast_bfloat16() else "float32"


class NetworkOutOfMemory(VggfeatError):
    """The device ran out of memory on a batch; a smaller batch may fit."""


class CutNetwork:
    """VGG cut at one or more layers, as one function from uint8 batches to features.

    Written in ``keras.ops``: the same code is compiled by ``tf.function`` on
    TensorFlow and by ``jax.jit`` on JAX, once per batch shape. Built with its
    weights first; compiled by ``set_batch_size``, once the batch is chosen.
    """

    def __init__(
        self,
        architecture: Architecture,
        cuts: list[Cut],
        image_size: int,
        weights: str | os.PathLike | PreparedWeights = "imagenet",
        seed: int = 0,
        precision: str = "float32",
        backend: str | None = None,
        device: str | None = None,
        compute: str | None = None,
        preprocessing: str = "caffe",
    ) -> None:
        self.backend = backend or default_backend()
        keras = start(self.backend)
        self.device = choose_device(self.backend, device)
        self.cuts = cuts
        self.image_size = image_size
        self.preprocessing = preprocessing_named(preprocessing)
        self.on_gpu = self.device.kind == "gpu"
        self.compute_dtype = compute or compute_dtype(precision, self.device.kind, self.backend)
        policy = None if self.compute_dtype == "float32" else f"mixed_{self.compute_dtype}"
        self._traces = 0

        deepest = max((cut.layer for cut in cuts), key=architecture.layers.index)
        with self._placed():
            model, self.weights = build_with_weights(
                architecture, image_size, deepest, weights, seed, dtype=policy
            )
            outputs = [model.get_layer(cut.layer.output_name).output for cut in cuts]
            self._model = keras.Model(model.input, outputs)
        self.batch_size = 0
        self._compiled: Compiled | None = None

    @property
    def description(self) -> str:
        """What computes: ``NVIDIA H200 (GPU 0), float16, JAX 0.11.2``."""
        name = BACKEND_NAMES[self.backend]
        return f"{self.device.label}, {self.compute_dtype}, {name} {backend_version(self.backend)}"

    @contextmanager
    def _placed(self) -> Iterator[None]:
        """Variables and computations on the chosen device."""
        module = library(self.backend)
        if self.backend == "tensorflow":
            kind = "GPU" if self.on_gpu else "CPU"
            with module.device(f"/{kind}:{self.device.index}"):
                yield
        else:
            platform = "gpu" if self.on_gpu else "cpu"
            with module.default_device(module.devices(platform)[self.device.index]):
                yield

    def set_batch_size(self, batch_size: int) -> None:
        """Compile the function for batches of ``batch_size`` images, now, not on first use."""
        self.batch_size = batch_size
        shape = (batch_size, self.image_size, self.image_size, 3)
        with self._placed():
            if self.backend == "tensorflow":
                self._compiled = self._compile_tensorflow(shape)
            else:
                self._compiled = self._compile_jax(shape)

    def _forward(self, outputs_of: Callable[[Any], Any], pixels: Any) -> list[Any]:
        """The weights' preprocessing, the model, then each cut's head in float32 (pow, sqrt
        and sums of squares lose too much in float16); runs once per trace."""
        import keras

        self._traces += 1
        ops = keras.ops
        outputs = outputs_of(self.preprocessing(pixels))
        if not isinstance(outputs, list | tuple):
            outputs = [outputs]
        return [
            cut.pooling(ops.cast(output, "float32"))
            for cut, output in zip(self.cuts, outputs, strict=True)
        ]

    def _compile_tensorflow(self, shape: tuple[int, ...]) -> Compiled:
        tf = library("tensorflow")
        model = self._model

        @tf.function(input_signature=[tf.TensorSpec(shape, tf.uint8)], reduce_retracing=False)
        def forward(pixels: Any) -> list[Any]:
            return self._forward(lambda x: model(x, training=False), pixels)

        forward.get_concrete_function()
        return lambda pixels: [output.numpy() for output in forward(pixels)]

    def _compile_jax(self, shape: tuple[int, ...]) -> Compiled:
        jax = library("jax")
        model = self._model
        # Passed as arguments, not closed over: 500 MB of constants would be baked into the program.
        trainable = [variable.value for variable in model.trainable_variables]
        fixed = [variable.value for variable in model.non_trainable_variables]

        def forward(trainable: list[Any], fixed: list[Any], pixels: Any) -> list[Any]:
            def outputs_of(x: Any) -> Any:
                return model.stateless_call(trainable, fixed, x, training=False)[0]

            return self._forward(outputs_of, pixels)

        compiled = (
            jax.jit(forward)
            .lower(trainable, fixed, jax.ShapeDtypeStruct(shape, np.uint8))
            .compile()
        )
        return lambda pixels: [np.asarray(out) for out in compiled(trainable, fixed, pixels)]

    @property
    def traces(self) -> int:
        """How many times the function was traced: once per batch size, whatever the batches."""
        return self._traces

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
        try:
            with self._placed():
                chunks = [
                    self._run(pixels[start : start + self.batch_size])
                    for start in range(0, len(pixels), self.batch_size)
                ]
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            raise NetworkOutOfMemory(
                f"out of memory on a batch of {self.batch_size} images"
            ) from error
        return [np.concatenate(outputs) for outputs in zip(*chunks, strict=True)]

    def _run(self, pixels: np.ndarray) -> list[np.ndarray]:
        """One padded batch through the compiled function."""
        if self._compiled is None:
            raise RuntimeError("internal: set_batch_size compiles the network before use")
        count = len(pixels)
        if count < self.batch_size:
            padding = np.zeros((self.batch_size - count, *pixels.shape[1:]), np.uint8)
            pixels = np.concatenate([pixels, padding])
        return [output[:count] for output in self._compiled(pixels)]
