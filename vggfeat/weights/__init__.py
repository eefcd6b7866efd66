"""Where the network's numbers come from, and the proof that every layer got its own.

``sources`` holds the registry (Keras's ImageNet files, a Keras file, a
safetensors file in PyTorch's layout, random weights) and the loading;
``keras_files`` and ``pytorch_files`` read the layouts; ``stored`` is what
every reader turns a file into.
"""

from vggfeat.weights.keras_files import (
    PUBLISHED,
    PublishedFile,
    keras_cache_dir,
    published_file,
    published_files,
)
from vggfeat.weights.sources import (
    KEYWORDS,
    SOURCES,
    PreparedWeights,
    Source,
    WeightsRecord,
    build_with_weights,
    check_fits,
    fetch_weights,
    file_sha256,
    identify_weights,
    source_of,
)
from vggfeat.weights.stored import StoredLayer

__all__ = [
    "KEYWORDS",
    "PUBLISHED",
    "SOURCES",
    "PreparedWeights",
    "PublishedFile",
    "Source",
    "StoredLayer",
    "WeightsRecord",
    "build_with_weights",
    "check_fits",
    "fetch_weights",
    "file_sha256",
    "identify_weights",
    "keras_cache_dir",
    "published_file",
    "published_files",
    "source_of",
]
