"""neurotap export --format hf: read back with Hugging Face datasets, as SAELens's ActivationsStore reads a cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import neurotap as nt
from neurotap.cli import main
from neurotap.datasets import DatasetError, collect

datasets = pytest.importorskip("datasets")

LAYER0 = "model.layers.0.output"
MUL1 = "model.layers.1.mlp.mul"


@pytest.fixture(scope="module")
def model() -> nt.Model:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from conftest import tiny_llama

    words = {w: i for i, w in enumerate(["<unk>", "<bos>", "<eos>", *"the a of to and in is it was old".split()])}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")
    return nt.wrap(tiny_llama(), fast)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_hf_export_is_the_saelens_cache_layout(model: nt.Model, tmp_path: Path, dtype: str) -> None:
    ds = collect(
        model, [LAYER0, MUL1], tmp_path / "acts", seq_len=16, batch_size=2, tokens=400, dtype=dtype, shard_mb=0.02,
        progress=False,
    )  # fmt: skip
    assert ds.num_shards > 2
    hook = "blocks.0.hook_resid_post"
    out = tmp_path / "acts-hf"
    assert main(["export", str(tmp_path / "acts"), "--format", "hf", "--out", str(out), "--point", LAYER0,
                 "--hook-name", hook]) == 0  # fmt: skip

    # what SAELens's ActivationsStore.load_cached_activation_dataset does with a cache folder
    loaded = datasets.load_from_disk(str(out))
    assert sorted(loaded.column_names) == sorted([hook, "token_ids"])
    assert loaded.features[hook].shape == (16, 64)
    assert loaded.features[hook].dtype == ("float16" if dtype == "float16" else "float32")
    assert loaded.features["token_ids"].feature.dtype == "int32" and loaded.features["token_ids"].length == 16
    loaded.set_format(type="torch", columns=[hook, "token_ids"], dtype=torch.float32)
    assert len(loaded) == len(ds) // 16  # one row per sequence
    values = torch.stack([row[hook] for row in loaded])
    assert torch.equal(values, ds.read(LAYER0).float().reshape(-1, 16, 64))
    tokens = torch.stack([row["token_ids"] for row in loaded])
    assert torch.equal(tokens.long(), ds.read("tokens").long().reshape(-1, 16))

    with pytest.raises(DatasetError, match="several points"):
        from neurotap.datasets.export import export

        export(tmp_path / "acts", tmp_path / "other")
    assert main(["export", str(tmp_path / "acts"), "--out", str(out), "--point", LAYER0]) == 2  # not empty
