"""Patch semantics against hand computations, composition, save contexts, narrowing,
and optimising a patch value (ROME-style) through the model."""

from __future__ import annotations

import copy

import pytest
import torch

import neurotap as nt
from conftest import assert_clean, assert_same_output, example_inputs, snapshot_state, toy_by_hand

POINT = "model.layers.0.mlp.mul"  # [batch, seq, 128] in the tiny Llama
UNITS = 128


def before_and_after(model: nt.Model, patches: list, inputs=None, point: str = POINT):
    """The value at ``point`` as computed, and as the model goes on with it after ``patches``."""
    probes = [nt.probe(point, nt.Record(key="before")), *(nt.probe(point, p) for p in patches)]
    probes.append(nt.probe(point, nt.Record(key="after")))
    with torch.no_grad():
        output = model.forward(**(inputs or example_inputs("llama")), probes=probes)
    ctx = model.recordings()[point]
    return ctx["before"][-1], ctx["after"][-1], output


def _down_proj_edit(model: nt.Model, edit, inputs=None):
    """The tiny Llama's output with ``edit`` applied by a plain hook to down_proj's input (= mlp.mul)."""
    down = model.module.get_submodule("model.layers.0.mlp.down_proj")
    handle = down.register_forward_pre_hook(lambda _m, args: (edit(args[0].clone()), *args[1:]))
    try:
        with torch.no_grad():
            return model.module(**(inputs or example_inputs("llama")))
    finally:
        handle.remove()


def _set(value: torch.Tensor, index, new) -> torch.Tensor:
    value[index] = new
    return value


# -- each patch type ------------------------------------------------------------------------------

INDEXED_EDITS = {
    "zero-unit": (nt.Zero(index=(..., 3)), lambda v: _set(v, (..., 3), 0.0)),
    "zero-all": (nt.Zero(), lambda v: v * 0.0),
    "zero-row-slice": (nt.Zero(index=(1, slice(2, 5))), lambda v: _set(v, (1, slice(2, 5)), 0.0)),
    "add-scalar": (nt.Add(value=0.25), lambda v: v + 0.25),
    "add-vector-at-position": (
        nt.Add(value=torch.arange(UNITS, dtype=torch.float32), index=(0, -1)),
        lambda v: _set(v, (0, -1), v[0, -1] + torch.arange(UNITS, dtype=torch.float32)),
    ),
    "replace-units-by-tensor-index": (
        nt.Replace(value=torch.tensor([1.5, -2.0]), index=(..., torch.tensor([7, 9]))),
        lambda v: _set(v, (..., torch.tensor([7, 9])), torch.tensor([1.5, -2.0])),
    ),
    "replace-broadcast": (nt.Replace(value=0.5, index=(0,)), lambda v: _set(v, 0, 0.5)),
    "scale": (nt.Scale(factor=2.5), lambda v: v * 2.5),
    "scale-per-unit": (
        nt.Scale(factor=torch.linspace(0, 1, UNITS), index=(slice(None), 2)),
        lambda v: _set(v, (slice(None), 2), v[:, 2] * torch.linspace(0, 1, UNITS)),
    ),
    "custom": (nt.Custom(lambda ctx, value: value.flip(-1)), lambda v: v.flip(-1)),
}


@pytest.mark.parametrize("patch, edit", list(INDEXED_EDITS.values()), ids=list(INDEXED_EDITS))
def test_core_patch_semantics(llama, patch, edit) -> None:
    before, after, output = before_and_after(llama, [patch])
    assert torch.equal(after, edit(before.clone()))
    assert not torch.equal(after, before)
    assert_same_output(output, _down_proj_edit(llama, edit))


def test_core_patch_does_not_modify_tensors_in_place(toy) -> None:
    kept: list[torch.Tensor] = []
    probes = [
        nt.probe("block.output", lambda ctx, value: kept.append(value)),
        nt.probe("block.output", nt.Zero(index=(..., 0))),
        nt.probe("block.output", nt.Scale(3.0, index=(..., 1))),
        nt.probe("block.output", nt.Add(1.0, index=(..., 2))),
        nt.probe("block.output", nt.Replace(5.0, index=(..., 3))),
    ]
    with torch.no_grad():
        toy.forward(**example_inputs("toy"), probes=probes)
    assert len(kept) == 2
    block = toy.module.block
    inputs = example_inputs("toy")["x"]
    with torch.no_grad():
        assert torch.equal(kept[0], block(toy.module.embed(inputs)))


