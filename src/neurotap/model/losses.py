"""Built-in losses for ``backward``: plain data, so a server can run them for any client."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import NeurotapError


def logits_of(output: Any) -> torch.Tensor:
    """The logits in a model's output: ``output.logits``, ``output[0]`` or the output itself."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise NeurotapError(f"cannot find logits in a model output of type {type(output).__name__}")


@dataclass(frozen=True, eq=False)
class CrossEntropy:
    """Mean cross-entropy of ``logits[b, t]`` against ``targets[b, t]``; ``ignore_index`` entries skipped.

    ``targets`` line up with the logits: shift them yourself for next-token loss
    (``targets[:, t] = input_ids[:, t + 1]``, last position ``-100``).
    """

    targets: Any = None
    ignore_index: int = -100

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        targets = torch.as_tensor(self.targets).to(logits.device)
        if targets.dtype not in (torch.int64, torch.int32) or tuple(targets.shape) != tuple(logits.shape[:-1]):
            raise NeurotapError(
                f"CrossEntropy targets must be integer token ids of shape {tuple(logits.shape[:-1])} "
                f"(the logits' shape without the vocabulary), got {targets.dtype} of shape {tuple(targets.shape)}"
            )
        return torch.nn.functional.cross_entropy(
            logits.flatten(0, -2).float(), targets.flatten().long(), ignore_index=self.ignore_index
        )


@dataclass(frozen=True, eq=False)
class LogitDiff:
    """Mean over rows of ``logits[:, position, correct] - logits[:, position, wrong]``."""

    correct: int = 0
    wrong: int = 0
    position: int = -1

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        vocab, length = logits.shape[-1], logits.shape[-2]
        for name, token in (("correct", self.correct), ("wrong", self.wrong)):
            if not isinstance(token, int) or not 0 <= token < vocab:
                raise NeurotapError(f"LogitDiff {name}={token!r} is not a token id in [0, {vocab})")
        if not isinstance(self.position, int) or not -length <= self.position < length:
            raise NeurotapError(f"LogitDiff position={self.position!r} is outside a sequence of length {length}")
        at = logits[..., self.position, :].float()
        return (at[..., self.correct] - at[..., self.wrong]).mean()


LOSSES: dict[str, type] = {"CrossEntropy": CrossEntropy, "LogitDiff": LogitDiff}
Loss = CrossEntropy | LogitDiff


def is_builtin_loss(loss: Any) -> bool:
    return isinstance(loss, tuple(LOSSES.values()))


def check_loss(loss: Any) -> None:
    """Refuse a ``loss=`` that is neither a built-in loss nor a function."""
    if not is_builtin_loss(loss) and not callable(loss):
        names = ", ".join(f"nt.{name}" for name in LOSSES)
        raise TypeError(
            f"backward(loss=...) takes a built-in loss ({names}) or a function of the model's output "
            f"returning one number, got {type(loss).__name__}"
        )


def loss_value(loss: Any, output: Any) -> torch.Tensor:
    """``loss`` of a model's output: a built-in loss of its logits, or a function of the output itself."""
    value = loss(logits_of(output)) if is_builtin_loss(loss) else loss(output)
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        what = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise NeurotapError(f"the loss must be one number (a tensor with one element), got {what}; sum or mean it")
    return value.reshape(())
