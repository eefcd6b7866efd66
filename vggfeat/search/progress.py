"""How far a search has got, as events: the CLI draws them, the API may ignore them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    """``done`` of ``total`` ``unit``s of one stage (``reading``, ``searching``, ...);
    ``total`` is None while a stage cannot say how long it takes (training an index)."""

    stage: str
    done: int
    total: int | None
    unit: str = "rows"


OnStep = Callable[[Step], None]


def ignore(step: Step) -> None:
    """The default: nobody is watching."""
