"""``nt.connect(url)``: a model served by ``neurotap serve``, with the local probe API.

Differences from a local ``nt.Model``:

- Outputs come back as tensors on the CPU, detached; a transformers ``ModelOutput``
  comes back as an :class:`~neurotap.transport.wire.Output` (keys and attributes)
  holding its values but the ``past_key_values`` cache. ``outputs=[...]`` picks
  the fields to send back (``[]``: none). A value the server cannot send (an object
  of another class) is a :class:`~neurotap.transport.wire.NotSent` string in its
  place, and the call warns with :class:`~neurotap.NotSentWarning` naming it.
- Gradients: ``backward(ids, loss=CrossEntropy(targets) | LogitDiff(a, b), probes=[...])``
  runs the forward, the loss and the gradients the probes ask for on the server
  and returns the loss; gradient probes record as locally (``point + ".grad"``).
- Probe functions other than the library's patches, and losses other than the
  built-in ones, run only on servers started with ``--allow-code`` (they travel
  pickled with cloudpickle).
- ``get_parameter`` returns a detached copy, not the live parameter.
- ``patch()`` validates point names when the block is entered, and its patches
  travel with every request made inside the block.
- ``run(ids, record=[...], grad=[...], loss=...)`` is one request; the trace's
  values come back with the answer and the session's recordings stay as they were.
- ``rm.tokenizer`` is the server's tokenizer, rebuilt from its files (no pickle);
  ``rm.encode(text)`` / ``rm.decode(ids)``, and text in place of token ids in
  ``forward``, ``generate`` and ``backward``, use it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from ..errors import (
    MissedPointError,
    NeurotapError,
    NotSentWarning,
    PatchError,
    ProbeError,
    UnknownPointError,
    raised_at_the_call,
)
from ..model.lens import LogitLens, check_lens_arguments, text_tokens
from ..model.losses import check_loss
from ..model.model import PatchSpec, check_run, patches_to_probes, point_names, readings_of
from ..model.text import check_token_ids, is_text, text_to_ids
from ..model.trace import Trace
from ..points import Point, PointList, is_pattern, matching, split_narrowing, unknown_point
from ..probes import Patch, Probe, Recordings, Replace, SaveContext, probe
from .executor import RecordingLimitError, RequestTimeoutError
from .limits import RequestTooCostlyError
from .wire import (
    MEDIA_TYPE,
    PROTOCOL,
    PROTOCOL_HEADER,
    SESSION_HEADER,
    CodeNotAllowedError,
    ProbeSpec,
    RunRequest,
    WireError,
    build_tokenizer,
    decode,
    encode_request,
    not_sent,
    read_frames,
    trace_of,
    traced_probes,
)


class ServerGoneError(NeurotapError, ConnectionError):
    """The connection to the server broke: it stopped, restarted or cannot be reached."""


class ClientTimeoutError(NeurotapError, TimeoutError):
    """The server did not answer within the client's timeout."""


class RemoteError(NeurotapError):
    """The server refused a request for a reason with no more specific neurotap error."""

    def __init__(self, message: str, status: int = 0, traceback: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.remote_traceback = traceback


_ERRORS: dict[str, type[Exception]] = {
    "UnknownPointError": UnknownPointError,
    "MissedPointError": MissedPointError,
    "PatchError": PatchError,
    "ProbeError": ProbeError,
    "CodeNotAllowedError": CodeNotAllowedError,
    "WireError": WireError,
    "RequestTimeoutError": RequestTimeoutError,
    "RecordingLimitError": RecordingLimitError,
    "RequestTooCostlyError": RequestTooCostlyError,
}


def _transport() -> Any:
    """An httpx transport whose broken connections raise :class:`ServerGoneError`, which says what to do."""
    import httpx

    class Transport(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            try:
                return super().handle_request(request)
            except httpx.TimeoutException as error:
                raise ClientTimeoutError(
                    f"{request.method} {request.url.path} got no answer in time ({type(error).__name__}); the "
                    "server may be busy: wait longer with nt.connect(url, timeout=SECONDS)"
                ) from None
            except httpx.TransportError as error:
                raise ServerGoneError(
                    f"the server at {request.url.scheme}://{request.url.netloc.decode()} went away during "
                    f"{request.method} {request.url.path} ({type(error).__name__}: {error}); it may have stopped "
                    "or restarted: check it, then nt.connect(url) again"
                ) from None

    # without TCP_NODELAY, a body written after its headers waits ~40 ms for a delayed ACK
    return Transport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])


