"""The HTTP server: FastAPI routes in front of an executor, and the uvicorn runner.

Routes (every one but ``/health`` needs the ``X-Neurotap-Protocol`` header and,
when the server has tokens, ``Authorization: Bearer <token>``):

- ``GET /health``: status and protocol; with a valid token (or on a server without
  tokens) also the model, whether code is allowed, and the pid
- ``GET /v1/info``: facts about the model and the server's limits
- ``GET /v1/points?prefix=``: the inventory, as JSON
- ``POST /v1/sessions`` / ``DELETE /v1/sessions/{id}``: a session owns save contexts
- ``POST /v1/run``: forward, generate or backward with probes (a wire message)
- ``GET /v1/recordings?point=``: the session's save contexts, streamed as frames
- ``DELETE /v1/recordings``: clear them
- ``GET /v1/parameters/{name}``: one parameter (a wire message)
- ``GET /v1/tokenizer``: the model's tokenizer as JSON (``{"tokenizer": null}`` without one)
- ``GET /docs``, ``GET /openapi.json``: only on a server without tokens

What a client cannot do, whatever it sends:

- reach the server under a host name it was not bound to (``Host`` is checked, so a
  web page cannot use DNS rebinding to reach a server on 127.0.0.1), or drive it
  from a web page of another origin (``Origin`` is checked);
- hold connections open: request headers must arrive within ``header_timeout``,
  a body within ``body_timeout``, an answer must be taken as fast, and connections
  beyond ``max_connections`` are answered 503 and closed;
- stall other clients: bodies are decoded off the event loop, and a pass stops at
  its deadline (:mod:`.executor` checks it at every layer);
- lock others out: the tokens' runs take turns, and a batch stops between passes
  for another token's waiting run (:mod:`.worker`); sessions are capped per token,
  idle ones expire after ``session_timeout``, and a token at its cap loses its
  least recently used one;
- exhaust memory: requests are bounded before they run (:mod:`.limits`), bodies
  being received by ``max_inflight_bytes``, recordings per session and across
  sessions, and what each token's requests hold besides (decoded requests waiting
  to run, answers not yet read: sent a chunk at a time, so a slow reader holds
  back only its own) by its share of ``max_total_bytes``.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import ipaddress
import json
import logging
import os
import secrets
import signal
import socket
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.middleware.gzip import GZipMiddleware

from ..errors import NeurotapError
from .executor import Executor, error_info, recorded_size
from .limits import MIN_TOKEN_LENGTH, ServerSettings
from .wire import (
    END_OF_STREAM,
    FRAMES_MEDIA_TYPE,
    MEDIA_TYPE,
    PROTOCOL,
    PROTOCOL_HEADER,
    SESSION_HEADER,
    RunRequest,
    RunResult,
    decode_request,
    encode,
    frame,
)
from .worker import BatchWorker

log = logging.getLogger("neurotap.server")

try:  # how much of a socket's send queue its peer has not acknowledged: Linux only
    import fcntl
    import termios

    _SEND_QUEUE: int | None = termios.TIOCOUTQ
except (ImportError, AttributeError):
    _SEND_QUEUE = None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_tokens(path: str) -> list[str]:
    """Tokens from a file, one a line; blank lines and ``#`` comments skipped."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read(1 << 20).splitlines()
    except UnicodeDecodeError:
        raise NeurotapError(f"the token file {path} is not UTF-8 text; write one token a line") from None
    except OSError as error:
        raise NeurotapError(f"cannot read the token file {path}: {error.strerror}") from None
    tokens = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not tokens:
        raise NeurotapError(f"the token file {path} holds no tokens (one a line)")
    for number, token in enumerate(tokens, 1):
        if len(token) < MIN_TOKEN_LENGTH or not token.isprintable() or " " in token:
            raise NeurotapError(
                f"token {number} of {path} is {'too short' if len(token) < MIN_TOKEN_LENGTH else 'not one word'}: "
                f"tokens are at least {MIN_TOKEN_LENGTH} printable characters without spaces, e.g. "
                "python -c 'import secrets; print(secrets.token_urlsafe(24))'"
            )
    return tokens


