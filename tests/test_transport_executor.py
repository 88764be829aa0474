"""The in-process executor: a shared pass gives every request exactly what it gets alone."""

from __future__ import annotations

import pytest
import torch

import neurotap as nt
from conftest import VOCAB, tiny_llama
from neurotap.transport.executor import InProcessExecutor
from neurotap.transport.wire import CrossEntropy, LogitDiff, ProbeSpec, RunRequest


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


def assert_each_as_alone(module, executor, batch, results) -> None:
    """Each request's logits and recordings from a shared pass equal those of the request run alone."""
    for request, result in zip(batch, results):
        assert result.error is None, result.error
        output, recordings = alone(module, request)
        assert_same(result.output["logits"], output.logits)
        assert_same(executor.recordings(request.session), recordings)


def test_shared_pass_equals_each_request_alone(module):
    executor = InProcessExecutor(nt.wrap(module))
    batch = requests()
    results = executor.execute(batch)
    assert executor.passes == 1, "four forwards of the same length share one pass"
    assert_each_as_alone(module, executor, batch, results)


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


def test_a_backward_computes_only_the_probed_gradients_and_leaves_weight_grads_alone(module):
    executor = InProcessExecutor(nt.wrap(module))
    point = "model.layers.1.mlp.mul"
    tokens = ids(20)
    loss = LogitDiff(3, 5)
    marker = {name: torch.full_like(p, 7.0) for name, p in module.named_parameters()}
    computed = []  # every weight whose gradient autograd computes
    handles = []
    for name, parameter in module.named_parameters():
        parameter.grad = marker[name]
        handles.append(parameter.register_hook(lambda grad, name=name: computed.append(name)))
    try:
        (result,) = executor.execute(
            [RunRequest("backward", (tokens,), {}, [ProbeSpec(point, nt.Record(), grad=True)], [], loss, session="g")]
        )
    finally:
        for handle in handles:
            handle.remove()
    assert result.error is None, result.error
    assert computed == []
    assert all(p.grad is marker[name] for name, p in module.named_parameters())
    for parameter in module.parameters():
        parameter.grad = None
    captured = {}
    handle = module.model.layers[1].mlp.down_proj.register_forward_pre_hook(
        lambda _m, args: captured.setdefault("x", args[0])
    )
    try:
        logits = module(tokens).logits
    finally:
        handle.remove()
    expected_loss = (logits[:, -1, 3] - logits[:, -1, 5]).mean()
    (expected,) = torch.autograd.grad(expected_loss, captured["x"])
    assert result.loss == pytest.approx(expected_loss.item(), rel=1e-5)
    torch.testing.assert_close(executor.recordings("g")[point + ".grad"][nt.Record().key][0], expected)


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


# -- inputs of different lengths -------------------------------------------------------------------
# Padding changes the order of float sums in matmuls, so these compare at atol=rtol=1e-5 (float32);
# shapes must match exactly, so nothing from a padded position can slip into an output or a recording.

RESIDUAL = "model.layers.0.output"
MUL = "model.layers.0.mlp.mul"
SOFTMAX = "model.layers.1.self_attn.attention_interface.softmax"


def mixed_requests() -> list[RunRequest]:
    """Requests of lengths 3 to 11 reading and writing a residual, an MLP op and the attention probabilities."""
    direction = torch.randn(64, generator=torch.Generator().manual_seed(7))
    return [
        RunRequest(
            "forward",
            (ids(31, length=3),),
            {},
            [
                ProbeSpec(RESIDUAL, nt.Record()),
                ProbeSpec(RESIDUAL, nt.Mean(dims=(0, 1))),
                ProbeSpec(MUL, nt.TopK(3)),
                ProbeSpec(SOFTMAX, nt.Record()),
            ],
            session="a",
        ),
        RunRequest(
            "forward",
            (ids(32, rows=2, length=8),),
            {},
            [
                ProbeSpec(RESIDUAL, nt.Zero(index=(..., -1, slice(0, 8)))),
                ProbeSpec(RESIDUAL, nt.Sum(dims=1)),
                ProbeSpec(RESIDUAL, nt.Max(dims=(0, 1))),
                ProbeSpec(MUL, nt.Record()),
                ProbeSpec(SOFTMAX, nt.Mean(dims=(0, 1))),
            ],
            session="b",
        ),
        RunRequest(
            "forward",
            (ids(33, length=5),),
            {},
            [
                ProbeSpec(MUL, nt.Add(torch.full((128,), 0.25))),
                ProbeSpec(MUL, nt.Norm()),
                ProbeSpec(RESIDUAL, nt.Project(direction)),
                ProbeSpec(RESIDUAL, nt.TopK(2, dim=1)),
                ProbeSpec(SOFTMAX, nt.Replace(torch.tensor(0.5), index=(0, 1, -1))),
                ProbeSpec(SOFTMAX, nt.Record()),
            ],
            session="c",
        ),
        RunRequest(
            "forward",
            (ids(34, length=11),),
            {},
            [ProbeSpec(RESIDUAL, nt.Replace(torch.ones(64), index=(0, 2))), ProbeSpec(SOFTMAX, nt.Max(dims=1))],
            ["logits"],
            session="d",
        ),
    ]


