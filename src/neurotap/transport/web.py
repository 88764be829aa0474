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
  (``positions`` defaults to the last) -> ``{"ids", "pieces", "positions", "token",
  "layers": [{"layer": i, "point": "blocks.i.resid_post", "ids": [[k ids] per
  position], "probs": [[k floats] ...], "pieces": ..., "token_rank": [...],
  "token_prob": [...]}]}`` (the last two with a ``token``; rank 0 is the likeliest):
  each layer's residual through the model's final norm (``ln_final``) and output
  embeddings, softmaxed, its top ``k`` (at most :data:`MAX_LENS_TOP`) tokens at
  each position, at most :data:`MAX_LENS_POSITIONS` positions. It is made of
  ordinary runs through the executor (so bounded like any request, and served by a
  sharded server too): a forward recording the residuals, then forwards that put
  them in at the final norm's input with the decoder layers skipped (``nt.Skip``),
  and the softmax of the logits those give.
- ``POST /v1/patching``: ``{"clean": str, "corrupt": str, "target": text or token id}``
  -> ``nt.experiments.activation_patching`` of every ``blocks.N.resid_post`` at every
  position, the metric being the target's probability at the last position (an
  ``nt.PatchingResult`` as ``to_dict()``, plus ``target`` and ``target_piece``). The
  experiment's forwards are runs through the executor, each bounded like any
  request, all of them within twice the request timeout; prompts of the same
  length, at most :data:`MAX_LENS_POSITIONS` tokens. Experiments run on
  :data:`MAX_EXPERIMENT_THREADS` threads of their own; more wait their turn, and
  the experiment's time counts from its first run, not from its arrival.
