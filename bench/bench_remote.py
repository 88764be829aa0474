"""Remote serving: overhead of a small request, dynamic batching throughput, bytes on the wire.

Prints:
- remote forward overhead on loopback over the same local call (tiny model; goal <= 5 ms)
- throughput of 8 concurrent clients over the same requests sent one at a time (goal >= 3x), with inputs of
  one length (64) and of mixed lengths (16 to 64, run as padded passes)
- the same for greedy generate of 16 tokens, each client zeroing its own unit (goal >= 2.5x on the tiny model)
- bytes for "mean over positions of every layer's residual" against shipping the full activations
- ``rm.run`` tracing every layer's residual against the same Record probes and a ``recordings()`` fetch
- bytes received by remote experiments on SmolLM2: a built-in metric read on the server against the logits shipped

Random models, built here; the server is a real ``neurotap serve`` process on 127.0.0.1.
Run: python bench/bench_remote.py [overhead] [forward] [generate] [bytes] [trace] [experiments]  (default: all)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

import neurotap as nt
from neurotap.transport.wire import ProbeSpec, RunRequest, encode_request

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import serving  # noqa: E402  (the tests' harness: start a server, wait until it listens, stop it)

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the server computes on one thread


def save_model(folder: str, hidden: int, layers: int, vocab: int) -> str:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        attn_implementation="eager",
    )
    transformers.LlamaForCausalLM(config).eval().save_pretrained(folder)
    return folder


def overhead(folder: str) -> None:
    local = nt.load(folder)
    with serving.Server(folder, env=ONE_THREAD) as server:
        with nt.connect(server.url) as remote:
            ids = torch.randint(0, 128, (1, 16))
            local_times, remote_times = [], []
            for _ in range(20):  # warm up both
                remote.forward(ids, outputs=["logits"])
            for _ in range(300):
                start = time.perf_counter()
                with torch.no_grad():
                    local.forward(ids)
                local_times.append(time.perf_counter() - start)
                start = time.perf_counter()
                remote.forward(ids, outputs=["logits"])
                remote_times.append(time.perf_counter() - start)
            local_ms = statistics.median(local_times) * 1000
            remote_ms = statistics.median(remote_times) * 1000
            print(
                f"small forward [1, 16], tiny model: local {local_ms:.2f} ms, remote {remote_ms:.2f} ms, "
                f"overhead {remote_ms - local_ms:.2f} ms (goal <= 5 ms)"
            )


def mixed_length(c: int, k: int) -> int:
    return 16 + (7 * c + 13 * k) % 49


def client_work(
    vocab: int, clients: int, per_client: int, length: Callable[[int, int], int]
) -> list[list[torch.Tensor]]:
    """For each client ``c``, ``per_client`` seeded token ids of shape ``[1, length(c, k)]``."""
    return [
        [
            torch.randint(0, vocab, (1, length(c, k)), generator=torch.Generator().manual_seed(100 * c + k))
            for k in range(per_client)
        ]
        for c in range(clients)
    ]


def sequential_rate(send: Callable[[int, torch.Tensor], None], work: list[list[torch.Tensor]]) -> float:
    """Requests per second of ``send(c, ids)`` for every client ``c``'s ``work[c]``, one request at a time."""
    start = time.perf_counter()
    for c, requests in enumerate(work):
        for ids in requests:
            send(c, ids)
    return sum(map(len, work)) / (time.perf_counter() - start)


def concurrent_rate(send: Callable[[int, torch.Tensor], None], work: list[list[torch.Tensor]]) -> float:
    """The same with each client sending from a thread of its own, all started together."""
    barrier = threading.Barrier(len(work) + 1)

    def run(c: int) -> None:
        barrier.wait()
        for ids in work[c]:
            send(c, ids)

    threads = [threading.Thread(target=run, args=(c,)) for c in range(len(work))]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    return sum(map(len, work)) / (time.perf_counter() - start)


