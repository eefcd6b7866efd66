"""vggfeat: folders of images in, VGG feature vectors out, in one HDF5 file.

    summary = vggfeat.extract(["photos/"], "features.h5", layers=["fc7"])
    summary = vggfeat.extract(vggfeat.ExtractOptions(("photos/",), "features.h5"))
    paths, features = vggfeat.load("features.h5")
    with vggfeat.open("features.h5") as f:   # reads only what is asked for
        f.features["fc7"][:10], f.paths[:10]

The command-line tool and this API do the same things. Names are imported
when first used, and TensorFlow only when a network is built, so importing
vggfeat costs nothing, and ``vggfeat`` answers a signal from its first moment.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vggfeat.architecture import Architecture, Catalogue, Layer, LayerFacts, vgg
    from vggfeat.errors import VggfeatError
    from vggfeat.options import ExtractOptions
    from vggfeat.pipeline import Interrupted, Progress, Summary, extract
    from vggfeat.store import FeatureFile, Features, load
    from vggfeat.store import open_features as open

#: Each public name and the module it lives in.
_HOMES = {
    "Architecture": "vggfeat.architecture",
    "Catalogue": "vggfeat.architecture",
    "Layer": "vggfeat.architecture",
    "LayerFacts": "vggfeat.architecture",
    "vgg": "vggfeat.architecture",
    "VggfeatError": "vggfeat.errors",
    "ExtractOptions": "vggfeat.options",
    "Interrupted": "vggfeat.pipeline",
    "Progress": "vggfeat.pipeline",
    "Summary": "vggfeat.pipeline",
    "extract": "vggfeat.pipeline",
    "FeatureFile": "vggfeat.store",
    "Features": "vggfeat.store",
    "load": "vggfeat.store",
    "open": "vggfeat.store",
}

__all__ = [
    "Architecture",
    "Catalogue",
    "ExtractOptions",
    "FeatureFile",
    "Features",
    "Interrupted",
    "Layer",
    "LayerFacts",
    "Progress",
    "Summary",
    "VggfeatError",
    "__version__",
    "extract",
    "load",
    "open",
    "vgg",
]


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import version

        return version("vggfeat")
    if name not in _HOMES:
        raise AttributeError(f"module 'vggfeat' has no attribute {name!r}")
    module = importlib.import_module(_HOMES[name])
    found = getattr(module, "open_features" if name == "open" else name)
    globals()[name] = found
    return found
