"""Collection: run a model over packed text and write the values at some points to shards.

See :mod:`neurotap.datasets.format` for what is written and how a killed run resumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import NeurotapError
from ..model import Model
from ..points import is_pattern, matching, ordered_names, unknown_point
from ..probes import Record, probe
from .corpus import (
    Document,
    Packed,
    Packer,
    Source,
    estimate_tokens,
    read_documents,
    resolve_sources,
    tokenizer_description,
)
from .format import (
    DTYPES,
    FORMAT,
    FORMAT_VERSION,
    LOCK,
    MANIFEST,
    METADATA,
    RESERVED,
    ROW_CHAR_END,
    ROW_CHAR_START,
    ROW_DOCUMENT,
    TEXT_CHAR_BASE,
    TEXT_DOCUMENT,
    TEXT_OFFSETS,
    TEXT_UTF8,
    TOKENS,
    CorruptDatasetError,
    CorruptShardError,
    DatasetError,
    open_shard,
    read_manifest,
    sequences_per_shard,
    sha256_bytes,
    sha256_file,
    shard_name,
    write_atomic,
    write_manifest,
)
from .reader import ActivationDataset

_RECORD_KEY = "collect"


def collect(
    model: Any,
    points: Sequence[str] | str,
    out: str | Path,
    *,
    data: str | Path | Sequence[str | Path] | None = None,
    text_field: str = "text",
    seq_len: int = 128,
    batch_size: int = 8,
    tokens: int | None = None,
    dtype: str = "float32",
    shard_mb: float = 256.0,
    tokenizer: Any = None,
    model_name: str | None = None,
    progress: bool = True,
) -> ActivationDataset:
    """Write the values at ``points`` for every token of ``data`` to the folder ``out``.

    ``model`` is an ``nt.Model`` (or a remote model with the same ``forward``,
    ``recordings`` and ``clear_recordings``); ``data`` is text, JSON lines or Parquet
    files or folders of them (default: the bundled corpus), packed into sequences
    of ``seq_len`` tokens and run ``batch_size`` sequences at a time until
    ``tokens`` tokens (default: all of the data). Values are stored as ``dtype``
    in shards of about ``shard_mb`` MiB. Run again with the same arguments after
    an interruption and it carries on where the last complete shard ended.
    """
    job = prepare(
        model, tokenizer, model_name, points=points, out=out, data=data, text_field=text_field, seq_len=seq_len,
        batch_size=batch_size, tokens=tokens, dtype=dtype, shard_mb=shard_mb,
    )  # fmt: skip
    folder, runner, settings, documents, tokenizer = job.folder, job.runner, job.settings, job.documents, job.tokenizer
    try:
        with _locked(folder):
            refuse_parallel_leftovers(folder)
            manifest = _open_manifest(folder, settings)
            resumed = manifest is not None
            if manifest is None:
                manifest = _new_manifest(settings, _model_shapes(runner, documents(), tokenizer, seq_len))
                write_manifest(folder, manifest)
            _verify_listed_shards(folder, manifest)
            _clear_leftovers(folder, len(manifest["shards"]))
            if not manifest["complete"]:
                if resumed:
                    _check_shapes(folder, manifest, _model_shapes(runner, documents(), tokenizer, seq_len))
                packer = _resume(folder, manifest, documents(), tokenizer)
                expected = None
                if progress and tokens is None:  # a total for the progress bar's ETA
                    expected = estimate_tokens(job.sources, tokenizer, seq_len, text_field)
                _Collection(folder, manifest, runner, packer, progress, expected).run()
            elif progress:
                print(
                    f"{folder} already holds this collection, complete: {manifest['tokens']:,} tokens", file=sys.stderr
                )
    except OSError as error:  # a full disk, a folder made read-only meanwhile: the message says which file
        raise DatasetError(f"collect into {folder} stopped: {error}") from error
    return ActivationDataset(folder)


@dataclasses.dataclass
class Job:
    """A collection's arguments, checked, and what they give: the runner, the settings, the documents."""

    folder: Path
    runner: Any
    settings: dict[str, Any]
    documents: Any  # () -> Iterator[Document], restarted for each pass over the data
    tokenizer: Any
    sources: list[Source]


