"""The sharded executor: every rank runs every request in step, each with its own part of the model.

Rank 0 holds the HTTP server and the batch worker, whose thread calls
:class:`ShardedExecutor`; each call is broadcast to the other ranks (running
:func:`follow`) as a command, and all ranks then run it together. Every
operation of the process group they share times out (``--rank-timeout``), the
wait for the next command included, so rank 0 sends a no-op while idle. A
request travels as its wire-format bytes (``encode_request``), so every rank
decodes it with the same checks; one that some rank cannot decode (code naming a
module only some machines have) fails on every rank, with that rank's error.

Every rank runs the batch with the one-process executor's rules (``_StageExecutor``
is an ``InProcessExecutor`` on the rank's stage): the same passes, padded where
lengths differ, in the same order, each rank running the probes at the points
it owns (the owning rank's, or every rank's for glue before the decoder layers,
which each computes for itself) and writing to staged copies of the sessions'
save contexts. After each pass all ranks exchange their outcome (an
all-gather): if any rank failed, all raise the same error and retry alike;
otherwise each request's recordings are committed on every rank, or on none,
and the client gets the error of the rank that raised it. Only rank 0 hears that
a request's client went away, or sees its time run out: it says so in the
rendezvous store, which the other ranks read at their checkpoints, so that a pass
stops on every rank and ends there as after any failure.
"""

from __future__ import annotations

import collections
import datetime
import io
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import cloudpickle
import torch
import torch.distributed as dist

from ..errors import NeurotapError, UnknownPointError
from ..model import Model, wrap
from ..model.load import model_folder
from ..model.losses import loss_value
from ..model.plan import GRADIENT_TARGETS, expand_probes, stopping_probe
from ..points import Inventory, Point, matching, ordered_names, split_narrowing, unknown_point
from ..points.aliases import find_aliases
from ..probes import SaveContext, Skip
from ..transport.batching import Readings, Tokens, Unbatchable
from ..transport.executor import (
    Executor,
    InProcessExecutor,
    Pass,
    RecordingLimitError,
    ReportedError,
    RequestCancelledError,
    RequestTimeoutError,
    _RequestFailed,
    _trace_of,
    error_info,
    recorded_size,
    selected_fields,
    sendable,
)
from ..transport.limits import ModelShape, ServerSettings, check_request
from ..transport.wire import (
    ErrorInfo,
    RunRequest,
    RunResult,
    decode_request,
    describe_tokenizer,
    encode_request,
)
from .pipe import Aborted, Liveness, Pipe, RankFailedError, _first_line, data_group
from .stages import Stage, build_stage, peak_rss_mb, point_owners

DEFAULT_RANK_TIMEOUT = 50.0
CPU = torch.device("cpu")
_LOOK_INTERVAL = 0.2  # seconds between the looks of rank 0 and of the others for a pass that is to stop


