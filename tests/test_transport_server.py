"""``neurotap serve`` in a real process on 127.0.0.1, against the same model run locally."""

from __future__ import annotations

import collections
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
import traceback

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import neurotap as nt
from conftest import VOCAB, local_recordings
from neurotap.transport import CrossEntropy, LogitDiff
from neurotap.transport.client import ClientTimeoutError
from neurotap.transport.wire import (
    MEDIA_TYPE,
    PROTOCOL,
    PROTOCOL_HEADER,
    SESSION_HEADER,
    NotSent,
    WireError,
    decode,
    decode_request,
    encode,
)
from serving import ALPHA, BETA, LAUNCH, Server, concurrently, free_port

KEY = nt.Record().key
MUL = "model.layers.0.mlp.mul"


@pytest.fixture(scope="module")
def server(folder):
    with Server(folder, "--max-session-bytes", "300000", "--max-request-bytes", "2000000") as running:
        yield running


@pytest.fixture(scope="module")
def code_server(folder, token_file):
    with Server(folder, "--allow-code", "--token-file", str(token_file), "--request-timeout", "1.5") as running:
        yield running


@pytest.fixture
def remote(server):
    with nt.connect(server.url) as rm:
        yield rm


def ids(seed: int, rows: int = 1, length: int = 6) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def same(actual, expected) -> None:
    if isinstance(expected, torch.Tensor):
        torch.testing.assert_close(actual, expected.detach(), rtol=1e-5, atol=1e-5)
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            same(a, e)
    elif hasattr(expected, "keys"):
        assert set(actual.keys()) == set(expected.keys())
        for key in expected.keys():
            same(actual[key], expected[key])
    else:
        assert actual == expected


def same_whole(actual, expected) -> None:
    """:func:`same`, and every container of the same kind: a namedtuple of the same name and fields, a set,
    a dict with the same keys in the same order."""
    if isinstance(expected, (set, frozenset)):
        assert type(actual) is type(expected) and actual == expected
    elif isinstance(expected, tuple):
        assert isinstance(actual, tuple) and type(actual).__name__ == type(expected).__name__
        assert getattr(actual, "_fields", None) == getattr(expected, "_fields", None)
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            same_whole(a, e)
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected)
        for a, e in zip(actual, expected):
            same_whole(a, e)
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and list(actual) == list(expected)
        for key in expected:
            same_whole(actual[key], expected[key])
    else:
        same(actual, expected)


# -- equivalence ------------------------------------------------------------------------------------


def test_points_are_the_local_inventory(remote, local):
    assert remote.points() == local.points()
    assert remote.points("model.layers.1.mlp") == local.points("model.layers.1.mlp")
    with pytest.raises(nt.UnknownPointError, match="model.layers.9"):
        remote.points("model.layers.9")


def test_aliases_work_remotely_as_locally(remote, local):
    assert remote.aliases() == local.aliases()
    tokens_ = ids(20)
    with remote.patch({"blocks.1.mlp.post": nt.Scale(0.5)}):
        out = remote.forward(tokens_, probes=[nt.probe("blocks.0.resid_post", nt.Record())])
    with local.patch({"blocks.1.mlp.post": nt.Scale(0.5)}), torch.no_grad():
        expected = local.forward(tokens_, probes=[nt.probe("blocks.0.resid_post", nt.Record())])
    same(out.logits, expected.logits)
    same(remote.recordings()["blocks.0.resid_post"]["record"], local_recordings(local)["blocks.0.resid_post"]["record"])
    remote.clear_recordings()
    with pytest.raises(nt.UnknownPointError, match="closest: model.layers.0.mlp.mul"):
        with remote.patch({"model.layers.0.mlp.mull": nt.Zero()}):
            pass


def test_forward_with_probes_and_patches_equals_local(remote, local):
    tokens = ids(1, rows=2)
    direction = torch.randn(64, generator=torch.Generator().manual_seed(3))
    probes = [
        nt.probe(MUL, nt.Mean(dims=(0, 1))),
        nt.probe(MUL, nt.TopK(4)),
        nt.probe("model.layers.1.output", nt.Project(direction)),
        nt.probe("model.layers.1.self_attn.o_proj.output", nt.Record(index=(slice(None), -1))),
        nt.probe("model.layers.0.self_attn.attention_interface.softmax", nt.Max(dims=(0, 2))),
        nt.probe("model.norm.output", nt.Norm()),
    ]
    patches = {
        MUL: [nt.Scale(0.5, index=(..., slice(0, 7))), nt.Add(torch.ones(128))],
        "lm_head.output": nt.Zero(index=(..., 5)),
        "model.layers.1.mlp.act_fn.output": nt.Replace(torch.zeros(128), index=(0, 2)),
    }
    for _ in range(2):  # running reductions carry across calls
        with remote.patch(patches):
            out = remote.forward(tokens, probes=probes)
        with local.patch(patches), torch.no_grad():
            expected = local.forward(tokens, probes=probes)
    same(out.logits, expected.logits)
    assert (out.logits[..., 5] == 0).all()
    assert "past_key_values" not in out
    same(remote.recordings(), local_recordings(local))
    remote.clear_recordings()
    assert remote.recordings() == {}


def test_outputs_pick_fields(remote, local):
    tokens = ids(2)
    assert remote.forward(tokens, outputs=[]) is None
    out = remote.forward(tokens, outputs=["logits"])
    assert list(out) == ["logits"]
    with pytest.raises(nt.NeurotapError, match="no field 'nope'"):
        remote.forward(tokens, outputs=["nope"])


