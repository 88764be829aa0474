"""Running requests: the interface the HTTP layer talks to, and the in-process executor.

The server hands an :class:`Executor` a batch of :class:`RunRequest` and gets one
:class:`RunResult` per request back; sessions' save contexts live in the
executor, next to the model, so a multi-process executor for a sharded model can
take this one's place without the HTTP layer changing.

The in-process executor batches dynamically: requests of the batch with the same
settings run as one forward pass on their concatenated rows, and the output is
split again. Each request's probes see only the request's own rows
(``value[rows]``) and write to the request's own session; a replacement they
return goes back into those rows only.

Token inputs of different lengths share a pass too, for models whose forward
takes an ``attention_mask``: the ids are padded on the right to the longest, the
mask covers the padding and ``position_ids`` count from 0 in every row, so the
real positions of a causal model compute what they compute alone. A probe then
sees ``value[rows]`` cut to the request's own length along every sequence
dimension, and the output and the request's loss are cut the same way. Which
dimensions are sequence dimensions is read once per point from two small runs
(different batch sizes and lengths, one as a request runs alone, one padded as a
shared pass runs); a value whose layout those runs do not pin down (no batch
dimension in front, no sequence dimension, a shape that changes with the
padding) keeps its request to passes with inputs of its own length.

A probe at a value without the batch dimension in front (rotary tables, shared
masks) makes the batch fall back to one pass per request, as does any failure
that cannot be pinned on one request. Save contexts are staged: a request's
recordings are committed only when it succeeds and fits its session's byte
limit, so a failed request leaves nothing half-recorded.
"""

from __future__ import annotations

import abc
import collections
import concurrent.futures
import inspect
import json
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import NeurotapError, PatchError, ProbeError, UnknownPointError
from ..model import Model
from ..probes import SaveContext, probe
from .wire import CodeNotAllowedError, ErrorInfo, Output, RunRequest, RunResult, WireError, logits_of


class RequestTimeoutError(NeurotapError, TimeoutError):
    """A request ran past the server's request timeout."""


class RecordingLimitError(NeurotapError):
    """A session's recordings would grow past the server's per-session limit."""


class _Unbatchable(NeurotapError):
    """A probe met a value without the batch dimension in front while requests shared a pass."""


class _RequestFailed(NeurotapError):
    """What one request of a shared pass caused; the others run again without it."""

    def __init__(self, index: int, error: BaseException) -> None:
        super().__init__(str(error))
        self.index = index
        self.error = error


def error_info(error: BaseException) -> ErrorInfo:
    """The HTTP status and JSON error for an exception raised while serving a request."""
    cause = error.__cause__ if isinstance(error, ProbeError) and error.__cause__ is not None else None
    status = 422
    if isinstance(error, WireError):
        status = 400
    elif isinstance(error, UnknownPointError):
        status = 404
    elif isinstance(error, CodeNotAllowedError):
        status = 403
    elif isinstance(error, RecordingLimitError):
        status = 413
    elif isinstance(error, RequestTimeoutError):
        status = 504
    name = type(error).__name__
    if not isinstance(error, NeurotapError):
        name = "ModelError"  # the model itself refused the inputs
        message = f"the model raised {type(error).__name__}: {error}"
    else:
        message = str(error)
    trace = None
    if isinstance(error, ProbeError):
        trace = "".join(traceback.format_exception(cause or error))
    return ErrorInfo(status, name, message, trace)


class Executor(abc.ABC):
    """Runs batches of requests against one model; every method is called from one thread."""

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON facts about the model: its class, parameter count, vocabulary size, ..."""

    @abc.abstractmethod
    def points(self, prefix: str | None) -> list[dict[str, Any]]:
        """The inventory as ``Point.to_dict()`` rows; UnknownPointError for a prefix with none."""

    @abc.abstractmethod
    def aliases(self) -> dict[str, str]:
        """Short canonical point names -> raw point names."""

    @abc.abstractmethod
    def execute(self, batch: Sequence[RunRequest]) -> list[RunResult]:
        """Run a batch; one result (or error) per request, in order."""

    @abc.abstractmethod
    def recordings(self, session: str) -> dict[str, dict[str, Any]]:
        """A snapshot of a session's save contexts: ``{context name: {key: value}}``."""

    @abc.abstractmethod
    def clear_recordings(self, session: str) -> None: ...

    @abc.abstractmethod
    def close_session(self, session: str) -> None: ...

    @abc.abstractmethod
    def get_parameter(self, name: str) -> torch.Tensor: ...


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, Mapping):
        return sum(_nbytes(v) for v in value.values())
    return 0


