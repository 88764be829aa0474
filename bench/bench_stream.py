"""Read throughput of an activation dataset against a plain sequential read of its shard files.

    python bench/bench_stream.py [--rounds 5] [--rows 65536] [--hidden 1024] [--batch 4096] [--buffer-rows N]

Collects one point (a tiny Llama's embedding output, ``hidden`` float32 numbers a
row, so the shards are large and cheap to make) into a temporary folder, then runs,
interleaved round by round on one thread:

- ``raw``: every shard file read front to back into one reused buffer (8 MiB reads):
  the most any reader of these files can get on this machine;
- ``batches``: ``ds.batches(point, batch)`` in order;
- ``stream chunks``: ``ds.stream(point, batch, buffer_rows=...)``, the default chunked
  shuffle, its mixing buffer a quarter of the rows unless ``--buffer-rows`` says (a
  dataset much larger than its buffer, as in training: the blocks of the next fill
  are read while the current one is handed out);
- ``stream none``: ``ds.stream(point, batch, shuffle=None)``;
- ``rows``: ``ds.stream(point, batch, shuffle="rows")`` (a uniform random order,
  gathered row by row; as ``ds.batches(..., shuffle=True)``), over a quarter epoch.

Twice: first with the files in the page cache (the memory-mapped read limit), then
uncached: before every run the shard files are dropped from the page cache
(``posix_fadvise(POSIX_FADV_DONTNEED)``, no root needed) and the dataset is opened
afresh, so that raw read and reader alike read the disk; the share of the files
still cached just before each run is printed (it should be near 0). The uncached
``rows`` run reads a sixteenth of an epoch.

Medians of rows/s and MiB/s of the point's values (the raw read counts the whole
files, a few percent more than the values), and the median over rounds of each
round's ratio to that round's raw read (the goal for chunked shuffle: >= 0.7), with
the load average before and after.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import neurotap as nt
from neurotap.datasets import ActivationDataset, bundled_corpus, collect

POINT = "model.embed_tokens.output"


def build(folder: Path, rows: int, hidden: int) -> ActivationDataset:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [path.read_text() for path in sorted(bundled_corpus().glob("*.txt"))]
    words = Tokenizer(models.WordLevel(unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<unk>", "<bos>", "<eos>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=8,
        num_key_value_heads=8,
    )
    LlamaForCausalLM(config).eval().save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    corpus = folder / "corpus.jsonl"
    paragraphs = [p for text in texts for p in text.split("\n\n") if p.strip()]
    with open(corpus, "w") as file:
        written = 0
        while written < rows * 1.2:  # the bundled corpus, repeated until it holds enough tokens
            for paragraph in paragraphs:
                file.write(json.dumps({"text": paragraph}) + "\n")
                written += len(paragraph.split())
    model = nt.load(str(folder / "model"))
    collect(model, [POINT], folder / "acts", data=corpus, seq_len=128, batch_size=16, tokens=rows, progress=False)
    return ActivationDataset(folder / "acts", verify=False)


def drop_from_cache(files: list[Path]) -> None:
    for path in files:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(descriptor)
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def cached_share(files: list[Path], samples: int = 512) -> float:
    """The share of ``samples`` pages, spread evenly over the files' bytes, that are in the page cache."""
    step = max(sum(path.stat().st_size for path in files) // samples, 4096)
    hits = total = 0
    for path in files:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            for offset in range(0, path.stat().st_size, step):
                total += 1
                try:
                    hits += os.preadv(descriptor, [bytearray(1)], offset, os.RWF_NOWAIT) == 1
                except BlockingIOError:
                    pass
        finally:
            os.close(descriptor)
    return hits / total


def measure(variants: dict, rounds: int, before=None) -> dict[str, list[tuple[float, float, float]]]:
    """Per variant, each round's (rows/s, MiB/s, ratio to that round's raw read)."""
    samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in variants}
    for _ in range(rounds):
        raw_rate = None
        for name, run in variants.items():
            if before is not None:
                before(name)
            start = time.perf_counter()
            rows, size = run()
            seconds = time.perf_counter() - start
            rate = size / 2**20 / seconds
            raw_rate = raw_rate or rate
            samples[name].append((rows / seconds, rate, rate / raw_rate))
    return samples


