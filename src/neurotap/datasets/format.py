"""The on-disk format of an activation dataset (format version 1).

A dataset is a folder::

    manifest.json
    shard-00000.safetensors
    shard-00001.safetensors
    ...
    .lock                      (held by a running collection, so that two never write one folder;
                                removed when it ends)

Rows
    Every token of every packed sequence is one row. Row ``r`` of the dataset is
    position ``r % seq_len`` of sequence ``r // seq_len``. Shards hold whole
    sequences, in order; shard ``i`` holds rows ``first_row .. first_row + tokens``.

Packing and special tokens
    Documents are tokenised without special tokens and concatenated in source
    order, each followed by the tokenizer's EOS token (if it has one). The stream
    is cut into sequences of ``seq_len`` tokens; each sequence starts with the
    tokenizer's BOS token (if it has one) followed by the next ``seq_len - 1``
    stream tokens, so documents run on across sequence boundaries and a sequence
    may hold several documents (attention is not masked between them). A final
    stream remainder too short to fill a sequence is dropped.

Shard entries (safetensors, little-endian, one file per shard; the only metadata is
``{"format": "neurotap-activations/1"}``, so that equal contents give equal bytes)
    ``<point name>``    ``[rows, *point shape]`` in the dataset dtype (float32,
                        float16 or bfloat16): the value at the point, one row per token.
    ``tokens``          ``[rows]`` int32: the token ids fed to the model.
    ``row.document``    ``[rows]`` int64: the document each token came from (its
                        index in source order, counting from 0 over all sources);
                        -1 for the BOS and EOS tokens added by packing.
    ``row.char_start``, ``row.char_end``  ``[rows]`` int32: the token's character
                        span in its document's text (0, 0 for added tokens).
    ``text.document``   ``[d]`` int64: the documents this shard's rows touch.
    ``text.char_base``  ``[d]`` int64: where each stored text piece starts in its document.
    ``text.offsets``    ``[d + 1]`` int64: byte offsets of each piece in ``text.utf8``.
    ``text.utf8``       ``[bytes]`` uint8: the UTF-8 text of each document from the
                        first to the last character this shard's rows cover, so
                        every row maps back to its text without the source files.

Manifest (``manifest.json``)
    ``format``, ``format_version``, ``library_version``;
    ``settings``: everything that decides the bytes of the shards (model, points,
    dtype, seq_len, batch_size, tokens requested, shard_mb, text_field, sources with
    their size and sha256, tokenizer with its special tokens and a hash of its
    definition). A restart must match it exactly;
    ``shapes``: ``{point: [per-token shape]}``; ``sequences_per_shard``;
    ``special_tokens``: ``{"bos": [id, text] | null, "eos": [id, text] | null}``;
    ``shards``: one entry per complete shard, in order: ``file``, ``index``,
    ``sequences``, ``tokens``, ``first_row``, ``bytes``, ``sha256``, and ``start`` /
    ``end``: the source position (``document``, ``token`` within that document's
    token stream) of the shard's first packed token and of the one after its last;
    ``tokens``: rows written so far; ``complete``: whether collection finished;
    ``exhausted``: whether it finished because the sources ran out.

Atomic writes and resuming
    A shard is serialised in memory, hashed, written to ``.shard-NNNNN.safetensors.tmp``,
    flushed to disk and renamed to its final name; only then is the manifest, which
    lists it with its size and sha256, rewritten the same way (``.manifest.json.tmp``,
    fsync, rename). A shard is complete exactly when the manifest lists it. A
    restart with the same settings verifies the listed shards, drops leftover
    temporary files and carries on from the ``end`` position of the last shard;
    packing and batching are deterministic, so the result equals an uninterrupted
    run byte for byte.

Parallel collection
    With several ranks (``neurotap collect --ranks N``, or torchrun), shard ``i`` is
    written by rank ``i % N``, with exactly the bytes a single process writes, and the
    ranks share ``manifest.json`` as a single process starts it (no shards). While they
    run, rank ``r`` lists its finished shards in ``manifest.rank-<r>.json``
    (``format``, ``format_version``, ``rank``, ``world_size``, ``settings`` as the
    manifest's, ``shards`` with the manifest's entries, ``exhausted``), written
    atomically after each of its shards, and holds ``.lock.rank-<r>`` (rank 0 holds
    ``.lock``). A restart with the same settings and world size resumes each rank from
    its own list. When every rank is done, rank 0 merges the lists into ``manifest.json``
    (checked in full, as a reader does) and deletes the rank manifests: the finished
    folder is the single-process one, byte for byte. A folder that still holds rank
    manifests is refused by a single-process ``collect``.

Integrity
    A dataset folder may come from anyone, so a reader trusts nothing in it
    unchecked. Opening a dataset (``ActivationDataset``, or ``collect`` resuming one)

    - reads at most ``MAX_MANIFEST_BYTES`` of ``manifest.json`` and refuses JSON
      with ``NaN`` or ``Infinity``;
    - checks the whole manifest against the schema above: the type of every field;
      ``settings.dtype`` one of the dataset dtypes; ``settings.seq_len`` at least 2;
      ``shapes`` one list of positive ints per point of ``settings.points``, in
      order; ``sequences_per_shard`` what ``shard_mb``, ``batch_size``,
      ``seq_len``, ``dtype`` and ``shapes`` give; ``special_tokens`` those of
      ``settings.tokenizer``; and for shard ``i``: ``file`` is exactly
      ``shard-<i>.safetensors``, ``index`` is ``i``, ``sequences`` is between 1 and
      ``sequences_per_shard`` (exactly that for all but the last shard),
      ``tokens`` is ``sequences * seq_len``, ``first_row`` is the sum of the
      tokens of the shards before it, ``start`` is the previous shard's ``end``
      (``(0, 0)`` for the first) and ``end`` lies after ``start``; the top-level
      ``tokens`` is the sum over the shards, and no more than ``settings.tokens``
      asks for (rounded up to whole sequences; exactly that when the collection
      is complete and the data did not run out);
    - checks every shard file: a regular file in the folder (a symbolic link only
      if it resolves to a file in the folder), no two shards the same file, its
      size the manifest's ``bytes``, and its safetensors header (at most
      ``MAX_HEADER_BYTES``, read without the data) holding exactly the entries
      above, each with the dtype and shape the manifest implies, data offsets that
      tile the file, and the metadata above;
    - checks each shard's sha256 when the shard is first read (``verify=False``
      skips only this), and when its text is first used, that ``text.offsets``
      cut ``text.utf8`` into UTF-8 pieces and every row's document is among them.

    When resuming, ``collect`` also checks that the manifest's ``shapes`` are the
    model's and repacks the last listed shard from its ``start``: its tokens and
    the ``end`` position must come out as recorded.

    A mismatch raises :class:`CorruptDatasetError` (or its subclass
    :class:`CorruptShardError` for one shard's file), naming the file, the field,
    what it holds and what was expected, and what to do. A listed shard that is
    missing is an error for a reader; ``collect`` writes it, and those after it, again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import struct
import weakref
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from ..errors import NeurotapError

FORMAT = "neurotap-activations"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".lock"

TOKENS = "tokens"
ROW_DOCUMENT = "row.document"
ROW_CHAR_START = "row.char_start"
ROW_CHAR_END = "row.char_end"
TEXT_DOCUMENT = "text.document"
TEXT_CHAR_BASE = "text.char_base"
TEXT_OFFSETS = "text.offsets"
TEXT_UTF8 = "text.utf8"
RESERVED = (TOKENS, "row.", "text.")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
ROW_ENTRIES = {TOKENS: "I32", ROW_DOCUMENT: "I64", ROW_CHAR_START: "I32", ROW_CHAR_END: "I32"}
ROW_BYTES = 4 + 8 + 4 + 4  # the row entries of one token
METADATA = {"format": f"{FORMAT}/{FORMAT_VERSION}"}

# A manifest lists about 400 bytes per shard: this allows some 150,000 shards and keeps json.loads bounded.
MAX_MANIFEST_BYTES = 64 * 2**20
# A shard's header is a few hundred bytes per point.
MAX_HEADER_BYTES = 16 * 2**20
MAX_DIMENSIONS = 16

# numpy has no bfloat16: such entries are read as uint16 and viewed as torch.bfloat16
_NUMPY = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "I64": np.int64,
    "I32": np.int32,
    "U8": np.uint8,
}
_ITEMSIZE = {code: np.dtype(kind).itemsize for code, kind in _NUMPY.items()}

MANIFEST_FIX = "Restore manifest.json from the original copy of the dataset, or collect again into a new folder"
SHARD_FIX = (
    "Restore the file from the original copy of the dataset, or delete it and run the same collect command again "
    "to rewrite it"
)


class DatasetError(NeurotapError):
    """An activation dataset that cannot be written or read as asked."""


class CorruptDatasetError(DatasetError):
    """A dataset whose manifest or files are not what collect writes: damaged, edited or crafted."""


class CorruptShardError(CorruptDatasetError):
    """A shard file that is missing, or does not match what the manifest recorded."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either absent, the old file, or the whole new file."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms without directory descriptors
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def sequences_per_shard(shapes: dict[str, Any], dtype: str, seq_len: int, batch_size: int, shard_mb: float) -> int:
    """Sequences in each full shard: whole batches, about ``shard_mb`` MiB in all, at least one batch."""
    row_bytes = sum(math.prod(shape) for shape in shapes.values()) * DTYPES[dtype].itemsize + ROW_BYTES
    batch_bytes = row_bytes * seq_len * batch_size
    return max(1, int(shard_mb * 2**20 // batch_bytes)) * batch_size


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    data = (json.dumps(manifest, indent=1) + "\n").encode()
    if len(data) > MAX_MANIFEST_BYTES:
        raise DatasetError(
            f"the manifest of {folder} would grow past {MAX_MANIFEST_BYTES:,} bytes, more than readers accept; "
            "collect into a new folder with a larger shard_mb (--shard-mb)"
        )
    write_atomic(folder / MANIFEST, data)


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of the dataset in ``folder``, checked against the format (see the module docstring)."""
    path = folder / MANIFEST
    if not os.path.lexists(path) or folder_file(folder, MANIFEST) is None:
        raise DatasetError(f"{folder} holds no {MANIFEST}: it is not an activation dataset (make one with collect)")
    with open(path, "rb") as file:
        raw = file.read(MAX_MANIFEST_BYTES + 1)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise CorruptDatasetError(
            f"{path} is larger than the {MAX_MANIFEST_BYTES:,} bytes a manifest may hold; it is not one collect "
            f"wrote. {MANIFEST_FIX}"
        )
    try:
        manifest = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError and too-long ints among them
        raise CorruptDatasetError(
            f"{path} is not valid JSON ({error}); the manifest is damaged. {MANIFEST_FIX}"
        ) from None
    if not isinstance(manifest, dict):
        raise CorruptDatasetError(f"{path} holds a JSON {type(manifest).__name__}, not an object. {MANIFEST_FIX}")
    if manifest.get("format") != FORMAT:
        raise DatasetError(f"{path} is not an activation dataset manifest (format {_show(manifest.get('format'))})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DatasetError(
            f"{path} has format version {_show(manifest.get('format_version'))}; this neurotap reads version "
            f"{FORMAT_VERSION}"
        )
    _ManifestCheck(path).manifest(manifest)
    return manifest


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def _show(value: Any, limit: int = 60) -> str:
    """A value for an error message, cut short: a crafted manifest may hold huge strings."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: Any, minimum: int = 0) -> bool:
    return type(value) is int and value >= minimum  # bool is an int subclass, and never a count here


class _ManifestCheck:
    """The manifest schema: each check names the field, what it holds and what was expected."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, field: str, value: Any, expected: str) -> NoReturn:
        raise CorruptDatasetError(
            f"the manifest {self.path} is damaged or was edited: {field} is {_show(value)}, expected {expected}. "
            f"{MANIFEST_FIX}"
        )

    def field(self, mapping: dict[str, Any], key: str, where: str, kind: type | tuple[type, ...]) -> Any:
        name = f"{where}.{key}" if where else key
        if key not in mapping:
            raise CorruptDatasetError(f"the manifest {self.path} has no {name}; it is damaged. {MANIFEST_FIX}")
        value = mapping[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
            names = " or ".join(k.__name__ for k in _as_tuple(kind))
            self.fail(name, value, f"a JSON value of type {names}")
        return value

    def integer(self, mapping: dict[str, Any], key: str, where: str, minimum: int = 0) -> int:
        value = self.field(mapping, key, where, int)
        if value < minimum:
            self.fail(f"{where}.{key}" if where else key, value, f"an integer of at least {minimum}")
        return value

    def manifest(self, manifest: dict[str, Any]) -> None:
        self.field(manifest, "library_version", "", str)
        settings = self.settings(self.field(manifest, "settings", "", dict))
        points, dtype, seq_len = settings["points"], settings["dtype"], settings["seq_len"]
        shapes = self.shapes(self.field(manifest, "shapes", "", dict), points)
        per_shard = self.integer(manifest, "sequences_per_shard", "", 1)
        expected = sequences_per_shard(shapes, dtype, seq_len, settings["batch_size"], settings["shard_mb"])
        if per_shard != expected:
            self.fail(
                "sequences_per_shard",
                per_shard,
                f"{expected}, which settings.shard_mb, settings.batch_size, settings.seq_len, settings.dtype and "
                "shapes give",
            )
        self.special_tokens(self.field(manifest, "special_tokens", "", dict), settings["tokenizer"])
        shards = self.field(manifest, "shards", "", list)
        rows, position = 0, {"document": 0, "token": 0}
        for index, shard in enumerate(shards):
            rows, position = self.shard(shard, index, index == len(shards) - 1, rows, position, seq_len, per_shard)
        tokens = self.integer(manifest, "tokens", "")
        if tokens != rows:
            self.fail("tokens", tokens, f"{rows}, the sum of the shards' tokens")
        complete = self.field(manifest, "complete", "", bool)
        exhausted = self.field(manifest, "exhausted", "", bool)
        if exhausted and not complete:
            self.fail("exhausted", exhausted, "false while complete is false")
        if settings["tokens"] is None:
            if complete and not exhausted:
                self.fail("exhausted", exhausted, "true: with settings.tokens null, collection ends when data runs out")
        else:
            asked = -(-settings["tokens"] // seq_len) * seq_len
            if tokens > asked or (complete and not exhausted and tokens != asked):
                self.fail(
                    "tokens",
                    tokens,
                    f"{'at most ' if not complete or exhausted else ''}{asked}: settings.tokens "
                    f"{settings['tokens']} rounded up to whole sequences of settings.seq_len {seq_len}",
                )

    def settings(self, settings: dict[str, Any]) -> dict[str, Any]:
        where = "settings"
        self.field(settings, "model", where, str)
        points = self.field(settings, "points", where, list)
        if not points or not all(isinstance(p, str) and p for p in points) or len(set(points)) != len(points):
            self.fail("settings.points", points, "a list of distinct point names")
        for point in points:
            if point == TOKENS or point.startswith(RESERVED[1:]):
                self.fail("settings.points", point, "point names that do not clash with the dataset's own entries")
        dtype = self.field(settings, "dtype", where, str)
        if dtype not in DTYPES:
            self.fail("settings.dtype", dtype, f"one of {', '.join(DTYPES)}")
        self.integer(settings, "seq_len", where, 2)
        self.integer(settings, "batch_size", where, 1)
        tokens = self.field(settings, "tokens", where, (int, type(None)))
        if tokens is not None and tokens < 1:
            self.fail("settings.tokens", tokens, "a positive integer or null")
        shard_mb = self.field(settings, "shard_mb", where, (int, float))
        if not 0 < shard_mb < math.inf:
            self.fail("settings.shard_mb", shard_mb, "a positive number")
        self.field(settings, "text_field", where, str)
        self.field(settings, "sources", where, list)
        self.field(settings, "tokenizer", where, dict)
        return settings

    def shapes(self, shapes: dict[str, Any], points: list[str]) -> dict[str, list[int]]:
        if list(shapes) != points:
            self.fail("shapes", list(shapes), f"one entry per point of settings.points, in order: {points}")
        for point, shape in shapes.items():
            if not isinstance(shape, list) or len(shape) > MAX_DIMENSIONS or not all(_is_int(n, 1) for n in shape):
                self.fail(f"shapes[{point!r}]", shape, f"a list of at most {MAX_DIMENSIONS} positive integers")
        return shapes

    def special_tokens(self, special: dict[str, Any], tokenizer: dict[str, Any]) -> None:
        for which in ("bos", "eos"):
            value = self.field(special, which, "special_tokens", (list, type(None)))
            if value is not None and not (len(value) == 2 and _is_int(value[0]) and isinstance(value[1], str)):
                self.fail(f"special_tokens.{which}", value, "null or [token id, token text]")
            if value != tokenizer.get(which):
                self.fail(f"special_tokens.{which}", value, f"{_show(tokenizer.get(which))}, as settings.tokenizer")

    def shard(
        self,
        shard: Any,
        index: int,
        last: bool,
        first_row: int,
        start: dict[str, int],
        seq_len: int,
        per_shard: int,
    ) -> tuple[int, dict[str, int]]:
        """Checks ``shards[index]``; returns the rows up to its end and its end position."""
        where = f"shards[{index}]"
        if not isinstance(shard, dict):
            self.fail(where, shard, "an object")
        name = shard_name(index)
        if self.field(shard, "file", where, str) != name:
            self.fail(f"{where}.file", shard["file"], f"{name!r}, a file name in the dataset folder")
        if self.integer(shard, "index", where) != index:
            self.fail(f"{where}.index", shard["index"], str(index))
        sequences = self.integer(shard, "sequences", where, 1)
        if sequences > per_shard or (not last and sequences != per_shard):
            self.fail(
                f"{where}.sequences",
                sequences,
                f"{'at most ' if last else ''}{per_shard} (sequences_per_shard"
                f"{'' if last else '; only the last shard may hold fewer'})",
            )
        tokens = self.integer(shard, "tokens", where, 1)
        if tokens != sequences * seq_len:
            self.fail(
                f"{where}.tokens", tokens, f"{sequences * seq_len}: sequences {sequences} × settings.seq_len {seq_len}"
            )
        if self.integer(shard, "first_row", where) != first_row:
            self.fail(
                f"{where}.first_row", shard["first_row"], f"{first_row}, the sum of the tokens of the shards before it"
            )
        self.integer(shard, "bytes", where, 8)
        digest = self.field(shard, "sha256", where, str)
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            self.fail(f"{where}.sha256", digest, "64 lowercase hex digits")
        positions = []
        for key in ("start", "end"):
            position = self.field(shard, key, where, dict)
            self.integer(position, "document", f"{where}.{key}")
            self.integer(position, "token", f"{where}.{key}")
            positions.append((position["document"], position["token"]))
        if positions[0] != (start["document"], start["token"]):
            self.fail(f"{where}.start", shard["start"], f"{start}, where the shard before it ended")
        if positions[1] <= positions[0]:
            self.fail(f"{where}.end", shard["end"], f"a source position after start {shard['start']}")
        return first_row + tokens, shard["end"]


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def folder_file(folder: Path, name: str) -> os.stat_result | None:
    """The status of ``folder/name`` if it exists; refuses anything but a regular file in the folder."""
    path = folder / name
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(info.st_mode):
        target = Path(os.path.realpath(path))
        if target.parent != Path(os.path.realpath(folder)):
            raise CorruptDatasetError(
                f"{path} is a link to {target}, outside the dataset folder; a dataset's files must lie in its "
                "folder. Replace the link with a copy of the file, or collect again into a new folder"
            )
        try:
            info = os.stat(path)
        except FileNotFoundError:
            return None
    if not stat.S_ISREG(info.st_mode):
        raise CorruptDatasetError(f"{path} is not a regular file; collect writes only regular files there")
    return info


def open_shard(folder: Path, manifest: dict[str, Any], index: int, seen: set[tuple[int, int]]) -> ShardFile | None:
    """Shard ``index`` of a checked manifest, its file and header checked against it; None if the file is missing.

    ``seen`` collects the (device, inode) of the files opened so far, so that no two shards are one file.
    """
    entry = manifest["shards"][index]
    info = folder_file(folder, entry["file"])
    if info is None:
        return None
    identity = (info.st_dev, info.st_ino)
    if identity in seen:
        raise CorruptDatasetError(
            f"shard {folder / entry['file']} is the same file as an earlier shard (a link, or a hard link); "
            f"shards[{index}] needs its own file. {SHARD_FIX}"
        )
    seen.add(identity)
    shard = ShardFile(folder / entry["file"], entry["bytes"])
    shard.check(manifest, index)
    return shard


def open_shards(folder: Path, manifest: dict[str, Any]) -> list[ShardFile]:
    """Every shard of a checked manifest, each checked as :func:`open_shard` does; a missing one is an error."""
    seen: set[tuple[int, int]] = set()
    shards = []
    for index, entry in enumerate(manifest["shards"]):
        shard = open_shard(folder, manifest, index, seen)
        if shard is None:
            raise CorruptShardError(
                f"shard {folder / entry['file']} is missing; run the same collect command again to rewrite it"
            )
        shards.append(shard)
    return shards


class ShardFile:
    """One shard opened for reading: its header parsed, its entries memory-mapped on demand."""

    def __init__(self, path: Path, expected_bytes: int | None = None) -> None:
        self.path = path
        if not path.is_file():
            raise CorruptShardError(f"shard {path} is missing; collect again with the same command to rewrite it")
        size = path.stat().st_size
        if expected_bytes is not None and size != expected_bytes:
            raise CorruptShardError(
                f"shard {path} has {size} bytes but the manifest recorded {expected_bytes}: it is truncated or was "
                "changed. Delete it and run the same collect command again to rewrite it"
            )
        try:
            with open(path, "rb") as file:
                (header_length,) = struct.unpack("<Q", file.read(8))
                if header_length > min(size - 8, MAX_HEADER_BYTES):
                    raise ValueError(f"a header of {header_length} bytes, longer than the file or {MAX_HEADER_BYTES}")
                header = json.loads(file.read(header_length), parse_constant=_no_constant)
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
            self.data_start = 8 + header_length
            self.metadata = header.pop("__metadata__", None)
            self.entries: dict[str, dict[str, Any]] = header
            _check_layout(header, size - self.data_start)
        except (ValueError, KeyError, TypeError, RecursionError, struct.error) as error:
            raise CorruptShardError(f"shard {path} is not a readable safetensors file: {error}. {SHARD_FIX}") from None
        self._maps: dict[str, np.ndarray] = {}
        self._descriptor: int | None = None

    def check(self, manifest: dict[str, Any], index: int) -> None:
        """Refuse a header that is not the one collect writes for ``manifest["shards"][index]``."""
        rows = manifest["shards"][index]["tokens"]
        code = SAFETENSORS_DTYPES[manifest["settings"]["dtype"]]
        expected = {
            point: (code, [rows, *shape], f"shapes[{point!r}] and settings.dtype give")
            for point, shape in manifest["shapes"].items()
        }
        for name, kind in ROW_ENTRIES.items():
            expected[name] = (kind, [rows], f"shards[{index}].tokens gives")
        documents = self.entries.get(TEXT_DOCUMENT, {}).get("shape", [0])
        count = documents[0] if len(documents) == 1 else 0
        utf8 = self.entries.get(TEXT_UTF8, {}).get("shape", [0])
        expected[TEXT_DOCUMENT] = ("I64", [count], "the format gives")
        expected[TEXT_CHAR_BASE] = ("I64", [count], "the format gives")
        expected[TEXT_OFFSETS] = ("I64", [count + 1], "the format gives")
        expected[TEXT_UTF8] = ("U8", utf8 if len(utf8) == 1 else [0], "the format gives")
        problems = []
        missing = [name for name in expected if name not in self.entries]
        if missing:
            problems.append(f"it has no entry {', '.join(map(repr, missing))}")
        extra = [name for name in self.entries if name not in expected]
        if extra:
            problems.append(f"it has entries the manifest does not list: {', '.join(_show(n) for n in extra[:3])}")
        for name, (kind, shape, source) in expected.items():
            entry = self.entries.get(name)
            if entry is not None and (entry["dtype"], entry["shape"]) != (kind, shape):
                problems.append(f"its entry {name!r} is {entry['dtype']} {entry['shape']}, but {source} {kind} {shape}")
        if self.metadata != METADATA:
            problems.append(f"its metadata is {_show(self.metadata)}, expected {METADATA}")
        if problems:
            raise CorruptShardError(
                f"shard {self.path} does not match the manifest (shards[{index}]): {'; '.join(problems[:3])}. "
                f"{SHARD_FIX}"
            )

    def array(self, name: str) -> np.ndarray:
        """A read-only memory map of one entry (bfloat16 entries come as uint16)."""
        mapped = self._maps.get(name)
        if mapped is None:
            entry = self.entries.get(name)
            if entry is None:
                raise DatasetError(f"shard {self.path} has no entry {name!r}; it has {sorted(self.entries)}")
            begin, end = entry["data_offsets"]
            dtype = np.dtype(_NUMPY[entry["dtype"]]).newbyteorder("<")
            shape = tuple(entry["shape"])
            if end == begin:
                mapped = np.zeros(shape, dtype=dtype)
            else:
                mapped = np.memmap(self.path, dtype=dtype, mode="r", offset=self.data_start + begin, shape=shape)
            self._maps[name] = mapped
        return mapped

    def read_ahead(self, name: str, start: int, stop: int) -> None:
        """Ask the kernel to start reading rows ``start:stop`` of an entry into the page cache, as one read."""
        advise = getattr(os, "posix_fadvise", None)
        if advise is None or stop <= start:
            return
        if self._descriptor is None:
            try:
                self._descriptor = os.open(self.path, os.O_RDONLY)
            except OSError:
                return  # only a hint: the memory map still reads the rows
            weakref.finalize(self, os.close, self._descriptor)
        entry = self.entries[name]
        row_bytes = (entry["data_offsets"][1] - entry["data_offsets"][0]) // max(entry["shape"][0], 1)
        begin = self.data_start + entry["data_offsets"][0] + start * row_bytes
        size = (stop - start) * row_bytes
        # Advising pages already cached costs about as much as a tenth of copying them, so look first.
        if not (self._cached(begin) and self._cached(begin + size - 1)):
            advise(self._descriptor, begin, size, os.POSIX_FADV_WILLNEED)

    def _cached(self, offset: int) -> bool:
        """Whether the page holding byte ``offset`` is in the page cache (False where that cannot be asked)."""
        try:
            return os.preadv(self._descriptor, [bytearray(1)], offset, os.RWF_NOWAIT) == 1
        except (OSError, AttributeError):
            return False

    def tensor(self, name: str, rows: Any = slice(None)) -> torch.Tensor:
        """``entry[rows]`` copied into memory as a torch tensor."""
        array = self.array(name)[rows]
        if not array.flags.writeable or not array.flags.c_contiguous:  # a view of the map, not a copy yet
            array = np.array(array)
        tensor = torch.from_numpy(array)
        return tensor.view(torch.bfloat16) if self.entries[name]["dtype"] == "BF16" else tensor


def _check_layout(entries: dict[str, Any], data_bytes: int) -> None:
    """Each entry's dtype, shape and offsets agree, and the entries tile the data section."""
    spans = []
    for name, entry in entries.items():
        if not isinstance(entry, dict):
            raise ValueError(f"entry {_show(name)} is not an object")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _NUMPY:
            raise ValueError(f"entry {_show(name)} has the dtype {_show(dtype)}, which datasets do not use")
        if not isinstance(shape, list) or len(shape) > MAX_DIMENSIONS + 1 or not all(_is_int(n) for n in shape):
            raise ValueError(f"entry {_show(name)} has the shape {_show(shape)}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(n) for n in offsets):
            raise ValueError(f"entry {_show(name)} has the data offsets {_show(offsets)}")
        begin, end = offsets
        if end - begin != math.prod(shape) * _ITEMSIZE[dtype]:
            raise ValueError(f"entry {_show(name)} spans {end - begin} bytes, not what {dtype} {shape} needs")
        spans.append((begin, end))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise ValueError(f"the entries leave a gap or overlap at byte {position} of the data")
        position = end
    if position != data_bytes:
        raise ValueError(f"the entries cover {position} bytes of data, the file holds {data_bytes}")
