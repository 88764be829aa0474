"""``Model.backward``: the built-in losses, gradients at points, and weights left alone."""

from __future__ import annotations

import pytest
import torch

import neurotap as nt
from conftest import VOCAB, assert_clean, example_inputs, snapshot_state, tiny_llama, tiny_module

POINT = "model.layers.1.mlp.mul"


@pytest.fixture(scope="module")
def llama() -> nt.Model:
    return nt.wrap(tiny_module("llama"))


def autograd_at_mul(module: torch.nn.Module, ids: torch.Tensor, loss_of_logits) -> tuple[torch.Tensor, torch.Tensor]:
    captured = {}
    handle = module.model.layers[1].mlp.down_proj.register_forward_pre_hook(
        lambda _m, args: captured.setdefault("x", args[0])
    )
    try:
        loss = loss_of_logits(module(ids).logits)
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(loss, captured["x"])
    return loss.detach(), grad


def test_cross_entropy_backward_gives_the_autograd_gradient(llama):
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    targets = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    expected_loss, expected = autograd_at_mul(
        llama.module,
        ids,
        lambda logits: torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100),
    )
    llama.clear_recordings()
    loss = llama.backward(ids, loss=nt.CrossEntropy(targets), probes=[nt.probe(POINT, nt.Record(), grad=True)])
    assert loss == pytest.approx(expected_loss.item(), rel=1e-6)
    assert torch.allclose(llama.recordings()[POINT + ".grad"]["record"][0], expected, atol=1e-7)


def test_logit_diff_backward_and_weights_keep_their_grad(llama):
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(2))
    weight = llama.get_parameter("model.layers.0.mlp.up_proj.weight")
    weight.grad = torch.full_like(weight, 3.0)
    expected_loss, expected = autograd_at_mul(llama.module, ids, lambda logits: logits[0, -1, 5] - logits[0, -1, 9])
    llama.clear_recordings()
    loss = llama.backward(ids, loss=nt.LogitDiff(correct=5, wrong=9), probes=[nt.probe(POINT, nt.Record(), grad=True)])
    assert loss == pytest.approx(expected_loss.item(), rel=1e-6)
    assert torch.allclose(llama.recordings()[POINT + ".grad"]["record"][0], expected, atol=1e-7)
    assert torch.equal(weight.grad, torch.full_like(weight, 3.0))
    weight.grad = None
    assert all(p.grad is None for name, p in llama.module.named_parameters() if "up_proj" not in name)


def test_backward_refuses_a_loss_that_is_neither_built_in_nor_a_function(llama):
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(TypeError, match="CrossEntropy"):
        llama.backward(ids, loss="cross-entropy")
    with pytest.raises(nt.NeurotapError, match="one number"):
        llama.backward(ids, loss=lambda output: output.logits, probes=[nt.probe(POINT, nt.Record(), grad=True)])
    assert_clean(llama.module)


def test_backward_computes_only_what_the_probes_ask_for(llama):
    """Gradients at two points equal torch.autograd.grad; no weight's .grad is touched, set or not."""
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))
    module = llama.module
    seen = {}
    handles = [
        module.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda _m, a: seen.setdefault("mul", a[0])),
        module.model.layers[0].register_forward_hook(lambda _m, _a, out: seen.setdefault("layer", out)),
    ]
    try:
        logits = module(ids).logits
    finally:
        for handle in handles:
            handle.remove()
    loss = logits[:, -1].logsumexp(-1).sum()
    weight = module.get_parameter("model.layers.0.mlp.up_proj.weight")
    expected = torch.autograd.grad(loss, [seen["mul"], seen["layer"], weight])
    weight.grad = torch.full_like(weight, 3.0)
    llama.clear_recordings()
    probes = [
        nt.probe(POINT, nt.Record(), grad=True),
        nt.probe("model.layers.0.output", nt.Record(), grad=True),
        nt.probe("model.layers.0.mlp.up_proj.weight", nt.Record(), grad=True),
    ]
    value = llama.backward(ids, loss=lambda output: output.logits[:, -1].logsumexp(-1).sum(), probes=probes)
    assert value == pytest.approx(loss.item(), rel=1e-6)
    recorded = llama.recordings()
    for name, want in zip([POINT, "model.layers.0.output", "model.layers.0.mlp.up_proj.weight"], expected):
        assert torch.allclose(recorded[name + ".grad"]["record"][0], want, atol=1e-6), name
    assert torch.equal(weight.grad, torch.full_like(weight, 3.0))
    weight.grad = None
    assert all(p.grad is None for p in module.parameters())
    assert_clean(module)


