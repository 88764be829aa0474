"""Source rewriting: the Python constructs a forward may use all keep working, and their ops are reachable."""

from __future__ import annotations

import functools
import traceback

import pytest
import torch
from torch import nn

import neurotap as nt
from conftest import VOCAB, assert_clean, snapshot_state, tiny_module


def doubled(fn):
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        return fn(self, *args, **kwargs) * 2

    return wrapper


class Decorated(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    @doubled
    def forward(self, x):
        return self.lin(x) + 1


class Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x).tanh()


class UsesSuper(Base):
    def forward(self, x):
        return super().forward(x) * 3


class Private(nn.Module):
    def __init__(self):
        super().__init__()
        self.__scale = 0.5

    def forward(self, x):
        return x * self.__scale


def make_closure_module(offset: float) -> nn.Module:
    class Closure(nn.Module):
        def forward(self, x):
            return x - offset

    return Closure()


def square_plus(x, y):
    return x * x + inner_helper(y)


def inner_helper(y):
    return y.exp() / 2


class Scopes(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])

    def _gate(self, x):
        return torch.sigmoid(x) * x

    def forward(self, x):
        total = sum(layer(x) for layer in self.layers)
        parts = [layer(x).relu() for layer in self.layers]
        scale = (lambda t: t * 0.5)(total)
        y = square_plus(scale, parts[0])
        y += self._gate(parts[1])
        if x.shape[0] > 100:
            y = y * 7
        return y


def by_hand_scopes(module: Scopes, x: torch.Tensor) -> dict[str, torch.Tensor]:
    total = sum(layer(x) for layer in module.layers)
    parts = [layer(x).relu() for layer in module.layers]
    scale = total * 0.5
    square = scale * scale
    helper = parts[0].exp() / 2
    y = square + helper
    gate = torch.sigmoid(parts[1]) * parts[1]
    return {
        "square_plus.mul": square,
        "square_plus.inner_helper.truediv": helper,
        "square_plus": y,
        "_gate.mul": gate,
        "add_": y + gate,
    }


