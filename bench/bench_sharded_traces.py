"""Sharded serving: what a request that traces on every rank costs in bytes moved and in latency.

A tiny random Llama (8 layers, hidden size 128) over 2 and 3 ranks gets
``rm.run(ids, record="model.layers.*.mlp.mul")`` on ``[8, 128]`` token ids: every
rank traces its own layers' MLP products (2 MiB each) and the values come back to
the client. It reports the median latency and, from each rank's
``/proc/PID/io`` (``wchar``: every byte the process wrote, sockets included), the
bytes each rank wrote per request.

``--compare SRC`` also starts the same servers from another source tree (the
``src`` folder of an older checkout) and sends the requests to both in turn,
round after round, so that both see the same machine load.

Run: python bench/bench_sharded_traces.py [--ranks 2,3] [--repeats 7] [--compare OLD/src]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import neurotap as nt
from bench_sharded import ONE_THREAD, tiny_model  # the same tiny model and threads

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import serving  # noqa: E402  (the tests' harness: start a server, wait until it listens, stop it)

POINTS = "model.layers.*.mlp.mul"


class Server(serving.Server):
    stop_timeout = 60.0

    def __init__(self, model: str, ranks: int, source: str | None) -> None:
        env = ONE_THREAD if source is None else {**ONE_THREAD, "PYTHONPATH": source}
        super().__init__(model, "--ranks", str(ranks), env=env)
        self.remote = nt.connect(self.url, timeout=600)
        self.pids = [row["pid"] for row in self.remote.info()["ranks"]]

    def written(self) -> list[int]:
        """Bytes each rank's process has written so far."""
        counts = []
        for pid in self.pids:
            with open(f"/proc/{pid}/io") as io:
                counts.append(next(int(line.split()[1]) for line in io if line.startswith("wchar:")))
        return counts

    def stop(self) -> int:
        self.remote.close()
        return super().stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", default="2,3")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--compare", help="the src folder of another checkout, measured alongside this one")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ids = torch.randint(0, 512, (8, 128), generator=torch.Generator().manual_seed(0))
    sources = {"this": None, **({"compare": args.compare} if args.compare else {})}
    with tempfile.TemporaryDirectory() as folder:
        model = tiny_model(folder)
        local = nt.load(model)
        _, expected = local.run(ids, record=POINTS)
        for ranks in [int(n) for n in args.ranks.split(",")]:
            servers = {name: Server(model, ranks, source) for name, source in sources.items()}
            try:
                times: dict[str, list[float]] = {name: [] for name in servers}
                wrote: dict[str, list[list[int]]] = {name: [] for name in servers}
                for server in servers.values():  # once each, checked, before any is timed
                    _, trace = server.remote.run(ids, record=POINTS)
                    for point in expected.points:
                        torch.testing.assert_close(trace[point], expected[point], rtol=1e-5, atol=1e-5)
                for _ in range(args.repeats):
                    for name, server in servers.items():
                        before = server.written()
                        start = time.perf_counter()
                        server.remote.run(ids, record=POINTS)
                        times[name].append(time.perf_counter() - start)
                        wrote[name].append([a - b for a, b in zip(server.written(), before)])
                for name in servers:
                    per_rank = [statistics.median(w[r] for w in wrote[name]) / 2**20 for r in range(ranks)]
                    print(
                        f"{ranks} ranks, {name}: {statistics.median(times[name]) * 1e3:.1f} ms median, "
                        f"MiB written per request by rank: {', '.join(f'{m:.2f}' for m in per_rank)} "
                        f"(sum {sum(per_rank):.2f})"
                    )
                if len(servers) == 2:
                    ratio = statistics.median(times["this"]) / statistics.median(times["compare"])
                    print(f"{ranks} ranks: this / compare latency = {ratio:.3f}")
            finally:
                for server in servers.values():
                    server.stop()


if __name__ == "__main__":
    main()