def prepare(model: Any, tokenizer: Any = None, model_name: str | None = None, **arguments: Any) -> Job:
    """:func:`collect`'s arguments (all but ``progress``; :func:`check_settings` names the rest), checked, and
    what they give."""
    if isinstance(arguments.get("points"), str):
        arguments["points"] = [arguments["points"]]
    sources = check_settings(**arguments)
    points = check_points(model, list(arguments["points"]))
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise DatasetError("collect needs a tokenizer: the model has none, so pass tokenizer=...")
    runner = _runner(model, points, arguments["dtype"])  # before any folder is made: nothing left behind
    check_seq_len(arguments["seq_len"], _max_positions(model))
    settings = {
        "model": model_name or _model_label(model),
        "points": points,
        **{name: arguments[name] for name in ("dtype", "seq_len", "batch_size", "tokens", "shard_mb", "text_field")},
        "sources": [source.describe() for source in sources],
        "tokenizer": tokenizer_description(tokenizer),
    }
    settings = json.loads(json.dumps(settings))  # as the manifest will hold them: tuples become lists
    documents = functools.partial(read_documents, sources, arguments["text_field"])
    return Job(Path(arguments["out"]), runner, settings, documents, tokenizer, sources)


RANK_MANIFEST = re.compile(r"manifest\.rank-(\d+)\.json")


def refuse_parallel_leftovers(folder: Path) -> None:
    """A single process must not write into a parallel collection that is still in progress."""
    if not folder.is_dir():
        return
    ranks = sorted(p.name for p in folder.iterdir() if RANK_MANIFEST.fullmatch(p.name))
    if ranks:
        raise DatasetError(
            f"{folder} holds a parallel collection in progress ({', '.join(ranks[:3])}); resume it with the same "
            "--ranks (or torchrun world size) it was started with"
        )


def check_out_folder(folder: Path) -> None:
    """Refuse an output path that collect could not write a dataset folder at, before any model is loaded."""
    if folder.exists() and not folder.is_dir():
        raise DatasetError(
            f"the output {folder} is a file, not a folder; give a new or existing folder for the dataset"
        )
    existing = folder
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise DatasetError(
            f"the output {folder} lies under {existing}, which is a file, not a folder; give a path in a folder"
        )
    # a real write, not os.access: a read-only mount, or a folder that even root may not write in, shows only so
    try:
        descriptor, probe = tempfile.mkstemp(dir=existing, prefix=".neurotap-write-check-")
    except OSError as error:
        reason = error.strerror or str(error)
        if existing == folder:
            raise DatasetError(
                f"cannot write in the output folder {folder} ({reason}); give one you can write to"
            ) from None
        raise DatasetError(
            f"cannot make the output folder {folder}: {existing} is not writable ({reason}); give a folder you can "
            "write to"
        ) from None
    os.close(descriptor)
    os.unlink(probe)


def check_settings(
    points: list[str],
    out: str | Path,
    data: Any,
    text_field: str,
    seq_len: int,
    batch_size: int,
    tokens: int | None,
    dtype: str,
    shard_mb: float,
) -> list[Source]:
    """Check what a collection can be checked for without its model; the data's sources.

    Sizes and dtype, the output folder, and the data: every file exists, is of a
    known kind, and yields its first document (readable, UTF-8, the text field there).
    """
    _check_arguments(points, seq_len, batch_size, tokens, dtype, shard_mb)
    check_out_folder(Path(out))
    sources = resolve_sources(data)
    for source in sources:
        try:
            next(read_documents([source], text_field), None)
        except OSError as error:
            raise DatasetError(f"cannot read the data file {source.path}: {error.strerror or error}") from None
        except UnicodeDecodeError as error:
            raise DatasetError(f"{source.path} is not UTF-8 text: {error}") from None
    return sources