def test_stop_at_and_argument_points_equal_local(remote, local):
    tokens = ids(4, rows=2)
    probes = [
        nt.probe(MUL, nt.Record()),
        nt.probe("model.layers.0.self_attn.args.attention_mask", nt.Record()),
        nt.probe("model.layers.0.self_attn.args.position_embeddings[1]", nt.Scale(0.5)),
        nt.probe("model.layers.1.mlp.mul", nt.Record()),  # after the stop: never reached, and no error for it
    ]
    stopped = remote.forward(tokens, probes=probes, stop_at="blocks.0.resid_post")
    with torch.no_grad():
        expected = local.forward(tokens, probes=probes, stop_at="blocks.0.resid_post")
    same(stopped, expected)
    recorded = remote.recordings()
    assert "model.layers.1.mlp.mul" not in recorded
    same(recorded, local_recordings(local))
    remote.clear_recordings()
    with pytest.raises(nt.UnknownPointError, match="blocks.0.resid_post"):
        remote.forward(tokens, stop_at="blocks.0.resid_pots")
    assert remote.forward(tokens, stop_at="model.layers.1.output", outputs=[]) is None
    with pytest.raises(nt.NeurotapError, match="stop_at"):
        remote.generate(tokens, max_new_tokens=2, stop_at="blocks.0.resid_post")


def test_generate_with_patch_and_probes_equals_local(remote, local):
    tokens = ids(3)
    patch = {"lm_head.output": nt.Zero(index=(..., 17))}
    probes = [nt.probe("model.layers.1.output", nt.Mean(dims=(0, 1)))]
    with remote.patch(patch):
        generated = remote.generate(tokens, max_new_tokens=6, do_sample=False, probes=probes)
    with local.patch(patch):
        expected = local.generate(tokens, max_new_tokens=6, do_sample=False, probes=probes)
    assert torch.equal(generated, expected)
    assert not (generated[:, tokens.shape[1] :] == 17).any()
    same(remote.recordings(), local_recordings(local))


def test_run_of_generate_remotely_equals_local(remote, local):
    tokens = ids(31)
    settings = {"max_new_tokens": 4, "do_sample": False}
    record = ["blocks.*.resid_post", MUL]
    generated, trace = remote.run(tokens, record=record, generate=True, **settings)
    expected, local_trace = local.run(tokens, record=record, generate=True, **settings)
    assert torch.equal(generated, expected)
    assert trace.points == local_trace.points == [MUL, "blocks.0.resid_post", "blocks.1.resid_post"]
    for point in trace.points:
        assert len(trace.calls(point)) == settings["max_new_tokens"]
        same(trace.calls(point), local_trace.calls(point))
    assert remote.recordings() == {}


def hidden_gradient(module, tokens, loss_fn):
    """The gradient at model.layers.0's output by torch.autograd.grad on the unwrapped module."""
    captured = {}
    handle = module.model.layers[0].register_forward_hook(lambda _m, _a, out: captured.setdefault("h", out))
    try:
        logits = module(tokens).logits
    finally:
        handle.remove()
    hidden = captured["h"][0] if isinstance(captured["h"], tuple) else captured["h"]
    loss = loss_fn(logits)
    return loss.item(), torch.autograd.grad(loss, hidden)[0]


def test_backward_gradients_match_autograd(remote, local):
    tokens = ids(4, rows=2)
    targets = torch.roll(tokens, -1, dims=1)
    targets[:, -1] = -100
    point = "model.layers.0.output"
    cases = [
        (
            CrossEntropy(targets),
            lambda logits: torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), targets.flatten(), ignore_index=-100
            ),
        ),
        (LogitDiff(7, 9, position=-2), lambda logits: (logits[:, -2, 7] - logits[:, -2, 9]).mean()),
    ]
    for loss, reference in cases:
        remote.clear_recordings()
        value = remote.backward(tokens, loss=loss, probes=[nt.probe(point, nt.Record(), grad=True)])
        expected_loss, expected_grad = hidden_gradient(local.module, tokens, reference)
        assert value == pytest.approx(expected_loss, rel=1e-5)
        same(remote.recordings()[point + ".grad"][KEY], [expected_grad])


def test_get_parameter(remote, local):
    name = "model.layers.1.mlp.up_proj.weight"
    same(remote.get_parameter(name), local.get_parameter(name))
    with pytest.raises(nt.UnknownPointError):
        remote.get_parameter("model.nope.weight")


def test_errors_from_the_server_are_raised_from_the_call_the_user_made(remote, monkeypatch):
    """The client's frames under the user's call would bury the server's message, as the library's do locally."""
    misfit = [nt.probe(MUL, nt.Replace(torch.zeros(7)))]
    for call in (lambda: remote.forward(ids(1), probes=misfit), lambda: remote(ids(1), probes=misfit)):
        with pytest.raises(nt.PatchError, match="does not fit") as caught:
            call()
        frames = traceback.extract_tb(caught.value.__traceback__)
        assert "probes=misfit" in frames[1].line and len(frames) == 3, frames  # pytest's line, the user's, one more
        assert frames[2].filename.endswith(os.path.join("neurotap", "errors.py")), frames
    with pytest.raises(nt.UnknownPointError) as caught:
        remote.run(ids(1), record="model.layers.*.mlp.mull")
    assert len(traceback.extract_tb(caught.value.__traceback__)) == 2  # this line, one more
    monkeypatch.setenv("NEUROTAP_FULL_TRACEBACKS", "1")
    with pytest.raises(nt.PatchError) as caught:
        remote.forward(ids(1), probes=misfit)
    assert "_raise_for" in [frame.name for frame in traceback.extract_tb(caught.value.__traceback__)]


def test_compressed_requests_and_responses(server, local):
    tokens = ids(5)
    with nt.connect(server.url, compress=True) as rm:
        out = rm.forward(tokens, probes=[nt.probe(MUL, nt.Record())])
        recorded = rm.recordings()
    with torch.no_grad():
        expected = local.forward(tokens, probes=[nt.probe(MUL, nt.Record())])
    same(out.logits, expected.logits)
    same(recorded, local_recordings(local))


# -- sessions and concurrency ------------------------------------------------------------------------


