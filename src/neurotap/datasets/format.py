"""The on-disk format of an activation dataset (format version 1).

A dataset is a folder::

    manifest.json
    shard-00000.safetensors
    shard-00001.safetensors
    ...
    .lock                      (held by a running collection, so that two never write one folder)

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

Integrity
    Readers check each shard's size against the manifest when the dataset is
    opened and its sha256 when the shard is first read; a mismatch, a missing
    shard or an unreadable header raises :class:`CorruptShardError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

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

# numpy has no bfloat16: such entries are read as uint16 and viewed as torch.bfloat16
_NUMPY = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "I64": np.int64,
    "I32": np.int32,
    "U8": np.uint8,
}


class DatasetError(NeurotapError):
    """An activation dataset that cannot be written or read as asked."""


class CorruptShardError(DatasetError):
    """A shard whose bytes do not match what the manifest recorded."""


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


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    write_atomic(folder / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        raise DatasetError(f"{folder} holds no {MANIFEST}: it is not an activation dataset (make one with collect)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CorruptShardError(f"{path} is not valid JSON ({error}); the dataset's manifest is damaged") from None
    if manifest.get("format") != FORMAT:
        raise DatasetError(f"{path} is not an activation dataset manifest (format {manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DatasetError(
            f"{path} has format version {manifest.get('format_version')}; this neurotap reads version {FORMAT_VERSION}"
        )
    return manifest


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
                if header_length > size - 8:
                    raise ValueError("header longer than the file")
                header = json.loads(file.read(header_length))
            self.data_start = 8 + header_length
            header.pop("__metadata__", None)
            self.entries: dict[str, dict[str, Any]] = header
            for name, entry in header.items():
                begin, end = entry["data_offsets"]
                if entry["dtype"] not in _NUMPY or self.data_start + end > size or begin > end:
                    raise ValueError(f"entry {name!r} does not fit the file")
        except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as error:
            raise CorruptShardError(f"shard {path} is not a readable safetensors file: {error}") from None
        self._maps: dict[str, np.ndarray] = {}

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

    def tensor(self, name: str, rows: Any = slice(None)) -> torch.Tensor:
        """``entry[rows]`` copied into memory as a torch tensor."""
        array = self.array(name)[rows]
        if not array.flags.writeable or not array.flags.c_contiguous:  # a view of the map, not a copy yet
            array = np.array(array)
        tensor = torch.from_numpy(array)
        return tensor.view(torch.bfloat16) if self.entries[name]["dtype"] == "BF16" else tensor
