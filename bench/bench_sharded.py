"""Sharded serving: forward latency of 1 against N ranks, and each rank's peak memory.

Prints, for a tiny random Llama (and with --smollm2 the real SmolLM2-135M), the
median latency of a remote forward on ``[8, 128]`` token ids through a one-process
``neurotap serve`` and through ``neurotap serve --ranks N`` (requests alternate
between the servers, so both see the same machine load), their ratio (goal:
<= 1.3 for 2 ranks), and the peak resident memory of every process: once the
model is loaded, and after the forwards (whose logits, ``[8, 128, vocab]``, rank 0
receives and encodes as the one process does).

Run: python bench/bench_sharded.py [--smollm2] [--ranks 2] [--repeats 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import torch
import transformers

import neurotap as nt
from neurotap.transport.wire import PROTOCOL, PROTOCOL_HEADER

LAUNCH = "import sys; from neurotap.cli import main; sys.exit(main())"


def tiny_model(folder: str) -> str:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        architectures=["LlamaForCausalLM"],
    )
    transformers.LlamaForCausalLM(config).eval().save_pretrained(folder)
    return folder


class Server:
    def __init__(self, model: str, ranks: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", LAUNCH, "serve", model, "--port", "0", "--ranks", str(ranks)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        line = self.process.stdout.readline()
        if " on http://" not in line:
            raise RuntimeError(f"the server did not start: {line!r}")
        self.url = line.split(" on ")[1].split()[0]

    def get(self, path: str) -> dict:
        return httpx.get(self.url + path, headers={PROTOCOL_HEADER: str(PROTOCOL)}, timeout=60).json()

    def peak_rss_mb(self) -> list[float]:
        ranks = self.get("/v1/info").get("ranks")
        if ranks:
            return [row["peak_rss_mb"] for row in ranks]
        with open(f"/proc/{self.get('/health')['pid']}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return [int(line.split()[1]) / 1024]
        return []

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)
        self.process.stdout.close()


def compare(name: str, model: str, ranks: int, repeats: int, vocab: int) -> None:
    ids = torch.randint(0, vocab, (8, 128), generator=torch.Generator().manual_seed(0))
    one, many = Server(model, 1), Server(model, ranks)
    loaded_one, loaded_many = one.peak_rss_mb(), many.peak_rss_mb()  # before any forward: the model and the code
    try:
        with nt.connect(one.url, timeout=300) as a, nt.connect(many.url, timeout=300) as b:
            reference = a.forward(ids, outputs=["logits"])["logits"]
            torch.testing.assert_close(b.forward(ids, outputs=["logits"])["logits"], reference, rtol=1e-4, atol=1e-4)
            times: dict[str, list[float]] = {"one": [], "many": []}
            for _ in range(repeats):
                for key, remote in (("one", a), ("many", b)):
                    start = time.perf_counter()
                    remote.forward(ids, outputs=["logits"])
                    times[key].append(time.perf_counter() - start)
        first, sharded = statistics.median(times["one"]), statistics.median(times["many"])
        print(f"{name}, forward [8, 128], median of {repeats}:")
        rss = f"{loaded_one[0]:.0f}, {one.peak_rss_mb()[0]:.0f}"
        print(f"  1 process: {first * 1000:8.1f} ms   peak RSS (loaded, after the forwards) {rss} MB")
        rss = " / ".join(f"{a:.0f}, {b:.0f}" for a, b in zip(loaded_many, many.peak_rss_mb()))
        print(f"  {ranks} ranks:   {sharded * 1000:8.1f} ms   peak RSS per rank (loaded, after the forwards) {rss} MB")
        print(f"  ratio {sharded / first:.2f} (goal <= 1.3 for 2 ranks)")
    finally:
        one.stop()
        many.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smollm2", action="store_true", help="also measure the real SmolLM2-135M")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        compare("tiny Llama (8 layers, hidden 128)", tiny_model(folder), args.ranks, args.repeats, 512)
    if args.smollm2:
        nt.load("smollm2-135m")  # converts the built-in model once, so both servers start from its copy
        compare("SmolLM2-135M", "smollm2-135m", args.ranks, max(5, args.repeats // 4), 49152)


if __name__ == "__main__":
    main()
