"""Reading an activation dataset: rows, shuffled batches and top-activating examples."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
        context = f"{self.before}[[{self.text}]]{self.after}"
        return context if math.isnan(self.value) else f"{self.value:.4g}  {context}"  # example(row): no value given


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
        return self._take(name, rows)

    def _take(self, name: str, rows: np.ndarray, *, ascending: bool = False) -> torch.Tensor:
        """Rows of an entry, in the given order, copied from the memory maps into a new tensor.

        Rows lying in one shard, or given in ascending order, are copied once, straight into the
        result; otherwise each shard's rows are taken first and then put in place.
        """
        template = self._empty(name)
        out = np.empty((len(rows), *template.shape[1:]), dtype=_as_numpy(template).dtype)
        if not len(rows):
            return _from_numpy(out, template.dtype)
        owners = np.searchsorted(self._first_rows, rows, side="right") - 1
        if ascending or owners[0] == owners[-1] and np.all(owners == owners[0]):
            cuts = np.flatnonzero(np.diff(owners)) + 1
            for lo, hi in zip(np.r_[0, cuts].tolist(), np.r_[cuts, len(rows)].tolist()):
                index = int(owners[lo])
                local = rows[lo:hi] - self._first_rows[index]
                source = self.shard(index).array(name)
                if ascending and local[-1] - local[0] + 1 == len(local):  # one run: a plain slice copy
                    out[lo:hi] = source[local[0] : local[-1] + 1]
                else:
                    np.take(source, local, axis=0, out=out[lo:hi], mode="clip")  # "clip": no buffered copy
        else:
            for index in np.unique(owners).tolist():
                places = np.flatnonzero(owners == index)
                out[places] = np.take(self.shard(index).array(name), rows[places] - self._first_rows[index], axis=0)
        return _from_numpy(out, template.dtype)

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

    def stream(
        self,
        point: str,
        batch_size: int,
        *,
        shuffle: str | None = "chunks",
        chunk_rows: int | None = None,
        buffer_rows: int = 1 << 16,
        seed: int = 0,
        epochs: int | None = 1,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        rows: bool = False,
    ) -> Iterator[torch.Tensor] | Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``[batch_size, *shape]`` batches of a point's rows for a training loop, epoch after epoch.

        ``shuffle``:

        - ``"chunks"`` (the default): the rows are cut into blocks of ``chunk_rows``
          contiguous rows (default: one sequence of the dataset, at least 256 rows); each epoch
          visits the blocks in a new random order, reading each with one sequential read,
          into a mixing buffer of ``buffer_rows`` rows, from which each batch takes a random
          sample (its rows come in ascending order within the batch). Each value is copied
          once, straight from the memory-mapped shards into its batch, while the kernel reads
          the blocks of the next buffer's fill ahead, each as one sequential read (blocks
          already in the page cache are not asked for again); rows whose blocks lie within one
          buffer of each other in the block order can meet in a batch.
        - ``"rows"``: a uniform random order of all rows, each batch gathered row by row
          (as :meth:`batches` with ``shuffle=True``): the best mixing, the slowest reads.
        - ``None``: rows in order.

        Each epoch uses ``seed + epoch`` (epochs count from 0); ``epochs=None`` repeats
        forever. Every row comes exactly once per epoch, summed over the ranks.

        ``rank`` and ``world_size`` split each epoch for data-parallel training: every
        rank computes the same order and takes every ``world_size``-th block (row, in
        ``"rows"`` mode) of it, so the ranks' parts are disjoint. With ``world_size > 1``
        every rank yields the same number of batches, as data-parallel training needs:
        only full batches, as many as the rank with the fewest rows has that epoch (so a
        few rows per rank are left out of each epoch, different ones each epoch).

        With ``rows=True`` each item is ``(batch, row_indices)``: the dataset rows the
        batch holds, for :meth:`example` and :meth:`text`.

        Every batch is a new tensor: one kept by the caller is never overwritten by a later one.
        """
        self._entry(point)
        if batch_size < 1:
            raise DatasetError(f"batch_size must be at least 1 (got {batch_size})")
        if shuffle not in ("chunks", "rows", None):
            raise DatasetError(f"shuffle must be 'chunks', 'rows' or None (got {shuffle!r})")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DatasetError(f"rank must lie in [0, world_size) with world_size >= 1 (got {rank}, {world_size})")
        if epochs is not None and epochs < 0:
            raise DatasetError(f"epochs must be a count of at least 0, or None to repeat forever (got {epochs})")
        chunk = chunk_rows if chunk_rows is not None else max(self.seq_len, 256)
        if chunk < 1:
            raise DatasetError(f"chunk_rows must be at least 1 (got {chunk})")
        if buffer_rows < 1:
            raise DatasetError(f"buffer_rows must be at least 1 (got {buffer_rows})")
        epoch = 0
        while epochs is None or epoch < epochs:
            plan = _StreamPlan(len(self), shuffle, chunk, seed + epoch, rank, world_size)
            limit = None
            if world_size > 1:
                limit = min(plan.rows_of(r) for r in range(world_size)) // batch_size * batch_size
            elif drop_last:
                limit = plan.rows_of(rank) // batch_size * batch_size
            yield from self._stream_epoch(point, batch_size, plan, buffer_rows, seed + epoch, limit, rows)
            epoch += 1

    def _stream_epoch(
        self,
        point: str,
        batch_size: int,
        plan: _StreamPlan,
        buffer_rows: int,
        seed: int,
        limit: int | None,
        with_rows: bool,
    ) -> Iterator[Any]:
        given = 0

        def emit(values: torch.Tensor, indices: torch.Tensor) -> Iterator[Any]:
            nonlocal given
            for start in range(0, len(values), batch_size):
                stop = min(start + batch_size, len(values))
                if limit is not None:
                    stop = min(stop, start + limit - given)
                if stop <= start:
                    return
                batch = values[start:stop]
                given += stop - start
                yield (batch, indices[start:stop]) if with_rows else batch

        if plan.mode == "rows":
            for start in range(0, len(plan.order), batch_size):
                if limit is not None and given >= limit:
                    return
                picked = plan.order[start : start + batch_size]
                yield from emit(self._take(point, picked), torch.from_numpy(picked))
            return
        # The mixing buffer holds row numbers, not values: each batch is copied from the memory maps once, straight
        # into its tensor, as the raw read copies once; the blocks entering the buffer are read ahead by the kernel.
        starts, lengths = plan.spans()
        ends = np.cumsum(lengths)
        generator = torch.Generator().manual_seed(seed)
        fill_to = max(buffer_rows, batch_size)
        pending = np.empty(0, dtype=np.int64)
        cursor = 0  # blocks entered so far
        if len(starts):
            self._read_ahead(point, starts, lengths, 0, _blocks_to(ends, 0, fill_to))
        while cursor < len(starts) or len(pending):
            last = _blocks_to(ends, cursor, fill_to - len(pending))
            # the blocks of the next fill are read while this one is copied out
            self._read_ahead(point, starts, lengths, last, _blocks_to(ends, last, fill_to))
            pool = np.concatenate([pending, _block_rows(starts[cursor:last], lengths[cursor:last])])
            cursor = last
            if plan.mode:
                pool = pool[torch.randperm(len(pool), generator=generator).numpy()]
            handed = len(pool) if cursor == len(starts) else len(pool) - len(pool) % batch_size
            for start in range(0, handed, batch_size):
                if limit is not None and given >= limit:
                    return
                picked = np.sort(pool[start : min(start + batch_size, handed)])
                yield from emit(self._take(point, picked, ascending=True), torch.from_numpy(picked))
            pending = pool[handed:]

    def _read_ahead(self, name: str, starts: np.ndarray, lengths: np.ndarray, first: int, last: int) -> None:
        """Ask the kernel to read blocks ``first:last`` of an entry into the page cache, each as one sequential read."""
        for lo, count in zip(starts[first:last].tolist(), lengths[first:last].tolist()):
            hi = lo + count
            index = int(np.searchsorted(self._first_rows, lo, side="right") - 1)
            while lo < hi:
                begin = int(self._first_rows[index])
                end = min(hi, begin + self.manifest["shards"][index]["tokens"])
                self.shard(index).read_ahead(name, lo - begin, end - begin)
                lo, index = end, index + 1

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

        Each example's ``sequence`` and ``position`` are those of ``nt.TopK``'s
        ``where`` (call, batch row, position) over the dataset's sequences fed in
        order, ``batch_size`` at a time: sequence ``call * batch_size + row``, and
        ``self.example(sequence * self.seq_len + position)`` is the same example.
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


