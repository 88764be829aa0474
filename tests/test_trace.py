"""``m.run`` and its Trace, and point-name patterns, against hand-written torch hooks on the unwrapped model."""

from __future__ import annotations

import pytest
import torch

import neurotap as nt
from conftest import assert_clean, example_inputs, snapshot_state, tiny_llama, toy_by_hand

LAYERS = 2


def hand_values(module: torch.nn.Module, inputs: dict, *, grad_of=None):
    """Each layer's output and MLP product by plain hooks; with ``grad_of(output)``, their gradients too."""
    outputs, products = {}, {}
    handles = []
    for i, layer in enumerate(module.model.layers):
        handles.append(layer.register_forward_hook(lambda _m, _a, out, i=i: outputs.__setitem__(i, out)))
        handles.append(
            layer.mlp.down_proj.register_forward_pre_hook(lambda _m, args, i=i: products.__setitem__(i, args[0]))
        )
    try:
        with torch.enable_grad():
            output = module(**inputs)
            hidden = [outputs[i][0] if isinstance(outputs[i], tuple) else outputs[i] for i in range(LAYERS)]
            mul = [products[i] for i in range(LAYERS)]
            grads = None
            if grad_of is not None:
                loss = grad_of(output)
                grads = torch.autograd.grad(loss, mul)
                return output, hidden, mul, grads, loss
    finally:
        for handle in handles:
            handle.remove()
    return output, hidden, mul, grads, None


def test_run_records_this_call_only(llama) -> None:
    inputs = example_inputs("llama")
    llama.forward(**inputs, probes=[nt.probe("model.layers.0.mlp.mul", nt.Mean(dims=(0, 1)))])
    before = {name: dict(ctx) for name, ctx in llama.recordings().items()}
    state = snapshot_state(llama.module)

    output, trace = llama.run(**inputs, record=["blocks.*.resid_post", "model.layers.*.mlp.mul"])

    expected, hidden, mul, _, _ = hand_values(llama.module, inputs)
    assert torch.equal(output.logits, expected.logits)
    assert trace.points == [
        "model.layers.0.mlp.mul",
        "blocks.0.resid_post",
        "model.layers.1.mlp.mul",
        "blocks.1.resid_post",
    ]
    for i in range(LAYERS):
        assert torch.equal(trace[f"blocks.{i}.resid_post"], hidden[i])
        assert torch.equal(trace[f"model.layers.{i}.mlp.mul"], mul[i])
        assert not trace[f"blocks.{i}.resid_post"].requires_grad
    assert torch.equal(trace.stack("blocks.*.resid_post"), torch.stack(hidden))
    assert torch.equal(trace.stack("model.layers.{0..1}.mlp.mul"), torch.stack(mul))
    assert trace.loss is None and len(trace.grad) == 0
    # the save contexts are exactly as they were: the trace's values are not in them
    after = {name: dict(ctx) for name, ctx in llama.recordings().items()}
    assert after.keys() == before.keys() == {"model.layers.0.mlp.mul"}
    assert torch.equal(after["model.layers.0.mlp.mul"]["mean"], before["model.layers.0.mlp.mul"]["mean"])
    assert_clean(llama.module, state)


def test_run_leaves_no_save_contexts_behind(llama) -> None:
    inputs = example_inputs("llama")
    llama.forward(**inputs, probes=[nt.probe("model.layers.1.mlp.mul", nt.Record())])
    kept = dict(llama._contexts)
    targets = inputs["input_ids"].roll(-1, 1)
    llama.run(**inputs, record="blocks.*.resid_post")
    llama.run(**inputs, record="model.layers.1.mlp.mul", grad="blocks.0.resid_post", loss=nt.CrossEntropy(targets))
    assert llama._contexts == kept  # the traces' points have no empty contexts left in the model
    assert llama._contexts["model.layers.1.mlp.mul"]["record"][0].shape[-1] == llama.module.config.intermediate_size
    llama.clear_recordings()


