"""Probes and patches: what happens at a point."""

from .context import SaveContext
from .patches import PATCHES, Add, Custom, Max, Mean, Norm, Patch, Project, Record, Replace, Scale, Sum, TopK, Zero
from .probe import Probe, ProbeFn, probe

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
    "Project",
    "Record",
    "Replace",
    "SaveContext",
    "Scale",
    "Sum",
    "TopK",
    "Zero",
    "probe",
]
