"""The HTTP server: FastAPI routes in front of an executor, and the uvicorn runner.

Routes (every one but ``/health`` needs the ``X-Neurotap-Protocol`` header and,
when the server has tokens, ``Authorization: Bearer <token>``):

- ``GET /health``: status, protocol, model name, whether code is allowed
- ``GET /v1/info``: facts about the model and the server's limits
- ``GET /v1/points?prefix=``: the inventory, as JSON
- ``POST /v1/sessions`` / ``DELETE /v1/sessions/{id}``: a session owns save contexts
- ``POST /v1/run``: forward, generate or backward with probes (a wire message)
- ``GET /v1/recordings?point=``: the session's save contexts, streamed as frames
- ``DELETE /v1/recordings``: clear them
- ``GET /v1/parameters/{name}``: one parameter (a wire message)
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
import secrets
import socket
import sys
import time
import zlib
from collections.abc import Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.middleware.gzip import GZipMiddleware

from ..errors import NeurotapError
from .executor import Executor, error_info
from .wire import (
    END_OF_STREAM,
    FRAMES_MEDIA_TYPE,
    MEDIA_TYPE,
    PROTOCOL,
    PROTOCOL_HEADER,
    SESSION_HEADER,
    decode_request,
    encode,
    frame,
)
from .worker import BatchWorker

log = logging.getLogger("neurotap.server")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_tokens(path: str) -> list[str]:
    """Tokens from a file, one a line; blank lines and ``#`` comments skipped."""
    with open(path, encoding="utf-8") as handle:
        tokens = [line.strip() for line in handle if line.strip() and not line.lstrip().startswith("#")]
    if not tokens:
        raise NeurotapError(f"the token file {path} holds no tokens (one a line)")
    return tokens


@dataclass
class ServerSettings:
    name: str = "model"
    tokens: list[str] = field(default_factory=list)
    allow_code: bool = False
    request_timeout: float = 120.0
    idle_timeout: float | None = None
    max_request_bytes: int = 256 << 20
    max_session_bytes: int = 1 << 30
    max_sessions: int = 1024
    max_batch: int = 32
    session_timeout: float = 24 * 3600.0


class ApiError(Exception):
    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


@dataclass
class _Session:
    token: str | None
    last_used: float


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
                raise ApiError(400, "ProtocolError", f"missing the {PROTOCOL_HEADER} header; use nt.connect(url)")
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
        if self.sessions.pop(sid, None) is not None:
            self.worker.call(self.executor.close_session, sid)

    def expire_sessions(self) -> None:
        cutoff = time.monotonic() - self.settings.session_timeout
        for sid in [sid for sid, s in self.sessions.items() if s.last_used < cutoff]:
            self.close_session(sid)


def _json_error(status: int, kind: str, message: str, trace: str | None = None) -> Any:
    return JSONResponse({"error": kind, "message": message, "traceback": trace}, status_code=status)


