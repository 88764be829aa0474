"""Reading an activation dataset: rows, shuffled batches and top-activating examples."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .format import (
    DTYPES,
    ROW_CHAR_END,
    ROW_CHAR_START,
    ROW_DOCUMENT,
    SHARD_FIX,
    TEXT_CHAR_BASE,
    TEXT_DOCUMENT,
    TEXT_OFFSETS,
    TEXT_UTF8,
    TOKENS,
    CorruptShardError,
    DatasetError,
    ShardFile,
    open_shards,
    read_manifest,
    sha256_file,
)


@dataclass(frozen=True)
class Example:
    """One token where a unit is large, with the text around it."""

    value: float
    row: int
    sequence: int
    position: int
    token: int
    document: int  # -1 for a BOS or EOS token added by packing
    before: str  # text of the preceding tokens in the same sequence
    text: str  # the token's own text
    after: str  # text of the following tokens in the same sequence

    def __str__(self) -> str:
        return f"{self.value:.4g}  {self.before}[[{self.text}]]{self.after}"


class ActivationDataset:
    """A folder written by ``collect``: its manifest, and its shards memory-mapped.

    Opening it checks the whole manifest, and every shard's file, size and header
    against it; each shard's sha256 is checked when the shard is first read
    (``verify=False`` skips only the hash). Anything amiss raises
    ``CorruptDatasetError``; :mod:`neurotap.datasets.format` lists the checks.
    ``len(ds)`` is the number of rows, one per token.
    """

    def __init__(self, path: str | Path, *, verify: bool = True) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self._verify = verify
        self._shards = open_shards(self.path, self.manifest)
        self._checked: set[int] = set()
        self._first_rows = np.array([shard["first_row"] for shard in self.manifest["shards"]], dtype=np.int64)
        self._texts: dict[int, dict[int, tuple[int, str]]] = {}

    # -- description -------------------------------------------------------------------------------

    @property
    def points(self) -> list[str]:
        return list(self.manifest["shapes"])

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-token shape of each point."""
        return {point: tuple(shape) for point, shape in self.manifest["shapes"].items()}

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.manifest["settings"]["dtype"]]

    @property
    def seq_len(self) -> int:
        return self.manifest["settings"]["seq_len"]

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    def __len__(self) -> int:
        return int(self.manifest["tokens"])

    def __repr__(self) -> str:
        points = ", ".join(f"{p} {list(s)}" for p, s in self.shapes.items())
        state = "" if self.complete else ", incomplete"
        settings = self.manifest["settings"]
        return (
            f"ActivationDataset({str(self.path)!r}: {len(self):,} tokens in {self.num_shards} shards, "
            f"{settings['dtype']}, model {settings['model']!r}, points {points}{state})"
        )

    # -- access ------------------------------------------------------------------------------------

    def shard(self, index: int) -> ShardFile:
        """Shard ``index``, its sha256 checked against the manifest on first use."""
        shard = self._shards[index]
        if self._verify and index not in self._checked:
            expected = self.manifest["shards"][index]["sha256"]
            if sha256_file(shard.path) != expected:
                raise CorruptShardError(
                    f"shard {shard.path} does not match the sha256 in the manifest: it was damaged or changed. "
                    "Delete it and run the same collect command again to rewrite it"
                )
            self._checked.add(index)
        return shard

    def verify(self) -> None:
        """Check every shard's sha256 now (raises CorruptShardError naming the first bad one)."""
        verify, self._verify = self._verify, True
        try:
            for index in range(self.num_shards):
                self.shard(index)
        finally:
            self._verify = verify

    def _entry(self, name: str) -> None:
        if name not in self.manifest["shapes"] and name not in (TOKENS, ROW_DOCUMENT, ROW_CHAR_START, ROW_CHAR_END):
            raise DatasetError(f"this dataset has no point {name!r}; it has {self.points} (and 'tokens')")

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of a point (or of ``"tokens"``), in order, as one tensor."""
        self._entry(name)
        stop = len(self) if stop is None else min(stop, len(self))
        parts = []
        for index in range(self.num_shards):
            first = int(self._first_rows[index])
            rows = self.manifest["shards"][index]["tokens"]
            lo, hi = max(start, first), min(stop, first + rows)
            if lo < hi:
                parts.append(self.shard(index).tensor(name, slice(lo - first, hi - first)))
        if not parts:
            return self._empty(name)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def gather(self, name: str, rows: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """The given rows of a point (or of ``"tokens"``), in the given order."""
        self._entry(name)
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise DatasetError(f"row indices must lie in [0, {len(self)}); got {rows.min()} .. {rows.max()}")
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        owners = np.searchsorted(self._first_rows, ordered, side="right") - 1
        parts = []
        for index in np.unique(owners):
            mine = ordered[owners == index] - self._first_rows[index]
            parts.append(self.shard(int(index)).tensor(name, mine))
        if not parts:
            return self._empty(name)
        result = torch.cat(parts) if len(parts) > 1 else parts[0]
        inverse = torch.from_numpy(np.argsort(order, kind="stable"))
        return result[inverse]

    def _empty(self, name: str) -> torch.Tensor:
        if name in self.manifest["shapes"]:
            return torch.empty((0, *self.shapes[name]), dtype=self.dtype)
        return torch.empty(0, dtype=torch.int32 if name != ROW_DOCUMENT else torch.int64)

    def batches(
        self, point: str, batch_size: int, *, shuffle: bool = False, seed: int = 0, drop_last: bool = False
    ) -> Iterator[torch.Tensor]:
        """One epoch of ``[batch_size, *shape]`` batches of a point's rows.

        With ``shuffle`` the rows come in a random order drawn from ``seed`` over
        the whole dataset, across shards; every row comes exactly once (pass a new
        seed, e.g. the epoch number, for a new order). The last batch is smaller
        unless ``drop_last``.
        """
        self._entry(point)
        if batch_size < 1:
            raise DatasetError(f"batch_size must be at least 1 (got {batch_size})")
        total = len(self)
        if shuffle:
            generator = torch.Generator().manual_seed(seed)
            order = torch.randperm(total, generator=generator).numpy()
        stop = total - total % batch_size if drop_last else total
        for start in range(0, stop, batch_size):
            end = min(start + batch_size, total)
            yield self.gather(point, order[start:end]) if shuffle else self.read(point, start, end)

    # -- text --------------------------------------------------------------------------------------

    def _shard_texts(self, index: int) -> dict[int, tuple[int, str]]:
        """{document: (char base, text piece)} stored in shard ``index``."""
        texts = self._texts.get(index)
        if texts is None:
            shard = self.shard(index)
            documents = shard.array(TEXT_DOCUMENT)
            bases = shard.array(TEXT_CHAR_BASE)
            offsets = np.asarray(shard.array(TEXT_OFFSETS))
            utf8 = shard.array(TEXT_UTF8)
            # the header fixed the lengths; the offsets themselves could still point anywhere
            if offsets[0] != 0 or offsets[-1] != len(utf8) or np.any(np.diff(offsets) < 0):
                raise CorruptShardError(
                    f"shard {shard.path}: its text.offsets do not divide its text.utf8 into pieces; the file is "
                    f"damaged. {SHARD_FIX}"
                )
            try:
                texts = {
                    int(d): (int(b), bytes(utf8[offsets[i] : offsets[i + 1]]).decode())
                    for i, (d, b) in enumerate(zip(documents, bases))
                }
            except UnicodeDecodeError as error:
                raise CorruptShardError(
                    f"shard {shard.path}: its text.utf8 is not UTF-8 ({error}); the file is damaged. {SHARD_FIX}"
                ) from None
            self._texts[index] = texts
        return texts

    def _special(self, token: int) -> str:
        for which in ("bos", "eos"):
            special = self.manifest["special_tokens"].get(which)
            if special is not None and special[0] == token:
                return special[1]
        return f"<{token}>"

    def text(self, start: int, stop: int) -> str:
        """The text of rows ``start:stop``; added BOS and EOS tokens appear as their token strings."""
        stop = min(stop, len(self))
        pieces = []
        for index in range(self.num_shards):
            first = int(self._first_rows[index])
            lo, hi = max(start, first), min(stop, first + self.manifest["shards"][index]["tokens"])
            if lo < hi:
                pieces.append(self._render(index, lo - first, hi - first))
        return "".join(pieces)

    def _render(self, index: int, lo: int, hi: int) -> str:
        shard = self.shard(index)
        documents = shard.array(ROW_DOCUMENT)[lo:hi]
        starts = shard.array(ROW_CHAR_START)[lo:hi]
        ends = shard.array(ROW_CHAR_END)[lo:hi]
        tokens = shard.array(TOKENS)[lo:hi]
        texts = self._shard_texts(index)
        parts, i = [], 0
        while i < len(documents):
            document = int(documents[i])
            if document < 0:
                parts.append(self._special(int(tokens[i])))
                i += 1
                continue
            j = i
            while j + 1 < len(documents) and documents[j + 1] == document:
                j += 1
            if document not in texts:
                raise CorruptShardError(
                    f"shard {shard.path}: row {lo + i} comes from document {document}, whose text the shard does not "
                    f"hold; the file is damaged. {SHARD_FIX}"
                )
            base, piece = texts[document]
            parts.append(piece[int(starts[i : j + 1].min()) - base : int(ends[i : j + 1].max()) - base])
            i = j + 1
        return "".join(parts)

    def example(self, row: int, value: float = float("nan"), *, before: int = 16, after: int = 4) -> Example:
        """Row ``row`` with up to ``before`` and ``after`` tokens of context from its sequence."""
        if not 0 <= row < len(self):
            raise DatasetError(f"row {row} is outside the dataset's {len(self)} rows")
        sequence, position = divmod(row, self.seq_len)
        begin = sequence * self.seq_len
        index = int(np.searchsorted(self._first_rows, row, side="right") - 1)
        local = row - int(self._first_rows[index])
        shard = self.shard(index)
        return Example(
            value=float(value),
            row=row,
            sequence=sequence,
            position=position,
            token=int(shard.array(TOKENS)[local]),
            document=int(shard.array(ROW_DOCUMENT)[local]),
            before=self.text(max(begin, row - before), row),
            text=self.text(row, row + 1),
            after=self.text(row + 1, min(begin + self.seq_len, row + 1 + after)),
        )

    def top_examples(
        self, point: str, unit: int | Sequence[int], k: int = 10, *, before: int = 16, after: int = 4
    ) -> list[Example]:
        """The ``k`` tokens where ``unit`` of ``point`` is largest, largest first, with their text.

        ``unit`` indexes the point's per-token shape (an int, or a tuple for
        shapes of more than one dimension). Ties go to the earlier row.
        """
        self._entry(point)
        if k < 1:
            raise DatasetError(f"k must be at least 1 (got {k})")
        if point not in self.manifest["shapes"]:
            raise DatasetError(f"top_examples needs a point; {point!r} is not one of {self.points}")
        shape = self.shapes[point]
        try:
            flat = int(np.ravel_multi_index(tuple(np.atleast_1d(unit)), shape)) if shape else 0
        except ValueError as error:
            raise DatasetError(
                f"unit {unit!r} does not index the per-token shape {shape} of {point!r}: {error}"
            ) from None
        best_values = np.empty(0, dtype=np.float64)
        best_rows = np.empty(0, dtype=np.int64)
        for index in range(self.num_shards):
            rows = self.manifest["shards"][index]["tokens"]
            column = self.shard(index).array(point).reshape(rows, -1)[:, flat]
            values = self._as_float(column)
            chosen = _largest(values, k)
            best_values = np.concatenate([best_values, values[chosen]])
            best_rows = np.concatenate([best_rows, chosen + self._first_rows[index]])
            keep = _largest_with_rows(best_values, best_rows, k)
            best_values, best_rows = best_values[keep], best_rows[keep]
        return [self.example(int(r), float(v), before=before, after=after) for v, r in zip(best_values, best_rows)]

    def _as_float(self, column: np.ndarray) -> np.ndarray:
        if self.dtype == torch.bfloat16:
            values = torch.from_numpy(np.array(column).view(np.int16)).view(torch.bfloat16).double().numpy()
        else:
            values = np.asarray(column, dtype=np.float64)
        return np.where(np.isnan(values), -np.inf, values)  # NaN never ranks


def _largest(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest values (ties to the smaller index), largest first."""
    return _largest_with_rows(values, np.arange(len(values)), k)


def _largest_with_rows(values: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    candidates = np.arange(len(values))
    if len(values) > k:
        threshold = np.partition(values, len(values) - k)[len(values) - k]
        candidates = np.nonzero(values >= threshold)[0]  # every tie at the threshold, so the row order decides
    order = np.lexsort((rows[candidates], -values[candidates]))
    return candidates[order[:k]]