def record(model: nt.Model, x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    model.clear_recordings()
    model.forward(x, probes=[nt.probe(name, nt.Record()) for name in names])
    return {name: model.recordings()[name]["record"][0] for name in names}


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(2, 4)


def test_decorated_forward_keeps_its_decorator(x):
    module = Decorated()
    model = nt.wrap(module, example=x)
    expected = module(x)
    got = record(model, x, ["add"])
    assert torch.equal(got["add"], module.lin(x) + 1)
    assert torch.equal(model.forward(x, probes=[nt.probe("add", nt.Zero())]), torch.zeros_like(expected))
    assert torch.equal(model.forward(x, probes=[nt.probe("add", nt.Record())]), expected)


def test_zero_argument_super_works_in_a_rewritten_forward(x):
    module = UsesSuper()
    model = nt.wrap(module, example=x)
    got = record(model, x, ["forward", "mul"])
    assert torch.equal(got["forward"], module.lin(x).tanh())
    assert torch.equal(got["mul"], module(x))


def test_private_names_are_mangled_as_in_the_class(x):
    model = nt.wrap(Private(), example=x)
    assert torch.equal(record(model, x, ["mul"])["mul"], x * 0.5)


def test_closure_variables_are_kept(x):
    model = nt.wrap(make_closure_module(2.5), example=x)
    assert torch.equal(record(model, x, ["sub"])["sub"], x - 2.5)


def test_helpers_methods_comprehensions_and_lambdas(x):
    module = Scopes()
    model = nt.wrap(module, example=x)
    expected = by_hand_scopes(module, x)
    got = record(model, x, list(expected))
    for name in expected:
        assert torch.allclose(got[name], expected[name]), name
    assert torch.equal(model(x), module(x))
    names = model.points().names()
    assert "call" in names  # the lambda called in place
    assert "layers.0.output" in names


def test_patch_inside_a_nested_helper_changes_the_output_as_by_hand(x):
    module = Scopes()
    model = nt.wrap(module, example=x)
    patched = model.forward(x, probes=[nt.probe("square_plus.inner_helper.truediv", nt.Zero())])
    parts = [layer(x).relu() for layer in module.layers]
    scale = sum(layer(x) for layer in module.layers) * 0.5
    by_hand = scale * scale + torch.sigmoid(parts[1]) * parts[1]
    assert torch.allclose(patched, by_hand)


def test_a_branch_the_dry_run_did_not_take_is_still_a_point():
    module = Scopes()
    small = torch.randn(2, 4)
    model = nt.wrap(module, example=small)
    assert "mul_1" not in model.points().names()  # y * 7 only runs for more than 100 rows
    big = torch.randn(101, 4)
    out = model.forward(big, probes=[nt.probe("mul_1", nt.Scale(0.0))])
    assert torch.equal(out, torch.zeros_like(out))


def test_tracebacks_point_at_the_original_source(x):
    class Failing(nn.Module):
        def forward(self, x):
            y = x + 1
            return y.reshape(7, 7)  # cannot fit: raises inside the rewritten forward

    model = nt.wrap(Failing(), example=torch.randn(7, 7))
    with pytest.raises(RuntimeError) as error:
        model.forward(x, probes=[nt.probe("add", nt.Record())])
    frames = traceback.extract_tb(error.value.__traceback__)
    assert any(f.filename == __file__ and "y.reshape(7, 7)" in (f.line or "") for f in frames)
    assert "forward" not in model.module.__dict__


def test_aliases_resolve_to_points_with_the_expected_identities():
    module = tiny_module("llama")
    model = nt.wrap(module)
    ids = torch.randint(0, VOCAB, (1, 6))
    names = [
        "blocks.1.resid_pre",
        "blocks.1.resid_mid",
        "blocks.1.attn.out",
        "blocks.1.mlp.out",
        "blocks.1.resid_post",
        "blocks.1.mlp.pre",
        "blocks.1.mlp.post",
        "logits",
    ]
    got = record(model, ids, names)
    assert torch.allclose(got["blocks.1.resid_mid"], got["blocks.1.resid_pre"] + got["blocks.1.attn.out"])
    assert torch.allclose(got["blocks.1.resid_post"], got["blocks.1.resid_mid"] + got["blocks.1.mlp.out"])
    mlp = module.model.layers[1].mlp
    normed = module.model.layers[1].post_attention_layernorm(got["blocks.1.resid_mid"])
    assert torch.allclose(got["blocks.1.mlp.pre"], mlp.gate_proj(normed))
    assert torch.allclose(got["blocks.1.mlp.post"], mlp.act_fn(mlp.gate_proj(normed)) * mlp.up_proj(normed))
    assert torch.equal(got["logits"], module(ids).logits)
    assert model.aliases()["blocks.0.attn.pattern"] == "model.layers.0.self_attn.attention_interface.softmax"


def test_an_accelerate_style_instance_forward_stays_in_place(x):
    """accelerate keeps the real forward as ``_old_forward`` behind an instance forward of its own."""
    module = Decorated()
    calls = []

    def device_hook_forward(*args, **kwargs):
        calls.append(1)
        return module._old_forward(*args, **kwargs)

    module._old_forward = module.forward
    module.forward = device_hook_forward
    model = nt.wrap(module, example=x)
    model.points()  # the dry run calls it too
    calls.clear()
    out = model.forward(x, probes=[nt.probe("add", nt.Zero())])
    assert calls == [1]
    assert torch.equal(out, torch.zeros_like(out))
    assert module.forward is device_hook_forward and module._old_forward.__func__ is Decorated.forward


_UNTOUCHED = torch.zeros(4)  # a module-level tensor the forward updates in place (by nothing)


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        h.mul_(2.0)
        h[0].add_(1.0)
        _UNTOUCHED.add_(0.0)
        return h.tanh()


def by_hand_in_place(module: InPlace, x: torch.Tensor, edit=lambda h: h) -> torch.Tensor:
    h = edit(module.lin(x) * 2.0)
    h[0] += 1.0
    return h.tanh()


def test_an_in_place_method_statement_takes_a_patch(x):
    """``h.mul_(2.0)`` returns ``h``: a patch there is what the rest of the forward sees as ``h``."""
    torch.manual_seed(0)
    module = InPlace()
    model = nt.wrap(module, example=x)
    assert {"lin.output", "mul_", "add_", "add__1", "tanh"} <= set(model.points().names())
    with torch.no_grad():
        expected = by_hand_in_place(module, x)
        assert torch.equal(model(x), expected)
        got = record(model, x, ["mul_"])
        zeroed = model.forward(x, probes=[nt.probe("mul_", nt.Zero())])
        scaled = model.forward(x, probes=[nt.probe("mul_", nt.Scale(0.5))])
        with model.patch({"mul_": nt.Add(1.0)}):
            added = model(x)
    assert torch.equal(got["mul_"], module.lin(x).detach() * 2.0)
    assert torch.equal(zeroed, by_hand_in_place(module, x, torch.zeros_like).detach())
    assert torch.equal(scaled, by_hand_in_place(module, x, lambda h: h * 0.5).detach())
    assert torch.equal(added, by_hand_in_place(module, x, lambda h: h + 1.0).detach())
    assert torch.equal(_UNTOUCHED, torch.zeros(4))
    assert_clean(module)


@pytest.mark.parametrize("point, statement", [("add_", "h[0].add_(1.0)"), ("add__1", "_UNTOUCHED.add_(0.0)")])
def test_a_discarded_value_is_read_but_refuses_a_patch(x, point, statement):
    """A statement on a subscript or a global cannot pass a replacement on: reading works, patching says so."""
    torch.manual_seed(0)
    module = InPlace()
    state = snapshot_state(module)
    model = nt.wrap(module, example=x)
    with torch.no_grad():
        expected = by_hand_in_place(module, x)
        read = model.forward(x, probes=[nt.probe(point, nt.Record())])
        with pytest.raises(nt.PatchError) as raised:
            model.forward(x, probes=[nt.probe(point, nt.Record(key="before")), nt.probe(point, nt.Zero())])
    assert torch.equal(read, expected)
    assert point in str(raised.value) and statement in str(raised.value)
    assert_clean(module, state)
    with torch.no_grad():
        assert torch.equal(model(x), expected)


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x).tanh() * 2 + 1


