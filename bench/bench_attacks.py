"""Attacks on a real ``neurotap serve`` process, each while a canary client keeps working.

Starts ``neurotap serve`` on 127.0.0.1 (port 0) for a tiny random Llama saved to a
temporary folder (``--smollm2``: the built-in ``smollm2-135m`` as well), then runs
each attack below as an adversarial token holder would, with raw httpx and raw
sockets where the client library would refuse to send the request. Meanwhile a
canary thread per server (``nt.connect``) keeps sending a small forward and a
``/health`` on a fresh connection, and records their latencies.

Servers: A (tokens, --header-timeout 2, --body-timeout 3, --max-connections 200,
--max-request-bytes 128M, 4 MiB a session, 16 MiB in all, --request-timeout 10);
B (--allow-code, no tokens, --request-timeout 2; started in the background); S
(smollm2-135m with A's settings). Attacks: model arguments that load code (1),
work and memory bounds (2), recordings of non-tensors and of --max-total-bytes
(3), session floods (4), large and malformed messages and many large bodies at
once (5), slowloris, slow bodies, the connection cap and clients that never read
their answer (6), a long pass with requests queued behind it (7), Host/Origin
(8), then compressed bodies, request framing, odd values, point names and paths,
many probes at one point, the shared session cap of a server without tokens, the
web inspector's routes, concurrent clears and a session closed mid-body (9), point
patterns that are costly to match, and traces sharing passes (10); large tensors
sent at once, answers never read, a flood of experiments from one token, pickled
bytes without --allow-code and a Probability of a million tokens (11).

One row per attack: requests sent, responses by status class, 5xx (those by
design, 503 for the connection cap and 504 for the request timeout, counted
apart), whether the server is alive after it, the server's peak RSS (VmHWM)
before and after, the canary's worst latency and failures during it, and the
checks that failed. A failed check is a finding, printed in full at the end.

All traffic goes to 127.0.0.1; every loop is bounded in count and time (about
2-3 minutes in all for the tiny model on 2 cores).
Run: python bench/bench_attacks.py [--smollm2] [--only NAME,...]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import socket
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

import neurotap as nt
from neurotap.transport.wire import (
    MEDIA_TYPE,
    PROTOCOL,
    PROTOCOL_HEADER,
    SESSION_HEADER,
    ProbeSpec,
    RunRequest,
    encode_request,
    traced_probes,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import serving  # noqa: E402  (the tests' harness: start a server, wait until it listens, stop it)

TOKENS = ("alpha-attack-token-0123456789", "beta-canary-token-0123456789")
MUL = "model.layers.0.mlp.mul"
SLOW = 5.0  # a canary latency over this many seconds counts as the canary not being served
SESSION_BYTES = 4 << 20  # --max-session-bytes of the main server
TOTAL_BYTES = 16 << 20  # --max-total-bytes of the main server


# -- servers ------------------------------------------------------------------------------------------


def save_tiny(folder: str) -> str:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=None,
        attn_implementation="eager",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    transformers.LlamaForCausalLM(config).eval().save_pretrained(folder)
    return folder


class Server(serving.Server):
    """A ``neurotap serve`` process, named in the report, with the token its clients send."""

    stop_timeout = 20.0

    def __init__(self, name: str, model: str, args: list[str], token: str | None) -> None:
        super().__init__(model, *args, env={"OMP_NUM_THREADS": "1"}, wait=False)
        self.name = name
        self.token = token

    def wait(self) -> None:
        try:
            super().wait()
        except RuntimeError as error:
            raise RuntimeError(f"{self.name}: {error}") from None

    def alive(self) -> bool:
        return self.process.poll() is None

    def status(self, field_name: str) -> int:
        """VmHWM / VmRSS of the server process, in bytes (0 once it is gone)."""
        try:
            with open(f"/proc/{self.process.pid}/status") as handle:
                for line in handle:
                    if line.startswith(field_name + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def headers(self, token: str | None = None, session: str | None = None) -> dict[str, str]:
        headers = {PROTOCOL_HEADER: str(PROTOCOL)}
        token = token if token is not None else self.token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if session:
            headers[SESSION_HEADER] = session
        return headers

    def connect(self, token: str | None = None) -> nt.RemoteModel:
        return nt.connect(self.url, token=token if token is not None else self.token, timeout=60)


class Raw:
    """An adversarial client: its own session, raw bodies, any headers."""

    def __init__(self, server: Server, token: str | None = None, timeout: float = 60.0) -> None:
        self.server = server
        self.token = token if token is not None else server.token
        self.http = httpx.Client(base_url=server.url, timeout=timeout, headers=server.headers(self.token))
        self.session = self.open()

    def open(self) -> str:
        response = self.http.post("/v1/sessions")
        response.raise_for_status()
        return response.json()["session"]

    def run(self, body: bytes, headers: dict[str, str] | None = None, session: str | None = None) -> httpx.Response:
        sent = {"Content-Type": MEDIA_TYPE, SESSION_HEADER: session or self.session, **(headers or {})}
        return self.http.post("/v1/run", content=body, headers=sent)

    def get(self, path: str, headers: dict[str, str] | None = None, **kwargs: Any) -> httpx.Response:
        return self.http.get(path, headers={SESSION_HEADER: self.session, **(headers or {})}, **kwargs)

    def delete(self, path: str, session: str | None = None) -> httpx.Response:
        return self.http.delete(path, headers={SESSION_HEADER: session or self.session})

    def close(self) -> None:
        try:
            self.http.delete(f"/v1/sessions/{self.session}")
        except httpx.HTTPError:
            pass
        self.http.close()


# -- messages built by hand ---------------------------------------------------------------------------


def message(document: Any, tensors: dict[str, torch.Tensor] | None = None) -> bytes:
    """A wire message with any JSON document: what a hostile client can send."""
    from safetensors.torch import save

    return save(tensors or {}, metadata={"neurotap": json.dumps(document, separators=(",", ":"))})


def run_doc(op: str, kwargs: dict | None = None, probes: list | None = None, **extra: Any) -> dict:
    return {
        "op": op,
        "args": [{"$tensor": "ids"}],
        "kwargs": {"$dict": kwargs or {}},
        "probes": probes or [],
        "outputs": extra.pop("outputs", []),
        "loss": None,
        **extra,
    }


def ids(rows: int = 1, length: int = 7, vocab: int = 128) -> torch.Tensor:
    return torch.randint(2, vocab, (rows, length))


def patch(name: str, **fields: Any) -> dict:
    return {"$patch": name, "fields": fields}


def probe_doc(point: str, fn: dict, grad: bool = False) -> dict:
    return {"point": point, "grad": grad, "fn": fn}


def request(op: str, args: tuple, probes: list[tuple[str, Any]] = (), outputs: list | None = None, **kw) -> bytes:
    return encode_request(RunRequest(op, args, kw, [ProbeSpec(p, fn) for p, fn in probes], outputs))


# -- tallies, the canary and rows ---------------------------------------------------------------------


class Tally:
    def __init__(self) -> None:
        self.classes: collections.Counter = collections.Counter()
        self.statuses: collections.Counter = collections.Counter()
        self.unexpected: list[str] = []  # 5xx answers not by design, with what was sent
        self.sent = 0
        self.lock = threading.Lock()

    def add(self, what: str, response: httpx.Response | int | None, by_design: tuple[int, ...] = ()) -> int:
        """Count one answer; ``None`` (or an exception string) for no answer."""
        status = response if isinstance(response, int) else getattr(response, "status_code", 0)
        with self.lock:
            self.sent += 1
            if not status:
                self.classes["none"] += 1
            else:
                self.classes[f"{status // 100}xx"] += 1
                self.statuses[status] += 1
                if status >= 500 and status not in by_design:
                    body = getattr(response, "text", "")[:300]
                    self.unexpected.append(f"{what} -> {status} {body}")
        return status

    def send(self, what: str, fn: Callable[[], httpx.Response], by_design: tuple[int, ...] = ()) -> Any:
        try:
            response = fn()
        except httpx.HTTPError as error:
            self.add(what, None)
            return f"{type(error).__name__}: {error}"
        self.add(what, response, by_design)
        return response

    def designed_5xx(self) -> int:
        return sum(n for s, n in self.statuses.items() if s >= 500) - len(self.unexpected)


class Canary(threading.Thread):
    """A well-behaved researcher: small forwards on a kept connection, /health on fresh ones."""

    def __init__(self, server: Server, token: str | None) -> None:
        super().__init__(daemon=True, name=f"canary-{server.name}")
        self.server = server
        self.token = token
        self.events: list[tuple[float, float, str, str | None]] = []  # (start, seconds, kind, error)
        self.stopping = threading.Event()
        self.ids = ids()

    def run(self) -> None:
        remote = None
        fresh = httpx.Client(timeout=10, limits=httpx.Limits(max_keepalive_connections=0))  # a new connection a call
        while not self.stopping.is_set():
            start = time.monotonic()
            try:
                if remote is None:
                    remote = self.server.connect(self.token)
                remote.forward(self.ids, probes=[nt.probe(MUL, nt.Mean(dims=(0, 1)))], outputs=["logits"])
                self.events.append((start, time.monotonic() - start, "forward", None))
            except Exception as error:  # noqa: BLE001 - every failure is recorded
                self.events.append((start, time.monotonic() - start, "forward", f"{type(error).__name__}: {error}"))
                remote = None
            start = time.monotonic()
            try:
                response = fresh.get(self.server.url + "/health")
                error = None if response.status_code == 200 else f"HTTP {response.status_code}"
            except httpx.HTTPError as failure:
                error = f"{type(failure).__name__}: {failure}"
            self.events.append((start, time.monotonic() - start, "health", error))
            self.stopping.wait(0.1)
        fresh.close()

    def window(self, t0: float, t1: float) -> dict[str, Any]:
        seen = [e for e in self.events if e[0] + e[1] >= t0 and e[0] <= t1]
        worst = {k: max([e[1] for e in seen if e[2] == k] or [0.0]) for k in ("forward", "health")}
        failures = {k: [e[3] for e in seen if e[2] == k and e[3]] for k in ("forward", "health")}
        return {"worst": worst, "failures": failures, "count": len(seen)}


@dataclass
class Row:
    name: str
    server: str
    tally: Tally
    alive: bool
    hwm: tuple[int, int]
    canary: dict[str, Any]
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    seconds: float = 0.0

    def findings(self) -> list[str]:
        found = [f"{what}: {detail}" for what, ok, detail in self.checks if not ok]
        found += [f"unexpected 5xx: {text}" for text in self.tally.unexpected]
        if not self.alive:
            found.append("the server died")
        for kind, errors in self.canary["failures"].items():
            if errors:
                found.append(f"canary {kind} failed {len(errors)}x, e.g. {errors[0][:200]}")
        for kind, worst in self.canary["worst"].items():
            if worst > SLOW:
                found.append(f"canary {kind} took {worst:.1f} s (over {SLOW:g} s)")
        return found


class Bench:
    def __init__(self, servers: dict[str, Server], canaries: dict[str, Canary]) -> None:
        self.servers = servers
        self.canaries = canaries
        self.rows: list[Row] = []

    def attack(self, name: str, server: str, fn: Callable[[Server, Tally], list[tuple[str, bool, str]]]) -> None:
        target = self.servers[server]
        if not target.url:  # started in the background while other attacks ran
            target.wait()
            self.canaries[server] = Canary(target, TOKENS[1] if target.token else None)
            self.canaries[server].start()
            time.sleep(1.0)
        tally = Tally()
        before = target.status("VmHWM")
        t0 = time.monotonic()
        print(f"  {name} ...", end="", flush=True)
        try:
            checks = fn(target, tally)
        except Exception as error:  # noqa: BLE001 - a crash of the attack itself is reported, not hidden
            checks = [("the attack ran to its end", False, f"{type(error).__name__}: {error}")]
        seconds = time.monotonic() - t0
        time.sleep(0.4)  # one more canary round after the attack
        t1 = time.monotonic()
        row = Row(
            name,
            server,
            tally,
            target.alive(),
            (before, target.status("VmHWM")),
            self.canaries[server].window(t0, t1),
            checks,
            seconds,
        )
        print(f" {seconds:.1f} s{'' if not row.findings() else '  <- FINDING'}", flush=True)
        self.rows.append(row)

    def report(self) -> bool:
        head = ("attack", "srv", "sent", "2xx/4xx/5xx/none", "5xx unexp (by design)", "alive", "VmHWM MiB")
        head += ("canary worst fwd/health s", "canary fails", "checks failed")
        lines = [head]
        for r in self.rows:
            c = r.tally.classes
            classes = f"{c['2xx']}/{c['4xx']}/{c['5xx']}/{c['none']}"
            fails = sum(len(v) for v in r.canary["failures"].values())
            failed = sum(not ok for _, ok, _ in r.checks)
            lines.append(
                (
                    r.name,
                    r.server,
                    str(r.tally.sent),
                    classes,
                    f"{len(r.tally.unexpected)} ({r.tally.designed_5xx()})",
                    "yes" if r.alive else "NO",
                    f"{r.hwm[0] >> 20}->{r.hwm[1] >> 20}",
                    f"{r.canary['worst']['forward']:.2f}/{r.canary['worst']['health']:.2f}",
                    str(fails),
                    f"{failed}/{len(r.checks)}",
                )
            )
        widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
        for k, line in enumerate(lines):
            print(" | ".join(cell.ljust(w) for cell, w in zip(line, widths)))
            if k == 0:
                print("-+-".join("-" * w for w in widths))
        clean = True
        print()
        for r in self.rows:
            for what, _, detail in r.checks:
                if "(info)" in what:
                    print(f"NOTE [{r.name}] {what.replace('(info)', '').strip()}: {detail}")
        for r in self.rows:
            for finding in r.findings():
                clean = False
                print(f"FINDING [{r.name}] {finding}")
        zero = all(not r.tally.unexpected for r in self.rows)
        alive = all(r.alive for r in self.rows)
        served = all(
            not any(r.canary["failures"].values()) and max(r.canary["worst"].values()) <= SLOW for r in self.rows
        )
        print(
            f"\nevery row: 0 x unexpected 5xx: {zero}; server never killed: {alive}; "
            f"canary served throughout (no failure, none over {SLOW:g} s): {served}; every check passed: {clean}"
        )
        return clean


def expect(checks: list, what: str, ok: bool, detail: Any = "") -> None:
    checks.append((what, bool(ok), str(detail)[:400]))


def status_of(result: Any) -> Any:
    return result.status_code if isinstance(result, httpx.Response) else result


def code(result: Any) -> int:
    """The HTTP status of a result, 0 where no answer came."""
    return result.status_code if isinstance(result, httpx.Response) else 0


def brief(result: Any) -> str:
    if isinstance(result, httpx.Response) and result.status_code < 300:
        return f"{result.status_code} ({len(result.content)} bytes)"
    if isinstance(result, httpx.Response):
        try:
            return f"{result.status_code} {result.json().get('error')}: {result.json().get('message', '')[:160]}"
        except ValueError:
            return f"{result.status_code} {result.text[:160]!r}"
    return str(result)[:200]


# -- 1. code through generate arguments ---------------------------------------------------------------


def attack_code_arguments(server: Server, tally: Tally, workdir: str) -> list:
    checks: list = []
    folder = Path(workdir) / "hub-repo"
    (folder / "custom_generate").mkdir(parents=True, exist_ok=True)
    marker = Path(workdir) / "MARKER-code-ran"
    code = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    (folder / "custom_generate" / "generate.py").write_text(code + "def generate(model, *a, **k):\n    return None\n")
    (folder / "custom_generate" / "requirements.txt").write_text("")
    (folder / "config.json").write_text("{}")
    raw = Raw(server)
    tensors = {"ids": ids()}
    cases: dict[str, dict] = {
        "custom_generate folder + trust_remote_code": {"custom_generate": str(folder), "trust_remote_code": True},
        "custom_generate alone": {"custom_generate": str(folder)},
        "trust_remote_code alone": {"trust_remote_code": True},
        "streamer (str)": {"streamer": "transformers.TextStreamer"},
        "streamer (dict)": {"streamer": {"$dict": {"put": "os.system"}}},
        "logits_processor (list of str)": {"logits_processor": ["os.system"]},
        "stopping_criteria (patch object)": {"stopping_criteria": [patch("Record")]},
        "assistant_model (folder)": {"assistant_model": str(folder)},
        "assistant_model (tensor)": {"assistant_model": {"$tensor": "ids"}},
        "past_key_values (output map)": {"past_key_values": {"$output": {"key_cache": []}}},
        "past_key_values (tuple of tensors)": {"past_key_values": {"$tuple": [{"$tuple": [{"$tensor": "ids"}]}]}},
        "generation_config (dict)": {"generation_config": {"$dict": {"custom_generate": str(folder)}}},
        "prefix_allowed_tokens_fn": {"prefix_allowed_tokens_fn": "builtins.print"},
        "assistant_tokenizer": {"assistant_tokenizer": str(folder)},
        "tokenizer": {"tokenizer": str(folder)},
        "synced_gpus": {"synced_gpus": True},
        "cache_implementation offloaded": {"cache_implementation": "offloaded"},
        "penalty_alpha (contrastive search from the Hub)": {"penalty_alpha": 0.6, "top_k": 4},
        "dola_layers": {"dola_layers": "high"},
        "num_beam_groups": {"num_beam_groups": 2, "num_beams": 2, "diversity_penalty": 1.0},
        "force_words_ids": {"force_words_ids": [[5]]},
        "assistant_early_exit": {"assistant_early_exit": 1},
        "prompt_lookup_num_tokens": {"prompt_lookup_num_tokens": 3},
        "load_custom_generate": {"load_custom_generate": True},
    }
    for what, kwargs in cases.items():
        result = tally.send(what, lambda k=kwargs: raw.run(message(run_doc("generate", k), tensors)))
        expect(checks, f"generate {what} is refused with a 4xx", 400 <= (status_of(result) or 0) < 500, brief(result))
    for op in ("forward", "backward"):
        doc = run_doc(op, {"trust_remote_code": True, "custom_generate": str(folder)})
        if op == "backward":
            doc["loss"] = {"$loss": "CrossEntropy", "fields": {"targets": {"$tensor": "ids"}}}
        result = tally.send(op, lambda d=doc: raw.run(message(d, tensors)))
        expect(checks, f"{op} with trust_remote_code is refused", 400 <= (status_of(result) or 0) < 500, brief(result))
    doc = run_doc("generate")
    doc["args"] = [str(folder)]
    result = tally.send("positional str", lambda: raw.run(message(doc, tensors)))
    expect(checks, "a folder as a positional argument is refused", status_of(result) == 400, brief(result))
    doc = run_doc("generate", {"max_new_tokens": 2}, [probe_doc(MUL, {"$code": {"$tensor": "code"}})])
    pickled = torch.frombuffer(bytearray(b"cos\nsystem\n(S'true'\ntR."), dtype=torch.uint8)
    result = tally.send("pickled code", lambda: raw.run(message(doc, {**tensors, "code": pickled})))
    expect(
        checks,
        "a pickle (os.system) to a server without --allow-code is refused 403",
        status_of(result) == 403,
        brief(result),
    )
    time.sleep(0.3)
    expect(checks, "the marker file never appears", not marker.exists(), marker)
    raw.close()
    return checks


def attack_code_arguments_allowed(server: Server, tally: Tally, workdir: str) -> list:
    """On a server started with --allow-code, plain-data arguments outside the allow-list pass on, by design."""
    checks: list = []
    folder = Path(workdir) / "hub-repo-b"
    (folder / "custom_generate").mkdir(parents=True, exist_ok=True)
    marker = Path(workdir) / "MARKER-allow-code"
    code = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    (folder / "custom_generate" / "generate.py").write_text(code + "def generate(model, *a, **k):\n    return None\n")
    raw = Raw(server)
    doc = run_doc("generate", {"custom_generate": str(folder), "trust_remote_code": True, "max_new_tokens": 2})
    result = tally.send("custom_generate on --allow-code", lambda: raw.run(message(doc, {"ids": ids()})))
    expect(
        checks,
        "(info) custom_generate + trust_remote_code on an --allow-code server",
        True,
        f"{brief(result)}; the folder's code ran: {marker.exists()} (by design: its clients may run code anyway)",
    )
    raw.close()
    return checks


# -- 2. cost bounds -----------------------------------------------------------------------------------


def attack_costs(server: Server, tally: Tally, vocab: int, big_index: bool = True) -> list:
    checks: list = []
    raw = Raw(server)
    one = {"ids": ids(vocab=vocab)}

    def refused(what: str, body: bytes, statuses: tuple[int, ...] = (413,)) -> None:
        result = tally.send(what, lambda: raw.run(body))
        expect(
            checks, f"{what} is refused ({'/'.join(map(str, statuses))})", status_of(result) in statuses, brief(result)
        )

    refused(
        "num_return_sequences=10**6",
        message(run_doc("generate", {"do_sample": True, "num_return_sequences": 10**6, "max_new_tokens": 4}), one),
    )
    refused(
        "static cache, max_new_tokens=10**7",
        message(run_doc("generate", {"cache_implementation": "static", "max_new_tokens": 10**7}), one),
    )
    refused("static cache", message(run_doc("generate", {"cache_implementation": "static", "max_new_tokens": 4}), one))
    refused("paged cache", message(run_doc("generate", {"cache_implementation": "paged", "max_new_tokens": 4}), one))
    refused("max_length=2**31-1", message(run_doc("generate", {"max_length": 2**31 - 1}), one))
    refused("num_beams=2**31-1", message(run_doc("generate", {"num_beams": 2**31 - 1, "max_new_tokens": 2}), one))
    refused(
        "output_scores at max tokens",
        message(run_doc("generate", {"output_scores": True, "output_logits": True, "max_new_tokens": 10**6}), one),
    )
    rows, cols = torch.zeros(3000, 1, dtype=torch.long), torch.zeros(1, 3000, dtype=torch.long)
    refused(
        "Record(index=(zeros[3000,1], zeros[1,3000]))",
        message(
            run_doc(
                "forward",
                probes=[probe_doc(MUL, patch("Record", index={"$tuple": [{"$tensor": "r"}, {"$tensor": "c"}]}))],
            ),
            {**one, "r": rows, "c": cols},
        ),
    )
    refused(
        "Record(index=(..., [0]*200000)) list index",
        message(
            run_doc(
                "forward",
                probes=[probe_doc(MUL, patch("Record", index={"$tuple": [{"$ellipsis": None}, [0] * 200000]}))],
            ),
            one,
        ),
        (400, 413),
    )
    if big_index:
        huge = torch.zeros(20_000_000, dtype=torch.int32)
        refused(
            "Zero(index=int32[2e7]) (80 MB body)",
            message(
                run_doc("forward", probes=[probe_doc(MUL, patch("Zero", index={"$tensor": "i"}))]), {**one, "i": huge}
            ),
            (400, 413),
        )
        del huge
    result = tally.send(
        "TopK(k=10000) on the logits",
        lambda: raw.run(message(run_doc("forward", probes=[probe_doc("lm_head.output", patch("TopK", k=10000))]), one)),
    )
    expect(
        checks, "TopK(k=10000) on the logits is refused or bounded", status_of(result) in (200, 413, 422), brief(result)
    )
    raw.delete("/v1/recordings")
    refused(
        "Add(value=tensor[100000,1,1]) (broadcast growth)",
        message(
            run_doc("forward", probes=[probe_doc(MUL, patch("Add", value={"$tensor": "v"}))]),
            {**one, "v": torch.ones(100000, 1, 1)},
        ),
        (413, 422),
    )
    refused(
        "Replace(value=[1.0]*100000 list)",
        message(run_doc("forward", probes=[probe_doc(MUL, patch("Replace", value=[1.0] * 100000))]), one),
        (413, 422),
    )
    refused("input [1000, 64] ids", message(run_doc("forward"), {"ids": ids(1000, 64, vocab)}))
    refused("input [64, 1024] ids", message(run_doc("forward"), {"ids": ids(64, 1024, vocab)}))
    refused("input [1, 70000] ids", message(run_doc("forward"), {"ids": ids(1, 70000, vocab)}))
    refused(
        "inputs_embeds [2000,64,64]",
        message(
            {**run_doc("forward"), "args": [], "kwargs": {"$dict": {"inputs_embeds": {"$tensor": "e"}}}},
            {"e": torch.zeros(2000, 64, 64)},
        ),
    )
    big = (512, 64) if vocab <= 1024 else (2, 64)
    t = time.monotonic()
    result = tally.send(
        f"largest admitted forward {list(big)}", lambda: raw.run(message(run_doc("forward"), {"ids": ids(*big, vocab)}))
    )
    expect(
        checks,
        f"a forward of {list(big)} ids (at --max-request-tokens) is answered",
        status_of(result) in (200, 413),
        f"{brief(result)} in {time.monotonic() - t:.1f} s",
    )
    raw.close()
    return checks


# -- 3. recordings: non-tensor values, and filling --max-total-bytes ----------------------------------


def attack_recordings(server: Server, tally: Tally) -> list:
    checks: list = []
    raw = Raw(server)
    one = {"ids": ids()}
    for point in (
        "model.DynamicCache",
        "model.BaseModelOutputWithPast",
        'model.BaseModelOutputWithPast["past_key_values"]',
        "output",
        'output["past_key_values"]',
    ):
        for fn in (patch("Record"), patch("Mean"), patch("TopK", k=3)):
            result = tally.send(
                f"{fn['$patch']} at {point}",
                lambda p=point, f=fn: raw.run(message(run_doc("forward", {"use_cache": True}, [probe_doc(p, f)]), one)),
            )
            expect(
                checks,
                f"{fn['$patch']} at {point} (not a tensor) is refused 4xx",
                400 <= (status_of(result) or 0) < 500,
                brief(result),
            )
    r = raw.get("/v1/recordings")
    expect(
        checks,
        "nothing half-recorded stays after those",
        r.status_code == 200 and len(r.content) <= 8,
        f"{r.status_code} {len(r.content)} bytes",
    )
    # 120 rows x 64 positions x 128 features x 4 bytes = 3.75 MiB a session; 4 MiB each, 16 MiB in all
    rows = ids(120, 64)
    body = message(run_doc("forward", probes=[probe_doc(MUL, patch("Record"))]), {"ids": rows})
    attackers: list[Raw] = []
    statuses = []
    for _ in range(8):
        attacker = Raw(server)
        attackers.append(attacker)
        statuses.append(tally.add("fill", attacker.run(body)))
    expect(
        checks,
        "filling --max-total-bytes: later sessions get 413",
        statuses.count(413) >= 3 and 500 not in statuses,
        statuses,
    )
    victim = Raw(server, token=TOKENS[1])
    small = message(run_doc("forward", probes=[probe_doc(MUL, patch("Record"))]), {"ids": ids(48, 64)})
    result = tally.send("other token, 1.5 MiB", lambda: victim.run(small))
    expect(
        checks,
        "another token can still record 1.5 MiB while one token holds --max-total-bytes (no per-token share)",
        status_of(result) == 200,
        brief(result),
    )
    for attacker in attackers:
        attacker.close()
    time.sleep(0.2)
    result = tally.send("other token after", lambda: victim.run(small))
    expect(
        checks,
        "after the attacker closes its sessions, the other token records",
        status_of(result) == 200,
        brief(result),
    )
    victim.close()
    raw.close()
    return checks


# -- 4. sessions --------------------------------------------------------------------------------------


def attack_sessions(server: Server, tally: Tally) -> list:
    checks: list = []
    before = server.connect(TOKENS[0])
    http = httpx.Client(base_url=server.url, headers=server.headers(TOKENS[0]), timeout=30)
    t = time.monotonic()
    statuses: collections.Counter = collections.Counter()
    opened_ids: list[str] = []

    def open_many(n: int) -> None:
        with httpx.Client(base_url=server.url, headers=server.headers(TOKENS[0]), timeout=30) as mine:
            for _ in range(n):
                response = mine.post("/v1/sessions")
                statuses[tally.add("open", response)] += 1
                if response.status_code == 201:
                    opened_ids.append(response.json()["session"])

    threads = [threading.Thread(target=open_many, args=(275,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    opened = time.monotonic() - t
    expect(
        checks,
        "1,100 opens of one token: 201 up to its cap, then 429 (its sessions are in use)",
        set(statuses) <= {201, 429} and statuses[201] < 64,
        dict(statuses),
    )
    other = server.connect(TOKENS[1])
    try:
        other.forward(ids(), outputs=[])
        expect(checks, "the other token's new client works", True)
    except Exception as error:  # noqa: BLE001
        expect(checks, "the other token's new client works", False, error)
    tally.add("the other token's new client", 200)
    try:
        before.forward(ids(), outputs=[])
        expect(checks, "the token's first session is still open (the flood could not close it)", True)
    except Exception as error:  # noqa: BLE001
        expect(checks, "the token's first session is still open (the flood could not close it)", False, error)
    for sid in opened_ids:  # the flood's own sessions, so that later attacks of this token get in
        http.delete(f"/v1/sessions/{sid}")
    # another token's session cannot be closed or used
    sid = other._session
    result = tally.send("DELETE other token's session", lambda: http.delete(f"/v1/sessions/{sid}"))
    expect(checks, "DELETE of another token's session is 404", status_of(result) == 404, brief(result))
    result = tally.send("use other token's session", lambda: http.get("/v1/recordings", headers={SESSION_HEADER: sid}))
    expect(checks, "reading another token's session is 404", status_of(result) == 404, brief(result))
    result = tally.send("no token", lambda: httpx.post(server.url + "/v1/sessions", headers={PROTOCOL_HEADER: "1"}))
    expect(checks, "no token is 401", status_of(result) == 401, brief(result))
    result = tally.send(
        "token prefix", lambda: httpx.post(server.url + "/v1/sessions", headers=server.headers(TOKENS[0][:-1]))
    )
    expect(checks, "a token's prefix is 401", status_of(result) == 401, brief(result))
    try:
        other.forward(ids(), outputs=[])
        expect(checks, "the other token's session survives", True)
    except Exception as error:  # noqa: BLE001
        expect(checks, "the other token's session survives", False, error)
    expect(checks, f"opening took {opened:.1f} s (info)", True)
    for remote in (before, other):
        remote.close()
    http.close()
    return checks


# -- 5. large messages --------------------------------------------------------------------------------


def attack_large(server: Server, tally: Tally) -> list:
    checks: list = []
    raw = Raw(server)
    one = {"ids": ids()}

    def refused(what: str, body: bytes, statuses: tuple[int, ...] = (400, 413), headers: dict | None = None) -> None:
        result = tally.send(what, lambda: raw.run(body, headers))
        expect(
            checks, f"{what} is refused ({'/'.join(map(str, statuses))})", status_of(result) in statuses, brief(result)
        )

    doc = run_doc("forward", outputs=["x" * 64] * (2 << 20 >> 6))
    refused("2 MiB JSON document", message(doc, one))
    doc = run_doc("forward", outputs=["x" * 64] * ((1 << 20) // 67 - 10))
    refused("1 MiB JSON document of outputs", message(doc, one), (400, 422))
    metadata = {
        "__metadata__": {"neurotap": json.dumps(run_doc("forward"))},
        "pad": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]},
    }
    header = json.dumps(metadata).encode()
    header += b" " * (6 << 20)
    refused("6 MiB safetensors header", struct.pack("<Q", len(header)) + header)
    refused("header length 2**63", struct.pack("<Q", 2**63) + b"{}")
    refused("header length past the body", struct.pack("<Q", 100 << 20) + b"{}" * 100)
    refused("header not JSON", struct.pack("<Q", 4) + b"\xff\xfe\x00\x01")
    refused("7 bytes", b"1234567")
    refused("empty body", b"")
    refused(
        "tensor offsets out of range",
        struct.pack("<Q", 200)
        + json.dumps(
            {
                "__metadata__": {"neurotap": json.dumps(run_doc("forward"))},
                "ids": {"dtype": "I64", "shape": [1000000], "data_offsets": [0, 8000000]},
            }
        )
        .encode()
        .ljust(200),
    )
    refused("64 MiB input tensor", message(run_doc("forward"), {"ids": torch.zeros(1, 8 << 20, dtype=torch.long)}))
    over = b"\0" * ((128 << 20) + 1)
    refused("body over --max-request-bytes", over, (413,))
    refused(
        "chunked body over --max-request-bytes",
        iter([over[i : i + (1 << 20)] for i in range(0, len(over), 1 << 20)]),
        (413,),
    )  # type: ignore[arg-type]
    del over
    raw.close()
    return checks


# -- 6. slow clients and connections ------------------------------------------------------------------


def _socket(server: Server, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", server.port))
    sock.setblocking(False)
    return sock


def _closed_or_answered(sock: socket.socket) -> str:
    """'open', 'closed' or the status line the server sent."""
    try:
        data = sock.recv(4096, socket.MSG_PEEK)
    except BlockingIOError:
        return "open"
    except OSError:
        return "closed"
    if not data:
        return "closed"
    return data.split(b"\r\n", 1)[0].decode("latin-1")


def _still_open(sock: socket.socket, budget: int = 1 << 16) -> str:
    """Read what is waiting (at most ``budget`` bytes): 'open' if the server keeps the connection, else 'closed'."""
    seen = 0
    while seen < budget:
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return "open"
        except OSError:
            return "closed"
        if not data:
            return "closed"
        seen += len(data)
    return "open"  # still more to come


def _fresh_health(server: Server, tally: Tally | None = None) -> int:
    try:
        status = httpx.get(server.url + "/health", timeout=5).status_code
    except httpx.HTTPError:
        status = 0
    if tally is not None:
        tally.add("fresh /health", status, (503,))
    return status


def attack_parallel_bodies(server: Server, tally: Tally, count: int, size: int) -> list:
    """Many large bodies arriving at once: what the server holds before any is decoded."""
    checks: list = []
    raw = Raw(server)
    body = os.urandom(1 << 20) * (size >> 20)
    head = (
        f"POST /v1/run HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nX-Neurotap-Protocol: 1\r\n"
        f"Authorization: Bearer {server.token}\r\n{SESSION_HEADER}: {raw.session}\r\n"
        f"Content-Type: {MEDIA_TYPE}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    rss0 = server.status("VmRSS")
    hwm0 = server.status("VmHWM")
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(count)]
    view = memoryview(body)

    def upload(sock: socket.socket) -> None:
        try:
            sock.sendall(head)
            sock.sendall(view[:-1])
        except OSError:
            pass

    threads = [threading.Thread(target=upload, args=(sock,)) for sock in socks]
    t = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    uploaded = time.monotonic() - t
    time.sleep(0.3)
    rss1 = server.status("VmRSS")
    answers: collections.Counter = collections.Counter()
    for sock in socks:
        try:
            sock.sendall(view[-1:])
            line = sock.recv(200).split(b"\r\n", 1)[0].decode("latin-1")
        except OSError as error:
            line = type(error).__name__
        answers[line[9:12] if line.startswith("HTTP/") else line] += 1
        tally.add("parallel body", int(line[9:12]) if line.startswith("HTTP/") else 0)
        sock.close()
    held = max(rss1, server.status("VmHWM")) - max(rss0, hwm0)
    expect(
        checks,
        f"{count} bodies of {size >> 20} MiB at once: the server holds well under {count} x the body size",
        held < count * size // 2,
        f"RSS {rss0 >> 20} -> {rss1 >> 20} MiB (peak +{held >> 20} MiB) with {count} x {size >> 20} MiB bodies "
        "in flight "
        f"(uploaded in {uploaded:.1f} s); answers {dict(answers)}; nothing bounds the bodies in flight together "
        f"(default: --max-connections 256 x --max-request-bytes 256 MiB = 64 GiB)",
    )
    raw.close()
    return checks


def attack_slowloris(server: Server, tally: Tally) -> list:
    checks: list = []
    partial = f"POST /v1/run HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nX-Neurotap-Protocol: 1\r\nX-Pad: ".encode()
    socks = []
    for _ in range(300):
        try:
            socks.append(_socket(server))
        except OSError:
            tally.add("connect", None)
    t0 = time.monotonic()
    cursor = 0
    while time.monotonic() - t0 < 3.5:  # a byte a second from each
        for sock in socks:
            try:
                sock.send(partial[cursor : cursor + 1] or b"a")
            except OSError:
                pass
        cursor += 1
        time.sleep(1.0)
    states = collections.Counter(
        _closed_or_answered(s).split(" ", 2)[1] if " " in _closed_or_answered(s) else _closed_or_answered(s)
        for s in socks
    )
    for sock in socks:
        tally.add("slowloris socket", 503 if "503" in _closed_or_answered(sock) else 0, (503,))
        sock.close()
    expect(
        checks,
        "300 byte-a-second header senders: none still open after 3.5 s (header timeout 2 s; over 200 get 503)",
        states.get("open", 0) == 0,
        dict(states),
    )

    # 100 bodies sent a byte every 2 s
    raw = Raw(server)
    body = request("forward", (ids(),), outputs=[])
    head = (
        f"POST /v1/run HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nX-Neurotap-Protocol: 1\r\n"
        f"Authorization: Bearer {server.token}\r\n{SESSION_HEADER}: {raw.session}\r\n"
        f"Content-Type: {MEDIA_TYPE}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    socks = [_socket(server) for _ in range(100)]
    for sock in socks:
        sock.send(head)
    t0 = time.monotonic()
    sent = 0
    while time.monotonic() - t0 < 4.0:
        for sock in socks:
            try:
                sock.send(body[sent : sent + 1])
            except OSError:
                pass
        sent += 1
        time.sleep(2.0)
    answers = collections.Counter()
    for sock in socks:
        state = _closed_or_answered(sock)
        answers[state.split(" ")[1] if state.startswith("HTTP/") else state] += 1
        tally.add("slow body", int(state.split(" ")[1]) if state.startswith("HTTP/") else 0)
        sock.close()
    expect(
        checks,
        "100 bodies at a byte per 2 s are answered 408 (body timeout 3 s)",
        answers.get("408", 0) == 100,
        dict(answers),
    )

    # past --max-connections
    socks = [_socket(server) for _ in range(250)]
    time.sleep(0.3)
    states = collections.Counter()
    for sock in socks:
        state = _closed_or_answered(sock)
        states["503" if "503" in state else state] += 1
    refused_now = _fresh_health(server, tally)
    for sock in socks:
        sock.close()
    time.sleep(0.5)
    after = _fresh_health(server, tally)
    expect(
        checks,
        "250 idle connections past the cap of 200: the oldest idle ones make way, a fresh client gets in",
        states.get("503", 0) == 0 and refused_now == 200 and after == 200,
        f"{dict(states)}; during {refused_now}, after {after}",
    )
    raw.close()
    return checks


def attack_slow_reader(server: Server, tally: Tally, count: int, path: str | None = None) -> list:
    """Clients that ask for a large answer and never read it: are they ever dropped, and what do they hold?"""
    checks: list = []
    raw = Raw(server)
    if path is None:
        body = message(run_doc("forward", probes=[probe_doc(MUL, patch("Record"))]), {"ids": ids(120, 64)})
        tally.add("record 3.75 MiB", raw.run(body))
        path = "/v1/recordings"
    rss0 = server.status("VmRSS")
    head = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nX-Neurotap-Protocol: 1\r\n"
        f"Authorization: Bearer {server.token}\r\n{SESSION_HEADER}: {raw.session}\r\n\r\n"
    ).encode()
    socks = []
    for _ in range(count):
        sock = _socket(server, rcvbuf=4096)
        sock.send(head)
        socks.append(sock)
    control = _socket(server, rcvbuf=4096)  # a small answer: the server closes this one after --header-timeout
    control.send(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n".encode())
    time.sleep(3.0)
    raw.delete("/v1/recordings")  # the session's recordings are gone; the answers being written are not
    # 8 s in all: past --header-timeout (2 s), uvicorn's keep-alive timeout (5 s) and the time a client has to take
    # a 3.75 MiB answer (--body-timeout, 3 s, and a second per MiB)
    time.sleep(5.0)
    rss1 = server.status("VmRSS")
    states = collections.Counter(_still_open(s) for s in socks)
    control_state = _still_open(control)
    control.close()
    probes = [_fresh_health(server, tally) for _ in range(3)]
    for sock in socks:
        tally.add("slow reader", 200)
        sock.close()
    time.sleep(1.0)
    rss2 = server.status("VmRSS")
    expect(
        checks,
        f"{count} clients that never read a {path} answer are dropped within 8 s",
        states.get("open", 0) == 0,
        f"{dict(states)} still connected after 8 s; server RSS {rss0 >> 20} -> {rss1 >> 20} MiB while held "
        f"(+{(rss1 - rss0) / max(count, 1) / 2**20:.1f} MiB a connection), {rss2 >> 20} MiB after they left; "
        f"fresh /health meanwhile {probes}",
    )
    expect(checks, "fresh connections are still served while they are held", all(p == 200 for p in probes), probes)
    expect(
        checks,
        "(control) a client that read its small answer is closed after 8 s",
        control_state == "closed",
        control_state,
    )
    raw.close()
    return checks


# -- 7. a long pass -----------------------------------------------------------------------------------


def _sleeper(seconds: float) -> Callable[..., None]:
    def sleep_at_layer_0(ctx: Any, value: Any) -> None:
        import time as _time

        _time.sleep(seconds)

    return sleep_at_layer_0


def attack_long_pass(server: Server, tally: Tally, sleep: float, queued_op: str = "forward") -> list:
    checks: list = []
    long_client = Raw(server)
    body = request("forward", (ids(),), [(MUL, _sleeper(sleep))], outputs=[])
    results: dict[str, Any] = {}

    def send_long() -> None:
        results["long"] = tally.send("long", lambda: long_client.run(body), (504,))

    queued = [Raw(server) for _ in range(6)]
    if queued_op == "generate":  # of different lengths, so that they cannot share one pass
        smalls = [request("generate", (ids(1, 5 + k),), max_new_tokens=2) for k in range(len(queued))]
    else:
        smalls = [request("forward", (ids(),), outputs=[])] * len(queued)
    thread = threading.Thread(target=send_long)
    thread.start()
    time.sleep(0.3)
    threads = []
    for k, client in enumerate(queued):

        def send(k: int = k, client: Raw = client) -> None:
            t = time.monotonic()
            result = tally.send(f"queued {k}", lambda: client.run(smalls[k]), (504,))
            results[k] = (result, time.monotonic() - t)

        threads.append(threading.Thread(target=send))
        threads[-1].start()
        time.sleep(0.25)
    for t in [thread, *threads]:
        t.join(60)
    served = sum(status_of(results[k][0]) == 200 for k in range(len(queued)))
    expect(
        checks,
        f"the {sleep:g} s probe is cut off with 504",
        status_of(results.get("long")) == 504,
        brief(results.get("long")),
    )
    expect(
        checks,
        f"{queued_op} requests queued behind a {sleep:g} s probe (--request-timeout 2) are served",
        served == len(queued),
        f"{served}/{len(queued)} served: "
        + ", ".join(f"{status_of(results[k][0])} after {results[k][1]:.1f} s" for k in range(len(queued))),
    )
    for client in [long_client, *queued]:
        client.close()
    return checks


# -- 8. host and origin -------------------------------------------------------------------------------


def attack_host_origin(server: Server, tally: Tally) -> list:
    checks: list = []
    base = server.headers()
    http = httpx.Client(timeout=10)
    cases = {
        "Host: evil.example": {"Host": "evil.example"},
        "Host: evil.example:port": {"Host": f"evil.example:{server.port}"},
        "Host: 127.0.0.1.evil.example": {"Host": "127.0.0.1.evil.example"},
        "Host: localhost.": {"Host": "localhost."},
        "Host: [::1]evil": {"Host": "[::1]evil.example"},
        "Origin: http://evil.example": {"Origin": "http://evil.example"},
        "Origin: null": {"Origin": "null"},
        "Origin: http://127.0.0.1 (other port)": {"Origin": "http://127.0.0.1:1"},
        "Origin: http://localhost:port": {"Origin": f"http://localhost:{server.port}"},
    }
    for what, extra in cases.items():
        for method, path in (("POST", "/v1/sessions"), ("GET", "/health"), ("GET", "/v1/info"), ("OPTIONS", "/v1/run")):
            result = tally.send(
                what, lambda m=method, p=path, e=extra: http.request(m, server.url + p, headers={**base, **e})
            )
            ok = status_of(result) == 403
            try:
                ok = ok and result.json()["error"] == "OriginError"
            except (ValueError, AttributeError, KeyError):
                ok = False
            expect(checks, f"{what} {method} {path} is refused 403 JSON", ok, brief(result))
    # a request without any Host header (HTTP/1.0)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(b"GET /health HTTP/1.0\r\n\r\n")
    answer = sock.recv(200).split(b"\r\n", 1)[0]
    sock.close()
    tally.add("no Host", int(answer.split()[1]) if answer.startswith(b"HTTP/") else 0)
    expect(checks, "no Host header is refused 403", b" 403 " in answer + b" ", answer)
    ok = tally.send("own host", lambda: http.get(server.url + "/health", headers={"Origin": server.url}))
    expect(checks, "the server's own origin is served", status_of(ok) == 200, brief(ok))
    http.close()
    return checks


# -- 9. other things ----------------------------------------------------------------------------------


def attack_encodings(server: Server, tally: Tally) -> list:
    checks: list = []
    raw = Raw(server)
    one = {"ids": ids()}

    def refused(what: str, body: Any, headers: dict | None = None, statuses: tuple[int, ...] = (400, 413)) -> None:
        result = tally.send(what, lambda: raw.run(body, headers))
        expect(
            checks, f"{what} is refused ({'/'.join(map(str, statuses))})", status_of(result) in statuses, brief(result)
        )

    compressor = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = b"\0" * (16 << 20)
    bomb = b"".join(compressor.compress(block) for _ in range(32)) + compressor.flush()  # 512 MiB of zeros
    refused(f"gzip bomb ({len(bomb) >> 10} KiB -> 512 MiB)", bomb, {"Content-Encoding": "gzip"}, (413,))
    refused(
        "gzip bomb, chunked",
        iter([bomb[i : i + 65536] for i in range(0, len(bomb), 65536)]),
        {"Content-Encoding": "gzip"},
        (413,),
    )
    refused(
        "gzip, twice", gzip.compress(gzip.compress(request("forward", (ids(),)))), {"Content-Encoding": "gzip"}, (400,)
    )
    refused("gzip, corrupt", b"\x1f\x8b\x08\x00" + b"\xff" * 1000, {"Content-Encoding": "gzip"}, (400,))
    refused("gzip, truncated", gzip.compress(request("forward", (ids(),)))[:-20], {"Content-Encoding": "gzip"}, (400,))
    refused("Content-Encoding: br", b"x", {"Content-Encoding": "br"}, (415,))
    refused("Content-Encoding: gzip, gzip", bomb, {"Content-Encoding": "gzip, gzip"}, (415,))
    refused("deflate", zlib.compress(b"x" * 1000), {"Content-Encoding": "deflate"}, (415,))
    del bomb, block
    refused(
        "JSON list nested 900 deep", message({**run_doc("forward"), "args": [json.loads("[" * 900 + "]" * 900)]}, one)
    )
    text = '{"op":"forward","args":' + "[" * 300000 + "]" * 300000 + "}"
    from safetensors.torch import save

    refused("JSON nested 300000 deep (raw)", save(one, metadata={"neurotap": text}))
    nested: Any = {"$tensor": "ids"}
    for _ in range(60):
        nested = {"$tuple": [nested]}
    refused("$tuple nested 60 deep", message({**run_doc("forward"), "args": [nested]}, one))
    refused("int 2**64", message(run_doc("forward", probes=[probe_doc(MUL, patch("Zero", index=2**64))]), one))
    refused("int of 5000 digits", save(one, metadata={"neurotap": '{"op":"forward","args":[' + "9" * 5000 + "]}"}))
    refused("unknown fields", message({**run_doc("forward"), "extra": 1}, one))
    refused("op = list", message({**run_doc("forward"), "op": ["forward"]}, one))
    refused("probes = dict", message({**run_doc("forward"), "probes": {"a": 1}}, one))
    refused("tensor name not in message", message({**run_doc("forward"), "args": [{"$tensor": "nope"}]}, one))
    refused("tensor name not a string", message({**run_doc("forward"), "args": [{"$tensor": ["ids"]}]}, one))
    # framing that could smuggle a second request past the checks
    auth = f"Authorization: Bearer {server.token}\r\n{SESSION_HEADER}: {raw.session}\r\nX-Neurotap-Protocol: 1\r\n"
    smuggled = {
        "Content-Length and Transfer-Encoding": "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "two Content-Lengths": "Content-Length: 4\r\nContent-Length: 40\r\n\r\nabcd",
        "negative Content-Length": "Content-Length: -1\r\n\r\n",
        "Content-Length 2**70": f"Content-Length: {2**70}\r\n\r\n",
    }
    for what, rest in smuggled.items():
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.sendall(f"POST /v1/run HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n{auth}{rest}".encode())
        try:
            line = sock.recv(200).split(b"\r\n", 1)[0].decode("latin-1")
        except OSError as error:
            line = type(error).__name__
        sock.close()
        status = int(line[9:12]) if line.startswith("HTTP/") else 0
        tally.add(what, status)
        expect(checks, f"{what} is refused (400/413)", status in (400, 413), line)
    raw.close()
    return checks


def attack_values(server: Server, tally: Tally, vocab: int) -> list:
    checks: list = []
    raw = Raw(server)
    one = {"ids": ids(vocab=vocab)}
    answered = (200, 400, 404, 413, 422)

    def answered_4xx(what: str, body: bytes, statuses: tuple[int, ...] = answered) -> Any:
        result = tally.send(what, lambda: raw.run(body))
        expect(checks, f"{what}: a 2xx/4xx answer", status_of(result) in statuses, brief(result))
        return result

    ellipsis = {"$ellipsis": None}
    for index in (
        -(2**63),
        2**63 - 1,
        {"$tuple": [0, 2**62]},
        {"$slice": [0, 2**63 - 1, 2**63 - 1]},
        {"$slice": [None, None, 0]},
        {"$slice": [None, None, -1]},
        {"$tuple": [ellipsis, ellipsis]},
        {"$tuple": [None] * 40},
        [],
        [[]],
        {"$tuple": [[0, 1], [[0]]]},
        True,
    ):
        for name in ("Zero", "Record", "Mean", "Scale", "TopK"):
            fields: dict[str, Any] = {"index": index}
            if name == "Scale":
                fields["factor"] = 2.0
            answered_4xx(
                f"{name}(index={json.dumps(index)[:40]})",
                message(run_doc("forward", probes=[probe_doc(MUL, patch(name, **fields))]), one),
            )
    raw.delete("/v1/recordings")
    for fields in ({"k": 2**62}, {"k": 0}, {"k": -1}, {"k": 5, "dim": 2**62}, {"k": 5, "dim": -(2**63)}):
        answered_4xx(
            f"TopK({fields})", message(run_doc("forward", probes=[probe_doc(MUL, patch("TopK", **fields))]), one)
        )
    for fields in (
        {"dims": [2**62]},
        {"dims": [-(2**63)]},
        {"dims": [0, 0, 0]},
        {"dims": []},
        {"dims": [True]},
        {"p": {"$float": "nan"}},
        {"p": 1e308},
        {"p": -1},
        {"p": {"$tensor": "ids"}},
    ):
        answered_4xx(
            f"Norm({fields})", message(run_doc("forward", probes=[probe_doc(MUL, patch("Norm", **fields))]), one)
        )
    for fields in ({"direction": {"$tensor": "d"}}, {"direction": [1.0] * 127}, {"direction": []}):
        answered_4xx(
            f"Project({str(fields)[:30]})",
            message(
                run_doc("forward", probes=[probe_doc(MUL, patch("Project", **fields))]),
                {**one, "d": torch.ones(3, 5, 128)},
            ),
        )
    raw.delete("/v1/recordings")
    for value in (
        {"$float": "nan"},
        {"$float": "inf"},
        1e308,
        [[[[1.0]]]],
        {"$tensor": "c"},
        {"$tensor": "b"},
        {"$tensor": "i8"},
    ):
        answered_4xx(
            f"Add(value={json.dumps(value)[:30]})",
            message(
                run_doc("forward", probes=[probe_doc(MUL, patch("Add", value=value))]),
                {
                    **one,
                    "c": torch.zeros(2, dtype=torch.complex64),
                    "b": torch.ones(1, dtype=torch.bool),
                    "i8": torch.ones(1, dtype=torch.int8),
                },
            ),
        )
    # inputs: shapes, dtypes and token ids the model cannot take
    weird = {
        "ids out of range (vocab)": torch.full((1, 7), vocab + 5),
        "ids negative": torch.full((1, 7), -3),
        "ids 2**62": torch.full((1, 7), 2**62),
        "ids uint8": torch.ones(1, 7, dtype=torch.uint8),
        "ids int8": torch.ones(1, 7, dtype=torch.int8),
        "ids 0-d": torch.tensor(5),
        "ids [0]": torch.zeros(0, dtype=torch.long),
        "ids [1, 0]": torch.zeros(1, 0, dtype=torch.long),
        "ids [0, 7]": torch.zeros(0, 7, dtype=torch.long),
        "ids [1, 2, 3]": torch.ones(1, 2, 3, dtype=torch.long),
        "ids [2, 3, 4, 5]": torch.ones(2, 3, 4, 5, dtype=torch.long),
    }
    for what, tensor in weird.items():
        for op in ("forward", "generate", "backward"):
            doc = run_doc(op, {"max_new_tokens": 2} if op == "generate" else {})
            if op == "backward":
                doc["loss"] = {"$loss": "CrossEntropy", "fields": {"targets": {"$tensor": "ids"}}}
            answered_4xx(f"{op} {what}", message(doc, {"ids": tensor}))
    kwargs_cases = {
        "position_ids 2**62": {"position_ids": {"$tensor": "p"}},
        "attention_mask float nan": {"attention_mask": {"$tensor": "m"}},
        "attention_mask wrong shape": {"attention_mask": {"$tensor": "w"}},
        "labels out of range": {"labels": {"$tensor": "l"}},
        "logits_to_keep 2**31-1": {"logits_to_keep": 2**31 - 1},
        "token_type_ids": {"token_type_ids": {"$tensor": "ids"}},
    }
    extra = {
        "p": torch.full((1, 7), 2**62),
        "m": torch.full((1, 7), float("nan")),
        "w": torch.ones(3, 9),
        "l": torch.full((1, 7), 10**9),
    }
    for what, kwargs in kwargs_cases.items():
        answered_4xx(f"forward {what}", message(run_doc("forward", kwargs), {**one, **extra}))
    gen_cases = {
        "temperature 1e-300 sampling": {"do_sample": True, "temperature": 1e-300},
        "temperature 0 sampling": {"do_sample": True, "temperature": 0},
        "top_p -1": {"do_sample": True, "top_p": -1.0},
        "top_k 2**31-1": {"do_sample": True, "top_k": 2**31 - 1},
        "repetition_penalty 1e308": {"repetition_penalty": 1e308},
        "repetition_penalty 0": {"repetition_penalty": 0},
        "eos_token_id 2**31-1": {"eos_token_id": [2**31 - 1]},
        "suppress_tokens 2**31-1": {"suppress_tokens": [2**31 - 1]},
        "pad_token_id 2**31-1, beams": {"pad_token_id": 2**31 - 1, "num_beams": 2, "eos_token_id": [5]},
        "min_new_tokens > max": {"min_new_tokens": 2**31 - 1},
        "no_repeat_ngram_size 2**31-1": {"no_repeat_ngram_size": 2**31 - 1},
        "max_new_tokens 0": {"max_new_tokens": 0},
        "epsilon_cutoff 1": {"do_sample": True, "epsilon_cutoff": 1.0},
        "length_penalty -1e308 beams": {"num_beams": 4, "length_penalty": -1e308},
    }
    for what, kwargs in gen_cases.items():
        kwargs = {"max_new_tokens": 3, **kwargs}
        answered_4xx(f"generate {what}", message(run_doc("generate", kwargs), one))
    # point names
    names = [
        MUL + "\u0000",
        "\ud800",
        "модель.layers.0",
        "model.layers.0.mlp.mul" + "[0]" * 20000,
        "model.rotary_emb.output" + '["' + "x" * 100000 + '"]',
        "model.rotary_emb.output[" + "9" * 5000 + "]",
        "x" * 200000,
        "",
        "[0]",
        "model.layers.-1.mlp.mul",
        "model.layers.99999999999999999999.mlp.mul",
    ]
    for name in names:
        answered_4xx(
            f"point {name[:30]!r}", message(run_doc("forward", probes=[probe_doc(name, patch("Record"))]), one)
        )
    answered_4xx(
        "Record key '\\ud800'",
        message(
            run_doc("forward", probes=[probe_doc(MUL, patch("Record", key="\ud800", index={"$tuple": [0, 0]}))]), one
        ),
    )
    r = raw.get("/v1/recordings")
    expect(checks, "recordings with an odd key stream", r.status_code == 200, r.status_code)
    raw.delete("/v1/recordings")
    answered_4xx(
        "outputs: 150000 names", message(run_doc("forward", outputs=["logits"] * 75000 + ["nope"] * 75000), one)
    )
    answered_4xx("outputs: surrogate", message(run_doc("forward", outputs=["\udfff"]), one))
    for path in (
        "/v1/parameters/\udcff",
        "/v1/parameters/%ED%A0%80",
        "/v1/parameters/" + "a." * 5000,
        "/v1/parameters/",
        "/v1/parameters/model.layers.0",
        "/v1/parameters/model.rotary_emb.inv_freq",
        "/v1/parameters/__class__",
        "/v1/points?prefix=%ED%A0%80",
        "/v1/points?prefix=" + "x" * 60000,
        "/v1/recordings?" + "&".join(f"point={k}" for k in range(3000)),
    ):
        try:
            result = tally.send(f"GET {path[:40]}", lambda p=path: raw.get(p))
        except Exception as error:  # noqa: BLE001 - httpx refuses some paths itself
            result = f"not sent: {type(error).__name__}"
            continue
        expect(
            checks,
            f"GET {path[:40]}: a 2xx/4xx answer",
            isinstance(status_of(result), int) and status_of(result) < 500,
            brief(result),
        )
    raw.close()
    return checks


def attack_many_probes(server: Server, tally: Tally, count: int) -> list:
    """Many small reductions at one point, each with its own key: ~100 bytes of document a probe."""
    checks: list = []
    raw = Raw(server)
    probes = [probe_doc(MUL, patch("Mean", key=f"k{k}")) for k in range(count)]
    body = message(run_doc("forward", probes=probes), {"ids": ids()})
    t = time.monotonic()
    result = tally.send(f"{count} Mean probes", lambda: raw.run(body), (504,))
    seconds = time.monotonic() - t
    expect(
        checks,
        f"{count} Mean probes at one point ({len(body) >> 10} KiB) hold the model thread under {SLOW:g} s",
        seconds < SLOW,
        f"{brief(result)[:60]} after {seconds:.1f} s; the time grows with the square of the probes, and a "
        f"1 MiB document holds ~{(1 << 20) * count // len(body)} of them",
    )
    raw.delete("/v1/recordings")
    count += 10  # still within --max-probes (512)
    probes = [probe_doc(MUL, patch("Record", key=f"k{k}", index={"$tuple": [0, 0, 0]})) for k in range(count)]
    result = tally.send(
        f"{count} Record probes", lambda: raw.run(message(run_doc("forward", probes=probes), {"ids": ids()}))
    )
    expect(
        checks,
        f"{count} Records of a 4-byte value ({count * 12 // 1000} KB recorded) fit --max-session-bytes (4 MiB)",
        status_of(result) == 200,
        brief(result),
    )
    raw.close()
    return checks


def attack_races(server: Server, tally: Tally) -> list:
    checks: list = []
    raw = Raw(server)
    body = message(run_doc("forward", probes=[probe_doc(MUL, patch("Record"))]), {"ids": ids(8, 32)})
    stop = time.monotonic() + 2.5
    clearer = httpx.Client(base_url=server.url, headers=server.headers(session=raw.session), timeout=30)

    def clear() -> None:
        while time.monotonic() < stop:
            tally.send("clear", lambda: clearer.delete("/v1/recordings"))
            tally.send("read", lambda: clearer.get("/v1/recordings"))

    def run() -> None:
        while time.monotonic() < stop:
            tally.send("run", lambda: raw.run(body))

    threads = [threading.Thread(target=clear), threading.Thread(target=run), threading.Thread(target=run)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    expect(checks, "runs, clears and reads of one session at once: no 5xx", not tally.unexpected, tally.statuses)
    # a session closed while its request's body is still arriving
    orphans = []
    rows = ids(120, 64)
    body = message(run_doc("forward", probes=[probe_doc(MUL, patch("Record"))]), {"ids": rows})
    for _ in range(4):
        sid = raw.open()
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        head = (
            f"POST /v1/run HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nX-Neurotap-Protocol: 1\r\n"
            f"Authorization: Bearer {server.token}\r\n{SESSION_HEADER}: {sid}\r\n"
            f"Content-Type: {MEDIA_TYPE}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        sock.sendall(head + body[:1000])
        time.sleep(0.3)
        closed = tally.send("close session mid-body", lambda s=sid: raw.http.delete(f"/v1/sessions/{s}"))
        sock.sendall(body[1000:])
        answer = sock.recv(200).split(b"\r\n", 1)[0].decode("latin-1")
        sock.close()
        tally.add("run of a closed session", int(answer.split()[1]) if answer.startswith("HTTP/") else 0)
        orphans.append(f"{status_of(closed)}/{answer[9:12]}")
    expect(
        checks,
        "a run whose session was closed while its body arrived is not run (404)",
        all(o.endswith("/404") for o in orphans),
        f"DELETE/run statuses: {orphans}",
    )
    victim = Raw(server, token=TOKENS[1])
    result = tally.send("victim records 3.75 MiB", lambda: victim.run(body))
    expect(
        checks,
        "afterwards, with no session holding recordings, a new session may record 3.75 MiB (<= --max-total-bytes)",
        status_of(result) == 200,
        brief(result),
    )
    victim.close()
    clearer.close()
    raw.close()
    return checks


def attack_gzip_answers(server: Server, tally: Tally) -> list:
    """Answers compressed because the client asks: what a few requests cost the server's CPU."""
    checks: list = []
    raw = Raw(server)
    name = "model.embed_tokens.weight"
    results: list = []

    def fetch() -> None:
        t = time.monotonic()
        result = tally.send(
            "gzip parameter", lambda: raw.get(f"/v1/parameters/{name}", headers={"Accept-Encoding": "gzip"})
        )
        results.append((status_of(result), time.monotonic() - t, len(getattr(result, "content", b""))))

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    expect(
        checks,
        f"3 requests for {name} with Accept-Encoding: gzip answer within {SLOW:g} s",
        len(results) == 3 and all(seconds < SLOW for _, seconds, _ in results),
        ", ".join(f"{status} in {seconds:.1f} s ({size >> 20} MiB)" for status, seconds, size in results)
        + " (starlette GZipMiddleware compresses at level 9)",
    )
    raw.close()
    return checks


