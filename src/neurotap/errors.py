"""The library's exceptions: one root, subclasses named after the condition."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

_Function = TypeVar("_Function", bound=Callable[..., Any])


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


class NotSentWarning(UserWarning):
    """A server's answer held values that cannot travel; placeholder strings stand in their places."""


class SourceUnavailableWarning(UserWarning):
    """A forward whose source cannot be rewritten: only its module points exist."""


def raised_at_the_call(function: _Function) -> _Function:
    """``function``, raising neurotap's errors from its own frame rather than from deep inside the forward.

    A mistake such as a patch that does not fit is found inside the model's code, tens
    of frames (torch's, the model's, neurotap's) below the user's call; the message
    says everything, so those frames only bury it. ``NEUROTAP_FULL_TRACEBACKS=1``
    keeps them, for work on neurotap itself. A chained cause (a probe's own
    exception) stays as it was.
    """

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except NeurotapError as error:
            raise shortened(error)  # noqa: B904 - the same error

    return call  # type: ignore[return-value]


def shortened(error: NeurotapError) -> NeurotapError:
    """``error``, to raise again from the user's call: without the frames under it (see ``raised_at_the_call``)."""
    return error if _full_tracebacks() else error.with_traceback(None)


def raised_at_the_module_call() -> bool:
    """Whether torch's module call is handling an error, for a hook on a model's root module that runs
    also when the forward raises (``always_call``).

    A call made directly on the module (``m.module(ids)`` in a ``patch`` block) has
    no neurotap frame above it to re-raise from, so a neurotap error raised in the
    forward loses its frames here instead, and torch re-raises it from the module
    call. Only the error that torch's call is handling counts: on success, the hook
    may run inside an ``except`` block of the caller's, whose error stays as it is.
    """
    error = sys.exc_info()[1]
    if error is None:
        return False
    trace = error.__traceback__
    if trace is None or trace.tb_frame.f_code.co_name != "_call_impl":
        return False
    if isinstance(error, NeurotapError) and not _full_tracebacks():
        error.__traceback__ = None
    return True


def _full_tracebacks() -> bool:
    return bool(os.environ.get("NEUROTAP_FULL_TRACEBACKS"))