def _staged_copy(ctx: SaveContext | None, name: str) -> SaveContext:
    """A context to write to; lists are copied because Record and Norm append in place."""
    staged = SaveContext(name)
    if ctx is not None:
        staged._data.update({k: list(v) if isinstance(v, list) else v for k, v in ctx._data.items()})
    return staged


def _sendable(value: Any) -> Any:
    """The parts of a model output that travel: tensors and numbers; caches and other objects are left out."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        items = [_sendable(v) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, Mapping):
        kept = {k: _sendable(v) for k, v in value.items() if isinstance(k, str)}
        kept = {k: v for k, v in kept.items() if v is not _DROPPED}
        return kept if type(value) is dict else Output(kept)
    return _DROPPED


_DROPPED = object()


def _rows_of(value: Any, rows: slice, total: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value[rows] if value.dim() and value.shape[0] == total else value
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        items = [_rows_of(v, rows, total) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, Mapping):
        items = {k: _rows_of(v, rows, total) for k, v in value.items()}
        return items if type(value) is dict else Output(items)
    return value


# (rows, length) of the two shape readings: one as a request runs alone, one padded as a shared pass runs
_ALONE_READING = (2, 5)
_PADDED_READING = (3, 7)


@dataclass(frozen=True)
class _Layout:
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
            isinstance(value, torch.Tensor)
            and value.dim() == self.ndim
            and value.shape[0] == total
            and all(value.shape[d] == padded_length for d in self.sequence_dims)
        )


def _layout(alone: tuple | None, padded: tuple | None) -> _Layout | None:
    """The layout of a value from its shapes in the two readings; None where they do not pin one down."""
    if alone is None or padded is None or len(alone) != len(padded) or not alone:
        return None
    if (alone[0], padded[0]) != (_ALONE_READING[0], _PADDED_READING[0]):
        return None
    sequence_dims = []
    for dim in range(1, len(alone)):
        if (alone[dim], padded[dim]) == (_ALONE_READING[1], _PADDED_READING[1]):
            sequence_dims.append(dim)
        elif alone[dim] != padded[dim]:
            return None
    # without a sequence dimension the value may pool over positions, padding included
    return _Layout(len(alone), tuple(sequence_dims)) if sequence_dims else None


def _point_layouts(alone: list, padded: list) -> tuple[_Layout, ...] | None:
    """One layout per call of a point in a forward, or None."""
    if not alone or len(alone) != len(padded):
        return None
    layouts = tuple(_layout(a, p) for a, p in zip(alone, padded))
    return None if None in layouts else layouts


def _tensor_leaves(value: Any, path: tuple = ()) -> dict[tuple, torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return {path: value}
    leaves: dict[tuple, torch.Tensor] = {}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        for k, item in enumerate(value):
            leaves.update(_tensor_leaves(item, (*path, k)))
    elif isinstance(value, Mapping):
        for key, item in value.items():
            leaves.update(_tensor_leaves(item, (*path, key)))
    return leaves


def _output_layouts(alone: Any, padded: Any) -> dict[tuple, _Layout] | None:
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


def _cut(value: Any, layouts: dict[tuple, _Layout], rows: slice, length: int, path: tuple = ()) -> Any:
    """One request's part of a padded pass's output: its rows, its positions."""
    if isinstance(value, torch.Tensor):
        return value[layouts[path].index(rows, length)]
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        items = [_cut(v, layouts, rows, length, (*path, k)) for k, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, Mapping):
        items = {k: _cut(v, layouts, rows, length, (*path, k)) for k, v in value.items()}
        return items if type(value) is dict else Output(items)
    return value


@dataclass(frozen=True)
class _Tokens:
    """A request's token ids, if it can be padded: ``key`` says which requests can share a padded pass."""

    ids: torch.Tensor
    key: tuple  # how ids are passed, whether a mask came along, their dtypes, the other (scalar) kwargs
    scalars: dict[str, Any]
    mask_dtype: torch.dtype | None

    @property
    def length(self) -> int:
        return self.ids.shape[1]