def check_seq_len(seq_len: int, positions: Any) -> None:
    """Refuse sequences longer than the model's positions (``max_position_embeddings``), where it says."""
    if isinstance(positions, int) and not isinstance(positions, bool) and seq_len > positions:
        raise DatasetError(
            f"seq_len {seq_len} is longer than the model's {positions} positions (max_position_embeddings in its "
            f"config); give a seq_len (--seq-len) of at most {positions}"
        )


def _max_positions(model: Any) -> Any:
    if isinstance(model, Model):
        return getattr(getattr(model.module, "config", None), "max_position_embeddings", None)
    info = getattr(model, "info", None)  # a remote model: the server says, so that no folder is made for nothing
    if not callable(info):
        return None
    try:
        facts = info()
    except NeurotapError:
        return None  # the server refuses such inputs itself
    return facts.get("max_position_embeddings") if isinstance(facts, dict) else None


def check_points(model: Any, points: list[str]) -> list[str]:
    """The point names ``points`` stand for, patterns as their matches in execution order.

    A local model's names are checked against its inventory, so that a name it lacks (or
    a pattern that matches nothing) fails with the closest names before anything runs; a
    remote model's server checks them itself.
    """
    local = isinstance(model, Model)
    if not local and not any(is_pattern(point) for point in points):
        return points
    names = ordered_names(model.inventory()) if local else model.points().names()  # aliases too, locally
    known = set(names)
    expanded = []
    for point in points:
        found = matching(point, names) if is_pattern(point) else [point]
        if not found or (local and found[0] not in known):
            raise unknown_point(point, names)
        expanded.extend(found)
    return list(dict.fromkeys(expanded))


