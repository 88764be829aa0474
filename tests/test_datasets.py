"""Activation datasets: collection against direct runs of the model, resuming, integrity, reading."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import neurotap as nt
from neurotap.datasets import (
    ActivationDataset,
    CorruptDatasetError,
    CorruptShardError,
    DatasetError,
    bundled_corpus,
    collect,
)

LAYER0 = "model.layers.0.output"
MUL1 = "model.layers.1.mlp.mul"


def _paragraphs() -> list[str]:
    """The bundled corpus split into documents by hand: blank-line separated paragraphs."""
    docs = []
    for path in sorted(bundled_corpus().glob("*.txt")):
        docs += [p.strip() for p in re.split(r"\n[ \t]*\n", path.read_text()) if p.strip()]
    return docs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random two-layer Llama and a word-level tokenizer trained on the corpus, saved as a model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-model")
    words = Tokenizer(models.WordLevel(unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator(_paragraphs(), trainers.WordLevelTrainer(special_tokens=["<unk>", "<bos>", "<eos>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(tiny: Path) -> nt.Model:
    return nt.load(str(tiny))


def _hand_packed(tokenizer, seq_len: int, sequences: int) -> tuple[np.ndarray, np.ndarray]:
    """Packing rebuilt by hand: BOS, then the stream of documents each followed by EOS."""
    stream, documents = [], []
    for index, text in enumerate(_paragraphs()):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        stream += ids + [tokenizer.eos_token_id]
        documents += [index] * len(ids) + [-1]
    body = seq_len - 1
    tokens = [[tokenizer.bos_token_id] + stream[i * body : (i + 1) * body] for i in range(sequences)]
    docs = [[-1] + documents[i * body : (i + 1) * body] for i in range(sequences)]
    return np.array(tokens), np.array(docs)


def test_shards_hold_the_hand_packed_tokens_and_the_model_values(model: nt.Model, tmp_path: Path) -> None:
    seq_len, batch = 32, 3
    ds = collect(
        model,
        [LAYER0, MUL1],
        tmp_path / "acts",
        seq_len=seq_len,
        batch_size=batch,
        tokens=2000,
        shard_mb=0.3,
        progress=False,
    )
    sequences = -(-2000 // seq_len)
    assert len(ds) == sequences * seq_len and ds.complete and ds.num_shards > 3
    assert ds.shapes == {LAYER0: (64,), MUL1: (128,)}

    shards = [load_file(str(tmp_path / "acts" / s["file"])) for s in ds.manifest["shards"]]
    stored = {key: torch.cat([s[key] for s in shards]) for key in shards[0]}
    tokens, documents = _hand_packed(model.tokenizer, seq_len, sequences)
    assert torch.equal(stored["tokens"].long(), torch.from_numpy(tokens).reshape(-1))
    assert torch.equal(stored["row.document"], torch.from_numpy(documents).reshape(-1))

    # every token maps back to its text: the span in its document is the word the tokenizer made it from
    paragraphs = _paragraphs()
    words = model.tokenizer.convert_ids_to_tokens(stored["tokens"].tolist())
    for row in range(0, len(words), 7):
        document = int(stored["row.document"][row])
        if document >= 0 and words[row] != "<unk>":
            start, end = int(stored["row.char_start"][row]), int(stored["row.char_end"][row])
            assert paragraphs[document][start:end] == words[row]

    # the values equal the unwrapped model's, run on the same batches
    module = model.module
    captured = []
    hook = module.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        expected_layer0, expected_mul = [], []
        ids = torch.from_numpy(tokens)
        with torch.no_grad():
            for start in range(0, sequences, batch):
                out = module(ids[start : start + batch], output_hidden_states=True, use_cache=False)
                expected_layer0.append(out.hidden_states[1].reshape(-1, 64))
                expected_mul.append(captured.pop().reshape(-1, 128))
    finally:
        hook.remove()
    torch.testing.assert_close(stored[LAYER0], torch.cat(expected_layer0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stored[MUL1], torch.cat(expected_mul), rtol=1e-6, atol=1e-6)

    # the memory-mapped reader gives the same rows as safetensors' own loader
    assert torch.equal(ds.read(LAYER0), stored[LAYER0])
    assert torch.equal(ds.read("tokens", 100, 260), stored["tokens"][100:260])
    rows = [5, 900, 17, 1999, 0]
    assert torch.equal(ds.gather(MUL1, rows), stored[MUL1][rows])


def test_float16_and_bfloat16_store_the_rounded_values(model: nt.Model, tmp_path: Path) -> None:
    reference = collect(model, [LAYER0], tmp_path / "f32", seq_len=16, batch_size=2, tokens=256, progress=False)
    for dtype, torch_dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        ds = collect(
            model, [LAYER0], tmp_path / dtype, seq_len=16, batch_size=2, tokens=256, dtype=dtype, progress=False
        )
        assert ds.dtype == torch_dtype
        values = ds.read(LAYER0)
        assert values.dtype == torch_dtype
        assert torch.equal(values, reference.read(LAYER0).to(torch_dtype))
        assert torch.equal(ds.gather(LAYER0, [3, 1]), values[[3, 1]])
        batch, rows = next(ds.stream(LAYER0, 50, rows=True))
        assert batch.dtype == torch_dtype and torch.equal(batch, values[rows])


def _cli(tiny: Path, data: Path, out: Path) -> list[str]:
    return [
        "collect",
        "--model",
        str(tiny),
        "--points",
        f"{LAYER0},{MUL1}",
        "--data",
        str(data),
        "--out",
        str(out),
        "--seq-len",
        "32",
        "--batch",
        "4",
        "--tokens",
        "120000",
        "--shard-mb",
        "0.8",
        "--dtype",
        "float16",
    ]


def test_a_killed_run_resumes_to_the_same_bytes(tiny: Path, tmp_path: Path) -> None:
    from neurotap.cli import main

    data = tmp_path / "corpus.jsonl"
    with open(data, "w") as file:
        for repeat in range(20):
            for paragraph in _paragraphs()[repeat % 7 :]:
                file.write(json.dumps({"text": paragraph}) + "\n")

    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "neurotap.cli", *_cli(tiny, data, killed), "--quiet"])
    try:
        deadline = time.monotonic() + 300  # the first shard can take minutes on a loaded machine
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if json.loads((killed / "manifest.json").read_text())["shards"]:
                    break
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            time.sleep(0.01)
        time.sleep(0.2)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the collection finished before it could be killed"
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["shards"] and not manifest["complete"]

    assert main([*_cli(tiny, data, killed), "--quiet"]) == 0
    assert main([*_cli(tiny, data, tmp_path / "whole"), "--quiet"]) == 0

    files = sorted(p.name for p in (tmp_path / "whole").iterdir() if not p.name.startswith("."))
    assert files == sorted(p.name for p in killed.iterdir() if not p.name.startswith("."))
    assert len(files) > len(manifest["shards"]) + 1
    for name in files:
        assert (killed / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert not [p.name for p in killed.iterdir() if p.name.endswith(".tmp")]


def test_damaged_shards_are_reported(model: nt.Model, tmp_path: Path) -> None:
    out = tmp_path / "acts"
    arguments = dict(seq_len=16, batch_size=2, tokens=640, shard_mb=0.05, progress=False)
    collect(model, [LAYER0], out, **arguments)
    before = {p.name: p.read_bytes() for p in out.glob("shard-*")}
    assert len(before) >= 4

    # a byte changed inside the values: the sha256 check catches it on read and on resume
    path = out / "shard-00001.safetensors"
    damaged = bytearray(before[path.name])
    damaged[-100] ^= 0xFF
    path.write_bytes(bytes(damaged))
    ds = ActivationDataset(out)
    ds.read(LAYER0, 0, 10)  # shard 0 is fine
    with pytest.raises(CorruptShardError, match="shard-00001.safetensors.*sha256"):
        ds.read(LAYER0)
    with pytest.raises(CorruptShardError, match="shard-00001"):
        ActivationDataset(out).verify()
    with pytest.raises(CorruptShardError, match="shard-00001"):
        collect(model, [LAYER0], out, **arguments)

    # a truncated shard fails as soon as the dataset opens
    path.write_bytes(before[path.name][:-7])
    with pytest.raises(CorruptShardError, match="shard-00001.safetensors has .* bytes but the manifest"):
        ActivationDataset(out)

    # a deleted shard is written again, identically, by the same command
    path.unlink()
    collect(model, [LAYER0], out, **arguments)
    assert {p.name: p.read_bytes() for p in out.glob("shard-*")} == before

    (out / "manifest.json").write_text("{not json")
    with pytest.raises(CorruptDatasetError, match="manifest.json is not valid JSON"):
        ActivationDataset(out)


def test_shuffled_batches_cover_every_row_once(model: nt.Model, tmp_path: Path) -> None:
    ds = collect(model, [MUL1], tmp_path / "acts", seq_len=16, batch_size=2, tokens=1000, shard_mb=0.03, progress=False)
    assert ds.num_shards > 5
    everything = ds.read(MUL1)
    batches = list(ds.batches(MUL1, batch_size=96, shuffle=True, seed=3))
    assert [len(b) for b in batches[:-1]] == [96] * (len(batches) - 1) and len(batches[-1]) == len(ds) % 96
    shuffled = torch.cat(batches)

    def as_sorted_rows(values: torch.Tensor) -> list[tuple[float, ...]]:
        return sorted(map(tuple, values.tolist()))

    assert as_sorted_rows(shuffled) == as_sorted_rows(everything)
    assert not torch.equal(shuffled, everything)
    # the order is the seed's permutation; rows taken from across the shards
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(3))
    assert torch.equal(shuffled, everything[order])
    assert torch.equal(torch.cat(list(ds.batches(MUL1, 96, shuffle=True, seed=3))), shuffled)
    assert not torch.equal(torch.cat(list(ds.batches(MUL1, 96, shuffle=True, seed=4))), shuffled)
    assert torch.equal(torch.cat(list(ds.batches(MUL1, 100))), everything)
    assert all(len(b) == 100 for b in ds.batches(MUL1, 100, shuffle=True, drop_last=True))


@pytest.fixture(scope="module")
def small(model: nt.Model, tmp_path_factory: pytest.TempPathFactory) -> ActivationDataset:
    """1008 rows of the MLP product over several shards, for the readers."""
    folder = tmp_path_factory.mktemp("small") / "acts"
    return collect(model, [MUL1], folder, seq_len=16, batch_size=2, tokens=1000, shard_mb=0.03, progress=False)


def test_stream_reads_whole_blocks_and_gives_every_row_once(small: ActivationDataset) -> None:
    ds = small
    everything = ds.read(MUL1)
    total = len(ds)  # 63 sequences of 16: 1008 rows, 21 blocks of 48, across several shards
    assert total == 1008 and ds.num_shards > 5

    def epoch(**arguments) -> tuple[list[torch.Tensor], torch.Tensor]:
        items = list(ds.stream(MUL1, rows=True, **arguments))
        for values, rows in items:
            assert torch.equal(values, everything[rows])  # each value is the row it says it is
        return [rows for _, rows in items], torch.cat([rows for _, rows in items])

    # one block per buffer: each batch is one block of 48 contiguous rows (rows within a batch come ascending)
    batches, rows = epoch(batch_size=48, chunk_rows=48, buffer_rows=48, seed=1)
    assert sorted(rows.tolist()) == list(range(total))
    starts = []
    for batch in batches:
        first = int(batch.min())
        assert first % 48 == 0 and sorted(batch.tolist()) == list(range(first, first + 48))
        starts.append(first)
    assert starts != sorted(starts)

    # a larger buffer mixes blocks; batches stay full but the last
    batches, rows = epoch(batch_size=100, chunk_rows=48, buffer_rows=200, seed=1)
    assert [len(b) for b in batches] == [100] * 10 + [8]
    assert sorted(rows.tolist()) == list(range(total))
    assert len({int(r) // 48 for r in batches[0]}) > 2
    assert torch.equal(epoch(batch_size=100, chunk_rows=48, buffer_rows=200, seed=1)[1], rows)
    assert not torch.equal(epoch(batch_size=100, chunk_rows=48, buffer_rows=200, seed=2)[1], rows)

    # epochs: each a new order, each every row once
    _, two = epoch(batch_size=100, chunk_rows=48, buffer_rows=200, seed=1, epochs=2)
    assert torch.equal(two[:total], rows) and sorted(two[total:].tolist()) == list(range(total))
    assert not torch.equal(two[total:], rows)
    forever = ds.stream(MUL1, 500, epochs=None)
    assert [len(next(forever)) for _ in range(7)] == [500, 500, 8] * 2 + [500]  # each epoch ends with its rest

    # in order, and the fully random mode's order is the seed's permutation, as batches() gives it
    assert torch.equal(torch.cat(list(ds.stream(MUL1, 100, shuffle=None))), everything)
    order = torch.randperm(total, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.cat(list(ds.stream(MUL1, 100, shuffle="rows", seed=5))), everything[order])
    assert all(len(b) == 100 for b in ds.stream(MUL1, 100, drop_last=True))
    assert torch.equal(torch.cat(list(ds.stream("tokens", 64, shuffle=None))), ds.read("tokens"))
    with pytest.raises(DatasetError, match="shuffle must be"):
        next(ds.stream(MUL1, 10, shuffle=True))


def test_stream_ranks_get_disjoint_blocks_and_equal_batch_counts(small: ActivationDataset) -> None:
    ds = small
    everything = ds.read(MUL1)
    arguments = dict(chunk_rows=48, buffer_rows=96, world_size=3, rows=True)
    for shuffle in ("chunks", "rows", None):
        parts = []
        for rank in range(3):
            items = list(ds.stream(MUL1, 64, shuffle=shuffle, rank=rank, **arguments))
            assert all(len(values) == 64 and torch.equal(values, everything[rows]) for values, rows in items)
            parts.append(torch.cat([rows for _, rows in items]))
        assert len({len(rows) for rows in parts}) == 1, shuffle  # the same number of (full) batches on every rank
        seen = torch.cat(parts)
        assert len(set(seen.tolist())) == len(seen)  # disjoint
        assert len(seen) > len(ds) - 3 * (48 + 64)  # at most a block and a batch per rank left out
        if shuffle != "rows":  # each rank reads its own blocks
            blocks = [{int(r) // 48 for r in rows} for rows in parts]
            assert not (blocks[0] & blocks[1]) and not (blocks[0] & blocks[2]) and not (blocks[1] & blocks[2])
    with pytest.raises(DatasetError, match="rank must lie"):
        next(ds.stream(MUL1, 10, rank=3, world_size=3))


def test_stream_and_gather_values_equal_the_shard_files_read_by_safetensors(small: ActivationDataset) -> None:
    ds = small
    files = [ds.path / shard["file"] for shard in ds.manifest["shards"]]
    by_hand = torch.cat([load_file(path)[MUL1] for path in files])  # every row, from the files themselves
    assert len(by_hand) == len(ds)

    def drop_from_page_cache() -> None:
        # so that the reader's read-ahead finds the pages missing and asks for them
        for path in files:
            descriptor = os.open(path, os.O_RDONLY)
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(descriptor)

    for shuffle in ("chunks", "rows", None):
        fresh = ActivationDataset(ds.path)
        drop_from_page_cache()
        items = list(fresh.stream(MUL1, 100, shuffle=shuffle, chunk_rows=40, buffer_rows=300, seed=7, rows=True))
        rows = torch.cat([r for _, r in items])
        assert sorted(rows.tolist()) == list(range(len(ds))), shuffle  # every row once in the epoch
        for values, picked in items:
            assert torch.equal(values, by_hand[picked]), shuffle
    # rows in any order, repeated, within one shard and across shards
    sizes = [shard["tokens"] for shard in ds.manifest["shards"]]
    for rows in ([5, 3, 3, 0], [len(ds) - 1, 0, sizes[0], sizes[0] - 1, 7, len(ds) - 1], list(range(len(ds)))[::-1]):
        assert torch.equal(ds.gather(MUL1, rows), by_hand[rows])
    assert ds.gather(MUL1, []).shape == (0, *by_hand.shape[1:])
    batch = next(ds.stream(MUL1, 64))
    kept = batch.clone()
    for _ in ds.stream(MUL1, 64):
        pass
    assert torch.equal(batch, kept)  # a batch kept by the caller is never overwritten by later ones


def test_top_examples_match_a_brute_force_search(model: nt.Model, tmp_path: Path) -> None:
    ds = collect(
        model, [LAYER0, MUL1], tmp_path / "acts", seq_len=32, batch_size=4, tokens=3000, shard_mb=0.2, progress=False
    )
    shards = [load_file(str(tmp_path / "acts" / s["file"])) for s in ds.manifest["shards"]]
    tokens = torch.cat([s["tokens"] for s in shards])
    paragraphs = _paragraphs()
    for point, unit in ((MUL1, 5), (MUL1, 77), (LAYER0, 0)):
        column = torch.cat([s[point][:, unit] for s in shards]).tolist()
        expected = sorted(range(len(column)), key=lambda row: (-column[row], row))[:8]
        examples = ds.top_examples(point, unit, k=8, before=6, after=3)
        assert [e.row for e in examples] == expected
        assert [e.value for e in examples] == [column[row] for row in expected]
        for example in examples:
            assert example.token == int(tokens[example.row])
            assert (example.sequence, example.position) == divmod(example.row, 32)
            word = model.tokenizer.convert_ids_to_tokens(example.token)
            if example.document >= 0:
                assert example.text == word
                assert word in paragraphs[example.document]
                if example.position >= 6 and (example.before + example.text) in paragraphs[example.document]:
                    assert example.before.split()[-5:] == model.tokenizer.convert_ids_to_tokens(
                        tokens[example.row - 5 : example.row].tolist()
                    )
            else:
                assert example.text == word  # "<bos>" / "<eos>"
            assert str(example).count("[[") == 1
    with pytest.raises(DatasetError, match="unit"):
        ds.top_examples(MUL1, 128)


def test_topk_locations_map_back_to_the_examples_top_examples_gives(model: nt.Model, tmp_path: Path) -> None:
    ds = collect(model, [MUL1], tmp_path / "acts", seq_len=32, batch_size=4, tokens=2048, progress=False)
    batch = 3  # not the collection's batch size: the mapping needs only how the sequences were fed
    model.clear_recordings()
    with torch.no_grad():
        for ids in ds.read("tokens").long().view(-1, ds.seq_len).split(batch):
            model.forward(ids, probes=[nt.probe(MUL1, nt.TopK(k=6))])
    saved = dict(model.recordings()[MUL1])
    model.clear_recordings()
    for unit in (3, 77, 100):
        examples = ds.top_examples(MUL1, unit, k=6)
        where, values = saved["topk_where"][:, unit].tolist(), saved["topk_values"][:, unit].tolist()
        mapped = [ds.example((call * batch + row) * ds.seq_len + position) for call, row, position in where]
        assert [(e.row, e.before, e.text, e.after) for e in mapped] == [
            (e.row, e.before, e.text, e.after) for e in examples
        ]
        assert [(e.sequence, e.position) for e in examples] == [(c * batch + r, p) for c, r, p in where]
        assert str(examples[0]) == f"{examples[0].value:.4g}  {mapped[0]}"  # a row alone prints no value
        np.testing.assert_allclose(values, [e.value for e in examples], rtol=1e-5, atol=1e-6)


def test_jsonl_and_parquet_give_the_same_dataset_as_text(model: nt.Model, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    paragraphs = _paragraphs()
    (tmp_path / "docs.txt").write_text("\n\n\n".join(paragraphs) + "\n")
    (tmp_path / "docs.jsonl").write_text(
        "".join(json.dumps({"body": p, "id": i}) + "\n" for i, p in enumerate(paragraphs))
    )
    pq.write_table(pa.table({"body": paragraphs}), tmp_path / "docs.parquet")
    arguments = dict(seq_len=16, batch_size=4, tokens=700, progress=False)
    txt = collect(model, [LAYER0], tmp_path / "a", data=tmp_path / "docs.txt", **arguments)
    jsonl = collect(model, [LAYER0], tmp_path / "b", data=tmp_path / "docs.jsonl", text_field="body", **arguments)
    parquet = collect(model, [LAYER0], tmp_path / "c", data=tmp_path / "docs.parquet", text_field="body", **arguments)
    bundled = collect(model, [LAYER0], tmp_path / "d", **arguments)
    for other in (jsonl, parquet, bundled):
        assert torch.equal(other.read("tokens"), txt.read("tokens"))
        assert torch.equal(other.read(LAYER0), txt.read(LAYER0))
        assert other.text(0, 64) == txt.text(0, 64)
    assert txt.text(0, 6).startswith("<bos>" + paragraphs[0][:10])

    with pytest.raises(DatasetError, match="no text field 'text'.*--text-field"):
        collect(model, [LAYER0], tmp_path / "e", data=tmp_path / "docs.jsonl", **arguments)
    with pytest.raises(DatasetError, match="no column 'text'"):
        collect(model, [LAYER0], tmp_path / "f", data=tmp_path / "docs.parquet", **arguments)


def test_bad_requests_fail_clearly_and_write_nothing(model: nt.Model, tmp_path: Path) -> None:
    with pytest.raises(nt.UnknownPointError, match="model.layers.0.mlp.mull"):
        collect(model, ["model.layers.0.mlp.mull"], tmp_path / "a", tokens=64, progress=False)
    with pytest.raises(DatasetError, match=r"shape \(1, 4, 32, 32\).*\[batch, sequence"):
        collect(
            model,
            ["model.layers.0.self_attn.attention_interface.softmax"],
            tmp_path / "b",
            seq_len=32,
            tokens=64,
            progress=False,
        )
    with pytest.raises(DatasetError, match="dtype"):
        collect(model, [LAYER0], tmp_path / "c", dtype="int8", progress=False)
    with pytest.raises(DatasetError, match="does not exist"):
        collect(model, [LAYER0], tmp_path / "c", data=tmp_path / "missing.txt", progress=False)

    collect(model, [LAYER0], tmp_path / "d", seq_len=16, tokens=64, progress=False)
    with pytest.raises(DatasetError, match="other settings.*seq_len"):
        collect(model, [LAYER0], tmp_path / "d", seq_len=32, tokens=64, progress=False)
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not empty"):
        collect(model, [LAYER0], tmp_path / "e", progress=False)
    (tmp_path / "short.txt").write_text("Only a few words here.\n")
    with pytest.raises(DatasetError, match="fewer than 64 tokens"):
        collect(model, [LAYER0], tmp_path / "g", data=tmp_path / "short.txt", seq_len=64, progress=False)
    with pytest.raises(DatasetError, match="seq_len 4096 is longer than the model's 2048 positions"):
        collect(model, [LAYER0], tmp_path / "h", seq_len=4096, progress=False)
    # a run that fails before it writes a manifest leaves no folder (and so no lock file) behind
    for name in "abcgh":
        assert not (tmp_path / name).exists(), name


def test_patterns_collect_every_match_in_layer_order(model: nt.Model, tmp_path: Path) -> None:
    ds = collect(model, ["model.layers.*.mlp.mul", LAYER0], tmp_path / "p", seq_len=16, tokens=64, progress=False)
    assert ds.points == ["model.layers.0.mlp.mul", "model.layers.1.mlp.mul", LAYER0]
    named = collect(model, [MUL1], tmp_path / "n", seq_len=16, tokens=64, progress=False)
    assert torch.equal(ds.read(MUL1), named.read(MUL1))
    with pytest.raises(nt.UnknownPointError, match="no point matches 'model.layers.*.mul'"):
        collect(model, ["model.layers.*.mul"], tmp_path / "q", tokens=64, progress=False)
    assert not (tmp_path / "q").exists()


def test_aliases_and_their_patterns_collect_what_their_points_hold(model: nt.Model, tmp_path: Path) -> None:
    ds = collect(model, ["blocks.*.resid_post"], tmp_path / "a", seq_len=16, tokens=64, progress=False)
    assert ds.points == ["blocks.0.resid_post", "blocks.1.resid_post"]
    raw = collect(model, ["model.layers.{0..1}.output"], tmp_path / "r", seq_len=16, tokens=64, progress=False)
    for layer in range(2):
        assert torch.equal(ds.read(f"blocks.{layer}.resid_post"), raw.read(f"model.layers.{layer}.output"))


def test_running_out_of_data_ends_the_collection_early(
    model: nt.Model, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ds = collect(model, [LAYER0], tmp_path / "acts", seq_len=64, batch_size=8, shard_mb=0.4)
    total = sum(len(model.tokenizer(p, add_special_tokens=False)["input_ids"]) + 1 for p in _paragraphs())
    assert len(ds) == total // 63 * 64 and ds.manifest["exhausted"] and ds.complete
    # without a token count the progress bar has a total (so an ETA), estimated from the corpus size
    bar = capsys.readouterr().err.split("\r")[1]
    assert "estimated from the corpus size" in bar, bar
    estimate = float(re.search(r"/([\d.]+)k ", bar)[1]) * 1000
    assert abs(estimate - len(ds)) < 0.1 * len(ds), (estimate, len(ds))
    again = collect(model, [LAYER0], tmp_path / "acts", seq_len=64, batch_size=8, shard_mb=0.4, progress=False)
    assert len(again) == len(ds)


def test_collect_through_the_recording_interface(model: nt.Model, tmp_path: Path) -> None:
    """Any model with forward(probes=...), recordings() and clear_recordings(), as a remote one has."""

    class Recorder:
        def __init__(self, inner: nt.Model) -> None:
            self.inner, self.tokenizer = inner, inner.tokenizer

        def forward(self, ids, probes=()):
            return self.inner.forward(ids, probes=probes)

        def recordings(self):
            return self.inner.recordings()

        def clear_recordings(self):
            self.inner.clear_recordings()

    arguments = dict(seq_len=16, batch_size=4, tokens=500, shard_mb=0.05, progress=False)
    local = collect(model, [LAYER0, MUL1], tmp_path / "local", **arguments)
    recorded = collect(Recorder(model), [LAYER0, MUL1], tmp_path / "recorded", **arguments)
    for point in (LAYER0, MUL1, "tokens"):
        torch.testing.assert_close(recorded.read(point), local.read(point), rtol=1e-6, atol=1e-6)


def test_cli_and_lazy_exports() -> None:
    from neurotap.cli import COMMANDS

    assert "collect" in COMMANDS
    code = (
        "import sys, neurotap as nt; assert 'neurotap.datasets' not in sys.modules; "
        "assert nt.ActivationDataset.__name__ == 'ActivationDataset' and callable(nt.collect); "
        "assert 'neurotap.datasets' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONWARNINGS": "error"})


def test_collect_through_a_real_server(
    tiny: Path, model: nt.Model, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from neurotap.cli import main

    server = subprocess.Popen(
        [sys.executable, "-m", "neurotap.cli", "serve", str(tiny), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        line = server.stdout.readline()  # "neurotap: serving ... on http://127.0.0.1:PORT"
        assert " on http://127.0.0.1:" in line, line
        url = line.split(" on ")[1].split()[0]
        arguments = [
            "--points",
            f"{LAYER0},{MUL1}",
            "--seq-len",
            "16",
            "--batch",
            "4",
            "--tokens",
            "600",
            "--shard-mb",
            "0.05",
            "--quiet",
        ]
        assert (
            main(["collect", "--model", str(tiny), "--server", url, "--out", str(tmp_path / "remote"), *arguments]) == 0
        )
        # refused as locally, before a folder is made
        long = ["collect", "--model", str(tiny), "--server", url, "--out", str(tmp_path / "long"), *arguments]
        capsys.readouterr()
        assert main([*long, "--seq-len", "4096"]) == 2
        assert "seq_len 4096 is longer than the model's 2048 positions" in capsys.readouterr().err
        assert not (tmp_path / "long").exists()
    finally:
        server.terminate()
        server.wait(30)
        server.stdout.close()
    remote = ActivationDataset(tmp_path / "remote")
    local = collect(
        model, [LAYER0, MUL1], tmp_path / "local", seq_len=16, batch_size=4, tokens=600, shard_mb=0.05, progress=False
    )
    assert remote.num_shards == local.num_shards > 2
    assert torch.equal(remote.read("tokens"), local.read("tokens"))
    for point in (LAYER0, MUL1):
        torch.testing.assert_close(remote.read(point), local.read(point), rtol=1e-5, atol=1e-6)
