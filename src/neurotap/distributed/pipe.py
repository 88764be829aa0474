"""Moving hidden states stage to stage, and keeping every rank in step when something fails.

Each pass (a forward, or one step of generate) sends one message down the
pipeline, rank ``r`` to ``r + 1``, then a last one from the last rank: its logits
to rank 0 (a forward), or its next-token scores to every rank (a generation
step, so that all ranks pick the same token). A message is a header of eight
int64 numbers (status, failed rank, dtype, rank of the tensor, up to four sizes)
and, if the status is ``OK``, the tensor.

A rank that fails part-way still completes every transfer the pass expects of
it (``drain``), sending ``ABORTED`` (an error elsewhere, reported by the rank
that raised it) or ``RANK_FAILED`` (a rank did not answer, named in the header)
in place of its tensor; the ranks after it then raise too and drain in turn.
So a pass ends on every rank, and every rank then learns what happened.

The messages travel over a process group of their own (``data_group``): NCCL
between GPUs, gloo on the CPU. Everything else the ranks say to each other
(commands, outcomes, recordings) goes over gloo, on the CPU.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ..errors import NeurotapError
from ..transport.executor import ExecutorFailedError
from .stages import Link

OK, ABORTED, RANK_FAILED = 0, 1, 2
_HEADER = 8
_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.bool]


class RankFailedError(ExecutorFailedError):
    """A rank died or stopped answering; the sharded server cannot go on."""

    def __init__(self, rank: int | None, detail: str = "") -> None:
        who = f"rank {rank}" if rank is not None else "a rank"
        super().__init__(
            f"{who} of the sharded server failed or stopped answering{': ' + detail if detail else ''}; "
            "the server is shutting down (restart it)"
        )
        self.rank = rank
        self.detail = detail


class Aborted(NeurotapError):
    """This rank stopped because another one failed; that rank reports the reason."""


def data_group(device: torch.device, timeout: float) -> Any:
    """The process group the pipeline's messages travel over: NCCL for tensors on GPUs, gloo on the CPU (a
    group of its own there too, so that the CPU runs the same code). Every rank makes it, in the same order."""
    if device.type == "cuda":
        # NCCL's transfers then raise in the thread that waits for them once the timeout passes, as gloo's do,
        # instead of only in NCCL's watchdog, which would end the process without naming the rank
        os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
    backend = "nccl" if device.type == "cuda" else "gloo"
    return dist.new_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))


class Pipe(Link):
    """This rank's end of the pipeline, over ``group`` (see ``data_group``), with tensors on ``device``."""

    def __init__(self, rank: int, world: int, group: Any, device: torch.device) -> None:
        self.rank = rank
        self.world = world
        self.last = world - 1
        self.group = group
        self.device = device
        self.generating = self.backward = self.active = False
        self.until: int | None = None
        self.logits_wanted = True
        self._recv = self._send = self._final = self._grad_recv = self._grad_send = False
        self.received: torch.Tensor | None = None  # what came in and went out, for the backward pass
        self.sent: torch.Tensor | None = None
        # seconds spent sending, and waiting for what other ranks send (their compute included), since the start
        self.seconds = {"send": 0.0, "receive": 0.0}
        self.sent_bytes = 0  # headers and tensors this rank sent, since the start
        self.liveness: Liveness | None = None  # where a failed transfer is declared to every rank

    def connect(self) -> None:
        """Make now every connection that passes use: NCCL sets a communicator up the first time two ranks, or
        the group, transfer something, which would otherwise fall to the first request (and a rank missing
        then would hang it there). Down the pipeline (a backward's gradients come back on the same pairs),
        the last rank to rank 0 (logits), and a broadcast from the last rank (a generation's scores)."""
        if self.world == 1:
            return
        token = torch.zeros(1, device=self.device)
        if self.rank > 0:
            dist.recv(token, self.rank - 1, group=self.group)
        if self.rank < self.last:
            dist.send(token, self.rank + 1, group=self.group)
        if self.rank == self.last:
            dist.send(token, 0, group=self.group)
        elif self.rank == 0:
            dist.recv(token, self.last, group=self.group)
        dist.broadcast(token, self.last, group=self.group)

    # -- a pass ------------------------------------------------------------------------------------

    def begin(self, op: str, until: int | None = None, logits: bool = True) -> None:
        """A pass of ``op``: "forward", "generate" (one step per forward) or "backward". A forward that ends
        on rank ``until`` (at its stop_at point) runs on the ranks up to that one, and its value goes to rank 0
        with the pass's outcome, not down the pipe. ``logits``: whether rank 0 needs the last rank's logits
        (a generation's scores always travel)."""
        self.generating = op == "generate"
        self.backward = op == "backward"
        self.until = until
        self.logits_wanted = logits
        self.active = True
        self.steps = 0

    def end(self) -> None:
        self.active = False
        self.generating = self.backward = False
        self.received = self.sent = None  # the pass's autograd graph goes with them

    def new_step(self, *_: Any) -> None:
        """Called before every forward of the root module: what this step will transfer."""
        if not self.active or self.world == 1:
            return
        self.steps += 1
        self._recv = self.rank > 0
        self._send = self.rank < (self.last if self.until is None else self.until)
        self._final = self.until is None and (self.generating or (self.logits_wanted and self.rank in (0, self.last)))
        # a backward pass then sends gradients the other way: rank r + 1 to rank r
        self._grad_recv = self.backward and self.rank < self.last
        self._grad_send = self.backward and self.rank > 0

    def run(
        self, op: str, step: Callable[[], Any], until: int | None = None, logits: bool = True
    ) -> tuple[Any, Exception | None]:
        """``step()`` as a pass of ``op`` (see ``begin``): what it returned, or else the error that ended it here,
        once this rank's transfers are complete (the rank failure they met, if any: it names the rank at fault)."""
        self.begin(op, until, logits)
        try:
            return step(), None
        except Exception as error:
            return None, self.drain(error) or error
        finally:
            self.end()

    def stoppable(self) -> bool:
        """Whether this rank failing now stops the others in this step too. In a generation, a rank that has
        sent its part of the step on would complete the step as if nothing had happened, and the others would
        wait for it in the next one: such a rank stops in its next step instead."""
        if not self.active or not self.generating or self.world == 1:
            return True
        return self._send or (self.rank == self.last and self._final)

    def drain(self, error: BaseException) -> RankFailedError | None:
        """Complete this step's transfers after ``error``; the rank failure seen, if any."""
        if not self.active or self.world == 1:
            return error if isinstance(error, RankFailedError) else None
        if self.steps == 0:
            self.new_step()  # failed before the model ran: the others still expect this rank's part of a pass
        failed = error if isinstance(error, RankFailedError) else None
        if self._recv:
            self._recv = False
            try:
                header = self._recv_header(self.rank - 1)
                if header[0] == OK:
                    self._recv_tensor(header, self.rank - 1)
                elif header[0] == RANK_FAILED and failed is None:
                    failed = RankFailedError(_rank_of(header))
            except RankFailedError as seen:
                failed = failed or seen
        status = (RANK_FAILED, failed.rank) if failed is not None else (ABORTED, None)
        if self._send:
            self._send = False
            try:
                self._send_header(self.rank + 1, *status)
            except RankFailedError as seen:
                failed = failed or seen
                status = (RANK_FAILED, failed.rank)
        if self._final:
            self._final = False
            try:
                self._final_transfer(None, status)
            except (RankFailedError, Aborted) as seen:
                if isinstance(seen, RankFailedError):
                    failed = failed or seen
        if self._grad_recv:
            self._grad_recv = False
            try:
                header = self._recv_header(self.rank + 1)
                if header[0] == OK:
                    self._recv_tensor(header, self.rank + 1)
                elif header[0] == RANK_FAILED and failed is None:
                    failed = RankFailedError(_rank_of(header))
            except RankFailedError as seen:
                failed = failed or seen
        if self._grad_send:
            self._grad_send = False
            status = (RANK_FAILED, failed.rank) if failed is not None else (ABORTED, None)
            try:
                self._send_header(self.rank - 1, *status)
            except RankFailedError as seen:
                failed = failed or seen
        return failed

    # -- what the stand-ins call -------------------------------------------------------------------

    def receive(self, like: torch.Tensor) -> torch.Tensor:
        if not self._recv:
            raise NeurotapError("the pipeline received twice in one step")  # a stand-in called out of turn
        self._recv = False
        header = self._recv_header(self.rank - 1)
        self._raise_for(header)
        received = self._recv_tensor(header, self.rank - 1)
        if self.backward:
            self.received = received.requires_grad_(True)  # its gradient goes back to rank - 1
        return received

    def send(self, hidden: torch.Tensor) -> None:
        if self.until == self.rank:
            # the forward was to stop on this rank's layers and did not: nothing after them runs, and the
            # forward ends here with its stop_at point missed, as in one process
            return
        if not self._send:
            raise NeurotapError("the pipeline sent twice in one step")
        self._send = False
        if self.backward:
            self.sent = hidden  # still in this rank's autograd graph: the next rank's gradient enters here
        self._send_tensor(self.rank + 1, hidden.detach())

    # -- gradients, the other way --------------------------------------------------------------------

    def gradient_in(self) -> torch.Tensor:
        """The gradient at what this rank sent on, from the next rank."""
        self._grad_recv = False
        header = self._recv_header(self.rank + 1)
        self._raise_for(header)
        return self._recv_tensor(header, self.rank + 1)

    def gradient_out(self, grad: torch.Tensor | None) -> None:
        """``grad``, the gradient at what this rank received, to the previous rank (None: it has none)."""
        self._grad_send = False
        received = self.received
        if received is None:
            raise NeurotapError("the backward pass has no received hidden states to send a gradient for")
        self._send_tensor(self.rank - 1, grad if grad is not None else torch.zeros_like(received))

    # -- the last transfer of a step ---------------------------------------------------------------

    def logits(self, logits: torch.Tensor | None) -> torch.Tensor | None:
        """After a forward: the last rank's logits, at rank 0 (None elsewhere)."""
        if self.world == 1 or not self._final:
            return logits
        self._final = False
        return self._final_transfer(logits, (OK, None))

    def scores(self, scores: torch.Tensor) -> torch.Tensor:
        """In a generation step: the last rank's next-token scores, on every rank."""
        if self.world == 1:
            return scores
        self._final = False
        return self._final_transfer(scores, (OK, None))

    def _final_transfer(self, tensor: torch.Tensor | None, status: tuple[int, int | None]) -> torch.Tensor | None:
        if self.generating:
            header = torch.zeros(_HEADER, dtype=torch.int64, device=self.device)
            if self.rank == self.last:
                header = _header(status[0], status[1], tensor if status[0] == OK else None).to(self.device)
                self.sent_bytes += header.nbytes + (tensor.nbytes if status[0] == OK else 0)
            kind = "send" if self.rank == self.last else "receive"
            self._collective(lambda: dist.broadcast(header, self.last, group=self.group), self.last, kind)
            header = header.cpu()
            self._raise_for(header)
            if self.rank == self.last:
                data = tensor.detach().to(self.device).contiguous()
            else:
                data = torch.empty(_shape(header), dtype=_DTYPES[int(header[2])], device=self.device)
            self._collective(lambda: dist.broadcast(data, self.last, group=self.group), self.last, kind)
            return data
        if self.rank == self.last:
            if status[0] == OK:
                self._send_tensor(0, tensor.detach())
            else:
                self._send_header(0, *status)
            return tensor
        if self.rank == 0:
            header = self._recv_header(self.last)
            self._raise_for(header)
            return self._recv_tensor(header, self.last)
        return tensor

    # -- messages ----------------------------------------------------------------------------------

    def _raise_for(self, header: torch.Tensor) -> None:
        status = int(header[0])
        if status == RANK_FAILED:
            raise RankFailedError(_rank_of(header))
        if status != OK:
            raise Aborted("another rank failed during this pass")

    def _send_header(self, peer: int, status: int, failed: int | None) -> None:
        header = _header(status, failed, None).to(self.device)
        self.sent_bytes += header.nbytes
        self._collective(lambda: dist.send(header, peer, group=self.group), peer, "send")

    def _send_tensor(self, peer: int, tensor: torch.Tensor) -> None:
        tensor = tensor.to(self.device).contiguous()
        header = _header(OK, None, tensor).to(self.device)
        self.sent_bytes += header.nbytes + tensor.nbytes
        self._collective(lambda: dist.send(header, peer, group=self.group), peer, "send")
        self._collective(lambda: dist.send(tensor, peer, group=self.group), peer, "send")

    def _recv_header(self, peer: int) -> torch.Tensor:
        """The header from ``peer``, on the CPU (its numbers are read one by one)."""
        header = torch.zeros(_HEADER, dtype=torch.int64, device=self.device)
        self._collective(lambda: dist.recv(header, peer, group=self.group), peer)
        return header.cpu()

    def _recv_tensor(self, header: torch.Tensor, peer: int) -> torch.Tensor:
        tensor = torch.empty(_shape(header), dtype=_DTYPES[int(header[2])], device=self.device)
        self._collective(lambda: dist.recv(tensor, peer, group=self.group), peer)
        return tensor

    def _collective(self, run: Any, peer: int | None, kind: str = "receive") -> None:
        start = time.perf_counter()
        try:
            run()
        except RuntimeError as error:  # the peer closed the connection, or the group's timeout passed
            failure = RankFailedError(peer, _first_line(error))
            raise (self.liveness.declare(failure) if self.liveness is not None else failure) from error
        finally:
            self.seconds[kind] += time.perf_counter() - start


