"""The logit lens as an experiment function, like the others."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import raised_at_the_call
from ..model.lens import LogitLens


@raised_at_the_call
def logit_lens(
    model: Any, ids: Any, positions: int | Sequence[int] | None = -1, *, top: int = 5, token: int | str | None = None
) -> LogitLens:
    """``model.logit_lens(...)``: each layer's residual at ``positions`` through the final norm and the head."""
    return model.logit_lens(ids, positions, top=top, token=token)