def _check_arguments(points: list[str], seq_len: int, batch_size: int, tokens: int | None, dtype: str, mb: float):
    if not points or not all(isinstance(p, str) and p for p in points):
        raise DatasetError("give at least one point name, e.g. points=['model.layers.6.output']")
    if len(set(points)) != len(points):
        raise DatasetError(f"a point is named twice in {points}")
    for point in points:
        if point == TOKENS or point.startswith(RESERVED[1:]):
            raise DatasetError(f"the point name {point!r} clashes with the dataset's own entries")
    if seq_len < 2:
        raise DatasetError(f"seq_len must be at least 2 (got {seq_len})")
    if batch_size < 1:
        raise DatasetError(f"batch_size must be at least 1 (got {batch_size})")
    if tokens is not None and tokens < 1:
        raise DatasetError(f"tokens must be positive, or None for all the data (got {tokens})")
    if dtype not in DTYPES:
        raise DatasetError(f"dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    if not mb > 0:
        raise DatasetError(f"shard_mb must be positive (got {mb})")


def _model_label(model: Any) -> str:
    module = getattr(model, "module", None)
    config = getattr(module, "config", None)
    return getattr(config, "_name_or_path", "") or type(module if module is not None else model).__name__


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold the folder's lock file, so that two runs never write into one dataset.

    The lock file goes again on the way out, and so do the folders made for it while
    they are empty: a run that fails before writing its manifest leaves nothing behind.
    """
    made = []
    missing = folder
    while not os.path.lexists(missing) and missing != missing.parent:
        made.append(missing)
        missing = missing.parent
    try:
        for path in reversed(made):
            path.mkdir(exist_ok=True)
        with _lock_file(folder / LOCK, folder):
            yield
    finally:
        for path in made:  # innermost first; rmdir refuses a folder that holds anything
            with contextlib.suppress(OSError):
                path.rmdir()


@contextlib.contextmanager
def _lock_file(path: Path, folder: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # no advisory locks on this platform
        fcntl = None
    busy = f"another collect is writing to {folder}; wait for it or pick another folder"
    for _ in range(3):
        handle = open(path, "a")
        if fcntl is None:
            break
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise DatasetError(busy) from None
        if _same_file(path, handle):
            break
        handle.close()  # its holder removed it as we opened it: lock the file that is there now
    else:
        raise DatasetError(busy)
    try:
        try:
            yield
        finally:
            # removed while still held, so that no later run can lock a file that is gone
            with contextlib.suppress(OSError):
                path.unlink()
    finally:
        handle.close()


def _same_file(path: Path, handle: Any) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return False


def _open_manifest(folder: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    if not (folder / MANIFEST).exists():
        strangers = [p.name for p in folder.iterdir() if not p.name.startswith(".")]
        if strangers:
            raise DatasetError(
                f"{folder} is not empty ({', '.join(sorted(strangers)[:5])}) and holds no dataset to resume; "
                "collect into a new or empty folder"
            )
        return None
    manifest = read_manifest(folder)
    previous = manifest["settings"]
    changed = [key for key in sorted(set(previous) | set(settings)) if previous.get(key) != settings.get(key)]
    if changed:
        details = "; ".join(f"{key}: {previous.get(key)!r} then, {settings.get(key)!r} now" for key in changed[:3])
        raise DatasetError(
            f"{folder} holds a collection made with other settings ({details}); rerun with the same settings to "
            "resume it, or collect into a new folder"
        )
    return manifest


def _model_shapes(runner: Any, documents: Iterator[Document], tokenizer: Any, seq_len: int) -> dict[str, list[int]]:
    """The per-token shape of each point, from one forward over the first sequence of the data."""
    first = Packer(documents, tokenizer, seq_len).take(1)
    if not len(first.tokens):
        raise DatasetError(f"the data holds fewer than {seq_len} tokens: not one sequence of --seq-len fits")
    shapes = runner.shapes(torch.from_numpy(first.tokens).long())
    return {point: list(shape) for point, shape in shapes.items()}


def _check_shapes(folder: Path, manifest: dict[str, Any], shapes: dict[str, list[int]]) -> None:
    # the buffers are sized from the manifest, so it must not claim other shapes than the model's
    for point, shape in shapes.items():
        if manifest["shapes"][point] != shape:
            raise CorruptDatasetError(
                f"the manifest {folder / MANIFEST} records shapes[{point!r}] = {manifest['shapes'][point]}, but the "
                f"model's value there has the per-token shape {shape}: the manifest was edited, or this is not the "
                "model it was collected with. Collect into a new folder"
            )


def _new_manifest(settings: dict[str, Any], shapes: dict[str, list[int]]) -> dict[str, Any]:
    from .. import __version__

    per_shard = sequences_per_shard(
        shapes, settings["dtype"], settings["seq_len"], settings["batch_size"], settings["shard_mb"]
    )
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "settings": settings,
        "shapes": shapes,
        "sequences_per_shard": per_shard,
        "special_tokens": {"bos": settings["tokenizer"]["bos"], "eos": settings["tokenizer"]["eos"]},
        "shards": [],
        "tokens": 0,
        "complete": False,
        "exhausted": False,
    }


def _verify_listed_shards(folder: Path, manifest: dict[str, Any]) -> None:
    seen: set[tuple[int, int]] = set()
    for number, entry in enumerate(manifest["shards"]):
        if not shard_intact(folder, manifest, entry, folder / MANIFEST, seen):
            # everything from here on is written again
            del manifest["shards"][number:]
            manifest["tokens"] = sum(s["tokens"] for s in manifest["shards"])
            manifest["complete"] = manifest["exhausted"] = False
            return


def shard_intact(
    folder: Path, manifest: dict[str, Any], entry: dict[str, Any], listed_in: Path, seen: set[tuple[int, int]]
) -> bool:
    """Whether the shard ``entry`` (listed in ``listed_in``) is on disk as it records; False if it is missing.

    ``seen`` gathers the files opened, as :func:`~.format.open_shard` has it.
    """
    view = {**manifest, "shards": [entry] * (entry["index"] + 1)}  # open_shard reads shards[index] only
    if open_shard(folder, view, entry["index"], seen) is None:
        return False
    path = folder / entry["file"]
    if sha256_file(path) != entry["sha256"]:
        raise CorruptShardError(
            f"shard {path} does not match the sha256 in {listed_in.name}: it was damaged. Delete it and run the "
            "same command again to rewrite it and the shards after it"
        )
    return True


def _resume(folder: Path, manifest: dict[str, Any], documents: Iterator[Document], tokenizer: Any) -> Packer:
    """A packer at the end of the last listed shard (see :func:`packer_after`)."""
    shards = manifest["shards"]
    if not shards:
        return Packer(documents, tokenizer, manifest["settings"]["seq_len"])
    return packer_after(folder, manifest, shards[-1], documents, tokenizer, folder / MANIFEST, len(shards) - 1)


def packer_after(
    folder: Path,
    manifest: dict[str, Any],
    entry: dict[str, Any],
    documents: Iterator[Document],
    tokenizer: Any,
    listed_in: Path,
    position: int,
) -> Packer:
    """A packer at the end of the shard ``entry`` (``shards[position]`` of the manifest ``listed_in``), checked
    by packing that shard again.

    Nothing else vouches for the ``start`` and ``end`` positions a restart carries on
    from; the shard's tokens (already checked against its sha256) and the position
    the packer reaches must come out as recorded.
    """
    start = (entry["start"]["document"], entry["start"]["token"])
    packer = Packer(documents, tokenizer, manifest["settings"]["seq_len"], start=start)
    packed = packer.take(entry["sequences"])
    view = {**manifest, "shards": [entry] * (entry["index"] + 1)}  # open_shard reads shards[index] only
    stored = open_shard(folder, view, entry["index"], set()).array(TOKENS)
    end = {"document": packer.position[0], "token": packer.position[1]}
    if packed.tokens.size != stored.size or not np.array_equal(packed.tokens.reshape(-1), stored):
        field, found, expected = f"shards[{position}].start", entry["start"], "the position its tokens were packed from"
    elif end != entry["end"]:
        field, found, expected = f"shards[{position}].end", entry["end"], f"{end}, where packing its sequences ends"
    else:
        return packer
    raise CorruptDatasetError(
        f"the manifest {listed_in} is damaged or was edited: {field} is {found}, expected {expected}; a resumed "
        f"collection would repeat or skip text. Restore {listed_in.name}, or collect again into a new folder"
    )


def _clear_leftovers(folder: Path, listed: int) -> None:
    """Drop temporary files and shards that a killed run wrote but did not yet list."""
    for path in folder.iterdir():
        shard = re.fullmatch(r"shard-(\d+)\.safetensors", path.name)
        if (path.name.startswith(".") and path.name.endswith(".tmp")) or (shard and int(shard[1]) >= listed):
            path.unlink()


# -- running the model ------------------------------------------------------------------------------


class _StopForward(NeurotapError):
    """Raised after the last point has fired: nothing later in the forward is needed."""


class _Sink:
    """A probe that copies the value at its point into a slot of a preallocated buffer."""

    def __init__(self, point: str) -> None:
        self.point = point
        self.target: torch.Tensor | None = None
        self.stops = False
        self.fired = 0

    def __call__(self, ctx: Any, value: Any) -> None:
        target = self.target
        if target is None:
            return
        if not isinstance(value, torch.Tensor) or tuple(value.shape[:2]) != tuple(target.shape[:2]):
            raise DatasetError(_shape_message(self.point, value, target.shape[:2]))
        if self.fired:
            raise DatasetError(f"the point {self.point!r} fires more than once per forward; collect cannot store it")
        target.copy_(value.detach())
        self.fired += 1
        if self.stops:
            raise _StopForward()


def _shape_message(point: str, value: Any, leading: Sequence[int]) -> str:
    got = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"
    return (
        f"the value at {point!r} is {got}; collect stores values shaped [batch, sequence, ...] "
        f"(here [{leading[0]}, {leading[1]}, ...]); pick such a point or narrow it, e.g. {point + '[0]'!r}"
    )


class _LocalRunner:
    """An ``nt.Model`` in this process: probes copy straight into the shard buffers, and the
    forward stops once the last point has fired."""

    def __init__(self, model: Model, points: list[str], dtype: torch.dtype) -> None:
        self.model = model
        self.points = points
        self.dtype = dtype
        self.sinks = {point: _Sink(point) for point in points}
        order = {name: number for number, name in enumerate(ordered_names(model.inventory()))}  # check_points knew them
        self.sinks[max(points, key=order.__getitem__)].stops = True
        config = getattr(model.module, "config", None)
        self.kwargs = {"use_cache": False} if getattr(config, "use_cache", None) is not None else {}
        parameter = next(iter(model.module.parameters()), None)
        self.device = parameter.device if parameter is not None else torch.device("cpu")

    def shapes(self, ids: torch.Tensor) -> dict[str, tuple[int, ...]]:
        seen: dict[str, list[Any]] = {point: [] for point in self.points}
        probes = [probe(point, lambda ctx, value: seen[ctx.point].append(value)) for point in self.points]
        with torch.inference_mode():
            self.model.forward(ids.to(self.device), probes=probes, **self.kwargs)
        return {point: _per_token_shape(point, seen[point], ids.shape) for point in self.points}

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        with self.model.patch({point: sink for point, sink in self.sinks.items()}):
            yield

    def run(self, ids: torch.Tensor, targets: dict[str, torch.Tensor]) -> None:
        for point, sink in self.sinks.items():
            sink.target, sink.fired = targets[point], 0
        try:
            with torch.inference_mode():
                self.model.forward(ids.to(self.device), **self.kwargs)
        except _StopForward:
            pass
        finally:
            for sink in self.sinks.values():
                sink.target = None
        silent = [point for point, sink in self.sinks.items() if not sink.fired]
        if silent:
            raise DatasetError(f"the point(s) {silent} did not fire during the forward; nothing can be stored for them")


class _RecordingRunner:
    """Any model with ``forward(ids, probes=...)``, ``recordings()`` and ``clear_recordings()``,
    such as a remote one: values come back through ``Record``."""

    def __init__(self, model: Any, points: list[str], dtype: torch.dtype) -> None:
        self.model = model
        self.points = points
        self.dtype = dtype
        self.probes = [probe(point, Record(key=_RECORD_KEY)) for point in points]
        # a remote model need not send back the logits, which would outweigh the recordings
        takes = inspect.signature(model.forward).parameters
        self.kwargs: dict[str, Any] = {"outputs": []} if "outputs" in takes else {}
        if "stop_at" in takes:  # nor run past the last point it stores
            order = {name: number for number, name in enumerate(model.points().names())}
            aliases = model.aliases() if callable(getattr(model, "aliases", None)) else {}
            raw = {point: aliases.get(point, point) for point in points}  # an alias is where its point is
            if all(name in order for name in raw.values()):
                self.kwargs["stop_at"] = max(points, key=lambda point: order[raw[point]])

    def _record(self, ids: torch.Tensor) -> dict[str, Any]:
        self.model.clear_recordings()
        self.model.forward(ids, probes=self.probes, **self.kwargs)
        recorded = self.model.recordings()
        values = {}
        for point in self.points:
            saved = recorded[point].get(_RECORD_KEY) if point in recorded else None
            if not saved:
                raise DatasetError(f"the point {point!r} did not fire during the forward; nothing can be stored")
            if len(saved) > 1:
                raise DatasetError(f"the point {point!r} fires more than once per forward; collect cannot store it")
            values[point] = saved[0]
        self.model.clear_recordings()
        return values

    def shapes(self, ids: torch.Tensor) -> dict[str, tuple[int, ...]]:
        values = self._record(ids)
        return {point: _per_token_shape(point, [values[point]], ids.shape) for point in self.points}

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        yield

    def run(self, ids: torch.Tensor, targets: dict[str, torch.Tensor]) -> None:
        for point, value in self._record(ids).items():
            target = targets[point]
            if not isinstance(value, torch.Tensor) or tuple(value.shape[:2]) != tuple(target.shape[:2]):
                raise DatasetError(_shape_message(point, value, target.shape[:2]))
            target.copy_(torch.as_tensor(value))


def _runner(model: Any, points: list[str], dtype: str) -> _LocalRunner | _RecordingRunner:
    if isinstance(model, Model):
        return _LocalRunner(model, points, DTYPES[dtype])
    if not all(callable(getattr(model, name, None)) for name in ("forward", "recordings", "clear_recordings")):
        raise DatasetError(
            f"collect runs an nt.Model (nt.wrap, nt.load) or a remote model (nt.connect), not a {type(model).__name__}"
        )
    return _RecordingRunner(model, points, DTYPES[dtype])


def _per_token_shape(point: str, saved: list[Any], ids_shape: torch.Size) -> tuple[int, ...]:
    value = saved[0] if saved else None
    if len(saved) != 1:
        raise DatasetError(f"the point {point!r} fired {len(saved)} times in one forward; collect stores one value")
    if not isinstance(value, torch.Tensor) or tuple(value.shape[:2]) != tuple(ids_shape):
        raise DatasetError(_shape_message(point, value, ids_shape))
    if not value.is_floating_point():
        raise DatasetError(f"the value at {point!r} is {value.dtype}; collect stores floating-point values")
    return tuple(value.shape[2:])


# -- the collection loop ----------------------------------------------------------------------------


class _Collection:
    def __init__(
        self,
        folder: Path,
        manifest: dict[str, Any],
        runner: _LocalRunner | _RecordingRunner,
        packer: Packer,
        progress: bool,
        expected: int | None = None,
    ) -> None:
        self.folder = folder
        self.manifest = manifest
        self.runner = runner
        settings = manifest["settings"]
        self.seq_len = settings["seq_len"]
        self.batch = settings["batch_size"]
        self.per_shard = manifest["sequences_per_shard"]
        requested = settings["tokens"]
        self.total_sequences = None if requested is None else -(-requested // self.seq_len)
        self.packer = packer
        rows = self.per_shard * self.seq_len
        dtype = DTYPES[settings["dtype"]]
        self.buffers = {p: torch.empty((rows, *shape), dtype=dtype) for p, shape in manifest["shapes"].items()}
        self.progress = progress
        self.expected = expected  # tokens, estimated from the corpus size, when no count was asked for

    def run(self) -> None:
        manifest = self.manifest
        started, written, done_before = time.perf_counter(), 0, manifest["tokens"]
        bar = self._bar(done_before)
        try:
            with self.runner.active():
                while True:
                    done = manifest["tokens"] // self.seq_len
                    wanted = self.per_shard
                    if self.total_sequences is not None:
                        wanted = min(wanted, self.total_sequences - done)
                    if wanted <= 0:
                        break
                    size, sequences = self._shard(len(manifest["shards"]), wanted, bar)
                    written += size
                    if sequences < wanted:
                        manifest["exhausted"] = True
                        break
            manifest["complete"] = True
            write_manifest(self.folder, manifest)
        finally:
            if bar is not None:
                bar.close()
        if self.progress:
            self._summary(time.perf_counter() - started, manifest["tokens"] - done_before, written)

    def _bar(self, initial: int) -> Any:
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        if self.total_sequences is not None:
            total, desc = self.total_sequences * self.seq_len, "collect"
        else:
            total, desc = self.expected, "collect (total estimated from the corpus size)"
        return tqdm(total=total, initial=initial, unit="tok", unit_scale=True, desc=desc, file=sys.stderr)

    def _shard(self, index: int, wanted: int, bar: Any) -> tuple[int, int]:
        """Fill and write shard ``index``; returns its size in bytes and how many sequences it holds."""
        entry = self.write_shard(index, wanted, self.manifest["tokens"], bar)
        if entry is None:
            return 0, 0
        self.manifest["shards"].append(entry)
        self.manifest["tokens"] = entry["first_row"] + entry["tokens"]
        write_manifest(self.folder, self.manifest)
        if bar is not None:
            bar.set_postfix_str(f"{index + 1} shard{'s' * (index > 0)}", refresh=False)
        return entry["bytes"], entry["sequences"]

    def write_shard(self, index: int, wanted: int, first_row: int, bar: Any) -> dict[str, Any] | None:
        """Fill shard ``index`` with up to ``wanted`` sequences from the packer and write it; its manifest
        entry, or None when the data had run out."""
        start = self.packer.position
        packs: list[Packed] = []
        sequences = 0
        while sequences < wanted:
            asked = min(self.batch, wanted - sequences)
            pack = self.packer.take(asked)
            count = len(pack.tokens)
            if count == 0:
                break
            rows = slice(sequences * self.seq_len, (sequences + count) * self.seq_len)
            targets = {p: b[rows].view(count, self.seq_len, *b.shape[1:]) for p, b in self.buffers.items()}
            self.runner.run(torch.from_numpy(pack.tokens).long(), targets)
            packs.append(pack)
            sequences += count
            if bar is not None:
                bar.update(count * self.seq_len)
                if bar.total is not None and bar.n > bar.total:  # an estimate that fell short
                    bar.total = bar.n
            if count < asked:
                break  # the data ran out inside this batch
        if sequences == 0:
            return None
        data = _serialise(self.buffers, packs, sequences * self.seq_len)
        name = shard_name(index)
        write_atomic(self.folder / name, data)
        end = self.packer.position
        return {
            "file": name,
            "index": index,
            "sequences": sequences,
            "tokens": sequences * self.seq_len,
            "first_row": first_row,
            "bytes": len(data),
            "sha256": sha256_bytes(data),
            "start": {"document": start[0], "token": start[1]},
            "end": {"document": end[0], "token": end[1]},
        }

    def _summary(self, seconds: float, tokens: int, written: int) -> None:
        manifest = self.manifest
        shards = len(manifest["shards"])
        rate = tokens / seconds if seconds > 0 else float("inf")
        lines = [
            f"collected {tokens:,} tokens in {seconds:.1f} s ({rate:,.0f} tokens/s), "
            f"wrote {written / 2**20:,.1f} MiB ({written / 2**20 / max(seconds, 1e-9):,.1f} MiB/s)",
            f"dataset {self.folder}: {manifest['tokens']:,} tokens in {shards} shard{'s' * (shards != 1)}, "
            f"points {', '.join(manifest['shapes'])}, {manifest['settings']['dtype']}",
        ]
        if manifest["exhausted"] and manifest["settings"]["tokens"] is not None:
            lines.append(f"the data ran out before the {manifest['settings']['tokens']:,} tokens asked for")
        print("\n".join(lines), file=sys.stderr)


def _serialise(buffers: dict[str, torch.Tensor], packs: list[Packed], rows: int) -> bytes:
    from safetensors.torch import save

    def joined(field: str) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([getattr(p, field).reshape(-1) for p in packs]))

    document = joined("document")
    char_start, char_end = joined("char_start"), joined("char_end")
    texts: dict[int, Document] = {}
    for pack in packs:
        texts.update(pack.texts)
    documents, pieces, bases = [], [], []
    real = document >= 0
    for number in torch.unique(document[real]).tolist():
        mine = document == number
        base, stop = int(char_start[mine].min()), int(char_end[mine].max())
        documents.append(number)
        bases.append(base)
        pieces.append(texts[number].text[base:stop].encode())
    offsets = np.cumsum([0] + [len(piece) for piece in pieces], dtype=np.int64)
    tensors = {point: buffer[:rows] for point, buffer in buffers.items()}
    tensors.update(
        {
            TOKENS: joined("tokens"),
            ROW_DOCUMENT: document,
            ROW_CHAR_START: char_start,
            ROW_CHAR_END: char_end,
            TEXT_DOCUMENT: torch.tensor(documents, dtype=torch.int64),
            TEXT_CHAR_BASE: torch.tensor(bases, dtype=torch.int64),
            TEXT_OFFSETS: torch.from_numpy(offsets),
            TEXT_UTF8: torch.frombuffer(bytearray(b"".join(pieces)) or bytearray(1), dtype=torch.uint8)[
                : int(offsets[-1])
            ],
        }
    )
    # one metadata key only: safetensors writes the metadata map in no fixed order, and resumed runs must match bytes
    return save(tensors, metadata=dict(METADATA))
