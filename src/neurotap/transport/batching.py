"""How the requests of a batch share forward passes: grouping, padding and cutting.

Requests of a batch with the same settings run as one pass on their
concatenated rows, and the output is split again. Each request's probes see only
the request's own rows (``value[rows]``); a replacement they return goes back
into those rows only.

Token inputs of different lengths share a pass too, for models whose forward
takes an ``attention_mask``: the ids are padded on the right to the longest, the
mask covers the padding and ``position_ids`` count from 0 in every row, so the
real positions of a causal model compute what they compute alone. A probe then
sees ``value[rows]`` cut to the request's own length along every sequence
dimension, and the output and the request's loss are cut the same way. A padded
pass computes at most ``max_pad_ratio`` times the positions its requests hold.

Which dimensions are sequence dimensions is read once per point from two small
runs (:data:`ALONE_READING` and :data:`PADDED_READING`: different batch sizes and
lengths, one as a request runs alone, one padded as a shared pass runs); a value
whose layout those runs do not pin down (no batch dimension in front, no
sequence dimension, a shape that changes with the padding) keeps its request to
passes with inputs of its own length.

A probe at a value without the batch dimension in front (rotary tables, shared
masks) raises :class:`Unbatchable`; the executor then runs the pass's requests
apart (those of a padded pass in unpadded passes, one per input length). Any
other failure that cannot be pinned on one request runs each request on its own.
Greedy generations of one prompt length and the same settings share a pass
too (:func:`shared_generation`): the rows are independent, a row that finishes
early only pads, and each request's probes stop firing, and its output is cut,
at the step where all its rows had finished, so it gets exactly what it gets
alone. Sampled and beam-search generations run alone, since their random draws
and beams depend on the whole batch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import NeurotapError
from .wire import Output, RunRequest


class Unbatchable(NeurotapError):
    """A probe met a value without the batch dimension in front while requests shared a pass."""


# (rows, length) of the two shape readings: one as a request runs alone, one padded as a shared pass runs
ALONE_READING = (2, 5)
PADDED_READING = (3, 7)


# -- walking model outputs ---------------------------------------------------------------------------


def _is_sequence(value: Any) -> bool:
    """A list or tuple to walk into; named tuples are left whole."""
    return isinstance(value, (list, tuple)) and not hasattr(value, "_fields")


def _is_plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _has_rows(value: Any, total: int) -> bool:
    """Whether ``value`` has a pass's ``total`` rows along its first dimension."""
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == total


def _map_tensors(value: Any, fn: Callable[[torch.Tensor, tuple], Any], path: tuple = ()) -> Any:
    """``value`` with each tensor in it replaced by ``fn(tensor, path)``; the path holds the keys leading to it."""
    if isinstance(value, torch.Tensor):
        return fn(value, path)
    if _is_sequence(value):
        items = [_map_tensors(v, fn, (*path, k)) for k, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, Mapping):
        items = {k: _map_tensors(v, fn, (*path, k)) for k, v in value.items()}
        return items if type(value) is dict else Output(items)
    return value


def _tensor_leaves(value: Any) -> dict[tuple, torch.Tensor]:
    leaves: dict[tuple, torch.Tensor] = {}
    _map_tensors(value, lambda tensor, path: leaves.setdefault(path, tensor))
    return leaves


def rows_of(value: Any, rows: slice, total: int) -> Any:
    """One request's part of a shared pass's output: its rows of every tensor that has the pass's rows."""
    return _map_tensors(value, lambda tensor, _: tensor[rows] if _has_rows(tensor, total) else tensor)


# -- layouts -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where a value of a padded pass keeps its rows (dimension 0) and its positions."""

    ndim: int
    sequence_dims: tuple[int, ...]

    def index(self, rows: slice, length: int) -> tuple:
        index: list[Any] = [slice(None)] * self.ndim
        index[0] = rows
        for dim in self.sequence_dims:
            index[dim] = slice(0, length)
        return tuple(index)

    def fits(self, value: Any, total: int, padded_length: int) -> bool:
        return (
            _has_rows(value, total)
            and value.dim() == self.ndim
            and all(value.shape[d] == padded_length for d in self.sequence_dims)
        )


