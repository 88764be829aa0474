"""Parallel collection (torch.distributed, gloo on loopback) against a single-process run with the same settings."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import test_datasets
from neurotap.cli import main
from neurotap.datasets import ActivationDataset

POINTS = "model.layers.0.output,model.layers.1.mlp.mul"
tiny = test_datasets.tiny  # the same model folder and tokenizer as the single-process tests
_paragraphs = test_datasets._paragraphs


@contextlib.contextmanager
def _one_thread():
    """The ranks run one thread each here; the reference does too, so that the float results can match exactly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _arguments(tiny: Path, out: Path, *extra: str) -> list[str]:
    return ["collect", "--model", str(tiny), "--points", POINTS, "--out", str(out), "--seq-len", "32", "--batch", "4",
            "--dtype", "float16", "--quiet", *extra]  # fmt: skip


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_ranks_write_the_single_process_dataset_byte_for_byte(tiny: Path, tmp_path: Path) -> None:
    # all of the bundled corpus: the data runs out inside the last shard, which is short, and 3 ranks share 7 shards
    with _one_thread():
        assert main(_arguments(tiny, tmp_path / "single", "--shard-mb", "0.25")) == 0
    env = {"OMP_NUM_THREADS": "1"}
    with _environment(env):
        assert main(_arguments(tiny, tmp_path / "ranks", "--shard-mb", "0.25", "--ranks", "3")) == 0
    single, ranks = _files(tmp_path / "single"), _files(tmp_path / "ranks")
    assert sorted(ranks) == sorted(single)  # no rank manifests, locks or temporary files left
    assert single == ranks
    manifest = json.loads(single["manifest.json"])
    assert manifest["exhausted"] and len(manifest["shards"]) > 3
    assert manifest["shards"][-1]["sequences"] < manifest["sequences_per_shard"]
    ds = ActivationDataset(tmp_path / "ranks")
    assert torch.equal(ds.read("tokens"), ActivationDataset(tmp_path / "single").read("tokens"))


def _descendants(root: int) -> list[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    found, frontier = [], [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _wait_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        alive = []
        for pid in pids:
            with contextlib.suppress(OSError):
                if (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.append(pid)
        if not alive:
            return
        time.sleep(0.05)


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def test_a_killed_parallel_run_resumes_per_rank_to_the_same_bytes(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = tmp_path / "corpus.jsonl"
    with open(data, "w") as file:
        for repeat in range(30):
            for paragraph in _paragraphs()[repeat % 5 :]:
                file.write(json.dumps({"text": paragraph}) + "\n")
    settings = ("--data", str(data), "--tokens", "150000", "--shard-mb", "0.1")
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "neurotap.cli", *_arguments(tiny, killed, *settings, "--ranks", "2")],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            listed = []
            for rank in (0, 1):
                with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                    listed.append(len(json.loads((killed / f"manifest.rank-{rank}.json").read_text())["shards"]))
            if len(listed) == 2 and min(listed) >= 1:
                break
            time.sleep(0.05)
        tree = _descendants(process.pid)  # torch's launcher starts each rank in a session of its own
        for pid in [process.pid, *tree]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    finally:
        process.wait()
    _wait_gone(tree)  # a dying rank still holds its lock for a moment
    assert process.returncode == -signal.SIGKILL, "the collection finished before it could be killed"
    manifest = json.loads((killed / "manifest.json").read_text())
    assert not manifest["complete"] and not manifest["shards"]  # the shards so far are listed per rank

    assert main(_arguments(tiny, killed, *settings)) == 2  # a single process must not write into it
    assert "parallel collection in progress" in capsys.readouterr().err
    with _environment({"OMP_NUM_THREADS": "1"}):
        assert main(_arguments(tiny, killed, *settings, "--ranks", "2")) == 0
    with _one_thread():
        assert main(_arguments(tiny, tmp_path / "single", *settings)) == 0
    single = _files(tmp_path / "single")
    assert len(single) > 8
    assert _files(killed) == single


def test_two_torchrun_nodes_write_the_single_process_dataset(tiny: Path, tmp_path: Path) -> None:
    """``torchrun --nnodes 2 ... -m neurotap.collect``, two "machines" on loopback sharing the output folder."""
    with _one_thread():
        assert main(_arguments(tiny, tmp_path / "single", "--shard-mb", "0.25")) == 0
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        rendezvous = probe.getsockname()[1]
    node = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{rendezvous}", "--local-addr", "127.0.0.1",
        "-m", "neurotap.collect", *_arguments(tiny, tmp_path / "nodes", "--shard-mb", "0.25")[1:],
    ]  # fmt: skip
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(node, env=env, start_new_session=True) for _ in range(2)]
    try:
        assert [n.wait(timeout=600) for n in nodes] == [0, 0]
    finally:
        for n in nodes:
            if n.poll() is None:
                os.killpg(n.pid, signal.SIGKILL)
                n.wait()
    assert _files(tmp_path / "nodes") == _files(tmp_path / "single")