def test_gradient_probes_work_on_frozen_weights():
    """With no weight requiring grad, the probed values themselves become where the gradient starts."""
    module = tiny_llama()
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(5))
    expected_loss, expected = autograd_at_mul(module, ids, lambda logits: logits[0, -1, 5] - logits[0, -1, 9])
    state = snapshot_state(module)
    module.requires_grad_(False)
    model = nt.wrap(module)
    probes = [
        nt.probe(POINT, nt.Record(), grad=True),
        nt.probe("model.layers.0.mlp.up_proj.weight", nt.Record(), grad=True),
    ]
    loss = model.backward(ids, loss=nt.LogitDiff(correct=5, wrong=9), probes=probes)
    assert loss == pytest.approx(expected_loss.item(), rel=1e-6)
    assert torch.allclose(model.recordings()[POINT + ".grad"]["record"][0], expected, atol=1e-7)
    weight_grad = model.recordings()["model.layers.0.mlp.up_proj.weight.grad"]["record"][0]
    assert weight_grad.shape == module.model.layers[0].mlp.up_proj.weight.shape and weight_grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in module.parameters())
    assert_clean(module, state)


def test_backward_gives_a_patch_delta_its_gradient():
    """An Add's delta that requires grad gets .grad as loss.backward() would give it; the weights get none."""
    module = tiny_llama()
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(6))
    delta = torch.linspace(-0.5, 0.5, 64, requires_grad=True)
    handle = module.model.layers[0].register_forward_hook(lambda _m, _a, out: out + delta)
    try:
        loss = module(ids).logits[0, -1, 5]
    finally:
        handle.remove()
    (expected,) = torch.autograd.grad(loss, delta)
    model = nt.wrap(module)
    model.backward(
        ids, loss=lambda output: output.logits[0, -1, 5], probes=[nt.probe("model.layers.0.output", nt.Add(delta))]
    )
    assert torch.allclose(delta.grad, expected, atol=1e-6)
    with model.patch({"model.layers.0.output": nt.Add(delta)}):
        model.backward(ids, loss=lambda output: output.logits[0, -1, 5])
    assert torch.allclose(delta.grad, 2 * expected, atol=1e-6)  # accumulated, as backward() accumulates
    assert all(p.grad is None for p in module.parameters())
    assert_clean(module)


def test_backward_with_a_loss_on_a_model_without_logits():
    """A base encoder returns hidden states, not logits: a function of the output is the loss."""
    bert = nt.wrap(tiny_module("bert"))
    inputs = example_inputs("bert")
    seen = {}
    handle = bert.module.encoder.layer[0].register_forward_hook(lambda _m, _a, out: seen.setdefault("out", out))
    try:
        output = bert.module(**inputs)
    finally:
        handle.remove()
    hidden = seen["out"][0] if isinstance(seen["out"], tuple) else seen["out"]
    (expected,) = torch.autograd.grad(output.last_hidden_state.pow(2).mean(), hidden)
    grads = []
    bert.backward(
        **inputs,
        loss=lambda out: out.last_hidden_state.pow(2).mean(),
        probes=[nt.probe("encoder.layer.0.output", lambda ctx, g: grads.append(g), grad=True)],
    )
    got = grads[0][0] if isinstance(grads[0], tuple) else grads[0]
    assert torch.allclose(got, expected, atol=1e-7)
    assert_clean(bert.module)