class _Rank:
    """What every rank holds: its stage, the merged inventory, and the executor that batches on its stage."""

    def __init__(self, folder: str, settings: ServerSettings, rank_timeout: float, device: torch.device) -> None:
        self.rank = dist.get_rank()
        self.device = device
        self.limits = settings.limits
        self.max_total_bytes = settings.max_total_bytes
        self.max_owner_bytes = settings.max_owner_bytes  # rank 0's counts the tokens: every rank takes it from there
        self.world = dist.get_world_size()
        self.allow_code = settings.allow_code
        self.max_session_bytes = settings.max_session_bytes
        # commands wait as long as researchers stay idle; what runs inside a request must answer in time. Commands
        # and outcomes are plain objects, on the CPU; hidden states and scores travel on the device
        # a transfer may wait while later ranks compute a whole request, so it times out only after that; a rank
        # that hangs is found sooner, by its heartbeat (Liveness)
        transfer_timeout = settings.request_timeout + rank_timeout
        self.control = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=transfer_timeout))
        self.pipe = Pipe(self.rank, self.world, data_group(device, transfer_timeout), device)
        self.stage: Stage = build_stage(model_folder(folder), self.rank, self.world, self.pipe, device)
        dist.barrier()  # ranks load at different speeds; the default group waits as long as loading takes
        self.pipe.connect()
        self.model: Model = wrap(self.stage.module)
        self.stage.module.register_forward_pre_hook(self.pipe.new_step, prepend=True)
        self._take_inventory()
        self.liveness = self.pipe.liveness = Liveness(self.rank, self.world, silent_after=rank_timeout)
        self.executor = _StageExecutor(self)

    # -- inventory ---------------------------------------------------------------------------------

    def _take_inventory(self) -> None:
        self.pipe.begin("forward")
        try:
            inventory = self.model.inventory()  # every rank's dry run at once: the stand-ins pass hidden states on
        finally:
            self.pipe.end()
        points, static, between = point_owners(inventory, self.stage.split, self.rank)
        mine = {
            "points": [p.to_dict() for p in points],
            "static": [p.to_dict() for p in static],
            "between": sorted(between),
            "parameters": self.stage.parameters,
            "peak_rss_mb": self.stage.peak_rss_mb,
            "pid": os.getpid(),
            "max_owner_bytes": self.max_owner_bytes,
        }
        everyone = self.exchange(mine)
        self.max_owner_bytes = everyone[0]["max_owner_bytes"]  # rank 0 knows the tokens that share the limit
        self.points: dict[str, Point] = {}
        self.static: dict[str, Point] = {}
        self.owners: dict[str, list[int]] = collections.defaultdict(list)
        self.between = set().union(*(set(e["between"]) for e in everyone))
        for rank, part in enumerate(everyone):
            for row in part["points"]:
                self.points.setdefault(row["name"], Point.from_dict(row))
                self.owners[row["name"]].append(rank)
            for row in part["static"]:
                self.static.setdefault(row["name"], Point.from_dict(row))
                if row["name"] not in self.points:
                    self.owners[row["name"]].append(rank)
        self.owners = dict(self.owners)
        self.aliases = find_aliases(set(self.points) | set(self.static))
        self.inventory = Inventory()  # the union of the ranks', for point patterns and the order of traces
        self.inventory.points, self.inventory.static, self.inventory.aliases = self.points, self.static, self.aliases
        loaded: dict[str, int] = {}
        for part in everyone:
            loaded.update(part["parameters"])
        self.parameter_count = sum(loaded.values())
        self.startup_rss = [part["peak_rss_mb"] for part in everyone]

    def exchange(self, mine: Any, failure: BaseException | None = None) -> list[Any]:
        """What every rank has to say, in rank order, on every rank; ``failure``: what this rank saw fail."""
        everyone: list[Any] = [None] * self.world
        try:
            dist.all_gather_object(everyone, mine, group=self.control)
        except RuntimeError as error:
            rank = failure.rank if isinstance(failure, RankFailedError) else None
            raise self.liveness.declare(RankFailedError(rank, _first_line(error))) from error
        return everyone

    def to_rank_0(self, mine: Any) -> list[Any] | None:
        """What every rank has to say, in rank order, on rank 0 (None on the others), its tensors on the CPU.

        A rank that cannot pickle what it has still takes part, and rank 0 raises a NeurotapError naming it."""
        try:
            message = pickled_on_cpu(mine)
        except Exception as error:
            message = ErrorInfo(500, type(error).__name__, f"{type(error).__name__}: {error}")
        everyone: list[Any] | None = [None] * self.world if self.rank == 0 else None
        try:
            dist.gather_object(message, everyone, dst=0, group=self.control)
        except RuntimeError as error:
            raise self.liveness.declare(RankFailedError(None, _first_line(error))) from error
        if everyone is None:
            return None
        for rank, part in enumerate(everyone):
            if isinstance(part, ErrorInfo):
                raise NeurotapError(f"rank {rank} of the sharded server could not send what it holds: {part.message}")
        return [pickle.loads(part) for part in everyone]

    def owners_of(self, name: str) -> tuple[str, list[int]]:
        """The raw point name a probe's point names and the ranks that run it."""
        try:
            base, keys = split_narrowing(name)
        except ValueError as error:
            raise UnknownPointError(str(error)) from None
        if base in self.aliases:
            base, alias_keys = split_narrowing(self.aliases[base])
            keys = alias_keys + keys
        owners = self.owners.get(base)
        if owners is None:
            raise unknown_point(base, [*self.points, *self.aliases])
        if base in self.between:
            raise NeurotapError(
                f"the point {base!r} fires once per decoder layer, on the rank owning that layer, so a "
                "sharded server cannot probe it yet; probe the layers' own input and output points instead"
            )
        raw = base + "".join(f"[{k}]" if isinstance(k, int) else f'["{k}"]' for k in keys)
        return raw, owners

    def check(self, request: RunRequest) -> None:
        """Refuse, before any rank runs it, a request naming a point no rank can probe."""
        for spec in request.probes:
            self.owners_of(spec.point)
        if request.stop_at is not None:
            stopping_probe(request.stop_at)  # a pattern is refused as in one process
            raw, _ = self.owners_of(request.stop_at)
            found = self.points.get(split_narrowing(raw)[0]) or self.static.get(split_narrowing(raw)[0])
            if found is not None and found.kind in ("parameter", "buffer"):
                # the owning rank would stop as its forward starts, before the hidden state it waits for arrives
                raise NeurotapError(
                    f"stop_at={request.stop_at!r} is a {found.kind}, which a sharded server cannot stop at: stop at "
                    "a point the forward computes, or read it with get_parameter()"
                )

    def _stage_parts(self, output: Any, op: str) -> dict[str, Any]:
        """What of ``output`` this rank computed and rank 0 lacks: the hidden states and attentions of its
        layers (per step, in a generation), by their index in one process's tuples, and on the last rank a
        generation's raw logits."""
        parts: dict[str, Any] = {}
        if not isinstance(output, Mapping):
            return parts
        split = self.stage.split
        start, stop = split.ranges[self.rank]
        layers = split.ranges[-1][1]
        for field, extra in (("hidden_states", 1), ("attentions", 0)):  # hidden_states[0]: the embeddings
            value = output.get(field)
            if not isinstance(value, (tuple, list)) or not value:
                continue
            steps = value if op == "generate" else (value,)
            parts[field] = []
            for step in steps:
                if len(step) == layers + extra:  # every layer's entry, the other ranks' placeholders among them
                    owned = range(start + extra if self.rank else 0, stop + extra)
                    parts[field].append({i: step[i] for i in owned})
                else:  # only this rank's layers' (transformers records them with hooks on the layers it holds)
                    skip = extra if self.rank else 0  # the hidden states this rank received are the previous rank's
                    parts[field].append({start + j: t for j, t in enumerate(step) if j >= skip})
        if op == "generate" and self.rank == split.last and output.get("logits") is not None:
            parts["logits"] = output["logits"]
        if self.rank == split.last and isinstance(output.get("loss"), torch.Tensor):  # the model's own, from labels
            parts["loss"] = output["loss"]
        return parts

    def _gathered_logits(self, output: Any) -> Any:
        """``output`` with, on rank 0, the last rank's logits in it."""
        logits = output.get("logits") if isinstance(output, Mapping) else None
        if self.rank == self.stage.split.last and not isinstance(logits, torch.Tensor):
            raise NeurotapError(
                f"a sharded forward returns a model output with logits; this one is a {type(output).__name__}"
            )
        received = self.pipe.logits(logits)
        if self.rank == 0 and received is not None:
            output["logits"] = received
        return output

    def facts(self) -> tuple[float, int, str, dict[str, float], float | None]:
        """This rank's peak RSS (MB), process id, the device its weights are on, its transfers (seconds in
        them, and bytes sent), and on a GPU the most memory torch has held there (MB)."""
        held = (p.device for p in self.stage.module.parameters() if p.device.type != "meta")
        transfers = {**self.pipe.seconds, "sent_bytes": self.pipe.sent_bytes}
        gpu = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else None
        return peak_rss_mb(), os.getpid(), str(next(held, torch.device("cpu"))), transfers, gpu

    def parameter(self, name: str) -> torch.Tensor | None:
        try:
            tensor = self.stage.module.get_parameter(name)
        except AttributeError:
            return None
        return tensor.detach().clone() if tensor.device.type != "meta" else None


