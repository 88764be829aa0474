"""``Trace``: the values at chosen points during one call, returned by ``m.run``."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from .._html import brief, table
from ..errors import NeurotapError
from ..points import is_pattern, matching, unknown_point


class Trace(Mapping):
    """The values one call computed at the recorded points, detached copies, in execution order.

    ``trace[name]`` is the value at a point (by the concrete name: a pattern
    given to ``record=`` is recorded under each point it matched);
    ``trace.stack(pattern)`` stacks the matches of a pattern along a new first
    dimension, in execution order (``"blocks.*.resid_post"`` -> ``[layers, batch,
    seq, d]``); ``trace.calls(name)`` lists every value of a point that fired
    more than once; ``trace.points`` names them all. ``trace.grad`` is a Trace of
    the gradients at the points given to ``grad=`` (empty without), and
    ``trace.loss`` the loss of a run with ``loss=`` (else None).

    A Trace is plain data: build one from ``{name: [value of each call]}``.
    """

    def __init__(
        self,
        values: Mapping[str, Sequence[Any]],
        grad: Trace | Mapping[str, Sequence[Any]] | None = None,
        loss: float | None = None,
    ) -> None:
        self._values = {name: list(calls) for name, calls in values.items()}
        self._grad = grad
        self.loss = loss

    @property
    def grad(self) -> Trace:
        """The gradients at the points given to ``grad=``, as a Trace of their own."""
        if not isinstance(self._grad, Trace):
            self._grad = Trace(self._grad or {})
        return self._grad

    @property
    def points(self) -> list[str]:
        """The recorded point names, in execution order."""
        return list(self._values)

    def calls(self, name: str) -> list[Any]:
        """The value at ``name`` each time it fired in the call, in order."""
        try:
            return list(self._values[name])
        except KeyError:
            raise self._unknown(name) from None

    def __getitem__(self, name: str) -> Any:
        if name not in self._values:
            if is_pattern(name):
                raise NeurotapError(f"trace[...] takes one point name; for the matches of {name!r}, trace.stack()")
            raise self._unknown(name)
        values = self._values[name]
        if len(values) != 1:
            raise NeurotapError(
                f"{name!r} fired {len(values)} times in this call; trace.calls({name!r}) lists every value"
            )
        return values[0]

    def stack(self, pattern: str) -> torch.Tensor:
        """The values at the points ``pattern`` matches, stacked along a new first dimension, in execution order."""
        names = matching(pattern, self._values)
        if not names:
            raise self._unknown(pattern)
        values = [self[name] for name in names]
        shapes = {tuple(getattr(v, "shape", ())) for v in values}
        if len(shapes) != 1 or not all(isinstance(v, torch.Tensor) for v in values):
            listed = ", ".join(f"{n} {tuple(getattr(v, 'shape', ()))}" for n, v in zip(names, values))
            raise NeurotapError(f"cannot stack the values at {pattern!r}: they are not tensors of one shape ({listed})")
        return torch.stack(values)

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        head = f"Trace({len(self)} points" + (f", {len(self.grad)} gradients" if self.grad else "")
        head += f", loss={self.loss:.4g})" if self.loss is not None else ")"
        rows = [("", name, calls) for name, calls in self._values.items()]
        rows += [("grad ", name, calls) for name, calls in (self.grad._values.items() if self.grad else ())]
        if len(rows) > 40:
            rows = [*rows[:30], ("", "...", []), *rows[-5:]]
        width = max((len(kind + name) for kind, name, _ in rows), default=0)
        lines = [head]
        for kind, name, calls in rows:
            lines.append(f"  {(kind + name).ljust(width)}  {_describe(calls)}".rstrip())
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        rows = [("value", name, len(calls), brief(calls[0]) if calls else "") for name, calls in self._values.items()]
        grads = self.grad._values.items() if self.grad else ()
        rows += [("grad", name, len(calls), brief(calls[0]) if calls else "") for name, calls in grads]
        loss = "" if self.loss is None else f"<b>loss {self.loss:.6g}</b>"
        return loss + table(["", "point", "calls", "value (the first call's)"], rows)

    def _unknown(self, name: str) -> Exception:
        error = unknown_point(name, self._values)
        return type(error)(str(error).replace("in this model", "in this trace").split(". List")[0] + ".")


def _describe(calls: list[Any]) -> str:
    if not calls:
        return ""
    first = calls[0]
    if isinstance(first, torch.Tensor):
        text = f"{tuple(first.shape)}  {str(first.dtype).removeprefix('torch.')}"
    else:
        text = type(first).__name__
    return text + (f"  ({len(calls)} calls)" if len(calls) > 1 else "")