def test_mixed_lengths_share_one_padded_pass(module):
    executor = InProcessExecutor(nt.wrap(module))
    batch = mixed_requests()
    results = executor.execute(batch)
    assert (executor.passes, executor.padded_passes) == (1, 1)
    for request, result in zip(batch, results):
        assert result.error is None, result.error
        output, recordings = alone(module, request)
        assert result.output["logits"].shape == request.args[0].shape + (VOCAB,)
        assert_same(result.output["logits"], output.logits)
        assert_same(executor.recordings(request.session), recordings)


def test_a_failing_probe_in_a_padded_pass_fails_only_its_request(module):
    executor = InProcessExecutor(nt.wrap(module))
    batch = mixed_requests()
    batch[2].probes.append(ProbeSpec(RESIDUAL, nt.Replace(torch.ones(3))))  # fits no residual
    results = executor.execute(batch)
    assert results[2].error is not None and "shape" in results[2].error.message
    assert executor.recordings("c") == {}
    assert executor.padded_passes == 2  # the try with it, then the others again
    for k in (0, 1, 3):
        output, recordings = alone(module, batch[k])
        assert_same(results[k].output["logits"], output.logits)
        assert_same(executor.recordings(batch[k].session), recordings)


def backward_alone(module: torch.nn.Module, request: RunRequest) -> tuple[float, dict]:
    """The request's loss and gradient recordings from a plain local nt.Model and loss.backward()."""
    model = nt.wrap(module)
    output = model.forward(*request.args, probes=[nt.probe(s.point, s.fn, grad=s.grad) for s in request.probes])
    loss = request.loss(output.logits)
    loss.backward()
    module.zero_grad(set_to_none=True)
    return loss.item(), {name: dict(ctx) for name, ctx in model.recordings().items()}


def test_mixed_length_backward_gives_each_request_its_own_gradients(module):
    executor = InProcessExecutor(nt.wrap(module))
    batch = []
    for k, (rows, length) in enumerate([(1, 4), (2, 9), (1, 6)]):
        tokens = ids(40 + k, rows=rows, length=length)
        targets = torch.roll(tokens, -1, dims=1)
        targets[:, -1] = -100
        loss = CrossEntropy(targets) if k != 1 else LogitDiff(5, 9, position=-2)
        probes = [ProbeSpec(RESIDUAL, nt.Record(), grad=True), ProbeSpec(SOFTMAX, nt.Record(), grad=True)]
        if k == 2:  # a replaced gradient flows on into this request's rows and positions only
            probes.insert(0, ProbeSpec("model.layers.1.output", nt.Scale(3.0, index=(..., -2, slice(None))), grad=True))
        batch.append(RunRequest("backward", (tokens,), {}, probes, [], loss, session=str(k)))
    results = executor.execute(batch)
    assert (executor.passes, executor.padded_passes) == (1, 1)
    for request, result in zip(batch, results):
        assert result.error is None, result.error
        expected_loss, expected = backward_alone(module, request)
        assert result.loss == pytest.approx(expected_loss, rel=1e-5, abs=1e-6)
        assert_same(executor.recordings(request.session), expected)
    assert all(p.grad is None for p in module.parameters())


