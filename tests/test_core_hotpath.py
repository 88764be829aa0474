"""The hot path: a plan reused when the same probes come again, and patches that never wait on a device."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import neurotap as nt
from conftest import assert_clean, example_inputs, toy_by_hand, wrap_tiny


def test_the_same_probes_again_give_each_call_its_own_values(toy):
    """A loop passing one probe list: every call counts its own loop calls and edits the values anew."""
    x = example_inputs("toy")["x"]
    seen = []

    def note(ctx, value):
        seen.append((ctx.call, value.detach().clone()))

    probes = [nt.probe("block.output", note), nt.probe("gate.mul", nt.Scale(0.5)), nt.probe("mix.relu", nt.Record())]
    expected = toy_by_hand(toy.module, x)
    gated = torch.tanh(expected["loop_1"]) * 2.0 * 0.5 + 1.0
    relu = torch.relu(toy.module.up(gated))
    out = toy.module.head(gated - toy.module.down(relu * 0.5)) / 3.0
    for call in range(3):
        assert torch.allclose(toy.forward(x, probes=probes), out, atol=1e-6)
        assert [c for c, _ in seen[2 * call :]] == [0, 1]  # two loop calls each forward, counted from 0 again
        assert torch.allclose(seen[2 * call][1], expected["block_0"], atol=1e-6)
        assert torch.allclose(seen[2 * call + 1][1], expected["block_1"], atol=1e-6)
    records = toy.recordings()["mix.relu"]["record"]
    assert len(records) == 3 and all(torch.allclose(r, relu, atol=1e-6) for r in records)


def test_the_same_probes_inside_and_outside_a_patch_block(toy):
    """A plan made with a block's patches is not the one used once the block is gone, nor the reverse."""
    x = example_inputs("toy")["x"]
    probes = [nt.probe("output", nt.Record())]
    plain = toy.module(x)
    with toy.patch({"truediv": nt.Zero()}):
        toy.forward(x, probes=probes)
    toy.forward(x, probes=probes)
    with toy.patch({"truediv": nt.Scale(2.0)}):
        toy.forward(x, probes=probes)
    first, second, third = toy.recordings()["output"]["record"]
    assert torch.equal(first, torch.zeros_like(plain))
    assert torch.equal(second, plain)
    assert torch.allclose(third, plain * 2.0, atol=1e-6)


def test_a_patch_block_entered_again_patches_anew(toy):
    """Blocks re-entered in a loop, alone and nested, each patch as they did the first time."""
    x = example_inputs("toy")["x"]
    plain = toy.module(x)
    double, zero = {"truediv": nt.Scale(2.0)}, {"truediv": nt.Zero()}
    for _ in range(3):
        with toy.patch(double):
            assert torch.allclose(toy(x), plain * 2.0, atol=1e-6)
            with toy.patch(zero):
                assert torch.equal(toy(x), torch.zeros_like(plain))
            assert torch.allclose(toy(x), plain * 2.0, atol=1e-6)
        with toy.patch(zero):
            assert torch.equal(toy(x), torch.zeros_like(plain))
        assert torch.equal(toy(x), plain)
    with pytest.raises(nt.UnknownPointError):
        toy.patch({"output": nt.Record(), "no.such.point": nt.Zero()})
    assert torch.equal(toy(x), plain)
    assert toy.recordings() == {}
    assert_clean(toy.module)


def test_one_patch_block_object_entered_again_patches_each_time(toy):
    """A block object entered again, alone or inside a block of the same patch objects, patches as the first time."""
    x = example_inputs("toy")["x"]
    plain = toy.module(x)
    patches = {"truediv": nt.Scale(2.0)}
    block = toy.patch(patches)
    for _ in range(2):
        with block:
            assert torch.allclose(toy(x), plain * 2.0, atol=1e-6)
        assert torch.equal(toy(x), plain)
    with toy.patch(patches):
        with block:
            assert torch.allclose(toy(x), plain * 4.0, atol=1e-6)
        assert torch.allclose(toy(x), plain * 2.0, atol=1e-6)
    with block:
        assert torch.allclose(toy(x), plain * 2.0, atol=1e-6)
    assert torch.equal(toy(x), plain)
    assert_clean(toy.module)


def test_reused_plans_do_not_keep_a_calls_probes_alive(toy):
    """Probes made for one call, and what their functions hold, go when the caller drops them."""
    x = example_inputs("toy")["x"]

    class Held:
        pass

    held = Held()
    gone = weakref.ref(held)

    def keeps(ctx, value, held=held):
        return None

    probes = [nt.probe("mix.mul", keeps)]
    toy.forward(x, probes=probes)
    toy.forward(x, probes=probes)
    del probes, keeps, held
    gc.collect()
    assert gone() is None


