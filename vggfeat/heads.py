"""Heads: what becomes of a convolutional map before it is stored, one table of them.

A head takes a layer's (N, H, W, C) map and gives each image's features:
the map as is, or one C-vector pooled over space. ``HEADS`` keys them by
name, as timm keys its pooling types; each has its parameters with their
defaults, the shape it gives a map, and its ``keras.ops`` code, which runs
inside the one compiled function, in float32, on TensorFlow and on JAX.
The command line's choices and options, ``vggfeat info``, the catalogue,
the store's shapes and the network all come from this table: a new head is
one entry.

A ``Pooling`` is a head with its parameters chosen, written as ``gem(p=3,
eps=1e-06)``: what a file records and a continued run must match.

- ``avg`` is SPoC (Babenko and Lempitsky, ICCV 2015), ``max`` is MAC.
- ``gem`` is generalized-mean pooling (Radenović, Tolias and Chum, TPAMI 2018).
- ``rmac`` is regional maximum activation of convolutions (Tolias, Sicre and
  Jégou, ICLR 2016), its regions placed as the authors' ``rmac_regions`` places them.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from vggfeat.errors import OptionError

Number = float | int
#: (top, left, side) of a square region of a map, in pixels of the map.
Region = tuple[int, int, int]

#: Added to a norm before dividing by it, as the R-MAC authors' code does: a region of
#: zeros (ReLU maps have them) stays zeros instead of becoming NaN.
NORM_EPS = 1e-6


@dataclass(frozen=True)
class Parameter:
    """One number a head takes: its name, default, bounds and meaning."""

    name: str
    default: Number
    help: str
    least: Number
    most: Number
    integer: bool = False

    @property
    def bounds(self) -> str:
        return f"{self.least:g} to {self.most:g}"

    def checked(self, head: str, value: Any) -> Number:
        """``value``, a number of this parameter's kind within its bounds, or
        ``OptionError`` naming its option."""
        option = f"--{head}-{self.name}"
        kind = numbers.Integral if self.integer else numbers.Real  # NumPy's scalars too
        if isinstance(value, bool) or not isinstance(value, kind):
            named = "a whole number" if self.integer else "a number"
            raise OptionError(f"{option} {value!r} is not {named}")
        try:
            number: Number = round(float(value)) if self.integer else float(value)
        except OverflowError:
            raise OptionError(f"{option} must be from {self.bounds}, not {value}") from None
        if not (math.isfinite(number) and self.least <= number <= self.most):
            raise OptionError(f"{option} must be from {self.bounds}, not {number:g}")
        return number

    def read(self, head: str, text: str) -> Number:
        """The parameter as written in a head's text: ``4`` in ``gem(p=4)``."""
        try:
            number: Number = int(text) if self.integer else float(text)
        except ValueError:
            kind = "a whole number" if self.integer else "a number"
            raise OptionError(f"--{head}-{self.name} {text} is not {kind}") from None
        return self.checked(head, number)


Maps = Any
"""A backend's (N, H, W, C) float32 tensor."""


