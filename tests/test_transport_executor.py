"""The in-process executor: a shared pass gives every request exactly what it gets alone."""

from __future__ import annotations

import pytest
import torch
import transformers

import neurotap as nt
from neurotap.transport.executor import InProcessExecutor
from neurotap.transport.wire import CrossEntropy, ProbeSpec, RunRequest

VOCAB = 128


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def module() -> torch.nn.Module:
    return tiny_llama()


def ids(seed: int, rows: int = 1, length: int = 6) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def requests() -> list[RunRequest]:
    """Four sessions whose probes read and write the same points differently."""
    mul = "model.layers.0.mlp.mul"
    return [
        RunRequest("forward", (ids(1),), {}, [ProbeSpec(mul, nt.Mean(dims=(0, 1)))], session="a"),
        RunRequest(
            "forward",
            (ids(2, rows=2),),
            {},
            [ProbeSpec(mul, nt.Scale(0.0, index=(..., slice(0, 10)))), ProbeSpec(mul, nt.Record())],
            session="b",
        ),
        RunRequest(
            "forward",
            (ids(3),),
            {},
            [ProbeSpec("model.layers.1.output", nt.Replace(torch.ones(64), index=(0, 2))), ProbeSpec(mul, nt.TopK(3))],
            session="c",
        ),
        RunRequest("forward", (ids(4),), {}, [], ["logits"], session="d"),
    ]


def alone(module: torch.nn.Module, request: RunRequest) -> tuple[dict, dict]:
    """The request run through a plain local nt.Model: its output and its recordings."""
    model = nt.wrap(module)
    with torch.no_grad():
        output = model.forward(*request.args, probes=[nt.probe(s.point, s.fn, grad=s.grad) for s in request.probes])
    return output, {name: dict(ctx) for name, ctx in model.recordings().items()}


def assert_same(actual, expected) -> None:
    if isinstance(expected, torch.Tensor):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_same(a, e)
    elif isinstance(expected, dict):
        assert set(actual) == set(expected)
        for key in expected:
            assert_same(actual[key], expected[key])
    else:
        assert actual == expected


def test_shared_pass_equals_each_request_alone(module):
    executor = InProcessExecutor(nt.wrap(module))
    batch = requests()
    results = executor.execute(batch)
    assert executor.passes == 1, "four forwards of the same length share one pass"
    for request, result in zip(batch, results):
        assert result.error is None, result.error
        output, recordings = alone(module, request)
        assert_same(result.output["logits"], output.logits)
        assert_same(executor.recordings(request.session), recordings)


def test_a_failing_probe_fails_only_its_request(module):
    executor = InProcessExecutor(nt.wrap(module))
    batch = requests()
    batch[1].probes.append(ProbeSpec("model.layers.0.mlp.mul", nt.Replace(torch.ones(3))))  # wrong shape
    results = executor.execute(batch)
    assert results[1].error is not None and results[1].error.status == 422
    assert "shape" in results[1].error.message
    assert executor.recordings("b") == {}, "a failed request records nothing"
    for k in (0, 2, 3):
        output, recordings = alone(module, batch[k])
        assert_same(results[k].output["logits"], output.logits)
        assert_same(executor.recordings(batch[k].session), recordings)


def test_values_without_batch_dimension_fall_back_to_one_pass_each(module):
    executor = InProcessExecutor(nt.wrap(module))
    rotary = "model.rotary_emb.output[0]"  # [1, T, d] for every batch size
    batch = [
        RunRequest("forward", (ids(5),), {}, [ProbeSpec(rotary, nt.Record())], session="a"),
        RunRequest("forward", (ids(6),), {}, [ProbeSpec(rotary, nt.Scale(2.0))], session="b"),
    ]
    results = executor.execute(batch)
    assert executor.passes == 3  # the shared try, then each alone
    for request, result in zip(batch, results):
        output, recordings = alone(module, request)
        assert_same(result.output["logits"], output.logits)
        assert_same(executor.recordings(request.session), recordings)


def test_shared_backward_gives_each_request_its_own_gradients(module):
    executor = InProcessExecutor(nt.wrap(module))
    point = "model.layers.0.output"
    batch = []
    for k in range(3):
        tokens = ids(10 + k)
        targets = torch.roll(tokens, -1, dims=1)
        batch.append(
            RunRequest(
                "backward",
                (tokens,),
                {},
                [ProbeSpec(point, nt.Record(), grad=True)],
                [],
                CrossEntropy(targets),
                session=str(k),
            )
        )
    results = executor.execute(batch)
    assert executor.passes == 1
    for request, result in zip(batch, results):
        captured = {}
        handle = module.model.layers[0].register_forward_hook(lambda _m, _a, out, c=captured: c.setdefault("h", out))
        try:
            logits = module(*request.args).logits
        finally:
            handle.remove()
        hidden = captured["h"][0] if isinstance(captured["h"], tuple) else captured["h"]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), request.loss.targets.flatten())
        (expected,) = torch.autograd.grad(loss, hidden)
        assert result.loss == pytest.approx(loss.item(), rel=1e-5)
        torch.testing.assert_close(executor.recordings(request.session)[point + ".grad"][nt.Record().key][0], expected)
    assert all(p.grad is None for p in module.parameters())


def test_same_session_requests_keep_their_order(module):
    executor = InProcessExecutor(nt.wrap(module))
    point = "model.layers.1.output"
    first = RunRequest("forward", (ids(20),), {}, [ProbeSpec(point, nt.Record())], session="s")
    second = RunRequest("forward", (ids(21),), {}, [ProbeSpec(point, nt.Record())], session="s")
    executor.execute([first, second])
    assert executor.passes == 2, "one session's requests never share a pass"
    local = nt.wrap(module)
    with torch.no_grad():
        for request in (first, second):
            local.forward(*request.args, probes=[nt.probe(point, nt.Record())])
    assert_same(executor.recordings("s")[point][nt.Record().key], local.recordings()[point][nt.Record().key])