# -- gradient checkpointing -----------------------------------------------------------------------

MUL_0 = "model.layers.0.mlp.mul"
MLP_1 = "model.layers.1.mlp.output"


def _checkpointed_llama(reentrant: bool | None) -> torch.nn.Module:
    """A fresh tiny Llama in train mode (checkpointing only acts there; it has no dropout), checkpointed if asked."""
    module = tiny_llama().train()
    if reentrant is not None:
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    return module


def _hooks(module: torch.nn.Module) -> dict[str, tuple]:
    return {path: (tuple(sub._forward_pre_hooks), tuple(sub._forward_hooks)) for path, sub in module.named_modules()}


def _assert_as_before(module: torch.nn.Module, hooks: dict[str, tuple], state=None) -> None:
    """assert_clean, for a model that has hooks of its own (checkpointing adds one on the embeddings)."""
    assert _hooks(module) == hooks
    for path, sub in module.named_modules():
        assert not {"forward", "__reduce_ex__"} & sub.__dict__.keys(), path
        assert not [key for key in sub.__dict__ if key.startswith("_neurotap")], path
    if state is not None:
        assert all(torch.equal(module.state_dict()[key], value) for key, value in state.items())


def _by_hand(ids: torch.Tensor, delta: torch.Tensor):
    """The same edits with hand-written hooks on an unwrapped, uncheckpointed copy: the loss's gradients."""
    module = _checkpointed_llama(None)
    layer_0, layer_1 = module.model.layers[0].mlp, module.model.layers[1].mlp
    seen: dict[str, torch.Tensor] = {}

    def zero_unit_3(_m, args):
        seen["mul_0"] = args[0].detach().clone()
        value = args[0].clone()
        value[..., 3] = 0.0
        return (value,)

    def scale_and_add(_m, _args, output):
        output = output * 0.5
        edited = output.clone()
        edited[0, -1] = edited[0, -1] + delta
        return edited

    def keep_mul_1(_m, args):
        seen["mul_1"] = args[0]

    handles = [
        layer_0.down_proj.register_forward_pre_hook(zero_unit_3),
        layer_1.register_forward_hook(scale_and_add),
        layer_1.down_proj.register_forward_pre_hook(keep_mul_1),
    ]
    try:
        loss = module(ids).logits[:, -1].pow(2).sum()
    finally:
        for handle in handles:
            handle.remove()
    parameters = dict(module.named_parameters())
    grads = torch.autograd.grad(loss, [*parameters.values(), delta, seen["mul_1"]])
    return dict(zip(parameters, grads[:-2], strict=True)), grads[-2], grads[-1], seen["mul_0"]


LATER = "forward, checkpointing turned on after a first call"