def test_core_record_with_index(llama) -> None:
    with torch.no_grad():
        llama.forward(
            **example_inputs("llama"),
            probes=[nt.probe(POINT, nt.Record()), nt.probe(POINT, nt.Record(index=(0, -1), key="last"))],
        )
    ctx = llama.recordings()[POINT]
    assert torch.equal(ctx["last"][0], ctx["record"][0][0, -1])
    assert ctx.last[0].shape == (UNITS,)


def _two_calls(model: nt.Model, probes: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Run two batches of different shapes; return the value at POINT in each."""
    first = example_inputs("llama")
    second = example_inputs("llama", batch=1, seq=4, seed=2)  # no prefix shared with the first: no ties
    record = nt.probe(POINT, nt.Record(key="seen"))
    with torch.no_grad():
        model.forward(**first, probes=[record, *probes])
        model.forward(**second, probes=[record, *probes])
    seen = model.recordings()[POINT]["seen"]
    return seen[0], seen[1]


def test_core_mean_sum_max_run_across_calls(llama) -> None:
    probes = [nt.probe(POINT, p) for p in (nt.Mean(dims=(0, 1)), nt.Sum(dims=(0, 1)), nt.Max(dims=(0, 1)))]
    a, b = _two_calls(llama, probes)
    rows = torch.cat([a.reshape(-1, UNITS), b.reshape(-1, UNITS)])
    ctx = llama.recordings()[POINT]
    assert ctx["mean_count"] == 2 * 7 + 4
    assert torch.allclose(ctx["mean"], rows.mean(0), atol=1e-7, rtol=1e-5)
    assert torch.allclose(ctx["sum"], rows.sum(0), atol=1e-7, rtol=1e-5)
    assert torch.equal(ctx["max"], rows.amax(0))


def test_core_mean_over_every_dim(llama) -> None:
    a, b = _two_calls(llama, [nt.probe(POINT, nt.Mean(key="m"))])
    expected = torch.cat([a.flatten(), b.flatten()]).mean()
    assert torch.allclose(llama.recordings()[POINT]["m"], expected, atol=1e-8, rtol=1e-5)


def test_core_norm_and_project(llama) -> None:
    direction = torch.randn(UNITS, generator=torch.Generator().manual_seed(4))
    directions = torch.randn(3, UNITS, generator=torch.Generator().manual_seed(5))
    probes = [
        nt.probe(POINT, nt.Norm()),
        nt.probe(POINT, nt.Norm(dims=(1, 2), p=1.0, key="l1")),
        nt.probe(POINT, nt.Project(direction=direction)),
        nt.probe(POINT, nt.Project(direction=directions, index=(0,), key="many")),
    ]
    a, b = _two_calls(llama, probes)
    ctx = llama.recordings()[POINT]
    for call, value in enumerate((a, b)):
        assert torch.allclose(ctx["norm"][call], value.pow(2).sum(-1).sqrt(), rtol=1e-5)
        assert torch.allclose(ctx["l1"][call], value.abs().sum((1, 2)), rtol=1e-5)
        assert torch.allclose(ctx["projection"][call], (value * direction).sum(-1), rtol=1e-4, atol=1e-7)
        many = torch.stack([(value[0] * d).sum(-1) for d in directions], dim=-1)
        assert torch.allclose(ctx["many"][call], many, rtol=1e-4, atol=1e-7)


def test_core_topk_matches_brute_force(llama) -> None:
    k = 3
    a, b = _two_calls(llama, [nt.probe(POINT, nt.TopK(k=k))])
    ctx = llama.recordings()[POINT]
    values, where = ctx["topk_values"], ctx["topk_where"]
    assert values.shape == (k, UNITS) and where.shape == (k, UNITS, 3)
    for unit in range(UNITS):
        entries = [
            (value[row, pos, unit].item(), call, row, pos)
            for call, value in enumerate((a, b))
            for row in range(value.shape[0])
            for pos in range(value.shape[1])
        ]
        best = sorted(entries, key=lambda e: -e[0])[:k]
        assert values[:, unit].tolist() == [e[0] for e in best]
        assert where[:, unit].tolist() == [list(e[1:]) for e in best]


def test_core_custom_probe_sees_call_and_step(toy) -> None:
    seen: list[tuple[str, int, int]] = []

    def note(ctx: nt.SaveContext, value: torch.Tensor) -> torch.Tensor | None:
        seen.append((ctx.point, ctx.call, ctx.step))
        return value * 0.0 if ctx.call == 1 else None  # only the second pass through the loop

    inputs = example_inputs("toy")
    with torch.no_grad():
        output = toy.forward(**inputs, probes=[nt.probe("block.output", nt.Custom(note))])
        steps = toy_by_hand(toy.module, inputs["x"])
        loop_1 = steps["loop_0"]  # block's second output zeroed: the loop adds nothing the second time
        gated = torch.tanh(loop_1) * 2.0 + 1.0
        mixed = toy.module.down(torch.relu(toy.module.up(gated)) * 0.5)
        expected = toy.module.head(gated - mixed) / 3.0
    assert seen == [("block.output", 0, 0), ("block.output", 1, 0)]
    assert torch.equal(output, expected)


# -- composition ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "patches, edit",
    [
        ([nt.Add(1.0), nt.Scale(2.0)], lambda v: (v + 1.0) * 2.0),
        ([nt.Scale(2.0), nt.Add(1.0)], lambda v: v * 2.0 + 1.0),
        ([nt.Zero(index=(..., 3)), nt.Add(1.0, index=(..., 3))], lambda v: _set(v, (..., 3), 1.0)),
    ],
    ids=["add-then-scale", "scale-then-add", "zero-then-add"],
)
def test_core_patch_list_applies_in_order(llama, patches, edit) -> None:
    inputs = example_inputs("llama")
    expected = _down_proj_edit(llama, edit)
    with llama.patch({POINT: [*patches, nt.Record()]}), torch.no_grad():
        output = llama(**inputs)
    assert_same_output(output, expected)
    before, after, _ = before_and_after(llama, patches)
    assert torch.equal(after, edit(before.clone()))


def test_core_nested_patches_compose_and_restore(llama) -> None:
    module = llama.module
    inputs = example_inputs("llama")
    state = snapshot_state(module)
    with torch.no_grad():
        baseline = module(**inputs)
        outer_only = _down_proj_edit(llama, lambda v: v + 1.0)
        both = _down_proj_edit(llama, lambda v: (v + 1.0) * 2.0)
        with llama.patch({POINT: nt.Add(1.0)}):
            assert_same_output(llama(**inputs), outer_only)
            with llama.patch({POINT: nt.Scale(2.0), "lm_head.output": nt.Record()}):
                assert_same_output(llama(**inputs), both)
                assert_same_output(module(**inputs), both)
            assert_same_output(llama(**inputs), outer_only)
            with_probe = llama.forward(**inputs, probes=[nt.probe(POINT, nt.Scale(2.0))])
            assert_same_output(with_probe, both)  # call probes run after every active patch
            assert_same_output(llama(**inputs), outer_only)
        assert_same_output(llama(**inputs), baseline)
    assert len(llama.recordings()["lm_head.output"]["record"]) == 2
    assert_clean(module, state)


def test_core_patch_restores_after_exception_in_block(llama) -> None:
    inputs = example_inputs("llama")
    with torch.no_grad():
        baseline = llama(**inputs)
        with pytest.raises(KeyError, match="raised in the block"):
            with llama.patch({POINT: nt.Zero()}):
                raise KeyError("raised in the block")
        assert_same_output(llama(**inputs), baseline)


# -- save contexts --------------------------------------------------------------------------------


def test_core_contexts_persist_until_cleared(llama) -> None:
    inputs = example_inputs("llama")

    def count(ctx: nt.SaveContext, value: torch.Tensor) -> None:
        ctx.calls = getattr(ctx, "calls", 0) + 1
        ctx["shape"] = tuple(value.shape)

    with torch.no_grad():
        llama.forward(**inputs, probes=[nt.probe(POINT, count), nt.probe(POINT, nt.Record())])
        llama.forward(**inputs, probes=[nt.probe(POINT, count)])
        with llama.patch({POINT: nt.Record()}):
            llama(**inputs)
    ctx = llama.recordings()[POINT]
    assert ctx.point == POINT
    assert ctx.calls == ctx["calls"] == 2
    assert ctx.shape == (2, 7, UNITS)
    assert len(ctx["record"]) == 2
    assert set(ctx) == {"calls", "shape", "record"}
    with pytest.raises(AttributeError, match="nothing was saved as 'missing'"):
        _ = ctx.missing

    llama.clear_recordings()
    assert llama.recordings() == {}
    with torch.no_grad():
        llama.forward(**inputs, probes=[nt.probe(POINT, count)])
    assert llama.recordings()[POINT].calls == 1


# -- narrowing ------------------------------------------------------------------------------------


def test_core_narrowed_read_and_replace(llama) -> None:
    module = llama.module
    inputs = example_inputs("llama")
    attn = module.get_submodule("model.layers.0.self_attn")
    captured: list = []
    handle = attn.register_forward_hook(lambda _m, _a, out: captured.append(out))
    try:
        with torch.no_grad():
            module(**inputs)
    finally:
        handle.remove()
    zeros = torch.zeros_like(captured[0][0])
    handle = attn.register_forward_hook(lambda _m, _a, out: (zeros, *out[1:]))
    try:
        with torch.no_grad():
            by_hand = module(**inputs)
    finally:
        handle.remove()

    narrowed = "model.layers.0.self_attn.output[0]"
    weights = "model.layers.0.self_attn.output[1]"
    with torch.no_grad():
        output = llama.forward(
            **inputs,
            probes=[
                nt.probe(narrowed, nt.Record(key="before")),
                nt.probe(weights, nt.Record()),
                nt.probe(narrowed, nt.Replace(0.0)),
                nt.probe("model.layers.0.self_attn.output", nt.Record(key="whole")),
            ],
        )
    assert torch.equal(llama.recordings()[narrowed]["before"][0], captured[0][0])
    assert torch.equal(llama.recordings()[weights]["record"][0], captured[0][1])
    whole = llama.recordings()["model.layers.0.self_attn.output"]["whole"][0]
    assert isinstance(whole, tuple) and torch.equal(whole[0], zeros) and torch.equal(whole[1], captured[0][1])
    assert_same_output(output, by_hand)


def test_core_narrowed_model_output(llama) -> None:
    inputs = example_inputs("llama")
    with torch.no_grad():
        expected = llama.module(**inputs).logits
        read = llama.forward(**inputs, probes=[nt.probe('output["logits"]', nt.Record())])
        assert torch.equal(llama.recordings()['output["logits"]']["record"][0], expected)
        assert torch.equal(read.logits, expected)
        with llama.patch({'output["logits"]': nt.Scale(2.0)}):
            scaled = llama(**inputs)
        zeroed = llama.forward(**inputs, probes=[nt.probe("output['logits']", nt.Zero(index=(..., 5)))])
    assert torch.equal(scaled.logits, expected * 2.0)
    assert torch.equal(scaled["logits"], expected * 2.0)
    assert torch.equal(zeroed.logits, _set(expected.clone(), (..., 5), 0.0))


def test_core_model_output_narrowed_by_position(llama) -> None:
    """``output[0]`` of a ModelOutput is its first field that is set (``logits``), as ``to_tuple()`` counts."""
    module = llama.module
    inputs = example_inputs("llama")

    def zero_first_field(_m, _args, output):
        output["logits"] = _set(output["logits"].clone(), (..., 5), 0.0)
        return output

    with torch.no_grad():
        expected = module(**inputs)
        handle = module.register_forward_hook(zero_first_field)
        try:
            by_hand = module(**inputs)
        finally:
            handle.remove()
        read = llama.forward(**inputs, probes=[nt.probe("output[0]", nt.Record())])
        zeroed = llama.forward(**inputs, probes=[nt.probe("output[0]", nt.Zero(index=(..., 5)))])
        with llama.patch({"output[0]": nt.Zero()}):
            all_zero = llama(**inputs)
        llama.forward(**inputs, probes=[nt.probe("output[-1]", nt.Record())])
    assert list(expected.keys())[0] == "logits"
    assert torch.equal(llama.recordings()["output[0]"]["record"][0], expected.logits)
    assert torch.equal(read.logits, expected.logits)
    assert_same_output(zeroed, by_hand)
    assert torch.equal(zeroed.logits, _set(expected.logits.clone(), (..., 5), 0.0))
    assert torch.equal(all_zero.logits, torch.zeros_like(expected.logits))
    last = llama.recordings()["output[-1]"]["record"][0]
    assert type(last) is type(expected[list(expected.keys())[-1]])
    assert_clean(module)


# -- optimising through a patch (ROME-style) ------------------------------------------------------


def test_core_optimise_add_delta_raises_target_logit(llama) -> None:
    module = llama.module
    state = snapshot_state(module)
    inputs = example_inputs("llama", batch=1)
    target = 17
    with torch.no_grad():
        start = module(**inputs).logits[0, -1, target].item()
    delta = torch.zeros(UNITS, requires_grad=True)
    optimiser = torch.optim.Adam([delta], lr=0.05)
    history = []
    try:
        with llama.patch({"model.layers.1.mlp.mul": nt.Add(value=delta, index=(0, -1))}):
            for _ in range(8):
                optimiser.zero_grad()
                logit = llama(**inputs).logits[0, -1, target]
                (-logit).backward()
                assert delta.grad is not None and delta.grad.abs().sum() > 0
                optimiser.step()
                history.append(logit.item())
            with torch.no_grad():
                final = llama(**inputs).logits[0, -1, target].item()
    finally:
        module.zero_grad(set_to_none=True)
    assert history[0] == pytest.approx(start, abs=1e-6)
    assert final > start + 0.05
    assert all(b > a for a, b in zip(history[:-1], history[1:], strict=True))
    with torch.no_grad():
        by_hand = _add_at_layer_1(llama, delta.detach(), inputs)
    assert by_hand == pytest.approx(final, abs=1e-5)
    assert_clean(module, state)


def _add_at_layer_1(model: nt.Model, delta: torch.Tensor, inputs) -> float:
    def edit(_m, args):
        value = args[0].clone()
        value[0, -1] += delta
        return (value,)

    handle = model.module.get_submodule("model.layers.1.mlp.down_proj").register_forward_pre_hook(edit)
    try:
        return model.module(**inputs).logits[0, -1, 17].item()
    finally:
        handle.remove()


def test_core_patches_are_plain_data() -> None:
    assert set(nt.probes.PATCHES) == {
        "Zero",
        "Add",
        "Replace",
        "Scale",
        "Record",
        "Mean",
        "Sum",
        "Max",
        "Norm",
        "Project",
        "Probability",
        "TopK",
        "Skip",
        "Custom",
    }
    patch = nt.Zero(index=(..., 3))
    with pytest.raises(AttributeError):
        patch.index = 4  # frozen: a patch cannot change under a running plan


# -- skipping a module ----------------------------------------------------------------------------


def test_core_skip_a_decoder_layer(llama) -> None:
    """Skip() at a layer's output passes its input on, and nothing inside the layer runs."""
    module = llama.module
    inputs = example_inputs("llama")
    layer = module.get_submodule("model.layers.1")
    state = snapshot_state(module)
    llama.points()  # the dry run, which runs every layer, before counting
    entered: list[str] = []
    counter = layer.self_attn.register_forward_pre_hook(lambda *_: entered.append("attention"))
    try:
        kept = {}

        def keep_input(_m, args, kwargs) -> None:
            kept["x"] = args[0] if args else kwargs["hidden_states"]

        handles = [
            layer.register_forward_pre_hook(keep_input, with_kwargs=True),
            layer.register_forward_hook(lambda *_: kept["x"]),
        ]
        try:
            with torch.no_grad():
                by_hand = module(**inputs)
        finally:
            for handle in handles:
                handle.remove()
        entered.clear()
        with torch.no_grad():
            skipped = llama.forward(
                **inputs,
                probes=[nt.probe("model.layers.1.output", nt.Skip()), nt.probe("model.layers.1.output", nt.Record())],
            )
            with llama.patch({"model.layers.1.input": nt.Skip()}):
                in_block = llama(**inputs)
    finally:
        counter.remove()
    assert entered == []
    assert_same_output(skipped, by_hand)
    assert_same_output(in_block, by_hand)
    assert torch.equal(llama.recordings()["model.layers.1.output"]["record"][0], kept["x"])
    assert_clean(module, state)


def test_core_skip_with_a_value_every_call(toy) -> None:
    """The toy calls ``block`` twice; Skip(value) stands in for both calls."""
    x = example_inputs("toy")["x"]
    module = toy.module
    with torch.no_grad():
        skipped = toy.forward(x, probes=[nt.probe("block.output", nt.Skip(value=torch.zeros(16)))])
        h = module.embed(x)  # h = h + 0 twice
        gated = torch.tanh(h) * 2.0 + 1.0
        by_hand = module.head(gated - module.down(torch.relu(module.up(gated)) * 0.5)) / 3.0
    assert torch.equal(skipped, by_hand)
    assert_clean(module)


@pytest.mark.parametrize(
    "point, message",
    [(POINT, "output point"), ("model.layers.1.self_attn.output[0]", "narrowing")],
    ids=["op-point", "narrowed"],
)
def test_core_skip_only_at_a_module_point(llama, point, message) -> None:
    state = snapshot_state(llama.module)
    llama.points()  # the dry run, before counting forwards
    calls = []
    handle = llama.module.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(nt.PatchError, match=message):
            llama.forward(**example_inputs("llama"), probes=[nt.probe(point, nt.Skip())])
    finally:
        handle.remove()
    assert calls == []  # refused before the forward
    assert_clean(llama.module, state)


def test_core_points_inside_a_skipped_module_are_missed(llama) -> None:
    with torch.no_grad(), pytest.raises(nt.MissedPointError, match="model.layers.1.mlp.mul"):
        llama.forward(
            **example_inputs("llama"),
            probes=[nt.probe("model.layers.1.output", nt.Skip()), nt.probe("model.layers.1.mlp.mul", nt.Record())],
        )
    assert_clean(llama.module)


# -- parameters and buffers -----------------------------------------------------------------------

WEIGHT = "model.layers.0.mlp.down_proj.weight"  # [64, 128]


def _functional(module, replaced: dict[str, torch.Tensor], inputs) -> torch.Tensor:
    """The module run with some parameters or buffers replaced, by torch.func: the independent reference."""
    return torch.func.functional_call(module, replaced, (), inputs).logits


def test_core_parameters_and_buffers_are_points(llama) -> None:
    points = {p.name: p for p in llama.points()}
    weight = llama.module.get_parameter(WEIGHT)
    assert (points[WEIGHT].kind, points[WEIGHT].shape, points[WEIGHT].dtype) == ("parameter", (64, 128), "float32")
    assert points["model.rotary_emb.inv_freq"].kind == "buffer"
    names = llama.points("model.layers.0.mlp.down_proj").names()
    assert names[:2] == ["model.layers.0.mlp.down_proj.input", WEIGHT]
    with torch.no_grad():
        llama.forward(**example_inputs("llama"), probes=[nt.probe(WEIGHT, nt.Record())])
    assert torch.equal(llama.recordings()[WEIGHT]["record"][0], weight)


@pytest.mark.parametrize(
    "patch, edit",
    [
        (nt.Zero(index=(..., 3)), lambda w: _set(w.clone(), (..., 3), 0.0)),
        (nt.Scale(0.5), lambda w: w * 0.5),
        (nt.Add(value=torch.ones(128), index=(2,)), lambda w: _set(w.clone(), 2, w[2] + 1.0)),
        (nt.Replace(value=0.25, index=(slice(0, 4),)), lambda w: _set(w.clone(), slice(0, 4), 0.25)),
    ],
    ids=["zero", "scale", "add", "replace"],
)
def test_core_patch_a_parameter_for_one_call(llama, patch, edit) -> None:
    module = llama.module
    inputs = example_inputs("llama")
    state = snapshot_state(module)
    weight = module.get_parameter(WEIGHT)
    with torch.no_grad():
        expected = _functional(module, {WEIGHT: edit(weight.detach())}, inputs)
        patched = llama.forward(**inputs, probes=[nt.probe(WEIGHT, patch)])
        with llama.patch({WEIGHT: patch}):
            in_block = llama(**inputs)
            assert module.get_parameter(WEIGHT) is weight  # between forwards the real parameter is back
            copied = copy.deepcopy(module)
        plain = module(**inputs)
    assert torch.equal(patched.logits, expected) and torch.equal(in_block.logits, expected)
    assert not torch.equal(plain.logits, expected)
    assert module.get_parameter(WEIGHT) is weight
    assert_clean(module, state)
    assert_clean(copied, state)


def test_core_rank_one_edit_of_a_weight_is_optimised(llama) -> None:
    """ROME-style: an Add of u v^T on a weight, trained through the model; gradients as torch.func gives them."""
    module = llama.module
    state = snapshot_state(module)
    inputs = example_inputs("llama", batch=1)
    weight = module.get_parameter(WEIGHT)
    u = torch.zeros(64, requires_grad=True)
    v = torch.linspace(-1, 1, 128)
    optimiser = torch.optim.SGD([u], lr=0.5)
    target = 17
    history = []
    with llama.patch({WEIGHT: nt.Custom(lambda ctx, w: w + torch.outer(u, v))}):
        for _ in range(4):
            optimiser.zero_grad()
            logit = llama(**inputs).logits[0, -1, target]
            (-logit).backward()
            expected = torch.autograd.grad(
                -_functional(module, {WEIGHT: weight + torch.outer(u, v)}, inputs)[0, -1, target], u
            )[0]
            assert torch.allclose(u.grad, expected, atol=1e-6) and u.grad.abs().sum() > 0
            optimiser.step()
            history.append(logit.item())
    module.zero_grad(set_to_none=True)
    assert all(b > a for a, b in zip(history[:-1], history[1:], strict=True))
    assert_clean(module, state)


def test_core_add_patch_on_a_weight_carries_autograd(llama) -> None:
    module = llama.module
    inputs = example_inputs("llama", batch=1)
    delta = torch.zeros(64, 128, requires_grad=True)
    output = llama.forward(**inputs, probes=[nt.probe(WEIGHT, nt.Add(value=delta))])
    output.logits[0, -1, 5].backward()
    weight = module.get_parameter(WEIGHT)
    expected = torch.autograd.grad(_functional(module, {WEIGHT: weight + delta}, inputs)[0, -1, 5], delta)[0]
    module.zero_grad(set_to_none=True)
    assert torch.allclose(delta.grad, expected, atol=1e-6)
    assert_clean(module)


def test_core_patch_a_buffer(llama) -> None:
    module = llama.module
    inputs = example_inputs("llama")
    name = "model.rotary_emb.inv_freq"
    buffer = module.get_buffer(name)
    with torch.no_grad():
        expected = _functional(module, {name: buffer * 2.0}, inputs)
        patched = llama.forward(**inputs, probes=[nt.probe(name, nt.Scale(2.0))])
    assert torch.equal(patched.logits, expected)
    assert module.get_buffer(name) is buffer
    assert_clean(module)


def test_core_gradient_at_a_parameter(llama) -> None:
    module = llama.module
    inputs = example_inputs("llama", batch=1)
    weight = module.get_parameter(WEIGHT)
    expected = torch.autograd.grad(module(**inputs).logits[0, -1, 5], weight)[0]
    output = llama.forward(**inputs, probes=[nt.probe(WEIGHT, nt.Record(), grad=True)])
    output.logits[0, -1, 5].backward()
    module.zero_grad(set_to_none=True)
    assert torch.allclose(llama.recordings()[WEIGHT + ".grad"]["record"][0], expected, atol=1e-7)
    assert not weight._backward_hooks  # the hook went on a view for that call, not on the parameter
    assert_clean(module)


@pytest.mark.parametrize(
    "probe_fn, error",
    [
        (lambda ctx, w: 1 / 0, nt.ProbeError),
        (lambda ctx, w: w[:3], nt.PatchError),
        (nt.Replace(value=torch.zeros(3)), nt.PatchError),
    ],
    ids=["raises", "wrong-shape", "patch-does-not-fit"],
)
def test_core_a_failing_parameter_patch_leaves_the_weight(llama, probe_fn, error) -> None:
    module = llama.module
    state = snapshot_state(module)
    weight = module.get_parameter(WEIGHT)
    with torch.no_grad(), pytest.raises(error, match=WEIGHT):
        llama.forward(**example_inputs("llama"), probes=[nt.probe(WEIGHT, probe_fn)])
    assert module.get_parameter(WEIGHT) is weight
    assert_clean(module, state)


def test_a_call_made_directly_in_a_block_counts_its_own_steps(llama) -> None:
    """``ctx.step`` of a forward made directly on the module in a block is 0, as for a call through the wrapper,
    whatever ran before it; each step of a direct ``generate`` is the next one, and so is a forward passed the cache
    the one before it returned. A patch applied at step 0 alone has the effect a hand hook at the first step has."""
    module = llama.module
    ids = example_inputs("llama", batch=1)["input_ids"]
    kwargs = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    steps: list[int] = []

    def at_the_prompt(ctx: nt.SaveContext, value: torch.Tensor) -> torch.Tensor | None:
        steps.append(ctx.step)
        return torch.zeros_like(value) if ctx.step == 0 else None

    zeroed: list[bool] = []  # the same patch by hand: zero the MLP product at the first forward of each call

    def by_hand(_module, args):
        if not zeroed:
            zeroed.append(True)
            return (torch.zeros_like(args[0]), *args[1:])
        return None

    def hand_hooked(run):
        zeroed.clear()
        handle = module.get_submodule(POINT.removesuffix(".mul") + ".down_proj").register_forward_pre_hook(by_hand)
        try:
            return run()
        finally:
            handle.remove()

    expected_forward = hand_hooked(lambda: module(ids).logits)
    expected_tokens = hand_hooked(lambda: module.generate(ids, **kwargs))
    assert not torch.equal(expected_forward, module(ids).logits)  # the patch changes the output
    with torch.no_grad(), llama.patch({POINT: at_the_prompt}):
        for _ in range(2):
            steps.clear()
            assert torch.equal(llama.generate(ids, **kwargs), expected_tokens)
            assert steps == [0, 1, 2]
            for _ in range(2):  # directly, after a call through the wrapper, and after a direct one
                steps.clear()
                assert torch.equal(module(ids).logits, expected_forward)
                assert steps == [0]
            for _ in range(2):
                steps.clear()
                assert torch.equal(module.generate(ids, **kwargs), expected_tokens)
                assert steps == [0, 1, 2]
            steps.clear()
            first = module(ids, use_cache=True)  # a loop of one's own: the cache it returned goes on
            following = module(first.logits[:, -1:].argmax(-1), past_key_values=first.past_key_values)
            assert steps == [0, 1]
            assert torch.equal(following.logits[0, -1].argmax(), expected_tokens[0, ids.shape[1] + 1])
            steps.clear()  # the same loop with tuples for outputs: the cache is one of their values
            logits, cache = module(ids, use_cache=True, return_dict=False)
            tokens = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
            for _ in range(2):
                logits, cache = module(tokens[:, -1:], past_key_values=cache, use_cache=True, return_dict=False)
                tokens = torch.cat([tokens, logits[:, -1:].argmax(-1)], dim=1)
            assert steps == [0, 1, 2]
            assert torch.equal(tokens, expected_tokens)
    assert_clean(module)
