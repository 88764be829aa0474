"""Collection throughput against the plain forward, side by side.

    python bench/bench_collect.py [--rounds 5] [--smollm2] [--tokens N]

For each model and set of points, two variants run interleaved round by round in
one process on one thread: the plain forward (the unwrapped module, no probes,
``use_cache=False``, inference mode) over the packed batches of the bundled corpus,
and ``collect`` of the same tokens in the same batches into a fresh folder: reading,
tokenising, packing, the forward with probes, the dtype conversion, hashing and
writing the shards (fsync included). Medians of tokens/s are printed with their
ratio (the goal: collect >= 0.85 x plain) and the MiB/s written.

Collect stops each forward after the last requested point, so points early in the
model run faster than the full forward; the "late" rows, at the last layer, show
the cost of collecting when almost nothing can be skipped.

``--ranks`` adds, for the tiny model: ``neurotap collect`` run as a command with
``--ranks 1`` and ``--ranks 2`` (interleaved; each start, the model loads and the
merge included), in tokens/s; and the resume overhead: what rerunning the command
costs beyond the one shard it has left to write (checking the listed shards'
hashes, repacking the last one), against the uninterrupted run's time per shard.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

import neurotap as nt
from neurotap.datasets import bundled_corpus, collect
from neurotap.datasets.corpus import Packer, read_documents, resolve_sources


def tiny_model(folder: Path) -> nt.Model:
    """A random 4-layer Llama (hidden 256) with a word-level tokenizer trained on the bundled corpus."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [path.read_text() for path in sorted(bundled_corpus().glob("*.txt"))]
    words = Tokenizer(models.WordLevel(unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<unk>", "<bos>", "<eos>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return nt.load(str(folder))


def packed_batches(model: nt.Model, seq_len: int, batch: int, tokens: int) -> list[torch.Tensor]:
    sequences = -(-tokens // seq_len)
    packer = Packer(read_documents(resolve_sources(None)), model.tokenizer, seq_len)
    batches = []
    while sequences > 0:
        pack = packer.take(min(batch, sequences))
        if not len(pack.tokens):
            break
        batches.append(torch.from_numpy(pack.tokens).long())
        sequences -= len(pack.tokens)
    return batches


def measure(model: nt.Model, points: list[str], seq_len: int, batch: int, tokens: int, rounds: int, label: str):
    batches = packed_batches(model, seq_len, batch, tokens)
    tokens = sum(b.numel() for b in batches)
    work = Path(tempfile.mkdtemp(prefix="bench-collect-"))

    def plain() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for ids in batches:
                model.module(ids, use_cache=False)
        return tokens / (time.perf_counter() - start)

    written: list[float] = []

    def collecting() -> float:
        out = work / "acts"
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        collect(model, points, out, seq_len=seq_len, batch_size=batch, tokens=tokens, dtype="float16", progress=False)
        seconds = time.perf_counter() - start
        written.append(sum(p.stat().st_size for p in out.glob("shard-*")) / 2**20 / seconds)
        return tokens / seconds

    try:
        plain(), collecting()  # warm up
        samples: dict[str, list[float]] = {"plain": [], "collect": []}
        for _ in range(rounds):
            samples["plain"].append(plain())
            samples["collect"].append(collecting())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    plain_rate, collect_rate = (statistics.median(samples[k]) for k in ("plain", "collect"))
    print(
        f"{label:<34} {tokens:>7} tok  plain {plain_rate:>9,.0f} tok/s  collect {collect_rate:>9,.0f} tok/s  "
        f"ratio {collect_rate / plain_rate:5.2f}  written {statistics.median(written):7.1f} MiB/s"
    )


def measure_ranks(folder: Path, tokens: int, rounds: int) -> None:
    import json
    import os
    import subprocess
    import sys

    data = folder / "corpus.jsonl"
    texts = [p for path in sorted(bundled_corpus().glob("*.txt")) for p in path.read_text().split("\n\n") if p.strip()]
    with open(data, "w") as file:
        written = 0
        while written < tokens * 1.2:
            for text in texts:
                file.write(json.dumps({"text": text}) + "\n")
                written += len(text.split())
    points = "model.layers.1.output,model.layers.1.mlp.mul"
    arguments = ["--model", str(folder), "--points", points, "--data", str(data), "--seq-len", "64", "--batch", "8",
                 "--tokens", str(tokens), "--dtype", "float16", "--shard-mb", "2", "--quiet"]  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="bench-ranks-"))
    environment = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}

    def command(ranks: int) -> float:
        out = work / f"acts-{ranks}"
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "neurotap.cli", "collect", *arguments, "--out", str(out), "--ranks", str(ranks)],
            check=True,
            env=environment,
            stderr=subprocess.DEVNULL,
        )
        return tokens / (time.perf_counter() - start)

    try:
        samples: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(rounds):
            for ranks in samples:
                samples[ranks].append(command(ranks))
        one, two = (statistics.median(samples[r]) for r in (1, 2))
        print(f"collect command, {tokens} tok: 1 rank {one:,.0f} tok/s, 2 ranks {two:,.0f} tok/s (x{two / one:.2f})")

        model = nt.load(str(folder))
        settings = dict(data=data, seq_len=64, batch_size=8, tokens=tokens, dtype="float16", shard_mb=0.5)
        out = work / "resume"
        whole, again = [], []
        for _ in range(rounds):
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            collect(model, points.split(","), out, progress=False, **settings)
            whole.append(time.perf_counter() - start)
            manifest = json.loads((out / "manifest.json").read_text())
            shards = len(manifest["shards"])
            (out / manifest["shards"][-1]["file"]).unlink()  # a run killed while writing its last shard
            start = time.perf_counter()
            collect(model, points.split(","), out, progress=False, **settings)
            again.append(time.perf_counter() - start)
        per_shard = statistics.median(whole) / shards
        print(
            f"resume: rerun {statistics.median(again):.2f} s for its last shard of {shards}; one shard of the "
            f"uninterrupted run {per_shard:.2f} s; overhead {statistics.median(again) - per_shard:.2f} s "
            f"({(statistics.median(again) - per_shard) / statistics.median(whole):.1%} of the whole run)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per run (the bundled corpus caps it)")
    parser.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M (batch 8 x 128)")
    parser.add_argument("--ranks", action="store_true", help="also 1 and 2 ranks, and the resume overhead")
    parser.add_argument("--rank-tokens", type=int, default=40960, help="tokens per run for --ranks")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        tiny = tiny_model(Path(folder))
        if args.ranks:
            measure_ranks(Path(folder), args.rank_tokens, args.rounds)
        measure(
            tiny,
            ["model.layers.1.output", "model.layers.1.mlp.mul"],
            64,
            8,
            args.tokens,
            args.rounds,
            "tiny, layer 1 of 4",
        )
        measure(
            tiny,
            ["model.layers.3.output", "model.layers.3.mlp.mul"],
            64,
            8,
            args.tokens,
            args.rounds,
            "tiny, late (layer 3 of 4)",
        )
    if args.smollm2:
        smol = nt.load("smollm2-135m")
        measure(
            smol,
            ["model.layers.6.output", "model.layers.6.mlp.mul"],
            128,
            8,
            args.tokens,
            args.rounds,
            "smollm2-135m, layer 6 of 30",
        )
        measure(
            smol,
            ["model.layers.29.output", "model.norm.output"],
            128,
            8,
            args.tokens,
            args.rounds,
            "smollm2-135m, late (29 of 30, norm)",
        )


if __name__ == "__main__":
    main()