async def _body(request: Any, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(
            413, "RequestTooLarge", f"the body has {declared} bytes; this server takes {limit} (--max-request-bytes)"
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "RequestTooLarge", f"the body is over {limit} bytes (--max-request-bytes)")
        chunks.append(chunk)
    data = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding == "gzip":
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            data = inflater.decompress(data, limit + 1)
        except zlib.error as error:
            raise ApiError(400, "WireError", f"the gzip body is corrupt: {error}") from None
        if len(data) > limit or inflater.unconsumed_tail:
            raise ApiError(413, "RequestTooLarge", f"the body inflates to over {limit} bytes (--max-request-bytes)")
    elif encoding != "identity":
        raise ApiError(415, "WireError", f"unsupported Content-Encoding {encoding!r}; send gzip or identity")
    return data


def create_app(executor: Executor, settings: ServerSettings) -> Any:
    """The ASGI app serving ``executor``; the executor's thread starts and stops with the app."""
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

    app = FastAPI(title="neurotap", version=str(PROTOCOL), lifespan=lifespan)
    app.state.neurotap = state

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, error: ApiError) -> JSONResponse:
        return _json_error(error.status, error.kind, error.message)

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
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "protocol": PROTOCOL,
            "model": settings.name,
            "allow_code": settings.allow_code,
            "auth": bool(settings.tokens),
            "pid": os.getpid(),
        }

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
        }

    @app.get("/v1/points")
    async def points(request: Request, prefix: str | None = None) -> list[dict[str, Any]]:
        state.check(request)
        return await on_worker(executor.points, prefix)

    @app.get("/v1/aliases")
    async def aliases(request: Request) -> dict[str, str]:
        state.check(request)
        return await on_worker(executor.aliases)

    @app.post("/v1/sessions", status_code=201)
    async def open_session(request: Request) -> dict[str, str]:
        token = state.check(request)
        if len(state.sessions) >= settings.max_sessions:
            raise ApiError(429, "TooManySessions", f"the server holds {settings.max_sessions} sessions; close some")
        sid = secrets.token_urlsafe(18)
        state.sessions[sid] = _Session(token, time.monotonic())
        return {"session": sid}

    @app.delete("/v1/sessions/{sid}")
    async def close_session(request: Request, sid: str) -> dict[str, bool]:
        token = state.check(request)
        session = state.sessions.get(sid)
        if session is None or session.token != token:
            raise ApiError(404, "SessionError", "no such session")
        state.close_session(sid)
        return {"closed": True}

    @app.post("/v1/run")
    async def run(request: Request) -> Response:
        token = state.check(request)
        sid = state.session(request, token)
        data = await _body(request, settings.max_request_bytes)
        run_request = decode_request(data, allow_code=settings.allow_code)
        run_request.session = sid
        run_request.deadline = time.time() + settings.request_timeout
        request.scope["neurotap_note"] = f"session={sid[:6]} op={run_request.op} probes={len(run_request.probes)}"
        future = worker.run(run_request)
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(future), settings.request_timeout + 10)
        except asyncio.TimeoutError:
            raise ApiError(
                504, "RequestTimeoutError", "the request did not finish within the request timeout"
            ) from None
        if result.error is not None:
            error = result.error
            return _json_error(error.status, error.type, error.message, error.traceback)
        payload = await asyncio.to_thread(encode, {"output": result.output, "loss": result.loss})
        return Response(payload, media_type=MEDIA_TYPE)

    @app.get("/v1/recordings")
    async def recordings(request: Request) -> StreamingResponse:
        token = state.check(request)
        sid = state.session(request, token)
        wanted = set(request.query_params.getlist("point"))
        snapshot = await on_worker(executor.recordings, sid)

        def frames(items: Iterable[tuple[str, dict[str, Any]]]) -> Iterator[bytes]:
            for name, data in items:
                if not wanted or name in wanted:
                    yield frame({"point": name, "data": data})
            yield END_OF_STREAM

        return StreamingResponse(frames(list(snapshot.items())), media_type=FRAMES_MEDIA_TYPE)

    @app.delete("/v1/recordings")
    async def clear_recordings(request: Request) -> dict[str, bool]:
        token = state.check(request)
        sid = state.session(request, token)
        await on_worker(executor.clear_recordings, sid)
        return {"cleared": True}

    @app.get("/v1/parameters/{name:path}")
    async def parameter(request: Request, name: str) -> Response:
        state.check(request)
        tensor = await on_worker(executor.get_parameter, name)
        return Response(await asyncio.to_thread(encode, {"parameter": tensor}), media_type=MEDIA_TYPE)

    app.add_middleware(GZipMiddleware, minimum_size=4096)
    app.add_middleware(_RequestLog, state=state)
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


def serve(executor: Executor, settings: ServerSettings, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted (Ctrl-C, SIGTERM) or idle; running requests finish first."""
    import uvicorn

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
    app = create_app(executor, settings)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=60, lifespan="on")
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
        server.run(sockets=[sock])
    finally:
        sock.close()
    print("neurotap: stopped", flush=True)