def _layout(alone: tuple | None, padded: tuple | None) -> Layout | None:
    """The layout of a value from its shapes in the two readings; None where they do not pin one down."""
    if alone is None or padded is None or len(alone) != len(padded) or not alone:
        return None
    if (alone[0], padded[0]) != (ALONE_READING[0], PADDED_READING[0]):
        return None
    sequence_dims = []
    for dim in range(1, len(alone)):
        if (alone[dim], padded[dim]) == (ALONE_READING[1], PADDED_READING[1]):
            sequence_dims.append(dim)
        elif alone[dim] != padded[dim]:
            return None
    # without a sequence dimension the value may pool over positions, padding included
    return Layout(len(alone), tuple(sequence_dims)) if sequence_dims else None


def point_layouts(alone: list, padded: list) -> tuple[Layout, ...] | None:
    """One layout per call of a point in a forward, or None."""
    if not alone or len(alone) != len(padded):
        return None
    layouts = tuple(_layout(a, p) for a, p in zip(alone, padded))
    return None if None in layouts else layouts


def output_layouts(alone: Any, padded: Any) -> dict[tuple, Layout] | None:
    """The layout of every tensor in a model output, or None if one has none."""
    alone_leaves, padded_leaves = _tensor_leaves(alone), _tensor_leaves(padded)
    if alone_leaves.keys() != padded_leaves.keys():
        return None
    layouts = {}
    for path, tensor in alone_leaves.items():
        layout = _layout(tuple(tensor.shape), tuple(padded_leaves[path].shape))
        if layout is None:
            return None
        layouts[path] = layout
    return layouts


class Readings:
    """What the shape readings learnt for one kind of call: output and point layouts (None: none)."""

    def __init__(self) -> None:
        self.read = False
        self.output: dict[tuple, Layout] | None = None
        self.points: dict[str, tuple[Layout, ...] | None] = {}


def cut(value: Any, layouts: dict[tuple, Layout], rows: slice, length: int) -> Any:
    """One request's part of a padded pass's output: its rows, its positions."""
    return _map_tensors(value, lambda tensor, path: tensor[layouts[path].index(rows, length)])


@dataclass(frozen=True)
class View:
    """What of a shared pass's values one request sees: its rows and, when padded, its positions."""

    rows: slice
    total: int
    length: int = 0
    padded_length: int = 0
    layouts: tuple[Layout, ...] | None = None  # per call; None: rows only

    def part(self, value: Any, name: str, call: int) -> tuple[Any, tuple | slice]:
        """The request's part of ``value`` and the index that takes it."""
        if self.layouts is None:
            if _has_rows(value, self.total):
                return value[self.rows], self.rows
            raise Unbatchable(f"the value at {name!r} has no batch dimension in front")
        layout = self.layouts[call] if call < len(self.layouts) else None
        if layout is None or not layout.fits(value, self.total, self.padded_length):
            raise Unbatchable(f"the value at {name!r} is not laid out as the shape readings said")
        index = layout.index(self.rows, self.length)
        return value[index], index


# -- requests ----------------------------------------------------------------------------------------


def _first_size(request: RunRequest, dim: int, default: int) -> int:
    """Size ``dim`` of the request's first input tensor that has that dimension."""
    for value in [*request.args, *request.kwargs.values()]:
        if isinstance(value, torch.Tensor) and value.dim() > dim:
            return value.shape[dim]
    return default


def request_rows(request: RunRequest) -> int:
    return _first_size(request, 0, 1)


def request_length(request: RunRequest) -> int:
    return _first_size(request, 1, 0)


_GREEDY_ONLY = (
    "return_dict_in_generate",
    "output_scores",
    "output_logits",
    "output_attentions",
    "output_hidden_states",
)


