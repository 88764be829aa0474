"""The web inspector: ``GET /`` serves a page that shows what happens inside the served model.

The page (``web/``: plain HTML, CSS and JavaScript, no network beyond this
server) is a client like ``nt.connect``: it opens a session, sends wire-format
requests to ``POST /v1/run`` with ``nt.Record(index=...)`` and ``nt.Norm`` probes
that reduce each value on the server, and reads ``GET /v1/recordings``. It holds
no model logic. Routes added here:

- ``GET /``, ``GET /static/{name}``: the page and its files, readable without a
  token (they hold no data); every data request the page makes needs one
- ``POST /v1/tokenize``: ``{"text": str}`` -> ``{"ids": [...], "tokens": [...],
  "pieces": [...]}`` (the model's tokenizer, as ``rm.encode`` uses it; ``pieces``
  are each id decoded alone, for display). Text is capped at
  :data:`MAX_TEXT_CHARACTERS`.
- ``POST /v1/logit_lens``: ``{"text": str, "top": k}`` (every position of the text) or
  ``{"ids": [token ids], "positions": p or [p, ...], "top": k, "token": id or null}``
  -> ``{"ids", "pieces", "positions", "token", "layers": [{"layer": i, "point":
  "blocks.i.resid_post", "ids": [[k ids] per position], "probs": [[k floats] ...],
  "pieces": ..., "token_rank": [...], "token_prob": [...]}]}`` (the last two with a
  ``token``): ``nt.Model.logit_lens`` on the served model, each layer's residual
  through the final norm and the unembedding, its top ``k`` (at most
  :data:`MAX_LENS_TOP`) tokens per position. ``RemoteModel.logit_lens`` sends the
  second form. Runs on the worker thread; at most :data:`MAX_LENS_POSITIONS` positions
  (a text at most that many tokens), a prompt of at most ``--max-request-tokens``,
  and only for a model served in one process.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import torch
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ..errors import NeurotapError
from .server import ApiError
from .wire import build_tokenizer

MAX_TEXT_CHARACTERS = 8000
MAX_LENS_POSITIONS = 64  # every layer's residual meets the whole vocabulary: layers x positions x vocab x hidden
MAX_LENS_TOP = 10
_MAX_JSON_BYTES = 64 << 10
_FILES = {"app.js": "text/javascript", "style.css": "text/css", "index.html": "text/html"}
# the page loads nothing from anywhere else and cannot be framed by another site
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def mount(app: Any, state: Any, executor: Any, settings: Any) -> None:
    """Add the inspector's routes to ``app`` (made by :func:`.server.create_app`)."""
    folder = Path(__file__).with_name("web")
    files = {name: (folder / name).read_bytes() for name in _FILES}
    tokenizers: list[Any] = []  # built once, on the worker thread

    def static(name: str) -> Response:
        return Response(files[name], media_type=_FILES[name], headers=_HEADERS)

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return static("index.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in files:
            raise ApiError(404, "NotFound", f"no file {name!r}; the page has {', '.join(sorted(files))}")
        return static(name)

    def tokenizer() -> Any:
        if not tokenizers:
            tokenizer = getattr(getattr(executor, "model", None), "tokenizer", None)
            if tokenizer is None:  # an executor without a model in this process still describes its tokenizer
                described = executor.tokenizer()
                tokenizer = build_tokenizer(described) if described is not None else None
            tokenizers.append(tokenizer)
        if tokenizers[0] is None:
            raise NeurotapError("the served model has no tokenizer, so the page cannot turn text into tokens")
        return tokenizers[0]

    def tokenize(text: str) -> dict[str, Any]:
        words = tokenizer()
        ids = [int(i) for i in words(text).input_ids]
        return {
            "ids": ids,
            "tokens": [str(t) for t in words.convert_ids_to_tokens(ids)],
            "pieces": [words.decode([i]) for i in ids],
        }

    def logit_lens(body: dict[str, Any]) -> dict[str, Any]:
        model = getattr(executor, "model", None)
        if model is None or not hasattr(model, "logit_lens"):
            raise ApiError(501, "NotAvailable", "the logit lens needs the whole model in the server's process")
        if "text" in body:
            described = tokenize(body["text"])
            ids, pieces, positions = described["ids"], described["pieces"], None
            if len(ids) > MAX_LENS_POSITIONS:
                raise ApiError(
                    413,
                    "RequestTooLarge",
                    f"the logit lens reads at most {MAX_LENS_POSITIONS} tokens; the text has more",
                )
        else:
            ids, positions = body["ids"], body.get("positions", -1)
            pieces = [tokenizer().decode([i]) for i in ids] if model.tokenizer is not None else [str(i) for i in ids]
        device = next(model.module.parameters()).device
        lens = model.logit_lens(
            torch.tensor([ids], device=device), positions, top=body.get("top", 1), token=body.get("token")
        )
        rows = []
        for i, point in enumerate(lens.points):
            row = {"layer": int(point.split(".")[1]), "point": point, "ids": lens.top_ids[i].tolist()}
            row.update(probs=lens.top_probs[i].tolist(), pieces=[list(cell) for cell in lens.top_tokens[i]])
            if lens.token is not None:
                row.update(token_rank=lens.token_rank[i].tolist(), token_prob=lens.token_prob[i].tolist())
            rows.append(row)
        return {"ids": ids, "pieces": pieces, "positions": list(lens.positions), "token": lens.token, "layers": rows}

    def lens_request(body: dict[str, Any]) -> dict[str, Any]:
        """The logit lens's own fields, checked so that a request's cost is bounded before it runs."""
        top = body.get("top", 1)
        if not _is_int(top) or not 1 <= top <= MAX_LENS_TOP:
            raise ApiError(400, "RequestError", f"top must be an integer from 1 to {MAX_LENS_TOP}")
        token = body.get("token")
        if token is not None and not _is_int(token):
            raise ApiError(400, "RequestError", "token must be a token id (an integer) or null")
        if "text" in body:
            return body
        ids, positions = body.get("ids"), body.get("positions", -1)
        if not isinstance(ids, list) or not ids or not all(_is_int(i) for i in ids):
            raise ApiError(400, "RequestError", 'the body must be JSON: {"text": "..."} or {"ids": [token ids]}')
        if len(ids) > settings.limits.max_request_tokens:
            raise ApiError(
                413,
                "RequestTooLarge",
                f"{len(ids)} tokens; this server reads at most "
                f"{settings.limits.max_request_tokens} in one request (--max-request-tokens)",
            )
        if not (_is_int(positions) or isinstance(positions, list) and all(_is_int(t) for t in positions)):
            raise ApiError(400, "RequestError", "positions must be a position or a list of positions")
        if isinstance(positions, list) and len(positions) > MAX_LENS_POSITIONS:
            raise ApiError(
                413, "RequestTooLarge", f"the logit lens reads at most {MAX_LENS_POSITIONS} positions at a time"
            )
        return body

    async def json_body(request: Request) -> dict[str, Any]:
        state.check(request)
        data = await _small_body(request, settings.body_timeout)
        try:
            body = json.loads(data)
        except (ValueError, RecursionError):  # deep nesting is malformed too
            body = None
        if not isinstance(body, dict):
            raise ApiError(400, "RequestError", 'the body must be a JSON object, such as {"text": "..."}')
        return body

    async def text_of(request: Request, body: dict[str, Any] | None = None) -> str:
        body = await json_body(request) if body is None else body
        text = body.get("text")
        if not isinstance(text, str):
            raise ApiError(400, "RequestError", 'the body must be JSON: {"text": "..."}')
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(
                400, "RequestError", "the text holds lone surrogates (\\ud800 ...): send UTF-8 text"
            ) from None
        if len(text) > MAX_TEXT_CHARACTERS:
            raise ApiError(
                413, "RequestTooLarge", f"the text has {len(text)} characters; at most {MAX_TEXT_CHARACTERS} are read"
            )
        return text

    @app.post("/v1/tokenize")
    async def tokenize_route(request: Request) -> JSONResponse:
        text = await text_of(request)
        return JSONResponse(await asyncio.wrap_future(state.worker.call(tokenize, text)))

    @app.post("/v1/logit_lens")
    async def logit_lens_route(request: Request) -> JSONResponse:
        body = await json_body(request)
        if "text" in body:
            await text_of(request, body)
        body = lens_request(body)
        return JSONResponse(await asyncio.wrap_future(state.worker.call(logit_lens, body)))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


async def _small_body(request: Request, timeout: float) -> bytes:
    """A JSON body of at most ``_MAX_JSON_BYTES``, arriving within ``timeout`` seconds."""
    too_large = ApiError(413, "RequestTooLarge", f"the body is over {_MAX_JSON_BYTES} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > _MAX_JSON_BYTES:
        raise too_large
    if request.headers.get("content-encoding", "identity").lower() != "identity":
        raise ApiError(415, "WireError", "send this JSON body without a Content-Encoding")
    chunks: list[bytes] = []

    async def read() -> None:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > _MAX_JSON_BYTES:
                raise too_large
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise ApiError(
            408, "RequestTimeoutError", f"the body did not arrive in {timeout:g} s (--body-timeout)"
        ) from None
    return b"".join(chunks)