def hand_generate(module: torch.nn.Module, ids: torch.Tensor, **settings):
    """Plain ``generate`` with forward hooks on the layers: its tokens and every layer's output at every step."""
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in range(LAYERS)}

    def keeper(i):
        def keep(_module, _args, out):
            seen[i].append((out[0] if isinstance(out, tuple) else out).detach().clone())

        return keep

    handles = [layer.register_forward_hook(keeper(i)) for i, layer in enumerate(module.model.layers)]
    try:
        tokens = module.generate(ids, **settings)
    finally:
        for handle in handles:
            handle.remove()
    return tokens, seen


def test_run_of_generate_traces_every_step(llama) -> None:
    ids = example_inputs("llama", batch=1)["input_ids"]
    settings = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    state = snapshot_state(llama.module)
    with llama.patch({"lm_head.output": nt.Zero(index=(..., 7))}):  # patches apply at every step, as in generate
        kept = dict(llama._contexts)
        tokens, trace = llama.run(ids, record="blocks.*.resid_post", generate=True, **settings)
        assert llama._contexts == kept
    handle = llama.module.lm_head.register_forward_hook(lambda _m, _a, out: out.index_fill(-1, torch.tensor([7]), 0))
    try:
        expected, seen = hand_generate(llama.module, ids, **settings)
    finally:
        handle.remove()
    assert torch.equal(tokens, expected)
    assert trace.points == ["blocks.0.resid_post", "blocks.1.resid_post"]
    for i in range(LAYERS):
        calls = trace.calls(f"blocks.{i}.resid_post")
        assert len(calls) == len(seen[i]) == settings["max_new_tokens"]  # the prompt's pass, then one a new token
        assert calls[0].shape[1] == ids.shape[1] and all(c.shape[1] == 1 for c in calls[1:])  # the KV cache is on
        for got, want in zip(calls, seen[i]):
            assert torch.equal(got, want)
    with pytest.raises(nt.NeurotapError, match="generate"):
        llama.run(ids, grad="blocks.0.resid_post", loss=nt.LogitDiff(1, 2), generate=True, **settings)
    assert llama.recordings() == {}
    assert_clean(llama.module, state)


def test_run_records_readings_of_the_values(llama) -> None:
    """``record={name: reading}`` keeps what the patch reads of each value, computed here from the hand values."""
    inputs = example_inputs("llama")
    token = 7
    output, trace = llama.run(
        **inputs,
        record={
            "blocks.*.resid_post": nt.Norm(),
            "model.layers.0.mlp.mul": nt.Record(index=(slice(None), -1, torch.tensor([3, 5]))),
            "lm_head.output": nt.Probability(token, index=(slice(None), -1)),
        },
    )
    expected, hidden, mul, _, _ = hand_values(llama.module, inputs)
    assert trace.points == ["model.layers.0.mlp.mul", "blocks.0.resid_post", "blocks.1.resid_post", "lm_head.output"]
    for i in range(LAYERS):
        torch.testing.assert_close(trace[f"blocks.{i}.resid_post"], hidden[i].norm(dim=-1))
    assert torch.equal(trace["model.layers.0.mlp.mul"], mul[0][:, -1, [3, 5]])
    torch.testing.assert_close(trace["lm_head.output"], torch.softmax(expected.logits[:, -1], dim=-1)[:, token])
    assert not llama.recordings()
    with pytest.raises(nt.NeurotapError, match=r"takes a patch that reads each value .*got Zero"):
        llama.run(**inputs, record={"blocks.0.resid_post": nt.Zero()})
    with pytest.raises(nt.PatchError, match="Probability at 'lm_head.output': token 999 is not an entry"):
        llama.run(**inputs, record={"lm_head.output": nt.Probability(999)})
    assert_clean(llama.module)


