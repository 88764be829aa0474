"""Probes and patches: what happens at a point."""

from .context import Recordings, SaveContext
from .patches import (
    PATCHES,
    Add,
    Custom,
    Max,
    Mean,
    Norm,
    Patch,
    Probability,
    Project,
    Record,
    Replace,
    Scale,
    Skip,
    Sum,
    TopK,
    Zero,
)
from .probe import Probe, ProbeFn, probe
from .sae import SAE

__all__ = [
    "PATCHES",
    "Add",
    "Custom",
    "Max",
    "Mean",
    "Norm",
    "Patch",
    "Probe",
    "ProbeFn",
    "Probability",
    "Project",
    "Record",
    "Recordings",
    "Replace",
    "SAE",
    "SaveContext",
    "Scale",
    "Skip",
    "Sum",
    "TopK",
    "Zero",
    "probe",
]