class ApiError(Exception):
    def __init__(self, status: int, kind: str, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message
        self.retry_after = retry_after  # seconds, for a refusal that waiting mends (429, 503)


@dataclass
class _Session:
    token: str | None
    last_used: float
    running: dict = field(default_factory=dict)  # its requests under way, by id: closing the session cancels them


def _reply(status: int, kind: str, message: str) -> tuple[dict, dict]:
    """The ASGI messages of a JSON error, for middleware that answers before the app."""
    body = json.dumps({"error": kind, "message": message, "traceback": None}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return {"type": "http.response.start", "status": status, "headers": headers}, {
        "type": "http.response.body",
        "body": body,
    }


class _OriginGuard:
    """Pure ASGI middleware: only the server's own host names, and no web page of another origin.

    A web page can make a browser send requests to 127.0.0.1, and with DNS
    rebinding read the answers, under its own host name; checking ``Host``
    refuses that, and checking ``Origin`` refuses cross-origin requests a page
    could send blind.
    """

    def __init__(self, app: Any, hosts: set[str], origins: set[str]) -> None:
        self.app = app
        self.hosts = hosts
        self.origins = origins

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1").lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        name = name.strip("[]")
        problem = None
        if name not in self.hosts:
            problem = (
                f"this server answers to the host names {', '.join(sorted(self.hosts))}, not {name!r}; "
                "connect by one of them, or start the server with --allow-host NAME"
            )
        origin = headers.get(b"origin")
        if problem is None and origin is not None:
            text = origin.decode("latin-1").lower().rstrip("/")
            own = text.split("://", 1)[-1]
            if own != host and text not in self.origins:
                problem = (
                    f"requests from web pages of {text} are refused; start the server with --allow-origin {text} "
                    "to let that page call it"
                )
        if problem is not None:
            start, body = _reply(403, "OriginError", problem)
            await send(start)
            await send(body)
            return
        await self.app(scope, receive, send)


class _RequestLog:
    """Pure ASGI middleware: one log line per request; tracks activity for the idle timeout."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [0]
        state = self.state
        state.in_flight += 1
        state.last_activity = time.monotonic()

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            state.in_flight -= 1
            state.last_activity = time.monotonic()
            client = scope.get("client") or ("-", 0)
            note = scope.get("neurotap_note", "")
            log.info(
                "%s %s %s %s %.1fms%s",
                client[0],
                scope["method"],
                scope["path"],
                status[0] or "---",
                (time.perf_counter() - started) * 1000,
                f" {note}" if note else "",
            )


class ServerState:
    def __init__(self, executor: Executor, settings: ServerSettings, worker: BatchWorker) -> None:
        self.executor = executor
        self.settings = settings
        self.worker = worker
        self.sessions: dict[str, _Session] = {}
        self.in_flight = 0
        self.last_activity = time.monotonic()
        self.on_idle: Any = None  # set by the runner: asks uvicorn to shut down

    def check(self, request: Any) -> str | None:
        """Protocol and token of a request; the token (None on an open server)."""
        version = request.headers.get(PROTOCOL_HEADER)
        if version != str(PROTOCOL):
            if version is None:
                raise ApiError(
                    400,
                    "ProtocolError",
                    f"missing the {PROTOCOL_HEADER} header: send '{PROTOCOL_HEADER}: {PROTOCOL}' with every request "
                    "(nt.connect(url) does)",
                )
            side = "client" if version.isdigit() and int(version) < PROTOCOL else "server"
            raise ApiError(
                400,
                "ProtocolError",
                f"this server speaks neurotap protocol {PROTOCOL}, the request protocol {version!r}; "
                f"upgrade neurotap on the {side} side so that both match",
            )
        if not self.settings.tokens:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() == "bearer" and given:
            for token in self.settings.tokens:
                if hmac.compare_digest(token.encode(), given.strip().encode()):
                    return token
        raise ApiError(
            401, "AuthError", "a valid token is needed: nt.connect(url, token=...) with a token the server holds"
        )

    def authenticated(self, request: Any) -> bool:
        try:
            self.check(request)
        except ApiError:
            return False
        return True

    def open_session(self, token: str | None) -> str:
        """A new session for ``token``; at its cap, the token's least recently used session makes way if it has
        been idle a while (a minute, or half the session timeout), else the token is told to close one."""
        mine = sorted((s.last_used, sid) for sid, s in self.sessions.items() if s.token == token)
        if len(mine) >= self.settings.max_sessions_per_token:
            last_used, oldest = mine[0]
            idle = time.monotonic() - last_used
            if idle < min(60.0, self.settings.session_timeout / 2) or self.sessions[oldest].running:
                raise ApiError(
                    429,
                    "TooManySessions",
                    f"this token holds {len(mine)} sessions in use (--max-sessions-per-token); close one "
                    "(rm.close()) or wait a minute for an idle one to make way",
                )
            log.info("session %s closed: its token opened more than %d", oldest[:6], len(mine))
            self.close_session(oldest)
        sid = secrets.token_urlsafe(18)
        self.sessions[sid] = _Session(token, time.monotonic())
        return sid

    def session(self, request: Any, token: str | None) -> str:
        sid = request.headers.get(SESSION_HEADER, "")
        session = self.sessions.get(sid)
        if session is None or session.token != token:
            raise ApiError(
                404, "SessionError", "no such session (it was closed or expired); connect again with nt.connect(url)"
            )
        session.last_used = time.monotonic()
        return sid

    def close_session(self, sid: str) -> None:
        session = self.sessions.pop(sid, None)
        if session is not None:
            for request in session.running.values():  # nothing of them may outlive the session
                request.cancelled = True
            self.worker.call(self.executor.close_session, sid)

    async def run(self, request: Any, run_request: RunRequest, running: dict[int, RunRequest]) -> RunResult | None:
        """``run_request`` through the worker, within the request timeout; None if the client went away.

        The timeout bounds the run; waiting behind other requests may take as long
        again. ``running`` holds the request while it runs, so that closing its
        session cancels it. A deadline set already (a caller's several runs
        sharing one) is kept.
        """
        run_request.timeout = self.settings.request_timeout
        if run_request.deadline is None:
            run_request.deadline = time.time() + 2 * self.settings.request_timeout
        future = self.worker.run(run_request)
        waiting = asyncio.ensure_future(asyncio.wrap_future(future))
        running[id(run_request)] = run_request
        try:
            while not waiting.done():
                await asyncio.wait([waiting], timeout=0.25)
                if not waiting.done() and await request.is_disconnected():
                    # nothing will read the answer: it stops where it is, keeps no recordings, frees the worker
                    run_request.cancelled = True
                    future.cancel()
                    request.scope["neurotap_note"] = request.scope.get("neurotap_note", "") + (
                        " cancelled: the client went away"
                    )
                    return None
                if time.time() > run_request.deadline + 10:
                    raise ApiError(504, "RequestTimeoutError", "the request did not finish within the request timeout")
            return waiting.result()
        finally:
            waiting.cancel()
            running.pop(id(run_request), None)

    def owner(self, token: str | None) -> str:
        """A name for the token's share of the server-wide recording limit (never the token itself)."""
        return "" if token is None else f"token-{self.settings.tokens.index(token)}"

    def expire_sessions(self) -> None:
        cutoff = time.monotonic() - self.settings.session_timeout
        for sid in [sid for sid, s in self.sessions.items() if s.last_used < cutoff]:
            self.close_session(sid)


def _json_error(status: int, kind: str, message: str, trace: str | None = None, retry_after: int | None = None) -> Any:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"error": kind, "message": message, "traceback": trace}, status_code=status, headers=headers)


