"""nt.experiments against hand-written loops: one forward per cell on the unwrapped model, plain torch hooks."""

from __future__ import annotations

import pytest
import torch

import neurotap as nt
from conftest import assert_clean, snapshot_state, tiny_llama
from serving import Server, save_with_word_tokenizer

PROMPT = "the capital of france is"
CORRUPT = "the capital of paris is"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # not conftest's folder: the tiny Llama seeded 3, not 0, so weights of its own
    return save_with_word_tokenizer(tiny_llama(seed=3), tmp_path_factory.mktemp("experiments") / "llama")


@pytest.fixture(scope="module")
def local(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    module = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    return nt.wrap(module, AutoTokenizer.from_pretrained(folder))


@pytest.fixture(scope="module")
def remote(folder):
    with Server(folder) as server, nt.connect(server.url) as rm:
        yield rm


def ids_of(model, text):
    return model.tokenizer(text, return_tensors="pt").input_ids


def last_logits(module, ids, hooks):
    """One plain forward with ``{module path: forward hook}`` attached; the last position's logits."""
    handles = [module.get_submodule(path).register_forward_hook(hook) for path, hook in hooks.items()]
    try:
        with torch.no_grad():
            return module(ids).logits[:, -1]
    finally:
        for handle in handles:
            handle.remove()


def outputs_of(module, ids, paths):
    seen = {}

    def keeper(path):
        def keep(_module, _args, output):
            seen[path] = output.detach().clone()

        return keep

    last_logits(module, ids, {path: keeper(path) for path in paths})
    return seen


def restore(clean, position, rows=slice(None)):
    def hook(_module, _args, output):
        output = output.clone()
        output[rows, position] = clean[0, position]
        return output

    return hook


def test_activation_patching_equals_one_hooked_forward_per_cell(local):
    module = local.module
    state = snapshot_state(module)
    clean, corrupt = ids_of(local, PROMPT), ids_of(local, CORRUPT)
    paris, france = (local.tokenizer.convert_tokens_to_ids(w) for w in ("paris", "france"))
    paths = ["model.layers.0", "model.layers.1", "model.layers.1.mlp"]
    result = nt.experiments.activation_patching(
        local,
        PROMPT,
        CORRUPT,
        nt.LogitDiff(paris, france),
        ["blocks.0.resid_post", "blocks.1.resid_post", "model.layers.1.mlp.output"],
        positions=[1, 3, -1],
        batch=4,  # cells spread over several forwards, a point's cells split between two
    )
    recorded = outputs_of(module, clean, paths)
    expected = torch.zeros(3, 3)
    for i, path in enumerate(paths):
        for j, position in enumerate([1, 3, 4]):
            logits = last_logits(module, corrupt, {path: restore(recorded[path], position)})
            expected[i, j] = logits[0, paris] - logits[0, france]
    torch.testing.assert_close(result.values, expected, rtol=0, atol=1e-5)
    assert result.points == ("blocks.0.resid_post", "blocks.1.resid_post", "model.layers.1.mlp.output")
    assert result.positions == (1, 3, 4)
    assert result.tokens == ("capital", "france", "is")
    clean_logits, corrupt_logits = last_logits(module, clean, {}), last_logits(module, corrupt, {})
    assert result.clean == pytest.approx(float(clean_logits[0, paris] - clean_logits[0, france]), abs=1e-5)
    assert result.corrupt == pytest.approx(float(corrupt_logits[0, paris] - corrupt_logits[0, france]), abs=1e-5)
    torch.testing.assert_close(
        result.normalized(), (expected - result.corrupt) / (result.clean - result.corrupt), rtol=0, atol=1e-4
    )
    assert_clean(module, state)


def test_activation_patching_takes_a_metric_function(local):
    paris = local.tokenizer.convert_tokens_to_ids("paris")

    def log_prob_paris(logits):
        return logits.log_softmax(-1)[:, paris]

    result = nt.experiments.activation_patching(local, PROMPT, CORRUPT, log_prob_paris, "blocks.1.resid_post")
    module = local.module
    recorded = outputs_of(module, ids_of(local, PROMPT), ["model.layers.1"])["model.layers.1"]
    for position in range(5):
        logits = last_logits(module, ids_of(local, CORRUPT), {"model.layers.1": restore(recorded, position)})
        assert result.values[0, position].item() == pytest.approx(logits.log_softmax(-1)[0, paris].item(), abs=1e-5)
    assert result.metric == "log_prob_paris"
    every = nt.experiments.activation_patching(local, PROMPT, CORRUPT, log_prob_paris, "blocks.*.resid_post", [4])
    assert every.points == ("blocks.0.resid_post", "blocks.1.resid_post")
    torch.testing.assert_close(every.values[1], result.values[:, 4], rtol=0, atol=1e-6)


def causal_trace_by_hand(module, ids, start, end, target, noise, samples, seed):
    """Meng et al.'s causal trace, one forward per (layer, position, sample)."""
    layers = [f"model.layers.{i}" for i in range(len(module.model.layers))]
    clean = outputs_of(module, ids, [*layers, "model.embed_tokens"])
    embeddings = clean["model.embed_tokens"]
    draws = torch.randn(samples, end - start, embeddings.shape[-1], generator=torch.Generator().manual_seed(seed))
    noises = draws * noise * embeddings.std()

    def noised(sample):
        def hook(_module, _args, output):
            output = output.clone()
            output[:, start:end] += noises[sample]
            return output

        return hook

    def probability(hooks, sample):
        return last_logits(module, ids, {"model.embed_tokens": noised(sample), **hooks}).softmax(-1)[0, target]

    table = torch.zeros(len(layers), ids.shape[1])
    for i, layer in enumerate(layers):
        for position in range(ids.shape[1]):
            table[i, position] = (
                sum(probability({layer: restore(clean[layer], position)}, s) for s in range(samples)) / samples
            )
    corrupt = sum(probability({}, s) for s in range(samples)) / samples
    return table, float(last_logits(module, ids, {}).softmax(-1)[0, target]), float(corrupt)


def test_causal_trace_equals_a_hand_written_trace(local):
    state = snapshot_state(local.module)
    result = nt.experiments.causal_trace(local, PROMPT, "france", "paris", noise=3.0, samples=3, seed=5, batch=8)
    paris = local.tokenizer.convert_tokens_to_ids("paris")
    table, clean, corrupt = causal_trace_by_hand(local.module, ids_of(local, PROMPT), 3, 4, paris, 3.0, 3, 5)
    torch.testing.assert_close(result.values, table, rtol=0, atol=1e-5)
    named = ["blocks.0.resid_post", "blocks.1.resid_post"]  # points given: every layer runs, noised, in each row
    by_name = nt.experiments.causal_trace(local, PROMPT, "france", "paris", samples=3, seed=5, batch=8, points=named)
    torch.testing.assert_close(by_name.values, table, rtol=0, atol=1e-5)
    assert result.clean == pytest.approx(clean, abs=1e-6)
    assert result.corrupt == pytest.approx(corrupt, abs=1e-6)
    assert result.points == ("blocks.0.resid_post", "blocks.1.resid_post")
    assert result.tokens == ("the", "capital", "of", "france", "is")
    assert result.metric == "p('paris')"
    assert_clean(local.module, state)


def test_causal_trace_subject_by_positions_and_batch_size_do_not_change_it(local):
    by_text = nt.experiments.causal_trace(local, PROMPT, "capital of", "paris", samples=2, batch=64)
    paris = local.tokenizer.convert_tokens_to_ids("paris")
    by_positions = nt.experiments.causal_trace(local, ids_of(local, PROMPT), [1, 2], paris, samples=2, batch=1)
    torch.testing.assert_close(by_text.values, by_positions.values, rtol=0, atol=1e-5)


def test_experiments_through_a_server_equal_local(local, remote):
    paris, france = (local.tokenizer.convert_tokens_to_ids(w) for w in ("paris", "france"))
    points = ["blocks.0.resid_post", "blocks.1.attn.out"]
    here = nt.experiments.activation_patching(local, PROMPT, CORRUPT, nt.LogitDiff(paris, france), points)
    there = nt.experiments.activation_patching(remote, PROMPT, CORRUPT, nt.LogitDiff(paris, france), points)
    torch.testing.assert_close(there.values, here.values, rtol=0, atol=1e-5)
    assert (there.points, there.positions, there.tokens) == (here.points, here.positions, here.tokens)
    # a function of the logits runs here, on the logits the server sends back
    there = nt.experiments.activation_patching(remote, PROMPT, CORRUPT, lambda z: z[:, paris] - z[:, france], points)
    torch.testing.assert_close(there.values, here.values, rtol=0, atol=1e-5)
    here = nt.experiments.causal_trace(local, PROMPT, "france", "paris", samples=3)
    sent = []
    there = nt.experiments.causal_trace(Watched(remote, sent), PROMPT, "france", "paris", samples=3)
    torch.testing.assert_close(there.values, here.values, rtol=0, atol=1e-5)
    assert there.clean == pytest.approx(here.clean, abs=1e-6)
    assert there.corrupt == pytest.approx(here.corrupt, abs=1e-6)
    # the server skipped the layers before each restored one: layer 1's cells sent a Skip for layer 0
    skipped = [{p.point for p in probes if isinstance(p.fn, nt.Skip)} for probes in sent]
    assert {"model.layers.0.output", "model.layers.1.output"} in skipped


class Watched:
    """A model whose forwards note the probes they were given, and otherwise the model itself."""

    def __init__(self, model, sent):
        self._model, self._sent = model, sent

    def __getattr__(self, name):
        return getattr(self._model, name)

    def forward(self, *args, probes=(), **kwargs):
        self._sent.append(list(probes))
        return self._model.forward(*args, probes=probes, **kwargs)

    def run(self, *args, probes=(), **kwargs):
        self._sent.append(list(probes))
        return self._model.run(*args, probes=probes, **kwargs)


def test_experiments_refuse_bad_input_clearly_and_leave_the_model_clean(local):
    state = snapshot_state(local.module)
    with pytest.raises(nt.NeurotapError, match="same number of tokens"):
        nt.experiments.activation_patching(local, PROMPT, "the capital", nt.LogitDiff(1, 2), "blocks.0.resid_post")
    with pytest.raises(nt.NeurotapError, match="one number per row"):
        nt.experiments.activation_patching(local, PROMPT, CORRUPT, lambda logits: logits, "blocks.0.resid_post")
    with pytest.raises(nt.UnknownPointError):
        nt.experiments.activation_patching(local, PROMPT, CORRUPT, nt.LogitDiff(1, 2), "blocks.9.resid_post")
    with pytest.raises(nt.NeurotapError, match="outside the prompt"):
        nt.experiments.activation_patching(local, PROMPT, CORRUPT, nt.LogitDiff(1, 2), "blocks.0.resid_post", [7])
    with pytest.raises(nt.NeurotapError, match="not in the prompt"):
        nt.experiments.causal_trace(local, PROMPT, "river", "paris")
    with pytest.raises(nt.NeurotapError, match="consecutive"):
        nt.experiments.causal_trace(local, PROMPT, [1, 3], "paris")
    with pytest.raises(nt.NeurotapError, match="samples"):
        nt.experiments.causal_trace(local, PROMPT, "france", "paris", samples=0)
    assert_clean(local.module, state)


def test_unembed_of_the_last_layer_is_the_models_logits_in_every_aliased_family(decoder):
    from conftest import example_inputs, tiny_module, wrap_tiny

    model, module = wrap_tiny(decoder.name), tiny_module(decoder.name)
    stack = module.transformer.h if decoder.name == "gpt2" else module.base_model.layers
    seen = []
    handle = stack[-1].register_forward_hook(lambda _m, _a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        logits = module(**example_inputs(decoder.name)).logits
        handle.remove()
        torch.testing.assert_close(model.unembed(seen[0]), logits, rtol=0, atol=1e-6)
    assert_clean(module)


def test_unembed_refuses_a_model_without_a_final_norm_and_head(toy):
    with pytest.raises(nt.NeurotapError, match="no ln_final alias"):
        toy.unembed(torch.zeros(16))


def lens_by_hand(module, ids, positions, top, token):
    layers = module.model.layers
    seen = {}
    handles = [
        layer.register_forward_hook(lambda _m, _a, out, i=i: seen.setdefault(i, out)) for i, layer in enumerate(layers)
    ]
    with torch.no_grad():
        module(ids)
        probs = torch.stack(
            [module.lm_head(module.model.norm(seen[i][0, positions])).softmax(-1) for i in range(len(layers))]
        )
    for handle in handles:
        handle.remove()
    best, best_ids = probs.topk(top, dim=-1)
    ranks = torch.tensor([[sorted(row.tolist(), reverse=True).index(row[token].item()) for row in p] for p in probs])
    return best, best_ids, ranks, probs[..., token]


def test_logit_lens_reads_each_layer_through_the_final_norm_and_head(local):
    state = snapshot_state(local.module)
    ids = ids_of(local, PROMPT)
    paris = local.tokenizer.convert_tokens_to_ids("paris")
    lens = local.logit_lens(ids, positions=[0, -1], top=3, token="paris")
    best, best_ids, ranks, prob = lens_by_hand(local.module, ids, [0, 4], 3, paris)
    assert torch.equal(lens.top_ids, best_ids)
    torch.testing.assert_close(lens.top_probs, best, rtol=1e-5, atol=1e-7)
    assert torch.equal(lens.token_rank, ranks)
    torch.testing.assert_close(lens.token_prob, prob, rtol=1e-5, atol=1e-7)
    assert lens.points == ("blocks.0.resid_post", "blocks.1.resid_post")
    assert lens.positions == (0, 4) and lens.tokens == ("the", "is") and lens.token == paris
    assert lens.top_tokens[1][0] == tuple(local.tokenizer.decode([i]) for i in best_ids[1, 0].tolist())
    assert nt.experiments.logit_lens(local, PROMPT, None).top_ids.shape == (2, 5, 5)  # text; every position
    assert lens.token_prob is not None and local.logit_lens(ids).token_rank is None
    with pytest.raises(nt.NeurotapError, match="outside the prompt"):
        local.logit_lens(ids, positions=5)
    with pytest.raises(nt.NeurotapError, match="not a token id"):
        local.logit_lens(ids, token=10**6)
    with pytest.raises(nt.NeurotapError, match="has no such aliases"):
        nt.wrap(torch.nn.Linear(2, 2)).logit_lens(torch.tensor([[1]]))
    assert_clean(local.module, state)


def test_logit_lens_and_unembed_through_a_server_equal_local(local, remote):
    ids = ids_of(local, PROMPT)
    here = local.logit_lens(ids, positions=[1, 2, -1], top=4, token="paris")
    there = remote.logit_lens(PROMPT, positions=[1, 2, -1], top=4, token="paris")
    assert torch.equal(there.top_ids, here.top_ids) and torch.equal(there.token_rank, here.token_rank)
    torch.testing.assert_close(there.top_probs, here.top_probs, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(there.token_prob, here.token_prob, rtol=1e-5, atol=1e-7)
    assert (there.points, there.positions, there.tokens, there.top_tokens, there.token) == (
        here.points,
        here.positions,
        here.tokens,
        here.top_tokens,
        here.token,
    )
    assert remote.logit_lens(ids).token_prob is None
    residual = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(remote.unembed(residual), local.unembed(residual), rtol=1e-5, atol=1e-5)
    with pytest.raises(nt.NeurotapError, match="top must be"):
        remote.logit_lens(ids, top=11)
    with pytest.raises(nt.NeurotapError, match="at most 64 positions"):
        remote.logit_lens(torch.randint(2, 19, (1, 80)), positions=list(range(65)))


def attribution_by_hand(module, clean, corrupt, paths, positions, metric):
    """(clean - corrupt) . d metric / d value on the corrupted run, by torch.autograd.grad."""
    recorded = outputs_of(module, clean, paths)
    kept = {}

    def keeper(path):
        def keep(_module, _args, output):
            kept[path] = output

        return keep

    handles = [module.get_submodule(path).register_forward_hook(keeper(path)) for path in paths]
    try:
        value = metric(module(corrupt).logits[:, -1])[0]
    finally:
        for handle in handles:
            handle.remove()
    grads = torch.autograd.grad(value, [kept[path] for path in paths])
    table = torch.stack(
        [((recorded[p] - kept[p]) * g)[0, positions].sum(-1) for p, g in zip(paths, grads, strict=True)]
    )
    return table.detach() + value.item(), value.item()


def test_attribution_patching_equals_autograd_on_the_unwrapped_model(local, remote):
    module = local.module
    state = snapshot_state(module)
    paris, france = (local.tokenizer.convert_tokens_to_ids(w) for w in ("paris", "france"))
    clean, corrupt = ids_of(local, PROMPT), ids_of(local, CORRUPT)
    paths = ["model.layers.0", "model.layers.1.mlp", "model.layers.1"]
    points = ["blocks.0.resid_post", "model.layers.1.mlp.output", "blocks.1.resid_post"]

    def logit_diff(logits):
        return logits[:, paris] - logits[:, france]

    expected, corrupt_metric = attribution_by_hand(module, clean, corrupt, paths, [0, 2, 3], logit_diff)
    for model, metric in (
        (local, nt.LogitDiff(paris, france)),
        (local, logit_diff),
        (remote, nt.LogitDiff(paris, france)),
    ):
        result = nt.experiments.attribution_patching(model, PROMPT, CORRUPT, metric, points, positions=[0, 2, 3])
        torch.testing.assert_close(result.values, expected, rtol=1e-4, atol=1e-5)
        assert result.corrupt == pytest.approx(corrupt_metric, abs=1e-5)
        assert result.points == tuple(points) and result.positions == (0, 2, 3)
    assert all(p.grad is None for p in module.parameters())  # no weight gradients accumulated
    module.requires_grad_(False)
    try:  # frozen weights: the gradient still reaches the probed values
        frozen = nt.experiments.attribution_patching(local, PROMPT, CORRUPT, logit_diff, points, positions=[0, 2, 3])
    finally:
        module.requires_grad_(True)
    torch.testing.assert_close(frozen.values, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(nt.NeurotapError, match="nt.LogitDiff"):
        nt.experiments.attribution_patching(remote, PROMPT, CORRUPT, logit_diff, points)
    assert_clean(module, state)
