"""The real SmolLM2-135M: loading, the paper-style checks, and the command line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import neurotap as nt

pytestmark = pytest.mark.slow

MUL = "model.layers.3.mlp.mul"


@pytest.fixture(scope="module")
def smol() -> nt.Model:
    return nt.load("smollm2-135m")


@pytest.fixture(scope="module")
def ids(smol: nt.Model) -> torch.Tensor:
    return smol.tokenizer("The capital of France is", return_tensors="pt").input_ids


def test_the_capital_of_france_is_paris(smol, ids):
    logits = smol(ids).logits
    assert smol.tokenizer.decode(logits[0, -1].argmax()) == " Paris"
    assert smol.module.config.num_hidden_layers == 30
    assert sum(p.numel() for p in smol.module.parameters()) == 134_515_008


def test_probes_change_nothing_and_read_what_a_hand_computation_gives(smol, ids):
    module = smol.module
    with torch.no_grad():
        expected = module(ids).logits
        got = smol.forward(ids, probes=[nt.probe(MUL, nt.Record()), nt.probe("model.layers.3.mlp.input", nt.Record())])
        mlp = module.model.layers[3].mlp
        x = smol.recordings()["model.layers.3.mlp.input"]["record"][0]
        assert torch.equal(got.logits, expected)
        assert torch.allclose(smol.recordings()[MUL]["record"][0], mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
    smol.clear_recordings()


def test_an_op_patch_equals_the_same_edit_by_hand(smol, ids):
    module = smol.module

    def zero_unit(_module, args):
        (x,) = args
        x = x.clone()
        x[..., 42] = 0
        return (x,)

    with torch.no_grad():
        handle = module.model.layers[3].mlp.down_proj.register_forward_pre_hook(zero_unit)
        try:
            by_hand = module(ids).logits
        finally:
            handle.remove()
        patched = smol.forward(ids, probes=[nt.probe(MUL, nt.Zero(index=(..., 42)))]).logits
    assert torch.equal(patched, by_hand)
    assert not module.model.layers[3].mlp.down_proj._forward_pre_hooks


def test_generation_with_probes_equals_plain_generate(smol, ids):
    plain = smol.module.generate(ids, max_new_tokens=6, do_sample=False)
    steps = []
    probed = smol.generate(
        ids,
        max_new_tokens=6,
        do_sample=False,
        probes=[nt.probe(MUL, lambda ctx, v: steps.append((ctx.step, v.shape[1])))],
    )
    assert torch.equal(plain, probed)
    assert steps[0] == (0, ids.shape[1]) and [s for s, _ in steps] == list(range(6))
    assert all(length == 1 for _, length in steps[1:])  # the KV cache was used


def test_gradient_at_a_point_equals_autograd(smol, ids):
    module = smol.module
    captured = {}

    def keep(_module, args):
        captured["x"] = args[0]

    handle = module.model.layers[5].mlp.down_proj.register_forward_pre_hook(keep)
    try:
        loss = module(ids).logits[0, -1].log_softmax(-1)[7042]
    finally:
        handle.remove()
    (expected,) = torch.autograd.grad(loss, captured["x"])

    out = smol.forward(ids, probes=[nt.probe("model.layers.5.mlp.mul", nt.Record(), grad=True)])
    out.logits[0, -1].log_softmax(-1)[7042].backward()
    got = smol.recordings()["model.layers.5.mlp.mul.grad"]["record"][0]
    module.zero_grad(set_to_none=True)
    smol.clear_recordings()
    assert torch.allclose(got, expected, atol=1e-6)


def test_demo_runs_and_the_taboo_works():
    result = subprocess.run(
        [sys.executable, "-m", "neurotap", "demo"], capture_output=True, text=True, timeout=300, check=True
    )
    before = next(line for line in result.stdout.splitlines() if line.strip().startswith("before:"))
    after = next(line for line in result.stdout.splitlines() if line.strip().startswith("after:"))
    assert "Paris" in before.split("…")[1] and "Paris" not in after.split("…")[1]
    assert "= 0.000" in after and "= 0.000" not in before  # the word's probability, before and after
    assert "model.layers.15.mlp.mul" in result.stdout


def test_points_command_prints_the_tree():
    result = subprocess.run(
        [sys.executable, "-m", "neurotap", "points", "smollm2-135m", "model.layers.0.mlp"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    lines = result.stdout.splitlines()
    assert any(line.split()[0] == "model.layers.0.mlp.mul" and "op" in line.split() for line in lines)
    assert all("model.layers.0.mlp" in line for line in lines)