def report(title: str, samples: dict[str, list[tuple[float, float, float]]]) -> None:
    print(title)
    for name, measured in samples.items():
        rows_per_s, mib_per_s, ratio = (statistics.median(m[i] for m in measured) for i in range(3))
        spread = min(m[2] for m in measured), max(m[2] for m in measured)
        print(
            f"  {name:<14} {rows_per_s:>12,.0f} rows/s  {mib_per_s:>9,.0f} MiB/s  ×{ratio:.2f} of raw "
            f"(rounds ×{spread[0]:.2f}..×{spread[1]:.2f})"
        )


def load() -> str:
    return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", type=int, default=65536)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--buffer-rows", type=int, help="the mixing buffer of stream chunks (default: rows / 4)")
    args = parser.parse_args()
    buffer_rows = args.buffer_rows or max(args.rows // 4, args.batch)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as temporary:
        ds = build(Path(temporary), args.rows, args.hidden)
        files = [ds.path / shard["file"] for shard in ds.manifest["shards"]]
        file_bytes = sum(path.stat().st_size for path in files)
        value_bytes = len(ds) * args.hidden * 4
        buffer = bytearray(8 << 20)
        opened = {"ds": ds}
        total, folder = len(ds), ds.path
        seeds = itertools.count()  # a new shuffle every run

        def raw() -> tuple[int, int]:
            for path in files:
                with open(path, "rb", buffering=0) as file:
                    while file.readinto(buffer):
                        pass
            return total, file_bytes

        def consume(make, fraction: float = 1.0) -> tuple[int, int]:
            rows, wanted = 0, int(total * fraction)
            for batch in make(opened["ds"]):
                rows += len(batch)
                if rows >= wanted:
                    break
            return rows, rows * args.hidden * 4

        def variants(rows_fraction: float) -> dict:
            return {
                "raw": raw,
                "batches": lambda: consume(lambda d: d.batches(POINT, args.batch)),
                "stream chunks": lambda: consume(
                    lambda d: d.stream(POINT, args.batch, buffer_rows=buffer_rows, seed=next(seeds))
                ),
                "stream none": lambda: consume(lambda d: d.stream(POINT, args.batch, shuffle=None)),
                "rows": lambda: consume(
                    lambda d: d.stream(POINT, args.batch, shuffle="rows", seed=next(seeds)), rows_fraction
                ),
            }

        print(
            f"{len(ds):,} rows of {args.hidden} float32 ({value_bytes / 2**20:,.0f} MiB of values, "
            f"{file_bytes / 2**20:,.0f} MiB in {len(files)} shards), batch {args.batch}, mixing buffer {buffer_rows:,} "
            f"rows, {args.rounds} rounds"
        )
        warm = variants(0.25)
        for run in warm.values():  # warm up: the page cache, the hashes, the memory maps
            run()
        print(load())
        cached = measure(warm, args.rounds)
        report("in the page cache:", cached)
        print(load())

        shares = []

        def uncache(name: str) -> None:
            # a fresh dataset: pages mapped by the old one's memory maps would stay in the cache
            opened.pop("ds", None)
            gc.collect()
            drop_from_cache(files)
            for _ in range(20):  # pages still being read in (the kernel's read-ahead) are dropped on a second try
                share = cached_share(files)
                if share < 0.02:
                    break
                time.sleep(0.05)
                drop_from_cache(files)
            shares.append((share, name))
            opened["ds"] = ActivationDataset(folder, verify=False)

        del ds
        opened.pop("ds")
        uncached = measure(variants(1 / 16), args.rounds, before=uncache)
        most, where = max(shares)
        report(f"uncached (share of pages cached before each run: at most {most:.1%}, before {where!r}):", uncached)
        print(load())


if __name__ == "__main__":
    main()