class _Readings:
    """What the shape readings learnt for one kind of call: output and point layouts (None: none)."""

    def __init__(self) -> None:
        self.read = False
        self.output: dict[tuple, _Layout] | None = None
        self.points: dict[str, tuple[_Layout, ...] | None] = {}


@dataclass
class _Group:
    indices: list[int]
    key: tuple | None
    padded: bool  # requests of different lengths may share the pass
    rows: int = 0
    longest: int = 0
    tokens: int = 0


@dataclass(frozen=True)
class _View:
    """What of a shared pass's values one request sees: its rows and, when padded, its positions."""

    rows: slice
    total: int
    length: int = 0
    padded_length: int = 0
    layouts: tuple[_Layout, ...] | None = None  # per call; None: rows only

    def part(self, value: Any, name: str, call: int) -> tuple[Any, tuple | slice]:
        if self.layouts is None:
            if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == self.total:
                return value[self.rows], self.rows
            raise _Unbatchable(f"the value at {name!r} has no batch dimension in front")
        layout = self.layouts[call] if call < len(self.layouts) else None
        if layout is None or not layout.fits(value, self.total, self.padded_length):
            raise _Unbatchable(f"the value at {name!r} is not laid out as the shape readings said")
        index = layout.index(self.rows, self.length)
        return value[index], index