_BODY_RATE = 1 << 20  # bytes a second that a body must keep up, past its first --body-timeout seconds


class _Budget:
    """Bytes of request bodies the server holds at once, across all connections."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, size: int) -> None:
        if self.held + size > self.limit:
            raise ApiError(
                503,
                "ServerBusy",
                f"the server is receiving {self.held} bytes of other requests, near its {self.limit} "
                "(--max-inflight-bytes); retry in a moment",
                retry_after=1,
            )
        self.held += size

    def give(self, size: int) -> None:
        self.held -= size


class _Held:
    """Bytes the server holds for each owner (a token's label) besides its recordings: its decoded requests
    until they are answered, and its answers (recordings streams included) until they are sent.

    An owner may hold its share of ``--max-total-bytes`` (``max_owner_bytes``),
    beyond which its next request or answer is refused until its clients read
    what they were sent; one at a time is always let through, however large, so
    that nothing is refused for its own size alone.
    """

    def __init__(self, share: int) -> None:
        self.share = share
        self.held: collections.Counter = collections.Counter()

    def _refusal(self, owner: str, size: int) -> ApiError:
        return ApiError(
            429,
            "TooMuchHeld",
            f"your token's requests waiting to run and answers not yet read by their clients hold "
            f"{self.held[owner]} bytes" + (f" and this needs {size} more" if size else "") + f", over your token's "
            f"share of {self.share} bytes (--max-total-bytes, shared equally among the tokens); read the answers "
            "under way (a client that stops reading holds its answer until --body-timeout, and a second per MiB of "
            "it, has passed), then retry",
            retry_after=1,
        )

    def check(self, owner: str) -> None:
        """Refuse a request before anything of it is read if its owner's share is full already."""
        if self.held[owner] >= self.share:
            raise self._refusal(owner, 0)

    def take(self, owner: str, size: int) -> Callable[[], None]:
        """Hold ``size`` bytes for ``owner``; the function that gives them back."""
        if self.held[owner] and self.held[owner] + size > self.share:
            raise self._refusal(owner, size)
        self.held[owner] += size

        def give() -> None:
            self.held[owner] -= size
            if not self.held[owner]:
                del self.held[owner]

        return give


_ANSWER_CHUNK = 1 << 20


class _Answer(Response):
    """A wire message sent a chunk at a time, each once the client has taken the one before: a client that reads
    slowly holds back its own answer, not more of the server's memory. ``sent`` runs once it is all written, or
    the client is gone."""

    media_type = MEDIA_TYPE

    def __init__(self, payload: bytes, sent: Callable[[], None]) -> None:
        super().__init__(payload)
        self._sent = sent

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            body = memoryview(self.body)
            for start in range(0, len(body), _ANSWER_CHUNK):
                chunk = bytes(body[start : start + _ANSWER_CHUNK])
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            self._sent()


class _Frames(StreamingResponse):
    """A stream of frames; ``sent`` runs once it is all written, or the client is gone."""

    media_type = FRAMES_MEDIA_TYPE

    def __init__(self, frames: Iterator[bytes], sent: Callable[[], None]) -> None:
        super().__init__(frames)
        self._sent = sent

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._sent()


async def _body(request: Any, limit: int, timeout: float, budget: _Budget) -> bytes:
    """The request's body, within ``limit`` bytes and ``timeout`` seconds; gzip is inflated off the event loop.

    What it returns is held against ``budget``: the caller gives it back once the request is answered.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(
            413, "RequestTooLarge", f"the body has {declared} bytes; this server takes {limit} (--max-request-bytes)"
        )
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding not in ("gzip", "identity"):
        raise ApiError(415, "WireError", f"unsupported Content-Encoding {encoding!r}; send gzip or identity")
    chunks, size, held = [], 0, 0
    started = time.monotonic()
    stream = request.stream().__aiter__()
    try:
        while True:
            # a body may take `timeout` seconds plus one second for each MiB that has arrived: large bodies on
            # slow links get through, a body trickling in a byte at a time does not
            remaining = started + timeout + size / _BODY_RATE - time.monotonic()
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), max(remaining, 0))
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise ApiError(
                    408,
                    "RequestTimeoutError",
                    f"the body did not arrive in time: {timeout:g} s (--body-timeout) and a second per MiB received",
                ) from None
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "RequestTooLarge", f"the body is over {limit} bytes (--max-request-bytes)")
            budget.take(len(chunk))
            held += len(chunk)
            chunks.append(chunk)
        data = b"".join(chunks)
        if encoding == "gzip":
            inflated = await asyncio.to_thread(_inflate, data, limit)
            budget.take(len(inflated))
            held += len(inflated)
            budget.give(len(data))
            held -= len(data)
            data = inflated
        return data
    except BaseException:
        budget.give(held)
        raise


def _inflate(data: bytes, limit: int) -> bytes:
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        data = inflater.decompress(data, limit + 1)
    except zlib.error as error:
        raise ApiError(400, "WireError", f"the gzip body is corrupt: {error}") from None
    if len(data) > limit or inflater.unconsumed_tail:
        raise ApiError(413, "RequestTooLarge", f"the body inflates to over {limit} bytes (--max-request-bytes)")
    return data


def create_app(executor: Executor, settings: ServerSettings, *, dataset: Any = None) -> Any:
    """The ASGI app serving ``executor``; the executor's thread starts and stops with the app.

    ``dataset``, an ``nt.ActivationDataset`` the caller opened, gives the inspector's top-activating examples.
    """
    worker = BatchWorker(executor, max_batch=settings.max_batch)
    state = ServerState(executor, settings, worker)

    async def watch() -> None:
        while True:
            await asyncio.sleep(0.5)
            state.expire_sessions()
            idle = time.monotonic() - state.last_activity
            if settings.idle_timeout and state.in_flight == 0 and idle > settings.idle_timeout:
                log.info("idle for %.0f s (--idle-timeout): shutting down", idle)
                if state.on_idle is not None:
                    state.on_idle()
                return

    @asynccontextmanager
    async def lifespan(_app: Any) -> Any:
        watcher = asyncio.create_task(watch())
        try:
            yield
        finally:
            watcher.cancel()
            await asyncio.to_thread(worker.stop)

    # the generated API pages tell whoever can reach them what the server offers: only where anyone may use it
    docs = {} if not settings.tokens else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="neurotap", version=str(PROTOCOL), lifespan=lifespan, **docs)
    app.state.neurotap = state

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, error: ApiError) -> JSONResponse:
        return _json_error(error.status, error.kind, error.message, retry_after=error.retry_after)

    @app.exception_handler(NeurotapError)
    async def neurotap_error(_request: Request, error: NeurotapError) -> JSONResponse:
        info = error_info(error)
        return _json_error(info.status, info.type, info.message, info.traceback)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
        return _json_error(422, "RequestError", str(error.errors()))

    async def on_worker(fn: Any, *args: Any) -> Any:
        return await asyncio.wrap_future(worker.call(fn, *args))

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        facts: dict[str, Any] = {"status": "ok", "protocol": PROTOCOL, "auth": bool(settings.tokens)}
        if not settings.tokens or state.authenticated(request):
            facts.update(model=settings.name, allow_code=settings.allow_code, pid=os.getpid())
        return facts

    @app.get("/v1/info")
    async def info(request: Request) -> dict[str, Any]:
        state.check(request)
        return {
            "model": settings.name,
            **(await on_worker(executor.describe)),
            "allow_code": settings.allow_code,
            "request_timeout": settings.request_timeout,
            "max_request_bytes": settings.max_request_bytes,
            "max_session_bytes": settings.max_session_bytes,
            "max_total_bytes": settings.max_total_bytes,
            "session_timeout": settings.session_timeout,
        }

    @app.get("/v1/points")
    async def points(request: Request, prefix: str | None = None) -> list[dict[str, Any]]:
        state.check(request)
        return await on_worker(executor.points, prefix)

    @app.get("/v1/aliases")
    async def aliases(request: Request) -> dict[str, str]:
        state.check(request)
        return await on_worker(executor.aliases)

    tokenizer_json: list[str] = []  # described once: a large tokenizer takes a while to serialise

    @app.get("/v1/tokenizer")
    async def tokenizer(request: Request) -> Response:
        state.check(request)
        if not tokenizer_json:
            described = await on_worker(executor.tokenizer)
            tokenizer_json.append(await asyncio.to_thread(json.dumps, {"tokenizer": described}))
        return Response(tokenizer_json[0], media_type="application/json")

    @app.post("/v1/sessions", status_code=201)
    async def open_session(request: Request) -> dict[str, str]:
        return {"session": state.open_session(state.check(request))}

    @app.delete("/v1/sessions/{sid}")
    async def close_session(request: Request, sid: str) -> dict[str, bool]:
        token = state.check(request)
        session = state.sessions.get(sid)
        if session is None or session.token != token:
            raise ApiError(404, "SessionError", "no such session")
        state.close_session(sid)
        return {"closed": True}

    bodies = _Budget(settings.max_inflight_bytes)
    held = _Held(settings.max_owner_bytes)

    async def answered(owner: str, answer: Any) -> Response:
        """``answer`` encoded and sent, held against ``owner``'s share until the client has read it."""
        sent = held.take(owner, recorded_size(answer))
        try:
            payload = await asyncio.to_thread(encode, answer, lenient=True)
        except BaseException:
            sent()
            raise
        return _Answer(payload, sent)

    @app.post("/v1/run")
    async def run(request: Request) -> Response:
        token = state.check(request)
        state.session(request, token)
        owner = state.owner(token)
        held.check(owner)
        data = await _body(request, settings.max_request_bytes, settings.body_timeout, bodies)
        try:
            run_request = await asyncio.to_thread(decode_request, data, allow_code=settings.allow_code)
            answered_request = held.take(owner, len(data))  # the decoded request holds about as much until answered
        finally:
            bodies.give(len(data))
            del data
        try:
            sid = state.session(request, token)  # again: the session may have closed while the body arrived
            run_request.session = sid
            run_request.owner = owner
            request.scope["neurotap_note"] = f"session={sid[:6]} op={run_request.op} probes={len(run_request.probes)}"
            result = await state.run(request, run_request, state.sessions[sid].running)
            del run_request
        finally:
            answered_request()
        if result is None:
            return Response(status_code=499)
        if result.error is not None:
            error = result.error
            return _json_error(error.status, error.type, error.message, error.traceback)
        answer = {"output": result.output, "loss": result.loss}
        if result.trace is not None:
            answer["trace"] = result.trace
        del result
        return await answered(owner, answer)

    @app.get("/v1/recordings")
    async def recordings(request: Request) -> Response:
        token = state.check(request)
        sid = state.session(request, token)
        owner = state.owner(token)
        held.check(owner)
        wanted = set(request.query_params.getlist("point"))
        snapshot = await on_worker(executor.recordings, sid)
        items = [(name, data) for name, data in snapshot.items() if not wanted or name in wanted]
        # the snapshot keeps what it holds alive until it is sent, even once the session is cleared
        sent = held.take(owner, recorded_size(dict(items)))

        def frames() -> Iterator[bytes]:
            for name, data in items:
                yield frame({"point": name, "data": data})
            yield END_OF_STREAM

        return _Frames(frames(), sent)

    @app.delete("/v1/recordings")
    async def clear_recordings(request: Request) -> dict[str, bool]:
        token = state.check(request)
        sid = state.session(request, token)
        await on_worker(executor.clear_recordings, sid)
        return {"cleared": True}

    @app.get("/v1/parameters/{name:path}")
    async def parameter(request: Request, name: str) -> Response:
        owner = state.owner(state.check(request))
        held.check(owner)
        tensor = await on_worker(executor.get_parameter, name)
        return await answered(owner, {"parameter": tensor})

    from .web import mount  # the inspector page (GET /) and the endpoints it needs; imported here: it imports us

    mount(app, state, executor, settings, dataset)
    # level 1: compressing hundreds of MiB of tensors at the default level 9 would hold a core for a minute
    app.add_middleware(GZipMiddleware, minimum_size=4096, compresslevel=1)
    app.add_middleware(_RequestLog, state=state)
    hosts = {"127.0.0.1", "localhost", "::1", *settings.allowed_hosts}
    app.add_middleware(_OriginGuard, hosts={h.lower() for h in hosts}, origins=set(settings.allowed_origins))
    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening socket; port 0 picks a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # naming the protocol matters: asyncio turns on TCP_NODELAY only for sockets that say they are TCP,
    # and without it every response waits ~40 ms for a delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise NeurotapError(f"cannot listen on {host}:{port}: {error.strerror}; pick another --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _unsent(transport: asyncio.Transport) -> int:
    """Bytes written to ``transport`` that its client has not taken yet: those asyncio holds and, on Linux, those
    in the socket's send queue (which can hold megabytes a connection, and outlive a plain close)."""
    pending = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is not None and _SEND_QUEUE is not None:
        try:
            queued = fcntl.ioctl(sock.fileno(), _SEND_QUEUE, b"\0\0\0\0")
            pending += struct.unpack("i", queued)[0]
        except OSError:
            pass
    return pending


def _drop(transport: asyncio.Transport) -> None:
    """End the connection at once; one that still holds bytes its client has not taken is reset, so that they
    are discarded by the kernel too (a plain close would leave it offering them for minutes to a client that
    does not read)."""
    sock = transport.get_extra_info("socket")
    if sock is not None and _unsent(transport):
        with suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _guarded_protocol(settings: ServerSettings) -> type:
    """uvicorn's HTTP/1.1 protocol with deadlines for a request's headers and for taking an answer, and a cap
    on connections.

    uvicorn times out idle keep-alive connections but not a client that sends its
    headers a byte at a time, nor one that reads its answer slowly or never (which
    would hold that answer, in the server or in the kernel's send queue, for as long
    as it likes), and accepts any number of connections. An answer must be taken
    within ``body_timeout`` plus a second per MiB of it, as a body must arrive, and
    its client may not stop taking it for ``body_timeout``, or the connection is
    reset. At the cap, a new connection takes the place of the oldest one that has
    no request under way (an idle or half-sent one); only when every connection is
    busy is it refused.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    refusal = json.dumps(
        {
            "error": "TooManyConnections",
            "message": f"the server holds {settings.max_connections} connections (--max-connections); retry later",
            "traceback": None,
        }
    ).encode()
    busy = (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
        + f"content-length: {len(refusal)}\r\n\r\n".encode()
        + refusal
    )

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _answer_timer: asyncio.TimerHandle | None = None
        _stall_timer: asyncio.TimerHandle | None = None
        _opened = 0.0
        _answering: Any = None  # the request cycle whose answer was written last
        _answer_due = 0.0  # when the client must have taken all it was sent
        _answer_bytes = 0  # written since the client last had taken everything

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._opened = time.monotonic()
            if len(self.connections) > settings.max_connections:
                idle = [c for c in self.connections if c is not self and c._idle()]
                if not idle:
                    transport.write(busy)
                    transport.close()
                    return
                _drop(min(idle, key=lambda c: c._opened).transport)
            write = transport.write

            def timed_write(data: Any) -> None:
                if self.cycle is not self._answering:  # a new answer: its time counts from now
                    self._answering = self.cycle
                    self._answer_due = max(self._answer_due, time.monotonic() + settings.body_timeout)
                self._answer_due += len(data) / _BODY_RATE
                self._answer_bytes += len(data)
                if self._answer_timer is None:
                    self._answer_timer = self.loop.call_later(settings.body_timeout, self._check_answer)
                write(data)

            transport.write = timed_write  # type: ignore[method-assign]
            self._arm()

        def _idle(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def pause_writing(self) -> None:  # the client stopped taking its answer: it has --body-timeout to go on
            super().pause_writing()
            if self._stall_timer is None:
                self._stall_timer = self.loop.call_later(settings.body_timeout, _drop, self.transport)

        def resume_writing(self) -> None:
            super().resume_writing()
            if self._stall_timer is not None:
                self._stall_timer.cancel()
                self._stall_timer = None

        def _check_answer(self) -> None:
            """Reset the connection if its client has not taken its answers in time."""
            self._answer_timer = None
            if self.transport.is_closing():
                return
            unsent = _unsent(self.transport)
            if not unsent:
                self._answer_bytes = 0
                return
            now = time.monotonic()
            if now > self._answer_due:
                log.info(
                    "connection reset: its client left %d of the %d bytes of its answers untaken past their time "
                    "(--body-timeout, and a second per MiB)",
                    unsent,
                    self._answer_bytes,
                )
                _drop(self.transport)
                return
            self._answer_timer = self.loop.call_later(min(1.0, self._answer_due - now + 0.01), self._check_answer)

        def data_received(self, data: bytes) -> None:
            cycle = self.cycle
            super().data_received(data)
            if self.cycle is not cycle:  # a request's headers arrived in full
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request on this connection gets its own deadline

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            for timer in (self._answer_timer, self._stall_timer):
                if timer is not None:
                    timer.cancel()
            self._answer_timer = self._stall_timer = None
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(settings.header_timeout, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.cycle is None or self.cycle.response_complete:
                if _unsent(self.transport):
                    self._arm()  # its client is still taking its answer, within that answer's own deadline
                else:
                    self.transport.close()

    return GuardedH11Protocol


def _raise_file_limit() -> None:
    """Let the process hold as many sockets as the system allows it, not the shell's default 1024."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = hard if hard != resource.RLIM_INFINITY else 1 << 16
        if soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ImportError, ValueError, OSError):
        pass


