"""A module's other arguments as points: ``P.args.NAME``, however the argument is passed.

Checked against the plain module with hand-written forward pre-hooks (``with_kwargs=True``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import neurotap as nt
from conftest import VOCAB, assert_clean, snapshot_state, tiny_module
from test_core_backward import _assert_as_before, _checkpointed_llama, _hooks


class Scaled(nn.Module):
    """An input, a positional argument, a keyword-only one with a default, and keywords through ``**extra``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, scale, *, shift=0.0, **extra):
        return self.lin(x) * scale + shift + extra.get("bias", 0.0)


class Outer(nn.Module):
    def __init__(self, by_keyword: bool) -> None:
        super().__init__()
        self.inner = Scaled()
        self.by_keyword = by_keyword

    def forward(self, x):
        scale = torch.sigmoid(x.sum(-1, keepdim=True))
        if self.by_keyword:
            return self.inner(x=x, scale=scale, shift=x.mean(), bias=x * 0.5)
        return self.inner(x, scale, shift=x.mean(), bias=x * 0.5)


def _outer(by_keyword: bool) -> Outer:
    torch.manual_seed(0)
    return Outer(by_keyword)


def _with_pre_hook(module: nn.Module, edit, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` with ``edit(args, kwargs) -> (args, kwargs)`` as a plain pre-hook on ``inner``."""
    handle = module.inner.register_forward_pre_hook(lambda _m, args, kwargs: edit(args, kwargs), with_kwargs=True)
    try:
        return module(x)
    finally:
        handle.remove()


def _scale_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs["scale"] if "scale" in kwargs else args[1]


def _set_scale(args: tuple, kwargs: dict, value: torch.Tensor) -> tuple[tuple, dict]:
    if "scale" in kwargs:
        return args, {**kwargs, "scale": value}
    return (args[0], value, *args[2:]), kwargs


X = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("by_keyword", [False, True], ids=["positional", "keyword"])
def test_arguments_are_listed_read_and_replaced_like_a_hand_hook(by_keyword):
    module = _outer(by_keyword)
    state = snapshot_state(module)
    model = nt.wrap(module, example=X)
    points = {p.name: p for p in model.points("inner")}
    assert [n for n in points if ".args." in n] == ["inner.args.scale", "inner.args.shift", "inner.args.bias"]
    assert (points["inner.args.scale"].kind, points["inner.args.scale"].shape) == ("argument", (3, 1))
    assert (points["inner.args.shift"].shape, points["inner.args.bias"].shape) == ((), (3, 4))

    seen = {}

    def keep(args, kwargs):
        seen.update(scale=_scale_of(args, kwargs), shift=kwargs["shift"], bias=kwargs["bias"])
        return args, kwargs

    with torch.no_grad():
        plain = _with_pre_hook(module, keep, X)
        read = model.forward(X, probes=[nt.probe(f"inner.args.{n}", nt.Record()) for n in ("scale", "shift", "bias")])
        recorded = model.recordings()
        assert torch.equal(read, plain)
        for name in ("scale", "shift", "bias"):
            assert torch.equal(recorded[f"inner.args.{name}"]["record"][0], seen[name]), name

        half = torch.full((3, 1), 0.5)
        expected = _with_pre_hook(module, lambda a, k: _set_scale(a, {**k, "shift": torch.tensor(2.0)}, half), X)
        patches = {"inner.args.scale": nt.Replace(half), "inner.args.shift": nt.Replace(torch.tensor(2.0))}
        patched = model.forward(X, probes=[nt.probe(p, fn) for p, fn in patches.items()])
        with model.patch(patches):
            in_block = model(X)
    assert torch.equal(patched, expected) and torch.equal(in_block, expected)
    assert not torch.equal(expected, plain)
    assert_clean(module, state)


def test_a_gradient_probe_at_an_argument_gets_its_gradient():
    module = _outer(False)
    model = nt.wrap(module, example=X)
    kept = {}

    def keep(args, kwargs):
        kept["scale"] = args[1]
        return None

    x = X.clone().requires_grad_()  # the scale is computed from x: it has a gradient
    loss = _with_pre_hook(module, keep, x).pow(2).sum()
    (expected,) = torch.autograd.grad(loss, kept["scale"])
    model.forward(x, probes=[nt.probe("inner.args.scale", nt.Record(), grad=True)]).pow(2).sum().backward()
    assert torch.allclose(model.recordings()["inner.args.scale.grad"]["record"][0], expected)
    module.zero_grad(set_to_none=True)
    assert_clean(module)


def test_arguments_are_known_without_an_example_and_errors_leave_the_model_clean():
    module = _outer(False)
    state = snapshot_state(module)
    model = nt.wrap(module)  # no example: the signature names them, the shapes come with the first forward
    names = model.points("inner").names()
    assert {"inner.args.scale", "inner.args.shift"} <= set(names) and "inner.args.bias" not in names
    with pytest.raises(nt.UnknownPointError, match=r"inner\.args\.scale"):
        model.forward(X, probes=[nt.probe("inner.args.scael", nt.Record())])
    with pytest.raises(nt.UnknownPointError, match=r"inner\.args\.shift"):
        model.forward(X, probes=[nt.probe("inner.kwargs.shift", nt.Record())])
    with pytest.raises(nt.PatchError, match=r"inner\.args\.scale"):
        model.forward(X, probes=[nt.probe("inner.args.scale", nt.Replace(torch.zeros(2, 2, 2)))])
    with pytest.raises(nt.PatchError, match="Skip"):
        model.forward(X, probes=[nt.probe("inner.args.scale", nt.Skip())])
    assert_clean(module, state)
    assert model.points("inner.args.scale")[0].shape == (3, 1)


def test_an_argument_that_is_not_passed_is_a_missed_point():
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Scaled()

        def forward(self, x):
            return self.inner(x, 2.0)  # shift keeps its default: nothing passes it

    torch.manual_seed(0)
    module = Plain()
    model = nt.wrap(module, example=X)
    with pytest.raises(nt.MissedPointError, match=r"inner\.args\.shift"):
        model.forward(X, probes=[nt.probe("inner.args.shift", nt.Record())])
    assert_clean(module)
    model.forward(X, probes=[nt.probe("inner.args.shift", nt.Record(), optional=True)])
    assert model.recordings() == {}


# -- a tiny Hugging Face Llama --------------------------------------------------------------------

ATTN_0 = "model.layers.0.self_attn"


def _ids() -> torch.Tensor:
    return torch.randint(2, VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))


def test_llama_attention_mask_and_rotary_tables_as_points():
    module = tiny_module("llama")
    model = nt.wrap(module)
    listed = {p.name: p for p in model.points(ATTN_0)}
    for name in ("attention_mask", "position_embeddings[0]", "position_embeddings[1]"):
        assert listed[f"{ATTN_0}.args.{name}"].kind == "argument", name
    assert listed[f"{ATTN_0}.args.position_embeddings[0]"].shape == (1, 5, 16)
    ids = _ids()
    attention = module.model.layers[0].self_attn
    seen = {}

    def hand(_m, args, kwargs):
        seen["mask"], seen["cos"] = kwargs["attention_mask"], kwargs["position_embeddings"][0]
        mask = kwargs["attention_mask"].clone()
        mask[..., 0] = torch.finfo(mask.dtype).min  # nobody may look at the first token
        cos, sin = kwargs["position_embeddings"]
        return args, {**kwargs, "attention_mask": mask, "position_embeddings": (cos, torch.zeros_like(sin))}

    handle = attention.register_forward_pre_hook(hand, with_kwargs=True)
    with torch.no_grad():
        try:
            expected = module(ids).logits
        finally:
            handle.remove()
        blocked = seen["mask"].clone()
        blocked[..., 0] = torch.finfo(blocked.dtype).min
        probes = [
            nt.probe(f"{ATTN_0}.args.attention_mask", nt.Record(key="before")),
            nt.probe(f"{ATTN_0}.args.attention_mask", nt.Replace(blocked)),
            nt.probe(f"{ATTN_0}.args.position_embeddings[0]", nt.Record()),
            nt.probe(f"{ATTN_0}.args.position_embeddings[1]", nt.Zero()),
        ]
        got = model.forward(ids, probes=probes).logits
    recorded = model.recordings()
    assert torch.equal(recorded[f"{ATTN_0}.args.attention_mask"]["before"][0], seen["mask"])
    assert torch.equal(recorded[f"{ATTN_0}.args.position_embeddings[0]"]["record"][0], seen["cos"])
    assert torch.equal(got, expected)
    assert not torch.allclose(got, module(ids).logits)
    assert_clean(module)


def test_an_argument_patch_inside_a_checkpointed_layer_gives_the_hand_hooks_gradients():
    ids = _ids()
    plain = _checkpointed_llama(None)

    def halve_cos(_m, args, kwargs):
        cos, sin = kwargs["position_embeddings"]
        return args, {**kwargs, "position_embeddings": (cos * 0.5, sin)}

    handle = plain.model.layers[0].self_attn.register_forward_pre_hook(halve_cos, with_kwargs=True)
    try:
        plain(ids).logits[:, -1].pow(2).sum().backward()
    finally:
        handle.remove()

    module = _checkpointed_llama(False)
    hooks = _hooks(module)
    model = nt.wrap(module)
    probes = [nt.probe(f"{ATTN_0}.args.position_embeddings[0]", nt.Scale(0.5))]
    model.forward(ids, probes=probes).logits[:, -1].pow(2).sum().backward()
    expected = dict(plain.named_parameters())
    for name, parameter in module.named_parameters():
        assert torch.allclose(parameter.grad, expected[name].grad, atol=1e-6), name
    module.zero_grad(set_to_none=True)
    _assert_as_before(module, hooks)
