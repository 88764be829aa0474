"""The library's exceptions: one root, subclasses named after the condition."""

from __future__ import annotations


class NeurotapError(Exception):
    """Root of every error neurotap raises on purpose."""


class UnknownPointError(NeurotapError, KeyError):
    """A point name that the model's inventory does not contain."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class PatchError(NeurotapError, ValueError):
    """A patch or probe result that does not fit the value at its point."""


class ProbeError(NeurotapError, RuntimeError):
    """A probe function raised; the original exception is chained as __cause__."""


class MissedPointError(NeurotapError):
    """A call finished without reaching a point that a probe or patch was waiting at.

    ``points`` lists their names as given.
    """

    def __init__(self, message: str, points: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.points = list(points)


class MissedPointWarning(UserWarning):
    """``generate`` finished without reaching a point that a probe or patch was waiting at."""


class SourceUnavailableWarning(UserWarning):
    """A forward whose source cannot be rewritten: only its module points exist."""
