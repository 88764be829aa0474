"""The unembedding (final norm, output embeddings) and the logit lens built on it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import NeurotapError
from ..probes import probe


def unembedding(model: Any) -> tuple[torch.nn.Module, torch.nn.Module, float | None]:
    """The model's final norm, its output embeddings and its logit soft-cap (Gemma 2 and later), if any."""
    aliases = model.aliases()
    head = getattr(model.module, "get_output_embeddings", lambda: None)()
    if "ln_final" not in aliases or head is None:
        raise NeurotapError(
            f"unembed needs a final norm and output embeddings, and {type(model.module).__name__} has "
            f"{'no ln_final alias' if 'ln_final' not in aliases else 'no output embeddings'} (the aliased "
            "families are listed under Aliases in the README); apply your own head to the residual instead"
        )
    norm = model.module.get_submodule(aliases["ln_final"].removesuffix(".output"))
    return norm, head, getattr(getattr(model.module, "config", None), "final_logit_softcapping", None)


def unembed(model: Any, residual: torch.Tensor) -> torch.Tensor:
    norm, head, softcap = unembedding(model)
    logits = head(norm(residual))
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def layer_points(aliases: dict[str, str]) -> list[str]:
    """Every ``blocks.N.resid_post``, in layer order."""
    found = sorted(int(m[1]) for m in map(re.compile(r"blocks\.(\d+)\.resid_post").fullmatch, aliases) if m)
    return [f"blocks.{i}.resid_post" for i in found]


@dataclass(frozen=True)
class LogitLens:
    """Each layer's residual at each position read through the final norm and the unembedding.

    ``top_ids[i, j]`` / ``top_probs[i, j]``: the ``k`` likeliest tokens after layer
    ``points[i]`` at position ``positions[j]`` (``tokens[j]`` is the token there),
    ``top_tokens`` their text. With a ``token``, ``token_rank[i, j]`` (0: the
    likeliest) and ``token_prob[i, j]`` are that token's.
    """

    points: tuple[str, ...]
    positions: tuple[int, ...]
    tokens: tuple[str, ...]
    top_ids: torch.Tensor  # [layers, positions, k] int64
    top_probs: torch.Tensor  # [layers, positions, k] float32
    top_tokens: tuple[tuple[tuple[str, ...], ...], ...]
    token: int | None = None
    token_rank: torch.Tensor | None = None  # [layers, positions] int64
    token_prob: torch.Tensor | None = None  # [layers, positions] float32

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (lists, strings, numbers)."""
        return {
            "points": list(self.points),
            "positions": list(self.positions),
            "tokens": list(self.tokens),
            "top_ids": self.top_ids.tolist(),
            "top_probs": self.top_probs.tolist(),
            "top_tokens": [[list(t) for t in row] for row in self.top_tokens],
            "token": self.token,
            "token_rank": None if self.token_rank is None else self.token_rank.tolist(),
            "token_prob": None if self.token_prob is None else self.token_prob.tolist(),
        }

    def __repr__(self) -> str:
        last = [row[-1][0] for row in self.top_tokens]
        return (
            f"LogitLens({len(self.points)} layers x {len(self.positions)} positions; top token at position "
            f"{self.positions[-1]} by layer: {last})"
        )


def text_tokens(tokenizer: Any, text: str, what: str, *, special: bool = True) -> list[int]:
    if tokenizer is None:
        raise NeurotapError(f"the model has no tokenizer, so {what} must be given as token ids")
    ids = [int(i) for i in tokenizer(text, add_special_tokens=special).input_ids]
    if not ids:
        raise NeurotapError(f"{what} {text!r} has no tokens")
    return ids


def prompt_ids(prompt: Any, what: str = "the prompt") -> torch.Tensor:
    """``[1, seq]`` token ids of one prompt given as ids ``[seq]`` or ``[1, seq]``."""
    ids = torch.as_tensor(prompt)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.is_floating_point() or ids.shape[1] == 0:
        raise NeurotapError(
            f"{what} must be text or the token ids of one prompt ([seq] or [1, seq] integers), "
            f"got a {ids.dtype} tensor of shape {tuple(ids.shape)}"
        )
    return ids.long()


def chosen_positions(positions: Any, length: int) -> list[int]:
    """``positions`` (an int, a list of them, or None for all) within a prompt of ``length`` tokens, counted from 0."""
    if positions is None:
        return list(range(length))
    chosen = [positions] if isinstance(positions, int) else list(positions)
    for t in chosen:
        if not isinstance(t, int) or isinstance(t, bool) or not -length <= t < length:
            raise NeurotapError(f"position {t!r} is outside the prompt's {length} tokens")
    return [t % length for t in chosen]


def check_lens_arguments(ids: Any, positions: Any, top: Any) -> tuple[torch.Tensor, list[int]]:
    ids = prompt_ids(ids)
    chosen = chosen_positions(positions, ids.shape[1])
    if not chosen:
        raise NeurotapError("logit_lens needs at least one position")
    if not isinstance(top, int) or isinstance(top, bool) or top < 1:
        raise NeurotapError(f"logit_lens top must be a positive integer, got {top!r}")
    return ids, chosen


def logit_lens(model: Any, ids: Any, positions: Any = -1, *, top: int = 5, token: int | None = None) -> LogitLens:
    """``nt.Model.logit_lens``: one forward (stopped after the last layer), then each layer unembedded."""
    if isinstance(ids, str):
        ids = text_tokens(model.tokenizer, ids, "the prompt")
    if isinstance(token, str):
        token = text_tokens(model.tokenizer, token, "the token", special=False)[0]
    ids, chosen = check_lens_arguments(ids, positions, top)
    points = layer_points(model.aliases())
    if not points:
        raise NeurotapError(
            f"the logit lens reads every blocks.N.resid_post, and {type(model.module).__name__} has no such aliases"
        )
    norm, head, softcap = unembedding(model)
    vocab = head.weight.shape[0]
    if token is not None and (not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab):
        raise NeurotapError(f"logit_lens token={token!r} is not a token id in [0, {vocab})")
    if ids.min() < 0 or ids.max() >= vocab:
        raise NeurotapError(f"logit_lens ids must be token ids in [0, {vocab})")
    residuals: dict[str, torch.Tensor] = {}

    def keeper(point: str) -> Any:
        def keep(_ctx: Any, value: Any) -> None:
            residuals[point] = (value[0] if isinstance(value, tuple) else value).detach()[0, chosen]

        return keep

    device = next(model.module.parameters()).device
    with torch.no_grad():
        model.forward(ids.to(device), probes=[probe(p, keeper(p)) for p in points], stop_at=points[-1])
        logits = unembed(model, torch.stack([residuals[p] for p in points]))
    probs = torch.softmax(logits.float(), dim=-1).cpu()
    best, best_ids = probs.topk(min(top, vocab), dim=-1)
    decode = model.tokenizer.decode if model.tokenizer is not None else (lambda i: str(i[0]))
    words = {i: decode([i]) for i in set(best_ids.flatten().tolist()) | set(ids[0, chosen].tolist())}
    rank = prob = None
    if token is not None:
        prob = probs[..., token]
        rank = (probs > prob.unsqueeze(-1)).sum(-1)
    return LogitLens(
        tuple(points),
        tuple(chosen),
        tuple(words[int(i)] for i in ids[0, chosen]),
        best_ids,
        best,
        tuple(tuple(tuple(words[i] for i in cell) for cell in row) for row in best_ids.tolist()),
        token,
        rank,
        prob,
    )