class InProcessExecutor(Executor):
    """Runs requests on an ``nt.Model`` in this process, batching those that can share a pass.

    ``max_pad_ratio`` bounds the work padding adds: a padded pass computes at most
    that many times the positions its requests hold.
    """

    def __init__(
        self,
        model: Model,
        *,
        max_session_bytes: int = 1 << 30,
        max_batch_rows: int = 64,
        max_tokens: int = 1 << 16,
        max_pad_ratio: float = 2.0,
    ) -> None:
        self.model = model
        self.max_session_bytes = max_session_bytes
        self.max_batch_rows = max_batch_rows
        self.max_tokens = max_tokens
        self.max_pad_ratio = max_pad_ratio
        self._sessions: dict[str, dict[str, SaveContext]] = {}
        self._session_bytes: dict[str, dict[str, int]] = {}
        self._deadline: float | None = None
        self.passes = 0  # forward passes run, against requests run: how much batching happened
        self.requests = 0
        self.padded_passes = 0
        config = getattr(model.module, "config", None)
        self._max_positions = getattr(config, "max_position_embeddings", None)
        try:
            parameters = inspect.signature(model.module.forward).parameters
        except (TypeError, ValueError):
            parameters = {}
        self._input_name = getattr(model.module, "main_input_name", "input_ids")
        self._pads = "attention_mask" in parameters and (self._max_positions or 8) >= _PADDED_READING[1]
        self._takes_positions = "position_ids" in parameters
        self._pad_id = _pad_id(config, model.tokenizer)
        self._readings: dict[tuple, _Readings] = {}
        # checked before every forward, so a long generate stops between steps once its time is up
        model.module.register_forward_pre_hook(self._check_deadline)

    # -- facts ---------------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        module = self.model.module
        config = getattr(module, "config", None)
        return {
            "module": type(module).__name__,
            "parameters": sum(p.numel() for p in module.parameters()),
            "vocab_size": getattr(config, "vocab_size", None),
            "max_position_embeddings": self._max_positions,
            "has_generate": hasattr(module, "generate"),
            "requests": self.requests,
            "passes": self.passes,
            "padded_passes": self.padded_passes,
        }

    def points(self, prefix: str | None) -> list[dict[str, Any]]:
        return [p.to_dict() for p in self.model.points(prefix)]

    def aliases(self) -> dict[str, str]:
        return self.model.aliases()

    def get_parameter(self, name: str) -> torch.Tensor:
        return self.model.get_parameter(name).detach()

    # -- sessions ------------------------------------------------------------------------------------

    def recordings(self, session: str) -> dict[str, dict[str, Any]]:
        return {name: dict(ctx._data) for name, ctx in self._sessions.get(session, {}).items() if len(ctx)}

    def clear_recordings(self, session: str) -> None:
        self._sessions.pop(session, None)
        self._session_bytes.pop(session, None)

    def close_session(self, session: str) -> None:
        self.clear_recordings(session)

    # -- running -------------------------------------------------------------------------------------

    def _check_deadline(self, *_: Any) -> None:
        if self._deadline is not None and time.time() > self._deadline:
            raise RequestTimeoutError("the request ran past the server's request timeout (--request-timeout)")

    def execute(self, batch: Sequence[RunRequest]) -> list[RunResult]:
        results: list[RunResult | None] = [None] * len(batch)
        self.requests += len(batch)
        for group in self._groups(batch, results):
            self._run_group(batch, group.indices, results, group.padded)
        return [r if r is not None else RunResult(error=error_info(NeurotapError("not run"))) for r in results]

    def _check_inputs(self, request: RunRequest) -> None:
        for value in [*request.args, *request.kwargs.values()]:
            if not isinstance(value, torch.Tensor):
                continue
            if value.numel() > self.max_tokens:
                raise WireError(f"an input tensor has {value.numel()} elements; this server takes {self.max_tokens}")
            if (
                self._max_positions
                and not value.is_floating_point()
                and value.dim() >= 1
                and value.shape[-1] > self._max_positions
            ):
                raise WireError(
                    f"an input of length {value.shape[-1]} is longer than the model's "
                    f"{self._max_positions} positions (max_position_embeddings)"
                )

    def _batch_key(self, request: RunRequest) -> tuple | None:
        """Requests with equal keys can share one pass; None: this one runs alone."""
        if request.op == "generate":
            return None  # rows that finish early would change the other rows' steps
        rows = None
        signature = []
        named = [(None, v) for v in request.args] + sorted(request.kwargs.items(), key=lambda kv: kv[0])
        for name, value in named:
            if isinstance(value, torch.Tensor):
                if value.dim() == 0 or (rows is not None and value.shape[0] != rows):
                    return None
                rows = value.shape[0]
                signature.append((name, "tensor", str(value.dtype), tuple(value.shape[1:])))
            elif value is None or isinstance(value, (bool, int, float, str)):
                signature.append((name, "value", json.dumps(value)))
            else:
                return None
        if rows is None or rows > self.max_batch_rows:
            return None
        return (request.op, tuple(signature))

    def _tokens(self, request: RunRequest) -> _Tokens | None:
        """The request's token ids if it can share a padded pass: ids ``[rows, length]``, at most an all-ones
        ``attention_mask`` besides, and plain values for the other arguments."""
        if not self._pads or request.op not in ("forward", "backward"):
            return None
        kwargs = dict(request.kwargs)
        if len(request.args) == 1 and self._input_name not in kwargs:
            ids, passed = request.args[0], "args"
        elif not request.args and self._input_name in kwargs:
            ids, passed = kwargs.pop(self._input_name), "kwargs"
        else:
            return None
        if (
            not isinstance(ids, torch.Tensor)
            or ids.dim() != 2
            or ids.is_floating_point()
            or ids.is_complex()
            or ids.dtype == torch.bool
            or 0 in ids.shape
            or ids.shape[0] > self.max_batch_rows
        ):
            return None
        mask = kwargs.pop("attention_mask", None)
        if mask is not None:
            # a mask with holes makes positions that see nothing, which padding would change
            if not isinstance(mask, torch.Tensor) or mask.shape != ids.shape or not bool((mask == 1).all()):
                return None
        scalars = {}
        for name, value in sorted(kwargs.items()):
            if not (value is None or isinstance(value, (bool, int, float, str))):
                return None
            scalars[name] = value
        mask_dtype = None if mask is None else mask.dtype
        key = (passed, str(ids.dtype), str(ids.device), str(mask_dtype), json.dumps(scalars))
        return _Tokens(ids, key, scalars, mask_dtype)

    def _groups(self, batch: Sequence[RunRequest], results: list) -> list[_Group]:
        """The passes, in an order that keeps each session's requests in arrival order."""
        tokens: dict[int, _Tokens] = {}
        lengths: dict[tuple, set[int]] = collections.defaultdict(set)
        for index, request in enumerate(batch):
            try:
                self._check_inputs(request)
            except NeurotapError as error:
                results[index] = RunResult(error=error_info(error))
                continue
            found = self._tokens(request)
            if found is not None:
                tokens[index] = found
                lengths[found.key].add(found.length)
        for key, seen in lengths.items():
            if len(seen) < 2:
                continue  # requests of one length share a pass without padding
            members = [i for i, t in tokens.items() if t.key == key]
            readings = self._read_layouts(tokens[members[0]], {s.point for i in members for s in batch[i].probes})
            for index in members:
                if readings.output is None or any(readings.points.get(s.point) is None for s in batch[index].probes):
                    del tokens[index]

        groups: list[_Group] = []
        last_group: dict[str, int] = {}
        for index, request in enumerate(batch):
            if results[index] is not None:
                continue
            found = tokens.get(index)
            size, length = _rows(request), found.length if found is not None else 0
            key = ("padded", request.op, found.key) if found is not None else self._batch_key(request)
            chosen = None
            if key is not None:
                for g in range(last_group.get(request.session, -1) + 1, len(groups)):
                    group = groups[g]
                    if group.key != key or group.rows + size > self.max_batch_rows:
                        continue
                    if found is not None:
                        cells = (group.rows + size) * max(group.longest, length)
                        if cells > self.max_pad_ratio * (group.tokens + size * length):
                            continue
                    chosen = g
                    break
            if chosen is None:
                groups.append(_Group([], key, found is not None))
                chosen = len(groups) - 1
            group = groups[chosen]
            group.indices.append(index)
            group.rows += size
            group.longest = max(group.longest, length)
            group.tokens += size * length
            last_group[request.session] = chosen
        return groups

    # -- shape readings ------------------------------------------------------------------------------

    def _read_layouts(self, tokens: _Tokens, points: set[str]) -> _Readings:
        """Layouts of the output and of ``points`` for calls like ``tokens``', read once and cached."""
        readings = self._readings.setdefault(tokens.key, _Readings())
        missing = sorted(p for p in points if p not in readings.points)
        chunks = [missing] if missing or not readings.read else []
        while chunks:
            chunk = chunks.pop()
            try:
                alone_output, alone_shapes = self._shape_run(tokens, _ALONE_READING, padded=False, points=chunk)
                padded_output, padded_shapes = self._shape_run(tokens, _PADDED_READING, padded=True, points=chunk)
            except Exception:  # a bad point name or a model that refuses the call: the real run says why
                if len(chunk) > 1:
                    chunks.extend([p] for p in chunk)
                else:
                    readings.points.update({p: None for p in chunk})
                    if not readings.read and chunk:
                        chunks.append([])
                    readings.read = readings.read or not chunk
                continue
            if not readings.read:
                readings.output = _output_layouts(alone_output, padded_output)
                readings.read = True
            for point in chunk:
                readings.points[point] = _point_layouts(alone_shapes[point], padded_shapes[point])
        return readings

    def _shape_run(
        self, tokens: _Tokens, shape: tuple[int, int], *, padded: bool, points: list[str]
    ) -> tuple[Any, dict[str, list]]:
        rows, length = shape
        ids = torch.full((rows, length), self._pad_id, dtype=tokens.ids.dtype, device=tokens.ids.device)
        kwargs = dict(tokens.scalars)
        if padded or tokens.mask_dtype is not None:
            mask = torch.ones(rows, length, dtype=tokens.mask_dtype or torch.long, device=ids.device)
            if padded:
                mask[0, -1] = 0
            kwargs["attention_mask"] = mask
        if padded and self._takes_positions:
            kwargs["position_ids"] = torch.arange(length, device=ids.device).expand(rows, -1)
        shapes: dict[str, list] = {p: [] for p in points}

        def recorder(seen: list) -> Callable[..., None]:
            def record_shape(ctx: SaveContext, value: Any) -> None:
                seen.append(tuple(value.shape) if isinstance(value, torch.Tensor) else None)

            return record_shape

        probes = [probe(p, recorder(shapes[p])) for p in points]
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            output = self._forward((ids,), kwargs, tokens.key[0] == "kwargs", probes)
        return output, shapes

    # -- passes --------------------------------------------------------------------------------------

    def _run_group(self, batch: Sequence[RunRequest], group: list[int], results: list, padded: bool) -> None:
        pending = list(group)
        while pending:
            try:
                for index, result in self._attempt(batch, pending, padded).items():
                    results[index] = result
                return
            except _RequestFailed as failure:
                results[failure.index] = RunResult(error=error_info(failure.error))
                pending.remove(failure.index)
            except RequestTimeoutError as error:
                for index in pending:
                    results[index] = RunResult(error=error_info(error))
                return
            except _Unbatchable as error:
                if len(pending) == 1:
                    results[pending[0]] = RunResult(error=error_info(error))
                elif padded and len({_length(batch[i]) for i in pending}) > 1:
                    by_key: dict[Any, list[int]] = {}
                    for index in pending:  # a pass's requests come from different sessions: any order will do
                        key = self._batch_key(batch[index])
                        by_key.setdefault(key if key is not None else ("alone", index), []).append(index)
                    for indices in by_key.values():
                        self._run_group(batch, indices, results, False)
                else:
                    for index in pending:
                        self._run_group(batch, [index], results, False)
                return
            except Exception as error:
                if len(pending) == 1:
                    results[pending[0]] = RunResult(error=error_info(error))
                    return
                for index in pending:  # cannot tell whose fault: each on its own
                    self._run_group(batch, [index], results, False)
                return

    def _attempt(self, batch: Sequence[RunRequest], indices: list[int], padded: bool) -> dict[int, RunResult]:
        requests = [batch[i] for i in indices]
        shared = len(requests) > 1
        sizes = [_rows(r) for r in requests]
        total = sum(sizes)
        starts = [sum(sizes[:k]) for k in range(len(sizes))]
        row_slices = [slice(start, start + size) for start, size in zip(starts, sizes)]
        tokens = [self._tokens(r) for r in requests] if shared and padded else []
        padded = bool(tokens) and len({t.length for t in tokens}) > 1
        padded_length = max(t.length for t in tokens) if padded else 0
        readings = self._readings[tokens[0].key] if padded else None
        staged: list[dict[str, SaveContext]] = [{} for _ in requests]

        probes = []
        for k, request in enumerate(requests):
            for spec in request.probes:
                view = None
                if padded:
                    layouts = readings.points[spec.point]
                    view = _View(row_slices[k], total, tokens[k].length, padded_length, layouts)
                elif shared:
                    view = _View(row_slices[k], total)
                name = spec.point + ".grad" if spec.grad else spec.point
                probes.append(
                    probe(
                        spec.point, self._isolated(spec.fn, k, request.session, name, staged[k], view), grad=spec.grad
                    )
                )
        by_name = False
        if padded:
            args, kwargs, by_name = self._padded_inputs(tokens, row_slices, total, padded_length)
        elif shared:
            args, kwargs = _concatenated(requests)
        else:
            args, kwargs = requests[0].args, requests[0].kwargs

        def cut(output: Any, k: int) -> Any:
            if padded:
                return _cut(output, readings.output, row_slices[k], tokens[k].length)
            return _rows_of(output, row_slices[k], total) if shared else output

        deadlines = [r.deadline for r in requests if r.deadline is not None]
        self._deadline = max(deadlines) if deadlines else None
        self._check_deadline()
        self.passes += 1
        self.padded_passes += padded
        losses: list[float | None] = [None] * len(requests)
        parts: list[Any] = []
        try:
            op = requests[0].op
            if op == "generate":
                output = self.model.generate(*args, probes=probes, **kwargs)
            elif op == "forward":
                with torch.no_grad():
                    output = self._forward(args, kwargs, by_name, probes)
            else:
                parts = self._backward(requests, cut, args, kwargs, by_name, probes, losses)
        except _RequestFailed as failure:
            failure.index = indices[failure.index]
            raise
        finally:
            self._deadline = None

        results: dict[int, RunResult] = {}
        for k, (index, request) in enumerate(zip(indices, requests)):
            mine = parts[k] if parts else cut(output, k)
            try:
                mine = _selected(_sendable(mine), request.outputs)
                self._commit(request.session, staged[k])
            except NeurotapError as error:
                results[index] = RunResult(error=error_info(error))
                continue
            results[index] = RunResult(output=mine, loss=losses[k])
        return results

    def _padded_inputs(
        self, tokens: list[_Tokens], row_slices: list[slice], total: int, length: int
    ) -> tuple[tuple, dict[str, Any], bool]:
        first = tokens[0].ids
        ids = torch.full((total, length), self._pad_id, dtype=first.dtype, device=first.device)
        mask = torch.zeros((total, length), dtype=tokens[0].mask_dtype or torch.long, device=first.device)
        for rows, found in zip(row_slices, tokens):
            ids[rows, : found.length] = found.ids
            mask[rows, : found.length] = 1
        kwargs = {**tokens[0].scalars, "attention_mask": mask}
        if self._takes_positions:
            kwargs["position_ids"] = torch.arange(length, device=first.device).expand(total, -1)
        return (ids,), kwargs, tokens[0].key[0] == "kwargs"

    def _forward(self, args: tuple, kwargs: dict[str, Any], by_name: bool, probes: list) -> Any:
        if by_name:
            return self.model.forward(*args[1:], probes=probes, **{self._input_name: args[0]}, **kwargs)
        return self.model.forward(*args, probes=probes, **kwargs)

    def _backward(
        self,
        requests: list[RunRequest],
        cut: Callable[[Any, int], Any],
        args: tuple,
        kwargs: dict,
        by_name: bool,
        probes: list,
        losses: list,
    ) -> list[Any]:
        """Each request's part of the output; the pass's backward runs on the sum of their losses."""
        parameters = list(self.model.module.parameters())
        try:
            with torch.enable_grad():
                output = self._forward(args, kwargs, by_name, probes)
                parts = [cut(output, k) for k in range(len(requests))]
                total = None
                for k, request in enumerate(requests):
                    try:
                        loss = request.loss(logits_of(parts[k]))
                    except Exception as error:
                        raise _RequestFailed(k, error) from error
                    losses[k] = float(loss.detach())
                    total = loss if total is None else total + loss
                if total is None or not total.requires_grad:
                    raise NeurotapError("the loss does not depend on anything that requires grad")
                total.backward()
        finally:
            for parameter in parameters:  # the server keeps no weight gradients between requests
                parameter.grad = None
        return parts

    def _isolated(
        self,
        fn: Callable[..., Any],
        position: int,
        session: str,
        name: str,
        staged: dict[str, SaveContext],
        view: _View | None,
    ) -> Callable[..., Any]:
        """``fn`` seeing only its request's part of each value and writing to its request's session."""
        ctx = staged.get(name)
        if ctx is None:
            ctx = staged[name] = _staged_copy(self._sessions.get(session, {}).get(name), name)

        def isolated(plan_ctx: SaveContext, value: Any) -> Any:
            object.__setattr__(ctx, "call", plan_ctx.call)
            object.__setattr__(ctx, "step", plan_ctx.step)
            if view is None:
                part, index, copied = value, None, False
            else:
                part, index = view.part(value, name, plan_ctx.call)
                # a probe gets a contiguous value, as it would alone; edits it makes in place are kept below
                copied = not part.is_contiguous()
                if copied:
                    part = part.contiguous()
            version = part._version if copied else 0
            try:
                result = fn(ctx, part)
            except Exception as error:
                raise _RequestFailed(position, _as_probe_error(error, fn, name, ctx)) from error
            if view is None:
                return result
            if result is part or result is None:
                result = part if copied and part._version != version else None
            if result is None:
                return None
            if not isinstance(result, torch.Tensor) or result.shape != part.shape or result.dtype != part.dtype:
                shape = tuple(getattr(result, "shape", ()))
                raise _RequestFailed(
                    position,
                    PatchError(
                        f"a probe at {name!r} returned {type(result).__name__} {shape} in place of the "
                        f"{part.dtype} value of shape {tuple(part.shape)}; return the same shape and dtype, or None"
                    ),
                )
            whole = value.clone()
            whole[index] = result
            return whole

        isolated.__name__ = getattr(fn, "__name__", type(fn).__name__)
        return isolated

    def _commit(self, session: str, staged: dict[str, SaveContext]) -> None:
        if not staged:
            return
        sizes = self._session_bytes.setdefault(session, {})
        new_sizes = {name: _nbytes(ctx._data) for name, ctx in staged.items()}
        others = sum(size for name, size in sizes.items() if name not in staged)
        total = others + sum(new_sizes.values())
        if total > self.max_session_bytes:
            raise RecordingLimitError(
                f"this request would bring the session's recordings to {total} bytes, over the server's "
                f"limit of {self.max_session_bytes} (--max-session-bytes); fetch them with recordings() and "
                "clear_recordings(), or reduce on the server (nt.Mean, nt.TopK, index=...)"
            )
        self._sessions.setdefault(session, {}).update(staged)
        sizes.update(new_sizes)


