"""What the network's input is made of: the pixels as the weights were trained to see them.

Weights trained in Caffe (Keras's ImageNet files) expect BGR values from 0 to
255 minus ImageNet's mean colour; weights trained in PyTorch (torchvision's
and timm's files) expect RGB values divided by 255, minus a mean, divided by
a standard deviation, per channel. A weights file cannot say how it was
trained: its layout chooses the default (``vggfeat.weights``), and
``--preprocessing`` may choose the other. Each runs inside the compiled
network, in float32, on uint8 pixels, as ``keras.applications``'
``preprocess_input`` does in its ``caffe`` and ``torch`` modes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vggfeat.errors import OptionError

#: ImageNet's mean colour in BGR order on the 0-255 scale, as Caffe's VGG subtracts it.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
#: ImageNet's mean and standard deviation per RGB channel on the 0-1 scale, as torchvision's.
TORCH_MEAN_RGB = (0.485, 0.456, 0.406)
TORCH_STD_RGB = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """One way of turning pixels into the network's input."""

    name: str
    description: str

    def __call__(self, pixels: Any) -> Any:
        """(n, h, w, 3) RGB pixels (uint8 or float, 0-255) in, float32 network input out,
        in ``keras.ops``: compiled with the network."""
        import keras

        ops = keras.ops
        values = ops.cast(pixels, "float32")
        if self.name == "caffe":
            return ops.flip(values, axis=-1) - ops.convert_to_tensor(CAFFE_MEAN_BGR, "float32")
        scaled = values / 255.0 - ops.convert_to_tensor(TORCH_MEAN_RGB, "float32")
        return scaled / ops.convert_to_tensor(TORCH_STD_RGB, "float32")


PREPROCESSINGS = {
    p.name: p
    for p in (
        Preprocessing(
            "caffe",
            "RGB to BGR, minus the ImageNet mean (B 103.939, G 116.779, R 123.68), no scaling",
        ),
        Preprocessing(
            "torch",
            "RGB divided by 255, minus the mean (0.485, 0.456, 0.406), divided by the standard "
            "deviation (0.229, 0.224, 0.225)",
        ),
    )
}


def preprocessing(name: str) -> Preprocessing:
    """The preprocessing called ``name`` (``caffe`` or ``torch``, any case)."""
    try:
        return PREPROCESSINGS[name.strip().lower()]
    except (KeyError, AttributeError):
        raise OptionError(
            f"--preprocessing {name} is not one of {', '.join(PREPROCESSINGS)}"
        ) from None