def test_two_sessions_keep_separate_recordings(server):
    with nt.connect(server.url) as first, nt.connect(server.url) as second:
        first.forward(ids(6), probes=[nt.probe(MUL, nt.Record())])
        second.forward(ids(7), probes=[nt.probe("model.layers.1.output", nt.Sum(dims=(0, 1)))])
        second.forward(ids(8), probes=[nt.probe("model.layers.1.output", nt.Sum(dims=(0, 1)))])
        assert list(first.recordings()) == [MUL]
        assert list(second.recordings()) == ["model.layers.1.output"]
        first.clear_recordings()
        assert first.recordings() == {}
        assert list(second.recordings()) == ["model.layers.1.output"]


def client_requests(client: int) -> list[tuple[torch.Tensor, list, dict]]:
    """Each client's own inputs, probes and patches, all touching the same points."""
    work = []
    for k in range(4):
        tokens = ids(100 * client + k, rows=1 + client % 2)
        probes = [nt.probe(MUL, nt.Mean(dims=(0, 1))), nt.probe("model.layers.1.output", nt.TopK(2))]
        patches = {MUL: nt.Scale(float(client), index=(..., slice(client, client + 4)))}
        work.append((tokens, probes, patches))
    return work


def run_clients_concurrently(server, local, requests_of, clients: int = 6) -> None:
    """Every client's results through the server, all at once, equal its requests run locally one by one."""
    expected_out, expected_rec = {}, {}
    for c in range(clients):
        outs = []
        for tokens, probes, patches in requests_of(c):
            with local.patch(patches), torch.no_grad():
                outs.append(local.forward(tokens, probes=probes).logits)
        expected_out[c], expected_rec[c] = outs, local_recordings(local)

    def work(c: int, rm) -> tuple[list, dict]:
        outs = []
        for tokens, probes, patches in requests_of(c):
            with rm.patch(patches):
                outs.append(rm.forward(tokens, probes=probes).logits)
        return outs, rm.recordings()

    got = concurrently(server.url, clients, work)
    for c in range(clients):
        same(got[c][0], expected_out[c])
        same(got[c][1], expected_rec[c])


def test_concurrent_clients_get_their_sequential_results(server, local):
    run_clients_concurrently(server, local, client_requests)


def mixed_length_requests(client: int) -> list[tuple[torch.Tensor, list, dict]]:
    """Each client's inputs of its own lengths (3 to 17), with probes and patches at the same points."""
    softmax = "model.layers.1.self_attn.attention_interface.softmax"
    work = []
    for k in range(3):
        tokens = ids(300 + 10 * client + k, rows=1 + (client + k) % 2, length=3 + 2 * client + k)
        probes = [
            nt.probe(MUL, nt.Mean(dims=(0, 1))),
            nt.probe("model.layers.0.output", nt.Record(index=(slice(None), -1))),
            nt.probe(softmax, nt.Record(index=(..., -1, 0))),  # the last query's weight on the first key
        ]
        patches = {"model.layers.0.output": nt.Zero(index=(..., 0, slice(client, client + 4)))}
        work.append((tokens, probes, patches))
    return work


def test_concurrent_clients_of_different_lengths_get_their_sequential_results(server, local):
    """Padded passes differ from sequential ones only in float summation order: compared at 1e-5."""
    with nt.connect(server.url) as rm:
        before = rm.info()
    run_clients_concurrently(server, local, mixed_length_requests, clients=6)
    with nt.connect(server.url) as rm:
        after = rm.info()
    # how many passes were shared (and padded) depends on timing; the results above must hold either way
    assert after["requests"] - before["requests"] == 6 * 3


# -- refusals ----------------------------------------------------------------------------------------


def test_code_is_refused_unless_allowed(remote):
    with pytest.raises(nt.NeurotapError, match="--allow-code") as caught:
        remote.forward(ids(9), probes=[nt.probe(MUL, lambda ctx, value: None)])
    assert caught.value.status == 403
    assert "any Python code" in str(caught.value)


def test_code_runs_when_allowed(code_server, local):
    tokens_ = ids(10)
    scale = 3.0

    def triple_and_save(ctx, value):  # a closure over `scale`
        ctx.seen = value.sum()
        return value * scale

    with nt.connect(code_server.url, token=ALPHA) as rm:
        out = rm.forward(tokens_, probes=[nt.probe(MUL, triple_and_save)])
        recorded = rm.recordings()
        with pytest.raises(nt.ProbeError, match="ZeroDivisionError") as caught:
            rm.forward(tokens_, probes=[nt.probe(MUL, lambda ctx, value: 1 / 0)])
        assert "server traceback" in str(caught.value) and "1 / 0" in caught.value.remote_traceback
        assert rm.recordings().keys() == recorded.keys()  # the failed request recorded nothing
        again = rm.forward(tokens_, outputs=["logits"])  # and the server goes on
    with torch.no_grad():
        expected = local.forward(tokens_, probes=[nt.probe(MUL, triple_and_save)])
    same(out.logits, expected.logits)
    same(recorded, local_recordings(local))
    with torch.no_grad():
        same(again.logits, local.module(tokens_).logits)


