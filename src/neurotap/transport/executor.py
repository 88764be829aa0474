"""Running requests: the interface the HTTP layer talks to, and the in-process executor.

The server hands an :class:`Executor` a batch of :class:`RunRequest` and gets one
:class:`RunResult` per request back; sessions' save contexts live in the
executor, next to the model, so a multi-process executor for a sharded model can
take this one's place without the HTTP layer changing.

The in-process executor batches dynamically: it groups the batch's requests into
shared forward passes, padded where their lengths differ, and splits the output
again, as :mod:`.batching` describes; each request's probes see only the
request's own rows and positions and write to the request's own session. Save
contexts are staged: a request's recordings are committed only when it succeeds
and fits its session's byte limit, so a failed request leaves nothing
half-recorded.
"""

from __future__ import annotations

import abc
import collections
import inspect
import math
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import NeurotapError, PatchError, ProbeError, UnknownPointError
from ..model import Model
from ..model.losses import loss_value
from ..model.plan import expand_probes, is_cache
from ..points import in_execution_order, split_narrowing
from ..probes import Patch, SaveContext, Skip, probe
from .batching import (
    ALONE_READING,
    PADDED_READING,
    Group,
    Readings,
    Tokens,
    Unbatchable,
    View,
    batch_key,
    concatenated,
    cut,
    output_layouts,
    pack,
    pad_id,
    padded_inputs,
    point_layouts,
    request_length,
    request_rows,
    rows_of,
    shared_generation,
    tokens_of,
)
from .limits import Limits, ModelShape, RequestTooCostlyError, check_request, check_selection
from .wire import (
    CodeNotAllowedError,
    ErrorInfo,
    NotSent,
    Output,
    RunRequest,
    RunResult,
    WireError,
    describe_tokenizer,
)


class RequestTimeoutError(NeurotapError, TimeoutError):
    """A request ran past the server's request timeout."""


class RecordingLimitError(NeurotapError):
    """A session's recordings would grow past the server's per-session or server-wide limit."""


class _PassRecordingLimitError(RecordingLimitError):
    """What the requests of one pass recorded together grew past the server-wide limit."""


class RequestCancelledError(NeurotapError):
    """Every client of a pass went away, so the pass stopped."""


class _RequestFailed(NeurotapError):
    """What one request of a shared pass caused; the others run again without it."""

    def __init__(self, index: int, error: BaseException) -> None:
        super().__init__(str(error))
        self.index = index
        self.error = error


class ExecutorFailedError(NeurotapError):
    """The executor can run nothing more (a rank of a sharded server failed): no request is tried again."""


class ReportedError(NeurotapError):
    """An error that another process described (a rank of a sharded server): its status and message as sent."""

    def __init__(self, info: ErrorInfo) -> None:
        super().__init__(info.message)
        self.info = info


_STATUS: list[tuple[type[BaseException], int]] = [  # the first that matches
    (RecordingLimitError, 413),
    (RequestTooCostlyError, 413),
    (WireError, 400),
    (UnknownPointError, 404),
    (CodeNotAllowedError, 403),
    (RequestTimeoutError, 504),
    (RequestCancelledError, 499),
]


def error_info(error: BaseException) -> ErrorInfo:
    """The HTTP status and JSON error for an exception raised while serving a request."""
    if isinstance(error, ReportedError):
        return error.info
    cause = error.__cause__ if isinstance(error, ProbeError) and error.__cause__ is not None else None
    status = next((code for kind, code in _STATUS if isinstance(error, kind)), 422)
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