def _as_probe_error(error: Exception, fn: Any, name: str, ctx: SaveContext) -> NeurotapError:
    if isinstance(error, NeurotapError):
        return error
    wrapped = ProbeError(
        f"the probe {getattr(fn, '__name__', type(fn).__name__)} at {name!r} (call {ctx.call}, step {ctx.step}) "
        f"raised {type(error).__name__}: {error}"
    )
    wrapped.__cause__ = error
    return wrapped


def _rows(request: RunRequest) -> int:
    for value in [*request.args, *request.kwargs.values()]:
        if isinstance(value, torch.Tensor) and value.dim():
            return value.shape[0]
    return 1


def _length(request: RunRequest) -> int:
    for value in [*request.args, *request.kwargs.values()]:
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return value.shape[1]
    return 0


def _pad_id(config: Any, tokenizer: Any) -> int:
    """The id padded positions hold; they are masked, so any id in the vocabulary will do."""
    vocab = getattr(config, "vocab_size", None)
    for source in (config, tokenizer):
        pad = getattr(source, "pad_token_id", None)
        if isinstance(pad, int) and not isinstance(pad, bool) and pad >= 0 and (vocab is None or pad < vocab):
            return pad
    return 0


def _concatenated(requests: list[RunRequest]) -> tuple[tuple, dict[str, Any]]:
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


