"""Less common situations: dropout, points that only fire for some inputs, other code's
hooks, and two wrappers of one module."""

from __future__ import annotations

import copy
import pickle
from typing import Any

import pytest
import torch

import neurotap as nt
from conftest import (
    ARCHS,
    SEQ,
    Toy,
    assert_clean,
    assert_same_output,
    example_inputs,
    snapshot_state,
    tiny_module,
    toy_by_hand,
    wrap_tiny,
)

POINT = "model.layers.0.mlp.mul"


def test_core_train_mode_dropout_draws_are_unchanged() -> None:
    """The inventory's dry run must not consume random numbers the real forward would have used."""
    torch.manual_seed(0)
    module = ARCHS["gpt2"].build().train()
    for sub in module.modules():
        if isinstance(sub, torch.nn.Dropout):
            sub.p = 0.5
    inputs = example_inputs("gpt2")
    torch.manual_seed(5)
    expected = module(**inputs).logits
    torch.manual_seed(5)
    again = module(**inputs).logits
    assert torch.equal(expected, again)
    model = nt.wrap(module)
    torch.manual_seed(5)
    read_only = nt.probe("transformer.h.0.mlp.act.output", lambda ctx, value: None)
    assert torch.equal(model.forward(**inputs, probes=[read_only]).logits, expected)
    torch.manual_seed(4)
    assert not torch.equal(module(**inputs).logits, expected)  # dropout is really on
    assert_clean(module)


def test_core_point_seen_in_code_but_not_in_the_dry_run() -> None:
    """The attention-mask addition only runs when a mask is given; it can still be probed."""
    model = wrap_tiny("bert")
    point = "encoder.layer.0.attention.self.attention_interface.add"
    assert point not in model.points().names()
    ids = example_inputs("bert")["input_ids"]
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    captured = []
    with torch.no_grad():
        model.forward(
            input_ids=ids,
            attention_mask=mask,
            probes=[nt.probe(point, nt.Record()), nt.probe(point.replace(".add", ".mul"), nt.Record())],
        )
        scores = model.recordings()[point.replace(".add", ".mul")]["record"][0]
        added = model.recordings()[point]["record"][0]
        handle = model.module.encoder.layer[0].attention.self.register_forward_hook(
            lambda _m, _a, out: captured.append(out[1])
        )
        try:
            model.module(input_ids=ids, attention_mask=mask)
        finally:
            handle.remove()
    # masked keys of row 0 get a very negative score; others are unchanged
    assert torch.equal(added[1], scores[1])
    assert torch.equal(added[0, :, :, :-2], scores[0, :, :, :-2])
    assert (added[0, :, :, -2:] < -1e30).all()
    assert torch.allclose(torch.softmax(added, dim=-1), captured[0], atol=1e-6)
    assert_clean(model.module)  # the session's shared Bert, which later tests check for hooks


def test_core_other_hooks_survive(llama) -> None:
    module = llama.module
    down = module.get_submodule("model.layers.0.mlp.down_proj")
    mlp = module.get_submodule("model.layers.0.mlp")
    llama.points()  # the inventory's dry run would also fire these hooks once; take it first
    seen: list[str] = []
    handles = [
        down.register_forward_pre_hook(lambda *_: seen.append("down pre")),
        mlp.register_forward_hook(lambda *_: seen.append("mlp post")),
    ]
    try:
        with torch.no_grad():
            probes = [nt.probe(POINT, nt.Zero()), nt.probe("model.layers.0.mlp.output", nt.Record())]
            llama.forward(**example_inputs("llama"), probes=probes)
            with llama.patch({"model.layers.0.mlp.down_proj.input": nt.Record()}):
                llama(**example_inputs("llama"))
            llama(**example_inputs("llama"))
        assert seen == ["down pre", "mlp post"] * 3
        assert len(down._forward_pre_hooks) == 1 and len(mlp._forward_hooks) == 1
    finally:
        for handle in handles:
            handle.remove()