class Liveness:
    """Each rank stamps the time into the rendezvous store every second, so that a rank that stopped answering
    can be named (a timeout alone says only that some transfer did not finish), and the first rank to see a
    failure writes it there, so that every rank learns of it within a second, even one blocked in a transfer.
    """

    def __init__(self, rank: int, world: int, silent_after: float, interval: float = 1.0) -> None:
        self.rank, self.world, self.interval = rank, world, interval
        self.silent_after = silent_after
        # a launcher that restarts the ranks (torchrun --max-restarts) keeps its store: each start has its own keys
        self._prefix = f"neurotap/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        self._failed = self._prefix + "failed"
        try:
            self.store = dist.distributed_c10d._get_default_store()
        except (AttributeError, RuntimeError, ValueError):
            self.store = None  # naming a hung rank is then left to the transfer that timed out

    def start(self, on_failure: Callable[[RankFailedError | None], None]) -> None:
        """Beat from now on; once any rank declares a failure, ``on_failure(error)`` runs on the beating
        thread, and ``on_failure(None)`` if the store itself goes (with the launcher that started rank 0).
        A watchdog process beside this rank kills it once it stops beating (``watchdog.py``)."""
        if self.store is not None:
            watchdog = Watchdog(self.silent_after)
            threading.Thread(
                target=self._beat, args=(on_failure, watchdog), name="neurotap-liveness", daemon=True
            ).start()

    def _key(self, rank: int) -> str:
        return f"{self._prefix}alive/{rank}"

    def _beat(self, on_failure: Callable[[RankFailedError | None], None], watchdog: Watchdog) -> None:
        misses, started = 0, time.time()
        while True:
            watchdog.beat()
            try:
                self.store.set(self._key(self.rank), repr(time.time()))
                declared = self.declared()
                misses = 0
            except Exception:
                declared, misses = None, misses + 1
                if misses == 3:
                    on_failure(None)
                    return
            # a rank may compute for as long as a request lasts, but its heartbeat goes on: one that stops
            # beating is hung or stopped, and every rank learns so within a beat, in a pass or between them
            if declared is None and time.time() - started > self.silent_after:
                silent = self.silent(after=self.silent_after)
                if silent:
                    declared = self.declare(RankFailedError(silent[0], "it stopped answering"))
            if declared is not None:
                on_failure(declared)
                return
            time.sleep(self.interval)

    def silent(self, after: float = 3.0) -> list[int]:
        """The other ranks that have not stamped the store for ``after`` seconds."""
        if self.store is None:
            return []
        now, silent = time.time(), []
        for rank in range(self.world):
            if rank == self.rank:
                continue
            key = self._key(rank)
            try:
                if not self.store.check([key]) or float(self.store.get(key)) < now - after:
                    silent.append(rank)
            except Exception:
                return []
        return silent

    def declare(self, error: RankFailedError) -> RankFailedError:
        """Tell every rank that the server failed; the failure they all name (the first declared, and a rank
        that went silent rather than the one a transfer happened to time out on)."""
        silent = self.silent()
        if silent and error.rank not in silent:
            error = RankFailedError(silent[0], "it stopped answering")
        if self.store is None:
            return error
        mine = json.dumps({"rank": error.rank, "detail": error.detail})
        try:
            first = self.store.compare_set(self._failed, "", mine)
            return _failure_of(first)
        except Exception:
            return error

    def stop_pass(self, number: int, kind: str, message: str) -> None:
        """Rank 0's word that pass ``number`` stops on every rank (``kind``: "cancelled" or "timeout")."""
        if self.store is not None:
            try:
                self.store.set(self._prefix + "stop", json.dumps([number, kind, message]))
            except Exception:
                pass  # the beat finds a store that is gone; the pass then ends with the server

    def stopped_pass(self) -> tuple[int, str, str] | None:
        """The last pass rank 0 said stops: its number, kind and message."""
        try:
            if self.store is None or not self.store.check([self._prefix + "stop"]):
                return None
            number, kind, message = json.loads(self.store.get(self._prefix + "stop"))
        except Exception:
            return None
        return number, kind, message

    def declared(self) -> RankFailedError | None:
        """The failure a rank declared, if any."""
        if self.store is None or not self.store.check([self._failed]):
            return None
        return _failure_of(self.store.get(self._failed))