def batch_key(request: RunRequest, max_rows: int, *, greedy_default: bool = True) -> tuple | None:
    """Requests with equal keys can share one pass unpadded; None: this one runs alone.

    ``greedy_default``: whether the model generates greedily when a request does not say.
    """
    if request.op == "generate":
        kwargs = request.kwargs
        sampled = kwargs.get("do_sample", not greedy_default) or (kwargs.get("num_beams") or 1) > 1
        if sampled or (kwargs.get("num_return_sequences") or 1) > 1 or any(kwargs.get(k) for k in _GREEDY_ONLY):
            return None
    rows = None
    signature = []
    named = [(None, v) for v in request.args] + sorted(request.kwargs.items(), key=lambda kv: kv[0])
    for name, value in named:
        if isinstance(value, torch.Tensor):
            if value.dim() == 0 or (rows is not None and value.shape[0] != rows):
                return None
            rows = value.shape[0]
            signature.append((name, "tensor", str(value.dtype), tuple(value.shape[1:])))
        elif _is_plain(value) or (isinstance(value, list) and all(_is_plain(v) for v in value)):
            signature.append((name, "value", json.dumps(value)))
        else:
            return None
    if rows is None or rows > max_rows:
        return None
    return (request.op, tuple(signature))


@dataclass(frozen=True)
class Tokens:
    """A request's token ids, if it can be padded: ``key`` says which requests can share a padded pass."""

    ids: torch.Tensor
    key: tuple  # how ids are passed, whether a mask came along, their dtypes, the other (scalar) kwargs
    scalars: dict[str, Any]
    mask_dtype: torch.dtype | None

    @property
    def length(self) -> int:
        return self.ids.shape[1]

    @property
    def by_name(self) -> bool:
        """Whether the ids came as a keyword argument rather than positionally."""
        return self.key[0] == "kwargs"


def tokens_of(request: RunRequest, input_name: str, max_rows: int) -> Tokens | None:
    """The request's token ids if it can share a padded pass: ids ``[rows, length]`` (passed positionally or as
    ``input_name``), at most an all-ones ``attention_mask`` besides, and plain values for the other arguments."""
    if request.op not in ("forward", "backward"):
        return None
    kwargs = dict(request.kwargs)
    if len(request.args) == 1 and input_name not in kwargs:
        ids, passed = request.args[0], "args"
    elif not request.args and input_name in kwargs:
        ids, passed = kwargs.pop(input_name), "kwargs"
    else:
        return None
    if (
        not isinstance(ids, torch.Tensor)
        or ids.dim() != 2
        or ids.is_floating_point()
        or ids.is_complex()
        or ids.dtype == torch.bool
        or 0 in ids.shape
        or ids.shape[0] > max_rows
    ):
        return None
    mask = kwargs.pop("attention_mask", None)
    if mask is not None:
        # a mask with holes makes positions that see nothing, which padding would change
        if not isinstance(mask, torch.Tensor) or mask.shape != ids.shape or not bool((mask == 1).all()):
            return None
    scalars = {}
    for name, value in sorted(kwargs.items()):
        if not _is_plain(value):
            return None
        scalars[name] = value
    mask_dtype = None if mask is None else mask.dtype
    key = (passed, str(ids.dtype), str(ids.device), str(mask_dtype), json.dumps(scalars))
    return Tokens(ids, key, scalars, mask_dtype)


# -- grouping ----------------------------------------------------------------------------------------


@dataclass
class Group:
    """The requests of one pass, by their index in the batch."""

    indices: list[int]
    key: tuple | None
    padded: bool  # requests of different lengths may share the pass
    rows: int = 0
    longest: int = 0
    tokens: int = 0
    cost: int = 0  # estimated activation bytes of its requests together


