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


def _post_norm_encoder(
    *,
    bases: tuple[str, ...],
    stack: str,
    attention: str,
    q: str,
    k: str,
    v: str,
    attention_out: str,
    attention_norm: str,
    mlp_in: str,
    activation: str,
    mlp_out: str,
) -> Family:
    """An encoder block in BERT's post-norm order, from the paths of its parts under the layer.

    The block is ``attention -> LayerNorm(attention out + stream) -> mlp -> LayerNorm(mlp out + stream)``,
    so the stream is read after each LayerNorm: ``resid_mid`` is the attention LayerNorm's output,
    ``resid_post`` the block's (its output LayerNorm's), which is the next block's ``resid_pre``.
    ``attn.out`` and ``mlp.out`` are the two projections before their residual sums.
    """
    return Family(
        bases=bases,
        stack=stack,
        marker=f"{attention}.{q}.input",
        per_layer={
            "resid_pre": "input",
            "attn.q": f"{attention}.{q}.output",
            "attn.k": f"{attention}.{k}.output",
            "attn.v": f"{attention}.{v}.output",
            "attn.pattern": f"{attention}.attention_interface.softmax",
            "attn.out": f"{attention_out}.output",
            "resid_mid": f"{attention_norm}.output",
            "mlp.pre": f"{mlp_in}.output",
            "mlp.post": f"{activation}.output",
            "mlp.out": f"{mlp_out}.output",
            "resid_post": "output",
        },
        top={"embed": "embeddings.word_embeddings.output", "pos_embed": "embeddings.position_embeddings.output"},
    )


_BERT_LIKE = _post_norm_encoder(  # BERT, RoBERTa, XLM-RoBERTa, ELECTRA
    bases=("bert.", "roberta.", "electra.", ""),
    stack="encoder.layer",
    attention="attention.self",
    q="query",
    k="key",
    v="value",
    attention_out="attention.output.dense",
    attention_norm="attention.output",  # BertSelfOutput returns LayerNorm(dense(attention) + stream)
    mlp_in="intermediate.dense",
    activation="intermediate",  # BertIntermediate returns the activation of its dense layer
    mlp_out="output.dense",
)
_DISTILBERT = _post_norm_encoder(
    bases=("distilbert.", ""),
    stack="transformer.layer",
    attention="attention",
    q="q_lin",
    k="k_lin",
    v="v_lin",
    attention_out="attention.out_lin",
    attention_norm="sa_layer_norm",
    mlp_in="ffn.lin1",
    activation="ffn.activation",
    mlp_out="ffn.lin2",
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
