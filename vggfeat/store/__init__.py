"""What is done: the output file and the run's journal, plan, assembly and readers.

One room each (README.md, Architecture, draws them):

    identity   one key per image, however its path is spelt
    layout     the settings a file's numbers depend on, its datasets, rows in transit
    hdf5       the output file's format: created, appended in place, read
    journal    committed parts, each written whole and checked on every read
    plan       the run's record: settings, shards and their locks, the list of images
    assemble   the output written from the parts once every shard is done
    writer     ``RunWriter``, the face a run's pipeline talks to
    reader     ``open`` and ``load``, lazy and whole
"""

from vggfeat.store.assemble import Assembly
from vggfeat.store.identity import Stamp, output_path, parts_folder
from vggfeat.store.journal import COMMIT_IMAGES
from vggfeat.store.layout import LayerSpec, Layout, Settings
from vggfeat.store.plan import Shard
from vggfeat.store.reader import FeatureFile, Features, load, open_features
from vggfeat.store.writer import PruneEverything, RunWriter

COMPRESSIONS = ("none", "lzf", "gzip")
STORED_DTYPES = ("float32", "float16")

__all__ = [
    "COMMIT_IMAGES",
    "COMPRESSIONS",
    "STORED_DTYPES",
    "Assembly",
    "FeatureFile",
    "Features",
    "LayerSpec",
    "Layout",
    "PruneEverything",
    "RunWriter",
    "Settings",
    "Shard",
    "Stamp",
    "load",
    "open_features",
    "output_path",
    "parts_folder",
]