class SitesSeen:
    """A frame that notes each site it is passed and returns every value as it is."""

    def __init__(self):
        self.seen: list[tuple[str, torch.Tensor]] = []

    def out(self, name, value):
        self.seen.append((name, value))
        return value

    def fn(self, _name, callee):
        return callee


def test_a_forward_rewritten_for_some_sites_passes_only_those_and_computes_the_same(x):
    from neurotap.points.rewrite import FRAME_ATTR, tapped

    module = Chain()
    full = tapped(Chain.forward, "method", Chain)
    some = tapped(Chain.forward, "method", Chain, frozenset({"mul"}))
    assert list(some.sites) == list(full.sites) == ["lin", "tanh", "mul", "add"]
    frame = module.__dict__[FRAME_ATTR] = SitesSeen()
    assert torch.equal(full.function(module, x), module(x))
    assert [name for name, _ in frame.seen] == ["lin", "tanh", "mul", "add"]
    frame.seen.clear()
    assert torch.equal(some.function(module, x), module(x))
    assert [name for name, _ in frame.seen] == ["mul"]
    assert torch.equal(frame.seen[0][1], module.lin(x).tanh() * 2)


def test_two_wrappers_tapping_different_sites_of_one_forward_both_act(x):
    module = Chain()
    first, second = nt.wrap(module, example=x), nt.wrap(module, example=x)
    before = snapshot_state(module)
    with first.patch({"tanh": nt.Zero()}):
        got = second.forward(x, probes=[nt.probe("mul", nt.Record()), nt.probe("add", nt.Add(value=1.0))])
    assert torch.equal(got, torch.full_like(got, 2.0))  # tanh zeroed: 0 * 2 + 1, then + 1
    assert torch.equal(second.recordings()["mul"]["record"][0], torch.zeros(2, 4))
    assert torch.equal(module(x), module.lin(x).tanh() * 2 + 1)
    assert_clean(module, before)
