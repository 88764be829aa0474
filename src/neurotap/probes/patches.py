"""Patches: ready-made probes that are plain data.

Every patch is a frozen dataclass whose fields are numbers, tuples, indices and
tensors, so it can be described as JSON plus tensors and sent to a server. Each
is called like any probe, ``patch(ctx, value)``, and acts on ``value[index]``
when ``index`` is given. Edits are made out of place, so autograd flows through
them and tensors that other code still holds are never changed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import PatchError
from .context import SaveContext

Index = Any  # anything a tensor can be indexed with: 3, (..., 3681), slice(0, 4), a tensor


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape)


def _tensor_at(ctx: SaveContext, value: Any, patch: Patch) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise PatchError(
            f"{type(patch).__name__} at {ctx.point!r}: the value there is a {type(value).__name__}, not a tensor; "
            f"narrow the point to a tensor inside it, e.g. {ctx.point + '[0]'!r}"
        )
    return value


def _select(ctx: SaveContext, value: torch.Tensor, index: Index, patch: Patch) -> torch.Tensor:
    if index is None:
        return value
    try:
        return value[index]
    except (IndexError, TypeError, RuntimeError, ValueError) as error:
        raise _misfit(ctx, value, patch, error) from None


def _misfit(ctx: SaveContext, value: torch.Tensor, patch: Patch, error: Exception) -> PatchError:
    return PatchError(
        f"{type(patch).__name__} at {ctx.point!r}: index {patch.index!r} does not fit the value of shape "
        f"{_shape(value)}: {error}"
    )


_NUMBERS = (bool, int, float)


def _basic(index: Index) -> bool:
    """Whether ``value[index]`` is a view (ints, slices, ``...``, ``None``), so it can be written in place."""
    for part in index if type(index) is tuple else (index,):
        if not (part is None or part is Ellipsis or type(part) is int or type(part) is slice):
            return False
    return True


def _fitted(ctx: SaveContext, given: Any, target: torch.Tensor, patch: Patch) -> Any:
    """``given`` fitted to the target: a tensor shape-checked and on the target's device and dtype.

    A Python number stays a number, so that no tensor is made for it and nothing
    crosses between devices (a CUDA forward never waits on the host).
    """
    if type(given) in _NUMBERS:
        if (type(given) is float) != target.is_floating_point():
            raise PatchError(
                f"{type(patch).__name__} at {ctx.point!r}: a {type(given).__name__} ({given!r}) cannot stand in "
                f"for the {target.dtype} value there"
            )
        return given
    tensor = given if isinstance(given, torch.Tensor) else torch.as_tensor(given)
    if tensor.is_floating_point() != target.is_floating_point() and tensor.dtype != target.dtype:
        raise PatchError(
            f"{type(patch).__name__} at {ctx.point!r}: a {tensor.dtype} value cannot stand in for the "
            f"{target.dtype} value there"
        )
    try:
        shape = torch.broadcast_shapes(_shape(tensor), _shape(target))
    except RuntimeError:
        shape = None
    if shape != _shape(target):
        raise PatchError(
            f"{type(patch).__name__} at {ctx.point!r}: the patch value has shape {_shape(tensor)}, which does not "
            f"fit the point's shape {_shape(target)}" + ("" if patch.index is None else f" at index {patch.index!r}")
        )
    return tensor.to(device=target.device, dtype=target.dtype)


def _filled(ctx: SaveContext, given: Any, target: torch.Tensor, patch: Patch) -> torch.Tensor:
    """``given`` broadcast to the target's shape, without copying it."""
    fitted = _fitted(ctx, given, target, patch)
    if not isinstance(fitted, torch.Tensor):
        fitted = target.new_full((), fitted)  # made on the target's device, from the number alone
    return fitted.expand_as(target)


