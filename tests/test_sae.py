"""nt.SAE against hand computations (numpy, float64), hooks on the unwrapped model, and SAELens's layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import neurotap as nt
from conftest import HIDDEN, VOCAB, example_inputs, tiny_llama
from neurotap.probes import SAE

POINT = "model.layers.0.mlp.output"
D_SAE = 48


def _weights(seed: int = 0, d_in: int = HIDDEN, d_sae: int = D_SAE) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(d_in, d_sae, generator=generator) * 0.3,
        "b_enc": torch.randn(d_sae, generator=generator) * 0.1,
        "W_dec": torch.randn(d_sae, d_in, generator=generator) * 0.3,
        "b_dec": torch.randn(d_in, generator=generator) * 0.1,
    }


def _hand(x: torch.Tensor, w: dict[str, torch.Tensor], threshold=None, k=None, b_dec_in=True):
    """Features and reconstruction vector by vector in float64 numpy, written out from the definitions."""
    W_enc, b_enc, W_dec, b_dec = (w[n].double().numpy() for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    vectors = x.double().numpy().reshape(-1, x.shape[-1])
    features = np.zeros((len(vectors), W_enc.shape[1]))
    for row, vector in enumerate(vectors):
        pre = (vector - b_dec if b_dec_in else vector) @ W_enc + b_enc
        for unit in range(len(pre)):
            keep = pre[unit] > 0
            if threshold is not None:
                keep = keep and pre[unit] > float(threshold[unit])
            if k is not None:
                keep = keep and (pre > pre[unit]).sum() < k
            features[row, unit] = pre[unit] if keep else 0.0
    x_hat = features @ W_dec + b_dec
    lead = tuple(x.shape[:-1])
    return torch.from_numpy(features.reshape(*lead, -1)), torch.from_numpy(x_hat.reshape(*lead, -1))


def _mlp_output(module: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    seen = []
    hook = module.model.layers[0].mlp.register_forward_hook(lambda _m, _a, out: seen.append(out.detach()))
    try:
        with torch.no_grad():
            module(ids)
    finally:
        hook.remove()
    return seen[0]


def _logits_with(module: torch.nn.Module, ids: torch.Tensor, replace) -> torch.Tensor:
    hook = module.model.layers[0].mlp.register_forward_hook(lambda _m, _a, out: replace(out))
    try:
        return module(ids).logits
    finally:
        hook.remove()


@pytest.mark.parametrize("kind", ["standard", "jumprelu", "topk", "no b_dec on input"])
def test_reconstruction_and_features_equal_the_hand_computation(llama: nt.Model, kind: str) -> None:
    w = _weights()
    ids = example_inputs("llama")["input_ids"]
    x = _mlp_output(llama.module, ids)
    extra = {
        "standard": {},
        "jumprelu": {"threshold": torch.rand(D_SAE, generator=torch.Generator().manual_seed(3)) * 0.3},
        "topk": {"k": 5},
        "no b_dec on input": {"apply_b_dec_to_input": False},
    }[kind]
    sae = SAE(**w, **extra)
    features, x_hat = _hand(
        x, w, threshold=extra.get("threshold"), k=extra.get("k"), b_dec_in=extra.get("apply_b_dec_to_input", True)
    )
    assert (features > 0).any() and (features == 0).any()
    if kind == "jumprelu":  # the threshold switches off some features that a ReLU would keep
        assert ((_hand(x, w)[0] > 0) & (features == 0)).any()
    if kind == "topk":
        assert ((features > 0).sum(-1) <= 5).all()

    out = llama.forward(ids, probes=[nt.probe(POINT, sae)])
    expected = _logits_with(llama.module, ids, lambda _out: x_hat.float())
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)

    saved = llama.recordings()[POINT]
    torch.testing.assert_close(SAE.dense(saved).double(), features, rtol=1e-5, atol=1e-6)
    assert (saved["sae_values"][0] > 0).all()
    assert len(saved["sae_indices"][0]) == int((features > 0).sum())
    assert saved["sae_indices"][0].shape[1] == 3  # batch, position, feature


def test_statistics_and_top_examples_over_several_batches(llama: nt.Model) -> None:
    w = _weights(seed=1)
    calls = [example_inputs("llama", batch=2, seed=s)["input_ids"] for s in (1, 2, 3)]
    sae = SAE(**w, examples=4, record=False)
    hand = [_hand(_mlp_output(llama.module, ids), w) for ids in calls]
    xs = [_mlp_output(llama.module, ids) for ids in calls]
    for ids in calls:
        llama.forward(ids, probes=[nt.probe(POINT, sae)])
    saved = llama.recordings()[POINT]
    assert "sae_indices" not in saved

    features = torch.cat([f.reshape(-1, D_SAE) for f, _ in hand])
    assert saved["sae_tokens"] == len(features)
    assert torch.equal(saved["sae_fired"], (features > 0).sum(0))
    assert int(saved["sae_l0"]) == int((features > 0).sum())
    torch.testing.assert_close(saved["sae_max"].double(), features.max(0).values, rtol=1e-5, atol=1e-6)
    error = sum(float(((x.double() - x_hat) ** 2).sum()) for x, (_, x_hat) in zip(xs, hand))
    assert float(saved["sae_squared_error"]) == pytest.approx(error, rel=1e-4)

    # each feature's four largest activations, and where they were: (call, batch row, position)
    top_values, top_where = saved["sae_top_values"], saved["sae_top_where"]
    assert top_values.shape == (4, D_SAE) and top_where.shape == (4, D_SAE, 3)
    for unit in (0, 7, 31):
        best = sorted(features[:, unit].tolist(), reverse=True)[:4]
        assert top_values[:, unit].double().tolist() == pytest.approx(best, rel=1e-5, abs=1e-6)
        for rank in range(4):
            call, row, position = top_where[rank, unit].tolist()
            assert float(hand[call][0][row, position, unit]) == pytest.approx(float(top_values[rank, unit]), rel=1e-5)
    llama.clear_recordings()


def test_with_the_error_term_the_forward_is_unchanged_and_gradients_flow_through_the_sae(llama: nt.Model) -> None:
    ids = example_inputs("llama")["input_ids"]
    with torch.no_grad():
        plain = llama.module(ids).logits
    w = {name: tensor.requires_grad_() for name, tensor in _weights(seed=2).items()}
    out = llama.forward(ids, probes=[nt.probe(POINT, SAE(**w, error_term=True))])
    assert torch.equal(out.logits, plain)
    out.logits.sum().backward()
    ours = {name: tensor.grad.clone() for name, tensor in w.items()}
    llama.clear_recordings()

    # SAELens's use_error_term, by hand: the reconstruction plus the error, held constant
    for tensor in w.values():
        tensor.grad = None

    def splice(value: torch.Tensor) -> torch.Tensor:
        pre = (value - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
        x_hat = pre.relu() @ w["W_dec"] + w["b_dec"]
        return x_hat + (value - x_hat).detach()

    _logits_with(llama.module, ids, splice).sum().backward()
    for name, tensor in w.items():
        assert ours[name].abs().sum() > 0, name
        torch.testing.assert_close(ours[name], tensor.grad, rtol=1e-4, atol=1e-5)
    llama.module.zero_grad(set_to_none=True)


def test_bad_weights_and_points_are_refused(llama: nt.Model) -> None:
    assert nt.SAE is SAE
    w = _weights()
    with pytest.raises(nt.PatchError, match=r"b_dec has the shape \(3,\).*must be \(64,\)"):
        SAE(**{**w, "b_dec": torch.zeros(3)})
    with pytest.raises(nt.PatchError, match="not both"):
        SAE(**w, threshold=torch.zeros(D_SAE), k=3)
    ids = example_inputs("llama")["input_ids"]
    with pytest.raises(nt.PatchError, match="d_in 64"):
        llama.forward(ids, probes=[nt.probe("model.layers.0.mlp.mul", SAE(**w))])


def _saelens_folder(folder: Path, config: dict, weights: dict[str, torch.Tensor]) -> Path:
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps(config))
    save_file(weights, str(folder / "sae_weights.safetensors"))
    return folder


def test_load_reads_saelens_folders(tmp_path: Path) -> None:
    w = _weights()
    threshold = torch.rand(D_SAE) * 0.2
    # SAELens 6: the hook name under metadata, the architecture named
    v6 = {
        "d_in": HIDDEN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"hook_name": "blocks.0.hook_mlp_out", "model_name": "tiny", "sae_lens_version": "6.54.12"},
        "architecture": "jumprelu",
    }
    sae = SAE.load(_saelens_folder(tmp_path / "v6", v6, {**w, "threshold": threshold}), examples=3)
    for name in w:
        assert torch.equal(getattr(sae, name), w[name])
    assert torch.equal(sae.threshold, threshold) and sae.k is None
    assert sae.apply_b_dec_to_input is False and sae.examples == 3
    assert SAE.read_config(tmp_path / "v6")["hook_name"] == "blocks.0.hook_mlp_out"

    # before SAELens 6: hook_point at the top, JumpReLU as log_threshold, TopK as an activation function
    old = {"d_in": HIDDEN, "d_sae": D_SAE, "hook_point": "blocks.0.hook_resid_post", "architecture": "jumprelu"}
    log = torch.log(threshold + 0.01)
    sae = SAE.load(_saelens_folder(tmp_path / "v5", old, {**w, "log_threshold": log}))
    torch.testing.assert_close(sae.threshold, threshold + 0.01)
    assert sae.apply_b_dec_to_input is True and SAE.read_config(tmp_path / "v5")["hook_name"].endswith("resid_post")
    topk = {"d_in": HIDDEN, "d_sae": D_SAE, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 7}}
    assert SAE.load(_saelens_folder(tmp_path / "topk", topk, w)).k == 7
    assert SAE.load(tmp_path / "topk", dtype=torch.float64).W_enc.dtype == torch.float64

    for name, change in (
        ("norm", {"normalize_activations": "layer_norm"}),
        ("gated", {"architecture": "gated"}),
        ("hook_z", {"reshape_activations": "hook_z"}),
    ):
        _saelens_folder(tmp_path / name, {**v6, **change, "architecture": change.get("architecture", "standard")}, w)
        with pytest.raises(nt.NeurotapError, match="cannot splice this SAE"):
            SAE.load(tmp_path / name)
    _saelens_folder(tmp_path / "wrong", {**v6, "architecture": "standard", "d_sae": 5}, w)
    with pytest.raises(nt.NeurotapError, match="d_sae 5, but the weights give 48"):
        SAE.load(tmp_path / "wrong")
    with pytest.raises(nt.NeurotapError, match="no cfg.json"):
        SAE.load(tmp_path)


def test_remote_equals_local(tmp_path: Path) -> None:
    from serving import Server, save_with_word_tokenizer

    folder = save_with_word_tokenizer(tiny_llama(), tmp_path / "tiny")
    local = nt.load(str(folder))
    ids = torch.randint(2, VOCAB, (2, 7), generator=torch.Generator().manual_seed(4))
    probes = [nt.probe(POINT, SAE(**_weights(), examples=2))]
    expected = local.forward(ids, probes=probes).logits
    saved = local.recordings()[POINT]

    with Server(folder) as server, nt.connect(server.url) as remote:
        out = remote.forward(ids, probes=probes)
        torch.testing.assert_close(out.logits, expected, rtol=1e-6, atol=1e-6)
        got = remote.recordings()[POINT]
        for key in ("sae_fired", "sae_max", "sae_top_values", "sae_top_where", "sae_squared_error"):
            torch.testing.assert_close(got[key], saved[key], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(SAE.dense(got), SAE.dense(saved), rtol=1e-6, atol=1e-6)
