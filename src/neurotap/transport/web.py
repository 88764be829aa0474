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
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ..errors import NeurotapError
from .server import ApiError, _body
from .wire import build_tokenizer

MAX_TEXT_CHARACTERS = 8000
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

    def tokenize(text: str) -> dict[str, Any]:
        if not tokenizers:
            tokenizer = getattr(getattr(executor, "model", None), "tokenizer", None)
            if tokenizer is None:  # an executor without a model in this process still describes its tokenizer
                described = executor.tokenizer()
                tokenizer = build_tokenizer(described) if described is not None else None
            tokenizers.append(tokenizer)
        tokenizer = tokenizers[0]
        if tokenizer is None:
            raise NeurotapError("the served model has no tokenizer, so the page cannot turn text into tokens")
        ids = [int(i) for i in tokenizer(text).input_ids]
        return {
            "ids": ids,
            "tokens": [str(t) for t in tokenizer.convert_ids_to_tokens(ids)],
            "pieces": [tokenizer.decode([i]) for i in ids],
        }

    @app.post("/v1/tokenize")
    async def tokenize_route(request: Request) -> JSONResponse:
        state.check(request)
        data = await _body(request, _MAX_JSON_BYTES, settings.body_timeout)
        try:
            body = json.loads(data)
        except ValueError:
            raise ApiError(400, "RequestError", 'the body must be JSON: {"text": "..."}') from None
        text = body.get("text") if isinstance(body, dict) else None
        if not isinstance(text, str):
            raise ApiError(400, "RequestError", 'the body must be JSON: {"text": "..."}')
        if len(text) > MAX_TEXT_CHARACTERS:
            raise ApiError(
                413, "RequestTooLarge", f"the text has {len(text)} characters; at most {MAX_TEXT_CHARACTERS} are read"
            )
        result = await asyncio.wrap_future(state.worker.call(tokenize, text))
        return JSONResponse(result)