def _selected(output: Any, names: list[str] | None) -> Any:
    if names is None:
        return output
    if not names:
        return None
    if not isinstance(output, Mapping):
        raise NeurotapError(
            f"outputs={names!r} picks fields of a mapping, but this output is a {type(output).__name__}"
        )
    missing = [n for n in names if n not in output]
    if missing:
        raise NeurotapError(f"the output has no field {missing[0]!r}; it has {list(output)}")
    return Output({n: output[n] for n in names}) if type(output) is not dict else {n: output[n] for n in names}


class BatchWorker:
    """The one thread that runs an executor: runs arrive from any thread and are batched as they queue up.

    While it is busy, runs pile up and the next batch takes them all. When several
    sessions have been sending runs lately, a batch also waits up to ``window``
    seconds for one run from each of them (they usually arrive within a
    millisecond of each other); a lone client never waits.
    """

    def __init__(self, executor: Executor, *, max_batch: int = 32, window: float = 0.004) -> None:
        self.executor = executor
        self.max_batch = max_batch
        self.window = window
        self._queue: collections.deque = collections.deque()
        self._condition = threading.Condition()
        self._recent: dict[str, float] = {}  # session -> when it last sent a run
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="neurotap-executor", daemon=True)
        self._thread.start()

    def run(self, request: RunRequest) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._condition:
            if self._stopping:
                raise RuntimeError("the executor is shutting down")
            self._queue.append(("run", request, future))
            self._recent[request.session] = time.monotonic()
            self._condition.notify_all()
        return future

    def call(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        """Run ``fn(*args)`` on the executor's thread, in order with the runs."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._condition:
            self._queue.append(("call", (fn, args), future))
            self._condition.notify_all()
        return future

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued, then end the thread."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        self._thread.join(timeout)

    def _take(self) -> list | None:
        with self._condition:
            while not self._queue:
                if self._stopping:
                    return None
                self._condition.wait()
            if self._queue[0][0] == "call":
                return [self._queue.popleft()]
            now = time.monotonic()
            self._recent = {s: t for s, t in self._recent.items() if now - t < 1.0}
            expected = min(len(self._recent), self.max_batch)
            taken: list = []
            sessions: set[str] = set()
            wait_until = now + self.window
            while True:
                while self._queue and self._queue[0][0] == "run" and len(taken) < self.max_batch:
                    item = self._queue.popleft()
                    taken.append(item)
                    sessions.add(item[1].session)
                if self._queue or len(taken) >= self.max_batch or len(sessions) >= expected or self._stopping:
                    return taken
                remaining = wait_until - time.monotonic()
                if remaining <= 0:
                    return taken
                self._condition.wait(remaining)

    def _loop(self) -> None:
        while True:
            taken = self._take()
            if taken is None:
                return
            if taken[0][0] == "call":
                _, (fn, args), future = taken[0]
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args))
                    except BaseException as error:
                        future.set_exception(error)
                continue
            requests = [request for _, request, _ in taken]
            try:
                results = self.executor.execute(requests)
            except BaseException as error:
                for _, _, future in taken:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, _, future), result in zip(taken, results):
                if not future.done():
                    future.set_result(result)