def test_core_two_wrappers_of_one_module(llama) -> None:
    module = llama.module
    other = nt.wrap(module)
    inputs = example_inputs("llama")
    zero, record = {POINT: nt.Zero(index=(..., 3))}, [nt.probe(POINT, nt.Record())]
    with torch.no_grad():
        baseline = module(**inputs)
        for _ in range(2):  # the same patch and probe objects again: each call puts on what the first one did
            with llama.patch(zero):
                patched = llama(**inputs)
                other.forward(**inputs, probes=record)  # after the block's zero, at the same point
                assert_same_output(llama(**inputs), patched)  # the first wrapper's patch is back in place
                with other.patch({"model.layers.1.mlp.mul": nt.Record()}):
                    other(**inputs)
                assert_same_output(llama(**inputs), patched)
            assert_same_output(llama(**inputs), baseline)
            assert_same_output(other.forward(**inputs, probes=record), baseline)
    assert not torch.equal(patched.logits, baseline.logits)
    in_block, alone, *again = other.recordings()[POINT]["record"]
    assert len(again) == 2 and torch.equal(again[0], in_block) and torch.equal(again[1], alone)
    expected = alone.clone()
    expected[..., 3] = 0.0
    assert torch.equal(in_block, expected) and not torch.equal(alone, expected)
    assert_clean(module)


def test_core_two_wrappers_patches_apply_together(llama) -> None:
    other = nt.wrap(llama.module)
    inputs = example_inputs("llama")
    with torch.no_grad(), llama.patch({POINT: nt.Zero(index=(..., 3))}):
        patched = llama(**inputs)
        probed = other.forward(**inputs, probes=[nt.probe(POINT, nt.Record())])
    assert_same_output(probed, patched)
    seen = other.recordings()[POINT]["record"][0]  # the first wrapper's patch ran before the second's probe
    assert torch.equal(seen[..., 3], torch.zeros_like(seen[..., 3])) and seen.abs().sum() > 0
    assert_clean(llama.module)


def test_core_two_wrappers_detached_out_of_order(llama) -> None:
    """The first wrapper's calls inside the second's block, and the first block ending first, keep the second's
    patches in effect and copies clean; the model ends as it began."""
    module = llama.module
    other = nt.wrap(module)
    other.points()
    inputs = example_inputs("llama")
    state = snapshot_state(module)
    down = module.model.layers[0].mlp.down_proj

    def by_hand(scale: float, zero: bool) -> Any:
        def pre_hook(_m: Any, args: tuple) -> tuple:
            x = args[0] * scale
            if zero:
                x[..., 3] = 0
            return (x,)

        handle = down.register_forward_pre_hook(pre_hook)
        try:
            return module(**inputs)
        finally:
            handle.remove()

    with torch.no_grad():
        baseline = module(**inputs)
        both, doubled = by_hand(2.0, zero=True), by_hand(2.0, zero=False)
        first = llama.patch({POINT: nt.Zero(index=(..., 3))})
        second = other.patch({POINT: nt.Scale(2.0)})
        first.__enter__()
        second.__enter__()
        assert_same_output(module(**inputs), both)
        # the first wrapper takes its block's taps off under the second's, and puts them back after the call
        probed = llama.forward(**inputs, probes=[nt.probe("model.layers.1.output", nt.Record())])
        assert_same_output(probed, both)
        assert_same_output(module(**inputs), both)
        for clone in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
            assert_clean(clone, state)
            assert_same_output(clone(**inputs), baseline)
        first.__exit__(None, None, None)  # the outer block ends first
        assert_same_output(module(**inputs), doubled)
        clone = copy.deepcopy(module)
        assert_clean(clone, state)
        assert_same_output(clone(**inputs), baseline)
        second.__exit__(None, None, None)
        assert_same_output(module(**inputs), baseline)
    assert not torch.equal(both.logits, doubled.logits) and not torch.equal(doubled.logits, baseline.logits)
    assert_clean(module, state)


def test_core_an_instance_forward_set_by_other_code_is_kept_and_explained(llama) -> None:
    """Tapping ops would bypass a forward that other code put on the instance: refuse clearly instead."""
    mlp = llama.module.get_submodule("model.layers.0.mlp")
    llama.points()  # the inventory, taken before other code steps in
    state = snapshot_state(llama.module)
    calls: list[int] = []
    original = mlp.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    mlp.forward = counted
    try:
        with torch.no_grad(), pytest.raises(nt.NeurotapError, match="replaced its forward on the instance"):
            llama.forward(**example_inputs("llama"), probes=[nt.probe(POINT, nt.Record())])
        with torch.no_grad():
            llama.forward(**example_inputs("llama"), probes=[nt.probe("model.layers.0.mlp.output", nt.Record())])
        assert calls == [1] and mlp.forward is counted
        with pytest.warns(nt.SourceUnavailableWarning, match="model.layers.0.mlp"):
            fresh = nt.wrap(llama.module).points()
        assert "model.layers.0.mlp.output" in fresh.names() and POINT not in fresh.names()
    finally:
        del mlp.forward
    assert_clean(llama.module, state)


