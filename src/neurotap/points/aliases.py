"""Short canonical names per layer for common model families, mapped onto raw point names.

``blocks.3.resid_post`` reads the same in every family; it stands for
``model.layers.3.output`` in Llama, ``transformer.h.3.output`` in GPT-2. An alias
exists only where its raw point exists in the model's inventory. ``embed`` and
``logits`` follow the model's own ``get_input_embeddings()`` and
``get_output_embeddings()`` where it has them, since module names change between
transformers versions (GPT-NeoX's head was ``embed_out``, now ``lm_head``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .point import split_narrowing


@dataclass(frozen=True)
class Family:
    bases: tuple[str, ...]  # where the family's body sits: "model." under a head, "" for the bare body
    stack: str  # the layer list, relative to the base
    marker: str  # a point under layer 0 that tells this family from the others
    per_layer: dict[str, str]  # alias under blocks.{i} -> raw name under the layer
    top: dict[str, str]  # alias -> raw name relative to the base ("/" marks a name relative to the root)


_LLAMA_LIKE = Family(  # Llama, Mistral, Qwen2, Gemma
    bases=("model.", ""),
    stack="layers",
    marker="self_attn.input",
    per_layer={
        "resid_pre": "input",
        "resid_mid": "add",  # hidden_states = residual + hidden_states, after attention
        "resid_post": "output",
        "attn.q": "self_attn.q_proj.output",
        "attn.k": "self_attn.k_proj.output",
        "attn.v": "self_attn.v_proj.output",
        "attn.pattern": "self_attn.attention_interface.softmax",
        "attn.out": "self_attn.output[0]",
        "mlp.pre": "mlp.gate_proj.output",
        "mlp.post": "mlp.mul",
        "mlp.out": "mlp.output",
    },
    top={"embed": "embed_tokens.output", "ln_final": "norm.output", "logits": "/lm_head.output"},
)
_GPT2 = Family(
    bases=("transformer.", ""),
    stack="h",
    marker="attn.input",
    per_layer={
        "resid_pre": "input",
        "resid_mid": "add",  # hidden_states = attn_output + residual
        "resid_post": "output",
        "attn.pattern": "attn.attention_interface.softmax",
        "attn.out": "attn.output[0]",
        "mlp.pre": "mlp.c_fc.output",
        "mlp.post": "mlp.act.output",
        "mlp.out": "mlp.output",
    },
    top={"embed": "wte.output", "pos_embed": "wpe.output", "ln_final": "ln_f.output", "logits": "/lm_head.output"},
)
_GPT_NEOX = Family(
    bases=("gpt_neox.", ""),
    stack="layers",
    marker="attention.input",
    per_layer={
        "resid_pre": "input",
        "resid_post": "output",
        "attn.pattern": "attention.attention_interface.softmax",
        "attn.out": "attention.output[0]",
        "mlp.pre": "mlp.dense_h_to_4h.output",
        "mlp.post": "mlp.act.output",
        "mlp.out": "mlp.output",
    },
    top={"embed": "embed_in.output", "ln_final": "final_layer_norm.output", "logits": "/lm_head.output"},
)
_BERT_LIKE = Family(  # BERT, RoBERTa, XLM-RoBERTa, ELECTRA: post-norm, so the stream is read after each LayerNorm
    bases=("bert.", "roberta.", "electra.", ""),
    stack="encoder.layer",
    marker="attention.self.input",
    per_layer={
        "resid_pre": "input",
        "resid_mid": "attention.output.output",
        "resid_post": "output",
        "attn.q": "attention.self.query.output",
        "attn.k": "attention.self.key.output",
        "attn.v": "attention.self.value.output",
        "attn.pattern": "attention.self.attention_interface.softmax",
        "attn.out": "attention.output.dense.output",
        "mlp.pre": "intermediate.dense.output",
        "mlp.post": "intermediate.output",
        "mlp.out": "output.dense.output",
    },
    top={"embed": "embeddings.word_embeddings.output", "pos_embed": "embeddings.position_embeddings.output"},
)
_DISTILBERT = Family(
    bases=("distilbert.", ""),
    stack="transformer.layer",
    marker="attention.q_lin.input",
    per_layer={
        "resid_pre": "input",
        "resid_mid": "sa_layer_norm.output",
        "resid_post": "output",
        "attn.q": "attention.q_lin.output",
        "attn.k": "attention.k_lin.output",
        "attn.v": "attention.v_lin.output",
        "attn.pattern": "attention.attention_interface.softmax",
        "attn.out": "attention.out_lin.output",
        "mlp.pre": "ffn.lin1.output",
        "mlp.post": "ffn.activation.output",
        "mlp.out": "ffn.lin2.output",
    },
    top={"embed": "embeddings.word_embeddings.output", "pos_embed": "embeddings.position_embeddings.output"},
)
FAMILIES = (_GPT_NEOX, _GPT2, _LLAMA_LIKE, _BERT_LIKE, _DISTILBERT)


EMBEDDINGS = ("embed", "logits")  # the aliases that the model's embedding getters decide, where it has them


def find_aliases(names: set[str], embeddings: dict[str, str] | None = None) -> dict[str, str]:
    """Aliases for a model whose points (raw names, fired or static) are ``names``.

    ``embeddings`` maps ``embed`` and ``logits`` to the raw points that the model
    itself names as its input and output embeddings; they win over the family's table.
    """
    for family in FAMILIES:
        for base in family.bases:
            stack = f"{base}{family.stack}"
            if f"{stack}.0.{family.marker}" not in names:
                continue
            aliases: dict[str, str] = {}
            layer = 0
            while f"{stack}.{layer}.input" in names:
                for alias, raw in family.per_layer.items():
                    aliases[f"blocks.{layer}.{alias}"] = f"{stack}.{layer}.{raw}"
                layer += 1
            for alias, raw in family.top.items():
                aliases[alias] = raw[1:] if raw.startswith("/") else base + raw
            aliases.update(embeddings or {})
            return {alias: raw for alias, raw in aliases.items() if split_narrowing(raw)[0] in names}
    return {}