def test_a_loss_function_runs_only_where_code_is_allowed(code_server, remote, local):
    tokens_ = ids(12, rows=2)
    point = "model.layers.0.mlp.mul"
    weight = torch.linspace(-1.0, 1.0, local.module.config.hidden_size)

    def loss(output):  # of the output, not of the logits: the last hidden state's projection on `weight`
        return (output.hidden_states[-1] @ weight).square().mean()

    captured = {}
    handle = local.module.model.layers[0].mlp.down_proj.register_forward_pre_hook(
        lambda _m, args: captured.setdefault("x", args[0])
    )
    try:
        expected_loss = loss(local.module(tokens_, output_hidden_states=True))
    finally:
        handle.remove()
    (expected,) = torch.autograd.grad(expected_loss, captured["x"])
    with nt.connect(code_server.url, token=ALPHA) as rm:
        value = rm.backward(
            tokens_, loss=loss, output_hidden_states=True, probes=[nt.probe(point, nt.Record(), grad=True)]
        )
        recorded = rm.recordings()[point + ".grad"][KEY]
        _, trace = rm.run(tokens_, grad=point, loss=loss, output_hidden_states=True)
    assert value == pytest.approx(expected_loss.item(), rel=1e-5)
    same(recorded, [expected])
    assert trace.loss == pytest.approx(expected_loss.item(), rel=1e-5)
    same(trace.grad[point], expected)
    locally = local.backward(tokens_, loss=loss, output_hidden_states=True)
    assert value == pytest.approx(locally, rel=1e-5)
    for call in (
        lambda: remote.backward(tokens_, loss=loss, output_hidden_states=True),
        lambda: remote.run(tokens_, grad=point, loss=loss, output_hidden_states=True),
    ):
        with pytest.raises(nt.NeurotapError, match="--allow-code") as caught:
            call()
        assert caught.value.status == 403
        assert "nt.CrossEntropy(targets) or nt.LogitDiff(correct, wrong)" in str(caught.value)
    with pytest.raises(TypeError, match="built-in loss"):
        remote.backward(tokens_, loss="cross entropy")
    assert remote.recordings() == {}


def test_what_probes_save_travels_whole(code_server, local):
    Pair = collections.namedtuple("Pair", "low high")

    def save_a_mix(ctx, value):
        ctx.by_layer = {0: value.sum(-1), 1: value.mean(), -2: None}
        ctx.pair = Pair(value.amin(), value.amax())
        ctx.mix = {"pairs": [Pair(value[0, 0], 3)], (2, "b"): {True: frozenset({"x", 1.5})}, 0.5: {1, (2, 3)}}

    tokens_ = ids(60, rows=2)
    with nt.connect(code_server.url, token=ALPHA) as rm:
        rm.forward(tokens_, probes=[nt.probe(MUL, save_a_mix)], outputs=[])
        remote = dict(rm.recordings()[MUL])
    with torch.no_grad():
        local.forward(tokens_, probes=[nt.probe(MUL, save_a_mix)])
    expected = local_recordings(local)[MUL]
    same_whole(remote, expected)
    assert remote["pair"].high is remote["pair"][1]


def test_outputs_and_runs_travel_whole(code_server, local):
    Top = collections.namedtuple("Top", "values indices")

    def reshape_output(ctx, value):
        logits = value.logits
        return {"logits": logits, "by_position": {0: logits[:, 0], -1: logits[:, -1]}, "top": Top(*logits.topk(2))}

    tokens_ = ids(61)
    with nt.connect(code_server.url, token=ALPHA) as rm:
        out = rm.forward(tokens_, probes=[nt.probe("output", reshape_output)])
        ran, trace = rm.run(tokens_, record="blocks.0.resid_post", probes=[nt.probe("output", reshape_output)])
    with torch.no_grad():
        expected = local.forward(tokens_, probes=[nt.probe("output", reshape_output)])
        expected_run, expected_trace = local.run(
            tokens_, record="blocks.0.resid_post", probes=[nt.probe("output", reshape_output)]
        )
    same_whole(out, expected)
    same_whole(ran, expected_run)
    same(trace["blocks.0.resid_post"], expected_trace["blocks.0.resid_post"])


def test_what_cannot_travel_is_named_in_a_warning_and_held_by_a_placeholder(code_server, local):
    class Opaque:
        pass

    def with_an_object(ctx, value):
        return {"logits": value.logits, "state": Opaque()}

    def save_what_cannot_travel(ctx, value):
        ctx.total = value.sum()
        ctx.count = 2**70
        ctx.by_tensor = {value.new_ones(1): 1}
        ctx.spectrum = [value.double().sum(), torch.fft.rfft(value.double())]  # complex128: safetensors has none

    tokens_ = ids(62)
    with nt.connect(code_server.url, token=ALPHA) as rm:
        with pytest.warns(nt.NotSentWarning, match=r"1 value, .*the output\['state'\] \(Opaque\).*save tensors") as one:
            out = rm.forward(tokens_, probes=[nt.probe("output", with_an_object)])
        assert len(one) == 1
        rm.forward(tokens_, probes=[nt.probe(MUL, save_what_cannot_travel)], outputs=[])
        with pytest.warns(nt.NotSentWarning) as both:
            recorded = rm.recordings()[MUL]
    assert len(both) == 1  # one warning for the answer, naming each place
    assert f"recordings()[{MUL!r}]['count'] (int)" in str(both[0].message)
    assert f"a key of recordings()[{MUL!r}]['by_tensor'] (Tensor)" in str(both[0].message)
    assert f"recordings()[{MUL!r}]['spectrum'][1] (complex128 Tensor)" in str(both[0].message)
    assert out["state"] == "<Opaque (could not be sent)>" and recorded["count"] == "<int (could not be sent)>"
    assert list(recorded["by_tensor"].values()) == [1]
    with torch.no_grad():
        same(out["logits"], local.module(tokens_).logits)
        local.forward(tokens_, probes=[nt.probe(MUL, save_what_cannot_travel)])
    expected = local_recordings(local)[MUL]
    same(recorded["total"], expected["total"])
    same(recorded["spectrum"][0], expected["spectrum"][0])


def test_tokens(code_server):
    with pytest.raises(nt.NeurotapError, match="token") as caught:
        nt.connect(code_server.url)
    assert caught.value.status == 401
    with pytest.raises(nt.NeurotapError, match="token"):
        nt.connect(code_server.url, token="wrong")
    with nt.connect(code_server.url, token=ALPHA) as alpha:
        alpha.forward(ids(11), probes=[nt.probe(MUL, nt.Record())])
        # another token cannot use alpha's session
        response = httpx.get(
            code_server.url + "/v1/recordings",
            headers={
                PROTOCOL_HEADER: str(PROTOCOL),
                SESSION_HEADER: alpha._session,
                "Authorization": f"Bearer {BETA}",
            },
        )
        assert response.status_code == 404
        assert list(alpha.recordings()) == [MUL]