def test_core_generate_needs_a_generating_module(toy) -> None:
    with pytest.raises(nt.NeurotapError, match="generate"):
        toy.generate(x=example_inputs("toy")["x"])


def test_core_points_prefix(llama) -> None:
    mlp = llama.points("model.layers.0.mlp")
    assert mlp.names()[0] == "model.layers.0.mlp.input"
    assert mlp.names()[-1] == "model.layers.0.mlp.output"  # its call in the decoder layer is this point
    assert all(n.startswith("model.layers.0.mlp.") for n in mlp.names())
    assert POINT in mlp.names()
    attn = llama.points("model.layers.0.self_attn.output")
    assert attn.names() == [
        "model.layers.0.self_attn.output",
        "model.layers.0.self_attn.output[0]",
        "model.layers.0.self_attn.output[1]",
    ]
    assert "model.layers.0.mlp.mul" in str(mlp) and "op" in repr(mlp)
    assert len(tiny_module("llama").model.layers) == 2


def test_core_patch_at_input_passed_by_keyword(llama) -> None:
    """LlamaDecoderLayer calls ``self.self_attn(hidden_states=...)``: the input point still gets it."""
    module = llama.module
    attn = module.get_submodule("model.layers.0.self_attn")
    inputs = example_inputs("llama")

    def scale_hidden_states(_m, args, kwargs):
        assert not args  # the premise of this test: passed by keyword
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * 0.5}

    handle = attn.register_forward_pre_hook(scale_hidden_states, with_kwargs=True)
    try:
        with torch.no_grad():
            by_hand = module(**inputs)
    finally:
        handle.remove()
    with torch.no_grad(), llama.patch({"model.layers.0.self_attn.input": [nt.Record(), nt.Scale(0.5)]}):
        patched = llama(**inputs)
    assert llama.recordings()["model.layers.0.self_attn.input"]["record"][0].shape == (2, 7, 64)
    assert_same_output(patched, by_hand)


