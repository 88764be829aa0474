"""The thread that owns the model: requests from any thread queue up and run in batches."""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import threading
import time
from collections.abc import Callable
from typing import Any

from .executor import Executor
from .wire import RunRequest, RunResult


class BatchWorker:
    """The one thread that runs an executor: runs arrive from any thread and are batched as they queue up.

    While it is busy, runs pile up and the next batch takes them all, up to
    ``max_batch``. When several sessions have been sending runs lately, a batch
    also waits up to ``window`` seconds for one run from each of them (they
    usually arrive within a millisecond of each other); a lone client never waits.

    Runs queue by owner (a token's label, ``RunRequest.owner``), and a batch takes
    them in turns, one of each owner at a time, the owner served longest ago
    first; each answer goes back as soon as its pass is over. When another owner's
    run (or a call) is waiting while a batch runs (another owner: one with no run
    in the batch that its client still awaits), the batch stops after the pass
    under way and the rest of it queues again in front of its owners' later runs:
    one owner's flood of long requests holds another's for one pass at most.
    Calls run one at a time, between batches.
    """

    def __init__(self, executor: Executor, *, max_batch: int = 32, window: float = 0.004) -> None:
        self.executor = executor
        self.max_batch = max_batch
        self.window = window
        self._runs: dict[str, collections.deque] = {}  # owner -> its (request, future) waiting, oldest first
        self._served: dict[str, int] = {}  # owner -> the batch that last took one of its runs
        self._batches = 0
        self._calls: collections.deque = collections.deque()
        self._call_next = False  # after a batch a waiting call goes first, after a call a batch
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
            self._runs.setdefault(request.owner, collections.deque()).append((request, future))
            self._recent[request.session] = time.monotonic()
            self._condition.notify_all()
        return future

    def call(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        """Run ``fn(*args)`` on the executor's thread, between batches."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._condition:
            self._calls.append((fn, args, future))
            self._condition.notify_all()
        return future

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued, then end the thread."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        self._thread.join(timeout)

    def _waiting(self) -> bool:
        return any(self._runs.values())

    def _take_runs(self, taken: list, sessions: set[str]) -> None:
        """Runs into ``taken``, in turns over their owners, the one served longest ago first."""
        owners = sorted((o for o, q in self._runs.items() if q), key=lambda o: self._served.get(o, -1))
        while owners and len(taken) < self.max_batch:
            for owner in list(owners):
                queue = self._runs[owner]
                while queue and queue[0][1].cancelled():  # its client went away before it ran
                    queue.popleft()
                if not queue:
                    owners.remove(owner)
                    continue
                request, future = queue.popleft()
                taken.append((request, future))
                sessions.add(request.session)
                self._served[owner] = self._batches
                if len(taken) >= self.max_batch:
                    break

    def _take(self) -> tuple | list | None:
        """The next call, or the next batch of runs; None once stopping with nothing left."""
        with self._condition:
            while not self._calls and not self._waiting():
                if self._stopping:
                    return None
                self._condition.wait()
            if self._calls and (self._call_next or not self._waiting()):
                self._call_next = False
                return self._calls.popleft()
            self._call_next = True
            self._batches += 1
            now = time.monotonic()
            self._recent = {s: t for s, t in self._recent.items() if now - t < 1.0}
            expected = min(len(self._recent), self.max_batch)
            taken: list = []
            sessions: set[str] = set()
            wait_until = now + self.window
            while True:
                self._take_runs(taken, sessions)
                full = len(taken) >= self.max_batch
                if self._waiting() or full or len(sessions) >= expected or self._stopping or self._calls:
                    break
                remaining = wait_until - time.monotonic()
                if remaining <= 0:
                    break
                self._condition.wait(remaining)
            return taken

    def _yielding(self, taken: list) -> bool:
        """Whether a call, or a run of an owner with none awaited in ``taken`` (the batch under way), is waiting."""
        # a run is awaited until it is answered or its client gives it up: either way its future is done
        awaited = {request.owner for request, future in taken if not future.done()}
        with self._condition:
            return bool(self._calls) or any(q and o not in awaited for o, q in self._runs.items())

    def _loop(self) -> None:
        while True:
            taken = self._take()
            if taken is None:
                return
            if isinstance(taken, tuple):
                fn, args, future = taken
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args))
                    except BaseException as error:
                        future.set_exception(error)
                continue
            if not taken:  # every run it found had been given up
                continue
            try:
                results = self.executor.execute(
                    [request for request, _ in taken],
                    functools.partial(_answer, taken),
                    functools.partial(self._yielding, taken),
                )
            except BaseException as error:
                for _, future in taken:
                    _settle(future, error=error)
                continue
            with self._condition:
                for (request, future), result in reversed(list(zip(taken, results))):
                    if result is None and not future.done():  # not run yet: first in its owner's queue again
                        self._runs.setdefault(request.owner, collections.deque()).appendleft((request, future))
            for (_, future), result in zip(taken, results):
                if result is not None:
                    _settle(future, result=result)


def _answer(taken: list, index: int, result: RunResult) -> None:
    _settle(taken[index][1], result=result)


def _settle(future: concurrent.futures.Future, *, result: Any = None, error: BaseException | None = None) -> None:
    """Give ``future`` its result, unless its client gave it up meanwhile."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass
