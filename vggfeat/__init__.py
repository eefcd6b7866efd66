"""vggfeat: folders of images in, VGG feature vectors out, in one HDF5 file.

    summary = vggfeat.extract(["photos/"], "features.h5", layers=["fc7"])
    paths, features = vggfeat.load("features.h5")
    with vggfeat.open("features.h5") as f:   # reads only what is asked for
        f.features["fc7"][:10], f.paths[:10]

The command-line tool and this API do the same things; TensorFlow is imported
only when a network is built, so importing vggfeat is cheap.
"""

from importlib.metadata import version

from vggfeat.architecture import Architecture, Catalogue, Layer, LayerFacts, vgg
from vggfeat.errors import VggfeatError
from vggfeat.pipeline import Progress, Summary, extract
from vggfeat.store import FeatureFile, Features, load
from vggfeat.store import open_features as open

__version__ = version("vggfeat")

__all__ = [
    "Architecture",
    "Catalogue",
    "FeatureFile",
    "Features",
    "Layer",
    "LayerFacts",
    "Progress",
    "Summary",
    "VggfeatError",
    "extract",
    "load",
    "open",
    "vgg",
]