def test_core_calls_from_several_threads_each_get_their_own_probes(llama) -> None:
    import threading

    inputs = example_inputs("llama")
    with torch.no_grad():
        baseline = llama.module(**inputs).logits
    results: dict[int, torch.Tensor] = {}

    def work(unit: int) -> None:
        with torch.no_grad():
            for _ in range(5):
                results[unit] = llama.forward(**inputs, probes=[nt.probe(POINT, nt.Zero(index=(..., unit)))]).logits

    threads = [threading.Thread(target=work, args=(unit,)) for unit in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for unit in range(4):
        with torch.no_grad():
            alone = llama.forward(**inputs, probes=[nt.probe(POINT, nt.Zero(index=(..., unit)))]).logits
        assert torch.equal(results[unit], alone)
        assert not torch.equal(alone, baseline)
    assert_clean(llama.module)


class KeywordOnly(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, *, x: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
        return self.lin(x) + shift


class CallsByKeyword(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre = torch.nn.Linear(4, 4)
        self.inner = KeywordOnly()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x=self.pre(x), shift=1.0).tanh()


def test_core_input_of_a_keyword_only_forward() -> None:
    """``forward(self, *, x)`` can only be called as ``inner(x=...)``: its input point is still ``x``."""
    torch.manual_seed(0)
    module = CallsByKeyword()
    x = torch.randn(3, 4)
    state = snapshot_state(module)

    def halve_x(_m, args, kwargs):
        assert not args
        return args, {**kwargs, "x": kwargs["x"] * 0.5}

    with torch.no_grad():
        plain_input = module.pre(x)
        handle = module.inner.register_forward_pre_hook(halve_x, with_kwargs=True)
        try:
            by_hand = module(x)
        finally:
            handle.remove()
    model = nt.wrap(module, example=x)
    assert "inner.input" in model.points().names()
    assert model.points("inner.input")[0].shape == (3, 4)
    with torch.no_grad():
        patched = model.forward(
            x, probes=[nt.probe("inner.input", nt.Record()), nt.probe("inner.input", nt.Scale(0.5))]
        )
    assert torch.equal(model.recordings()["inner.input"]["record"][0], plain_input)
    assert torch.equal(patched, by_hand)
    assert_clean(module, state)


def test_core_copies_made_inside_a_patch_block_are_clean(llama) -> None:
    """deepcopy and pickle of a module with patches on it give the plain module, and never keep the patches."""
    module = llama.module
    inputs = example_inputs("llama")
    state = snapshot_state(module)
    other = nt.wrap(module)
    other.points()  # its dry run, before the first wrapper's patches are on
    with torch.no_grad():
        baseline = module(**inputs)
        with llama.patch({POINT: nt.Zero(index=(..., 3)), "model.layers.1.output": nt.Record()}):
            patched = llama(**inputs)
            with other.patch({"model.layers.1.mlp.mul": nt.Scale(2.0)}):
                both = llama(**inputs)
                copied = copy.deepcopy(module)
                pickled = pickle.loads(pickle.dumps(module))
                assert_same_output(llama(**inputs), both)  # the original keeps both patches inside the blocks
            for clone in (copied, pickled):
                assert_clean(clone, state)
                assert_same_output(clone(**inputs), baseline)
            assert_same_output(llama(**inputs), patched)
        assert_same_output(copied(**inputs), baseline)
        assert_same_output(module(**inputs), baseline)
    assert not torch.equal(patched.logits, baseline.logits) and not torch.equal(both.logits, patched.logits)
    assert len(llama.recordings()["model.layers.1.output"]["record"]) == 4  # the copies' forwards recorded nothing
    assert_clean(copied, state)
    assert_clean(module, state)


def test_core_recordings_copy_and_pickle(toy) -> None:
    x = example_inputs("toy")["x"]

    def counted(ctx: nt.SaveContext, value: torch.Tensor) -> None:
        ctx.calls = ctx.get("calls", 0) + 1

    with torch.no_grad():
        toy.forward(x, probes=[nt.probe("block.output", nt.Record()), nt.probe("block.output", counted)])
    recordings = toy.recordings()
    for restored in (copy.deepcopy(recordings), pickle.loads(pickle.dumps(recordings))):
        ctx = restored["block.output"]
        assert ctx.point == "block.output" and ctx.call == 1 and ctx.step == 0
        assert ctx.calls == 2 and ctx["calls"] == 2
        assert dict(ctx).keys() == {"record", "calls"}
        for got, want in zip(ctx.record, recordings["block.output"].record, strict=True):
            assert torch.equal(got, want) and got is not want
        with pytest.raises(AttributeError, match="nothing was saved"):
            _ = ctx.missing


class Branches(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.main = torch.nn.Linear(4, 4)
        self.alt = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh())

    def forward(self, x: torch.Tensor, flag: bool = False) -> torch.Tensor:
        return self.alt(x) * 2 if flag else self.main(x) + 1


def test_core_module_points_in_a_branch_the_dry_run_skipped() -> None:
    """Every submodule's input and output are points by name, though the example never ran them."""
    torch.manual_seed(0)
    module = Branches()
    x = torch.randn(3, 4)
    state = snapshot_state(module)
    model = nt.wrap(module, example=x)
    assert "alt.output" not in model.points().names() and "alt.0.input" not in model.points().names()
    zeros = torch.zeros(3, 4)
    handle = module.alt.register_forward_hook(lambda *_: zeros)
    try:
        with torch.no_grad():
            by_hand = module(x, flag=True)
    finally:
        handle.remove()
    with torch.no_grad():
        patched = model.forward(
            x, flag=True, probes=[nt.probe("alt.0.input", nt.Record()), nt.probe("alt.output", nt.Zero())]
        )
        assert torch.equal(model.recordings()["alt.0.input"]["record"][0], x)
    assert torch.equal(patched, by_hand) and torch.equal(patched, zeros)
    with pytest.raises(nt.UnknownPointError, match="alt.output"):
        model.forward(x, flag=True, probes=[nt.probe("alt.outptu", nt.Record())])
    assert_clean(module, state)


def test_core_points_of_a_plain_module_without_an_example() -> None:
    """Without an example, the inventory is what the code names; the first forward fills in the shapes."""
    torch.manual_seed(0)
    module = Toy()
    state = snapshot_state(module)
    model = nt.wrap(module)
    listed = model.points()
    module_points = {
        f"{path}.{kind}" if path else kind for path, _ in module.named_modules() for kind in ("input", "output")
    }
    toy_ops = {"add", "gate", "mix", "sub", "truediv"}  # Toy.forward, read by eye (its submodule calls are theirs)
    weights = {name for name, _ in module.named_parameters()}  # their shapes are known without a forward
    assert set(listed.names()) == module_points | toy_ops | weights
    assert all(p.shape is None for p in listed if p.name not in weights)
    assert {p.name: p.shape for p in listed if p.name in weights} == {
        n: tuple(w.shape) for n, w in module.named_parameters()
    }
    assert listed.names()[0] == "input" and listed.names()[-1] == "output"
    assert listed.names().index("embed.input") < listed.names().index("embed.output")
    assert {p.kind for p in listed if p.name in toy_ops} == {"op"}
    x = example_inputs("toy")["x"]
    expected = toy_by_hand(module, x)
    with torch.no_grad(), model.patch({"block.output": nt.Record()}):  # before any forward: resolved by name
        model.forward(x, probes=[nt.probe("add", nt.Record())])
    assert torch.equal(model.recordings()["add"]["record"][0], expected["loop_0"])
    assert [r.shape for r in model.recordings()["block.output"]["record"]] == [(2, SEQ, 16)] * 2
    filled = {p.name: p for p in model.points()}
    assert filled["block.output"].shape == (2, SEQ, 16) and filled["head.output"].shape == (2, SEQ, 4)
    assert filled["mix.mul"].shape == (2, SEQ, 32)  # a helper's op: found once the forward ran
    assert_clean(module, state)


def test_core_first_plain_forward_fills_in_the_shapes() -> None:
    torch.manual_seed(0)
    module = Toy()
    model = nt.wrap(module)
    assert model.points("head.output")[0].shape is None
    x = example_inputs("toy")["x"]
    with torch.no_grad():
        assert torch.equal(model(x), module(x))
    assert model.points("head.output")[0].shape == (2, SEQ, 4)
    assert_clean(module)


def test_core_stop_at_a_point(llama) -> None:
    """The forward ends once the point has fired: its value comes back, later layers never run."""
    module = llama.module
    inputs = example_inputs("llama")
    llama.points()
    kept: dict[str, torch.Tensor] = {}
    layer_0 = module.get_submodule("model.layers.0")

    def keep(name: str, pick):
        def hook(_m, _args, out) -> None:
            kept[name] = pick(out)

        return hook

    handles = [
        layer_0.register_forward_hook(keep("layer_0", lambda out: out)),
        layer_0.self_attn.register_forward_hook(keep("attn_0", lambda out: out[0])),
    ]
    try:
        with torch.no_grad():
            module(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    later: list[str] = []
    handles = [
        module.get_submodule("model.layers.1").register_forward_pre_hook(lambda *_: later.append("layer 1")),
        module.lm_head.register_forward_pre_hook(lambda *_: later.append("lm_head")),
    ]
    try:
        with torch.no_grad():
            value = llama.forward(
                **inputs,
                stop_at="blocks.0.resid_post",
                probes=[nt.probe(POINT, nt.Record()), nt.probe("model.layers.1.output", nt.Record())],
            )
            attention = llama.forward(**inputs, stop_at="blocks.0.attn.out")
    finally:
        for handle in handles:
            handle.remove()
    assert later == []
    assert torch.equal(value, kept["layer_0"])
    assert torch.equal(attention, kept["attn_0"])
    assert llama.recordings()[POINT]["record"][0].shape == (2, SEQ, 128)
    assert "model.layers.1.output" not in llama.recordings()  # after the stop: not reached, by request
    assert_clean(module)


def test_core_stop_at_a_point_never_reached_or_unknown() -> None:
    torch.manual_seed(0)
    module = Branches()
    x = torch.randn(3, 4)
    model = nt.wrap(module, example=x)
    with torch.no_grad():
        with pytest.raises(nt.MissedPointError, match="alt.output"):
            model.forward(x, stop_at="alt.output")
        assert torch.equal(model.forward(x, flag=True, stop_at="alt.output"), module.alt(x))
        with pytest.raises(nt.UnknownPointError, match="alt.outptu"):
            model.forward(x, stop_at="alt.outptu")
    assert_clean(module)
