"""The thread that owns the model: requests from any thread queue up and run in batches."""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from collections.abc import Callable
from typing import Any

from .executor import Executor
from .wire import RunRequest


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