def throughput(folder: str, vocab: int, mixed: bool = False, generate: bool = False) -> None:
    server = serving.Server(folder, env=ONE_THREAD)
    clients, per_client = 8, 6
    work = client_work(vocab, clients, per_client, mixed_length if mixed else lambda c, k: 16 if generate else 64)
    probes = [nt.probe("model.layers.1.mlp.mul", nt.Mean(dims=(0, 1)))]

    def send(c: int, ids: torch.Tensor) -> None:
        if generate:
            zero = [nt.probe("model.layers.1.mlp.mul", nt.Zero(index=(..., c)))]
            remotes[c].generate(ids, probes=zero, max_new_tokens=16, min_new_tokens=16, do_sample=False)
        else:
            remotes[c].forward(ids, probes=probes, outputs=["logits"])

    try:
        remotes = [nt.connect(server.url) for _ in range(clients)]
        for c in range(clients):
            send(c, work[0][0])
        rates_seq, rates_conc = [], []
        for _ in range(5):
            rates_seq.append(sequential_rate(send, work))
            rates_conc.append(concurrent_rate(send, work))
        info = remotes[0].info()
        seq, conc = statistics.median(rates_seq), statistics.median(rates_conc)
        shape = "[1, 16..64] (mixed)" if mixed else "[1, 16]" if generate else "[1, 64]"
        what = "greedy generates of 16 tokens with a Zero patch" if generate else "forwards with a Mean probe"
        print(
            f"throughput, {os.path.basename(folder)} model, {shape} {what}: "
            f"sequential {seq:.1f} req/s, 8 clients {conc:.1f} req/s, ratio {conc / seq:.2f}x "
            f"(goal >= {2.5 if generate else 3}x); "
            f"{info['requests']} requests ran in {info['passes']} passes, {info['padded_passes']} of them padded"
        )
        for rm in remotes:
            rm.close()
    finally:
        server.stop()


def wire_bytes(folder: str, vocab: int, layers: int) -> None:
    with serving.Server(folder, env=ONE_THREAD) as server:
        with nt.connect(server.url) as rm:
            ids = torch.randint(0, vocab, (1, 256))
            residuals = [f"model.layers.{i}.output" for i in range(layers)]
            sizes = {}
            for name, patch in (("mean", nt.Mean(dims=(0, 1))), ("full", nt.Record())):
                rm.clear_recordings()
                request = RunRequest("forward", (ids,), {}, [ProbeSpec(p, patch) for p in residuals], [])
                run = rm._http.post("/v1/run", content=encode_request(request))
                fetched = rm._http.get("/v1/recordings")
                sizes[name] = len(run.content) + len(fetched.content)
            print(
                f"wire bytes, mean over 256 positions of {layers} layers' residual: {sizes['mean']} B; "
                f"full activations: {sizes['full']} B; ratio {sizes['full'] / sizes['mean']:.0f}x fewer"
            )


def trace_cost(folder: str, vocab: int, layers: int) -> None:
    """``rm.run`` (one request, the values in its answer) against Record probes and a recordings() fetch."""
    with serving.Server(folder, env=ONE_THREAD) as server:
        with nt.connect(server.url) as rm:
            ids = torch.randint(0, vocab, (1, 64))
            residuals = [f"blocks.{i}.resid_post" for i in range(layers)]

            def traced() -> None:
                rm.run(ids, record="blocks.*.resid_post", outputs=[])

            def probed() -> None:
                rm.forward(ids, probes=[nt.probe(p, nt.Record()) for p in residuals], outputs=[])
                rm.recordings()
                rm.clear_recordings()

            _, trace = rm.run(ids, record="blocks.*.resid_post", outputs=[])
            probed()
            rm.forward(ids, probes=[nt.probe(p, nt.Record()) for p in residuals], outputs=[])
            recorded = rm.recordings()
            rm.clear_recordings()
            assert all(torch.equal(trace[p], recorded[p]["record"][0]) for p in residuals)
            times: dict[str, list[float]] = {"run": [], "probes + recordings()": []}
            for _ in range(60):  # a, b, b, a: a drifting load cancels out
                for name, fn in (("run", traced), ("probes + recordings()", probed)):
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
                for name, fn in (("probes + recordings()", probed), ("run", traced)):
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
            run_ms, probes_ms = (statistics.median(times[k]) * 1000 for k in ("run", "probes + recordings()"))
            print(
                f"trace of {layers} residuals, [1, 64]: rm.run {run_ms:.2f} ms, the same Record probes and "
                f"recordings() {probes_ms:.2f} ms (x{run_ms / probes_ms:.2f})"
            )