def test_a_mask_the_request_sent_is_respected(module):
    executor = InProcessExecutor(nt.wrap(module))
    holes = torch.ones(1, 7, dtype=torch.long)
    holes[0, :2] = 0  # left padding of its own: positions that see nothing differ once padded, so it runs alone
    batch = [
        RunRequest("forward", (ids(50, length=4),), {"attention_mask": torch.ones(1, 4)}, [], session="a"),
        RunRequest("forward", (ids(51, length=7),), {"attention_mask": torch.ones(1, 7)}, [], session="b"),
        RunRequest("forward", (ids(52, length=7),), {"attention_mask": holes}, [], session="c"),
    ]
    batch = [RunRequest(r.op, r.args, r.kwargs, [ProbeSpec(SOFTMAX, nt.Record())], session=r.session) for r in batch]
    results = executor.execute(batch)
    assert (executor.passes, executor.padded_passes) == (2, 1)
    for request, result in zip(batch, results):
        model = nt.wrap(module)
        with torch.no_grad():
            output = model.forward(*request.args, probes=[nt.probe(SOFTMAX, nt.Record())], **request.kwargs)
        assert_same(result.output["logits"], output.logits)
        assert_same(executor.recordings(request.session), {name: dict(c) for name, c in model.recordings().items()})


class Pooled(torch.nn.Module):
    """A causal toy whose ``summary`` has rows but no positions."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.embed = torch.nn.Embedding(VOCAB, 16)
        self.summary = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, VOCAB)

    def run(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(input_ids)
        return self.head(hidden + self.summary(hidden[:, 0])[:, None])


class PooledWithMask(Pooled):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.run(input_ids)


class PooledWithoutMask(Pooled):
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.run(input_ids)


def run_toy(executor: InProcessExecutor, batch: list[RunRequest], toy: torch.nn.Module) -> None:
    results = executor.execute(batch)
    for request, result in zip(batch, results):
        assert result.error is None, result.error
        model = nt.wrap(toy, example=ids(0))
        with torch.no_grad():
            output = model.forward(*request.args, probes=[nt.probe(s.point, s.fn) for s in request.probes])
        assert_same(result.output, output)
        assert_same(executor.recordings(request.session), {n: dict(c) for n, c in model.recordings().items()})


def test_values_without_positions_keep_their_requests_unpadded(module):
    toy = PooledWithMask()
    executor = InProcessExecutor(nt.wrap(toy, example=ids(0)))
    batch = [
        RunRequest("forward", (ids(60, length=4),), {}, [ProbeSpec("summary.output", nt.Record())], session="a"),
        RunRequest("forward", (ids(61, length=6),), {}, [ProbeSpec("summary.output", nt.Scale(2.0))], session="b"),
        RunRequest("forward", (ids(62, length=4),), {}, [ProbeSpec("head.output", nt.Record())], session="c"),
        RunRequest("forward", (ids(63, length=6),), {}, [ProbeSpec("embed.output", nt.Zero())], session="d"),
    ]
    run_toy(executor, batch, toy)
    assert (executor.passes, executor.padded_passes) == (3, 1), "a alone, b alone, c and d padded"
    # the rotary tables have no batch dimension: each length runs on its own
    executor = InProcessExecutor(nt.wrap(module))
    rotary = "model.rotary_emb.output[0]"
    batch = [
        RunRequest("forward", (ids(64, length=4),), {}, [ProbeSpec(rotary, nt.Record())], session="a"),
        RunRequest("forward", (ids(65, length=6),), {}, [ProbeSpec(rotary, nt.Record())], session="b"),
    ]
    results = executor.execute(batch)
    assert (executor.passes, executor.padded_passes) == (2, 0)
    for request, result in zip(batch, results):
        output, recordings = alone(module, request)
        assert_same(result.output["logits"], output.logits)
        assert_same(executor.recordings(request.session), recordings)


def test_models_without_attention_mask_batch_only_equal_lengths():
    toy = PooledWithoutMask()
    executor = InProcessExecutor(nt.wrap(toy, example=ids(0)))
    batch = [
        RunRequest(
            "forward", (ids(70 + k, length=length),), {}, [ProbeSpec("head.output", nt.Record())], session=str(k)
        )
        for k, length in enumerate([4, 6, 4])
    ]
    run_toy(executor, batch, toy)
    assert (executor.passes, executor.padded_passes) == (2, 0)


class Windowed(Pooled):
    """Position-wise, but ``summary`` covers only the first 8 positions: readings at 5 and 7 cannot tell."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.embed(input_ids)
        window = self.summary(hidden[:, :8])
        return self.head(torch.cat([hidden[:, :8] + window, hidden[:, 8:]], dim=1))