@pytest.mark.parametrize("how", ["forward", "patch", LATER])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpointed_layers_recompute_with_the_patches_on(reentrant, how):
    """Backward recomputes a checkpointed layer: patches and gradient probes act there too, reads run once."""
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    delta = torch.linspace(-1, 1, 64, requires_grad=True)
    expected_weights, expected_delta, expected_mul_1, expected_mul_0 = _by_hand(ids, delta)

    module = _checkpointed_llama(None if how == LATER else reentrant)
    model = nt.wrap(module)
    patches = {
        MUL_0: nt.Zero(index=(..., 3)),
        MLP_1: [nt.Scale(0.5), nt.Add(delta, index=(0, -1))],
        "model.layers.1.mlp.down_proj.output": nt.Record(),
    }
    reads = [nt.probe(MUL_0, nt.Record()), nt.probe("model.layers.1.mlp.mul", nt.Record(), grad=True)]
    probes = reads + [
        nt.probe(point, p) for point, ps in patches.items() for p in (ps if isinstance(ps, list) else [ps])
    ]
    if how == LATER:  # the same probes again: the call must see that checkpointing is on now
        model.forward(ids, probes=probes)
        model.clear_recordings()
        delta.grad = None
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    state, hooks = snapshot_state(module), _hooks(module)
    checkpoint = module.model.layers[0]._gradient_checkpointing_func
    if how != "patch":
        loss = model.forward(ids, probes=probes).logits[:, -1].pow(2).sum()
        loss.backward()
    else:
        with model.patch(patches):
            loss = model.forward(ids, probes=reads).logits[:, -1].pow(2).sum()
            loss.backward()
    for name, parameter in module.named_parameters():
        assert torch.allclose(parameter.grad, expected_weights[name], atol=1e-6), name
    assert torch.allclose(delta.grad, expected_delta, atol=1e-6)
    recorded = model.recordings()
    assert len(recorded[MUL_0]["record"]) == 1  # not again when backward recomputes layer 0
    if how == "patch":  # the block's patches run before the call's own probes
        expected_mul_0[..., 3] = 0.0
    assert torch.allclose(recorded[MUL_0]["record"][0], expected_mul_0, atol=1e-6)
    assert len(recorded["model.layers.1.mlp.mul.grad"]["record"]) == 1
    assert len(recorded["model.layers.1.mlp.down_proj.output"]["record"]) == 1
    assert torch.allclose(recorded["model.layers.1.mlp.mul.grad"]["record"][0], expected_mul_1, atol=1e-6)
    module.zero_grad(set_to_none=True)
    assert module.model.layers[0]._gradient_checkpointing_func is checkpoint
    _assert_as_before(module, hooks, state)


def test_a_checkpointed_backward_after_the_patch_block_keeps_its_patches():
    """The recompute belongs to the forward that ran: leaving the block before backward changes nothing."""
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    delta = torch.zeros(64, requires_grad=True)
    expected_weights, _, _, _ = _by_hand(ids, delta)
    module = _checkpointed_llama(False)
    hooks = _hooks(module)
    model = nt.wrap(module)
    with model.patch({MUL_0: nt.Zero(index=(..., 3)), MLP_1: [nt.Scale(0.5), nt.Add(delta, index=(0, -1))]}):
        loss = model(ids).logits[:, -1].pow(2).sum()
    _assert_as_before(module, hooks)
    loss.backward()
    for name, parameter in module.named_parameters():
        assert torch.allclose(parameter.grad, expected_weights[name], atol=1e-6), name
    _assert_as_before(module, hooks)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_a_probe_that_edits_and_saves_in_a_checkpointed_layer_saves_once(reentrant):
    """The recompute runs such a probe again for its edit only: what it saved there is thrown away."""
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    plain = _checkpointed_llama(None)

    def zero_unit_3(_m, args):
        value = args[0].clone()
        value[..., 3] = 0.0
        return (value,)

    handle = plain.model.layers[0].mlp.down_proj.register_forward_pre_hook(zero_unit_3)
    try:
        plain(ids).logits[:, -1].pow(2).sum().backward()
    finally:
        handle.remove()

    def edit_and_keep(ctx, value):
        ctx.calls = ctx.get("calls", 0) + 1
        ctx.kept = [*ctx.get("kept", []), value.detach().clone()]
        edited = value.clone()
        edited[..., 3] = 0.0
        return edited

    module = _checkpointed_llama(reentrant)
    hooks = _hooks(module)
    model = nt.wrap(module)
    model.forward(ids, probes=[nt.probe(MUL_0, edit_and_keep)]).logits[:, -1].pow(2).sum().backward()
    expected = dict(plain.named_parameters())
    for name, parameter in module.named_parameters():
        assert torch.allclose(parameter.grad, expected[name].grad, atol=1e-6), name
    saved = model.recordings()[MUL_0]
    assert saved["calls"] == 1 and len(saved["kept"]) == 1
    module.zero_grad(set_to_none=True)
    _assert_as_before(module, hooks)
