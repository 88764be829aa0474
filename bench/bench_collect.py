"""Collection throughput against the plain forward, side by side.

    python bench/bench_collect.py [--rounds 5] [--smollm2] [--tokens N] [--ranks [--rank-tokens N]]

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

``--ranks`` measures instead, for the tiny model (with ``--smollm2``, for
SmolLM2's layer 6 only): ``neurotap collect`` run as a command with 1 and 2 ranks
(interleaved; each start, the model load and the merge included; every core used
by either), in tokens/s and against the plain forward in process; and resuming: a
one-rank run killed (SIGKILL) once half its shards are written, then the same
command again, whose total time is set against the uninterrupted run's (and whose
folder must equal it byte for byte).
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


def packed_batches(model: nt.Model, seq_len: int, batch: int, tokens: int, data: Path | None = None):
    sequences = -(-tokens // seq_len)
    packer = Packer(read_documents(resolve_sources(data)), model.tokenizer, seq_len)
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


def measure_ranks(model: str, points: str, seq_len: int, tokens: int, rounds: int, shard_mb: float) -> None:
    """``neurotap collect`` as a command with 1 and 2 ranks, the plain forward, and a killed run resumed."""
    import json
    import os
    import signal
    import subprocess
    import sys

    work = Path(tempfile.mkdtemp(prefix="bench-ranks-"))
    data = work / "corpus.jsonl"
    texts = [p for path in sorted(bundled_corpus().glob("*.txt")) for p in path.read_text().split("\n\n") if p.strip()]
    with open(data, "w") as file:  # the bundled corpus, repeated until it holds enough tokens
        written = 0
        while written < tokens * 1.2:
            for text in texts:
                file.write(json.dumps({"text": text}) + "\n")
                written += len(text.split())
    arguments = ["--model", model, "--points", points, "--data", str(data), "--seq-len", str(seq_len), "--batch", "8",
                 "--tokens", str(tokens), "--dtype", "float16", "--shard-mb", str(shard_mb), "--quiet"]  # fmt: skip
    # each variant uses every core: one rank all of them, two ranks half each (as --ranks shares them out)
    environment = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}

    def start(ranks: int, out: Path) -> subprocess.Popen:
        line = [sys.executable, "-m", "neurotap.cli", "collect", *arguments, "--out", str(out), "--ranks", str(ranks)]
        return subprocess.Popen(line, env=environment, stderr=subprocess.DEVNULL, start_new_session=True)

    def command(ranks: int) -> float:
        out = work / f"acts-{ranks}"
        shutil.rmtree(out, ignore_errors=True)
        began = time.perf_counter()
        if start(ranks, out).wait() != 0:
            raise SystemExit(f"neurotap collect --ranks {ranks} failed")
        return time.perf_counter() - began

    def killed_and_resumed() -> tuple[float, float]:
        """A one-rank run killed (SIGKILL) once half its shards are listed, then the same command again."""
        out = work / "acts-killed"
        shutil.rmtree(out, ignore_errors=True)
        shards = json.loads((work / "acts-1" / "manifest.json").read_text())["shards"]
        began = time.perf_counter()
        running = start(1, out)
        while running.poll() is None:
            try:
                listed = len(json.loads((out / "manifest.json").read_text())["shards"])
            except (OSError, ValueError):
                listed = 0
            if listed >= len(shards) // 2:
                os.killpg(running.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        running.wait()
        first = time.perf_counter() - began
        began = time.perf_counter()
        if start(1, out).wait() != 0:
            raise SystemExit("the resumed neurotap collect failed")
        again = time.perf_counter() - began
        for name in ("manifest.json", *(s["file"] for s in shards)):  # the resumed dataset is the uninterrupted one
            if (out / name).read_bytes() != (work / "acts-1" / name).read_bytes():
                raise SystemExit(f"the resumed run's {name} differs from the uninterrupted run's")
        return first, again

    try:
        local = nt.load(model)
        torch.set_num_threads(os.cpu_count() or 1)
        plain_batches = packed_batches(local, seq_len, 8, min(tokens, 8 * 8 * seq_len), data)

        def plain() -> float:
            began = time.perf_counter()
            with torch.inference_mode():
                for ids in plain_batches:
                    local.module(ids, use_cache=False)
            return sum(b.numel() for b in plain_batches) / (time.perf_counter() - began)

        samples: dict[str, list[float]] = {"plain": [], "1 rank": [], "2 ranks": []}
        resumed: list[tuple[float, float]] = []
        for _ in range(rounds):
            samples["plain"].append(plain())
            samples["1 rank"].append(tokens / command(1))
            samples["2 ranks"].append(tokens / command(2))
            resumed.append(killed_and_resumed())
        torch.set_num_threads(1)
        rate = {name: statistics.median(values) for name, values in samples.items()}
        print(
            f"{model} {points}, {tokens:,} tokens, seq {seq_len}, float16, {rounds} rounds (medians; each command's "
            "time includes its start, the model load and, for 2 ranks, the merge)"
        )
        print(f"  plain forward (all layers, in process) {rate['plain']:>9,.0f} tok/s")
        for name in ("1 rank", "2 ranks"):
            print(f"  collect, {name:<7} {rate[name]:>9,.0f} tok/s  x{rate[name] / rate['plain']:.2f} of plain")
        print(f"  2 ranks / 1 rank x{rate['2 ranks'] / rate['1 rank']:.2f}")
        whole = tokens / rate["1 rank"]
        first = statistics.median(f for f, _ in resumed)
        again = statistics.median(a for _, a in resumed)
        print(
            f"  killed at half its shards after {first:.1f} s, resumed in {again:.1f} s: {first + again:.1f} s in all "
            f"against {whole:.1f} s uninterrupted (x{(first + again) / whole:.2f}; the resumed folder equals it)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per run (the bundled corpus caps it)")
    parser.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M (batch 8 x 128)")
    parser.add_argument(
        "--ranks", action="store_true", help="only the command with 1 and 2 ranks and a killed run resumed instead"
    )
    parser.add_argument("--rank-tokens", type=int, default=32768, help="tokens per run for --ranks")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        tiny = tiny_model(Path(folder))
        if args.ranks and args.smollm2:
            measure_ranks("smollm2-135m", "model.layers.6.output", 128, args.rank_tokens, args.rounds, 4.0)
            return
        if args.ranks:
            points = "model.layers.1.output,model.layers.1.mlp.mul"
            measure_ranks(folder, points, 64, args.rank_tokens, args.rounds, 2.0)
            return
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
