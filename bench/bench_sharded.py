"""Sharded serving: latency and memory of one process against 2 and 3 ranks.

For a tiny random Llama (and with --smollm2 the real SmolLM2-135M) this starts a
one-process ``neurotap serve`` and ``neurotap serve --ranks N`` for each N, checks
that they agree, then sends the same requests to each in turn, round after round
(so that all see the same machine load): a forward on ``[1, 32]`` and on
``[8, 128]`` token ids (the logits come back, as a client would ask for them) and
a greedy 16-token generate from 8 tokens; then the throughput of 8 concurrent
clients sending forwards of mixed lengths (``[1, 16..64]``, a ``Mean`` probe
each) against the same requests sent one at a time, and how many passes the
concurrent requests took (they share padded passes). It prints the median latencies, their
ratio to one process, each process's peak RSS (once loaded, and at the end), and
where a sharded request's time goes: each rank's seconds sending to the next
rank (hidden states, the logits to rank 0, a generation's scores) and waiting
for what it receives, which includes the other ranks' compute, from the
``send_s``/``receive_s`` counters in ``/v1/info``.

Every server process computes on one thread, so that the splits compare on a
machine with few cores.

Run: python bench/bench_sharded.py [--smollm2] [--ranks 2,3] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

import neurotap as nt
from bench_remote import client_work, concurrent_rate, mixed_length, sequential_rate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import serving  # noqa: E402  (the tests' harness: start a server, wait until it listens, stop it)

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # every server process computes on one thread


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


class Server(serving.Server):
    stop_timeout = 120.0

    def __init__(self, model: str, ranks: int) -> None:
        self.ranks = ranks
        extra = ["--ranks", str(ranks)] if ranks > 1 else []
        super().__init__(model, "--request-timeout", "600", *extra, env=ONE_THREAD)
        self.remote = nt.connect(self.url, timeout=600)

    def rows(self) -> list[dict]:
        """One row per process: peak RSS now and once loaded (MB), and, sharded, seconds in transfers."""
        if self.ranks > 1:
            return self.remote.info()["ranks"]
        with open(f"/proc/{self.process.pid}/status") as status:
            peak = next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:"))
        return [{"peak_rss_mb": peak}]

    def stop(self) -> int:
        self.remote.close()
        return super().stop()


def requests(vocab: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    short, long = (
        torch.randint(0, vocab, (1, 32), generator=generator),
        torch.randint(0, vocab, (8, 128), generator=generator),
    )
    prompt = torch.randint(0, vocab, (1, 8), generator=generator)
    return {
        "forward [1, 32]": lambda rm: rm.forward(short, outputs=["logits"])["logits"],
        "forward [8, 128]": lambda rm: rm.forward(long, outputs=["logits"])["logits"],
        "generate 16 tokens": lambda rm: rm.generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False),
    }


def throughput(servers: dict, vocab: int, rounds: int, clients: int = 8, per_client: int = 3) -> None:
    """Requests per second of ``clients`` concurrent clients against the same requests sent one at a time."""
    work = client_work(vocab, clients, per_client, mixed_length)
    probes = [nt.probe("model.layers.1.mlp.mul", nt.Mean(dims=(0, 1)))]
    remotes = {n: [nt.connect(s.url, timeout=600) for _ in range(clients)] for n, s in servers.items()}

    def sender(n: int) -> Callable[[int, torch.Tensor], None]:
        return lambda c, ids: remotes[n][c].forward(ids, probes=probes, outputs=["logits"])

    try:
        rates = {(n, kind): [] for n in servers for kind in ("sequential", "concurrent")}
        shared = {n: [0, 0, 0] for n in servers}  # requests, passes, padded passes of the concurrent runs
        for _ in range(rounds):
            for n in servers:
                rates[n, "sequential"].append(sequential_rate(sender(n), work))
                before = servers[n].remote.info()
                rates[n, "concurrent"].append(concurrent_rate(sender(n), work))
                after = servers[n].remote.info()
                for i, key in enumerate(("requests", "passes", "padded_passes")):
                    shared[n][i] += after[key] - before[key]
        print(f"  {clients} clients, forwards of [1, 16..64] with a Mean probe (load {os.getloadavg()[0]:.1f}):")
        for n in servers:
            seq, conc = statistics.median(rates[n, "sequential"]), statistics.median(rates[n, "concurrent"])
            requests, passes, padded = shared[n]
            print(
                f"    {n} {'process' if n == 1 else 'ranks'}: sequential {seq:.2f} req/s, concurrent {conc:.2f} req/s, "
                f"x{conc / seq:.2f}; concurrent: {requests} requests in {passes} passes, {padded} padded"
            )
    finally:
        for clients_of in remotes.values():
            for rm in clients_of:
                rm.close()


def compare(name: str, model: str, counts: list[int], repeats: int, vocab: int) -> None:
    servers = {n: Server(model, n) for n in [1, *counts]}
    try:
        loaded = {n: [row["peak_rss_mb"] for row in s.rows()] for n, s in servers.items()}
        calls = requests(vocab)
        for what, call in calls.items():  # every split computes what one process does
            reference = call(servers[1].remote)
            for n in counts:
                got = call(servers[n].remote)
                if got.is_floating_point():
                    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4)
                else:
                    assert torch.equal(got, reference), what
        times = {(n, what): [] for n in servers for what in calls}
        seconds = {(n, what): [] for n in counts for what in calls}  # per request: [(send, receive) per rank]
        for _ in range(repeats):
            for what, call in calls.items():
                for n, server in servers.items():
                    before = server.rows() if n > 1 else None
                    start = time.perf_counter()
                    call(server.remote)
                    times[n, what].append(time.perf_counter() - start)
                    if before is not None:
                        after = server.rows()
                        seconds[n, what].append(
                            [
                                (b["send_s"] - a["send_s"], b["receive_s"] - a["receive_s"])
                                for a, b in zip(before, after)
                            ]
                        )
        print(f"\n{name}: medians of {repeats} (load {os.getloadavg()[0]:.1f})")
        for what in calls:
            one = statistics.median(times[1, what])
            print(f"  {what}: 1 process {one * 1000:.1f} ms")
            for n in counts:
                median = statistics.median(times[n, what])
                per_rank = []
                for rank in range(n):
                    send = statistics.median(s[rank][0] for s in seconds[n, what])
                    receive = statistics.median(s[rank][1] for s in seconds[n, what])
                    per_rank.append(f"r{rank} send {send * 1000:.1f} / wait {receive * 1000:.1f}")
                sends = statistics.median(sum(r[0] for r in s) for s in seconds[n, what])
                print(
                    f"    {n} ranks {median * 1000:.1f} ms (x{median / one:.2f}, {(median - one) * 1000:+.1f} ms; "
                    f"sending {sends * 1000:.1f} ms of it); ms per rank: {', '.join(per_rank)}"
                )
        throughput(servers, vocab, max(1, repeats // 2 + 1))
        end = {n: [row["peak_rss_mb"] for row in s.rows()] for n, s in servers.items()}
        for n in servers:
            rss = " / ".join(f"{a:.0f} -> {b:.0f}" for a, b in zip(loaded[n], end[n]))
            print(f"  peak RSS, {n} {'process' if n == 1 else 'ranks'} (loaded -> end), MB: {rss}")
    finally:
        for server in servers.values():
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smollm2", action="store_true", help="also measure the real SmolLM2-135M")
    parser.add_argument("--ranks", default="2,3", help="the rank counts to compare with one process")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-tiny", action="store_true", help="measure SmolLM2 only")
    args = parser.parse_args()
    counts = [int(n) for n in args.ranks.split(",")]
    if not args.skip_tiny:
        with tempfile.TemporaryDirectory() as folder:
            compare("tiny Llama (8 layers, hidden 128)", tiny_model(folder), counts, args.repeats, 512)
    if args.smollm2:
        nt.load("smollm2-135m")  # converts the built-in model once, so every server starts from its copy
        compare("SmolLM2-135M", "smollm2-135m", counts, args.repeats, 49152)


if __name__ == "__main__":
    main()
