"""Read throughput of an activation dataset against a plain sequential read of its shard files.

    python bench/bench_stream.py [--rounds 5] [--rows 65536] [--hidden 1024] [--batch 4096]

Collects one point (a tiny Llama's embedding output, ``hidden`` float32 numbers a
row, so the shards are large and cheap to make) into a temporary folder, then runs,
interleaved round by round on one thread:

- ``raw``: every shard file read front to back into one reused buffer (8 MiB reads):
  the most any reader of these files can get on this machine;
- ``batches``: ``ds.batches(point, batch)`` in order;
- ``stream chunks``: ``ds.stream(point, batch)``, the default chunked shuffle;
- ``stream none``: ``ds.stream(point, batch, shuffle=None)``;
- ``rows``: ``ds.stream(point, batch, shuffle="rows")`` (a uniform random order,
  gathered row by row; as ``ds.batches(..., shuffle=True)``), over a quarter epoch.

Medians of rows/s and MiB/s of the point's values (the raw read counts the whole
files, a few percent more than the values), and each ratio to the raw read (the
goal for chunked shuffle: >= 0.7). The files stay in the page cache between rounds,
so "raw" is the memory-mapped read limit, not a cold disk; run with files larger
than memory for the disk itself.
"""

from __future__ import annotations

import argparse
import json
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", type=int, default=65536)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4096)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as temporary:
        ds = build(Path(temporary), args.rows, args.hidden)
        files = [ds.path / shard["file"] for shard in ds.manifest["shards"]]
        file_bytes = sum(path.stat().st_size for path in files)
        value_bytes = len(ds) * args.hidden * 4
        buffer = bytearray(8 << 20)

        def raw() -> tuple[int, int]:
            for path in files:
                with open(path, "rb", buffering=0) as file:
                    while file.readinto(buffer):
                        pass
            return len(ds), file_bytes

        def consume(batches, fraction: float = 1.0) -> tuple[int, int]:
            rows, wanted = 0, int(len(ds) * fraction)
            for batch in batches:
                rows += len(batch)
                if rows >= wanted:
                    break
            return rows, rows * args.hidden * 4

        variants = {
            "raw": raw,
            "batches": lambda: consume(ds.batches(POINT, args.batch)),
            "stream chunks": lambda: consume(ds.stream(POINT, args.batch, seed=len(samples["raw"]))),
            "stream none": lambda: consume(ds.stream(POINT, args.batch, shuffle=None)),
            "rows": lambda: consume(ds.stream(POINT, args.batch, shuffle="rows", seed=len(samples["raw"])), 0.25),
        }
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
        for run in variants.values():  # warm up: the page cache, the hashes, the memory maps
            run()
        for _ in range(args.rounds):
            for name, run in variants.items():
                start = time.perf_counter()
                rows, size = run()
                seconds = time.perf_counter() - start
                samples[name].append((rows / seconds, size / 2**20 / seconds))
        print(
            f"{len(ds):,} rows of {args.hidden} float32 ({value_bytes / 2**20:,.0f} MiB of values, "
            f"{file_bytes / 2**20:,.0f} MiB in {len(files)} shards), batch {args.batch}, {args.rounds} rounds"
        )
        raw_rate = statistics.median(m for _, m in samples["raw"])
        for name, measured in samples.items():
            rows_per_s = statistics.median(r for r, _ in measured)
            mib_per_s = statistics.median(m for _, m in measured)
            print(
                f"{name:<14} {rows_per_s:>12,.0f} rows/s  {mib_per_s:>9,.0f} MiB/s  ×{mib_per_s / raw_rate:.2f} of raw"
            )


if __name__ == "__main__":
    main()
