"""The model wrapper."""

from .load import load
from .model import Model, patches_to_probes, wrap

__all__ = ["Model", "load", "patches_to_probes", "wrap"]
