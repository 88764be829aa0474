"""What an experiment returns: its numbers with the labels of both axes and the metric they measure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class PatchingResult:
    """``values[i, j]``: the metric with point ``points[i]`` at position ``positions[j]`` patched.

    ``tokens[j]`` is the token at ``positions[j]`` (decoded alone); ``clean`` and
    ``corrupt`` are the metric on the unpatched clean and corrupted runs, so
    :meth:`normalized` is 1 where a patch restores the clean behaviour fully and 0
    where it does nothing.
    """

    experiment: str  # "activation_patching", "attribution_patching" or "causal_trace"
    values: torch.Tensor  # [len(points), len(positions)], float32, on the CPU
    points: tuple[str, ...]
    positions: tuple[int, ...]
    tokens: tuple[str, ...]
    metric: str
    clean: float
    corrupt: float

    def normalized(self) -> torch.Tensor:
        """``(values - corrupt) / (clean - corrupt)``."""
        return (self.values - self.corrupt) / (self.clean - self.corrupt)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (lists, strings, numbers)."""
        return {
            "experiment": self.experiment,
            "values": self.values.tolist(),
            "points": list(self.points),
            "positions": list(self.positions),
            "tokens": list(self.tokens),
            "metric": self.metric,
            "clean": self.clean,
            "corrupt": self.corrupt,
        }

    def __repr__(self) -> str:
        best = int(self.values.flatten().abs().argmax()) if self.values.numel() else 0
        i, j = divmod(best, max(len(self.positions), 1))
        strongest = (
            f", strongest {self.values[i, j].item():.4g} at {self.points[i]} / {self.tokens[j]!r}"
            if self.values.numel()
            else ""
        )
        return (
            f"PatchingResult({self.experiment}: {len(self.points)} points x {len(self.positions)} positions of "
            f"{self.metric}; clean {self.clean:.4g}, corrupt {self.corrupt:.4g}{strongest})"
        )