- ``GET /v1/dataset``: ``{"points", "shapes", "rows"}`` of the server's ``--dataset`` (404 without one)
- ``POST /v1/top_examples``: ``{"point": str, "unit": int or [ints], "k": n, "before": n,
  "after": n}`` -> ``{"point", "unit", "examples": [{"value", "row", "sequence",
  "position", "document", "at", "pieces": [text of each token], "values": [the unit at
  each token]}]}``: ``ActivationDataset.top_examples`` with each example's context
  token by token (``at`` is the example's own token among them). The client names a
  point of the dataset and a unit, never a file; ``k`` is at most
  :data:`MAX_EXAMPLES`, the context :data:`MAX_CONTEXT` tokens a side, and scans run
  one at a time on a thread of their own.

A token may have ``--max-experiments-per-token`` of these three (patching, the
logit lens, top examples) under way or waiting at once; one more is refused at
once with a 429 and ``Retry-After``, so that another token's experiment waits
behind a few of each other token's at most, never behind a flood.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import json
import re
import secrets
import time
from pathlib import Path
from typing import Any

import torch
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ..errors import NeurotapError
from ..experiments import activation_patching
from ..points import split_narrowing
from ..probes import Record, Replace, Skip
from .server import ApiError
from .wire import ProbeSpec, RunRequest, build_tokenizer, trace_of, traced_probes

MAX_TEXT_CHARACTERS = 8000
MAX_LENS_POSITIONS = 64  # every layer's residual meets the whole vocabulary: layers x positions x vocab x hidden
MAX_LENS_TOP = 10
MAX_EXAMPLES = 50
MAX_CONTEXT = 64  # tokens of context on each side of an example
MAX_EXPERIMENT_THREADS = 2
_LENS_PASS_BYTES = 64 << 20  # the logits of one of the lens's passes: it puts in as many layers as fit
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


def mount(app: Any, state: Any, executor: Any, settings: Any, dataset: Any = None) -> None:
    """Add the inspector's routes to ``app`` (made by :func:`.server.create_app`).

    ``dataset`` is the server's own ``nt.ActivationDataset`` (``--dataset``), opened
    by the caller: this layer reads it through its methods and never opens a path.
    """
    folder = Path(__file__).with_name("web")
    files = {name: (folder / name).read_bytes() for name in _FILES}
    tokenizers: list[Any] = []  # built once, on the worker thread
    # an experiment's thread mostly waits for the worker; on threads of their own, however many experiments
    # clients start, they never hold the threads that decode and encode every other client's requests
    experiments = concurrent.futures.ThreadPoolExecutor(MAX_EXPERIMENT_THREADS, "neurotap-experiment")
    under_way: collections.Counter = collections.Counter()  # experiments of each token, running or waiting

    @contextlib.contextmanager
    def experiment_of(token: str | None) -> Any:
        owner = state.owner(token)
        if under_way[owner] >= settings.max_experiments_per_token:
            raise ApiError(
                429,
                "TooManyExperiments",
                f"this token has {under_way[owner]} experiments (patching, logit lens, top examples) under way or "
                f"waiting, the most one token may have at once ({settings.max_experiments_per_token}, "
                "--max-experiments-per-token); wait for one to finish, then retry",
                retry_after=2,
            )
        under_way[owner] += 1
        try:
            yield
        finally:
            under_way[owner] -= 1

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

    def decoded(ids: list[list[int]]) -> list[Any]:
        """Each id (of each list) decoded alone; the ids as text for a model without a tokenizer."""
        try:
            words = tokenizer()
        except NeurotapError:
            return [[str(i) for i in row] for row in ids]
        return [[words.decode([i]) for i in row] for row in ids]

    def on_worker(fn: Any, *args: Any) -> Any:
        return asyncio.wrap_future(state.worker.call(fn, *args))

    async def lens_passes(request: Request, body: dict[str, Any], token: str | None) -> dict[str, Any] | None:
        """The logit lens as runs through the executor (None if the client went away).

        One forward records every layer's residual; then forwards of a few rows
        each put those residuals in at the final norm's input, with every decoder
        layer skipped, so the model's own final norm and head make the logits.
        Each run is bounded like any other request (memory estimate, request
        timeout, cancellation when the client goes away), and runs on a sharded
        server too.
        """
        top, target = body.get("top", 1), body.get("token")
        if not _is_int(top) or not 1 <= top <= MAX_LENS_TOP:
            raise ApiError(400, "RequestError", f"top must be an integer from 1 to {MAX_LENS_TOP}")
        if "text" in body:
            described = await on_worker(tokenize, text_in(body))
            ids, pieces = described["ids"], described["pieces"]
            if len(ids) > MAX_LENS_POSITIONS and body.get("positions") is None:
                raise ApiError(
                    413,
                    "RequestTooLarge",
                    f"the logit lens reads at most {MAX_LENS_POSITIONS} tokens; the text has more",
                )
        else:
            ids = body.get("ids")
            if not isinstance(ids, list) or not ids or not all(_is_int(i) for i in ids):
                raise ApiError(400, "RequestError", 'the body must be JSON: {"text": "..."} or {"ids": [token ids]}')
            pieces = [piece for (piece,) in await on_worker(decoded, [[i] for i in ids])]
        positions = body.get("positions", None if "text" in body else -1)
        chosen = list(range(len(ids))) if positions is None else [positions] if _is_int(positions) else positions
        if (
            not isinstance(chosen, list)
            or not chosen
            or not all(_is_int(t) and -len(ids) <= t < len(ids) for t in chosen)
        ):
            raise ApiError(
                400, "RequestError", f"positions must be a position or a list of positions within the {len(ids)} tokens"
            )
        if len(chosen) > MAX_LENS_POSITIONS:
            raise ApiError(
                413, "RequestTooLarge", f"the logit lens reads at most {MAX_LENS_POSITIONS} positions at a time"
            )
        chosen = [t % len(ids) for t in chosen]
        vocabulary = (await on_worker(executor.describe)).get("vocab_size") or 1 << 16
        if target is not None and not (_is_int(target) and 0 <= target < vocabulary):
            raise ApiError(400, "RequestError", f"token must be a token id from 0 to {vocabulary - 1}, or null")

        aliases = await on_worker(executor.aliases)
        layers = sorted(int(m[1]) for m in (re.fullmatch(r"blocks\.(\d+)\.resid_post", k) for k in aliases) if m)
        if not layers or "ln_final" not in aliases or "logits" not in aliases:
            raise ApiError(501, "NotAvailable", "the logit lens needs the aliases blocks.N.resid_post and ln_final")
        final_norm, _ = split_narrowing(aliases["ln_final"])
        skips = []
        for layer in layers:
            base, keys = split_narrowing(aliases[f"blocks.{layer}.resid_post"])
            if not keys:  # a layer that returns a tuple cannot be skipped without a value: it runs
                skips.append(ProbeSpec(base, Skip()))
        session = "lens-" + secrets.token_urlsafe(12)
        deadline = time.time() + 2 * settings.request_timeout  # for all the runs together
        shared = {"session": session, "owner": state.owner(token), "deadline": deadline}
        running: dict[int, RunRequest] = {}

        async def forward(inputs: torch.Tensor, probes: list[ProbeSpec], outputs: list[str]) -> Any:
            run = RunRequest(op="forward", args=(inputs,), probes=probes, outputs=outputs, **shared)
            result = await state.run(request, run, running)
            if result is not None and result.error is not None:
                error = result.error
                raise ApiError(error.status, error.type, error.message)
            return result

        rows = []
        try:
            names = [f"blocks.{layer}.resid_post" for layer in layers]
            at = (slice(None), chosen)
            if await forward(torch.tensor([ids]), [ProbeSpec(name, Record(index=at)) for name in names], []) is None:
                return None
            recorded = await on_worker(executor.recordings, session)
            residuals = torch.cat([recorded[name]["record"][0] for name in names])  # [layers, chosen, hidden]
            per_pass = max(1, _LENS_PASS_BYTES // (len(chosen) * vocabulary * 4))
            for first in range(0, len(layers), per_pass):
                part = residuals[first : first + per_pass]
                put_in = ProbeSpec(final_norm.removesuffix(".output") + ".input", Replace(part))
                inputs = torch.tensor([[ids[t] for t in chosen]]).expand(len(part), -1)
                result = await forward(inputs, [*skips, put_in], ["logits"])
                if result is None:
                    return None
                probs = torch.softmax(result.output["logits"].float(), dim=-1)
                best, found = probs.topk(top, dim=-1)
                for k in range(len(part)):
                    layer = layers[first + k]
                    row = {"layer": layer, "point": f"blocks.{layer}.resid_post"}
                    row.update(ids=found[k].tolist(), probs=best[k].tolist())
                    if target is not None:
                        own = probs[k, :, target]
                        row.update(token_rank=(probs[k] > own[:, None]).sum(-1).tolist(), token_prob=own.tolist())
                    rows.append(row)
        finally:
            state.worker.call(executor.close_session, session)
        for row in rows:
            row["pieces"] = await on_worker(decoded, row["ids"])
        return {"ids": ids, "pieces": pieces, "positions": chosen, "token": target, "layers": rows}

    async def json_body(request: Request) -> tuple[str | None, dict[str, Any]]:
        token = state.check(request)
        data = await _small_body(request, settings.body_timeout)
        try:
            body = json.loads(data)
        except (ValueError, RecursionError):  # deep nesting is malformed too
            body = None
        if not isinstance(body, dict):
            raise ApiError(400, "RequestError", 'the body must be a JSON object, such as {"text": "..."}')
        return token, body

    def text_in(body: dict[str, Any], key: str = "text") -> str:
        text = body.get(key)
        if not isinstance(text, str):
            raise ApiError(400, "RequestError", f'the body must be JSON with text: {{"{key}": "..."}}')
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

    scanning = asyncio.Lock()  # a scan reads a column of every shard: one at a time, off the event loop

    def examples(point: str, unit: Any, k: int, before: int, after: int) -> list[dict[str, Any]]:
        found = dataset.top_examples(point, unit, k, before=before, after=after)
        shape = dataset.shapes[point]
        flat = int(torch.tensor(unit if isinstance(unit, list) else [unit]) @ _strides(shape)) if shape else 0
        answer = []
        for example in found:
            begin = example.sequence * dataset.seq_len
            rows = range(max(begin, example.row - before), min(begin + dataset.seq_len, example.row + 1 + after))
            values = dataset.gather(point, list(rows)).reshape(len(rows), -1)[:, flat].float()
            answer.append(
                {
                    "value": example.value,
                    "row": example.row,
                    "sequence": example.sequence,
                    "position": example.position,
                    "document": example.document,
                    "at": example.row - rows.start,
                    "pieces": _pieces(dataset, rows),
                    "values": values.tolist(),
                }
            )
        return answer

    @app.get("/v1/dataset")
    async def dataset_route(request: Request) -> JSONResponse:
        state.check(request)
        if dataset is None:
            raise ApiError(404, "NotAvailable", "this server has no dataset: start it with --dataset FOLDER")
        shapes = {point: list(shape) for point, shape in dataset.shapes.items()}
        return JSONResponse({"points": list(dataset.points), "shapes": shapes, "rows": len(dataset)})

    @app.post("/v1/top_examples")
    async def top_examples_route(request: Request) -> JSONResponse:
        token, body = await json_body(request)
        with experiment_of(token):
            return await top_examples(body)

    async def top_examples(body: dict[str, Any]) -> JSONResponse:
        if dataset is None:
            raise ApiError(404, "NotAvailable", "this server has no dataset: start it with --dataset FOLDER")
        point, unit = body.get("point"), body.get("unit")
        if point not in dataset.points:
            raise ApiError(
                404, "UnknownPointError", f"the dataset holds no point {point!r}; it holds {', '.join(dataset.points)}"
            )
        shape = dataset.shapes[point]
        units = unit if isinstance(unit, list) else [unit]
        if len(units) != max(len(shape), 1) or not all(_is_int(u) for u in units):
            raise ApiError(400, "RequestError", f"unit must index the per-token shape {list(shape)} of {point!r}")
        if any(not 0 <= u < n for u, n in zip(units, shape or (1,))):
            raise ApiError(400, "RequestError", f"unit {unit!r} is outside the per-token shape {list(shape)}")
        sizes = {}
        for name, default, top in (("k", 10, MAX_EXAMPLES), ("before", 16, MAX_CONTEXT), ("after", 4, MAX_CONTEXT)):
            sizes[name] = body.get(name, default)
            if not _is_int(sizes[name]) or not (name != "k" or sizes[name] >= 1) or not 0 <= sizes[name] <= top:
                raise ApiError(400, "RequestError", f"{name} must be an integer from {int(name == 'k')} to {top}")
        async with scanning:
            found = await asyncio.to_thread(examples, point, unit, sizes["k"], sizes["before"], sizes["after"])
        return JSONResponse({"point": point, "unit": unit, "examples": found})

    @app.post("/v1/patching")
    async def patching_route(request: Request) -> Response:
        token, body = await json_body(request)
        with experiment_of(token):
            return await patching(request, token, body)

    async def patching(request: Request, token: str | None, body: dict[str, Any]) -> Response:
        clean, corrupt, target = text_in(body, "clean"), text_in(body, "corrupt"), body.get("target")
        words = await on_worker(tokenizer)
        if isinstance(target, str):
            found = words(target, add_special_tokens=False).input_ids
            if not found:
                raise ApiError(400, "RequestError", f"the target {target!r} has no tokens")
            target = int(found[0])
        vocabulary = (await on_worker(executor.describe)).get("vocab_size") or 1 << 16
        if not (_is_int(target) and 0 <= target < vocabulary):
            raise ApiError(400, "RequestError", "target must be a token's text or its id")
        lengths = {len(words(text).input_ids) for text in (clean, corrupt)}
        if len(lengths) > 1 or max(lengths) > MAX_LENS_POSITIONS:
            raise ApiError(
                400 if len(lengths) > 1 else 413,
                "RequestError" if len(lengths) > 1 else "RequestTooLarge",
                f"the clean and corrupted prompts must have the same number of tokens, at most "
                f"{MAX_LENS_POSITIONS}; they have {sorted(lengths)}",
            )
        aliases = await on_worker(executor.aliases)
        layers = sorted(int(m[1]) for m in (re.fullmatch(r"blocks\.(\d+)\.resid_post", k) for k in aliases) if m)
        if not layers:
            raise ApiError(
                501, "NotAvailable", "patching restores the aliases blocks.N.resid_post: this model has none"
            )
        session = "patching-" + secrets.token_urlsafe(12)
        served = _ServedModel(state, words, aliases, session, state.owner(token), settings.request_timeout)
        points = [f"blocks.{layer}.resid_post" for layer in layers]
        piece = words.decode([target])

        def probability(logits: torch.Tensor) -> torch.Tensor:
            return logits.float().softmax(-1)[:, target]

        probability.__name__ = f"p({piece!r})"
        work = asyncio.get_running_loop().run_in_executor(
            experiments, activation_patching, served, clean, corrupt, probability, points
        )
        try:
            while not work.done():
                await asyncio.wait([work], timeout=0.25)
                if not work.done() and await request.is_disconnected():
                    served.cancel()  # the run under way stops where it is; the experiment stops with it
                    return Response(status_code=499)
            result = work.result()
        finally:
            state.worker.call(executor.close_session, session)
        return JSONResponse({**result.to_dict(), "target": target, "target_piece": piece})

    @app.post("/v1/tokenize")
    async def tokenize_route(request: Request) -> JSONResponse:
        _, body = await json_body(request)
        return JSONResponse(await on_worker(tokenize, text_in(body)))

    @app.post("/v1/logit_lens")
    async def logit_lens_route(request: Request) -> Response:
        token, body = await json_body(request)
        with experiment_of(token):
            lens = await lens_passes(request, body, token)
        return Response(status_code=499) if lens is None else JSONResponse(lens)


class _ServedModel:
    """The served model as ``nt.experiments`` see a remote one, with each forward a run through the executor.

    Runs are bounded like any client's (limits, request timeout, the experiment's
    whole deadline of twice that, counted from its first run: waiting for a thread
    is not held against it) and write to a session of their own.
    """

    def __init__(self, state: Any, tokenizer: Any, aliases: dict[str, str], session: str, owner: str, timeout: float):
        self.tokenizer = tokenizer
        self._state, self._aliases, self._session, self._owner = state, aliases, session, owner
        self._timeout, self._deadline = timeout, None
        self._running: dict[int, RunRequest] = {}
        self._cancelled = False

    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    def cancel(self) -> None:
        self._cancelled = True
        for run in list(self._running.values()):
            run.cancelled = True

    def forward(self, ids: torch.Tensor, *, probes: Any = (), outputs: Any = None, **kwargs: Any) -> Any:
        return self._result(ids, probes, outputs, kwargs).output

    def run(self, ids: torch.Tensor, *, record: Any = (), probes: Any = (), outputs: Any = None, **kwargs: Any) -> Any:
        """``RemoteModel.run`` without a loss: the output and a trace of the points in ``record``."""
        result = self._result(ids, probes, outputs, kwargs, traced_probes(record))
        return result.output, trace_of(result.trace or [])

    def _result(self, ids: torch.Tensor, probes: Any, outputs: Any, kwargs: dict, traced: Any = ()) -> Any:
        if self._cancelled:
            raise ApiError(499, "RequestCancelledError", "the client went away")
        specs = [ProbeSpec(p.point, p.fn, grad=p.grad, optional=p.optional) for p in probes] + list(traced)
        run = RunRequest("forward", args=(ids,), kwargs=kwargs, probes=specs, outputs=outputs, session=self._session)
        if self._deadline is None:
            self._deadline = time.time() + 2 * self._timeout
        run.owner, run.timeout, run.deadline = self._owner, self._timeout, self._deadline
        self._running[id(run)] = run
        try:
            result = self._state.worker.run(run).result()
        finally:
            self._running.pop(id(run), None)
        if result.error is not None:
            raise ApiError(result.error.status, result.error.type, result.error.message)
        return result

    def recordings(self, points: Any = None) -> dict[str, Any]:
        saved = self._state.worker.call(self._state.executor.recordings, self._session).result()
        return {name: data for name, data in saved.items() if points is None or name in points}


def _pieces(dataset: Any, rows: range) -> list[str]:
    """Each row's text with the spacing before it, so that the pieces join into the text of the rows."""
    pieces, seen = [], ""
    for stop in range(rows.start + 1, rows.stop + 1):
        text = dataset.text(rows.start, stop)
        pieces.append(text[len(seen) :])
        seen = text
    return pieces


def _strides(shape: Any) -> torch.Tensor:
    """Row-major strides: a unit's flat index within a per-token shape."""
    strides = [1]
    for size in reversed(list(shape)[1:]):
        strides.insert(0, strides[0] * size)
    return torch.tensor(strides)


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
