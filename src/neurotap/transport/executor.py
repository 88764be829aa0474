"""Running requests: the interface the HTTP layer talks to, and the in-process executor.

The server hands an :class:`Executor` a batch of :class:`RunRequest` and gets one
:class:`RunResult` per request back; sessions' save contexts live in the
executor, next to the model, so a multi-process executor for a sharded model can
take this one's place without the HTTP layer changing.

The in-process executor batches dynamically: requests of the batch whose inputs
have the same shape apart from the batch dimension, and the same settings, run as
one forward pass on their concatenated rows, and the output is split again. Each
request's probes see only the request's own rows (``value[rows]``) and write to
the request's own session; a replacement they return goes back into those rows
only. A probe at a value without the batch dimension in front (rotary tables,
shared masks) makes the batch fall back to one pass per request, as does any
failure that cannot be pinned on one request. Save contexts are staged: a
request's recordings are committed only when it succeeds and fits its session's
byte limit, so a failed request leaves nothing half-recorded.
"""

from __future__ import annotations

import abc
import collections
import concurrent.futures
import json
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
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


class InProcessExecutor(Executor):
    """Runs requests on an ``nt.Model`` in this process, batching those that can share a pass."""

    def __init__(
        self,
        model: Model,
        *,
        max_session_bytes: int = 1 << 30,
        max_batch_rows: int = 64,
        max_tokens: int = 1 << 16,
    ) -> None:
        self.model = model
        self.max_session_bytes = max_session_bytes
        self.max_batch_rows = max_batch_rows
        self.max_tokens = max_tokens
        self._sessions: dict[str, dict[str, SaveContext]] = {}
        self._session_bytes: dict[str, dict[str, int]] = {}
        self._deadline: float | None = None
        self.passes = 0  # forward passes run, against requests run: how much batching happened
        self.requests = 0
        config = getattr(model.module, "config", None)
        self._max_positions = getattr(config, "max_position_embeddings", None)
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
        }

    def points(self, prefix: str | None) -> list[dict[str, Any]]:
        return [p.to_dict() for p in self.model.points(prefix)]

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
            self._run_group(batch, group, results)
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

    def _groups(self, batch: Sequence[RunRequest], results: list) -> list[list[int]]:
        """Indices per pass, in an order that keeps each session's requests in arrival order."""
        groups: list[list[int]] = []
        keys: list[tuple | None] = []
        rows: list[int] = []
        last_group: dict[str, int] = {}
        for index, request in enumerate(batch):
            try:
                self._check_inputs(request)
            except NeurotapError as error:
                results[index] = RunResult(error=error_info(error))
                continue
            key = self._batch_key(request)
            size = _rows(request)
            chosen = None
            if key is not None:
                for g in range(last_group.get(request.session, -1) + 1, len(groups)):
                    if keys[g] == key and rows[g] + size <= self.max_batch_rows:
                        chosen = g
                        break
            if chosen is None:
                groups.append([])
                keys.append(key)
                rows.append(0)
                chosen = len(groups) - 1
            groups[chosen].append(index)
            rows[chosen] += size
            last_group[request.session] = chosen
        return groups

    def _run_group(self, batch: Sequence[RunRequest], group: list[int], results: list) -> None:
        pending = list(group)
        while pending:
            try:
                for index, result in self._attempt(batch, pending).items():
                    results[index] = result
                return
            except _RequestFailed as failure:
                results[failure.index] = RunResult(error=error_info(failure.error))
                pending.remove(failure.index)
            except RequestTimeoutError as error:
                for index in pending:
                    results[index] = RunResult(error=error_info(error))
                return
            except Exception as error:
                if len(pending) == 1:
                    results[pending[0]] = RunResult(error=error_info(error))
                    return
                for index in pending:  # cannot tell whose fault: each on its own
                    self._run_group(batch, [index], results)
                return

    def _attempt(self, batch: Sequence[RunRequest], indices: list[int]) -> dict[int, RunResult]:
        requests = [batch[i] for i in indices]
        shared = len(requests) > 1
        sizes = [_rows(r) for r in requests]
        total = sum(sizes)
        starts = [sum(sizes[:k]) for k in range(len(sizes))]
        row_slices = [slice(start, start + size) for start, size in zip(starts, sizes)]
        staged: list[dict[str, SaveContext]] = [{} for _ in requests]

        probes = []
        for k, request in enumerate(requests):
            for spec in request.probes:
                name = spec.point + ".grad" if spec.grad else spec.point
                probes.append(
                    probe(
                        spec.point,
                        self._isolated(
                            spec.fn, k, request.session, name, staged[k], row_slices[k] if shared else None, total
                        ),
                        grad=spec.grad,
                    )
                )
        if shared:
            args, kwargs = _concatenated(requests)
        else:
            args, kwargs = requests[0].args, requests[0].kwargs
        deadlines = [r.deadline for r in requests if r.deadline is not None]
        self._deadline = max(deadlines) if deadlines else None
        self._check_deadline()
        self.passes += 1
        losses: list[float | None] = [None] * len(requests)
        try:
            op = requests[0].op
            if op == "generate":
                output = self.model.generate(*args, probes=probes, **kwargs)
            elif op == "forward":
                with torch.no_grad():
                    output = self.model.forward(*args, probes=probes, **kwargs)
            else:
                output = self._backward(requests, row_slices if shared else None, args, kwargs, probes, losses)
        except _RequestFailed as failure:
            failure.index = indices[failure.index]
            raise
        finally:
            self._deadline = None

        results: dict[int, RunResult] = {}
        for k, (index, request) in enumerate(zip(indices, requests)):
            mine = _rows_of(output, row_slices[k], total) if shared else output
            try:
                mine = _selected(_sendable(mine), request.outputs)
                self._commit(request.session, staged[k])
            except NeurotapError as error:
                results[index] = RunResult(error=error_info(error))
                continue
            results[index] = RunResult(output=mine, loss=losses[k])
        return results

    def _backward(
        self,
        requests: list[RunRequest],
        row_slices: list[slice] | None,
        args: tuple,
        kwargs: dict,
        probes: list,
        losses: list,
    ) -> Any:
        parameters = list(self.model.module.parameters())
        try:
            with torch.enable_grad():
                output = self.model.forward(*args, probes=probes, **kwargs)
                logits = logits_of(output)
                total = None
                for k, request in enumerate(requests):
                    try:
                        loss = request.loss(logits if row_slices is None else logits[row_slices[k]])
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
        return output

    def _isolated(
        self,
        fn: Callable[..., Any],
        position: int,
        session: str,
        name: str,
        staged: dict[str, SaveContext],
        rows: slice | None,
        total: int,
    ) -> Callable[..., Any]:
        """``fn`` seeing only its request's rows and writing to its request's session."""
        ctx = staged.get(name)
        if ctx is None:
            ctx = staged[name] = _staged_copy(self._sessions.get(session, {}).get(name), name)

        def isolated(plan_ctx: SaveContext, value: Any) -> Any:
            object.__setattr__(ctx, "call", plan_ctx.call)
            object.__setattr__(ctx, "step", plan_ctx.step)
            if rows is None:
                part = value
            elif isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == total:
                part = value[rows]
            else:
                raise _Unbatchable(f"the value at {name!r} has no batch dimension in front")
            try:
                result = fn(ctx, part)
            except Exception as error:
                raise _RequestFailed(position, _as_probe_error(error, fn, name, ctx)) from error
            if result is None or result is part or rows is None:
                return result
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
            whole[rows] = result
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