class _StageExecutor(InProcessExecutor):
    """The one-process executor's batching, run on every rank in step on its own stage.

    Every rank gets the same batch and plans the same passes (the shape readings
    are passes of every rank too, and each rank shares what its points saw), so
    all run the same passes in the same order. Each rank runs the probes at the
    points it owns. After a pass all ranks exchange their outcome: if any rank
    failed, every rank raises the same error, so the retries that follow (the
    request at fault left out, or each request alone) are the same everywhere;
    otherwise each request's recordings are committed on every rank, or on none.
    """

    def __init__(self, rank: _Rank) -> None:
        super().__init__(
            rank.model,
            limits=rank.limits,
            max_session_bytes=rank.max_session_bytes,
            max_total_bytes=rank.max_total_bytes,
            max_owner_bytes=rank.max_owner_bytes,
        )
        self.local = rank
        if rank.device.type != "cpu":  # every rank's inputs, not only the embeddings' rank's, go to its device
            self._device = rank.device
        self.seeds: list[int] = []  # a seed per request of the batch, alike on every rank: sampling draws alike
        self._agreed: _Agreed | None = None  # the outcome of the last pass
        # the pass under way (its number, alike on every rank; its deadline and requests), for rank 0's watcher
        self.current: tuple[int, float | None, list[RunRequest]] | None = None
        self._next_look = 0.0

    def run_batch(
        self,
        batch: Sequence[RunRequest | ErrorInfo],
        seeds: Sequence[int],
        deliver: Callable[[int, RunResult], None] | None = None,
        yielding: Callable[[], bool] | None = None,
    ) -> list[RunResult | None]:
        """``batch`` as this rank decoded it (an ErrorInfo where it could not), run on every rank in step;
        ``deliver`` and ``yielding`` as for ``execute``, on rank 0 only.

        Code can unpickle on one rank and not on another (it names a module that only
        some machines have): such a request fails on every rank with the error of the
        first rank that could not decode it, and the others run.
        """
        refused: dict[int, ErrorInfo] = {}
        if self.local.allow_code:  # without code, every rank decodes what rank 0 decoded
            mine = [entry if isinstance(entry, ErrorInfo) else None for entry in batch]
            for rank, errors in enumerate(self.local.exchange(mine)):
                for k, info in enumerate(errors):
                    if info is not None and k not in refused:
                        refused[k] = ErrorInfo(
                            info.status,
                            info.type,
                            f"rank {rank} of the sharded server {info.message}; every rank decodes the whole "
                            "request, so every module a code probe or loss names must be importable on every rank",
                        )
        kept = [k for k in range(len(batch)) if k not in refused]
        self.seeds = [seeds[k] for k in kept]
        self._agreed = None
        ran = iter(
            self.execute([batch[k] for k in kept], deliver and (lambda j, result: deliver(kept[j], result)), yielding)
        )
        return [RunResult(error=refused[k]) if k in refused else next(ran) for k in range(len(batch))]

    def _check_deadline(self, *_: Any) -> None:
        if not self.local.pipe.stoppable():
            return
        super()._check_deadline()
        # only rank 0 hears that the clients went away (and knows the deadlines): the others read its word from
        # the store, often enough to stop soon and seldom enough to cost nothing (a store read is a round trip)
        current, now = self.current, time.monotonic()
        if self.local.rank == 0 or current is None or now < self._next_look:
            return
        self._next_look = now + _LOOK_INTERVAL
        told = self.local.liveness.stopped_pass()
        if told is not None and told[0] == current[0]:
            kind = RequestCancelledError if told[1] == "cancelled" else RequestTimeoutError
            raise kind(told[2])

    def _inventory(self) -> Any:
        return self.local.inventory

    def _local_point(self, point: str) -> str | None:
        raw, owners = self.local.owners_of(point)
        return raw if self.local.rank in owners else None

    def _kept(self, request: RunRequest) -> set[str]:
        """The saves of ``request`` this rank keeps: glue every rank computes is kept by the first alone."""
        kept = set()
        for spec in request.probes:
            if not isinstance(spec.fn, Skip) and self.local.owners_of(spec.point)[1][0] == self.local.rank:
                kept.add(spec.point + ".grad" if spec.grad else spec.point)
        return kept

    # -- shape readings, on every rank --------------------------------------------------------------

    def _read_layouts(self, tokens: Tokens, points: set[str]) -> Readings:
        known = self._readings.get(tokens.key)
        fresh = known is None or not known.read or any(p not in known.points for p in points)
        readings = super()._read_layouts(tokens, points)
        if fresh and any(self.local.exchange(readings.output is None)):
            readings.output = None  # every rank cuts its own output: all must agree that they can
        return readings

    def _shape_run(
        self, tokens: Tokens, shape: tuple[int, int], *, padded: bool, points: list[str]
    ) -> tuple[Any, dict[str, list]]:
        local = self.local
        here = {p: self._local_point(p) for p in points}
        mine = sorted({raw for raw in here.values() if raw is not None})

        def reading() -> tuple[Any, dict[str, list]]:
            output, shapes = super(_StageExecutor, self)._shape_run(tokens, shape, padded=padded, points=mine)
            return local._gathered_logits(output), shapes

        ran, failure = local.pipe.run("forward", reading)
        output, shapes = ran or (None, {})
        # a rank whose reading failed has none to report, but still tells the others why, as they all wait for it
        seen = {p: shapes[raw] for p, raw in here.items() if raw is not None and self._reports(p)} if ran else {}
        everyone = local.exchange((_failure(failure), seen), failure)
        _raise_agreed([e[0] for e in everyone])
        merged: dict[str, list] = {}
        for _, part in everyone:
            merged.update(part)
        return output, merged

    def _forward(
        self, args: tuple, kwargs: dict[str, Any], by_name: bool, probes: list, stop_at: str | None = None
    ) -> Any:
        if "labels" in kwargs and self.local.rank != self.local.stage.split.last:
            kwargs = {k: v for k, v in kwargs.items() if k != "labels"}  # the model's loss needs the last rank's logits
        return super()._forward(args, kwargs, by_name, probes, stop_at)

    def _yields(self) -> bool:
        return self._agreed is not None and self._agreed.everyone[0]["yields"]

    def _reports(self, point: str) -> bool:
        return self.local.owners_of(point)[1][0] == self.local.rank

    # -- a pass, on every rank ----------------------------------------------------------------------

    def _run_pass(self, run: Pass) -> tuple[Any, list[Any]]:
        local = self.local
        request = run.requests[0]
        stop = None
        if request.stop_at is not None:  # the ranks after the one owning the point have nothing to do
            raw, owners = local.owners_of(request.stop_at)
            stop = (raw, owners[0])
        output, parts, failure = None, [], None
        self.current = (self.passes, self._deadline, run.requests)
        if stop is None or local.rank <= stop[1]:

            def passing() -> tuple[Any, list[Any]]:
                self._check_deadline()
                return self._stage_pass(run, stop)

            # rank 0 needs the last rank's logits only for an answer that holds them
            logits = any(r.outputs is None or "logits" in r.outputs for r in run.requests)
            ran, failure = local.pipe.run(request.op, passing, stop[1] if stop is not None else None, logits)
            if failure is None:
                output, parts = ran
        self.current = None
        outcome = self._outcome(run, output, parts, stop) if failure is None else []
        # every rank needs what decides each request's fate; only rank 0 the values that go back to the clients
        status = [{key: entry[key] for key in _STATUS} for entry in outcome]
        # rank 0 alone knows whether others wait; every rank stops the batch after this pass alike
        yields = local.rank == 0 and super()._yields()
        agreed = local.exchange(
            {"failure": _failure(failure), "requests": status, "bytes": self.recorded_bytes(), "yields": yields},
            failure,
        )
        _raise_agreed([e["failure"] for e in agreed])
        try:
            answers: Any = local.to_rank_0([{key: entry[key] for key in _ANSWER} for entry in outcome])
        except RankFailedError:
            raise
        except NeurotapError as error:  # rank 0 alone raises it, once every rank has sent: they stay in step
            answers = error_info(error)
        self._agreed = _Agreed(agreed, answers, outcome, stop)
        return output, parts

    def _stage_pass(self, run: Pass, stop: tuple[str, int] | None) -> tuple[Any, list[Any]]:
        local = self.local
        request = run.requests[0]
        if request.op == "generate":
            from transformers import LogitsProcessorList

            with torch.random.fork_rng(devices=[local.device] if local.device.type == "cuda" else []):
                torch.manual_seed(self.seeds[run.indices[0]])  # every rank draws alike, so all pick the same tokens
                output = self.model.generate(
                    *run.args,
                    probes=run.probes,
                    logits_processor=LogitsProcessorList([_SharedScores(local.pipe)]),
                    **run.kwargs,
                    **run.extra,
                )
            return output, []
        if request.op == "backward":
            return None, self._stage_backward(run)
        stop_here = stop[0] if stop is not None and stop[1] == local.rank else None
        with torch.no_grad():
            output = self._forward(run.args, run.kwargs, run.by_name, run.probes, stop_here)
        return (output if stop is not None else local._gathered_logits(output)), []

    def _stage_backward(self, run: Pass) -> list[Any]:
        """Forward down the stages, the losses on the last, their gradients back up them, rank to rank.

        Each rank computes only the gradients its probes ask for and the one at what it
        received (for the rank before): no weight's ``.grad`` is touched.
        """
        local, pipe = self.local, self.local.pipe
        targets: list[torch.Tensor] = []
        noting = GRADIENT_TARGETS.set(targets)
        try:
            with torch.enable_grad():
                output = self._forward(run.args, run.kwargs, run.by_name, run.probes)
        finally:
            GRADIENT_TARGETS.reset(noting)
        wanted = [*targets, *([pipe.received] if local.rank > 0 else [])]
        if local.rank == local.stage.split.last:
            total = None
            with torch.enable_grad():
                for k, request in enumerate(run.requests):
                    try:
                        loss = loss_value(request.loss, run.part_of(output, k))
                    except Exception as error:
                        raise _RequestFailed(k, error) from error
                    run.losses[k] = float(loss.detach())
                    total = loss if total is None else total + loss
            if total is None or not total.requires_grad:
                raise NeurotapError("the loss does not depend on anything that requires grad")
            local._gathered_logits(output)  # rank 0 gets them before the gradients start back
            grads = torch.autograd.grad(total, wanted, allow_unused=True) if wanted else ()
        else:
            local._gathered_logits(output)
            sent = pipe.sent
            gradient = pipe.gradient_in() if sent is not None else None
            going_on = wanted and sent is not None
            grads = torch.autograd.grad(sent, wanted, gradient, allow_unused=True) if going_on else ()
        if local.rank > 0:
            pipe.gradient_out(grads[-1] if grads else None)
        return [run.part_of(output, k) for k in range(len(run.requests))]

    def _outcome(self, run: Pass, output: Any, parts: list[Any], stop: tuple[str, int] | None) -> list[dict]:
        """What this rank has of each request of a pass that succeeded here."""
        local = self.local
        holder = stop[1] if stop is not None else 0  # the rank whose output the client gets
        ran = stop is None or local.rank <= stop[1]
        outcome = []
        for k, request in enumerate(run.requests):
            entry: dict[str, Any] = {"error": None, "cancelled": request.cancelled, "loss": run.losses[k]}
            entry.update(sizes={}, parts={}, trace={})
            try:
                kept = self._kept(request)
                mine = (parts[k] if parts else run.part_of(output, k)) if ran else None
                if local.rank == holder:  # the names are checked before anything commits
                    fields = sendable(mine)
                    if stop is None and "labels" in request.kwargs and isinstance(fields, Mapping):
                        fields = {"loss": None, **fields}  # the model's own loss comes from the last rank
                    selected_fields(fields, request.outputs)
                if stop is None:
                    entry["parts"] = local._stage_parts(mine, request.op)
                elif local.rank == holder and request.outputs != []:
                    entry["parts"] = {"value": mine}
                staged, traced = run.staged[k], run.traced[k]
                entry["sizes"] = {name: recorded_size(staged[name]._data, name) for name in kept if name in staged}
                entry["trace"] = {name: dict(traced[name]._data) for name in kept if name in traced}
            except Exception as error:  # the request fails on every rank alike, and the ranks stay in step
                if not isinstance(error, NeurotapError):
                    error = NeurotapError(
                        f"rank {local.rank} of the sharded server could not read what the request's probes saved "
                        f"or its output: {type(error).__name__}: {error}"
                    )
                entry["error"] = error_info(error)
            ours = self._session_bytes.get(request.session, {})
            entry["recorded"] = sum(entry["sizes"].values())
            entry["kept_bytes"] = sum(size for name, size in ours.items() if name not in entry["sizes"])
            entry["before"] = sum(ours.values())
            entry["owner_bytes"] = self.recorded_bytes(request.owner)
            outcome.append(entry)
        return outcome

    def _results(self, run: Pass, output: Any, parts: list[Any]) -> dict[int, RunResult]:
        agreed, local = self._agreed, self.local
        server = sum(e["bytes"] for e in agreed.everyone)
        owners: dict[str, int] = {}  # what each owner's sessions hold on all ranks, as this pass commits
        stop = agreed.stop
        results: dict[int, RunResult] = {}
        for k, (index, request) in enumerate(zip(run.indices, run.requests)):
            entries = [e["requests"][k] for e in agreed.everyone]
            if entries[0]["cancelled"]:  # its client went away: nothing of it is kept
                results[index] = RunResult(error=error_info(RequestCancelledError("the client went away")))
                continue
            errors = [e["error"] for e in entries if e["error"] is not None]
            if errors:
                results[index] = RunResult(error=errors[0])
                continue
            held = owners.setdefault(request.owner, sum(e["owner_bytes"] for e in entries))
            refusal = self._refusal(entries, server, held)
            if refusal is not None:
                results[index] = RunResult(error=error_info(refusal))
                continue
            grown = sum(e["kept_bytes"] + e["recorded"] - e["before"] for e in entries)
            server += grown
            owners[request.owner] += grown
            self._owners[request.session] = request.owner
            staged, sizes = run.staged[k], agreed.mine[k]["sizes"]
            self._sessions.setdefault(request.session, {}).update({n: staged[n] for n in sizes})
            self._session_bytes.setdefault(request.session, {}).update(sizes)
            if local.rank != 0:
                results[index] = RunResult()  # rank 0 answers the client
                continue
            if isinstance(agreed.answers, ErrorInfo):
                results[index] = RunResult(error=agreed.answers)
                continue
            given = [answers[k] for answers in agreed.answers]
            if stop is not None:
                value = next((g["parts"]["value"] for g in given if "value" in g["parts"]), None)
                answer = selected_fields(sendable(value), request.outputs)
            else:
                whole = _merged(parts[k] if parts else run.part_of(output, k), [g["parts"] for g in given], request.op)
                answer = selected_fields(sendable(whole), request.outputs)
            trace = None
            if any(spec.trace for spec in request.probes):
                saved = {
                    spec.point + ".grad" * spec.grad: SaveContext(spec.point + ".grad" * spec.grad)
                    for spec in request.probes
                    if spec.trace
                }  # a rank after a stop_at point ran none of its probes
                for part in given:
                    for name, data in part["trace"].items():
                        saved.setdefault(name, SaveContext(name))._data.update(data)
                trace = _trace_of(request, saved, self._inventory())
            results[index] = RunResult(output=answer, loss=given[local.stage.split.last]["loss"], trace=trace)
        return results

    def _refusal(self, entries: list[dict], server: int, owner: int) -> RecordingLimitError | None:
        """Why a request's recordings cannot be kept: the limits hold for all ranks together (``server``: what
        every session holds, ``owner``: what the sessions of the request's owner hold)."""
        total = sum(e["kept_bytes"] + e["recorded"] for e in entries)
        before = sum(e["before"] for e in entries)
        refusal = None
        if total > self.max_session_bytes:
            refusal = (
                f"this request would bring the session's recordings to {total} bytes, over the server's "
                f"limit of {self.max_session_bytes} (--max-session-bytes)"
            )
        elif total > before and owner - before + total > self.max_owner_bytes:
            refusal = (
                f"the recordings of your token's sessions would reach {owner - before + total} bytes, over the "
                f"server's limit of {self.max_owner_bytes} for one token (--max-total-bytes, shared equally among "
                "the tokens)"
            )
        elif total > before and server - before + total > self.max_total_bytes:
            refusal = (
                f"the server's recordings would reach {server - before + total} bytes, over its limit of "
                f"{self.max_total_bytes} for all sessions together (--max-total-bytes)"
            )
        if refusal is None:
            return None
        advice = "; fetch them with recordings() and clear_recordings(), or reduce on the server (nt.Mean, ...)"
        return RecordingLimitError(refusal + advice)