def serve(
    executor: Executor, settings: ServerSettings, *, host: str = "127.0.0.1", port: int = 8000, dataset: Any = None
) -> None:
    """Serve until interrupted (Ctrl-C, SIGTERM) or idle; running requests finish first."""
    import uvicorn

    settings.check()
    if not is_loopback(host) and not settings.tokens:
        raise NeurotapError(
            f"refusing to listen on {host} without tokens: anyone who can reach it could use the model"
            + (" and run code" if settings.allow_code else "")
            + "; pass --token-file FILE (one token a line), or bind 127.0.0.1"
        )
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    sock = bind(host, port)
    actual_port = sock.getsockname()[1]
    executor.points(None)  # the inventory's dry run happens now, not in the first client's request
    bound = [host.strip("[]")]
    if host in ("0.0.0.0", "::"):
        bound.append(socket.gethostname())  # other names and addresses: --allow-host
    settings.allowed_hosts = [*settings.allowed_hosts, *bound]
    _raise_file_limit()
    app = create_app(executor, settings, dataset=dataset)
    config = uvicorn.Config(
        app,
        http=_guarded_protocol(settings),
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=60,
        timeout_keep_alive=5,
        h11_max_incomplete_event_size=64 << 10,  # the request line and headers
        lifespan="on",
    )
    server = uvicorn.Server(config)
    app.state.neurotap.on_idle = lambda: setattr(server, "should_exit", True)
    shown = f"[{host}]" if ":" in host else host
    print(
        f"neurotap: serving {settings.name} on http://{shown}:{actual_port}"
        + (" (code allowed)" if settings.allow_code else "")
        + (f" ({len(settings.tokens)} tokens)" if settings.tokens else ""),
        flush=True,
    )
    try:
        with _signals_end_serving():
            server.run(sockets=[sock])
    finally:
        sock.close()
    print("neurotap: stopped", flush=True)


@contextmanager
def _signals_end_serving() -> Iterator[None]:
    """SIGTERM and Ctrl-C end ``serve`` by returning, once uvicorn has shut down gracefully.

    uvicorn raises the signal again after its shutdown; under the default handlers
    that would kill the process before the code after ``serve`` runs (on a sharded
    server's rank 0, the message that tells the other ranks to stop).
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # uvicorn handles no signals outside the main thread either
        return
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