def test_run_values_are_copies(llama) -> None:
    inputs = example_inputs("llama")
    _, first = llama.run(**inputs, record="blocks.0.resid_post")
    kept = first["blocks.0.resid_post"].clone()
    _, second = llama.run(**{"input_ids": inputs["input_ids"].flip(1)}, record="blocks.0.resid_post")
    assert torch.equal(first["blocks.0.resid_post"], kept)
    assert not torch.equal(second["blocks.0.resid_post"], kept)


def test_run_with_loss_gives_gradients() -> None:
    model = nt.wrap(tiny_llama())
    inputs = example_inputs("llama")
    targets = inputs["input_ids"].roll(-1, 1)
    marker = [torch.full_like(p, 7.0) for p in model.module.parameters()]
    for parameter, grad in zip(model.module.parameters(), marker):
        parameter.grad = grad

    output, trace = model.run(
        **inputs, record="blocks.*.resid_post", grad="model.layers.*.mlp.mul", loss=nt.CrossEntropy(targets)
    )

    def cross_entropy(out):
        logits = out.logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    for parameter, grad in zip(model.module.parameters(), marker):
        assert parameter.grad is grad  # the user's .grad untouched
        parameter.grad = None
    expected, hidden, _, grads, loss = hand_values(model.module, inputs, grad_of=cross_entropy)
    assert trace.loss == pytest.approx(float(loss.detach()), rel=1e-6)
    assert trace.grad.points == ["model.layers.0.mlp.mul", "model.layers.1.mlp.mul"]
    for i in range(LAYERS):
        torch.testing.assert_close(trace.grad[f"model.layers.{i}.mlp.mul"], grads[i], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(trace[f"blocks.{i}.resid_post"], hidden[i], rtol=0, atol=0)
    torch.testing.assert_close(trace.grad.stack("model.layers.*.mlp.mul"), torch.stack(grads), rtol=1e-5, atol=1e-7)
    assert torch.equal(output.logits.detach(), expected.logits.detach())
    assert model.recordings() == {}
    assert_clean(model.module)


def test_run_refuses_before_running(llama) -> None:
    inputs = example_inputs("llama")
    state = snapshot_state(llama.module)
    with pytest.raises(nt.NeurotapError, match="loss=nt.CrossEntropy"):
        llama.run(**inputs, grad="blocks.0.resid_post")
    with pytest.raises(nt.UnknownPointError, match="closest: model.layers.1.mlp.mul"):
        llama.run(**inputs, record=["blocks.0.resid_post", "model.layers.*.mlp.mull"])
    with pytest.raises(TypeError, match="point names"):
        llama.run(**inputs, record=[3])
    assert llama.recordings() == {}
    assert_clean(llama.module, state)


def test_a_point_that_fires_twice_keeps_every_call(toy) -> None:
    x = example_inputs("toy")["x"]
    _, trace = toy.run(x, record=["block.output", "mix.mul"])
    expected = toy_by_hand(toy.module, x)
    first, second = trace.calls("block.output")
    assert torch.equal(first, expected["block_0"]) and torch.equal(second, expected["block_1"])
    assert torch.equal(trace["mix.mul"], expected["hidden"])
    with pytest.raises(nt.NeurotapError, match="fired 2 times"):
        trace["block.output"]


def test_trace_lookups_and_repr() -> None:
    values = {"blocks.0.resid_post": [torch.zeros(2, 3)], "blocks.1.resid_post": [torch.ones(2, 3)]}
    trace = nt.Trace({**values, "loop.block.output": [torch.ones(1), torch.zeros(1)]}, {"x": [torch.ones(4)]}, 1.5)
    assert torch.equal(trace.stack("blocks.*.resid_post"), torch.stack([torch.zeros(2, 3), torch.ones(2, 3)]))
    assert [v.item() for v in trace.calls("loop.block.output")] == [1.0, 0.0]
    with pytest.raises(nt.NeurotapError, match=r"fired 2 times.*trace.calls"):
        trace["loop.block.output"]
    with pytest.raises(nt.NeurotapError, match="trace.stack"):
        trace["blocks.*.resid_post"]
    with pytest.raises(nt.UnknownPointError, match="closest: blocks.1.resid_post"):
        trace["blocks.1.resid_pots"]
    with pytest.raises(nt.NeurotapError, match="not tensors of one shape"):
        nt.Trace({"a.x": [torch.zeros(2)], "b.x": [torch.zeros(3)]}).stack("*.x")
    text = repr(trace)
    assert text.splitlines()[0] == "Trace(3 points, 1 gradients, loss=1.5)"
    assert "blocks.1.resid_post" in text and "(2, 3)  float32" in text and "(2 calls)" in text
    assert "grad x" in text


# -- patterns -------------------------------------------------------------------------------------------


def _hand_zeroed(module: torch.nn.Module, inputs: dict, layers: list[int]) -> torch.Tensor:
    handles = [
        module.model.layers[i].mlp.down_proj.register_forward_pre_hook(lambda _m, args: (torch.zeros_like(args[0]),))
        for i in layers
    ]
    try:
        with torch.no_grad():
            return module(**inputs).logits
    finally:
        for handle in handles:
            handle.remove()


def test_patterns_in_patch_and_probes(llama) -> None:
    inputs = example_inputs("llama")
    with llama.patch({"model.layers.*.mlp.mul": nt.Zero()}):
        every = llama.forward(**inputs).logits
    assert torch.equal(every, _hand_zeroed(llama.module, inputs, [0, 1]))
    with llama.patch({"model.layers.{1..1}.mlp.mul": nt.Zero()}):
        second = llama.forward(**inputs).logits
    assert torch.equal(second, _hand_zeroed(llama.module, inputs, [1]))

    llama.forward(**inputs, probes=[nt.probe("blocks.*.resid_post", nt.Record())])
    _, hidden, _, _, _ = hand_values(llama.module, inputs)
    recorded = llama.recordings()
    assert list(recorded) == [f"blocks.{i}.resid_post" for i in range(LAYERS)]  # the concrete names
    for i in range(LAYERS):
        assert torch.equal(recorded[f"blocks.{i}.resid_post"]["record"][0], hidden[i])


def test_star_is_one_component(llama) -> None:
    names = llama.points().names()
    # an independent reading of the rule: split at dots, every component but the starred one equal
    expected = [n for n in names if n.split(".")[:2] == ["model", "layers"] and n.split(".")[3:] == ["mlp", "mul"]]
    assert expected == [f"model.layers.{i}.mlp.mul" for i in range(LAYERS)]
    assert llama.points("model.layers.*.mlp.mul").names() == expected
    _, trace = llama.run(**example_inputs("llama"), record="model.layers.0.mlp.*")
    under = [n for n in names if n.startswith("model.layers.0.mlp.") and n.count(".") == 4 and "[" not in n]
    assert trace.points == under and "model.layers.0.mlp.mul" in under


def test_unmatched_patterns_fail_like_unknown_names(llama) -> None:
    inputs = example_inputs("llama")
    state = snapshot_state(llama.module)
    for pattern in ["model.*.mlp.mul", "model.layers.*.mul", "model.layers.{2..5}.mlp.mul"]:
        with pytest.raises(nt.UnknownPointError, match="no point matches"):
            llama.forward(**inputs, probes=[nt.probe(pattern, nt.Record())])
        with pytest.raises(nt.UnknownPointError):
            llama.points(pattern)
    with pytest.raises(nt.UnknownPointError, match="braces hold a range"):
        llama.forward(**inputs, probes=[nt.probe("model.layers.{0,1}.mlp.mul", nt.Record())])
    with pytest.raises(nt.UnknownPointError):
        with llama.patch({"model.layers.*.mlp.mull": nt.Zero()}):
            pass
    assert llama.recordings() == {}
    assert_clean(llama.module, state)


def test_points_with_a_pattern_list_under_each_match(llama) -> None:
    every = llama.points().names()
    listed = llama.points("model.layers.*.mlp").names()
    mlps = [f"model.layers.{i}.mlp" for i in range(LAYERS)]
    assert listed == [n for n in every if any(n == p or n.startswith((p + ".", p + "[")) for p in mlps)]
    assert llama.points("model.layers.0.mlp.mul*").names() == [
        n for n in every if n.startswith("model.layers.0.mlp.mul")
    ]
    # aliases list the raw points they stand for
    assert llama.points("blocks.*.resid_post").names() == [f"model.layers.{i}.output" for i in range(LAYERS)]


# -- text ---------------------------------------------------------------------------------------------

TEXTS = ["the capital of france is", "paris is an old city", "of the river"]


@pytest.fixture(scope="module")
def worded():
    from serving import word_tokenizer

    return nt.wrap(tiny_llama(), word_tokenizer())


def test_text_wherever_token_ids_go(worded) -> None:
    tokenizer, module = worded.tokenizer, worded.module
    one = tokenizer(TEXTS[0], return_tensors="pt").input_ids
    right = tokenizer(TEXTS, return_tensors="pt", padding=True)
    tokenizer.padding_side = "left"
    left = tokenizer(TEXTS, return_tensors="pt", padding=True)
    tokenizer.padding_side = "right"
    with torch.no_grad():
        assert torch.equal(worded.forward(TEXTS[0]).logits, module(one).logits)
        assert torch.equal(worded.forward(input_ids=TEXTS[0]).logits, module(one).logits)
        assert torch.equal(worded.forward(TEXTS).logits, module(**right).logits)
        expected = module.generate(**left, max_new_tokens=3, do_sample=False)
    assert torch.equal(worded.generate(TEXTS, max_new_tokens=3, do_sample=False), expected)
    assert tokenizer.padding_side == "right"
    _, by_text = worded.run(TEXTS[0], record="blocks.1.resid_post")
    _, by_ids = worded.run(one, record="blocks.1.resid_post")
    assert torch.equal(by_text["blocks.1.resid_post"], by_ids["blocks.1.resid_post"])
    targets = one.roll(-1, 1)
    assert worded.backward(TEXTS[0], loss=nt.CrossEntropy(targets)) == worded.backward(
        one, loss=nt.CrossEntropy(targets)
    )
    assert_clean(module)


def test_wrong_inputs_say_what_to_pass(worded) -> None:
    for wrong in ([2, 3, 4], torch.tensor([[2.0, 3.0]]), 3.5):
        with pytest.raises(nt.NeurotapError, match=r"pass token ids \(a LongTensor\) or text") as caught:
            worded.forward(wrong)
        assert isinstance(caught.value, TypeError)
    with pytest.raises(nt.NeurotapError, match="no tokenizer"):
        nt.wrap(worded.module).forward("the city")
    assert_clean(worded.module)


def test_ranges_select_exactly_their_numbers() -> None:
    from neurotap.points import matching

    names = [f"blocks.{n}.resid_post" for n in range(2500)] + ["blocks.07.resid_post", "blocks.x.resid_post"]
    for low, high in [(0, 0), (0, 9), (3, 117), (10, 99), (99, 1000), (123, 2467), (0, 65536)]:
        expected = [f"blocks.{n}.resid_post" for n in range(low, min(high, 2499) + 1)]
        assert matching(f"blocks.{{{low}..{high}}}.resid_post", names) == expected
    assert matching("blocks.{1..2}0.resid_post", names) == ["blocks.10.resid_post", "blocks.20.resid_post"]
    assert matching("blocks.{0..9}*.resid_post", names)[:3] == [f"blocks.{n}.resid_post" for n in range(3)]
    assert len(matching("blocks.{0..9}*.resid_post", names)) == 2501  # every number, "07" too: * takes the rest
