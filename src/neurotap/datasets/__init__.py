"""Activation datasets: collect the values at a few points over many tokens, and read them back.

Sits above the model layer; nothing in the core imports it. The on-disk format is
described in :mod:`neurotap.datasets.format`.
"""

from .collect import collect
from .corpus import bundled_corpus
from .format import CorruptDatasetError, CorruptShardError, DatasetError
from .reader import ActivationDataset, Example

__all__ = [
    "ActivationDataset",
    "CorruptDatasetError",
    "CorruptShardError",
    "DatasetError",
    "Example",
    "bundled_corpus",
    "collect",
]
