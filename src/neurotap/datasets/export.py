"""Exporting an activation dataset to the formats SAE trainers read.

``hf``: a Hugging Face ``datasets`` dataset saved with ``save_to_disk`` (Arrow files,
``dataset_info.json``, ``state.json``), laid out as SAELens's cached-activations
runner writes it (checked against sae-lens 6.54.12, ``CacheActivationsRunner`` and
``ActivationsStore.load_cached_activation_dataset``): one row per packed sequence,
a column named after the hook name, ``Array2D(shape=(seq_len, d_in))`` of the
dataset's dtype (bfloat16 becomes float32, which Arrow has and bfloat16 is exactly),
and ``token_ids``, a ``Sequence(int32, length=seq_len)``. Point SAELens's
``cached_activations_path`` at the folder, with ``hook_name`` and ``context_size``
equal to the column name and ``seq_len``.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .format import DatasetError
from .reader import ActivationDataset

FORMATS = ("hf",)
_ARROW_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "float32"}


def export(
    dataset: str | Path | ActivationDataset,
    out: str | Path,
    *,
    format: str = "hf",
    point: str | None = None,
    hook_name: str | None = None,
    max_shard_mb: float = 500.0,
) -> Path:
    """Write ``dataset`` (a folder or an ``ActivationDataset``) to the folder ``out`` in ``format``."""
    if format not in FORMATS:
        raise DatasetError(f"the export format must be one of {', '.join(FORMATS)} (got {format!r})")
    ds = dataset if isinstance(dataset, ActivationDataset) else ActivationDataset(dataset)
    if point is None:
        if len(ds.points) != 1:
            raise DatasetError(f"the dataset holds several points ({', '.join(ds.points)}); name one with --point")
        point = ds.points[0]
    if point not in ds.points:
        raise DatasetError(f"the dataset has no point {point!r}; it has {', '.join(ds.points)}")
    if len(ds.shapes[point]) != 1:
        raise DatasetError(
            f"SAELens reads vectors, but {point!r} has the per-token shape {ds.shapes[point]}; export a point whose "
            "values are vectors, or narrow it when collecting"
        )
    column = hook_name or point
    if column == "token_ids":
        raise DatasetError("the hook name 'token_ids' is the token column's own name; pick another")
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise DatasetError(f"the output {target} exists and is not an empty folder; give a new one")
    return _export_hf(ds, point, column, target, max_shard_mb)


def _export_hf(ds: ActivationDataset, point: str, column: str, out: Path, max_shard_mb: float) -> Path:
    try:
        import datasets
    except ImportError as error:
        raise DatasetError(
            "exporting to Hugging Face datasets needs the datasets package: pip install datasets"
        ) from error
    seq_len, (d_in,) = ds.seq_len, ds.shapes[point]
    dtype = _ARROW_DTYPES[ds.manifest["settings"]["dtype"]]
    features = datasets.Features(
        {
            column: datasets.Array2D(shape=(seq_len, d_in), dtype=dtype),
            "token_ids": datasets.Sequence(datasets.Value("int32"), length=seq_len),
        }
    )

    def rows(shards: list[int]) -> Iterator[dict[str, Any]]:
        for index in shards:
            entry = ds.manifest["shards"][index]
            first, count = entry["first_row"], entry["tokens"]
            values = ds.read(point, first, first + count)
            if ds.dtype == torch.bfloat16:
                values = values.float()
            values = values.reshape(-1, seq_len, d_in).numpy()
            tokens = ds.read("tokens", first, first + count).reshape(-1, seq_len).numpy()
            for sequence in range(len(tokens)):
                yield {column: values[sequence], "token_ids": tokens[sequence]}

    out.parent.mkdir(parents=True, exist_ok=True)
    cache = Path(tempfile.mkdtemp(prefix=".neurotap-export-", dir=out.parent))
    try:
        built = datasets.Dataset.from_generator(
            rows,
            features=features,
            cache_dir=str(cache),
            gen_kwargs={"shards": list(range(ds.num_shards))},
            keep_in_memory=False,
        )
        built.save_to_disk(str(out), max_shard_size=int(max_shard_mb * 2**20))
        del built
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return out