_STATUS = (
    "error",
    "cancelled",
    "recorded",
    "kept_bytes",
    "before",
    "owner_bytes",
)  # of each request, from every rank to every rank
_ANSWER = ("parts", "trace", "loss")  # of each request, from every rank to rank 0


class _Agreed(NamedTuple):
    """The outcome of a pass: every rank's status of it, on every rank; every rank's values of it, on rank 0
    (None elsewhere); this rank's own entries, and the pass's ``stop_at`` (its raw point and owning rank)."""

    everyone: list[dict]
    answers: list[list[dict]] | ErrorInfo | None
    mine: list[dict]
    stop: tuple[str, int] | None


def _failure(error: BaseException | None) -> tuple | None:
    """What a rank tells the others of how its part of a pass failed (plain data)."""
    if error is None:
        return None
    if isinstance(error, RankFailedError):
        return ("rank failed", error.rank)
    if isinstance(error, Aborted):
        return ("aborted",)
    if isinstance(error, _RequestFailed):
        return ("request", error.index, error_info(error.error))
    for kind in (RequestTimeoutError, RequestCancelledError, Unbatchable):
        if isinstance(error, kind):
            return (kind.__name__, str(error))
    return ("other", error_info(error))


def _raise_agreed(failures: list[tuple | None]) -> None:
    """Raise, on every rank alike, what failed a pass on some rank: the error of the first rank that raised one
    of its own (the others only stopped because of it)."""
    named = [f for f in failures if f is not None]
    if not named:
        return
    dead = [f for f in named if f[0] == "rank failed"]
    if dead:
        raise RankFailedError(next((f[1] for f in dead if f[1] is not None), None))
    chosen = next((f for f in named if f[0] != "aborted"), named[0])
    kinds = {kind.__name__: kind for kind in (RequestTimeoutError, RequestCancelledError, Unbatchable)}
    if chosen[0] == "request":
        raise _RequestFailed(chosen[1], ReportedError(chosen[2]))
    if chosen[0] in kinds:
        raise kinds[chosen[0]](chosen[1])
    if chosen[0] == "other":
        raise ReportedError(chosen[1])
    raise Aborted("a rank stopped without saying why")