def attack_web_routes(server: Server, tally: Tally) -> list:
    """The inspector's routes: POST /v1/tokenize with hostile JSON, GET / and its files."""
    checks: list = []
    raw = Raw(server)
    fresh = httpx.Client(  # a connection a request: one answer's fate does not decide the next one's
        base_url=server.url, headers=server.headers(), timeout=60, limits=httpx.Limits(max_keepalive_connections=0)
    )
    bodies = {
        "JSON nested 30000 deep": b"[" * 30000 + b"]" * 30000,
        "JSON object nested 10000 deep": b'{"a":' * 10000 + b"1" + b"}" * 10000,
        "lone surrogate text": b'{"text": "\\ud800\\udfff x \\udc80"}',
        "8000 combining marks": json.dumps({"text": "a" + "\u0301" * 7999}).encode(),
        "8000 emoji ZWJ": json.dumps({"text": "\U0001f469\u200d" * 4000}).encode(),
        "text = list": b'{"text": ["a"]}',
        "int of 5000 digits": b'{"text": "a", "n": ' + b"9" * 5000 + b"}",
        "not UTF-8": b'{"text": "\xff\xfe"}',
        "NaN": b'{"text": NaN}',
        "64 KiB + 1": b'{"text": "' + b"a" * (64 << 10) + b'"}',
    }
    for what, body in bodies.items():
        result = tally.send(
            f"tokenize {what}",
            lambda b=body: fresh.post("/v1/tokenize", content=b, headers={"Content-Type": "application/json"}),
        )
        expect(checks, f"POST /v1/tokenize {what}: a 2xx/4xx answer", 0 < code(result) < 500, brief(result))
    for path in ("/", "/static/app.js", "/static/..%2f..%2fserver.py", "/static/%2e%2e", "/v1/tokenizer"):
        result = tally.send(f"GET {path}", lambda p=path: raw.get(p))
        expect(checks, f"GET {path}: a 2xx/4xx answer", 0 < code(result) < 500, brief(result))
    fresh.close()
    raw.close()
    return checks


