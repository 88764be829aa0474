"""neurotap: probe, record and patch every value inside a PyTorch model while it runs."""

import importlib
from typing import Any

from . import experiments, plot
from .errors import (
    MissedPointError,
    MissedPointWarning,
    NeurotapError,
    NotSentWarning,
    PatchError,
    ProbeError,
    SourceUnavailableWarning,
    UnknownPointError,
)
from .model import CrossEntropy, LogitDiff, Model, Trace, load, wrap
from .points import Point, PointList
from .probes import (
    SAE,
    Add,
    Custom,
    Max,
    Mean,
    Norm,
    Patch,
    Probability,
    Probe,
    Project,
    Record,
    Replace,
    SaveContext,
    Scale,
    Skip,
    Sum,
    TopK,
    Zero,
    probe,
)

__version__ = "0.1.0"

__all__ = [
    "ActivationDataset",
    "Add",
    "CrossEntropy",
    "Custom",
    "LogitDiff",
    "Max",
    "Mean",
    "MissedPointError",
    "MissedPointWarning",
    "Model",
    "NeurotapError",
    "Norm",
    "NotSentWarning",
    "Patch",
    "PatchError",
    "Point",
    "PointList",
    "Probe",
    "ProbeError",
    "Probability",
    "Project",
    "Record",
    "RemoteModel",
    "Replace",
    "SaveContext",
    "Scale",
    "SAE",
    "Skip",
    "SourceUnavailableWarning",
    "Sum",
    "TopK",
    "Trace",
    "UnknownPointError",
    "Zero",
    "__version__",
    "collect",
    "connect",
    "experiments",
    "launch_and_connect",
    "load",
    "plot",
    "probe",
    "stop",
    "wrap",
]


# The server, client and datasets sit above the core and load on first use, so `import neurotap` stays light.
_LAZY = {
    "ActivationDataset": "datasets",
    "collect": "datasets",
    "RemoteModel": "transport",
    "connect": "transport",
    "launch_and_connect": "transport",
    "stop": "transport",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'neurotap' has no attribute {name!r}")