def test_other_addresses_need_tokens(folder):
    result = subprocess.run(
        [sys.executable, "-c", LAUNCH, "serve", str(folder), "--host", "0.0.0.0", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "without tokens" in result.stderr and "--token-file" in result.stderr


def test_protocol_mismatch_is_explained(server):
    response = httpx.get(server.url + "/v1/points", headers={PROTOCOL_HEADER: str(PROTOCOL + 1)})
    assert response.status_code == 400
    assert "upgrade neurotap on the server side" in response.json()["message"]
    response = httpx.get(server.url + "/v1/points")
    assert response.status_code == 400
    # the message names the header and its value, so that a client written by hand can follow it
    name, value = re.search(r"send '([\w-]+): (\d+)'", response.json()["message"]).groups()
    assert httpx.get(server.url + "/v1/points", headers={name: value}).status_code == 200


def test_limits(remote, local):
    # request size
    with pytest.raises(nt.NeurotapError, match="max-request-bytes") as caught:
        remote.forward(ids(12), probes=[nt.probe(MUL, nt.Add(torch.zeros(600_000)))])
    assert caught.value.status == 413
    # recorded bytes: 2 x 30 x 64 floats is 15 kB a call against a 300 kB session limit
    tokens = ids(13, rows=2, length=30)
    calls = 0
    with pytest.raises(nt.NeurotapError, match="max-session-bytes") as caught:
        while calls < 100:
            remote.forward(tokens, probes=[nt.probe("model.layers.1.output", nt.Record())], outputs=[])
            calls += 1
    assert caught.value.status == 413
    assert calls == 300_000 // (2 * 30 * 64 * 4)
    assert len(remote.recordings()["model.layers.1.output"][KEY]) == calls
    # inputs longer than the model's positions
    with pytest.raises(nt.NeurotapError, match="max_position_embeddings"):
        remote.forward(ids(14, length=65))


def test_timeout_and_disconnect_leave_the_server_healthy(code_server, local):
    with nt.connect(code_server.url, token=ALPHA) as rm:

        def slow(ctx, value):
            time.sleep(0.4)

        started = time.monotonic()
        with pytest.raises(nt.NeurotapError, match="request timeout") as caught:
            rm.generate(ids(15), max_new_tokens=30, do_sample=False, probes=[nt.probe(MUL, slow)])
        assert caught.value.status == 504
        assert time.monotonic() - started < 5

        impatient = nt.connect(code_server.url, token=ALPHA, timeout=0.2)
        with pytest.raises(ClientTimeoutError, match="timeout="):
            impatient.forward(ids(16), probes=[nt.probe(MUL, slow)])
        impatient._http.close()

        assert httpx.get(code_server.url + "/health").json()["status"] == "ok"
        tokens_ = ids(17)
        with torch.no_grad():
            same(rm.forward(tokens_).logits, local.module(tokens_).logits)


# -- fuzzing -----------------------------------------------------------------------------------------

PATCH_NAMES = [*nt.probes.PATCHES, "X"]  # every patch, and one that does not exist
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.sampled_from(["$tensor", "$tuple", "$slice", "$dict", "$patch", "fields", "x"]), inner, max_size=3
        ),
    ),
    max_leaves=12,
)
fields = st.dictionaries(
    st.sampled_from(["index", "dims", "k", "dim", "key", "value", "factor", "direction", "p", "bogus"]),
    st.one_of(
        json_values,
        st.just({"$tensor": "t0"}),
        st.just({"$ellipsis": None}),
        st.builds(lambda a, b: {"$slice": [a, b, None]}, st.integers(-(2**63), 2**63 - 1), st.none()),
        st.builds(lambda a: {"$tuple": [{"$ellipsis": None}, a]}, st.integers(-(2**63), 2**63 - 1)),
    ),
    max_size=3,
)
probes = st.lists(
    st.fixed_dictionaries(
        {
            "point": st.sampled_from(
                [MUL, "lm_head.output", "model.layers.0.output[0]", "nope", 'model.norm.output["x"]']
            ),
            "grad": st.booleans(),
            "fn": st.one_of(
                st.builds(lambda n, f: {"$patch": n, "fields": f}, st.sampled_from(PATCH_NAMES), fields),
                json_values,
            ),
        }
    ),
    max_size=3,
)
tensors = st.one_of(
    st.builds(lambda n, v: torch.full((1, n), v, dtype=torch.int64), st.integers(0, 70), st.integers(-5, 200)),
    st.builds(lambda n: torch.rand(n), st.integers(0, 5)),
    st.builds(lambda: torch.zeros(2, 3, dtype=torch.bool)),
)
bodies = st.fixed_dictionaries(
    {
        "op": st.sampled_from(["forward", "generate", "backward", "explode"]),
        "args": st.one_of(st.just([{"$tensor": "t0"}]), st.lists(json_values, max_size=2)),
        "kwargs": st.one_of(
            st.just({"$dict": {}}),
            st.builds(lambda v: {"$dict": {"max_new_tokens": v}}, st.integers(-3, 3)),
            st.builds(lambda v: {"$dict": {"attention_mask": v}}, json_values),
        ),
        "probes": probes,
        "outputs": st.one_of(st.none(), st.lists(st.sampled_from(["logits", "x"]), max_size=2), json_scalars),
        "loss": st.one_of(
            st.none(),
            st.builds(
                lambda f: {"$loss": "CrossEntropy", "fields": f}, st.dictionaries(st.just("targets"), json_values)
            ),
            st.builds(
                lambda a, p: {"$loss": "LogitDiff", "fields": {"correct": a, "wrong": 1, "position": p}},
                st.integers(-(2**63), 2**63 - 1),
                st.integers(-(2**63), 2**63 - 1),
            ),
        ),
    }
)


