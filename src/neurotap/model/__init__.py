"""The model wrapper."""

from .load import load
from .losses import CrossEntropy, LogitDiff
from .model import Model, patches_to_probes, wrap

__all__ = ["CrossEntropy", "LogitDiff", "Model", "load", "patches_to_probes", "wrap"]