@dataclass(frozen=True)
class Head:
    """One way to turn a map into features."""

    name: str
    summary: str
    """One line for ``--help`` and ``vggfeat info``."""
    parameters: tuple[Parameter, ...]
    pools: bool
    """Whether the head pools over space: (H, W, C) maps give (C,) features."""
    code: Callable[[Maps, Mapping[str, Number]], Maps]
    """The head in ``keras.ops``, given the parameters' values."""
    facts: Callable[[tuple[int, ...], Mapping[str, Number]], dict[str, Any]] | None = None
    """What a file records of the head on a map of a shape besides its parameters."""

    def shape(self, map_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Features per image for a map of ``map_shape`` (H, W, C)."""
        return map_shape[-1:] if self.pools else map_shape


def _identity(maps: Maps, values: Mapping[str, Number]) -> Maps:
    return maps


def _average(maps: Maps, values: Mapping[str, Number]) -> Maps:
    import keras

    return keras.ops.mean(maps, axis=(1, 2))


def _maximum(maps: Maps, values: Mapping[str, Number]) -> Maps:
    import keras

    return keras.ops.max(maps, axis=(1, 2))


def _generalized_mean(maps: Maps, values: Mapping[str, Number]) -> Maps:
    """(mean over space of max(x, eps)^p)^(1/p), computed as m * (mean((x/m)^p))^(1/p)
    with m the maximum over space: the same number, without overflow at large p."""
    import keras

    ops = keras.ops
    p = float(values["p"])
    clamped = ops.maximum(maps, float(values["eps"]))
    top = ops.max(clamped, axis=(1, 2), keepdims=True)
    mean = ops.mean(ops.power(clamped / top, p), axis=(1, 2))
    return ops.squeeze(top, axis=(1, 2)) * ops.power(mean, 1.0 / p)


def _regional_maximum(maps: Maps, values: Mapping[str, Number]) -> Maps:
    """The sum of the L2-normalized maxima of the R-MAC regions, L2-normalized."""
    import keras

    ops = keras.ops

    def normalized(vectors: Maps) -> Maps:
        norm = ops.sqrt(ops.sum(vectors * vectors, axis=-1, keepdims=True))
        return vectors / (norm + NORM_EPS)

    _, height, width, _ = maps.shape
    total = None
    for top, left, side in rmac_regions(int(height), int(width), int(values["levels"])):
        region = ops.max(maps[:, top : top + side, left : left + side, :], axis=(1, 2))
        total = normalized(region) if total is None else total + normalized(region)
    return normalized(total)


#: Overlap of neighbouring R-MAC regions the longer side's count aims at, and the
#: counts of extra regions along it to choose from (the authors' ``ovr`` and ``steps``).
RMAC_OVERLAP = 0.4
RMAC_EXTRA = range(1, 7)


def rmac_regions(height: int, width: int, levels: int) -> list[Region]:
    """The R-MAC regions of an H x W map at levels 1 ... ``levels``, level by level.

    With w = min(H, W), level l has square regions of side floor(2w / (l + 1)):
    l of them along the shorter side and l + d along the longer, spaced
    uniformly from edge to edge (offsets floor(i * (extent - side) / (count - 1))).
    d is the count, from 1 to 6, whose neighbouring regions overlap closest to
    40% (the first such); 0 on a square map. A level whose side would be 0
    pixels (a map smaller than the level) is left out, as the authors' code does.
    """
    short = min(height, width)
    extra_down = extra_across = 0
    if height != width:
        gap = max(height, width) - short
        extra = min(RMAC_EXTRA, key=lambda d: abs(1 - gap / (d * short) - RMAC_OVERLAP))
        extra_down, extra_across = (extra, 0) if height > width else (0, extra)
    regions = []
    for level in range(1, levels + 1):
        side = 2 * short // (level + 1)
        if side == 0:
            continue
        for top in _spaced(height, side, level + extra_down):
            for left in _spaced(width, side, level + extra_across):
                regions.append((top, left, side))
    return regions


def _spaced(extent: int, side: int, count: int) -> list[int]:
    """Offsets of ``count`` regions of ``side`` spread uniformly over ``extent``, exactly."""
    if count == 1:
        return [0]
    return [index * (extent - side) // (count - 1) for index in range(count)]


HEADS: dict[str, Head] = {
    head.name: head
    for head in (
        Head("none", "the map as is, (H, W, C) per image", (), False, _identity),
        Head("avg", "SPoC, the mean over space", (), True, _average),
        Head("max", "MAC, the maximum over space", (), True, _maximum),
        Head(
            "gem",
            "GeM, the generalized mean over space",
            (
                Parameter("p", 3.0, "GeM's exponent: 1 is avg, larger tends to max", 0.1, 100.0),
                Parameter("eps", 1e-6, "GeM's floor under activations", 1e-12, 1.0),
            ),
            True,
            _generalized_mean,
        ),
        Head(
            "rmac",
            "R-MAC, the sum of regional maxima",
            (Parameter("levels", 3, "R-MAC's levels of regions", 1, 10, integer=True),),
            True,
            _regional_maximum,
            lambda shape, values: {
                "regions": np.asarray(rmac_regions(shape[0], shape[1], int(values["levels"])))
            },
        ),
    )
}


@dataclass(frozen=True)
class Pooling:
    """A head with its parameters chosen; ``str`` gives ``gem(p=3, eps=1e-06)``."""

    name: str
    values: tuple[tuple[str, Number], ...] = ()
    """Every parameter of the head, in the table's order."""

    @property
    def head(self) -> Head:
        return HEADS[self.name]

    def __str__(self) -> str:
        if not self.values:
            return self.name
        shown = ", ".join(f"{name}={_number(value)}" for name, value in self.values)
        return f"{self.name}({shown})"

    @classmethod
    def parse(cls, text: str, defaults: Mapping[str, Any] | None = None) -> Pooling:
        """A head from ``gem``, ``GeM`` or ``gem(p=4)``: parameters not written take
        ``defaults`` (keyed as options are, ``gem_p``), else the table's defaults."""
        if not isinstance(text, str):
            raise OptionError(f"--pool {text!r} is not a head's name")
        match = re.fullmatch(r"\s*([A-Za-z]\w*)\s*(?:\((.*)\))?\s*", text)
        name = match.group(1).lower() if match else ""
        if name not in HEADS:
            raise OptionError(f"--pool {text.strip()} is not one of {', '.join(HEADS)}")
        head = HEADS[name]
        given = {
            key.removeprefix(f"{name}_"): value
            for key, value in (defaults or {}).items()
            if key.startswith(f"{name}_")
        }
        values = {
            parameter.name: parameter.checked(name, given.get(parameter.name, parameter.default))
            for parameter in head.parameters
        }
        written = match.group(2) if match else None
        if written is not None and written.strip():
            by_name = {parameter.name: parameter for parameter in head.parameters}
            for item in written.split(","):
                key, _, value = item.partition("=")
                key = key.strip().lower()
                if key not in by_name or not value.strip():
                    hint = f"takes {', '.join(by_name)}" if by_name else "takes no parameters"
                    raise OptionError(
                        f"--pool {text.strip()}: {name} {hint}, as {name}(name=value)"
                    )
                number = by_name[key].read(name, value.strip())
                if key in given and given[key] != number:
                    raise OptionError(
                        f"--pool {text.strip()} and --{name}-{key} {given[key]:g} disagree; "
                        "give the parameter once"
                    )
                values[key] = number
        return cls(name, tuple(values.items()))

    def shape(self, map_shape: tuple[int, ...]) -> tuple[int, ...]:
        return self.head.shape(map_shape)

    def __call__(self, maps: Maps) -> Maps:
        """The head applied to a float32 (N, H, W, C) map, in ``keras.ops``."""
        return self.head.code(maps, dict(self.values))

    def attributes(self, map_shape: tuple[int, ...]) -> dict[str, Any]:
        """What a dataset records of its head on maps of ``map_shape``: ``pooling`` (the
        name), each parameter as ``pooling_<name>`` and what else the head says
        (R-MAC's regions as ``pooling_regions``, (R, 3) top, left, side)."""
        facts = self.head.facts(map_shape, dict(self.values)) if self.head.facts else {}
        recorded = {**dict(self.values), **facts}
        return {"pooling": self.name, **{f"pooling_{k}": v for k, v in recorded.items()}}

    @classmethod
    def from_attributes(cls, attributes: Mapping[str, Any]) -> Pooling:
        """The head a dataset's attributes record (a file of before heads: its name only)."""
        name = str(attributes.get("pooling", "none") or "none")
        head = HEADS.get(name)
        parameters = head.parameters if head else ()
        written = ", ".join(
            f"{p.name}={_number(attributes[f'pooling_{p.name}'])}"
            for p in parameters
            if f"pooling_{p.name}" in attributes
        )
        return cls.parse(f"{name}({written})" if written else name)


NO_POOLING = Pooling("none")

#: Between a layer and the head of its own that a dataset's name gives: ``pool5:gem``.
SEPARATOR = ":"


def split_label(label: str) -> tuple[str, str | None]:
    """A dataset's name, ``pool5`` or ``pool5:gem``, as its layer and its own head, if any."""
    layer, separator, head = label.partition(SEPARATOR)
    return layer, head if separator else None


def parameter_options() -> dict[str, tuple[Head, Parameter]]:
    """Every head's parameters by option name (``gem_p`` for ``--gem-p``)."""
    return {
        f"{head.name}_{parameter.name}": (head, parameter)
        for head in HEADS.values()
        for parameter in head.parameters
    }


def _number(value: Any) -> str:
    """A parameter as short as it reads back exactly: 3, 1e-06, 2.5."""
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    return str(value)