def message(body: dict, tensor: torch.Tensor) -> bytes:
    import json

    from safetensors.torch import save

    return save({"t0": tensor.contiguous()}, metadata={"neurotap": json.dumps(body)})


@pytest.fixture(scope="module")
def fuzz_client(server):
    with nt.connect(server.url) as rm:
        yield rm._http


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=bodies, tensor=tensors)
def test_fuzz_run_requests_get_4xx_or_200(fuzz_client, body, tensor):
    response = fuzz_client.post("/v1/run", content=message(body, tensor), headers={"Content-Type": MEDIA_TYPE})
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert set(response.json()) == {"error", "message", "traceback"}


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    raw=st.binary(max_size=300),
    path=st.sampled_from(["/v1/run", "/v1/points?prefix=%00", "/v1/parameters/..%2F", "/v1/recordings?point=x"]),
    method=st.sampled_from(["GET", "POST", "DELETE"]),
    headers=st.dictionaries(
        st.sampled_from([SESSION_HEADER, PROTOCOL_HEADER, "Authorization", "Content-Encoding", "Content-Type"]),
        # no spaces: httpx itself refuses a value with spaces around it, before anything is sent
        st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=20),
        max_size=3,
    ),
)
def test_fuzz_raw_bytes_and_headers_get_4xx(fuzz_client, raw, path, method, headers):
    response = fuzz_client.request(method, path, content=raw, headers=headers)
    assert response.status_code < 500, response.text


def test_keys_sets_and_namedtuples_decode_as_written():
    Pair = collections.namedtuple("Pair", "x y")
    value = {"by": {0: torch.ones(2), -1: None, (1, "a"): 2.5, 0.5: "half"}, "pair": Pair(1, [torch.zeros(1)])}
    value["sets"] = [{1, "a", (2, None)}, frozenset({float("inf")})]
    decoded = decode(encode(value))
    same_whole(decoded, value)
    assert decoded["pair"].x == 1 and type(decoded["pair"]) is not Pair
    same_whole(pickle.loads(pickle.dumps(decoded)), value)  # recordings pickle, a class made by the decoder too
    with pytest.raises(WireError, match="cannot be a dict key"):
        encode({torch.ones(1): 1})
    with pytest.raises(WireError, match="identifier"):
        encode(collections.namedtuple("Pair", "x _y", rename=True)(1, 2))


def raw_message(document, tensors=None) -> bytes:
    from safetensors.torch import save

    return save(tensors or {}, metadata={"neurotap": json.dumps(document)})


@pytest.mark.parametrize(
    ("document", "says"),
    [
        ({"$map": [[{"$tensor": "t0"}, 1]]}, "dict key"),
        ({"$map": [[[1, 2], 1]]}, "dict key"),
        ({"$map": [[{"$dict": {}}, 1]]}, "dict key"),
        ({"$map": [[{"$tuple": [{"$tuple": [1]}]}, 1]]}, "dict key"),
        ({"$map": [[{"$tuple": list(range(65))}, 1]]}, "dict key"),
        ({"$map": [[2**64, 1]]}, "64 bits"),
        ({"$map": [[1]]}, "pairs"),
        ({"$set": [{"$tensor": "t0"}]}, "set member"),
        ({"$namedtuple": "P" * 101, "fields": [["x", 1]]}, "identifier"),
        ({"$namedtuple": "os.system", "fields": []}, "identifier"),
        ({"$namedtuple": "P", "fields": [["x y", 1]]}, "a field 'x y'"),
        ({"$namedtuple": "P", "fields": [["_x", 1]]}, "a field '_x'"),
        ({"$namedtuple": "P", "fields": [["class", 1]]}, "a field 'class'"),
        ({"$namedtuple": "P", "fields": [["x", 1], ["x", 2]]}, "twice"),
        ({"$namedtuple": "P", "fields": [[f"f{i}", i] for i in range(65)]}, "at most 64 fields"),
        ({"$namedtuple": "P", "fields": {"x": 1}}, "pairs"),
        ([{"$namedtuple": f"P{i}", "fields": []} for i in range(65)], "at most 64 namedtuple classes"),
        ({"$unsupported": {"$tensor": "t0"}}, "unknown tagged value"),
        ({"$unsupported": "T" * 101}, "unknown tagged value"),
    ],
)
def test_the_decoder_refuses_bad_keys_and_namedtuples(document, says):
    with pytest.raises(WireError, match=re.escape(says)):
        decode(raw_message(document, {"t0": torch.ones(1)}))


def test_a_request_passes_on_only_str_keyed_arguments():
    document = {"op": "forward", "args": [{"$tensor": "t0"}], "kwargs": {"$map": [[0, True]]}, "probes": []}
    with pytest.raises(WireError, match="kwargs a dict with str keys"):
        decode_request(raw_message(document, {"t0": torch.ones(1, 2, dtype=torch.long)}), allow_code=True)


class Opaque:
    pass


def nested(levels: int, inside):
    for _ in range(levels):
        inside = [inside]
    return inside


def holding_itself() -> list:
    value = [1]
    value.append(value)
    return value


def unrolled(levels: int, inside):
    for _ in range(levels):
        inside = [1, inside]
    return inside