def attack_patterns(server: Server, tally: Tally) -> list:
    """Point patterns whose matching could take the model's thread: huge ranges, many ``*``, endless digits."""
    checks: list = []
    raw = Raw(server)
    one = {"ids": ids()}
    cases = {
        "6 ranges {0..65536}": "model.layers." + ".".join(["{0..65536}"] * 6) + ".mlp.mul",
        "30 stars then a miss": "model.layers.*.mlp." + "*" * 30 + "Q",
        "12 x '*u' then a miss": "model.layers.*.mlp." + "*u" * 12 + "Q",
        "'*t*' in 5 parts": ".".join(["*t*"] * 5),
        "a range of 5000 digits": "model.layers.{0.." + "9" * 5000 + "}.mlp.mul",
        "600 '*.' parts": "*." * 600 + "mul",
        "500 ranges in one name": "model.layers." + "{0..9}" * 500,
    }
    for what, pattern in cases.items():
        start = time.monotonic()
        body = message(run_doc("forward", probes=[probe_doc(pattern, patch("Record"))]), one)
        result = tally.send(what, lambda b=body: raw.run(b))
        seconds = time.monotonic() - start
        expect(
            checks,
            f"pattern {what}: a 4xx within 5 s",
            400 <= code(result) < 500 and seconds < 5,
            f"{brief(result)} in {seconds:.1f} s",
        )
    raw.close()
    return checks


