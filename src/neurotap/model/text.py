"""Text wherever token ids go: one string, or a list of strings padded into one batch."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import NeurotapError


class TokenInputError(NeurotapError, TypeError):
    """A model input that is neither token ids nor text."""


def is_text(value: Any) -> bool:
    return isinstance(value, str) or (
        isinstance(value, (list, tuple)) and bool(value) and all(isinstance(t, str) for t in value)
    )


def text_to_ids(tokenizer: Any, op: str, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Text in the first argument (or ``input_ids=``) as token ids, with a mask for several texts.

    Several texts are padded on the right for a forward and on the left for
    ``generate``, which continues every row from its end.
    """
    keyword = not args and "input_ids" in kwargs
    text = kwargs["input_ids"] if keyword else args[0] if args else None
    if not is_text(text):
        return args, kwargs
    if tokenizer is None:
        raise NeurotapError("this model has no tokenizer: pass token ids (a LongTensor) instead of text")
    rest = {k: v for k, v in kwargs.items() if k != "input_ids"} if keyword else kwargs
    if isinstance(text, str):
        ids = tokenizer(text, return_tensors="pt").input_ids
        return ((), {"input_ids": ids, **rest}) if keyword else ((ids, *args[1:]), rest)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left" if op == "generate" else "right"
    try:
        encoded = tokenizer(list(text), return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    rest = {"attention_mask": encoded.attention_mask, **rest}
    return ((), {"input_ids": encoded.input_ids, **rest}) if keyword else ((encoded.input_ids, *args[1:]), rest)


def check_token_ids(value: Any) -> None:
    """Token ids are an integer tensor: anything else gets a sentence saying what to pass."""
    if isinstance(value, torch.Tensor) and not value.is_floating_point() and not value.is_complex():
        return
    what = f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"
    raise TokenInputError(f"pass token ids (a LongTensor) or text as the model's input, not {what}")