SEEN = torch.arange(4.0)
# the decoder reads 48 levels: the answer's dict, 47 lists, and in the 48th level's place a placeholder
CANNOT_TRAVEL = {
    "a nested object": ([SEEN, {"x": SEEN, "y": Opaque()}], [SEEN, {"x": SEEN, "y": NotSent("Opaque")}]),
    "a namedtuple's big int": (
        collections.namedtuple("Pair", "x y")(SEEN, 2**70),
        collections.namedtuple("Pair", "x y")(SEEN, NotSent("int")),
    ),
    "a complex128 tensor": ([SEEN, SEEN.to(torch.complex128)], [SEEN, NotSent("complex128 Tensor")]),
    "a sparse tensor": ([SEEN, SEEN.to_sparse()], [SEEN, NotSent("sparse_coo Tensor")]),
    "a deep nesting": (nested(60, SEEN), nested(47, NotSent("list"))),
    "a list holding itself": (holding_itself(), unrolled(47, NotSent("list"))),
    "a slice with tensor bounds": (slice(SEEN[0], 3), NotSent("slice")),
}


@pytest.mark.parametrize(("value", "placeholder"), CANNOT_TRAVEL.values(), ids=CANNOT_TRAVEL.keys())
def test_a_value_that_cannot_travel_leaves_its_placeholder_alone_in_an_answer(value, placeholder):
    """Answers are encoded leniently, but a complex128 or sparse tensor, a value nested deeper than the decoder
    reads (or holding itself) and a slice with tensor bounds failed the whole answer, or made one the client
    refused. Now each becomes a placeholder where it was, and the answer is byte for byte the one the placeholder
    would make: nothing of what could not travel is left in it. A request holding one is refused at the client."""
    message = encode({"kept": SEEN, "value": value}, lenient=True)
    assert message == encode({"kept": SEEN, "value": placeholder}, lenient=True)
    same_whole(decode(message), {"kept": SEEN, "value": placeholder})
    with pytest.raises(WireError):
        encode({"value": value})


def test_server_healthy_after_fuzzing(server, local):
    tokens_ = ids(18)
    with nt.connect(server.url) as rm, torch.no_grad():
        same(rm.forward(tokens_).logits, local.module(tokens_).logits)


# -- lifecycle ---------------------------------------------------------------------------------------


def test_graceful_shutdown_finishes_running_requests(folder, tmp_path):
    started = str(tmp_path / "started")
    with Server(folder, "--allow-code") as running:
        with nt.connect(running.url) as rm:
            result = {}

            def slow(ctx, value):  # runs on the server: says the request is under way, then takes its time
                open(started, "w").close()
                time.sleep(1.0)

            def slow_request():
                result["out"] = rm.forward(ids(19), probes=[nt.probe(MUL, slow)])

            thread = threading.Thread(target=slow_request)
            thread.start()
            deadline = time.monotonic() + 30
            while not os.path.exists(started) and time.monotonic() < deadline:
                time.sleep(0.02)
            running.process.send_signal(signal.SIGTERM)
            thread.join(30)
            assert "out" in result and result["out"].logits.shape == (1, 6, VOCAB)
        assert running.process.wait(30) == 0  # a graceful stop, not death by the signal
        assert any("POST /v1/run 200" in line for line in running.log), running.log


def test_idle_timeout_stops_the_server(folder):
    with Server(folder, "--idle-timeout", "1") as running:
        assert running.process.wait(30) == 0
        assert any("--idle-timeout" in line for line in running.log)


def test_launch_and_connect_starts_then_reuses(folder, tmp_path, monkeypatch, local):
    monkeypatch.setenv("NEUROTAP_CACHE", str(tmp_path))
    port = free_port()
    first = nt.launch_and_connect(str(folder), port=port, idle_timeout=60)
    try:
        pid = httpx.get(first.url + "/health").json()["pid"]
        second = nt.launch_and_connect(str(folder), port=port)
        assert httpx.get(second.url + "/health").json()["pid"] == pid
        tokens_ = ids(20)
        with torch.no_grad():
            same(second.forward(tokens_).logits, local.module(tokens_).logits)
        second.close()
        with pytest.raises(nt.NeurotapError, match="already serves"):
            nt.launch_and_connect("smollm2-135m", port=port)
        first.close()
        nt.stop("another-model")  # a model nothing here serves: nothing to do
        assert httpx.get(first.url + "/health").json()["pid"] == pid
        nt.stop(str(folder))  # by the name it was launched with; returns once the process has exited
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        with pytest.raises(httpx.ConnectError):
            httpx.get(first.url + "/health")
        nt.stop(port)  # nothing serves there any more: nothing to do
        nt.stop(str(folder))
    finally:
        first.close()
        from neurotap.transport import client

        for process in client._launched:
            process.terminate()
        while client._launched:
            client._launched.pop().wait(30)


def test_the_server_tokenizer_and_text_inputs(remote, local):
    texts = ["the capital of france is", "paris is an old city", "of the river"]
    assert all(remote.tokenizer(t).input_ids == local.tokenizer(t).input_ids for t in texts)
    ids_ = remote.encode(texts[0])
    assert torch.equal(ids_, local.tokenizer(texts[0], return_tensors="pt").input_ids)
    assert remote.decode(ids_) == local.tokenizer.decode(ids_[0])
    with torch.no_grad():
        same(remote.forward(texts[0]).logits, local.module(ids_).logits)
        batch = local.tokenizer(texts, return_tensors="pt", padding=True)
        same(remote.forward(texts).logits, local.module(**batch).logits)
        local.tokenizer.padding_side = "left"
        left = local.tokenizer(texts, return_tensors="pt", padding=True)
        local.tokenizer.padding_side = "right"
        expected = local.module.generate(**left, max_new_tokens=3, do_sample=False)
    assert torch.equal(remote.generate(texts, max_new_tokens=3, do_sample=False), expected)
    with pytest.raises(TypeError, match="token ids"):
        remote.forward(3.5)


# -- traces and patterns ------------------------------------------------------------------------------


