"""vggfeat: folders of images in, VGG feature vectors out, in one HDF5 file.

The command-line tool and this API do the same things; TensorFlow is imported
only when a network is built, so importing vggfeat is cheap.
"""

from importlib.metadata import version

from vggfeat.architecture import Architecture, Catalogue, Layer, LayerFacts, vgg
from vggfeat.errors import VggfeatError

__version__ = version("vggfeat")

__all__ = ["Architecture", "Catalogue", "Layer", "LayerFacts", "VggfeatError", "vgg"]
