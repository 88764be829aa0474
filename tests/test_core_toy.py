"""The hand-written module: a submodule called twice in a loop (``ctx.call``), a helper
function and a ``self.`` helper, checked against the same forward written out by hand."""

from __future__ import annotations

import torch

import neurotap as nt
from conftest import Toy, assert_clean, example_inputs, snapshot_state, toy_by_hand


def _finish(toy: Toy, loop_1: torch.Tensor) -> torch.Tensor:
    gated = torch.tanh(loop_1) * 2.0 + 1.0
    return toy.head(gated - toy.down(torch.relu(toy.up(gated)) * 0.5)) / 3.0


def test_core_loop_calls_are_counted_and_patched_separately(toy) -> None:
    module = toy.module
    x = example_inputs("toy")["x"]
    calls: list[int] = []

    def second_only(ctx: nt.SaveContext, value: torch.Tensor) -> torch.Tensor | None:
        calls.append(ctx.call)
        return value * -1.0 if ctx.call == 1 else None

    with torch.no_grad():
        output = toy.forward(x=x, probes=[nt.probe("add", second_only), nt.probe("block.output", nt.Record())])
        steps = toy_by_hand(module, x)
        expected = _finish(module, -(steps["loop_0"] + module.block(steps["loop_0"])))
    assert calls == [0, 1]
    recorded = toy.recordings()["block.output"]["record"]
    assert len(recorded) == 2
    assert torch.equal(recorded[0], steps["block_0"])
    assert torch.equal(recorded[1], steps["block_1"])
    assert torch.allclose(output, expected, atol=1e-6, rtol=1e-5)


def test_core_patch_inside_helpers(toy) -> None:
    module = toy.module
    x = example_inputs("toy")["x"]
    with torch.no_grad(), toy.patch({"gate.tanh": nt.Zero(index=(..., 0)), "mix.relu": nt.Scale(0.0, index=(0,))}):
        output = toy(x=x)
    with torch.no_grad():
        steps = toy_by_hand(module, x)
        squashed = torch.tanh(steps["loop_1"])
        squashed[..., 0] = 0.0
        gated = squashed * 2.0 + 1.0
        relu = torch.relu(module.up(gated))
        relu[0] = 0.0
        expected = module.head(gated - module.down(relu * 0.5)) / 3.0
    assert torch.equal(output, expected)


def test_core_gradients_per_loop_call(toy) -> None:
    module = toy.module
    state = snapshot_state(module)
    x = example_inputs("toy")["x"]

    def by_call(ctx: nt.SaveContext, gradient: torch.Tensor) -> None:
        ctx[f"call_{ctx.call}"] = gradient.clone()

    steps = toy_by_hand(module, x)
    expected = torch.autograd.grad(steps["out"][:, -1].pow(2).sum(), [steps["loop_0"], steps["loop_1"]])
    try:
        output = toy.forward(x=x, probes=[nt.probe("add", by_call, grad=True)])
        output[:, -1].pow(2).sum().backward()
    finally:
        module.zero_grad(set_to_none=True)
    ctx = toy.recordings()["add.grad"]
    assert set(ctx) == {"call_0", "call_1"}
    assert torch.allclose(ctx["call_0"], expected[0], atol=1e-7, rtol=1e-5)
    assert torch.allclose(ctx["call_1"], expected[1], atol=1e-7, rtol=1e-5)
    assert_clean(module, state)


def test_core_gradient_probe_can_replace_the_gradient(toy) -> None:
    module = toy.module
    x = example_inputs("toy")["x"]
    try:
        output = toy.forward(x=x, probes=[nt.probe("gate", lambda ctx, g: torch.zeros_like(g), grad=True)])
        output.sum().backward()
        # everything before the helper's result gets its gradient only through it: now zero
        assert torch.count_nonzero(module.embed.weight.grad) == 0
        assert torch.count_nonzero(module.head.weight.grad) > 0
    finally:
        module.zero_grad(set_to_none=True)
    assert_clean(module)
