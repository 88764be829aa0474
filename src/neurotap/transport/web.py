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
- ``POST /v1/logit_lens``: ``{"text": str, "top": k}`` -> ``{"ids", "pieces", "layers":
  [{"layer": i, "ids": [[k ids] per position], "probs": [[k floats] ...], "pieces": ...}]}``:
  each layer's residual (the ``blocks.{i}.resid_post`` alias) through the model's
  final norm (``ln_final``) and output embeddings, softmaxed, its top ``k`` (at most
  :data:`MAX_LENS_TOP`) tokens per position. Built on the public model API (a
  forward with probes, then the model's own modules), on the worker thread; at most
  :data:`MAX_LENS_POSITIONS` positions, and only for a model served in one process.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import torch
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ..errors import NeurotapError
from ..probes import probe
from .server import ApiError
from .wire import build_tokenizer

MAX_TEXT_CHARACTERS = 8000
MAX_LENS_POSITIONS = 64  # every layer's residual meets the whole vocabulary: layers x positions x vocab x hidden
MAX_LENS_TOP = 5
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

    def logit_lens(text: str, top: int) -> dict[str, Any]:
        model = getattr(executor, "model", None)
        if model is None or not hasattr(model, "aliases"):
            raise ApiError(501, "NotAvailable", "the logit lens needs the whole model in the server's process")
        aliases = model.aliases()
        layers = sorted(int(m[1]) for m in (re.fullmatch(r"blocks\.(\d+)\.resid_post", k) for k in aliases) if m)
        unembed = model.module.get_output_embeddings()
        if not layers or "ln_final" not in aliases or unembed is None:
            raise ApiError(501, "NotAvailable", "the logit lens needs the aliases blocks.N.resid_post and ln_final")
        final_norm = model.module.get_submodule(aliases["ln_final"].removesuffix(".output"))
        described = tokenize(text)
        if len(described["ids"]) > MAX_LENS_POSITIONS:
            raise ApiError(
                413, "RequestTooLarge", f"the logit lens reads at most {MAX_LENS_POSITIONS} tokens; the text has more"
            )
        residuals: dict[int, torch.Tensor] = {}

        def keeper(layer: int) -> Any:
            def keep(_ctx: Any, value: Any) -> None:
                residuals[layer] = (value[0] if isinstance(value, tuple) else value).detach()[0]

            return keep

        device = next(model.module.parameters()).device
        with torch.no_grad():
            model.forward(
                torch.tensor([described["ids"]], device=device),
                probes=[probe(f"blocks.{i}.resid_post", keeper(i)) for i in layers],
            )
            rows = []
            for layer in layers:
                probs = torch.softmax(unembed(final_norm(residuals[layer])).float(), dim=-1)
                best, ids = probs.topk(top, dim=-1)
                rows.append({"layer": layer, "ids": ids.tolist(), "probs": best.tolist()})
        words = tokenizer()
        for row in rows:
            row["pieces"] = [[words.decode([i]) for i in position] for position in row["ids"]]
        return {"ids": described["ids"], "pieces": described["pieces"], "layers": rows}

    async def text_of(request: Request) -> tuple[str, dict[str, Any]]:
        state.check(request)
        data = await _small_body(request, settings.body_timeout)
        try:
            body = json.loads(data)
        except (ValueError, RecursionError):  # deep nesting is malformed too
            body = None
        text = body.get("text") if isinstance(body, dict) else None
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
        return text, body

    @app.post("/v1/tokenize")
    async def tokenize_route(request: Request) -> JSONResponse:
        text, _ = await text_of(request)
        return JSONResponse(await asyncio.wrap_future(state.worker.call(tokenize, text)))

    @app.post("/v1/logit_lens")
    async def logit_lens_route(request: Request) -> JSONResponse:
        text, body = await text_of(request)
        top = body.get("top", 1)
        if not isinstance(top, int) or isinstance(top, bool) or not 1 <= top <= MAX_LENS_TOP:
            raise ApiError(400, "RequestError", f"top must be an integer from 1 to {MAX_LENS_TOP}")
        return JSONResponse(await asyncio.wrap_future(state.worker.call(logit_lens, text, top)))


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
