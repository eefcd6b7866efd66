"""The facts ``vggfeat show`` prints about a file: rows, layers, settings, runs, failures."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from vggfeat.store import open_features

#: The attributes ``vggfeat show`` lists, in this order: the settings, then provenance.
SHOWN_ATTRIBUTES = (
    "depth", "batch_norm", "layers", "pooling", "weights", "weights_file", "weights_sha256",
    "weights_layout", "seed", "preprocessing", "image_size", "resize", "resampling",
    "precision", "compute_dtype", "dtype", "backend", "backend_version", "device", "engine",
    "vggfeat_version", "keras_version", "created", "command", "format_version",
)  # fmt: skip


def describe_file(path: str | os.PathLike) -> dict[str, Any]:
    """What ``vggfeat show`` shows: counts, each layer, settings, runs and failures.

    Reads only what it shows. Raises ``OutputError`` (one line) for a file
    that is not vggfeat's or is damaged.
    """
    with open_features(path) as file:
        layers = [
            {
                "name": name,
                "shape": list(column.shape[1:]),
                "dtype": str(column[0:0].dtype),
                "keras_layer": file.layers[name].keras_layer,
                "pooling": file.layers[name].pooling,
                "bytes_on_disk": file.storage_bytes(name),
            }
            for name, column in file.features.items()
        ]
        failed = file.failed
        shown = {key: file.attributes[key] for key in SHOWN_ATTRIBUTES if key in file.attributes}
        return {
            "path": str(path),
            "rows": file.rows,
            "pending": file.pending,
            "failures": len(failed),
            "layers": layers,
            "attributes": {k: _plain(v) for k, v in shown.items()},
            "runs": file.runs,
            "failures_by_reason": dict(Counter(failed.values()).most_common()),
            "failed": failed,
            "damaged": file.damaged,
        }


def _plain(value: Any) -> Any:
    """An attribute as JSON has it: NumPy values and tuples as lists and numbers."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return list(value) if isinstance(value, tuple) else value
