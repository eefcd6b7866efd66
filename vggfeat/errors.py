"""The errors vggfeat raises for problems a user can fix.

Each message names the file, layer or option at fault and says what to do;
the CLI shows it as one line, the Python API lets it propagate.
"""

from __future__ import annotations


class VggfeatError(Exception):
    """Base class: a problem with the user's input, settings or environment."""


class OptionError(VggfeatError, ValueError):
    """A bad option value: the command line exits 2, as for an unknown option."""


class UnknownLayerError(OptionError):
    """A layer name that is neither a Keras name nor a known alias."""


class ImageSizeError(OptionError):
    """An input size the requested layers cannot take."""


class OutputError(VggfeatError):
    """An output that cannot be written, continued, locked or read."""


class WeightsMismatchError(VggfeatError):
    """A weights file that does not fit the network, or fits only in part."""


class WeightsUnavailableError(VggfeatError):
    """Weights that cannot be had: not published, not cached and not downloadable."""