def _as_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A numpy view of ``tensor``'s memory (numpy has no bfloat16: such tensors are viewed as uint16)."""
    return (tensor.view(torch.uint16) if tensor.dtype == torch.bfloat16 else tensor).numpy()


def _from_numpy(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor


class _StreamPlan:
    """Which rows one rank reads in one epoch, in which order (the same on every rank)."""

    def __init__(self, total: int, mode: str | None, chunk: int, seed: int, rank: int, world_size: int) -> None:
        self.mode, self.chunk, self.total, self.world_size = mode, chunk, total, world_size
        generator = torch.Generator().manual_seed(seed)
        if mode == "rows":
            self.all = torch.randperm(total, generator=generator).numpy()
        else:
            count = -(-total // chunk)
            self.all = torch.randperm(count, generator=generator).numpy() if mode == "chunks" else np.arange(count)
        self.order = self.all[rank::world_size]

    def spans(self, numbers: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """First rows and lengths of this rank's blocks (or of the blocks ``numbers``), in visiting order."""
        starts = (self.order if numbers is None else numbers).astype(np.int64) * self.chunk
        return starts, np.minimum(starts + self.chunk, self.total) - starts

    def rows_of(self, rank: int) -> int:
        """How many rows ``rank`` gets this epoch."""
        mine = self.all[rank :: self.world_size]
        return len(mine) if self.mode == "rows" else int(self.spans(mine)[1].sum())


def _block_rows(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The rows of blocks given by first row and length, one block after another."""
    placed = np.cumsum(lengths) - lengths
    return np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(starts - placed, lengths)


def _blocks_to(ends: np.ndarray, first: int, rows: int) -> int:
    """The end of the blocks from block ``first`` on that hold ``rows`` more rows (``ends``: running row counts)."""
    if rows <= 0 or first >= len(ends):
        return first
    entered = int(ends[first - 1]) if first else 0
    return min(int(np.searchsorted(ends, entered + rows, side="left")) + 1, len(ends))


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
