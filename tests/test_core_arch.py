"""Every architecture: wrapping is invisible, every point fires, reads, patches,
generation and gradients agree with computations made without neurotap."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import neurotap as nt
from conftest import (
    Arch,
    alias_values_by_hand,
    assert_aliases_read,
    assert_clean,
    assert_same_output,
    example_inputs,
    main_tensor,
    snapshot_state,
    tiny_module,
    toy_by_hand,
    wrap_tiny,
)
from neurotap.points import static_inventory

ATOL = 1e-6
RTOL = 1e-5


def close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    return actual.shape == expected.shape and torch.allclose(actual, expected, atol=ATOL, rtol=RTOL)


# -- 1. wrapping changes nothing ------------------------------------------------------------------


def test_core_wrap_leaves_output_unchanged(arch: Arch) -> None:
    module = tiny_module(arch.name)
    inputs = example_inputs(arch.name)
    state = snapshot_state(module)
    with torch.no_grad():
        expected = module(**inputs)
        model = wrap_tiny(arch.name)
        assert_same_output(model(**inputs), expected)
        read_only = nt.probe(arch.mlp_point, lambda ctx, value: None)
        assert_same_output(model.forward(**inputs, probes=[read_only]), expected)
        assert_same_output(module(**inputs), expected)
    assert_clean(module, state)


# -- 2. every point in the inventory fires --------------------------------------------------------


def test_core_every_point_fires(arch: Arch) -> None:
    model = wrap_tiny(arch.name)
    inputs = example_inputs(arch.name)
    points = model.points()
    names = points.names()
    assert len(names) == len(set(names))
    assert arch.mlp_point in names
    assert {"input", "output"} <= set(names)
    fired: dict[str, int] = {}

    def seen(ctx: nt.SaveContext, value: object) -> None:
        fired[ctx.point] = fired.get(ctx.point, 0) + 1

    with torch.no_grad():
        expected = model.module(**inputs)
        actual = model.forward(**inputs, probes=[nt.probe(name, seen) for name in names])
    assert sorted(set(names) - set(fired)) == []
    assert set(fired) == set(names)
    assert_same_output(actual, expected)
    assert_clean(model.module)


# -- 3. read points equal hand computations -------------------------------------------------------


def _causal_softmax(q: torch.Tensor, k: torch.Tensor, scaling: float, causal: bool = True) -> torch.Tensor:
    scores = (q @ k.transpose(-1, -2)) * scaling
    if causal:
        seq = scores.shape[-1]
        allowed = torch.ones(seq, seq, dtype=torch.bool).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores.float(), dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding on the first ``cos.shape[-1]`` dims of ``x``."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    return torch.cat((x_rot * cos[:, None] + rotated * sin[:, None], x_pass), dim=-1)


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    b, s, _ = x.shape
    return x.view(b, s, -1, head_dim).transpose(1, 2)


def _positions(h: torch.Tensor) -> torch.Tensor:
    return torch.arange(h.shape[1])[None].expand(h.shape[0], -1)


_ACTIVATIONS = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "gelu": F.gelu,
}


def _hand_llama(module, rec):
    layer = module.model.layers[0]
    x = rec["model.layers.0.mlp.input"]
    mlp = layer.mlp
    act = _ACTIVATIONS[module.config.hidden_act]
    gate = act(F.linear(x, mlp.gate_proj.weight, mlp.gate_proj.bias))
    product = gate * F.linear(x, mlp.up_proj.weight, mlp.up_proj.bias)

    h = rec["model.layers.0.self_attn.input"]
    attn = layer.self_attn
    q = _heads(F.linear(h, attn.q_proj.weight, attn.q_proj.bias), attn.head_dim)
    k = _heads(F.linear(h, attn.k_proj.weight, attn.k_proj.bias), attn.head_dim)
    cos, sin = module.model.rotary_emb(h, _positions(h))
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    probs = _causal_softmax(q, k, attn.scaling)
    return {
        "model.layers.0.mlp.act_fn.output": gate,
        "model.layers.0.mlp.mul": product,
        "model.layers.0.self_attn.attention_interface.softmax": probs,
    }


def _hand_gpt2(module, rec):
    block = module.transformer.h[0]
    x = rec["transformer.h.0.mlp.input"]
    pre = x @ block.mlp.c_fc.weight + block.mlp.c_fc.bias
    gelu_new = 0.5 * pre * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (pre + 0.044715 * pre**3)))

    h = rec["transformer.h.0.attn.input"]
    attn = block.attn
    q, k, _ = (h @ attn.c_attn.weight + attn.c_attn.bias).split(attn.embed_dim, dim=2)
    q, k = _heads(q, attn.head_dim), _heads(k, attn.head_dim)
    probs = _causal_softmax(q, k, attn.head_dim**-0.5)
    return {
        "transformer.h.0.mlp.c_fc.output": pre,
        "transformer.h.0.mlp.act.output": gelu_new,
        "transformer.h.0.attn.attention_interface.softmax": probs,
    }


def _hand_gpt_neox(module, rec):
    layer = module.gpt_neox.layers[0]
    x = rec["gpt_neox.layers.0.mlp.input"]
    act = F.gelu(F.linear(x, layer.mlp.dense_h_to_4h.weight, layer.mlp.dense_h_to_4h.bias))

    h = rec["gpt_neox.layers.0.attention.input"]
    attn = layer.attention
    qkv = _heads(F.linear(h, attn.query_key_value.weight, attn.query_key_value.bias), 3 * attn.head_size)
    q, k, _ = qkv.chunk(3, dim=-1)
    cos, sin = module.gpt_neox.rotary_emb(h, _positions(h))
    assert cos.shape[-1] < attn.head_size  # partial rotary: the hand version must split
    probs = _causal_softmax(_rotate(q, cos, sin), _rotate(k, cos, sin), attn.scaling)
    return {
        "gpt_neox.layers.0.mlp.act.output": act,
        "gpt_neox.layers.0.attention.attention_interface.softmax": probs,
    }


def _hand_bert(module, rec):
    layer = module.encoder.layer[0]
    x = rec["encoder.layer.0.intermediate.input"]
    act = F.gelu(F.linear(x, layer.intermediate.dense.weight, layer.intermediate.dense.bias))

    h = rec["encoder.layer.0.attention.self.input"]
    attn = layer.attention.self
    q = _heads(F.linear(h, attn.query.weight, attn.query.bias), attn.attention_head_size)
    k = _heads(F.linear(h, attn.key.weight, attn.key.bias), attn.attention_head_size)
    probs = _causal_softmax(q, k, attn.attention_head_size**-0.5, causal=False)
    return {
        "encoder.layer.0.intermediate.intermediate_act_fn.output": act,
        "encoder.layer.0.attention.self.attention_interface.softmax": probs,
    }


def _hand_toy(module, rec):
    steps = toy_by_hand(module, rec["input"])
    return {
        "block.output": torch.stack([steps["block_0"], steps["block_1"]]),
        "add": torch.stack([steps["loop_0"], steps["loop_1"]]),
        "gate.mul": torch.tanh(steps["loop_1"]) * 2.0,
        "gate": steps["gated"],
        "mix.mul": steps["hidden"],
        "truediv": steps["out"],
    }


HAND = {  # family: (points the computation starts from, points it predicts, computation)
    "llama": (
        ("model.layers.0.mlp.input", "model.layers.0.self_attn.input"),
        (
            "model.layers.0.mlp.act_fn.output",
            "model.layers.0.mlp.mul",
            "model.layers.0.self_attn.attention_interface.softmax",
        ),
        _hand_llama,
    ),
    "gpt2": (
        ("transformer.h.0.mlp.input", "transformer.h.0.attn.input"),
        (
            "transformer.h.0.mlp.c_fc.output",
            "transformer.h.0.mlp.act.output",
            "transformer.h.0.attn.attention_interface.softmax",
        ),
        _hand_gpt2,
    ),
    "gpt_neox": (
        ("gpt_neox.layers.0.mlp.input", "gpt_neox.layers.0.attention.input"),
        ("gpt_neox.layers.0.mlp.act.output", "gpt_neox.layers.0.attention.attention_interface.softmax"),
        _hand_gpt_neox,
    ),
    "bert": (
        ("encoder.layer.0.intermediate.input", "encoder.layer.0.attention.self.input"),
        (
            "encoder.layer.0.intermediate.intermediate_act_fn.output",
            "encoder.layer.0.attention.self.attention_interface.softmax",
        ),
        _hand_bert,
    ),
    "toy": (("input",), ("block.output", "add", "gate.mul", "gate", "mix.mul", "truediv"), _hand_toy),
}


def test_core_read_points_match_hand_computation(arch: Arch) -> None:
    model = wrap_tiny(arch.name)
    sources, targets, hand = HAND[arch.family]
    with torch.no_grad():
        model.forward(**example_inputs(arch.name), probes=[nt.probe(n, nt.Record()) for n in (*sources, *targets)])
        recorded = model.recordings()
        expected_points = hand(model.module, {name: recorded[name]["record"][0] for name in sources})
    assert sorted(expected_points) == sorted(targets)
    for name, expected in expected_points.items():
        values = recorded[name]["record"]
        actual = values[0] if len(values) == 1 else torch.stack(values)
        assert close(actual, expected), name
    assert_clean(model.module)


# -- 4. a patch equals the same edit made by hand -------------------------------------------------


def _zero_unit_3(_module, args):
    edited = args[0].clone()
    edited[..., 3] = 0.0
    return (edited, *args[1:])


def test_core_patch_matches_hand_edit(arch: Arch) -> None:
    model = wrap_tiny(arch.name)
    module = model.module
    inputs = example_inputs(arch.name)
    state = snapshot_state(module)
    with torch.no_grad():
        baseline = module(**inputs)
        handle = module.get_submodule(arch.mlp_consumer).register_forward_pre_hook(_zero_unit_3)
        try:
            by_hand = module(**inputs)
        finally:
            handle.remove()
        with model.patch({arch.mlp_point: nt.Zero(index=(..., 3))}):
            patched = model(**inputs)
            patched_in_generate_path = module(**inputs)  # the module itself is patched inside the block
        as_probe = model.forward(**inputs, probes=[nt.probe(arch.mlp_point, nt.Zero(index=(..., 3)))])
        after = model(**inputs)
    assert not torch.equal(main_tensor(by_hand), main_tensor(baseline))
    assert_same_output(patched, by_hand)
    assert_same_output(patched_in_generate_path, by_hand)
    assert_same_output(as_probe, by_hand)
    assert_same_output(after, baseline)
    assert_clean(module, state)


# -- 5. generation --------------------------------------------------------------------------------


def _prompt() -> dict[str, torch.Tensor]:
    ids = torch.randint(2, 128, (1, 6), generator=torch.Generator().manual_seed(3))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


GENERATE = dict(max_new_tokens=5, do_sample=False, use_cache=True)


def _plain_generate(module, prompt, pre_hook=None):
    """Greedy generate on the unwrapped module, logits of every step captured by a plain hook."""
    logits = []
    handles = [module.register_forward_hook(lambda _m, _a, out: logits.append(out["logits"].detach().clone()))]
    if pre_hook is not None:
        handles.append(pre_hook[0].register_forward_pre_hook(pre_hook[1]))
    try:
        tokens = module.generate(**prompt, **GENERATE)
    finally:
        for handle in handles:
            handle.remove()
    return tokens, logits


def test_core_generate_with_probes_matches_plain_generate(decoder: Arch) -> None:
    model = wrap_tiny(decoder.name)
    module = model.module
    prompt = _prompt()
    expected_tokens, expected_logits = _plain_generate(module, prompt)
    steps: list[tuple[int, int]] = []
    inputs: list[tuple[int, int, int]] = []

    def step_of(ctx: nt.SaveContext, value: torch.Tensor) -> None:
        steps.append((ctx.step, value.shape[1]))

    def input_of(ctx: nt.SaveContext, value: torch.Tensor) -> None:
        inputs.append((ctx.step, ctx.call, value.shape[1]))

    for root_input in ([], [nt.probe("input", input_of)]):  # a tap on the root's input: steps start before it
        steps.clear()
        tokens = model.generate(
            **prompt,
            **GENERATE,
            probes=[*root_input, nt.probe(decoder.mlp_point, step_of), nt.probe('output["logits"]', nt.Record())],
        )
        assert torch.equal(tokens, expected_tokens)
        assert tokens.shape[1] == 6 + 5
        # step 0 is the prompt; with the KV cache on, every later step sees one new token
        assert steps == [(0, 6), (1, 1), (2, 1), (3, 1), (4, 1)]
    assert inputs == [(0, 0, 6), (1, 0, 1), (2, 0, 1), (3, 0, 1), (4, 0, 1)]
    logits = model.recordings()['output["logits"]']["record"]
    assert len(logits) == 2 * len(expected_logits) == 10
    for actual, expected in zip(logits, expected_logits * 2, strict=True):
        assert torch.equal(actual, expected)
    assert_clean(module)


def test_core_generate_with_patch_matches_hand_edit(decoder: Arch) -> None:
    model = wrap_tiny(decoder.name)
    module = model.module
    prompt = _prompt()
    expected_tokens, expected_logits = _plain_generate(
        module, prompt, (module.get_submodule(decoder.mlp_consumer), _zero_unit_3)
    )
    with model.patch({decoder.mlp_point: nt.Zero(index=(..., 3)), 'output["logits"]': nt.Record()}):
        tokens = model.generate(**prompt, **GENERATE)
    assert torch.equal(tokens, expected_tokens)
    logits = model.recordings()['output["logits"]']["record"]
    assert len(logits) == 5
    for actual, expected in zip(logits, expected_logits, strict=True):
        assert torch.equal(actual, expected)
    assert_clean(module)


# -- 6. gradients at points -----------------------------------------------------------------------


def _loss(output) -> torch.Tensor:
    return main_tensor(output)[:, -1].pow(2).sum()


def test_core_gradient_at_point_matches_autograd(arch: Arch) -> None:
    model = wrap_tiny(arch.name)
    module = model.module
    inputs = example_inputs(arch.name)
    state = snapshot_state(module)
    captured: list[torch.Tensor] = []
    consumer = module.get_submodule(arch.mlp_consumer)
    handle = consumer.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        expected = torch.autograd.grad(_loss(module(**inputs)), captured[0])[0]
    finally:
        handle.remove()
    try:
        output = model.forward(**inputs, probes=[nt.probe(arch.mlp_point, nt.Record(), grad=True)])
        assert model.recordings().get(arch.mlp_point + ".grad") is None  # nothing until backward
        _loss(output).backward()
    finally:
        module.zero_grad(set_to_none=True)
    gradients = model.recordings()[arch.mlp_point + ".grad"]["record"]
    assert len(gradients) == 1
    assert expected.abs().sum() > 0
    assert torch.equal(gradients[0], expected)
    assert_clean(module, state)


def test_core_module_points_name_module_values(arch: Arch) -> None:
    """``P.input`` / ``P.output`` are the input and output of the module at path ``P``, for every module."""
    model = wrap_tiny(arch.name)
    points = {p.name: p for p in model.points()}
    called: list[str] = []
    handles = [
        sub.register_forward_hook(lambda *_, path=path: called.append(path))
        for path, sub in model.module.named_modules()
    ]
    try:
        with torch.no_grad():
            model.module(**example_inputs(arch.name))
    finally:
        for handle in handles:
            handle.remove()
    assert len(called) > 5
    for path in called:
        for kind in ("input", "output"):
            name = f"{path}.{kind}" if path else kind
            assert name in points, name
            assert (points[name].kind, points[name].module) == (kind, path), name


def test_core_a_submodule_call_is_listed_once_as_that_modules_points(arch: Arch) -> None:
    model = wrap_tiny(arch.name)
    # BERT names submodules "output": encoder.layer.0.output is layer 0's output point as well as that module's path
    modules = {path for path, _ in model.module.named_modules() if path and not path.endswith((".input", ".output"))}
    static = static_inventory(model.module)  # from the code alone, as for a module without an example input
    for listing in (model.points().names(), model.inventory().static, static.points):
        assert listing and modules.isdisjoint(listing)  # no op point reads like a module path
    with pytest.raises(nt.UnknownPointError, match=r"is a module, not a point.*\.output"):
        model.forward(**example_inputs(arch.name), probes=[nt.probe(sorted(modules)[0], nt.Record())])


def test_core_points_describe_themselves(arch: Arch) -> None:
    model = wrap_tiny(arch.name)
    point = next(p for p in model.points() if p.name == arch.mlp_point)
    assert point.kind == ("output" if arch.mlp_point.endswith(".output") else "op")
    assert point.type == "Tensor" and point.dtype == "float32"
    assert point.shape is not None and point.shape[-1] > 3
    assert nt.Point.from_dict(point.to_dict()) == point
    assert arch.mlp_point in str(model.points(arch.mlp_point))


# -- 7. aliases -----------------------------------------------------------------------------------

# Where each alias's value is in each family, written out independently of neurotap's table: a module path
# (under the layer for per-layer aliases) and which of its values: "in" (first input) or "out" (the output,
# or its first tensor).
_LLAMA_REFERENCE = {
    "resid_pre": ("", "in"),
    "resid_post": ("", "out"),
    "attn.q": ("self_attn.q_proj", "out"),
    "attn.k": ("self_attn.k_proj", "out"),
    "attn.v": ("self_attn.v_proj", "out"),
    "attn.out": ("self_attn", "out"),
    "mlp.pre": ("mlp.gate_proj", "out"),
    "mlp.post": ("mlp.down_proj", "in"),
    "mlp.out": ("mlp", "out"),
}
_LLAMA_TOP = {"embed": ("model.embed_tokens", "out"), "ln_final": ("model.norm", "out")}
ALIAS_REFERENCE = {
    "llama": ("model.layers", _LLAMA_REFERENCE, _LLAMA_TOP),
    "gpt2": (
        "transformer.h",
        {
            "resid_pre": ("", "in"),
            "resid_post": ("", "out"),
            "attn.out": ("attn", "out"),
            "mlp.pre": ("mlp.c_fc", "out"),
            "mlp.post": ("mlp.c_proj", "in"),
            "mlp.out": ("mlp", "out"),
        },
        {
            "embed": ("transformer.wte", "out"),
            "pos_embed": ("transformer.wpe", "out"),
            "ln_final": ("transformer.ln_f", "out"),
        },
    ),
    "gpt_neox": (
        "gpt_neox.layers",
        {
            "resid_pre": ("", "in"),
            "resid_post": ("", "out"),
            "attn.out": ("attention", "out"),
            "mlp.pre": ("mlp.dense_h_to_4h", "out"),
            "mlp.post": ("mlp.dense_4h_to_h", "in"),
            "mlp.out": ("mlp", "out"),
        },
        {"embed": ("gpt_neox.embed_in", "out"), "ln_final": ("gpt_neox.final_layer_norm", "out")},
    ),
}
_RESIDUAL_MID = {"llama", "gpt2"}  # GPT-NeoX adds attention and MLP to the residual together


def test_core_every_alias_of_every_family_is_the_value_it_names(decoder: Arch) -> None:
    model = wrap_tiny(decoder.name)
    module = model.module
    inputs = example_inputs(decoder.name)
    stack, per_layer, top = ALIAS_REFERENCE[decoder.family]
    layers = len(module.get_submodule(stack))
    expected_names = {f"blocks.{i}.{alias}" for i in range(layers) for alias in per_layer} | set(top) | {"logits"}
    expected_names |= {f"blocks.{i}.attn.pattern" for i in range(layers)}
    if decoder.family in _RESIDUAL_MID:
        expected_names |= {f"blocks.{i}.resid_mid" for i in range(layers)}
    assert set(model.aliases()) == expected_names

    references = alias_values_by_hand(module, stack, per_layer, top, inputs)
    for i in range(layers):
        if decoder.family in _RESIDUAL_MID:
            references[f"blocks.{i}.resid_mid"] = (
                references[f"blocks.{i}.resid_pre"] + references[f"blocks.{i}.attn.out"]
            )
    assert references.keys() == expected_names
    assert_aliases_read(model, references, inputs, atol=ATOL, rtol=RTOL)
