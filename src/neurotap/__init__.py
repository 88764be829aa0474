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


def __getattr__(name: str):  # the server and client load on first use: `import neurotap` stays light
    if name in ("connect", "launch_and_connect", "RemoteModel"):
        from . import transport

        return getattr(transport, name)
    if name in ("ActivationDataset", "collect"):  # the datasets layer sits above the core: loaded on first use
        from . import datasets

        return getattr(datasets, name)
    raise AttributeError(f"module 'neurotap' has no attribute {name!r}")
