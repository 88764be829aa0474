"""neurotap: probe, record and patch every value inside a PyTorch model while it runs."""

from .errors import NeurotapError, PatchError, ProbeError, SourceUnavailableWarning, UnknownPointError
from .model import Model, load, wrap
from .points import Point, PointList
from .probes import (
    Add,
    Custom,
    Max,
    Mean,
    Norm,
    Patch,
    Probe,
    Project,
    Record,
    Replace,
    SaveContext,
    Scale,
    Sum,
    TopK,
    Zero,
    probe,
)

__version__ = "0.1.0"

__all__ = [
    "Add",
    "Custom",
    "Max",
    "Mean",
    "Model",
    "NeurotapError",
    "Norm",
    "Patch",
    "PatchError",
    "Point",
    "PointList",
    "Probe",
    "ProbeError",
    "Project",
    "Record",
    "Replace",
    "SaveContext",
    "Scale",
    "SourceUnavailableWarning",
    "Sum",
    "TopK",
    "UnknownPointError",
    "Zero",
    "__version__",
    "load",
    "probe",
    "wrap",
]