@dataclass
class Pass:
    """One pass being run: its requests (and their indices in the batch), its inputs and probes, and where each
    request's saves go."""

    indices: list[int]
    requests: list[RunRequest]
    args: tuple
    kwargs: dict[str, Any]
    by_name: bool  # the token ids go to the model by name, not positionally
    probes: list
    part_of: Callable[[Any, int], Any]  # (the pass's output, k) -> request k's part of it
    staged: list[dict[str, SaveContext]]  # request k's saves for its session, committed if it succeeds
    traced: list[dict[str, SaveContext]]  # request k's saves that go back with its answer
    losses: list[float | None]
    extra: dict[str, Any]  # more arguments for generate: a shared generation's stopping criteria


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

    def tokenizer(self) -> dict[str, Any] | None:
        """The model's tokenizer as plain JSON (:func:`.wire.describe_tokenizer`); None if it has none."""
        return None

    @abc.abstractmethod
    def execute(
        self,
        batch: Sequence[RunRequest],
        deliver: Callable[[int, RunResult], None] | None = None,
        yielding: Callable[[], bool] | None = None,
    ) -> list[RunResult | None]:
        """Run a batch; one result (or error) per request, in order.

        ``deliver(index, result)`` is told each request's result as soon as its pass is
        over, before the rest of the batch runs. Between passes, when ``yielding()``
        says that others are waiting, the batch stops there: the requests of the
        passes not run yet get None, for the caller to run again later.
        """

    @abc.abstractmethod
    def recordings(self, session: str) -> dict[str, dict[str, Any]]:
        """A snapshot of a session's save contexts: ``{context name: {key: value}}``."""

    @abc.abstractmethod
    def clear_recordings(self, session: str) -> None: ...

    @abc.abstractmethod
    def close_session(self, session: str) -> None: ...

    @abc.abstractmethod
    def get_parameter(self, name: str) -> torch.Tensor: ...