def attack_pass_recordings(server: Server, tally: Tally, count: int = 16) -> list:
    """Requests sharing passes, each tracing just under a session's limit: together over --max-total-bytes."""
    checks: list = []
    tokens = ids(16, 64)  # 2 layers x [16, 64, 128] floats at each of 3 points: 3 MiB a request
    record = ["model.layers.*.mlp.mul", "model.layers.*.mlp.up_proj.output", "model.layers.*.mlp.gate_proj.output"]
    body = encode_request(RunRequest("forward", (tokens,), {}, traced_probes(record), []))
    before = server.status("VmHWM")
    raws = [Raw(server) for _ in range(count)]
    answers: list[Any] = []

    def send(raw: Raw) -> None:
        answers.append(tally.send("traced", lambda: raw.run(body)))

    threads = [threading.Thread(target=send, args=(raw,)) for raw in raws]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    grown = (server.status("VmHWM") - before) >> 20
    expect(checks, f"{count} traced requests of 3 MiB at once: answered, or 429 over the share",
           all(code(a) in (200, 429) for a in answers) and any(code(a) == 200 for a in answers),
           [brief(a) for a in answers][:3])  # fmt: skip
    expect(checks, "(info) peak RSS grew by", True, f"{grown} MiB ({count} x 3 MiB traced; --max-total-bytes 16 MiB)")
    for raw in raws:
        raw.close()
    return checks