def _raise_for(response: Any) -> None:
    if response.status_code < 400:
        return
    try:
        body = response.json()
        kind, message, trace = body.get("error", ""), body.get("message", ""), body.get("traceback")
    except ValueError:
        kind, message, trace = "", response.text[:500], None
    text = f"{message} (HTTP {response.status_code})"
    if trace:
        text += "\n\nserver traceback:\n" + trace
    cls = _ERRORS.get(kind)
    error = cls(text) if cls is not None else RemoteError(f"{kind or 'error'}: {text}", response.status_code, trace)
    error.status = response.status_code  # type: ignore[attr-defined]
    error.remote_traceback = trace  # type: ignore[attr-defined]
    raise error


class RemoteModel:
    """A model on a ``neurotap serve`` server; code written for ``nt.wrap(model)`` runs against it."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 300.0, compress: bool = False) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.compress = compress
        headers = {PROTOCOL_HEADER: str(PROTOCOL), "Accept-Encoding": "gzip" if compress else "identity"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=_transport())
        self._layers: list[list[Probe]] = []
        self._known: set[str] | None = None  # point names and aliases, for checks on entering patch()
        self._session: str | None = None
        try:
            self._open()
        except BaseException:
            self._http.close()
            raise
        self._tokenizer: list = []  # fetched on first use

    def _open(self) -> None:
        import httpx

        try:
            health = self._http.get("/health")
        except (httpx.HTTPError, ServerGoneError) as error:
            raise ServerGoneError(f"no neurotap server answers at {self.url}: {error}") from None
        _raise_for(health)
        protocol = health.json().get("protocol")
        if protocol != PROTOCOL:
            side = "server" if isinstance(protocol, int) and protocol < PROTOCOL else "client"
            raise NeurotapError(
                f"the server at {self.url} speaks neurotap protocol {protocol}, this client {PROTOCOL}; "
                f"upgrade neurotap on the {side} side"
            )
        response = self._http.post("/v1/sessions")
        _raise_for(response)
        self._session = response.json()["session"]
        self._http.headers[SESSION_HEADER] = self._session

    def __repr__(self) -> str:
        return f"nt.RemoteModel({self.url!r}, {len(self._layers)} patch layers active)"

    def __enter__(self) -> RemoteModel:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def close(self) -> None:
        """End the session (its recordings are dropped on the server) and the connection."""
        if self._session is not None:
            with contextlib.suppress(Exception):
                self._http.delete(f"/v1/sessions/{self._session}")
            self._session = None
        self._http.close()

    def shutdown(self, timeout: float = 60.0) -> None:
        """Stop the server, if it runs on this machine (as one started by ``launch_and_connect`` does)."""
        host = self._http.base_url.host
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise NeurotapError(f"the server at {self.url} runs on another machine: stop it there")
        pid = self._http.get("/health").json().get("pid")
        self.close()
        _terminate(pid, self.url, timeout)

    @raised_at_the_call
    def info(self) -> dict[str, Any]:
        response = self._http.get("/v1/info")
        _raise_for(response)
        return response.json()

    # -- points ----------------------------------------------------------------------------------

    @raised_at_the_call
    def points(self, prefix: str | None = None) -> PointList:
        response = self._http.get("/v1/points", params={"prefix": prefix} if prefix else None)
        _raise_for(response)
        return PointList(Point.from_dict(row) for row in response.json())

    @raised_at_the_call
    def aliases(self) -> dict[str, str]:
        """Short canonical point names (``blocks.3.resid_post``) -> raw point names, as the server resolves them."""
        response = self._http.get("/v1/aliases")
        _raise_for(response)
        return response.json()

    def _check_points(self, probes: Sequence[Probe]) -> None:
        if self._known is None:
            self._known = {p.name for p in self.points()} | set(self.aliases())
        for p in probes:
            base, _ = split_narrowing(p.point)
            if is_pattern(base) and not matching(base, self._known):
                raise unknown_point(base, self._known)
            if not is_pattern(base) and base not in self._known:
                raise unknown_point(base, self._known)

    # -- text ------------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        """The server's tokenizer, rebuilt here from its files (no pickle); None if the model has none."""
        if not self._tokenizer:
            response = self._http.get("/v1/tokenizer")
            _raise_for(response)
            described = response.json()["tokenizer"]
            self._tokenizer.append(build_tokenizer(described) if described is not None else None)
        return self._tokenizer[0]

    @raised_at_the_call
    def encode(self, text: str) -> torch.Tensor:
        """Token ids ``[1, n]`` of ``text``, as the server's model reads them."""
        return self._require_tokenizer()(text, return_tensors="pt").input_ids

    @raised_at_the_call
    def decode(self, ids: Any) -> str:
        """The text of token ids (a tensor or a list; the first row of a ``[1, n]`` tensor)."""
        if isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        return self._require_tokenizer().decode(ids)

    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise NeurotapError("the server's model has no tokenizer: send token ids (a LongTensor) instead of text")
        return self.tokenizer

    # -- running ---------------------------------------------------------------------------------

    @raised_at_the_call
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    @raised_at_the_call
    def forward(
        self,
        *args: Any,
        probes: Sequence[Probe] = (),
        outputs: Sequence[str] | None = None,
        stop_at: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """The model's forward on the server; ``outputs`` picks which output fields come back.

        With ``stop_at`` (a point name or alias) the forward ends once that point has
        fired and its probes have run, and returns the value there, as locally.
        """
        return self._run("forward", args, kwargs, probes, outputs, stop_at=stop_at)["output"]

    @raised_at_the_call
    def generate(self, *args: Any, probes: Sequence[Probe] = (), **kwargs: Any) -> Any:
        """The model's ``generate`` on the server; probes and patches fire at every step."""
        return self._run("generate", args, kwargs, probes, None)["output"]

    @raised_at_the_call
    def backward(
        self,
        *args: Any,
        loss: Any,
        probes: Sequence[Probe] = (),
        **kwargs: Any,
    ) -> float:
        """Forward, ``loss`` (``CrossEntropy(targets)`` or ``LogitDiff(correct, wrong)``), backward; the loss.

        Gradient probes (``nt.probe(point, nt.Record(), grad=True)``) record the
        gradient at their points under ``point + ".grad"``. A function of the
        model's output as the loss runs only on a server started with ``--allow-code``.
        """
        check_loss(loss)
        return self._run("backward", args, kwargs, probes, [], loss)["loss"]

    @raised_at_the_call
    def run(
        self,
        *args: Any,
        record: str | Sequence[str] | Mapping[str, Patch] = (),
        grad: str | Sequence[str] = (),
        loss: Any = None,
        probes: Sequence[Probe] = (),
        outputs: Sequence[str] | None = None,
        generate: bool = False,
        **kwargs: Any,
    ) -> tuple[Any, Trace]:
        """``nt.Model.run`` on the server, in one request: the output and a :class:`~neurotap.Trace` of this call.

        The values come back with the answer; the session's recordings on the
        server are not touched.
        """
        readings, grad = readings_of(record), point_names("grad", grad)
        check_run(grad, loss, generate)
        op = "generate" if generate else "forward" if loss is None else "backward"
        answer = self._run(op, args, kwargs, probes, outputs, loss, traced_probes(readings, grad))
        if "trace" not in answer:
            raise NeurotapError(
                "this server sent no trace back (an older neurotap); "
                "record with probes and read them with recordings() there"
            )
        return answer["output"], trace_of(answer["trace"], answer["loss"])

    def _run(
        self,
        op: str,
        args: tuple,
        kwargs: dict[str, Any],
        probes: Sequence[Probe],
        outputs: Sequence[str] | None,
        loss: Any = None,
        traced: Sequence[ProbeSpec] = (),
        *,
        stop_at: str | None = None,
    ) -> dict[str, Any]:
        for p in probes:
            if not isinstance(p, Probe):
                raise TypeError(f"probes must be made with nt.probe(point, fn), got {type(p).__name__}")
        args, kwargs = tuple(args), dict(kwargs)
        first = args[0] if args else kwargs.get("input_ids")
        if is_text(first):
            args, kwargs = text_to_ids(self._require_tokenizer(), op, args, kwargs)
        elif first is not None and not isinstance(first, torch.Tensor):  # a server may take float inputs
            check_token_ids(first)
        every = [p for layer in self._layers for p in layer] + list(probes)
        request = RunRequest(
            op,
            tuple(args),
            dict(kwargs),
            [ProbeSpec(p.point, p.fn, p.grad, p.optional) for p in every] + list(traced),
            None if outputs is None else list(outputs),
            loss,
            stop_at,
        )
        body = encode_request(request)
        headers = {"Content-Type": MEDIA_TYPE}
        if self.compress:
            import gzip

            body = gzip.compress(body, compresslevel=1)
            headers["Content-Encoding"] = "gzip"
        response = self._http.post("/v1/run", content=body, headers=headers)
        _raise_for(response)
        answer = decode(response.content)
        places = not_sent(answer.get("output"), "the output")
        for entry in answer.get("trace") or ():
            places += not_sent(entry["data"], f"the trace's {entry['point']!r}")
        _warn_not_sent(places)
        return answer

    @raised_at_the_call
    def unembed(self, residual: torch.Tensor) -> torch.Tensor:
        """Logits of a residual-stream value ``[..., hidden]`` through the served model's final norm and head.

        One forward on the server, of placeholder tokens, with ``residual`` put in
        front of the final norm; the logits ``[..., vocab]`` come back.
        """
        aliases = self.aliases()
        if "ln_final" not in aliases or "logits" not in aliases:
            raise NeurotapError(
                "unembed needs a final norm and output embeddings (the ln_final and logits aliases), "
                "and the served model has none; apply your own head to the residual instead"
            )
        flat = torch.as_tensor(residual).reshape(1, -1, residual.shape[-1])
        probes = [probe(aliases["ln_final"].removesuffix(".output") + ".input", Replace(flat))]
        dummy = torch.zeros(flat.shape[:2], dtype=torch.long)
        logits = self.forward(dummy, probes=probes, outputs=["logits"], use_cache=False)["logits"]
        return logits.reshape(*residual.shape[:-1], logits.shape[-1])

    @raised_at_the_call
    def logit_lens(
        self, ids: Any, positions: int | Sequence[int] | None = -1, *, top: int = 5, token: int | str | None = None
    ) -> LogitLens:
        """``nt.Model.logit_lens`` on the server: only the top tokens (and ``token``'s rank) come back."""
        if isinstance(ids, str):
            ids = self.encode(ids)
        if isinstance(token, str):
            token = text_tokens(self.tokenizer, token, "the token", special=False)[0]
        ids, chosen = check_lens_arguments(ids, positions, top)
        body = {"ids": ids[0].tolist(), "positions": chosen, "top": top, "token": token}
        response = self._http.post("/v1/logit_lens", json=body)
        _raise_for(response)
        data = response.json()
        rows = data["layers"]
        ranked = token is not None
        return LogitLens(
            tuple(row["point"] for row in rows),
            tuple(data["positions"]),
            tuple(data["pieces"][t] for t in data["positions"]),
            torch.tensor([row["ids"] for row in rows], dtype=torch.int64),
            torch.tensor([row["probs"] for row in rows], dtype=torch.float32),
            tuple(tuple(tuple(cell) for cell in row["pieces"]) for row in rows),
            data["token"],
            torch.tensor([row["token_rank"] for row in rows], dtype=torch.int64) if ranked else None,
            torch.tensor([row["token_prob"] for row in rows], dtype=torch.float32) if ranked else None,
        )

    @contextlib.contextmanager
    def patch(self, patches: PatchSpec) -> Iterator[RemoteModel]:
        """Apply ``{point: patch or [patches]}`` to every request inside the ``with`` block."""
        layer = patches_to_probes(patches)
        self._check_points(layer)
        self._layers.append(layer)
        try:
            yield self
        finally:
            self._layers.pop()

    # -- results ---------------------------------------------------------------------------------

    @raised_at_the_call
    def recordings(self, points: Sequence[str] | None = None) -> dict[str, SaveContext]:
        """What probes saved in this session, by point name (only ``points`` if given); streamed."""
        params = [("point", p) for p in points] if points else None
        result = Recordings()
        with self._http.stream("GET", "/v1/recordings", params=params) as response:
            if response.status_code >= 400:
                response.read()
                _raise_for(response)
            places = []
            for message in read_frames(response.iter_bytes()):
                ctx = SaveContext(message["point"])
                ctx._data.update(message["data"])
                result[message["point"]] = ctx
                places += not_sent(message["data"], f"recordings()[{message['point']!r}]")
        _warn_not_sent(places)
        return result

    @raised_at_the_call
    def clear_recordings(self) -> None:
        _raise_for(self._http.delete("/v1/recordings"))

    @raised_at_the_call
    def get_parameter(self, name: str) -> torch.Tensor:
        """A copy of the parameter ``name`` (a tensor on the CPU)."""
        response = self._http.get(f"/v1/parameters/{name}")
        _raise_for(response)
        return decode(response.content)["parameter"]


def _warn_not_sent(places: list[str]) -> None:
    """One warning for an answer that holds placeholders where the server had values that cannot travel."""
    if places:
        listed = ", ".join(places[:8]) + (f" and {len(places) - 8} more" if len(places) > 8 else "")
        warnings.warn(
            f"the server could not send {len(places)} value{'s' * (len(places) > 1)}, which arrive as "
            f"placeholder strings: {listed}; to have them travel, save tensors, numbers, strings, "
            "and lists, tuples, dicts, sets or namedtuples of them",
            NotSentWarning,
            stacklevel=4,
        )


def connect(url: str = "http://127.0.0.1:8000", token: str | None = None, **kwargs: Any) -> RemoteModel:
    """Connect to a ``neurotap serve`` server; a new session with its own recordings."""
    return RemoteModel(url, token, **kwargs)


_launched: list[subprocess.Popen] = []


def _terminate(pid: Any, url: str, timeout: float) -> None:
    if not isinstance(pid, int):
        raise NeurotapError(
            f"the server at {url} does not say its process id (it needs a token): stop it where it runs"
        )
    import signal

    try:
        os.kill(pid, signal.SIGTERM)  # it finishes running requests, then exits
    except ProcessLookupError:
        return
    except PermissionError:
        raise NeurotapError(f"the server at {url} (pid {pid}) belongs to another user: stop it as that user") from None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in list(_launched):
            if process.pid == pid and process.poll() is not None:
                _launched.remove(process)
                return
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise NeurotapError(f"the server at {url} (pid {pid}) did not stop within {timeout:g} s")


def stop(server: int | str = 8000, *, token: str | None = None, timeout: float = 60.0) -> None:
    """Stop a ``neurotap serve`` process on this machine, returning once it has exited.

    ``server`` is its port on 127.0.0.1, or the model name a ``launch_and_connect``
    started it with (every such server of that model is stopped). Nothing serving
    there is nothing to do.
    """
    if isinstance(server, str):
        from ..model.load import cache_dir

        for log in sorted(cache_dir().glob("serve-*.log")):  # launch_and_connect's, one per port
            port = log.stem.removeprefix("serve-")
            if port.isdigit() and (_health(int(port), token) or {}).get("model") == server:
                stop(int(port), token=token, timeout=timeout)
        return
    health = _health(server, token)
    if health is not None:
        _terminate(health.get("pid"), f"http://127.0.0.1:{server}", timeout)


def _health(port: int, token: str | None) -> dict[str, Any] | None:
    """What the server on 127.0.0.1:``port`` says of itself, or None when nothing answers there."""
    import httpx

    headers = {PROTOCOL_HEADER: str(PROTOCOL), **({"Authorization": f"Bearer {token}"} if token else {})}
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", headers=headers, timeout=5.0).json()
    except (httpx.HTTPError, ValueError):
        return None


def launch_and_connect(
    model: str = "smollm2-135m",
    *,
    port: int = 8000,
    token: str | None = None,
    idle_timeout: float = 3600.0,
    start_timeout: float = 600.0,
    serve_args: Sequence[str] = (),
) -> RemoteModel:
    """Connect to the local server on ``port``, starting ``neurotap serve MODEL`` there if none runs.

    A server started here runs on 127.0.0.1 in its own process, outlives this one,
    and stops after ``idle_timeout`` seconds without requests. Its log is
    ``$NEUROTAP_CACHE/serve-PORT.log``.
    """
    import httpx

    from ..model.load import cache_dir

    url = f"http://127.0.0.1:{port}"

    def running() -> dict[str, Any] | None:
        try:
            return httpx.get(url + "/health", timeout=2.0).json()
        except (httpx.HTTPError, ValueError):
            return None

    health = running()
    if health is None:
        logfile = cache_dir() / f"serve-{port}.log"
        logfile.parent.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-c",
            "import sys; from neurotap.cli import main; sys.exit(main())",
            "serve",
            model,
            "--port",
            str(port),
            "--idle-timeout",
            str(idle_timeout),
            *serve_args,
        ]
        with open(logfile, "ab") as log:
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        _launched.append(process)  # it outlives this call on purpose; keep the handle
        print(
            f"neurotap: starting `neurotap serve {model}` on {url} (log: {logfile}); it stops after "
            f"{idle_timeout:g} s without requests (idle_timeout=...), or with rm.shutdown() or nt.stop({model!r})",
            file=sys.stderr,
            flush=True,
        )
        deadline = time.monotonic() + start_timeout
        while health is None:
            if process.poll() is not None:
                tail = logfile.read_text(errors="replace")[-2000:]
                raise NeurotapError(f"`neurotap serve {model}` exited with status {process.returncode}:\n{tail}")
            if time.monotonic() > deadline:
                raise NeurotapError(f"`neurotap serve {model}` did not answer within {start_timeout} s; see {logfile}")
            time.sleep(0.2)
            health = running()
    if health.get("model") != model:
        raise NeurotapError(f"port {port} already serves {health.get('model')!r}, not {model!r}; pass another port=...")
    return connect(url, token)
