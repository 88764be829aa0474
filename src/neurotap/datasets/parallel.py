"""Parallel collection: several processes (ranks) of torch.distributed write one dataset folder.

Shard ``i`` of the dataset a single process would write is written by rank
``i % world_size``: every rank packs the same deterministic token stream, skips
the sequences of the other ranks' shards (packing is cheap next to the forward) and
runs the model on its own. Each rank lists its finished shards in its own
``manifest.rank-<r>.json``, so a killed run resumes per rank; when all are done,
rank 0 merges them into ``manifest.json`` and removes them. The result is the
folder a single process writes with the same settings, byte for byte.

Ranks talk over torch.distributed (gloo) only to agree that every rank set up and
finished without an error, so that none waits forever on a failed one.
``launch`` starts the ranks on this machine with torch.distributed's own launcher,
on the loopback interface; across machines, run
``torchrun ... -m neurotap.collect ...`` with a shared output folder.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .collect import (
    RANK_MANIFEST,
    _check_shapes,
    _Collection,
    _lock_file,
    _locked,
    _model_shapes,
    _new_manifest,
    _open_manifest,
    _verify_listed_shards,
    collect,
    packer_after,
    prepare,
    shard_intact,
)
from .corpus import Packer, estimate_tokens
from .format import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    CorruptDatasetError,
    DatasetError,
    read_manifest,
    write_atomic,
    write_manifest,
)
from .reader import ActivationDataset

DISTRIBUTED_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """Whether this process is one rank of a torch.distributed launch (torchrun sets these)."""
    return all(name in os.environ for name in DISTRIBUTED_ENV) and int(os.environ["WORLD_SIZE"]) > 1


def launch(arguments: list[str], ranks: int) -> int:
    """Run ``neurotap collect <arguments>`` as ``ranks`` processes on this machine; their exit status."""
    if ranks < 1:
        raise DatasetError(f"--ranks must be at least 1 (got {ranks})")
    with socket.socket() as probe:  # a free port on loopback for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc-per-node={ranks}",
        "--master-addr=127.0.0.1",
        f"--master-port={port}",
        "--max-restarts=0",
        "-m",
        "neurotap.collect",
        *arguments,
    ]
    # loopback only: gloo would otherwise pick the interface the host name resolves to
    environment = {**os.environ, "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}
    # the machine's cores shared out between the ranks (torchrun would give each one thread, and say so)
    environment.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks)))
    return subprocess.call(command, env=environment)


def rank_manifest_name(rank: int) -> str:
    return f"manifest.rank-{rank}.json"


def collect_rank(model: Any, points: Any, out: str | Path, **options: Any) -> ActivationDataset | None:
    """This rank's part of a parallel :func:`~neurotap.datasets.collect` (the same arguments); rank 0 returns
    the merged dataset."""
    import torch.distributed as dist

    arguments = inspect.signature(collect).bind(model, points, out, **options)
    arguments.apply_defaults()
    settings = dict(arguments.arguments)
    progress = settings.pop("progress")
    settings.pop("model")
    dist.init_process_group("gloo")
    try:
        return _Rank(dist, dist.get_rank(), dist.get_world_size()).run(model, settings, progress)
    finally:
        dist.destroy_process_group()


class _Rank:
    def __init__(self, dist: Any, rank: int, world_size: int) -> None:
        self.dist, self.rank, self.world_size = dist, rank, world_size

    def agree(self, error: BaseException | None) -> None:
        """Every rank passes here together; if any failed, all raise (the others name the failed rank)."""
        results: list[Any] = [None] * self.world_size
        self.dist.all_gather_object(results, None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        failed = [(rank, message) for rank, message in enumerate(results) if message is not None]
        if failed:
            rank, message = failed[0]
            raise DatasetError(f"rank {rank} of the parallel collection failed ({message}); this rank stops too")

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        try:
            yield
        except Exception as error:  # noqa: BLE001 - every rank must hear of it before any raises
            self.agree(error)
        else:
            self.agree(None)

    def run(self, model: Any, settings: dict[str, Any], progress: bool) -> ActivationDataset | None:
        with self.step():
            job = prepare(model, **settings)
        folder = job.folder
        with contextlib.ExitStack() as stack:
            with self.step():
                if self.rank == 0:  # the folder, its lock and its manifest, as a single process makes them
                    stack.enter_context(_locked(folder))
                    manifest = _open_manifest(folder, job.settings)
                    if manifest is None:
                        shapes = _model_shapes(job.runner, job.documents(), job.tokenizer, job.settings["seq_len"])
                        write_manifest(folder, _new_manifest(job.settings, shapes))
            with self.step():
                if self.rank:
                    stack.enter_context(_lock_file(folder / f".lock.rank-{self.rank}", folder))
                manifest = _open_manifest(folder, job.settings)
                if not manifest["complete"]:
                    shapes = _model_shapes(job.runner, job.documents(), job.tokenizer, job.settings["seq_len"])
                    _check_shapes(folder, manifest, shapes)
                    _verify_listed_shards(folder, manifest)
                    work = _Work(folder, manifest, self.rank, self.world_size, job, progress)
            if not manifest["complete"]:
                with self.step():
                    work.run()
                with self.step():
                    if self.rank == 0:
                        merged = _merge(folder, manifest, self.world_size)
                if self.rank == 0 and progress:
                    print(
                        f"dataset {folder}: {merged['tokens']:,} tokens in {len(merged['shards'])} shards from "
                        f"{self.world_size} ranks",
                        file=sys.stderr,
                    )
        return ActivationDataset(folder) if self.rank == 0 else None


class _Work:
    """One rank's shards: ``rank``, ``rank + world_size``, ... of the single-process layout."""

    def __init__(
        self, folder: Path, manifest: dict[str, Any], rank: int, world_size: int, job: Any, progress: bool
    ) -> None:
        self.folder, self.manifest, self.rank, self.world_size, self.job = folder, manifest, rank, world_size, job
        self.progress = progress and rank == 0
        settings = manifest["settings"]
        self.seq_len = settings["seq_len"]
        self.per_shard = manifest["sequences_per_shard"]
        requested = settings["tokens"]
        self.total = None if requested is None else -(-requested // self.seq_len)
        self.path = folder / rank_manifest_name(rank)
        self.mine = self._read_own()

    def _read_own(self) -> dict[str, Any]:
        """This rank's manifest (made if new), its shards checked against their files."""
        listed = len(self.manifest["shards"])
        fresh = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "rank": self.rank,
            "world_size": self.world_size,
            "settings": self.manifest["settings"],
            "shards": [],
            "exhausted": False,
        }
        others = [int(m[1]) for p in self.folder.iterdir() if (m := RANK_MANIFEST.fullmatch(p.name)) and int(m[1]) >= 1]
        if others and max(others) >= self.world_size:
            raise DatasetError(
                f"{self.folder} holds a parallel collection started with more ranks ({max(others) + 1} or more); "
                "resume it with as many"
            )
        identity = {key: fresh[key] for key in ("format", "format_version", "rank", "world_size", "settings")}
        if not self.path.exists():
            mine = fresh
        else:
            try:
                mine = json.loads(self.path.read_text())
            except (ValueError, UnicodeDecodeError) as error:
                raise CorruptDatasetError(
                    f"{self.path} is not valid JSON ({error}); delete it to have this rank write its shards again"
                ) from None
            if not isinstance(mine, dict) or {key: mine.get(key) for key in identity} != identity:
                raise DatasetError(
                    f"{self.path} belongs to another parallel collection (other settings, rank or world size); "
                    "resume with the same settings and --ranks, or delete the rank manifests to start the ranks over"
                )
            if not isinstance(mine.get("shards"), list):
                raise CorruptDatasetError(f"{self.path} has no list of shards; delete it to redo this rank's shards")
        kept = []
        for entry in mine.get("shards", []):
            index = entry.get("index") if isinstance(entry, dict) else None
            if not isinstance(index, int) or index % self.world_size != self.rank or index < listed:
                raise CorruptDatasetError(f"{self.path} lists a shard that is not this rank's: {entry!r}")
            if not shard_intact(self.folder, self.manifest, entry, self.path, set()):
                break  # it, and this rank's shards after it, are written again
            kept.append(entry)
        mine["shards"] = kept
        mine["exhausted"] = bool(mine.get("exhausted")) and len(kept) == len(mine.get("shards", kept))
        self._clear_leftovers({entry["index"] for entry in kept}, listed)
        return mine

    def _clear_leftovers(self, kept: set[int], listed: int) -> None:
        for path in self.folder.iterdir():
            name = path.name.lstrip(".")
            if not name.startswith("shard-"):
                if path.name == f".{self.path.name}.tmp":
                    path.unlink()
                continue
            try:
                index = int(name[len("shard-") :].split(".")[0])
            except ValueError:
                continue
            mine = index % self.world_size == self.rank and index >= listed
            if mine and (path.name.startswith(".") or index not in kept):
                path.unlink()

    def _packer(self) -> tuple[Packer, int]:
        """A packer where this rank carries on, and the shard index it stands at."""
        job = self.job
        listed = [(entry, self.folder / MANIFEST, n) for n, entry in enumerate(self.manifest["shards"])]
        listed += [(entry, self.path, n) for n, entry in enumerate(self.mine["shards"])]
        if not listed:
            return Packer(job.documents(), job.tokenizer, self.seq_len), 0
        last, where, position = max(listed, key=lambda found: found[0]["index"])
        packer = packer_after(self.folder, self.manifest, last, job.documents(), job.tokenizer, where, position)
        return packer, last["index"] + 1

    def _share(self) -> int:
        """The tokens this rank writes in all, from the count asked for or else from the corpus size."""
        sequences = self.total
        if sequences is None:
            job = self.job
            sequences = estimate_tokens(job.sources, job.tokenizer, self.seq_len, job.settings["text_field"])
            sequences //= self.seq_len
        starts = range(self.rank * self.per_shard, sequences, self.world_size * self.per_shard)
        return sum(min(self.per_shard, sequences - first) for first in starts) * self.seq_len

    def run(self) -> None:
        if self.mine["exhausted"]:
            return
        packer, index = self._packer()
        collection = _Collection(self.folder, self.manifest, self.job.runner, packer, False)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            done = sum(entry["tokens"] for entry in self.mine["shards"])
            bar = tqdm(
                total=self._share(), initial=done, unit="tok", unit_scale=True, file=sys.stderr,
                desc=f"collect, rank 0 of {self.world_size}" + (" (estimated)" if self.total is None else ""),
            )  # fmt: skip
        try:
            with self.job.runner.active():
                while True:
                    first = index * self.per_shard
                    wanted = self.per_shard if self.total is None else min(self.per_shard, self.total - first)
                    if wanted <= 0:
                        return
                    if index % self.world_size != self.rank:
                        if len(packer.take(wanted).tokens) < wanted:
                            return  # the data ends in another rank's shard
                        index += 1
                        continue
                    entry = collection.write_shard(index, wanted, first * self.seq_len, bar)
                    if entry is not None:
                        self.mine["shards"].append(entry)
                    if entry is None or entry["sequences"] < wanted:
                        self.mine["exhausted"] = True
                    write_atomic(self.path, (json.dumps(self.mine, indent=1) + "\n").encode())
                    if self.mine["exhausted"]:
                        return
                    index += 1
        finally:
            if bar is not None:
                bar.close()


def _merge(folder: Path, manifest: dict[str, Any], world_size: int) -> dict[str, Any]:
    """Fold every rank's manifest into ``manifest.json``, as the single-process run would have written it."""
    entries = list(manifest["shards"])
    exhausted = False
    paths = [folder / rank_manifest_name(rank) for rank in range(world_size)]
    for path in paths:
        if path.exists():
            mine = json.loads(path.read_text())
            entries += mine["shards"]
            exhausted = exhausted or mine["exhausted"]
    entries.sort(key=lambda e: e["index"])
    if [e["index"] for e in entries] != list(range(len(entries))):
        raise CorruptDatasetError(
            f"the ranks' manifests in {folder} do not list shards 0 to {len(entries) - 1} each once; run the same "
            "command again to write the missing ones"
        )
    merged = {**manifest, "shards": entries, "tokens": sum(e["tokens"] for e in entries)}
    merged["complete"], merged["exhausted"] = True, exhausted
    write_manifest(folder, merged)
    read_manifest(folder)  # the whole schema: positions chain, rows add up, the counts are those asked for
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return merged