class _SharedScores:
    """A logits processor that replaces every rank's next-token scores with the last rank's."""

    def __init__(self, pipe: Pipe) -> None:
        self.pipe = pipe

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self.pipe.scores(scores)


class _OnCPU(cloudpickle.Pickler):
    """Pickles every tensor as its CPU copy: a GPU tensor would come back on rank 0 on the GPU of the rank that
    sent it. The pickler walks whatever holds the tensors, and a class a code probe defined travels by value."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor) and obj.device.type != "cpu":
            return obj.cpu().__reduce_ex__(self.proto)
        return super().reducer_override(obj)


def pickled_on_cpu(value: Any) -> bytes:
    buffer = io.BytesIO()
    _OnCPU(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    return buffer.getvalue()


def _merged(output: Any, parts: list[dict[str, Any]], op: str) -> Any:
    """Rank 0's ``output`` with every rank's own hidden states, attentions and raw logits put in."""
    if not isinstance(output, Mapping):
        return output
    for field in ("hidden_states", "attentions"):
        steps: list[dict[int, Any]] = []
        for part in parts:
            for step, entries in enumerate(part.get(field, [])):
                if step == len(steps):
                    steps.append({})
                steps[step].update(entries)
        if steps:
            value = tuple(tuple(entries[i] for i in sorted(entries)) for entries in steps)
            output[field] = value if op == "generate" else value[0]
    logits = next((part["logits"] for part in parts if "logits" in part), None)
    if logits is not None:
        output["logits"] = logits
    loss = next((part["loss"] for part in parts if "loss" in part), None)
    if loss is not None:  # a model output lists its loss first, as one process's does
        output = type(output)(**{"loss": loss, **output}) if type(output) is not dict else {"loss": loss, **output}
    return output


# -- commands ----------------------------------------------------------------------------------------


def _broadcast(command: Any, group: Any) -> Any:
    box = [command]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


class ShardedExecutor(Executor):
    """Rank 0's executor: runs each call on every rank at once (see the module docstring)."""

    def __init__(
        self,
        folder: str,
        settings: ServerSettings,
        *,
        rank_timeout: float = DEFAULT_RANK_TIMEOUT,
        on_failure: Callable[[RankFailedError], None] | None = None,
        device: torch.device = CPU,
    ) -> None:
        self.folder = folder
        self.limits = settings.limits
        self.local = _Rank(folder, settings, rank_timeout, device)
        self.shape = ModelShape.of(self.local.stage.module)
        self.inventory = self.local.inventory  # every rank's points, for patterns in requests and points()
        self.rank_timeout = rank_timeout
        self.failed: RankFailedError | None = None
        self.on_failure = on_failure
        self._seed = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
        self.liveness = self.local.liveness
        self._recording = threading.Lock()
        self.liveness.start(lambda error: self._record(error or RankFailedError(None, "the rendezvous store is gone")))
        # every transfer times out, the wait for the next command included: while idle, rank 0 sends a
        # no-op often enough that the others never time out and that a hung rank is found within the timeout
        self._lock = threading.RLock()
        self._stopped = False
        self._last_command = time.monotonic()
        threading.Thread(target=self._keep_alive, name="neurotap-keep-alive", daemon=True).start()
        threading.Thread(target=self._watch_passes, name="neurotap-pass-watch", daemon=True).start()

    # -- driving the other ranks -------------------------------------------------------------------

    def _keep_alive(self) -> None:
        interval = max(0.1, self.rank_timeout / 4)
        while True:
            time.sleep(interval / 2)
            with self._lock:
                if self.failed is not None or self._stopped:
                    return
                silent = self.liveness.silent(after=self.rank_timeout)
                try:
                    if silent:  # a stopped rank may still take a no-op into its socket buffer: ask the heartbeat
                        self._fail(RankFailedError(silent[0], "it stopped answering"))
                    if time.monotonic() - self._last_command >= interval:
                        self._command("noop")
                except RankFailedError:
                    return

    def _watch_passes(self) -> None:
        """Tell every rank, through the store, that the pass under way stops: its clients all went away, or
        its time ran out. Rank 0 stops at its own checkpoints; this reaches the ranks computing meanwhile."""
        told = None
        while not self._stopped and self.failed is None:
            time.sleep(_LOOK_INTERVAL)
            current = self.local.executor.current
            if current is None or current[0] == told:
                continue
            number, deadline, requests = current
            if requests and all(r.cancelled for r in requests):
                self.liveness.stop_pass(number, "cancelled", "the client went away before the request finished")
                told = number
            elif deadline is not None and time.time() > deadline:
                self.liveness.stop_pass(
                    number, "timeout", "the request ran past the server's request timeout (--request-timeout)"
                )
                told = number

    def _command(self, *command: Any) -> None:
        if self.failed is not None:
            raise self.failed
        self._last_command = time.monotonic()
        try:
            _broadcast(command, self.local.control)
        except RuntimeError as error:
            self._fail(RankFailedError(None, _first_line(error)))

    def _record(self, error: RankFailedError) -> None:
        """The first rank failure ends the server; every rank names the one declared first (``Liveness``)."""
        with self._recording:
            if self.failed is not None:
                return
            self.failed = error = self.liveness.declare(error)
        if self.on_failure is not None:
            self.on_failure(error)

    def _fail(self, error: RankFailedError) -> None:
        self._record(error)
        raise self.failed

    def _gather(self, value: Any) -> list[Any]:
        try:
            return self.local.to_rank_0(value)
        except RankFailedError as error:
            self._fail(error)

    # -- the Executor interface --------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        with self._lock:
            self._command("describe")
            facts = self._gather(self.local.facts())
        module = self.local.stage.module
        config = getattr(module, "config", None)
        ranks = self.local.stage.split.describe()
        for row, (now, pid, device, transfers, gpu), startup in zip(ranks, facts, self.local.startup_rss):
            row["pid"] = pid
            row["device"] = device
            row["send_s"] = round(transfers["send"], 4)  # sending hidden states, logits and scores on
            row["receive_s"] = round(transfers["receive"], 4)  # waiting for them: the other ranks' compute included
            row["sent_bytes"] = transfers["sent_bytes"]
            row["peak_rss_mb"] = round(now, 1)
            row["peak_rss_mb_after_load"] = round(startup, 1)
            row["peak_gpu_mb"] = round(gpu, 1) if gpu is not None else None
        return {
            "module": type(module).__name__,
            "parameters": self.local.parameter_count,
            "vocab_size": getattr(config, "vocab_size", None),
            "max_position_embeddings": getattr(config, "max_position_embeddings", None),
            "has_generate": hasattr(module, "generate"),
            "limits": self.limits.to_dict(),
            "requests": self.local.executor.requests,
            "passes": self.local.executor.passes,  # fewer than requests where requests shared passes
            "padded_passes": self.local.executor.padded_passes,
            "ranks": ranks,
        }

    def points(self, prefix: str | None) -> list[dict[str, Any]]:
        points = list(self.local.points.values())
        if prefix:
            chosen = set(matching(prefix, self.local.points, prefix=True))
            points = [p for p in points if p.name in chosen]
            if not points:
                raise unknown_point(prefix, ordered_names(self.inventory))
        return [p.to_dict() for p in points]

    def aliases(self) -> dict[str, str]:
        return dict(self.local.aliases)

    def tokenizer(self) -> dict[str, Any] | None:
        from ..model.load import _has_tokenizer

        folder = model_folder(self.folder)
        if not _has_tokenizer(folder):
            return None
        import transformers

        return describe_tokenizer(transformers.AutoTokenizer.from_pretrained(folder))

    def execute(
        self,
        batch: Sequence[RunRequest],
        deliver: Callable[[int, RunResult], None] | None = None,
        yielding: Callable[[], bool] | None = None,
    ) -> list[RunResult | None]:
        batch = list(batch)
        results: list[RunResult | None] = [None] * len(batch)
        send: list[tuple[int, str, bytes, int]] = []
        for index, request in enumerate(batch):
            if self.failed is not None:
                results[index] = RunResult(error=_unavailable(self.failed))
            elif request.deadline is not None and time.time() > request.deadline:
                error = RequestTimeoutError("the request ran past the server's request timeout (--request-timeout)")
                results[index] = RunResult(error=error_info(error))
            else:
                try:
                    request.probes = expand_probes(request.probes, self.inventory)  # patterns: one probe per point
                    # every rank runs what these bytes decode to, rank 0 included, so all hold the same request
                    body = encode_request(request)
                    decoded = decode_request(body, allow_code=self.local.allow_code)
                    check_request(decoded, self.limits, self.shape)
                    self.local.check(decoded)
                except NeurotapError as error:  # WireError, RequestTooCostlyError and unknown patterns included
                    results[index] = RunResult(error=error_info(error))
                    continue
                # rank 0 runs them in the object the server holds: there it marks the request cancelled
                for name in _ENCODED_FIELDS:
                    setattr(request, name, getattr(decoded, name))
                seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self._seed))
                send.append((index, (request.session, request.owner), body, seed))
        if deliver is not None:
            for index, result in enumerate(results):
                if result is not None:
                    deliver(index, result)
        if send:
            with self._lock:
                self._execute(batch, send, results, deliver, yielding)
        return results

    def _execute(
        self,
        batch: list[RunRequest],
        send: list,
        results: list,
        deliver: Callable[[int, RunResult], None] | None,
        yielding: Callable[[], bool] | None,
    ) -> None:
        try:
            self._command("execute", [(session, body, seed) for _, session, body, seed in send])
            ran = self.local.executor.run_batch(
                [batch[index] for index, *_ in send],
                [seed for *_, seed in send],
                deliver and (lambda k, result: deliver(send[k][0], result)),
                yielding,
            )
            for (index, *_), result in zip(send, ran):
                results[index] = result
        except RankFailedError as error:
            self._record(error)
            for index, *_ in send:
                if results[index] is None:
                    results[index] = RunResult(error=_unavailable(self.failed))

    def recordings(self, session: str) -> dict[str, dict[str, Any]]:
        with self._lock:
            self._command("recordings", session)
            parts = self._gather(self.local.executor.recordings(session))
        merged: dict[str, dict[str, Any]] = {}
        for part in parts:
            for name, data in (part or {}).items():
                merged.setdefault(name, data)
        return merged

    def clear_recordings(self, session: str) -> None:
        with self._lock:
            self._command("clear", session)
            self.local.executor.clear_recordings(session)

    def close_session(self, session: str) -> None:
        self.clear_recordings(session)

    def get_parameter(self, name: str) -> torch.Tensor:
        with self._lock:
            self._command("parameter", name)
            tensors = self._gather(self.local.parameter(name))
        for tensor in tensors:
            if tensor is not None:
                return tensor
        raise UnknownPointError(f"no parameter named {name!r}")

    def stop(self) -> None:
        """Tell the other ranks to exit; they also exit if this rank disappears."""
        with self._lock:
            self._stopped = True
            if self.failed is None:
                try:
                    _broadcast(("stop",), self.local.control)
                except RuntimeError as error:  # the others learn it from the store and end
                    self.liveness.declare(RankFailedError(None, _first_line(error)))