def test_a_patch_block_keeps_its_patches_only_while_the_caller_does(toy):
    """A block entered again with the same patch objects reuses its plan; once the caller drops a patch, its
    tensor is freed, though the model keeps that block's plan for a next time."""
    x = example_inputs("toy")["x"]
    plain = toy.module(x)
    value = torch.full_like(plain, 2.0)
    patches = {"output": nt.Replace(value)}
    with toy.patch(patches):
        plan = toy._layer_plan
        assert torch.equal(toy(x), value)
    with toy.patch(patches):
        assert toy._layer_plan is plan
        assert torch.equal(toy(x), value)
    gone = weakref.ref(value)
    del patches, value
    gc.collect()
    assert gone() is None
    assert torch.equal(toy(x), plain)
    with toy.patch({"output": nt.Scale(3.0)}):
        assert toy._layer_plan is not plan
        assert torch.allclose(toy(x), plain * 3.0, atol=1e-6)


def test_the_same_probes_again_after_other_code_replaced_a_forward(toy):
    """A call with the probes of an earlier one sees what other code changed since: an instance forward set on a
    module it taps inside is refused, as it would be on a first call, and stays; a class forward replaced runs."""
    x = example_inputs("toy")["x"]
    probes = [nt.probe("mix.mul", nt.Scale(0.0))]
    toy.forward(x, probes=probes)

    def replaced(x):
        return torch.zeros(2)

    toy.module.forward = replaced
    with pytest.raises(nt.NeurotapError, match="other code replaced its forward"):
        toy.forward(x, probes=probes)
    assert toy.module.forward is replaced
    del toy.module.forward

    class Doubles(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.linear(x) * 2.0

        def generate(self, x):
            return self(self(x))

    module = Doubles()
    x = torch.randn(4, 4)
    model = nt.wrap(module, example=x)
    probes = [nt.probe("mul", nt.Record()), nt.probe("linear.output", nt.Scale(0.5))]
    steps = [nt.probe("linear.output", nt.Record())]  # none on the root: its forwards are counted in its forward
    assert torch.allclose(model.forward(x, probes=probes), module.linear(x), atol=1e-6)
    assert torch.allclose(model.generate(x, probes=steps), module.linear(module.linear(x) * 2.0) * 2.0, atol=1e-6)

    def triples(self, x):
        return self.linear(x) * 3.0

    Doubles.forward = triples
    assert torch.allclose(model.forward(x, probes=probes), module.linear(x) * 1.5, atol=1e-6)
    assert torch.allclose(model.recordings()["mul"]["record"][1], module.linear(x) * 1.5, atol=1e-6)
    assert torch.allclose(model.generate(x, probes=steps), module.linear(module.linear(x) * 3.0) * 3.0, atol=1e-6)
    assert_clean(module)


def test_copies_made_by_a_probe_on_a_later_call_are_clean(toy):
    """A module copied from inside a forward has none of neurotap's taps, on every call of the same probes."""
    x = example_inputs("toy")["x"]
    copies = []

    def copy_model(ctx, value):
        copies.append(copy.deepcopy(toy.module))

    probes = [nt.probe("mix.mul", copy_model), nt.probe("block.output", nt.Scale(2.0)), nt.probe("output", nt.Zero())]
    for _ in range(3):
        assert torch.equal(toy.forward(x, probes=probes), torch.zeros_like(toy.module(x)))
    assert len(copies) == 3
    for copied in copies:
        assert_clean(copied)
        assert torch.equal(copied(x), toy.module(x))


class HostTensors(TorchDispatchMode):
    """Counts tensors made from host data (``torch.tensor``, a Python number written into a tensor) or from nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        made = any(isinstance(a, torch.Tensor) for a in tree_leaves(result))
        from_nothing = not any(isinstance(a, torch.Tensor) for a in tree_leaves((args, kwargs)))
        if made and (from_nothing or func is torch.ops.aten.lift_fresh.default):
            self.made.append(str(func))
        return result


def device_patches(device: torch.device) -> dict:
    """Every kind of patch and reduction, its tensors (values, indices, directions) already on ``device``."""
    on = {"device": device}
    return {
        "block.output": nt.Zero(index=(..., 3)),
        "gate.mul": nt.Add(torch.linspace(-1, 1, 16, **on)),
        "mix.relu": [nt.Zero(index=(..., torch.tensor([1, 5], **on))), nt.Add(0.5, index=(0, 1))],
        "mix.mul": nt.Scale(2.0),
        "down.input": nt.Replace(torch.linspace(0, 1, 32, **on), index=(0,)),
        "sub": nt.Replace(0.25, index=(..., 0)),
        "up.output": [
            nt.Record(),
            nt.Mean(dims=(0, 1)),
            nt.Sum(dims=0),
            nt.Max(dims=(0, 1)),
            nt.Norm(),
            nt.Project(torch.linspace(-1, 1, 32, **on)),
            nt.TopK(k=2),
        ],
        "head.weight": nt.Add(torch.full((4, 16), 0.01, **on)),
        "head.output": nt.Scale(torch.tensor([1.0, -1.0, 2.0, 0.5], **on)),
    }


def test_patches_make_no_host_tensor_per_call(toy):
    """A patched forward makes exactly the host tensors the plain forward makes (none), values on the device."""
    x = example_inputs("toy")["x"]
    patches = device_patches(x.device)
    counting = HostTensors()
    with counting:
        torch.as_tensor(1.0)
    assert counting.made == ["aten.lift_fresh.default"]  # the count sees what it is meant to

    probes = nt.model.model.patches_to_probes(patches)
    toy.forward(x, probes=probes)  # the first call makes the plan
    plain, patched, in_block = HostTensors(), HostTensors(), HostTensors()
    with plain:
        expected = toy.module(x)
    with patched:
        out = toy.forward(x, probes=probes)
    with toy.patch(patches), in_block:
        toy.forward(x)
    assert not torch.allclose(out, expected)  # the patches acted
    assert patched.made == plain.made
    assert in_block.made == plain.made
    assert_clean(toy.module)


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA device: checks that taps and patches never make the host wait for the GPU",
)
def test_patches_never_synchronise_with_the_gpu():
    """Under torch.cuda.set_sync_debug_mode("error"), any host-device synchronisation in a tap or patch raises."""
    cpu = wrap_tiny("toy")
    device = torch.device("cuda")
    module = copy.deepcopy(cpu.module).to(device)
    x = example_inputs("toy")["x"]
    model = nt.wrap(module, example=x[:1].to(device))
    model.points()
    patches = device_patches(device)
    probes = nt.model.model.patches_to_probes(patches)
    model.forward(x.to(device), probes=probes)  # first calls: the plan, CUDA's own lazy set-up
    with model.patch(patches):
        model.forward(x.to(device))
    model.clear_recordings()
    inputs = x.to(device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = model.forward(inputs, probes=probes)
        with model.patch(patches):
            in_block = model.forward(inputs)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    expected = cpu.forward(x, probes=nt.model.model.patches_to_probes(device_patches(torch.device("cpu"))))
    assert torch.allclose(out.cpu(), expected, atol=1e-5)
    assert torch.allclose(in_block.cpu(), expected, atol=1e-5)
    assert_clean(module)


def test_a_generate_in_a_patch_block_leaves_the_direct_call_check_on(llama) -> None:
    """Calls made through the wrapper take the root's check for direct calls off for their run; it is back after."""
    ids = example_inputs("llama", batch=1)["input_ids"]
    with torch.no_grad(), llama.patch({"args.labels": nt.Record()}):  # never passed here: every call misses it
        for _ in range(2):
            with pytest.warns(nt.MissedPointWarning, match="generate finished without reaching 'args.labels'"):
                llama.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
            with pytest.raises(nt.MissedPointError, match="args.labels"):
                llama(ids)
            with pytest.warns(nt.MissedPointWarning, match="a call made directly on the module"):
                llama.module(ids)
    assert_clean(llama.module)


def test_a_generate_in_a_patch_block_counts_its_steps_without_hooks_on_the_root(llama) -> None:
    """Each step of a generate in a block takes torch's call for a module without hooks: the block's pre-hook on
    the root is lifted for the call and the steps counted in a forward set meanwhile, which copies never carry."""
    module = llama.module
    ids = example_inputs("llama", batch=1)["input_ids"]
    kwargs = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    expected = module.generate(ids, **kwargs)
    seen: list[tuple] = []

    def look(ctx: nt.SaveContext, value: torch.Tensor) -> None:
        copied = copy.deepcopy(module) if ctx.step == 1 else None
        copy_clean = copied is None or ("forward" not in copied.__dict__ and not copied._forward_pre_hooks)
        seen.append((ctx.step, ctx.call, value.shape[1], len(module._forward_pre_hooks), copy_clean))

    def by_hand(points: int) -> list[tuple]:
        return [(0, 0, ids.shape[1], points, True)] + [(step, 0, 1, points, True) for step in (1, 2)]

    patches = {"model.layers.0.mlp.mul": nt.Custom(look)}
    with torch.no_grad():
        for _ in range(2):  # the second block reuses the first's plan and replays its attachment
            with llama.patch(patches):
                seen.clear()
                assert torch.equal(llama.generate(ids, **kwargs), expected)
                assert seen == by_hand(0)
                seen.clear()
                llama(ids)
                assert seen == [(0, 0, ids.shape[1], 0, True)]
                seen.clear()
                module(ids)  # a direct call: the pre-hook is back on, and starts its forward
                assert [entry[1:] for entry in seen] == [(0, ids.shape[1], 1, True)]
            assert not module._forward_pre_hooks and "forward" not in module.__dict__
        # a tap on the root's input needs the pre-hook, as does a forward other code set on the root
        with llama.patch({**patches, "input": nt.Custom(lambda ctx, value: None)}):
            seen.clear()
            assert torch.equal(llama.generate(ids, **kwargs), expected)
            assert [entry[:3] for entry in seen] == [entry[:3] for entry in by_hand(1)] and seen[0][3] >= 1
        calls = []
        with llama.patch(patches):
            forward = module.forward

            def counting(*args, **kwargs):
                calls.append(1)
                return forward(*args, **kwargs)

            module.forward = counting
            try:
                seen.clear()
                assert torch.equal(llama.generate(ids, **kwargs), expected)
                assert len(calls) == 3 and module.__dict__["forward"] is counting
                assert [entry[:3] for entry in seen] == [entry[:3] for entry in by_hand(1)]
            finally:
                del module.forward


def test_a_record_of_a_whole_value_keeps_it_as_it_was_then():
    """A Record copies the value: the forward's later in-place edits do not reach the copy, nor does autograd."""

    class EditsInPlace(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)

        def forward(self, x):
            hidden = self.linear(x)
            hidden.mul_(2.0)
            return hidden

    module, x = EditsInPlace(), torch.randn(3, 4)
    model = nt.wrap(module, example=x)
    probes = [nt.probe("linear.output", nt.Record())]
    for _ in range(2):  # the second call is the same probes again
        out = model.forward(x, probes=probes)
    expected = module.linear(x)
    assert torch.allclose(out, expected * 2.0)
    for recorded in model.recordings()["linear.output"]["record"]:
        assert torch.allclose(recorded, expected) and not recorded.requires_grad
    assert_clean(module)


def test_new_probes_at_the_last_calls_points_take_its_plan_with_their_own_functions(llama):
    """A sweep's calls each bring new probes at the same points: they reuse the last call's plan, each probe's own
    function acting (a patch, a Record, a function whose result is checked), old probes coming again act as theirs,
    and a probe dropped by the caller is freed though its plan is kept."""
    ids = example_inputs("llama", batch=1)["input_ids"]
    point = "model.layers.0.mlp.mul"
    down = llama.module.get_submodule("model.layers.0.mlp.down_proj")

    def by_hand(edit):
        seen = []

        def hook(_module, args):
            seen.append(args[0].clone())
            return (edit(args[0].clone()), *args[1:])

        handle = down.register_forward_pre_hook(hook)
        try:
            return llama.module(ids).logits, seen[0]
        finally:
            handle.remove()

    def zeroed(unit):
        def edit(x):
            x[..., unit] = 0
            return x

        return by_hand(edit)[0]

    with torch.no_grad():
        plans = []
        for unit in (1, 2, 3):
            got = llama.forward(ids, probes=[nt.probe(point, nt.Zero(index=(..., unit)))]).logits
            assert torch.equal(got, zeroed(unit))
            plans.append(llama._spares[((point, False, False, False),)][0])
        assert plans[0] is plans[1] is plans[2]  # the path under test: one plan served every cell
        llama.forward(ids, probes=[nt.probe(point, nt.Record())])
        assert torch.equal(llama.recordings()[point]["record"][-1], by_hand(lambda x: x)[1])
        with pytest.raises(nt.PatchError, match="shape"):
            llama.forward(ids, probes=[nt.probe(point, lambda ctx, value: value[..., :3])])
        assert_clean(llama.module)
        llama.forward(ids, probes=[nt.probe(point, nt.Record(), optional=True)])  # a plan made for a Record
        assert torch.equal(
            llama.forward(ids, probes=[nt.probe(point, nt.Zero(index=(..., 4)), optional=True)]).logits, zeroed(4)
        )
        first, second = [nt.probe(point, nt.Zero(index=(..., 5)))], [nt.probe(point, nt.Zero(index=(..., 6)))]
        for probes, unit in ((first, 5), (second, 6), (first, 5), (second, 6)):
            assert torch.equal(llama.forward(ids, probes=probes).logits, zeroed(unit))
        value = torch.full((*ids.shape, 128), 0.5)
        probes = [nt.probe(point, nt.Replace(value))]
        assert torch.equal(llama.forward(ids, probes=probes).logits, by_hand(lambda x: torch.full_like(x, 0.5))[0])
        gone = weakref.ref(value)
        del probes, value
        gc.collect()
        assert gone() is None
        kept = llama._spares[((point, False, False, False),)][0]
        assert torch.equal(llama.forward(ids, probes=[nt.probe(point, nt.Zero(index=(..., 1)))]).logits, zeroed(1))
        assert llama._spares[((point, False, False, False),)][0] is kept
    # a gradient probe's gradient comes in the backward, after a later call took the plan for its own probes
    captured: list[torch.Tensor] = []
    handle = down.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
    try:
        logits = llama.module(ids).logits
        expected = [torch.autograd.grad(logits[0, -1, unit], captured[0], retain_graph=True)[0] for unit in (7, 8)]
    finally:
        handle.remove()
    first_seen: list[torch.Tensor] = []
    second_seen: list[torch.Tensor] = []
    outputs = [
        llama.forward(
            ids, probes=[nt.probe(point, lambda ctx, gradient, seen=seen: seen.append(gradient), grad=True)]
        ).logits
        for seen in (first_seen, second_seen)
    ]
    outputs[0][0, -1, 7].backward()
    outputs[1][0, -1, 8].backward()
    llama.module.zero_grad(set_to_none=True)
    assert len(first_seen) == len(second_seen) == 1
    assert torch.allclose(first_seen[0], expected[0], atol=1e-6)
    assert torch.allclose(second_seen[0], expected[1], atol=1e-6)
    assert_clean(llama.module)


def test_new_probes_that_take_the_ids_of_the_last_calls_act_as_themselves(llama):
    """A loop's call with the probes of the call before takes that call's plan at once; probes made anew in
    place of dropped ones often get the dropped ones' ids, and must still act as themselves, also once more
    probe lists than the cache keeps have come and gone."""
    ids = example_inputs("llama", batch=1)["input_ids"]
    point = "model.layers.0.mlp.mul"
    down = llama.module.get_submodule("model.layers.0.mlp.down_proj")

    def zeroed(unit):
        def hook(_module, args):
            x = args[0].clone()
            x[..., unit] = 0
            return (x, *args[1:])

        handle = down.register_forward_pre_hook(hook)
        try:
            return llama.module(ids).logits
        finally:
            handle.remove()

    with torch.no_grad():
        seen_ids = set()
        for unit in range(12):
            probes = [nt.probe(point, nt.Zero(index=(..., unit)))]
            seen_ids.add(id(probes[0]))
            for _ in range(2):  # the second call: the same probes as the call before
                assert torch.equal(llama.forward(ids, probes=probes).logits, zeroed(unit))
            del probes
        assert len(seen_ids) < 12  # ids were taken again, so the cases above were met
        kept = [[nt.probe(point, nt.Zero(index=(..., unit)))] for unit in range(6)]  # more than the cache keeps
        for _ in range(2):
            for unit, probes in enumerate(kept):
                assert torch.equal(llama.forward(ids, probes=probes).logits, zeroed(unit))
                assert torch.equal(llama.forward(ids, probes=probes).logits, zeroed(unit))
        # the last call's plan pushed out of the cache by nested blocks' plans, then taken by a block's probes of
        # the same kinds: the last call's probes, coming again, get a plan of their own
        other = "model.layers.1.mlp.mul"
        probes = [nt.probe(other, nt.Scale(1.0)), nt.probe(point, nt.Zero(index=(..., 2)))]
        assert torch.equal(llama.forward(ids, probes=probes).logits, zeroed(2))
        blocks = []
        for _ in range(4):  # plans of one other shape: the last call's shape stays among the spares
            blocks += [llama.patch({other: nt.Scale(1.0)}), llama.patch({"model.layers.0.output": nt.Scale(1.0)})]
            with blocks[-2], blocks[-1]:
                pass
        blocks += [llama.patch({other: nt.Scale(1.0)}), llama.patch({point: nt.Zero(index=(..., 9))})]
        with blocks[-2], blocks[-1]:
            pass
        assert torch.equal(llama.forward(ids, probes=probes).logits, zeroed(2))
    assert_clean(llama.module)