def _write(ctx: SaveContext, value: torch.Tensor, patch: Patch, new: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` with ``value[index]`` replaced by ``new(value[index])``, out of place."""
    if patch.index is None:
        return new(value)
    part = _select(ctx, value, patch.index, patch)
    result = value.clone()
    result[patch.index] = new(part)
    return result


class Patch:
    """Base of the declarative probes. Subclasses are dataclasses with an ``index`` field."""

    index: Index = None

    def __call__(self, ctx: SaveContext, value: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class Zero(Patch):
    """Set the value (or ``value[index]``) to zero."""

    index: Index = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "_view", self.index is not None and _basic(self.index))  # worked out once

    def __call__(self, ctx: SaveContext, value: Any) -> Any:
        if type(value) is not torch.Tensor:
            value = _tensor_at(ctx, value, self)
        if self.index is None:
            return torch.zeros_like(value)
        result = value.clone()
        try:
            if self._view:
                result[self.index].zero_()  # a view: written in place, no tensor made for the zero
            else:
                result[self.index] = value.new_zeros(())  # on the value's device: 0 would become a CPU tensor
        except (IndexError, TypeError, RuntimeError, ValueError) as error:
            raise _misfit(ctx, value, self, error) from None
        return result


@dataclass(frozen=True, eq=False)
class Add(Patch):
    """Add ``value`` (broadcast); autograd flows into ``value`` if it requires grad."""

    value: Any = 0.0
    index: Index = None

    def __call__(self, ctx: SaveContext, value: Any) -> Any:
        return _write(ctx, _tensor_at(ctx, value, self), self, lambda part: part + _fitted(ctx, self.value, part, self))


@dataclass(frozen=True, eq=False)
class Replace(Patch):
    """Replace the value (or ``value[index]``) with ``value``, broadcast to its shape."""

    value: Any = None
    index: Index = None

    def __call__(self, ctx: SaveContext, value: Any) -> Any:
        return _write(ctx, _tensor_at(ctx, value, self), self, lambda part: _filled(ctx, self.value, part, self))


@dataclass(frozen=True, eq=False)
class Scale(Patch):
    """Multiply the value (or ``value[index]``) by ``factor``."""

    factor: Any = 1.0
    index: Index = None

    def __call__(self, ctx: SaveContext, value: Any) -> Any:
        return _write(
            ctx, _tensor_at(ctx, value, self), self, lambda part: part * _fitted(ctx, self.factor, part, self)
        )


def _snapshot(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_snapshot(v) for v in value)
    if isinstance(value, list):
        return [_snapshot(v) for v in value]
    if isinstance(value, dict):
        return {k: _snapshot(v) for k, v in value.items()}
    return value


@dataclass(frozen=True, eq=False)
class Record(Patch):
    """Append a detached copy of each value to ``recordings()[point][key]``."""

    index: Index = None
    key: str = "record"

    def __call__(self, ctx: SaveContext, value: Any) -> None:
        if self.index is not None:
            value = _select(ctx, _tensor_at(ctx, value, self), self.index, self)
        # a tensor, the common case, copied here rather than in _snapshot: a Python call less each value (a tap
        # whose one probe is a Record of the whole value does this itself: see model.plan.Tap)
        copied = value.detach().clone() if isinstance(value, torch.Tensor) else _snapshot(value)
        ctx._data.setdefault(self.key, []).append(copied)


def _dims(dims: int | tuple[int, ...] | None, ndim: int) -> tuple[int, ...]:
    if dims is None:
        return tuple(range(ndim))
    return (dims,) if isinstance(dims, int) else tuple(dims)


def _reduced(ctx: SaveContext, value: Any, patch: Any) -> torch.Tensor:
    tensor = _select(ctx, _tensor_at(ctx, value, patch), patch.index, patch).detach()
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _running(ctx: SaveContext, patch: Any, update: torch.Tensor, combine: Callable[[Any, Any], Any]) -> None:
    previous = ctx._data.get(patch.key)
    if previous is not None and previous.shape != update.shape:
        raise PatchError(
            f"{type(patch).__name__} at {ctx.point!r}: this call reduces to shape {_shape(update)} but earlier "
            f"calls gave {_shape(previous)}; reduce over dims that make the result the same every call, "
            "or clear_recordings() in between"
        )
    ctx._data[patch.key] = update if previous is None else combine(previous, update)


@dataclass(frozen=True, eq=False)
class Mean(Patch):
    """Running mean over ``dims`` across every call until ``clear_recordings()``.

    Saves ``key`` (the mean) and ``key + "_count"`` (how many values it averages).
    """

    dims: int | tuple[int, ...] | None = None
    index: Index = None
    key: str = "mean"

    def __call__(self, ctx: SaveContext, value: Any) -> None:
        tensor = _reduced(ctx, value, self)
        dims = _dims(self.dims, tensor.ndim)
        count = 1
        for d in dims:
            count *= tensor.shape[d]
        mean = tensor.mean(dim=dims)
        seen = ctx._data.get(self.key + "_count", 0)
        _running(ctx, self, mean, lambda old, new: old + (new - old) * (count / (seen + count)))
        ctx._data[self.key + "_count"] = seen + count


@dataclass(frozen=True, eq=False)
class Sum(Patch):
    """Running sum over ``dims`` across every call."""

    dims: int | tuple[int, ...] | None = None
    index: Index = None
    key: str = "sum"

    def __call__(self, ctx: SaveContext, value: Any) -> None:
        tensor = _reduced(ctx, value, self)
        _running(ctx, self, tensor.sum(dim=_dims(self.dims, tensor.ndim)), torch.add)


@dataclass(frozen=True, eq=False)
class Max(Patch):
    """Running elementwise maximum over ``dims`` across every call."""

    dims: int | tuple[int, ...] | None = None
    index: Index = None
    key: str = "max"

    def __call__(self, ctx: SaveContext, value: Any) -> None:
        tensor = _reduced(ctx, value, self)
        _running(ctx, self, tensor.amax(dim=_dims(self.dims, tensor.ndim)), torch.maximum)


@dataclass(frozen=True, eq=False)
class Norm(Patch):
    """Append the ``p``-norm over ``dims`` (default: the last) of each value."""

    dims: int | tuple[int, ...] = -1
    p: float = 2.0
    index: Index = None
    key: str = "norm"

    def __call__(self, ctx: SaveContext, value: Any) -> None:
        tensor = _reduced(ctx, value, self)
        ctx._data.setdefault(self.key, []).append(torch.linalg.vector_norm(tensor, ord=self.p, dim=self.dims))


@dataclass(frozen=True, eq=False)
class Project(Patch):
    """Append the dot product of each value's last dimension with ``direction``.

    ``direction`` is a vector ``[d]`` or a stack of them ``[n, d]``; normalise it
    first for a unit projection.
    """

    direction: Any = None
    index: Index = None
    key: str = "projection"

    def __call__(self, ctx: SaveContext, value: Any) -> None:
        tensor = _reduced(ctx, value, self)
        direction = torch.as_tensor(self.direction).to(device=tensor.device, dtype=tensor.dtype)
        if direction.shape[-1] != tensor.shape[-1]:
            raise PatchError(
                f"Project at {ctx.point!r}: the direction has shape {_shape(direction)} but the value's last "
                f"dimension is {tensor.shape[-1]} (value shape {_shape(tensor)})"
            )
        ctx._data.setdefault(self.key, []).append(tensor @ (direction.mT if direction.ndim > 1 else direction))


@dataclass(frozen=True, eq=False)
class Probability(Patch):
    """Append the softmax over the last dimension of each value, at its entry ``token``.

    At the logits, ``Probability(token, index=(slice(None), -1))`` is each row's
    probability of ``token`` at the last position: one number per row, rather
    than the vocabulary's logits. ``token`` may be a list of entries.
    """

    token: Any = 0
    index: Index = None
    key: str = "probability"

    def __call__(self, ctx: SaveContext, value: Any) -> None:
        tensor = _reduced(ctx, value, self)
        try:
            chosen = torch.softmax(tensor, dim=-1)[..., self.token]
        except (IndexError, TypeError, RuntimeError) as error:
            raise PatchError(
                f"Probability at {ctx.point!r}: token {self.token!r} is not an entry of the last dimension of the "
                f"value of shape {_shape(tensor)}: {error}"
            ) from None
        ctx._data.setdefault(self.key, []).append(chosen)


@dataclass(frozen=True, eq=False)
class TopK(Patch):
    """The ``k`` largest values of every unit along ``dim``, across every call.

    Saves ``key + "_values"`` of shape ``[k, units]`` (largest first) and
    ``key + "_where"`` of shape ``[k, units, 1 + other dims]``: for each entry, the
    call it came from (counting from 0 since ``clear_recordings()``) and its
    coordinates in the other dimensions (batch row, position, ...).
    """

    k: int = 10
    dim: int = -1
    index: Index = None
    key: str = "topk"

    def __call__(self, ctx: SaveContext, value: Any) -> None:
        tensor = _reduced(ctx, value, self).movedim(self.dim, -1)
        others = tensor.shape[:-1]
        flat = tensor.reshape(-1, tensor.shape[-1])
        top = flat.topk(min(self.k, flat.shape[0]), dim=0)
        seen = ctx._data.get(self.key + "_calls", 0)
        rows, coords = top.indices, []
        for size in reversed(others):
            coords.append(rows % size)
            rows = rows // size
        coords.append(torch.full_like(rows, seen))
        values, where = top.values, torch.stack(coords[::-1], dim=-1)  # where: [k, units, 1 + len(others)]
        values_key, where_key = self.key + "_values", self.key + "_where"
        if values_key in ctx._data:
            values = torch.cat([ctx._data[values_key], values])
            where = torch.cat([ctx._data[where_key], where])
            top = values.topk(min(self.k, values.shape[0]), dim=0)
            values = top.values
            where = where.gather(0, top.indices[:, :, None].expand(-1, -1, where.shape[-1]))
        ctx._data[values_key] = values
        ctx._data[where_key] = where
        ctx._data[self.key + "_calls"] = seen + 1


@dataclass(frozen=True, eq=False)
class Skip(Patch):
    """Do not run the module at all: its output is ``value``, or its first input when ``value`` is None.

    Only at a module point (``P.output`` or ``P.input``, both meaning module ``P``).
    The default suits residual-shaped modules such as a decoder layer: skipping
    it passes the residual stream on unchanged, and costs nothing. Probes at
    ``P.output`` see ``value``; nothing inside ``P`` fires.
    """

    value: Any = None

    def __call__(self, ctx: SaveContext, value: Any) -> Any:
        raise PatchError(f"Skip at {ctx.point!r}: a skip acts on the call of a module, not on a value")

    def output(self, first_input: Any) -> Any:
        return first_input if self.value is None else self.value


@dataclass(frozen=True, eq=False)
class Custom(Patch):
    """Any probe function ``fn(ctx, value)``; not plain data, so remote only with code allowed."""

    fn: Callable[[SaveContext, Any], Any] = lambda ctx, value: None

    def __call__(self, ctx: SaveContext, value: Any) -> Any:
        return self.fn(ctx, value)


PATCHES: dict[str, type[Patch]] = {
    cls.__name__: cls
    for cls in (Zero, Add, Replace, Scale, Record, Mean, Sum, Max, Norm, Project, Probability, TopK, Skip, Custom)
}