class InProcessExecutor(Executor):
    """Runs requests on an ``nt.Model`` in this process, batching those that can share a pass.

    ``max_pad_ratio`` bounds the work padding adds: a padded pass computes at most
    that many times the positions its requests hold. ``limits`` bound what one
    request may ask for (:mod:`.limits`); ``max_session_bytes``,
    ``max_owner_bytes`` and ``max_total_bytes`` what one session, one owner's
    sessions (a token's, see ``RunRequest.owner``) and all sessions together keep
    recorded.
    """

    def __init__(
        self,
        model: Model,
        *,
        limits: Limits | None = None,
        max_session_bytes: int = 1 << 30,
        max_total_bytes: int = 4 << 30,
        max_owner_bytes: int | None = None,
        max_batch_rows: int = 64,
        max_pad_ratio: float = 2.0,
    ) -> None:
        self.model = model
        self.limits = limits or Limits()
        self.shape = ModelShape.of(model.module)
        self.max_session_bytes = max_session_bytes
        self.max_total_bytes = max_total_bytes
        self.max_owner_bytes = max_owner_bytes or max_total_bytes
        self._owners: dict[str, str] = {}  # session -> the owner whose share its recordings take
        self.max_batch_rows = max_batch_rows
        self.max_pad_ratio = max_pad_ratio
        self._sessions: dict[str, dict[str, SaveContext]] = {}
        self._session_bytes: dict[str, dict[str, int]] = {}
        self._deadline: float | None = None
        self._running: Sequence[RunRequest] = ()
        self._yielding: Callable[[], bool] | None = None  # the batch under way's, while it runs
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
        self._pads = "attention_mask" in parameters and (self._max_positions or 8) >= PADDED_READING[1]
        self._takes_positions = "position_ids" in parameters
        self._pad_id = pad_id(config, model.tokenizer)
        self._device = _input_device(model.module)
        generation = getattr(model.module, "generation_config", None)
        self._greedy = not getattr(generation, "do_sample", False) and (getattr(generation, "num_beams", 1) or 1) == 1
        eos = getattr(generation, "eos_token_id", None)
        self._eos = [eos] if isinstance(eos, int) else list(eos or [])
        self._readings: dict[tuple, Readings] = {}
        # checked before every forward and every layer, so that a long pass stops soon after its time is up
        # (or its clients left) instead of holding every request queued behind it
        for module in _checkpoints(model.module):
            module.register_forward_pre_hook(self._check_deadline)

    # -- facts ---------------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        module = self.model.module
        config = getattr(module, "config", None)
        devices = sorted({str(p.device) for p in module.parameters()})
        # where each part is (module path -> device), in accelerate's form; accelerate keeps a map only of a
        # model it spread over several devices, and one in one place is {"": device}
        split = getattr(module, "hf_device_map", None) or ({"": devices[0]} if len(devices) == 1 else None)
        return {
            "module": type(module).__name__,
            "parameters": sum(p.numel() for p in module.parameters()),
            "vocab_size": getattr(config, "vocab_size", None),
            "max_position_embeddings": self._max_positions,
            "has_generate": hasattr(module, "generate"),
            "limits": self.limits.to_dict(),
            "requests": self.requests,
            "passes": self.passes,
            "padded_passes": self.padded_passes,
            "devices": devices,
            "device_map": {k: str(v) for k, v in split.items()} if split else None,
        }

    def points(self, prefix: str | None) -> list[dict[str, Any]]:
        return [p.to_dict() for p in self.model.points(prefix)]

    def aliases(self) -> dict[str, str]:
        return self.model.aliases()

    def get_parameter(self, name: str) -> torch.Tensor:
        return self.model.get_parameter(name).detach()

    def tokenizer(self) -> dict[str, Any] | None:
        return describe_tokenizer(self.model.tokenizer) if self.model.tokenizer is not None else None

    # -- sessions ------------------------------------------------------------------------------------

    def recordings(self, session: str) -> dict[str, dict[str, Any]]:
        return {name: dict(ctx._data) for name, ctx in self._sessions.get(session, {}).items() if len(ctx)}

    def clear_recordings(self, session: str) -> None:
        self._sessions.pop(session, None)
        self._session_bytes.pop(session, None)
        self._owners.pop(session, None)

    def recorded_bytes(self, owner: str | None = None) -> int:
        """What all sessions (or ``owner``'s) keep recorded, in bytes."""
        return sum(
            sum(sizes.values())
            for session, sizes in self._session_bytes.items()
            if owner is None or self._owners.get(session) == owner
        )

    def close_session(self, session: str) -> None:
        self.clear_recordings(session)

    # -- running -------------------------------------------------------------------------------------

    def _check_deadline(self, *_: Any) -> None:
        if self._deadline is not None and time.time() > self._deadline:
            raise RequestTimeoutError("the request ran past the server's request timeout (--request-timeout)")
        if self._running and all(r.cancelled for r in self._running):
            raise RequestCancelledError("the client went away before the request finished")

    def execute(
        self,
        batch: Sequence[RunRequest],
        deliver: Callable[[int, RunResult], None] | None = None,
        yielding: Callable[[], bool] | None = None,
    ) -> list[RunResult | None]:
        results: list[RunResult | None] = [None] * len(batch)
        groups = self._groups(batch, results)
        if deliver is not None:
            for index, result in enumerate(results):
                if result is not None:
                    deliver(index, result)
        self._yielding = yielding
        try:
            for number, group in enumerate(groups):
                if number and self._yields():
                    break  # the passes left are run again later, with the requests that came meanwhile
                self._run_group(batch, group.indices, results, group.padded)
                for index in group.indices:
                    if results[index] is None:
                        results[index] = RunResult(error=error_info(NeurotapError("not run")))
                    if deliver is not None:
                        deliver(index, results[index])
        finally:
            self._yielding = None
        self.requests += sum(result is not None for result in results)
        return results

    def _yields(self) -> bool:
        """Whether the batch stops before its next pass, others waiting (the caller's ``yielding``)."""
        return self._yielding is not None and self._yielding()

    def _tokens(self, request: RunRequest) -> Tokens | None:
        """The request's token ids if it can share a padded pass."""
        return tokens_of(request, self._input_name, self.max_batch_rows) if self._pads else None

    def _groups(self, batch: Sequence[RunRequest], results: list) -> list[Group]:
        """The passes, in an order that keeps each session's requests in arrival order."""
        tokens: dict[int, Tokens] = {}
        costs: dict[int, int] = {}
        lengths: dict[tuple, set[int]] = collections.defaultdict(set)
        inventory = self._inventory()
        for index, request in enumerate(batch):
            try:
                request.probes = expand_probes(request.probes, inventory)  # patterns: one probe per point
                costs[index] = check_request(request, self.limits, self.shape)
            except NeurotapError as error:
                results[index] = RunResult(error=error_info(error))
                continue
            if self._device is not None:  # inputs arrive on the CPU; the model may sit on a GPU
                request.args = tuple(_to(v, self._device) for v in request.args)
                request.kwargs = {k: _to(v, self._device) for k, v in request.kwargs.items()}
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

        pending = [index for index in range(len(batch)) if results[index] is None]
        # requests that share a pass share its memory: together they stay within one request's budget
        groups = pack(
            batch,
            pending,
            tokens,
            max_rows=self.max_batch_rows,
            max_pad_ratio=self.max_pad_ratio,
            costs=costs,
            max_cost=self.limits.max_request_memory,
            greedy_default=self._greedy,
        )
        # a parameter or buffer has no rows to share out, a skipped module runs for no row, and a pass ends at
        # one stop_at: such requests run alone
        points = inventory.points
        flat: list[Group] = []
        for group in groups:
            alone = [i for i in group.indices if len(group.indices) > 1 and self._runs_alone(batch[i], points)]
            rest = [i for i in group.indices if i not in alone]
            if rest:
                flat.append(group if not alone else Group(rest, group.key, group.padded))
            flat.extend(Group([i], None, False) for i in alone)
        return flat

    @staticmethod
    def _runs_alone(request: RunRequest, points: Mapping[str, Any]) -> bool:
        if request.stop_at is not None or any(isinstance(spec.fn, Skip) for spec in request.probes):
            return True
        found = (points.get(split_narrowing(spec.point)[0]) for spec in request.probes)
        return any(p is not None and p.kind in ("parameter", "buffer") for p in found)

    # -- shape readings ------------------------------------------------------------------------------

    def _read_layouts(self, tokens: Tokens, points: set[str]) -> Readings:
        """Layouts of the output and of ``points`` for calls like ``tokens``', read once and cached."""
        readings = self._readings.setdefault(tokens.key, Readings())
        missing = sorted(p for p in points if p not in readings.points)
        chunks = [missing] if missing or not readings.read else []
        while chunks:
            chunk = chunks.pop()
            try:
                alone_output, alone_shapes = self._shape_run(tokens, ALONE_READING, padded=False, points=chunk)
                padded_output, padded_shapes = self._shape_run(tokens, PADDED_READING, padded=True, points=chunk)
            except ExecutorFailedError:
                raise
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
                readings.output = output_layouts(alone_output, padded_output)
                readings.read = True
            for point in chunk:
                readings.points[point] = point_layouts(alone_shapes[point], padded_shapes[point])
        return readings

    def _shape_run(
        self, tokens: Tokens, shape: tuple[int, int], *, padded: bool, points: list[str]
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

        probes = [probe(p, recorder(shapes[p]), optional=True) for p in points]  # the real run tells of misses
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            output = self._forward((ids,), kwargs, tokens.by_name, probes)
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
            except (RequestTimeoutError, RequestCancelledError) as error:
                for index in pending:
                    results[index] = RunResult(error=error_info(error))
                return
            except ExecutorFailedError:
                raise
            except Exception as error:
                if len(pending) == 1:
                    results[pending[0]] = RunResult(error=error_info(error))
                elif isinstance(error, Unbatchable) and padded and len({request_length(batch[i]) for i in pending}) > 1:
                    by_key: dict[Any, list[int]] = {}
                    for index in pending:  # a pass's requests come from different sessions: any order will do
                        key = batch_key(batch[index], self.max_batch_rows, greedy_default=self._greedy)
                        by_key.setdefault(key if key is not None else ("alone", index), []).append(index)
                    for indices in by_key.values():
                        self._run_group(batch, indices, results, False)
                else:
                    for index in pending:  # cannot tell whose fault, or the values do not split: each on its own
                        self._run_group(batch, [index], results, False)
                return

    def _attempt(self, batch: Sequence[RunRequest], indices: list[int], padded: bool) -> dict[int, RunResult]:
        requests = [batch[i] for i in indices]
        shared = len(requests) > 1
        sizes = [request_rows(r) for r in requests]
        total = sum(sizes)
        starts = [sum(sizes[:k]) for k in range(len(sizes))]
        row_slices = [slice(start, start + size) for start, size in zip(starts, sizes)]
        tokens = [self._tokens(r) for r in requests] if shared and padded else []
        padded = bool(tokens) and len({t.length for t in tokens}) > 1
        padded_length = max(t.length for t in tokens) if padded else 0
        readings = self._readings[tokens[0].key] if padded else None
        staged: list[dict[str, SaveContext]] = [{} for _ in requests]
        traced: list[dict[str, SaveContext]] = [{} for _ in requests]  # saves that go back with the answer
        over = " together, over the server's limit for all sessions"
        together = _Meter(self.max_total_bytes, over, "--max-total-bytes")
        meters = [_Meter(self.max_session_bytes, together=together) for _ in requests]
        generating = shared and requests[0].op == "generate"
        if generating:  # each request stops where it would have stopped alone
            first = requests[0]
            prompt = (first.args[0] if first.args else first.kwargs["input_ids"]).shape[1]
            eos = first.kwargs.get("eos_token_id", self._eos)
            watch, finished = shared_generation(prompt, row_slices, [eos] if isinstance(eos, int) else list(eos))

        probes = []
        for k, request in enumerate(requests):
            for spec in request.probes:
                point = self._local_point(spec.point)
                if point is None:
                    continue  # another process runs it
                view = None
                if padded:
                    layouts = readings.points[spec.point]
                    view = View(row_slices[k], total, tokens[k].length, padded_length, layouts)
                elif shared:
                    view = View(row_slices[k], total)
                name = spec.point + ".grad" if spec.grad else spec.point
                done = (lambda k=k: finished[k] is not None) if generating else None
                if isinstance(spec.fn, Skip):  # it stands in for the module's call, records nothing and runs alone
                    probes.append(probe(point, spec.fn, optional=spec.optional))
                    continue
                if spec.trace:
                    traced[k].setdefault(name, SaveContext(name))
                saves = traced[k] if spec.trace else staged[k]
                isolated = self._isolated(spec.fn, k, request.session, name, saves, view, meters[k], done, spec.trace)
                probes.append(probe(point, isolated, grad=spec.grad, optional=spec.optional))
        by_name = False
        if padded:
            args, kwargs = padded_inputs(
                tokens, row_slices, total, padded_length, pad=self._pad_id, positions=self._takes_positions
            )
            by_name = tokens[0].by_name
        elif shared:
            args, kwargs = concatenated(requests)
        else:
            args, kwargs = requests[0].args, requests[0].kwargs

        def part_of(output: Any, k: int) -> Any:
            if padded:
                return cut(output, readings.output, row_slices[k], tokens[k].length)
            if generating:
                mine = output[row_slices[k]]
                return mine if finished[k] is None else mine[:, : prompt + finished[k]]
            return rows_of(output, row_slices[k], total) if shared else output

        run = Pass(
            indices,
            requests,
            args,
            kwargs,
            by_name,
            probes,
            part_of,
            staged,
            traced,
            [None] * len(requests),
            {"stopping_criteria": watch} if generating else {},
        )
        now = time.time()
        ends = [min(now + (r.timeout or math.inf), r.deadline or math.inf) for r in requests]
        self._deadline = max(ends) if max(ends) < math.inf else None
        self._running = requests
        self.passes += 1
        self.padded_passes += padded
        try:
            output, parts = self._run_pass(run)
        except _RequestFailed as failure:
            failure.index = indices[failure.index]
            raise
        finally:
            self._deadline = None
            self._running = ()
        return self._results(run, output, parts)

    def _local_point(self, point: str) -> str | None:
        """The name to probe ``point`` at in this process; None where another process runs it."""
        return point

    def _inventory(self) -> Any:
        """Every point of the model, for patterns and the order of traces."""
        return self.model.inventory()

    def _run_pass(self, run: Pass) -> tuple[Any, list[Any]]:
        """The pass itself: its output, or for a backward each request's part of it."""
        self._check_deadline()
        op = run.requests[0].op
        if op == "generate":
            return self.model.generate(*run.args, probes=run.probes, **run.kwargs, **run.extra), []
        if op == "forward":
            with torch.no_grad():
                return self._forward(run.args, run.kwargs, run.by_name, run.probes, run.requests[0].stop_at), []
        parts = self._backward(run.requests, run.part_of, run.args, run.kwargs, run.by_name, run.probes, run.losses)
        return None, parts

    def _results(self, run: Pass, output: Any, parts: list[Any]) -> dict[int, RunResult]:
        """Each request's answer; its recordings are committed to its session if it succeeded."""
        results: dict[int, RunResult] = {}
        for k, (index, request) in enumerate(zip(run.indices, run.requests)):
            if request.cancelled:  # its client went away: nothing of it is kept
                results[index] = RunResult(error=error_info(RequestCancelledError("the client went away")))
                continue
            mine = parts[k] if parts else run.part_of(output, k)
            try:
                mine = selected_fields(sendable(mine), request.outputs)
                self._commit(request.session, run.staged[k], request.owner)
            except NeurotapError as error:
                results[index] = RunResult(error=error_info(error))
                continue
            trace = _trace_of(request, run.traced[k], self._inventory())
            results[index] = RunResult(output=mine, loss=run.losses[k], trace=trace)
        return results

    def _forward(
        self, args: tuple, kwargs: dict[str, Any], by_name: bool, probes: list, stop_at: str | None = None
    ) -> Any:
        if by_name:
            kwargs = {self._input_name: args[0], **kwargs}
            args = args[1:]
        return self.model.forward(*args, probes=probes, stop_at=stop_at, **kwargs)

    def _backward(
        self,
        requests: list[RunRequest],
        part_of: Callable[[Any, int], Any],
        args: tuple,
        kwargs: dict,
        by_name: bool,
        probes: list,
        losses: list,
    ) -> list[Any]:
        """Each request's part of the output; the gradients its probes ask for come from the sum of their losses.

        Only those gradients are computed (``nt.Model.backward``): no weight's ``.grad`` is touched.
        """
        parts: list[Any] = []

        def total(output: Any) -> torch.Tensor:
            parts.extend(part_of(output, k) for k in range(len(requests)))
            value = None
            for k, request in enumerate(requests):
                try:
                    loss = loss_value(request.loss, parts[k])
                except Exception as error:
                    raise _RequestFailed(k, error) from error
                losses[k] = float(loss.detach())
                value = loss if value is None else value + loss
            return value

        if by_name:
            kwargs = {self._input_name: args[0], **kwargs}
            args = args[1:]
        self.model.backward(*args, loss=total, probes=probes, **kwargs)
        return parts

    def _isolated(
        self,
        fn: Callable[..., Any],
        position: int,
        session: str,
        name: str,
        staged: dict[str, SaveContext],
        view: View | None,
        meter: _Meter,
        done: Callable[[], bool] | None = None,
        traced: bool = False,
    ) -> Callable[..., Any]:
        """``fn`` seeing only its request's part of each value and writing to its request's session.

        A patch's selection is bounded before it runs, and what the request has
        recorded is measured after every call, so that neither can outgrow the
        server's limits in the middle of a pass.
        """
        ctx = staged.get(name)
        if ctx is None:
            ctx = staged[name] = staged_copy(self._sessions.get(session, {}).get(name), name)
        limits = self.limits
        is_patch = isinstance(fn, Patch)
        metered = "trace " + name if traced else name  # a traced probe and a kept one at a point are counted apart

        def isolated(plan_ctx: SaveContext, value: Any) -> Any:
            if done is not None and done():
                return None  # a generation that finished: alone, this step would not have run
            self._check_deadline()  # many probes between two layers must not outlast the timeout either
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
                if is_patch:
                    check_selection(name, fn, part, limits)
                result = fn(ctx, part)
                meter.measure(metered, ctx)
            except _PassRecordingLimitError:
                raise
            # a probe that calls sys.exit() or raises KeyboardInterrupt fails its request, not the server
            except (Exception, SystemExit, KeyboardInterrupt) as error:
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

    def _commit(self, session: str, staged: dict[str, SaveContext], owner: str = "") -> None:
        if not staged:
            return
        sizes = self._session_bytes.get(session, {})
        new_sizes = {name: recorded_size(ctx._data, name) for name, ctx in staged.items()}
        before = sum(sizes.values())
        total = sum(size for name, size in sizes.items() if name not in staged) + sum(new_sizes.values())
        if total > self.max_session_bytes:
            raise RecordingLimitError(
                f"this request would bring the session's recordings to {total} bytes, over the server's "
                f"limit of {self.max_session_bytes} (--max-session-bytes); fetch them with recordings() and "
                "clear_recordings(), or reduce on the server (nt.Mean, nt.TopK, index=...)"
            )
        if total > before:
            for limit, held, whose in (
                (self.max_owner_bytes, self.recorded_bytes(owner), "your token's sessions"),
                (self.max_total_bytes, self.recorded_bytes(), "all sessions"),
            ):
                if held - before + total > limit:
                    raise RecordingLimitError(
                        f"the recordings of {whose} would reach {held - before + total} bytes, over the server's "
                        f"limit of {limit} (--max-total-bytes, shared equally among the tokens); fetch yours with "
                        "recordings() and clear_recordings(), or reduce on the server (nt.Mean, nt.TopK, index=...)"
                    )
        self._owners[session] = owner
        self._sessions.setdefault(session, {}).update(staged)
        self._session_bytes.setdefault(session, {}).update(new_sizes)


def _trace_of(request: RunRequest, traced: dict[str, SaveContext], inventory: Any) -> list[dict[str, Any]] | None:
    """What the request's traced probes saved, values then gradients, each in execution order."""
    if not any(spec.trace for spec in request.probes):
        return None
    trace = []
    for grad in (False, True):
        specs = {spec.point: spec for spec in request.probes if spec.trace and spec.grad == grad}
        for point in in_execution_order(specs, inventory):
            trace.append({"point": point, "grad": grad, "data": dict(traced[point + ".grad" * grad]._data)})
    return trace


def _as_probe_error(error: Exception, fn: Any, name: str, ctx: SaveContext) -> NeurotapError:
    if isinstance(error, NeurotapError):
        return error
    wrapped = ProbeError(
        f"the probe {getattr(fn, '__name__', type(fn).__name__)} at {name!r} (call {ctx.call}, step {ctx.step}) "
        f"raised {type(error).__name__}: {error}"
    )
    wrapped.__cause__ = error
    return wrapped


def staged_copy(ctx: SaveContext | None, name: str) -> SaveContext:
    """A context to write to; lists are copied because Record and Norm append in place."""
    staged = SaveContext(name)
    if ctx is not None:
        staged._data.update({k: list(v) if isinstance(v, list) else v for k, v in ctx._data.items()})
    return staged


def _input_device(module: torch.nn.Module) -> torch.device | None:
    """Where the model reads its inputs (its embeddings, with accelerate's device_map); None for the CPU."""
    embeddings = getattr(module, "get_input_embeddings", None)
    try:
        weight = embeddings().weight if embeddings is not None else next(module.parameters())
    except (StopIteration, AttributeError, NotImplementedError):
        return None
    return None if weight.device.type in ("cpu", "meta") else weight.device


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _checkpoints(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The module and each member of its module lists (decoder layers): where a pass checks its deadline."""
    found = [module]
    for child in module.modules():
        if isinstance(child, torch.nn.ModuleList):
            found.extend(child)
    return found


def recorded_size(value: Any, point: str = "") -> int:
    """What a recorded value takes; only plain values (tensors, numbers, strings and containers of them) are kept."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if value is None or isinstance(value, (bool, int, float)):
        return 8
    if isinstance(value, str):
        return len(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        return 8 + sum(recorded_size(v, point) for v in value)
    if isinstance(value, Mapping):
        return 8 + sum(len(str(k)) + recorded_size(v, point) for k, v in value.items())
    raise PatchError(
        f"a probe at {point!r} saved a {type(value).__name__}; a server keeps only tensors, numbers, strings "
        "and lists, tuples, namedtuples, dicts and sets of them: narrow the point to a tensor (e.g. "
        f"{point + '[0]'!r}) or save a tensor computed from the value"
    )


class _Meter:
    """What one request has recorded so far, measured after every probe call without re-walking old lists."""

    def __init__(
        self,
        budget: int,
        over: str = ", over the server's limit for a session",
        flag: str = "--max-session-bytes",
        together: _Meter | None = None,
    ) -> None:
        self.budget = budget
        self.total = 0
        self.over, self.flag = over, flag
        # the pass's requests together: what they record, kept or traced, is held at once until the pass ends
        self.together = together
        # (context, key) -> (the value, its length if a list, its bytes)
        self._sizes: dict[tuple[str, str], tuple[Any, int, int]] = {}

    def measure(self, name: str, ctx: SaveContext) -> None:
        for key, value in ctx._data.items():
            seen_value, seen, size = self._sizes.get((name, key), (None, 0, 0))
            if value is seen_value and not isinstance(value, dict):  # a dict may have changed inside: measure it
                if not isinstance(value, list):
                    continue  # unchanged since the last call: running reductions replace their tensors
                if len(value) == seen:
                    continue
                grown = (
                    size + recorded_size(value[seen:], name) - 8 if len(value) > seen else recorded_size(value, name)
                )
            else:
                grown = recorded_size(value, name)
            self._sizes[(name, key)] = (value, len(value) if isinstance(value, list) else 0, grown)
            self.grow(grown - size)

    def grow(self, delta: int) -> None:
        self.total += delta
        if self.total > self.budget:
            whose = "this request" if self.together is not None else "the requests sharing this pass"
            # the pass's total is nobody's fault alone: each of its requests is then run on its own
            raise (RecordingLimitError if self.together is not None else _PassRecordingLimitError)(
                f"the probes of {whose} recorded {self.total} bytes{self.over}, {self.budget} "
                f"({self.flag}); record less (index=...) or reduce on the server (nt.Mean, nt.TopK)"
            )
        if self.together is not None:
            self.together.grow(delta)


def sendable(value: Any) -> Any:
    """A model output as it travels: without the KV cache, and an object of any other class as its placeholder."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor, set, frozenset)):
        return value
    if isinstance(value, (list, tuple)):
        items = [sendable(v) for v in value]
        if isinstance(value, list):
            return items
        return type(value)._make(items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, Mapping):
        kept = {k: sendable(v) for k, v in value.items() if not is_cache(v)}
        return kept if type(value) is dict else Output(kept)
    return NotSent(type(value).__name__)


def selected_fields(output: Any, names: list[str] | None) -> Any:
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
