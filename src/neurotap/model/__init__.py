"""The model wrapper."""

from .load import load
from .losses import CrossEntropy, LogitDiff
from .model import Model, patches_to_probes, wrap
from .trace import Trace

__all__ = ["CrossEntropy", "LogitDiff", "Model", "Trace", "load", "patches_to_probes", "wrap"]