_ENCODED_FIELDS = ("op", "args", "kwargs", "probes", "outputs", "loss", "stop_at")


def _unavailable(error: RankFailedError) -> ErrorInfo:
    return ErrorInfo(503, "RankFailedError", str(error))


def follow(folder: str, settings: ServerSettings, rank_timeout: float, device: torch.device = CPU) -> int:
    """The loop of every rank but 0: run rank 0's commands until it says stop (or is gone)."""
    local = _Rank(folder, settings, rank_timeout, device)

    def leave(error: RankFailedError | None) -> None:
        # a failure declared by any rank ends this one at once, even in the middle of a transfer that would
        # only time out; with the launcher's store gone, so is rank 0's machine
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    local.liveness.start(leave)
    while True:
        try:
            command = _broadcast(None, local.control)
        except RuntimeError as error:
            # rank 0 is gone, or stopped sending even its no-ops: a rank 0 that hangs would hold the launcher up
            local.liveness.declare(RankFailedError(0, _first_line(error)))
            return 1
        kind = command[0]
        try:
            if kind == "noop":
                continue
            if kind == "stop":
                return 0
            if kind == "execute":
                batch: list[RunRequest | ErrorInfo] = []
                for (session, owner), body, _seed in command[1]:
                    try:
                        request = decode_request(body, allow_code=settings.allow_code)
                    except NeurotapError as error:  # code rank 0 could unpickle and this rank cannot
                        batch.append(error_info(error))
                        continue
                    request.session, request.owner = session, owner
                    batch.append(request)
                local.executor.run_batch(batch, [seed for *_, seed in command[1]])
            elif kind == "describe":
                local.to_rank_0(local.facts())
            elif kind == "recordings":
                local.to_rank_0(local.executor.recordings(command[1]))
            elif kind == "clear":
                local.executor.clear_recordings(command[1])
            elif kind == "parameter":
                local.to_rank_0(local.parameter(command[1]))
        except (RankFailedError, RuntimeError) as error:
            if isinstance(error, RuntimeError):  # a RankFailedError is declared already
                local.liveness.declare(RankFailedError(None, _first_line(error)))
            return 1


def exit_soon(delay: float, hard_after: float) -> Callable[[RankFailedError], None]:
    """What rank 0 does once a rank failed: answer what is in flight, then stop; exit hard if stopping hangs.
    The other ranks end by themselves (``follow``), or by their watchdogs."""

    def on_failure(error: RankFailedError) -> None:
        threading.Timer(delay, os.kill, (os.getpid(), signal.SIGTERM)).start()
        killer = threading.Timer(hard_after, os._exit, (1,))
        killer.daemon = True
        killer.start()

    return on_failure