def attack_open_server_eviction(server: Server, tally: Tally) -> list:
    """On a server without tokens every client shares one session cap."""
    checks: list = []
    victim = server.connect()
    victim.forward(ids(), probes=[nt.probe(MUL, nt.Mean(dims=(0, 1)))], outputs=[])
    http = httpx.Client(base_url=server.url, headers=server.headers(), timeout=30)
    for _ in range(70):
        tally.add("open", http.post("/v1/sessions"))
    try:
        victim.recordings()
        expect(checks, "another local client's session survives 70 session opens (open server)", True)
    except Exception as error:  # noqa: BLE001
        expect(
            checks,
            "another local client's session survives 70 session opens (open server)",
            False,
            f"{type(error).__name__}: {str(error)[:150]}",
        )
    http.close()
    victim._session = None
    victim.close()
    return checks


def attack_held_tensors(server: Server, tally: Tally, count: int = 8, size: int = 64 << 20) -> list:
    """Requests of one token carrying large patch tensors, all at once: what the server holds while they wait."""
    checks: list = []
    raws = [Raw(server) for _ in range(count)]
    body = message(
        run_doc("forward", probes=[probe_doc(MUL, patch("Replace", value={"$tensor": "v"}))]),
        {"ids": ids(), "v": torch.zeros(size // 4)},
    )
    before = server.status("VmHWM")
    answers: list[Any] = []
    threads = [
        threading.Thread(target=lambda r=raw: answers.append(tally.send("tensors", lambda: r.run(body))))
        for raw in raws
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    grown = (server.status("VmHWM") - before) >> 20
    statuses = collections.Counter(code(a) for a in answers)
    expect(checks, f"{count} requests of {size >> 20} MiB of tensors: 4xx (429 over the token's share)",
           set(statuses) <= {400, 413, 422, 429}, dict(statuses))  # fmt: skip
    expect(checks, "(info) peak RSS grew by", True, f"{grown} MiB ({count} x {size >> 20} MiB sent; {dict(statuses)})")
    for raw in raws:
        raw.close()
    return checks


def attack_unread_answers(server: Server, tally: Tally, count: int = 8) -> list:
    """Requests with 4 MiB answers that their client never reads: each token's unread answers stay within its
    share of --max-total-bytes (8 MiB on A), the rest refused with a 429."""
    checks: list = []
    raw = Raw(server)
    body = request("forward", (ids(128, 64),), outputs=["logits"])  # [128, 64, 128] float32: 4 MiB
    head = (
        f"POST /v1/run HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nX-Neurotap-Protocol: 1\r\n"
        f"Authorization: Bearer {server.token}\r\n{SESSION_HEADER}: {raw.session}\r\n"
        f"Content-Type: {MEDIA_TYPE}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    before = server.status("VmRSS")
    socks = []
    for _ in range(count):
        sock = _socket(server, rcvbuf=4096)
        sock.settimeout(60)
        sock.sendall(head + body)
        socks.append(sock)
    lines = []
    for sock in socks:
        try:
            lines.append(sock.recv(12)[9:12].decode() or "closed")
        except OSError as error:
            lines.append(type(error).__name__)
        tally.add("unread answer", int(lines[-1]) if lines[-1].isdigit() else 0)
    held = (server.status("VmRSS") - before) >> 20
    statuses = collections.Counter(lines)
    expect(checks, f"{count} unread 4 MiB answers: at most 2 held (8 MiB share), the rest 429",
           statuses.get("200", 0) <= 2 and statuses.get("429", 0) >= count - 2, dict(statuses))  # fmt: skip
    expect(checks, "(info) RSS while they are unread", True, f"+{held} MiB")
    for sock in socks:
        sock.close()
    raw.close()
    return checks


def attack_experiment_flood(server: Server, tally: Tally, count: int = 12) -> list:
    """One token sends many logit-lens experiments at once: beyond its few, each is a 429 at once."""
    checks: list = []
    body = {"ids": [int(i) for i in ids(1, 48)[0]], "positions": list(range(48)), "top": 10}
    answers: list[tuple[int, float]] = []

    def lens() -> None:
        start = time.monotonic()
        result = tally.send(
            "logit lens",
            lambda: httpx.post(
                server.url + "/v1/logit_lens", json=body, headers=server.headers(), timeout=120
            ),  # fmt: skip
        )
        answers.append((code(result), time.monotonic() - start))

    threads = [threading.Thread(target=lens) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    refused = [seconds for status, seconds in answers if status == 429]
    statuses = collections.Counter(status for status, _ in answers)
    expect(checks, f"{count} experiments of one token: those beyond 4 under way a 429 within 5 s",
           refused and max(refused) < 5 and set(statuses) <= {200, 429},
           f"{dict(statuses)}; slowest 429 {max(refused or [0]):.2f} s")  # fmt: skip
    return checks


def attack_code_bytes(server: Server, tally: Tally, workdir: str) -> list:
    """Pickled bytes wherever a value goes (the loss, a probe, a patch field, a model argument), no --allow-code."""
    import pickle

    checks: list = []
    marker = Path(workdir) / "MARKER-unpickled"
    pickled = torch.frombuffer(bytearray(pickle.dumps(_Opener(str(marker)))), dtype=torch.uint8)
    code_value = {"$code": {"$tensor": "code"}}
    cases = {
        "loss $code": run_doc("backward", loss=code_value),
        "loss $code + extra key": run_doc("backward", loss={**code_value, "x": 1}),
        "probe $code": run_doc("forward", probes=[probe_doc(MUL, code_value)]),
        "Replace.value $code": run_doc("forward", probes=[probe_doc(MUL, patch("Replace", value=code_value))]),
        "Custom.fn $code": run_doc("forward", probes=[probe_doc(MUL, patch("Custom", fn=code_value))]),
        "labels $code": run_doc("forward", {"labels": code_value}),
        "CrossEntropy.targets $code": run_doc(
            "backward", loss={"$loss": "CrossEntropy", "fields": {"targets": code_value}}
        ),
        "Probability of 1M tokens": run_doc(
            "forward", probes=[probe_doc("lm_head.output", patch("Probability", token={"$tensor": "many"}))]
        ),
    }
    raw = Raw(server)
    tensors = {"ids": ids(1, 48), "code": pickled, "many": torch.zeros(1 << 20, dtype=torch.long)}
    for what, document in cases.items():
        result = tally.send(what, lambda d=document: raw.run(message(d, tensors)))
        expect(checks, f"{what}: a 4xx", 400 <= code(result) < 500, brief(result))
    expect(checks, "nothing was unpickled", not marker.exists())
    raw.close()
    return checks


class _Opener:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (open, (self.path, "w"))


# -- main ---------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--smollm2", action="store_true", help="also attack a server of the built-in smollm2-135m")
    parser.add_argument("--only", default="", help="comma-separated attack numbers or names to run")
    options = parser.parse_args()
    only = {o.strip() for o in options.only.split(",") if o.strip()}
    torch.manual_seed(0)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="neurotap-attacks-") as workdir:
        tiny = save_tiny(os.path.join(workdir, "tiny"))
        tokens = Path(workdir) / "tokens.txt"
        tokens.write_text("\n".join(TOKENS) + "\n")
        common = ["--header-timeout", "2", "--body-timeout", "3", "--max-connections", "200"]
        main_args = [
            "--token-file", str(tokens), *common, "--max-request-bytes", "128M",
            "--max-session-bytes", str(SESSION_BYTES), "--max-total-bytes", str(TOTAL_BYTES), "--request-timeout", "10",
        ]  # fmt: skip
        servers = {"A": Server("A", tiny, main_args, TOKENS[0])}
        canaries: dict[str, Canary] = {}
        try:
            if options.smollm2:  # loading it would slow the canaries of the first attacks: wait for it here
                servers["S"] = Server("S", "smollm2-135m", main_args, TOKENS[0])
            servers["A"].wait()
            print(f"server A up in {time.monotonic() - started:.0f} s: {servers['A'].url}")
            if options.smollm2:
                servers["S"].wait()
                canaries["S"] = Canary(servers["S"], TOKENS[1])
                canaries["S"].start()
                print(f"server S up in {time.monotonic() - started:.0f} s: {servers['S'].url}")
            # B (code allowed, no tokens) starts now and is waited for at its first attack
            servers["B"] = Server("B", tiny, ["--allow-code", "--request-timeout", "2", *common], None)
            canaries["A"] = Canary(servers["A"], TOKENS[1])
            canaries["A"].start()
            time.sleep(1.0)
            bench = Bench(servers, canaries)
            attacks: list[tuple[str, str, Callable]] = [
                ("1 code via generate kwargs", "A", lambda s, t: attack_code_arguments(s, t, workdir)),
                ("2 cost bounds", "A", lambda s, t: attack_costs(s, t, 128)),
                ("3 recordings + total bytes", "A", attack_recordings),
                ("4 1100 sessions of a token", "A", attack_sessions),
                ("5 large messages", "A", attack_large),
                ("5b 16 x 32 MiB bodies at once", "A", lambda s, t: attack_parallel_bodies(s, t, 16, 32 << 20)),
                ("6 slowloris + conn cap", "A", attack_slowloris),
                ("6b slow readers x190", "A", lambda s, t: attack_slow_reader(s, t, 190)),
                ("1b code kwargs, --allow-code (info)", "B", lambda s, t: attack_code_arguments_allowed(s, t, workdir)),
                ("7 long pass, forwards queue", "B", lambda s, t: attack_long_pass(s, t, 3.0)),
                (
                    "7b long pass, generates of 6 lengths queue",
                    "B",
                    lambda s, t: attack_long_pass(s, t, 3.0, "generate"),
                ),
                ("8 host/origin", "A", attack_host_origin),
                ("9a gzip/JSON/encodings", "A", attack_encodings),
                ("9b odd values/points/paths", "A", lambda s, t: attack_values(s, t, 128)),
                ("9c 500 probes at a point", "A", lambda s, t: attack_many_probes(s, t, 500)),
                ("9d open-server session cap", "B", attack_open_server_eviction),
                ("9f web routes (tokenize)", "A", attack_web_routes),
                ("9e races + closed mid-body", "A", attack_races),
                ("10a point patterns", "A", attack_patterns),
                ("10b 16 traces sharing passes", "A", attack_pass_recordings),
                ("11a 8 x 64 MiB of tensors at once", "A", attack_held_tensors),
                ("11b 8 unread 4 MiB answers", "A", attack_unread_answers),
                ("11c 12 experiments of one token", "A", attack_experiment_flood),
                ("11d pickled bytes, no --allow-code", "A", lambda s, t: attack_code_bytes(s, t, workdir)),
            ]
            if options.smollm2:
                attacks += [
                    ("S2 cost bounds", "S", lambda s, t: attack_costs(s, t, 49152, big_index=False)),
                    (
                        "S6b slow readers x8 (param)",
                        "S",
                        lambda s, t: attack_slow_reader(s, t, 8, "/v1/parameters/model.embed_tokens.weight"),
                    ),
                    ("S9b odd values", "S", lambda s, t: attack_values(s, t, 49152)),
                    ("S9f gzip of a parameter x3", "S", attack_gzip_answers),
                    ("S9g web routes (tokenize)", "S", attack_web_routes),
                ]
            for name, server, fn in attacks:
                if only and not ({name.split()[0], name} & only):
                    continue
                bench.attack(name, server, fn)
            for canary in canaries.values():
                canary.stopping.set()
            for canary in canaries.values():
                canary.join(30)
            print(
                f"\n{len(bench.rows)} attacks in {time.monotonic() - started:.0f} s; canary rounds: "
                + ", ".join(f"{k} {len(c.events) // 2}" for k, c in canaries.items())
            )
            clean = bench.report()
        finally:
            for canary in canaries.values():
                canary.stopping.set()
            for server in servers.values():
                server.stop()
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