def experiment_bytes(rounds: int = 3) -> None:
    """Remote activation patching on SmolLM2, 30 layers x 2 positions: the built-in metric read on the server
    (``nt.LogitDiff``) against the same metric as a function of the logits, which ships every row's logits."""
    with serving.Server("smollm2-135m", env=ONE_THREAD) as server:
        with nt.connect(server.url) as rm:
            received = [0]
            post = rm._http.post

            def counted(*args, **kwargs):
                response = post(*args, **kwargs)
                received[0] += len(response.content)
                return response

            rm._http.post = counted
            paris, rome = 7042, 7268
            points = "blocks.*.resid_post"
            clean, corrupt = "The capital of France is", "The capital of Italy is"

            def logit_diff(logits):
                return logits[:, paris] - logits[:, rome]

            variants = {
                "nt.LogitDiff, read on the server": nt.LogitDiff(paris, rome),
                "the same metric as a function": logit_diff,
            }
            times: dict[str, list[float]] = {name: [] for name in variants}
            sizes: dict[str, int] = {}
            tables = {}
            loads = []
            for _ in range(rounds):
                for name, metric in variants.items():
                    received[0] = 0
                    start = time.perf_counter()
                    tables[name] = nt.experiments.activation_patching(rm, clean, corrupt, metric, points, [3, 4]).values
                    times[name].append(time.perf_counter() - start)
                    sizes[name] = received[0]
                    loads.append(os.getloadavg()[0])
            print(
                f"remote activation_patching, SmolLM2, 30 layers x 2 positions (60 rows), load {min(loads):.1f}-"
                f"{max(loads):.1f}, medians of {rounds}:"
            )
            for name in variants:
                print(f"  {name:<36} {sizes[name] / 1e6:8.3f} MB received  {statistics.median(times[name]):6.2f} s")
            first, second = list(tables.values())
            print(f"  largest difference between the tables: {float((first - second).abs().max()):.2e}")
            received[0] = 0
            start = time.perf_counter()
            nt.experiments.causal_trace(rm, clean, "France", " Paris", samples=2)
            print(
                f"remote causal_trace, SmolLM2, 30 layers x 5 positions x 2 samples: {received[0] / 1e6:.3f} MB "
                f"received in {time.perf_counter() - start:.1f} s (load {os.getloadavg()[0]:.1f})"
            )


PARTS = ("overhead", "forward", "generate", "bytes", "trace", "experiments")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("parts", nargs="*", metavar="PART", help=f"any of {', '.join(PARTS)} (default: all)")
    args = parser.parse_args()
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"no part named {', '.join(unknown)}; the parts are {', '.join(PARTS)}")
    wanted = set(args.parts) or set(PARTS)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tiny = save_model(os.path.join(tmp, "tiny"), hidden=64, layers=2, vocab=128)
        small = save_model(os.path.join(tmp, "small"), hidden=256, layers=6, vocab=2048)
        if "overhead" in wanted:
            overhead(tiny)
        if "forward" in wanted:
            for mixed in (False, True):
                throughput(tiny, 128, mixed)
                throughput(small, 2048, mixed)
        if "generate" in wanted:
            throughput(tiny, 128, generate=True)
            throughput(small, 2048, generate=True)
        if "bytes" in wanted:
            wire_bytes(small, 2048, 6)
        if "trace" in wanted:
            trace_cost(small, 2048, 6)
        if "experiments" in wanted:
            experiment_bytes()


if __name__ == "__main__":
    main()