class Watchdog:
    """The process that kills this rank once ``silent_after`` seconds pass without a ``beat()``: a rank that
    hangs or is stopped ends so on every machine, whatever its launcher does (see ``watchdog.py``)."""

    def __init__(self, silent_after: float) -> None:
        beats, self._beats = os.pipe()
        os.set_blocking(self._beats, False)  # a watchdog that stopped reading must not stop the rank
        script = os.path.join(os.path.dirname(__file__), "watchdog.py")
        command = [sys.executable, "-I", "-S", script, str(os.getpid()), repr(silent_after)]
        self.process = subprocess.Popen(command, stdin=beats, stdout=subprocess.DEVNULL)
        os.close(beats)

    def beat(self) -> None:
        try:
            os.write(self._beats, b".")
        except (BlockingIOError, BrokenPipeError):
            pass  # its pipe is full of beats already, or it is gone: nothing to tell it


def _failure_of(declared: bytes) -> RankFailedError:
    facts = json.loads(declared)
    return RankFailedError(facts["rank"], facts["detail"])


def _header(status: int, failed: int | None, tensor: torch.Tensor | None) -> torch.Tensor:
    header = torch.zeros(_HEADER, dtype=torch.int64)
    header[0] = status
    header[1] = -1 if failed is None else failed
    if tensor is not None:
        if tensor.dim() > _HEADER - 4:
            raise NeurotapError(f"the pipeline carries tensors of up to {_HEADER - 4} dimensions")
        header[2] = _DTYPES.index(tensor.dtype)
        header[3] = tensor.dim()
        header[4 : 4 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
    return header


def _shape(header: torch.Tensor) -> list[int]:
    return [int(n) for n in header[4 : 4 + int(header[3])]]


def _rank_of(header: torch.Tensor) -> int | None:
    rank = int(header[1])
    return None if rank < 0 else rank


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    first = text[0] if text else type(error).__name__
    first = first.split("] ", 1)[-1]  # gloo puts its source file first
    return first.split(". This is typically", 1)[0][:300]
