"""Probes: a function to run at a point, ``fn(ctx, value) -> value | None``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .context import SaveContext

ProbeFn = Callable[[SaveContext, Any], Any]


@dataclass(frozen=True, eq=False, init=False)
class Probe:
    """``fn`` runs at ``point`` on every forward (or, with ``grad``, on every backward).

    ``fn(ctx, value)`` returns a replacement for the value, or None to keep it.
    With ``grad=True`` it gets the gradient at the point during backward instead,
    may return a replacement gradient, and saves to the context ``point + ".grad"``.
    A call in which the point never fires raises ``MissedPointError`` unless the
    probe is ``optional``.
    """

    point: str
    fn: ProbeFn
    grad: bool = False
    optional: bool = False

    def __init__(self, point: str, fn: ProbeFn, grad: bool = False, optional: bool = False) -> None:
        # the fields written into the instance's dict at once: a frozen dataclass's own __init__ sets each
        # through object.__setattr__, several times the cost, and a patch block makes its probes at each entry
        self.__dict__.update(point=point, fn=fn, grad=grad, optional=optional)

    @property
    def context_name(self) -> str:
        return self.point + ".grad" if self.grad else self.point


def probe(point: str, fn: ProbeFn, *, grad: bool = False, optional: bool = False) -> Probe:
    """Make a probe: ``nt.probe("model.layers.0.mlp.mul", fn)``.

    ``optional=True`` where the forward may not reach the point (a branch that is
    not always taken): the call then does not fail when it never fires.
    """
    if not isinstance(point, str):
        raise TypeError(f"a probe's point must be a point name (str), got {type(point).__name__}")
    if not callable(fn):
        raise TypeError(f"a probe's fn must be callable as fn(ctx, value), got {type(fn).__name__}")
    return Probe(point, fn, grad, optional)
