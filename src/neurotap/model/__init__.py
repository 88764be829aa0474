"""The model wrapper."""

from .model import Model, patches_to_probes, wrap

__all__ = ["Model", "patches_to_probes", "wrap"]
