"""Attacks on a real ``neurotap serve`` process: each is refused with a 4xx JSON error while another client is served.

Every attack here is bounded (a few requests, a few sockets, seconds) and goes to
127.0.0.1 only. After each, a canary client holding another token runs a forward
and gets exactly the local model's logits.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from safetensors.torch import save

import neurotap as nt
from conftest import VOCAB, tiny_llama
from neurotap.transport.client import ServerGoneError
from neurotap.transport.wire import (
    MEDIA_TYPE,
    PROTOCOL,
    PROTOCOL_HEADER,
    SESSION_HEADER,
    ProbeSpec,
    RunRequest,
    WireError,
    encode_request,
)
from serving import ALPHA, BETA, LAUNCH, Server

MUL = "model.layers.0.mlp.mul"


@pytest.fixture(scope="module")
def server(folder, token_file):
    with Server(
        folder,
        *("--token-file", str(token_file), "--allow-host", "alias.test"),
        *("--max-request-bytes", "96M", "--max-session-bytes", "200K", "--max-total-bytes", "500K"),
        *("--max-request-memory", "8M", "--max-sessions-per-token", "8"),
        *("--header-timeout", "1", "--body-timeout", "2", "--max-connections", "40"),
    ) as running:
        yield running


@pytest.fixture(scope="module")
def code_server(folder, token_file):
    with Server(folder, "--token-file", str(token_file), "--allow-code", "--request-timeout", "1.5") as running:
        yield running


@pytest.fixture(scope="module")
def canary(server):
    with nt.connect(server.url, token=BETA) as client:
        yield client


def ids(seed: int, rows: int = 1, length: int = 6) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def assert_served(client, local, seed: int = 0) -> None:
    tokens = ids(1000 + seed)
    with torch.no_grad():
        expected = local.module(tokens).logits
    torch.testing.assert_close(client.forward(tokens, outputs=["logits"]).logits, expected, rtol=1e-5, atol=1e-5)


def recorded_locally(local, tokens: torch.Tensor, point: str, fn) -> dict:
    """What ``fn`` at ``point`` records for ``tokens`` on the local model: what a server must send back."""
    with torch.no_grad():
        local.forward(tokens, probes=[nt.probe(point, fn)])
    expected = dict(local.recordings()[point])  # a copy: clear_recordings() empties the live one
    local.clear_recordings()
    return expected


def headers(token: str | None = ALPHA, session: str | None = None, **more: str) -> dict[str, str]:
    found = {PROTOCOL_HEADER: str(PROTOCOL), "Content-Type": MEDIA_TYPE, **more}
    if token:
        found["Authorization"] = f"Bearer {token}"
    if session:
        found[SESSION_HEADER] = session
    return found


def refused(response: httpx.Response, status: int | None = None) -> dict:
    """The JSON error of a 4xx response."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    if status is not None:
        assert response.status_code == status, response.text[:300]
    body = response.json()
    assert set(body) == {"error", "message", "traceback"} and body["message"]
    return body


def raw_run(server, client, body: bytes, **kwargs) -> httpx.Response:
    return httpx.post(
        server.url + "/v1/run", content=body, headers=headers(session=client._session), timeout=30, **kwargs
    )


def message(document: dict, tensors: dict[str, torch.Tensor] | None = None) -> bytes:
    return save(tensors or {}, metadata={"neurotap": json.dumps(document)})


# -- code execution -----------------------------------------------------------------------------------


