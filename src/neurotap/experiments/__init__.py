"""The standard experiments as functions, each batched and returning a labelled result.

They use only the public model API, so each takes an ``nt.Model`` or an ``nt.RemoteModel``.
"""

from ..model.lens import LogitLens
from .lens import logit_lens
from .patching import activation_patching, attribution_patching, causal_trace
from .results import PatchingResult

__all__ = ["LogitLens", "PatchingResult", "activation_patching", "attribution_patching", "causal_trace", "logit_lens"]