def pack(
    batch: Sequence[RunRequest],
    indices: list[int],
    tokens: dict[int, Tokens],
    *,
    max_rows: int,
    max_pad_ratio: float,
    costs: Mapping[int, int] | None = None,
    max_cost: int | None = None,
    greedy_default: bool = True,
) -> list[Group]:
    """The passes for the requests at ``indices``, in an order that keeps each session's requests in arrival
    order; ``tokens`` holds the requests that may share a padded pass. A pass holds requests whose ``costs``
    (estimated activation bytes) add up to at most ``max_cost``, twice that where padding may double it."""
    groups: list[Group] = []
    last_group: dict[str, int] = {}
    for index in indices:
        request = batch[index]
        found = tokens.get(index)
        size, length = request_rows(request), found.length if found is not None else 0
        cost = costs.get(index, 0) if costs else 0
        key = (
            ("padded", request.op, found.key)
            if found is not None
            else batch_key(request, max_rows, greedy_default=greedy_default)
        )
        chosen = None
        if key is not None:
            for g in range(last_group.get(request.session, -1) + 1, len(groups)):
                group = groups[g]
                if group.key != key or group.rows + size > max_rows:
                    continue
                if max_cost is not None and group.cost + cost > max_cost:
                    continue
                if found is not None:
                    cells = (group.rows + size) * max(group.longest, length)
                    if cells > max_pad_ratio * (group.tokens + size * length):
                        continue
                chosen = g
                break
        if chosen is None:
            groups.append(Group([], key, found is not None))
            chosen = len(groups) - 1
        group = groups[chosen]
        group.indices.append(index)
        group.rows += size
        group.longest = max(group.longest, length)
        group.tokens += size * length
        group.cost += cost
        last_group[request.session] = chosen
    return groups


# -- inputs of a pass --------------------------------------------------------------------------------


def pad_id(config: Any, tokenizer: Any) -> int:
    """The id padded positions hold; they are masked, so any id in the vocabulary will do."""
    vocab = getattr(config, "vocab_size", None)
    for source in (config, tokenizer):
        pad = getattr(source, "pad_token_id", None)
        if isinstance(pad, int) and not isinstance(pad, bool) and pad >= 0 and (vocab is None or pad < vocab):
            return pad
    return 0


def padded_inputs(
    tokens: list[Tokens], row_slices: list[slice], total: int, length: int, *, pad: int, positions: bool
) -> tuple[tuple, dict[str, Any]]:
    """The arguments of a padded pass: ids padded on the right with ``pad``, the mask, and ``position_ids``
    counting from 0 in every row where the model takes them (``positions``)."""
    first = tokens[0].ids
    ids = torch.full((total, length), pad, dtype=first.dtype, device=first.device)
    mask = torch.zeros((total, length), dtype=tokens[0].mask_dtype or torch.long, device=first.device)
    for rows, found in zip(row_slices, tokens):
        ids[rows, : found.length] = found.ids
        mask[rows, : found.length] = 1
    kwargs = {**tokens[0].scalars, "attention_mask": mask}
    if positions:
        kwargs["position_ids"] = torch.arange(length, device=first.device).expand(total, -1)
    return (ids,), kwargs


def concatenated(requests: list[RunRequest]) -> tuple[tuple, dict[str, Any]]:
    """The arguments of an unpadded shared pass: every tensor argument concatenated along its rows."""
    first = requests[0]
    args = tuple(
        torch.cat([r.args[i] for r in requests]) if isinstance(value, torch.Tensor) else value
        for i, value in enumerate(first.args)
    )
    kwargs = {
        name: torch.cat([r.kwargs[name] for r in requests]) if isinstance(value, torch.Tensor) else value
        for name, value in first.kwargs.items()
    }
    return args, kwargs


def shared_generation(prompt: int, row_slices: list[slice], eos: list[int]) -> tuple[Any, list[int | None]]:
    """A stopping criterion for a shared greedy generation that stops nothing but notes, for each request,
    how many tokens it had generated when all its rows had produced an end-of-sequence token."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    finished: list[int | None] = [None] * len(row_slices)

    class Watch(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            generated = input_ids[:, prompt:]
            if eos:
                ended = torch.isin(generated, torch.tensor(eos, device=generated.device)).any(dim=1)
                for k, rows in enumerate(row_slices):
                    if finished[k] is None and bool(ended[rows].all()):
                        finished[k] = generated.shape[1]
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([Watch()]), finished