def test_generate_cannot_load_code(server, canary, local, tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil" / "custom_generate"
    evil.mkdir(parents=True)
    (evil / "generate.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\ndef generate(model, **kw): pass\n")
    with nt.connect(server.url, token=ALPHA) as rm:
        with pytest.raises(WireError, match="custom_generate") as caught:
            rm.generate(ids(1), max_new_tokens=1, custom_generate=str(evil.parent), trust_remote_code=True)
        assert caught.value.status == 400
        for name, value in [
            ("trust_remote_code", True),
            ("streamer", "tqdm"),
            ("logits_processor", [1]),
            ("stopping_criteria", "x"),
            ("assistant_model", str(evil.parent)),
            ("generation_config", {"max_new_tokens": 1}),
            ("past_key_values", torch.zeros(1)),
        ]:
            with pytest.raises(WireError, match=name):
                rm.generate(ids(1), max_new_tokens=1, **{name: value})
        with pytest.raises(WireError, match="trust_remote_code"):
            rm.forward(ids(1), trust_remote_code=True)
        with pytest.raises(WireError, match="must be an integer tensor"):
            rm.forward(input_ids=torch.zeros(1, 4))  # float ids: a plain-data check, not a crash
        # a patch where the model expects a plain value: refused by name, before anything runs
        body = encode_request(RunRequest("forward", (ids(1),), {"streamer": nt.Zero()}))
        assert "streamer" in refused(raw_run(server, rm, body), 400)["message"]
    assert not marker.exists()
    assert_served(canary, local)


def test_allowed_arguments_still_work(canary, local):
    tokens = ids(2)
    out = canary.generate(tokens, max_new_tokens=4, do_sample=False, num_beams=2, eos_token_id=[VOCAB - 1])
    expected = local.module.generate(tokens, max_new_tokens=4, do_sample=False, num_beams=2, eos_token_id=[VOCAB - 1])
    assert torch.equal(out, expected)


# -- one request must not exhaust the machine -------------------------------------------------------------


def test_generation_is_bounded_before_it_runs(server, canary, local):
    with nt.connect(server.url, token=ALPHA) as rm:
        for kwargs, flag in [
            (dict(do_sample=True, num_return_sequences=10**6, max_new_tokens=2), "--max-return-sequences"),
            (dict(cache_implementation="static", max_new_tokens=10**7), "--max-new-tokens"),
            (dict(cache_implementation="paged", max_new_tokens=2), "--cache-implementations"),
            (dict(num_beams=100, max_new_tokens=2), "--max-beams"),
        ]:
            with pytest.raises(nt.NeurotapError, match=flag) as caught:
                rm.generate(ids(3), **kwargs)
            assert caught.value.status == 413
        with pytest.raises(nt.NeurotapError, match="--max-request-tokens") as caught:
            rm.forward(ids(4, rows=1000, length=64))
        assert caught.value.status == 413
        with pytest.raises(nt.NeurotapError, match="--max-request-memory") as caught:
            rm.forward(ids(5, rows=64, length=64))  # 4,096 positions: about 20 MiB against 8 MiB
        assert caught.value.status == 413
    assert_served(canary, local)


def test_indices_are_bounded(server, canary, local):
    with nt.connect(server.url, token=ALPHA) as rm:
        broadcast = (torch.zeros(3000, 1, dtype=torch.long), torch.zeros(1, 3000, dtype=torch.long))
        with pytest.raises(nt.NeurotapError, match="--max-selection-elements") as caught:
            rm.forward(ids(6), probes=[nt.probe(MUL, nt.Record(index=broadcast))])
        assert caught.value.status == 413
        with pytest.raises(WireError, match="index tensor has 20000000 elements") as caught:
            rm.forward(ids(6), probes=[nt.probe(MUL, nt.Zero(index=torch.zeros(2 * 10**7, dtype=torch.int32)))])
        assert caught.value.status == 400
        with pytest.raises(nt.PatchError, match="does not fit"):  # a value that would broadcast the point bigger
            rm.forward(ids(6), probes=[nt.probe(MUL, nt.Add(torch.zeros(100_000, 1, 1)))])
        assert rm.recordings() == {}
    assert_served(canary, local)


def test_sae_top_examples_are_bounded_before_the_pass(server, canary, local):
    d_in, d_sae = local.module.config.hidden_size, 2048
    weights = torch.randn(d_in, d_sae, generator=torch.Generator().manual_seed(0))
    point = "model.layers.1.output"

    def sae(examples: int) -> nt.SAE:
        return nt.SAE(W_enc=weights, b_enc=torch.zeros(d_sae), W_dec=weights.T, b_dec=torch.zeros(d_in),
                      examples=examples, record=False)  # fmt: skip

    with nt.connect(server.url, token=ALPHA) as rm:
        allowed = (1 << 24) // d_sae  # the default --max-selection-elements
        probes = [nt.probe("model.layers.0.output", nt.Record()), nt.probe(point, sae(allowed + 1))]
        with pytest.raises(nt.NeurotapError, match=f"--max-selection-elements.*at most {allowed} examples") as caught:
            rm.forward(ids(9), probes=probes)
        assert caught.value.status == 413
        assert rm.recordings() == {}
        rm.forward(ids(9), probes=[nt.probe(point, sae(2))], outputs=[])
        expected = recorded_locally(local, ids(9), point, sae(2))
        for key in ("sae_top_values", "sae_top_where", "sae_fired"):
            torch.testing.assert_close(rm.recordings()[point][key], expected[key])
    assert_served(canary, local)


def test_sae_dense_features_are_bounded_before_the_pass(server, canary, local):
    d_in, d_sae, length = local.module.config.hidden_size, 4096, 32
    generator = torch.Generator().manual_seed(1)
    w_enc, w_dec = torch.randn(d_in, d_sae, generator=generator) * 0.1, torch.randn(d_sae, d_in, generator=generator)
    b_enc, b_dec = torch.randn(d_sae, generator=generator) * 0.1, torch.zeros(d_in)
    sae = nt.SAE(W_enc=w_enc, b_enc=b_enc, W_dec=w_dec * 0.1, b_dec=b_dec, record=False)
    point = "model.layers.1.output"
    with nt.connect(server.url, token=ALPHA) as rm:
        # 256 tokens x 4,096 features, float32: 4 MiB per dense copy, over the server's 8 MiB with the rest
        with pytest.raises(nt.NeurotapError, match=r"SAE features .*--max-request-memory") as caught:
            rm.forward(ids(10, rows=8, length=length), probes=[nt.probe(point, sae)], outputs=[])
        assert caught.value.status == 413
        assert rm.recordings() == {}
        fitting = int(re.search(r"at most (\d+) tokens", str(caught.value))[1])
        assert 0 < fitting < 8 * length
        tokens = ids(11, rows=fitting // length, length=length)  # as many whole rows as the server says fit
        out = rm.forward(tokens, probes=[nt.probe(point, sae)], outputs=["logits"])

        def reconstruct(_module, _args, value):  # the SAE by hand, on the unwrapped model
            features = torch.relu((value - b_dec) @ w_enc + b_enc)
            seen.append(features)
            return features @ (w_dec * 0.1) + b_dec

        seen: list[torch.Tensor] = []
        hook = local.module.model.layers[1].register_forward_hook(reconstruct)
        try:
            with torch.no_grad():
                expected = local.module(tokens).logits
        finally:
            hook.remove()
        torch.testing.assert_close(out.logits, expected, rtol=1e-4, atol=1e-4)
        saved = rm.recordings()[point]
        assert saved["sae_tokens"] == tokens.numel()
        torch.testing.assert_close(saved["sae_fired"], (seen[0] > 0).reshape(-1, d_sae).sum(0))
    assert_served(canary, local)


def test_recordings_are_plain_and_capped_server_wide(server, canary, local):
    with nt.connect(server.url, token=ALPHA) as rm:
        with pytest.raises(nt.PatchError, match="saved a DynamicCache") as caught:
            rm.forward(ids(7), probes=[nt.probe('model.output["past_key_values"]', nt.Record())])
        assert caught.value.status == 422
        assert rm.recordings() == {}
    # each session records 150 kB, under its 200 kB limit; the 500 kB for all is shared by the two tokens
    point, tokens = "model.layers.1.output", ids(8, rows=10, length=60)
    first, second, other = (nt.connect(server.url, token=t) for t in (ALPHA, ALPHA, BETA))
    try:
        first.forward(tokens, probes=[nt.probe(point, nt.Record())], outputs=[])
        with pytest.raises(nt.NeurotapError, match="your token's sessions.*--max-total-bytes") as caught:
            second.forward(tokens, probes=[nt.probe(point, nt.Record())], outputs=[])
        assert caught.value.status == 413
        other.forward(tokens, probes=[nt.probe(point, nt.Record())], outputs=[])  # the other token's share is intact
        expected = recorded_locally(local, tokens, point, nt.Record())["record"][0]
        for client in (first, other):
            torch.testing.assert_close(client.recordings()[point]["record"][0], expected)
        first.clear_recordings()
        second.forward(tokens, probes=[nt.probe(point, nt.Record())], outputs=[])
        assert len(second.recordings()[point]["record"]) == 1
    finally:
        for client in (first, second, other):
            client.close()
    assert_served(canary, local)


def test_probes_per_request_are_capped_and_measured_fairly(server, canary, local):
    with nt.connect(server.url, token=ALPHA) as rm:
        with pytest.raises(nt.NeurotapError, match="--max-probes") as caught:
            rm.forward(ids(15), probes=[nt.probe(MUL, nt.Mean(key=f"k{i}")) for i in range(513)])
        assert caught.value.status == 413
        # 500 single numbers are 500 numbers, however many probe calls measured them
        rm.forward(
            ids(15), probes=[nt.probe(MUL, nt.Record(index=(0, i // 128, i % 128), key=f"k{i}")) for i in range(500)]
        )
        recorded = rm.recordings()[MUL]
        value = recorded_locally(local, ids(15), MUL, nt.Record())["record"][0]
        assert all(torch.equal(recorded[f"k{i}"][0], value[0, i // 128, i % 128]) for i in range(0, 500, 7))
    assert_served(canary, local)


# -- sessions ---------------------------------------------------------------------------------------------


def test_sessions_per_token_are_capped_without_touching_others(server, canary, local):
    opened = []
    for _ in range(8):  # the token's cap
        response = httpx.post(server.url + "/v1/sessions", headers=headers())
        assert response.status_code == 201
        opened.append(response.json()["session"])
    # all eight were used just now: a ninth is refused rather than closing one of them
    body = refused(httpx.post(server.url + "/v1/sessions", headers=headers()), 429)
    assert "--max-sessions-per-token" in body["message"]
    for session in opened:
        assert httpx.get(server.url + "/v1/recordings", headers=headers(session=session)).status_code == 200
        assert httpx.delete(f"{server.url}/v1/sessions/{session}", headers=headers()).status_code == 200
    with nt.connect(server.url, token=ALPHA) as newcomer:  # once they are closed, the token gets in again
        assert_served(newcomer, local)
    assert_served(canary, local)  # and the other token's session was never touched


def test_idle_sessions_make_way_at_the_cap(folder, local):
    with Server(folder, "--session-timeout", "6", "--max-sessions-per-token", "2") as running:
        with nt.connect(running.url) as old, nt.connect(running.url) as busy:
            refused(httpx.post(running.url + "/v1/sessions", headers=headers(None)), 429)
            time.sleep(3.5)  # both idle for more than half the session timeout
            assert_served(busy, local)  # one of them is in use again
            with nt.connect(running.url) as newcomer:  # takes the place of the idle one
                assert_served(newcomer, local)
                assert_served(busy, local)
                with pytest.raises(nt.NeurotapError, match="no such session"):
                    old.recordings()


def test_idle_sessions_expire(folder, local):
    with Server(folder, "--session-timeout", "1") as running:
        with nt.connect(running.url) as client:
            client.forward(ids(9), probes=[nt.probe(MUL, nt.Record())])
            time.sleep(3)  # unused for three times the timeout (asking about it would count as using it)
            response = httpx.get(running.url + "/v1/recordings", headers=headers(None, client._session))
            assert refused(response, 404)["error"] == "SessionError"
        with nt.connect(running.url) as newcomer:
            assert_served(newcomer, local)
        # a server without tokens shows its API pages; one with tokens does not (see below)
        assert httpx.get(running.url + "/openapi.json").status_code == 200


def test_a_session_closed_while_its_request_arrives_keeps_nothing(server, canary, local):
    with nt.connect(server.url, token=ALPHA) as rm:
        body = encode_request(RunRequest("forward", (ids(17),), {}, [ProbeSpec(MUL, nt.Record())]))
        head = (
            f"POST /v1/run HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
            f"{PROTOCOL_HEADER}: {PROTOCOL}\r\nAuthorization: Bearer {ALPHA}\r\n{SESSION_HEADER}: {rm._session}"
            "\r\n\r\n"
        ).encode()
        sock = _connect(server)
        try:
            sock.sendall(head + body[:100])
            time.sleep(0.3)
            assert httpx.delete(f"{server.url}/v1/sessions/{rm._session}", headers=headers()).status_code == 200
            sock.sendall(body[100:])
            answer = _read_until_body(sock)
        finally:
            sock.close()
        assert b" 404 " in answer.split(b"\r\n")[0] and b"SessionError" in answer
        rm._session = None  # already closed
    assert_served(canary, local)


def _read_until_body(sock: socket.socket) -> bytes:
    """One response's head and body (the server keeps the connection open)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(
        next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    )
    while len(rest) < length:
        rest += sock.recv(65536)
    return head + b"\r\n\r\n" + rest


# -- the event loop and slow clients --------------------------------------------------------------------


def test_large_documents_and_headers_are_refused(server, canary, local):
    with nt.connect(server.url, token=ALPHA) as rm:
        document = {"op": "forward", "args": ["x" * (2 << 20)], "kwargs": {"$dict": {}}, "probes": []}
        assert "JSON document" in refused(raw_run(server, rm, message(document)), 400)["message"]
        header = json.dumps({"__metadata__": {"neurotap": "{}"}}).encode() + b" " * (5 << 20)
        body = len(header).to_bytes(8, "little") + header
        assert "header" in refused(raw_run(server, rm, body), 400)["message"]
        nested = "[" * 100_000 + "]" * 100_000
        body = save({}, metadata={"neurotap": nested})
        refused(raw_run(server, rm, body), 400)
    assert_served(canary, local)


def _connect(server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def test_slow_headers_and_bodies_are_cut_off(server, canary, local):
    slow_headers = _connect(server)
    slow_headers.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the blank line
    slow_body = _connect(server)
    session = canary._session
    head = (
        f"POST /v1/run HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n"
        f"{PROTOCOL_HEADER}: {PROTOCOL}\r\nAuthorization: Bearer {BETA}\r\n{SESSION_HEADER}: {session}\r\n\r\n"
    )
    slow_body.sendall(head.encode() + b"0123456789")
    assert _read_all(slow_headers) == b""  # closed by the server after --header-timeout
    answer = _read_all(slow_body)
    assert b" 408 " in answer.split(b"\r\n")[0] and b"--body-timeout" in answer
    slow_headers.close()
    slow_body.close()
    assert_served(canary, local)


def test_connections_beyond_the_cap_replace_idle_ones(server, canary, local):
    sockets = [_connect(server) for _ in range(45)]  # the cap is 40, and the canary holds one
    try:
        time.sleep(0.5)
        closed = 0
        for sock in sockets:
            sock.settimeout(0.2)
            try:
                closed += sock.recv(4096) == b""
            except TimeoutError:
                pass
            except ConnectionResetError:
                closed += 1
        assert closed >= 5  # the oldest idle connections made way for the new ones
        assert_served(canary, local)  # and a client that sends requests still gets in
    finally:
        for sock in sockets:
            sock.close()


@pytest.fixture(scope="module")
def strict_server(folder, token_file):
    with Server(
        folder,
        *("--token-file", str(token_file), "--body-timeout", "1"),
        *("--max-request-bytes", "1M", "--max-inflight-bytes", "2M", "--max-request-memory", "64M"),
    ) as running:
        yield running


def test_bodies_in_flight_share_one_budget(strict_server, local):
    with nt.connect(strict_server.url, token=BETA) as rm:
        head = (
            f"POST /v1/run HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000000\r\n{PROTOCOL_HEADER}: {PROTOCOL}"
            f"\r\nAuthorization: Bearer {BETA}\r\n{SESSION_HEADER}: {rm._session}\r\n\r\n"
        ).encode()
        senders = [_connect(strict_server) for _ in range(3)]
        try:
            for sock in senders:  # 900 kB each of a 1 MB body, the rest never sent: 2.7 MB held against 2 MB
                sock.sendall(head + b"x" * 900_000)
            answers = [_read_all(sock) for sock in senders]
        finally:
            for sock in senders:
                sock.close()
        busy = [a for a in answers if b" 503 " in a.split(b"\r\n")[0]]
        assert len(busy) >= 1 and all(b"--max-inflight-bytes" in a for a in busy)
        assert_served(rm, local)


def test_a_client_that_never_reads_its_answer_is_dropped(strict_server, local):
    with nt.connect(strict_server.url, token=BETA) as rm:
        tokens = ids(16, rows=32, length=64)  # 32 x 64 x 128 floats of the MLP product: 1 MiB a forward
        for _ in range(8):
            rm.forward(tokens, probes=[nt.probe(MUL, nt.Record())], outputs=[])
        reader = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        host, port = strict_server.url.removeprefix("http://").split(":")
        reader.connect((host, int(port)))
        reader.sendall(
            f"GET /v1/recordings HTTP/1.1\r\nHost: 127.0.0.1\r\n{PROTOCOL_HEADER}: {PROTOCOL}\r\n"
            f"Authorization: Bearer {BETA}\r\n{SESSION_HEADER}: {rm._session}\r\n\r\n".encode()
        )
        time.sleep(4)  # the answer stalls once the socket buffers fill; after --body-timeout the server drops it
        reader.settimeout(10)
        received, ending = 0, "still open"
        try:
            while chunk := reader.recv(65536):
                received += len(chunk)
            ending = "closed"
        except ConnectionResetError:
            ending = "closed"
        except TimeoutError:
            pass
        reader.close()
        assert ending == "closed" and 0 < received < 8 << 20  # cut off: the 8 MiB never all went out
        assert_served(rm, local)


# -- a long pass does not hold everyone -------------------------------------------------------------------


def test_a_pass_stops_at_its_deadline_and_the_queue_moves_on(code_server, local, tmp_path):
    marker, running = tmp_path / "layer-1-ran", tmp_path / "layer-0-runs"

    def stall(ctx, value, running=str(running)):
        open(running, "w").close()
        time.sleep(2.5)

    def touch(ctx, value, marker=str(marker)):
        open(marker, "w").close()

    with nt.connect(code_server.url, token=ALPHA) as slow, nt.connect(code_server.url, token=BETA) as queued:
        behind: list = []

        def queue_up() -> None:
            while not running.exists():  # arrive while the slow pass runs, not with it
                time.sleep(0.05)
            try:
                behind.append(queued.forward(ids(10), outputs=["logits"]))
            except Exception as error:  # shown by the assertion below
                behind.append(error)

        thread = threading.Thread(target=queue_up)
        thread.start()
        probes = [nt.probe("model.layers.0.output", stall), nt.probe("model.layers.1.output", touch)]
        with pytest.raises(nt.NeurotapError, match="request timeout") as caught:
            slow.forward(ids(11), probes=probes)
        thread.join(30)
        assert caught.value.status == 504
        assert not marker.exists()  # the pass stopped at the next layer, not at the end
        with torch.no_grad():
            assert not isinstance(behind[0], Exception), behind[0]
            torch.testing.assert_close(behind[0].logits, local.module(ids(10)).logits, rtol=1e-5, atol=1e-5)


def test_probes_that_exit_fail_their_request_only(code_server, local):
    def leave(ctx, value):
        raise SystemExit(3)

    def interrupt(ctx, value):
        raise KeyboardInterrupt

    with nt.connect(code_server.url, token=ALPHA) as rm:
        for probe_fn, name in [(leave, "SystemExit"), (interrupt, "KeyboardInterrupt")]:
            with pytest.raises(nt.ProbeError, match=name) as caught:
                rm.forward(ids(12), probes=[nt.probe(MUL, probe_fn)])
            assert caught.value.status == 422 and name in caught.value.remote_traceback
        assert_served(rm, local)


def test_a_client_that_leaves_is_cancelled_and_records_nothing(code_server, local):
    def stall(ctx, value):
        time.sleep(1.0)

    with nt.connect(code_server.url, token=ALPHA) as rm:
        request = RunRequest(
            "forward",
            (ids(13),),
            {},
            [ProbeSpec("model.layers.0.output", stall), ProbeSpec("model.layers.1.output", nt.Record())],
        )
        with pytest.raises(httpx.TimeoutException):
            httpx.post(
                code_server.url + "/v1/run",
                content=encode_request(request),
                headers=headers(session=rm._session),
                timeout=0.3,
            )
        time.sleep(1.5)  # the stalled probe returns; the pass would have finished and recorded by now
        assert rm.recordings() == {}
        assert_served(rm, local)


def test_a_server_that_dies_mid_request_gives_a_clear_error(folder):
    with Server(folder, "--allow-code") as running:

        def die(ctx, value):
            import os

            os._exit(3)

        with nt.connect(running.url) as rm, pytest.raises(ServerGoneError, match="went away"):
            rm.forward(ids(14), probes=[nt.probe(MUL, die)])


# -- browsers -------------------------------------------------------------------------------------------


def test_other_host_names_and_origins_are_refused(server, canary, local):
    url = server.url + "/v1/points"
    for extra in [{"Host": "evil.example"}, {"Host": "evil.example:80"}, {"Origin": "http://evil.example"}]:
        body = refused(httpx.get(url, headers=headers(**extra)), 403)
        assert "--allow-" in body["message"]
    assert httpx.get(url, headers=headers(Host="alias.test")).status_code == 200
    own = server.url.removeprefix("http://")
    assert httpx.get(url, headers=headers(Origin=f"http://{own}")).status_code == 200
    assert_served(canary, local)


def test_health_and_api_pages_follow_the_token_rule(server):
    anonymous = httpx.get(server.url + "/health").json()
    assert anonymous["status"] == "ok" and "pid" not in anonymous and "model" not in anonymous
    assert "pid" in httpx.get(server.url + "/health", headers=headers()).json()
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert httpx.get(server.url + path, headers=headers()).status_code == 404


# -- settings -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, says",
    [
        (["--max-batch", "0"], "--max-batch"),
        (["--max-experiments-per-token", "0"], "--max-experiments-per-token"),
        (["--request-timeout", "-1"], "--request-timeout"),
        (["--port", "99999"], "99999"),
        (["--max-session-bytes", "8G", "--max-total-bytes", "4G"], "--max-total-bytes"),
        (["--token-file", "BINARY"], "not UTF-8"),
        (["--token-file", "SHORT"], "at least 16"),
    ],
)
def test_bad_settings_are_refused_before_the_model_loads(args, says, tmp_path):
    binary, short = tmp_path / "binary", tmp_path / "short"
    binary.write_bytes(b"\xff\xfe\x00token")
    short.write_text("abc\n")
    args = [str(binary) if a == "BINARY" else str(short) if a == "SHORT" else a for a in args]
    # the model folder does not exist: a setting refused first never gets to load it
    result = subprocess.run(
        [sys.executable, "-c", LAUNCH, "serve", str(tmp_path / "no-model"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert says in result.stderr.strip().splitlines()[-1] and "Traceback" not in result.stderr


def test_malformed_text_for_the_inspector_is_refused(server, canary, local):
    url = server.url + "/v1/tokenize"
    for body in [b"[" * 30_000, b'{"a":' * 10_000, b'{"text": "\\ud800 x \\udc80"}']:
        refused(httpx.post(url, content=body, headers=headers(**{"Content-Type": "application/json"})), 400)
    assert_served(canary, local)


def test_point_patterns_cost_little_whatever_they_hold(server, canary, local):
    """A pattern of a few hundred bytes once took the model's thread for minutes (one alternative per number of a
    range; a backtracking search over many ``*``); each is now answered at once, and the next client is served."""
    with nt.connect(server.url, token=ALPHA) as rm:
        ranges = "model.layers." + ".".join(["{0..65536}"] * 6) + ".mlp.mul"
        stars = "model.layers.*.mlp." + "*" * 30 + "Q"
        alternating = "model.layers.*.mlp." + "*u" * 12 + "Q"
        digits = "model.layers.{0.." + "9" * 5000 + "}.mlp.mul"
        for pattern, says in [
            (ranges, "no point matches"),
            (stars, "no point matches"),
            (alternating, "more than 2 wildcards"),
            (digits, "at most 1000"),
            ("model.layers.{0.." + "9" * 40 + "}.mlp.mul", "empty or too long"),
        ]:
            start = time.monotonic()
            with pytest.raises(nt.UnknownPointError, match=says) as caught:
                rm.forward(ids(6), probes=[nt.probe(pattern, nt.Record())])
            assert caught.value.status == 404 and time.monotonic() - start < 10
        assert rm.recordings() == {}
        rm.forward(ids(6), probes=[nt.probe("model.layers.{0..1}.mlp.mul*", nt.Record())], outputs=[])
        expected = {}
        hooks = [
            layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: expected.setdefault(i, a[0].clone()))
            for i, layer in enumerate(local.module.model.layers)
        ]
        try:
            with torch.no_grad():
                local.module(ids(6))
        finally:
            for hook in hooks:
                hook.remove()
        recorded = rm.recordings()
        assert sorted(recorded) == [f"model.layers.{i}.mlp.mul" for i in range(len(expected))]
        for i, value in expected.items():
            torch.testing.assert_close(recorded[f"model.layers.{i}.mlp.mul"]["record"][0], value)
    assert_served(canary, local)


def test_a_sharded_server_survives_requests_that_one_rank_cannot_serve(folder, local):
    """``stop_at`` a weight of the second rank's layers once left rank 0 waiting to send it the hidden state until
    the rank timeout, and then the whole server exited; such requests are now refused before any rank runs."""
    with Server(folder, "--ranks", "2", "--rank-timeout", "20") as server:
        with nt.connect(server.url) as rm:
            last = len(local.module.model.layers) - 1
            for point in [f"model.layers.{last}.mlp.up_proj.weight", "model.rotary_emb.inv_freq"]:
                start = time.monotonic()
                with pytest.raises(nt.NeurotapError, match="cannot stop at") as caught:
                    rm.forward(ids(5), stop_at=point)
                assert caught.value.status == 422 and time.monotonic() - start < 10
            ranges = "model.layers." + ".".join(["{0..65536}"] * 6) + ".mlp.mul"
            with pytest.raises(nt.UnknownPointError, match="no point matches"):
                rm.forward(ids(5), probes=[nt.probe(ranges, nt.Record())])
            stopped = rm.forward(ids(5), stop_at=f"model.layers.{last}.mlp.mul")
            expected = []
            hook = local.module.model.layers[last].mlp.down_proj.register_forward_pre_hook(
                lambda m, a: expected.append(a[0].clone())
            )
            try:
                with torch.no_grad():
                    local.module(ids(5))
            finally:
                hook.remove()
            torch.testing.assert_close(stopped, expected[0])
            assert_served(rm, local)
        assert server.process.poll() is None


def test_experiments_never_hold_the_threads_other_requests_need(tmp_path):
    """Each inspector experiment (``POST /v1/patching``) held one of the few threads that decode every client's
    requests until it ended, so a dozen of them kept a small forward of another client waiting for most of them."""
    from serving import WORDS, save_with_word_tokenizer

    worded = save_with_word_tokenizer(tiny_llama(), tmp_path / "worded")
    with Server(worded) as server:
        clean = " ".join(WORDS[i % len(WORDS)] for i in range(40))
        corrupt = " ".join(WORDS[(i * 7) % len(WORDS)] for i in range(40))
        body = {"clean": clean, "corrupt": corrupt, "target": "paris"}
        finished: list[int] = []

        def experiment() -> None:
            response = httpx.post(server.url + "/v1/patching", json=body, headers=headers(None), timeout=300)
            finished.append(response.status_code)

        count = min(32, (os.cpu_count() or 1) + 4) + 6  # more than asyncio's default threads
        threads = [threading.Thread(target=experiment) for _ in range(count)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        with nt.connect(server.url) as rm:
            tokens = ids(3)
            done_before = len(finished)
            out = rm.forward(tokens, outputs=["logits"])
            done_meanwhile = len(finished) - done_before
            with torch.no_grad():
                torch.testing.assert_close(out.logits, nt.load(str(worded)).module(tokens).logits)
        for thread in threads:
            thread.join(300)
        assert done_meanwhile <= 2 and len(finished) == count and set(finished) <= {200, 429}  # 429: over the cap


def test_what_one_pass_records_stays_within_the_server_wide_limit(local):
    """Requests batched into one pass each recorded up to --max-session-bytes, kept or traced, all of it held at
    once: 32 requests, 32 times the limit of a session, whatever --max-total-bytes said. A pass whose requests
    together outgrow it now runs each of them on its own, and each still gets its whole trace."""
    from neurotap.transport.executor import InProcessExecutor
    from neurotap.transport.wire import traced_probes

    executor = InProcessExecutor(local, max_session_bytes=200_000, max_total_bytes=500_000)
    tokens = [ids(50 + k, rows=4, length=16) for k in range(8)]  # 2 layers x [4, 16, 128] floats: 128 KiB each
    batch = [
        RunRequest("forward", (t,), {}, traced_probes(["model.layers.*.mlp.mul"]), [], session=f"s{k}")
        for k, t in enumerate(tokens)
    ]
    results = executor.execute(batch)
    assert executor.passes == 1 + len(batch)  # the shared pass stopped at the limit, then one pass each
    layers = local.module.model.layers
    for t, result in zip(tokens, results):
        assert result.error is None, result.error
        expected: list[torch.Tensor] = []
        hooks = [
            layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, seen=expected: seen.append(a[0].clone()))
            for layer in layers
        ]
        try:
            with torch.no_grad():
                local.module(t)
        finally:
            for hook in hooks:
                hook.remove()
        got = {entry["point"]: entry["data"]["record"][0] for entry in result.trace}
        assert list(got) == [f"model.layers.{i}.mlp.mul" for i in range(len(layers))]
        for i, value in enumerate(expected):
            torch.testing.assert_close(got[f"model.layers.{i}.mlp.mul"], value)


# -- what a request brings and what its answer holds ---------------------------------------------------


def test_the_tensors_a_request_sends_count_towards_its_memory(server, canary, local):
    """An SAE's weights, a Replace value or a direction were bounded only by --max-request-bytes (96 MiB here),
    not by the request's memory estimate (8 MiB): 20 MiB of SAE weights ran, and every such request queued holds
    its tensors. They are now part of the estimate, checked before the request runs."""
    d_in, d_sae = local.module.config.hidden_size, 40_000  # 2 x 10 MiB of weights; 1 token's features: 0.5 MiB
    weights = torch.zeros(d_in, d_sae)
    sae = nt.SAE(W_enc=weights, b_enc=torch.zeros(d_sae), W_dec=weights.T.contiguous(), b_dec=torch.zeros(d_in))
    point = "model.layers.1.output"
    with nt.connect(server.url, token=ALPHA) as rm:
        for fn in [sae, nt.Replace(torch.zeros(3_000_000)), nt.Project(torch.zeros(40_000, d_in))]:
            body = encode_request(RunRequest("forward", (ids(20, length=1),), {}, [ProbeSpec(point, fn)], []))
            answer = refused(raw_run(server, rm, body), 413)  # raw: a fresh connection for a large body
            assert re.search("tensors this request sends.*--max-request-memory", answer["message"]), answer
        assert rm.recordings() == {}
        vector = torch.randn(d_in, generator=torch.Generator().manual_seed(2))  # a small one still runs
        out = rm.forward(ids(21), probes=[nt.probe(point, nt.Add(vector))], outputs=["logits"])
        hook = local.module.model.layers[1].register_forward_hook(lambda m, a, value: value + vector)
        try:
            with torch.no_grad():
                expected = local.module(ids(21)).logits
        finally:
            hook.remove()
        torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)
    assert_served(canary, local)


def test_a_probability_of_many_tokens_is_bounded_like_an_index(server, canary, local):
    """``nt.Probability(token=...)`` took any tensor as its entries: half a million of them at the logits of 48
    positions allocated 25 million floats before anything was measured."""
    many = torch.zeros(1 << 19, dtype=torch.long)
    with nt.connect(server.url, token=ALPHA) as rm:
        probes = [nt.probe("lm_head.output", nt.Probability(many))]
        with pytest.raises(nt.NeurotapError, match="token.*--max-selection-elements") as caught:
            rm.forward(ids(22, length=48), probes=probes, outputs=[])
        assert caught.value.status == 413
        for bad in [torch.zeros(4, 4, dtype=torch.long), torch.zeros(3), [1, "x"], {"$dict": {"a": 1}}]:
            tensors = {"ids": ids(22)}
            if isinstance(bad, torch.Tensor):
                tensors["token"], bad = bad, {"$tensor": "token"}
            fn = {"$patch": "Probability", "fields": {"token": bad}}
            document = {"op": "forward", "args": [{"$tensor": "ids"}], "kwargs": {"$dict": {}}, "outputs": [],
                        "loss": None, "probes": [{"point": "lm_head.output", "grad": False, "fn": fn}]}  # fmt: skip
            assert "Probability.token" in refused(raw_run(server, rm, message(document, tensors)), 400)["message"]
        tokens = ids(23)
        out, trace = rm.run(tokens, record={"lm_head.output": nt.Probability([3, 5])})
        with torch.no_grad():
            expected = local.module(tokens).logits.softmax(-1)[..., [3, 5]]
        torch.testing.assert_close(trace["lm_head.output"], expected)
    assert_served(canary, local)


def test_code_is_never_unpickled_from_raw_bytes_without_allow_code(server, canary, local, tmp_path):
    """Hand-built messages carrying cloudpickle bytes wherever a value goes (the loss, a probe, a patch's field, a
    model argument, a tagged value with extra keys): each is refused before anything is unpickled."""
    import cloudpickle

    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    pickled = torch.frombuffer(bytearray(cloudpickle.dumps(Payload())), dtype=torch.uint8)
    code = {"$code": {"$tensor": "code"}}
    base = {"op": "forward", "args": [{"$tensor": "ids"}], "kwargs": {"$dict": {}}, "probes": [], "outputs": [],
            "loss": None}  # fmt: skip
    cases = [
        ({"op": "backward", "loss": code}, 403),
        ({"op": "backward", "loss": {**code, "x": 1}}, 400),
        ({"probes": [{"point": MUL, "grad": False, "fn": code}]}, 403),
        ({"probes": [{"point": MUL, "grad": False, "fn": {"$patch": "Replace", "fields": {"value": code}}}]}, 400),
        ({"probes": [{"point": MUL, "grad": False, "fn": {"$patch": "Custom", "fields": {"fn": code}}}]}, 400),
        ({"kwargs": {"$dict": {"labels": code}}}, 400),
        ({"op": "backward", "loss": {"$loss": "CrossEntropy", "fields": {"targets": code}}}, 400),
        ({"args": [code]}, 400),
    ]
    with nt.connect(server.url, token=ALPHA) as rm:
        for change, status in cases:
            body = message({**base, **change}, {"ids": ids(24), "code": pickled})
            answer = refused(raw_run(server, rm, body), status)
            if status == 403:
                assert "--allow-code" in answer["message"]
        assert rm.recordings() == {}
    assert not marker.exists()
    assert_served(canary, local)


@pytest.fixture(scope="module")
def answers_server(folder, token_file):
    with Server(
        *(folder, "--token-file", str(token_file), "--allow-code", "--body-timeout", "30"),
        *("--max-total-bytes", "50M", "--max-session-bytes", "8M"),
    ) as running:
        yield running


def test_answers_waiting_to_be_read_are_held_against_the_tokens_share(answers_server, local):
    """Answers computed but not yet read by a client that reads slowly were held without any bound: a token
    holder could send many requests with large outputs and grow the server's memory at will. Each token's unread
    answers now count against its share of --max-total-bytes (25 MiB here); over it, its next answer is a 429
    with Retry-After until the others are read, and the other token is served throughout."""
    big = ids(25, rows=256, length=64)  # logits [256, 64, 128] float32: 8 MiB an answer
    request = encode_request(RunRequest("forward", (big,), {}, [], ["logits"]))
    with nt.connect(answers_server.url, token=ALPHA) as rm, nt.connect(answers_server.url, token=BETA) as other:
        head = (
            f"POST /v1/run HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {MEDIA_TYPE}\r\n"
            f"Content-Length: {len(request)}\r\n{PROTOCOL_HEADER}: {PROTOCOL}\r\nAuthorization: Bearer {ALPHA}\r\n"
            f"{SESSION_HEADER}: {rm._session}\r\n\r\n"
        ).encode()
        readers = []
        try:
            for _ in range(4):  # three 8 MiB answers fit the share; a fourth does not
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # it reads nothing, so little is sent
                sock.settimeout(30)
                host, port = answers_server.url.removeprefix("http://").split(":")
                sock.connect((host, int(port)))
                sock.sendall(head + request)
                readers.append(sock)
            heads = [sock.recv(4096) for sock in readers]  # the status line and headers; nothing more is read
            assert sorted(h.split(b" ", 2)[1] for h in heads) == [b"200"] * 3 + [b"429"], [h[:20] for h in heads]
            assert b"retry-after: 1" in next(h for h in heads if b" 429 " in h[:16]).lower()
            with pytest.raises(nt.NeurotapError, match="not yet read.*--max-total-bytes") as caught:
                rm.forward(big, outputs=["logits"])
            assert caught.value.status == 429
            with torch.no_grad():
                expected = local.module(big).logits
            torch.testing.assert_close(other.forward(big, outputs=["logits"]).logits, expected)  # another share
            small = ids(26)
            with torch.no_grad():  # what is left of the share still takes a small answer
                torch.testing.assert_close(rm.forward(small).logits, local.module(small).logits)
        finally:
            for sock in readers:
                sock.close()
        deadline = time.monotonic() + 20
        while True:  # the readers are gone, so their answers are given back
            try:
                torch.testing.assert_close(rm.forward(big, outputs=["logits"]).logits, expected)
                break
            except nt.NeurotapError as error:
                assert error.status == 429 and time.monotonic() < deadline
                time.sleep(0.5)


def test_recordings_being_streamed_are_held_against_the_tokens_share(answers_server, local):
    """Each ``GET /v1/recordings`` keeps a snapshot of the session's recordings alive (and a copy gathered from
    the other ranks on a sharded server) until its client has read it: many slow readers multiplied them without
    a bound. They now count against the token's share (25 MiB here) like any answer not yet read."""
    tokens = ids(29, rows=96, length=64)  # the MLP product: [96, 64, 128] float32, 3 MiB a forward
    with nt.connect(answers_server.url, token=ALPHA) as rm:
        for _ in range(2):
            rm.forward(tokens, probes=[nt.probe(MUL, nt.Record())], outputs=[])  # 6 MiB recorded
        head = (
            f"GET /v1/recordings HTTP/1.1\r\nHost: 127.0.0.1\r\n{PROTOCOL_HEADER}: {PROTOCOL}\r\n"
            f"Authorization: Bearer {ALPHA}\r\n{SESSION_HEADER}: {rm._session}\r\n\r\n"
        ).encode()
        readers = []
        try:
            for _ in range(5):  # four snapshots of 6 MiB fit the share; a fifth does not
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.settimeout(30)
                host, port = answers_server.url.removeprefix("http://").split(":")
                sock.connect((host, int(port)))
                sock.sendall(head)
                readers.append(sock)
                time.sleep(0.2)  # one at a time: each has taken its part before the next asks
            heads = [sock.recv(4096) for sock in readers]
            assert [h.split(b" ", 2)[1] for h in heads] == [b"200"] * 4 + [b"429"], [h[:20] for h in heads]
        finally:
            for sock in readers:
                sock.close()
        with torch.no_grad():
            local.forward(tokens, probes=[nt.probe(MUL, nt.Record())])
        expected = local.recordings()[MUL]["record"][0]
        local.clear_recordings()
        deadline = time.monotonic() + 20
        while True:  # the readers are gone, so their snapshots are given back
            try:
                recorded = rm.recordings()[MUL]["record"]
                break
            except nt.NeurotapError as error:
                assert error.status == 429 and time.monotonic() < deadline
                time.sleep(0.5)
        assert len(recorded) == 2
        for value in recorded:
            torch.testing.assert_close(value, expected)


def test_requests_waiting_to_run_are_held_against_the_tokens_share(answers_server, local, tmp_path):
    """Once decoded, a request's tensors were held until it was answered, outside every budget: behind a long
    pass, one token holder's requests of --max-request-bytes each could pile up at will. A token's requests
    waiting to run now count against its share of --max-total-bytes (25 MiB here) with its unread answers."""
    running = tmp_path / "stalling"

    def stall(ctx, value, running=str(running)):
        open(running, "w").close()
        time.sleep(4.0)

    tensors = nt.Add(torch.zeros(2 << 20))  # 8 MiB that does not fit the point: refused when it runs
    body = encode_request(RunRequest("forward", (ids(27),), {}, [ProbeSpec(MUL, tensors)], []))
    answers: list[tuple[int, float, str]] = []

    def send() -> None:
        start = time.monotonic()
        response = httpx.post(answers_server.url + "/v1/run", content=body, headers=headers(session=rm._session),
                              timeout=60)  # fmt: skip
        answers.append((response.status_code, time.monotonic() - start, response.text[:300]))

    with nt.connect(answers_server.url, token=ALPHA) as rm, nt.connect(answers_server.url, token=BETA) as other:
        slow = threading.Thread(target=lambda: other.forward(ids(28), probes=[nt.probe(MUL, stall)], outputs=[]))
        slow.start()
        while not running.exists():
            time.sleep(0.05)
        senders = [threading.Thread(target=send) for _ in range(4)]  # three 8 MiB requests fit; a fourth does not
        for thread in senders:
            thread.start()
        for thread in senders:
            thread.join(60)
        slow.join(60)
        statuses = sorted(status for status, *_ in answers)
        assert statuses == [422, 422, 422, 429], answers
        refusal = next(answer for answer in answers if answer[0] == 429)
        assert refusal[1] < 4.0 and "waiting to run" in refusal[2], refusal  # refused while the others waited
        assert_served(rm, local)


def test_one_token_cannot_queue_experiments_ahead_of_anothers(tmp_path, token_file):
    """A flood of inspector experiments from one token waited for the two experiment threads in one queue, each
    with a deadline counted from its arrival, so another token's experiment waited behind all of them and the
    later ones ran out of time. A token now has at most a few under way (--max-experiments-per-token); more are
    refused at once with a 429."""
    from serving import WORDS, restored_probabilities, save_with_word_tokenizer, word_tokenizer

    model = tiny_llama()
    worded = save_with_word_tokenizer(model, tmp_path / "worded")
    cap = 2
    with Server(worded, "--token-file", str(token_file), "--max-experiments-per-token", str(cap)) as server:
        clean = " ".join(WORDS[i % len(WORDS)] for i in range(60))
        corrupt = " ".join(WORDS[(i * 7) % len(WORDS)] for i in range(60))
        body = {"clean": clean, "corrupt": corrupt, "target": "paris"}
        flood = 4 * cap
        answers: list[tuple[int, float, str | None, str]] = []
        barrier = threading.Barrier(flood)

        def experiment() -> None:
            barrier.wait()
            start = time.monotonic()
            response = httpx.post(server.url + "/v1/patching", json=body, headers=headers(ALPHA), timeout=300)
            seconds = time.monotonic() - start
            answers.append((response.status_code, seconds, response.headers.get("retry-after"), response.text[:300]))

        threads = [threading.Thread(target=experiment) for _ in range(flood)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        response = httpx.post(server.url + "/v1/patching", json=body, headers=headers(BETA), timeout=300)
        assert response.status_code == 200, response.text[:300]
        shown = torch.tensor(response.json()["values"])
        for thread in threads:
            thread.join(300)
        statuses = sorted(status for status, *_ in answers)
        # a few of the flood may end before the last of it arrives and make room for one more
        assert set(statuses) == {200, 429} and statuses.count(429) >= flood - cap - 2, answers
        for status, seconds, retry_after, text in answers:
            if status == 429:
                assert seconds < 10 and retry_after is not None and "--max-experiments-per-token" in text, text

    # by hand: each decoder layer's output at one position put back from the clean run, with plain hooks
    words = word_tokenizer()
    clean_ids, corrupt_ids = (torch.tensor([words(text).input_ids]) for text in (clean, corrupt))
    target = words("paris").input_ids[0]
    expected = restored_probabilities(model.model.layers, model, clean_ids, corrupt_ids, target)
    torch.testing.assert_close(shown, expected, rtol=1e-4, atol=1e-6)