def hand_trace(module, tokens, loss_fn=None):
    """Each layer's output and MLP product by plain hooks on the unwrapped model; their gradients under ``loss_fn``."""
    hidden, products, handles = {}, {}, []
    for i, layer in enumerate(module.model.layers):
        handles.append(layer.register_forward_hook(lambda _m, _a, out, i=i: hidden.setdefault(i, out)))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(lambda _m, a, i=i: products.setdefault(i, a[0])))
    try:
        with torch.enable_grad():
            logits = module(tokens).logits
    finally:
        for handle in handles:
            handle.remove()
    layers = range(len(hidden))
    hidden = [hidden[i][0] if isinstance(hidden[i], tuple) else hidden[i] for i in layers]
    products = [products[i] for i in layers]
    if loss_fn is None:
        return logits, hidden, products, None, None
    loss = loss_fn(logits)
    return logits, hidden, products, torch.autograd.grad(loss, products), loss.item()


def test_run_traces_remotely_in_one_request(remote, local):
    tokens = ids(40, rows=2)
    remote.clear_recordings()
    remote.forward(tokens, probes=[nt.probe(MUL, nt.Mean(dims=(0, 1)))])
    before = remote.recordings()
    out, trace = remote.run(
        tokens,
        record=["blocks.*.resid_post", "model.layers.*.mlp.mul"],
        probes=[nt.probe("model.layers.1.output", nt.Norm())],
    )
    logits, hidden, products, _, _ = hand_trace(local.module, tokens)
    same(out.logits, logits)
    in_order = [(f"model.layers.{i}.mlp.mul", f"blocks.{i}.resid_post") for i in range(2)]
    assert trace.points == [name for pair in in_order for name in pair]
    same(trace.stack("blocks.*.resid_post"), torch.stack(hidden))
    same(trace.stack("model.layers.*.mlp.mul"), torch.stack(products))
    assert trace.loss is None and len(trace.grad) == 0
    # the trace went back with the answer; the session holds what it held, and the request's own probe
    after = remote.recordings()
    assert set(after) == {MUL, "model.layers.1.output"}
    same(after[MUL]["mean"], before[MUL]["mean"])
    same(after["model.layers.1.output"]["norm"], [hidden[1].norm(dim=-1)])
    remote.clear_recordings()
    # readings: what the patch reads of each value is computed on the server, and only that comes back
    out, trace = remote.run(
        tokens,
        record={"blocks.*.resid_post": nt.Norm(), "lm_head.output": nt.Probability(5, index=(slice(None), -1))},
        outputs=[],
    )
    assert out is None and trace.points == ["blocks.0.resid_post", "blocks.1.resid_post", "lm_head.output"]
    same(trace.stack("blocks.*.resid_post"), torch.stack([h.norm(dim=-1) for h in hidden]))
    same(trace["lm_head.output"], torch.softmax(logits[:, -1], dim=-1)[:, 5])
    assert not remote.recordings()


def test_run_with_a_loss_remotely(remote, local):
    tokens = ids(41, rows=2)
    targets = torch.roll(tokens, -1, dims=1)
    out, trace = remote.run(
        tokens, record="blocks.{0..1}.resid_post", grad="model.layers.*.mlp.mul", loss=CrossEntropy(targets)
    )

    def cross_entropy(logits):
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())

    logits, hidden, _, grads, loss = hand_trace(local.module, tokens, cross_entropy)
    assert trace.loss == pytest.approx(loss, rel=1e-5)
    same(out.logits, logits)
    same(trace.stack("blocks.*.resid_post"), torch.stack(hidden))
    assert trace.grad.points == ["model.layers.0.mlp.mul", "model.layers.1.mlp.mul"]
    same(trace.grad.stack("model.layers.*.mlp.mul"), torch.stack(grads))
    assert remote.recordings() == {}
    with pytest.raises(nt.NeurotapError, match="loss=nt.CrossEntropy"):
        remote.run(tokens, grad="blocks.0.resid_post")


def test_traces_of_concurrent_clients_are_their_own(server, local):
    """Requests of several lengths may share a padded pass: each trace holds its own rows at 1e-5."""
    clients = 4

    def work(c: int, rm):
        return rm.run(ids(500 + c, rows=1 + c % 2, length=4 + 3 * c), record="blocks.*.resid_post")[1]

    got = concurrently(server.url, clients, work)
    for c in range(clients):
        _, hidden, _, _, _ = hand_trace(local.module, ids(500 + c, rows=1 + c % 2, length=4 + 3 * c))
        same(got[c].stack("blocks.*.resid_post"), torch.stack(hidden))


def test_patterns_remotely(remote, local):
    tokens = ids(42)
    zero = {"model.layers.*.mlp.mul": nt.Zero()}
    remote.clear_recordings()
    with remote.patch(zero):
        out = remote.forward(tokens, probes=[nt.probe("blocks.{0..1}.resid_post", nt.Record())])
    handles = [
        layer.mlp.down_proj.register_forward_pre_hook(lambda _m, a: (torch.zeros_like(a[0]),))
        for layer in local.module.model.layers
    ]
    try:
        _, hidden, _, _, _ = hand_trace(local.module, tokens)
        with torch.no_grad():
            expected = local.module(tokens).logits
    finally:
        for handle in handles:
            handle.remove()
    same(out.logits, expected)
    recorded = remote.recordings()
    assert list(recorded) == ["blocks.0.resid_post", "blocks.1.resid_post"]  # the concrete names
    same([recorded[f"blocks.{i}.resid_post"][KEY][0] for i in range(2)], hidden)
    assert remote.points("model.layers.*.mlp.mul") == local.points("model.layers.*.mlp.mul")
    with pytest.raises(nt.UnknownPointError, match="closest: model.layers"):
        with remote.patch({"model.layers.*.mlp.mull": nt.Zero()}):
            pass
    with pytest.raises(nt.UnknownPointError, match="no point matches 'model.layers.*.mul'"):
        remote.forward(tokens, probes=[nt.probe("model.layers.*.mul", nt.Record())])
    remote.clear_recordings()