def test_a_value_laid_out_otherwise_than_read_falls_back_to_its_own_length():
    toy = Windowed()
    executor = InProcessExecutor(nt.wrap(toy, example=ids(0)))
    batch = [
        RunRequest("forward", (ids(80, length=4),), {}, [ProbeSpec("summary.output", nt.Record())], session="a"),
        RunRequest("forward", (ids(81, length=10),), {}, [ProbeSpec("summary.output", nt.Scale(2.0))], session="b"),
    ]
    run_toy(executor, batch, toy)
    assert (executor.passes, executor.padded_passes) == (3, 1), "the padded try, then each length on its own"


def test_requests_in_one_pass_share_the_memory_budget(module):
    from neurotap.transport.limits import Limits, ModelShape, estimate

    batch = requests()
    together = sum(estimate(r, ModelShape.of(module))[1] for r in batch)
    executor = InProcessExecutor(nt.wrap(module), limits=Limits(max_request_memory=together - 1))
    results = executor.execute(batch)
    assert executor.passes == 2, "four requests that do not fit the budget together take two passes"
    for request, result in zip(batch, results):
        output, recordings = alone(module, request)
        assert_same(result.output["logits"], output.logits)
        assert_same(executor.recordings(request.session), recordings)


def test_greedy_generations_share_a_pass_and_each_stops_where_it_would_alone(module):
    mul = "model.layers.0.mlp.mul"
    prompts = [ids(30 + k, rows=1 + k % 2) for k in range(4)]
    with torch.no_grad():
        first = nt.wrap(module).generate(prompts[0], max_new_tokens=8, do_sample=False)
    eos = [int(first[0, prompts[0].shape[1] + 2])]  # the first request ends at its third token
    settings = {"max_new_tokens": 8, "do_sample": False, "eos_token_id": eos, "pad_token_id": 0}
    batch = [
        RunRequest("generate", (prompts[0],), dict(settings), [ProbeSpec(mul, nt.Record())], session="a"),
        RunRequest("generate", (prompts[1],), dict(settings), [ProbeSpec(mul, nt.Zero(index=(..., 3)))], session="b"),
        RunRequest("generate", (prompts[2],), dict(settings), [ProbeSpec(mul, nt.Mean(dims=(0, 1)))], session="c"),
        RunRequest("generate", (prompts[3],), dict(settings), [], session="d"),
    ]
    executor = InProcessExecutor(nt.wrap(module))
    results = executor.execute(batch)
    assert executor.passes == 1
    for request, result in zip(batch, results):
        assert result.error is None, result.error
        model = nt.wrap(module)
        with torch.no_grad():
            expected = model.generate(
                *request.args, probes=[nt.probe(s.point, s.fn) for s in request.probes], **request.kwargs
            )
        assert torch.equal(result.output, expected)
        assert_same(executor.recordings(request.session), {n: dict(c) for n, c in model.recordings().items()})
    assert results[0].output.shape[1] == prompts[0].shape[1] + 3


def test_a_request_that_patches_a_weight_runs_alone(module):
    weight = "model.layers.0.mlp.down_proj.weight"
    batch = requests()
    batch[1].probes.append(ProbeSpec(weight, nt.Scale(0.5)))
    executor = InProcessExecutor(nt.wrap(module))
    results = executor.execute(batch)
    assert executor.passes == 2, "the others share a pass; the weight's request runs on its own"
    assert_each_as_alone(module, executor, batch, results)


def test_a_request_that_skips_a_layer_runs_alone_and_the_layer_passes_its_input_on(module):
    batch = requests()
    batch[1].probes.append(ProbeSpec("model.layers.1.output", nt.Skip()))
    executor = InProcessExecutor(nt.wrap(module))
    results = executor.execute(batch)
    assert executor.passes == 2, "the others share a pass; the skip's request runs on its own"
    # by hand: layer 1 returns the hidden states it was given, after the same edit of layer 0's MLP product
    mlp = module.model.layers[0].mlp

    def product_scaled(m, args, out):
        x = args[0]
        product = m.act_fn(m.gate_proj(x)) * m.up_proj(x)
        product[..., :10] = 0.0
        return m.down_proj(product)

    handles = [
        mlp.register_forward_hook(product_scaled),
        module.model.layers[1].register_forward_hook(
            lambda m, args, kwargs, out: args[0] if args else kwargs["hidden_states"], with_kwargs=True
        ),
    ]
    try:
        with torch.no_grad():
            expected = module(batch[1].args[0]).logits
    finally:
        for handle in handles:
            handle.remove()
    assert_same(results[1].output["logits"], expected)
    for request, result in zip(batch, results):
        assert result.error is None, result.error
        if request is not batch[1]:
            assert_same(result.output["logits"], alone(module, request)[0].logits)
