"""``Model.backward``: the built-in losses, gradients at points, and weights left alone."""

from __future__ import annotations

import pytest
import torch

import neurotap as nt
from conftest import VOCAB, tiny_module

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


def test_backward_takes_only_built_in_losses(llama):
    with pytest.raises(TypeError, match="CrossEntropy"):
        llama.backward(torch.zeros(1, 3, dtype=torch.long), loss=lambda logits: logits.sum())
