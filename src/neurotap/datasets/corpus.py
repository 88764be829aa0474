"""Text sources, read as documents, tokenised and packed into fixed-length sequences.

Sources
    ``.txt``, ``.text``, ``.md``: plain UTF-8 text; paragraphs (runs of lines
    separated by a blank line) are the documents.
    ``.jsonl``, ``.ndjson``: one JSON object per line; the document is its
    ``text_field``.
    ``.parquet``: one document per row, from the ``text_field`` column.
    A folder stands for every such file under it, in sorted path order. Empty
    documents are skipped and take no document index.

The packing rule (BOS first in every sequence, EOS after every document) is
spelled out in :mod:`neurotap.datasets.format`.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .format import DatasetError

SUFFIXES = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
}
BUNDLED = Path(__file__).with_name("corpus")
_TOKENISE_GROUP = 64  # documents per tokenizer call: the fast tokenizers work through a list in parallel
_ESTIMATE_SAMPLE = 256  # documents tokenised to estimate a corpus's token count from its size


def bundled_corpus() -> Path:
    """The small English corpus shipped with neurotap, used when no data is given."""
    return BUNDLED


@dataclass(frozen=True)
class Source:
    path: Path
    kind: str
    label: str  # how the manifest names it

    def describe(self) -> dict[str, Any]:
        digest = hashlib.sha256()
        with open(self.path, "rb") as file:
            while chunk := file.read(1 << 22):
                digest.update(chunk)
        return {
            "path": self.label,
            "format": self.kind,
            "bytes": self.path.stat().st_size,
            "sha256": digest.hexdigest(),
        }


def resolve_sources(data: str | Path | Sequence[str | Path] | None) -> list[Source]:
    """Files to read, in order; ``None`` means the bundled corpus."""
    if data is None:
        return [Source(p, SUFFIXES[p.suffix], f"<bundled>/{p.name}") for p in _files_under(BUNDLED)]
    paths = [data] if isinstance(data, (str, Path)) else list(data)
    if not paths:
        raise DatasetError("no data given: pass text, JSON lines or Parquet files, or a folder of them")
    sources = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            files = _files_under(path)
            if not files:
                raise DatasetError(f"the folder {path} holds no {', '.join(SUFFIXES)} files")
        elif path.is_file():
            if path.suffix.lower() not in SUFFIXES:
                raise DatasetError(
                    f"cannot read {path}: its type {path.suffix or '(none)'} is not one of {', '.join(SUFFIXES)}; "
                    "rename plain text to .txt, JSON lines to .jsonl"
                )
            files = [path]
        else:
            raise DatasetError(f"the data path {path} does not exist")
        sources.extend(Source(f, SUFFIXES[f.suffix.lower()], str(f.resolve())) for f in files)
    return sources


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)


@dataclass(frozen=True)
class Document:
    index: int  # over all sources, in order
    source: int  # which source
    record: int  # paragraph, line or row within the source
    text: str


def read_documents(sources: Sequence[Source], text_field: str = "text") -> Iterator[Document]:
    index = 0
    for number, source in enumerate(sources):
        records = {"text": _paragraphs, "jsonl": _json_lines, "parquet": _parquet_rows}[source.kind]
        for record, text in records(source.path, text_field):
            if text:
                yield Document(index, number, record, text)
                index += 1


def _paragraphs(path: Path, _field: str) -> Iterator[tuple[int, str]]:
    lines: list[str] = []
    record = 0
    try:
        with open(path, encoding="utf-8") as file:
            for line in file:
                if line.strip():
                    lines.append(line)
                elif lines:
                    yield record, "".join(lines).strip()
                    record += 1
                    lines = []
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path} is not UTF-8 text: {error}") from None
    if lines:
        yield record, "".join(lines).strip()


def _json_lines(path: Path, field: str) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DatasetError(f"{path} line {number + 1} is not JSON: {error}") from None
            text = row.get(field) if isinstance(row, dict) else None
            if not isinstance(text, str):
                fields = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise DatasetError(
                    f"{path} line {number + 1} has no text field {field!r} (it has {fields}); "
                    "name the field with --text-field"
                )
            yield number, text


def _parquet_rows(path: Path, field: str) -> Iterator[tuple[int, str]]:
    try:
        import pyarrow.parquet as parquet
    except ImportError as error:
        raise DatasetError("reading Parquet needs pyarrow: pip install pyarrow") from error
    file = parquet.ParquetFile(path)
    names = file.schema_arrow.names
    if field not in names:
        raise DatasetError(f"{path} has no column {field!r} (columns: {names}); name it with --text-field")
    row = 0
    for batch in file.iter_batches(columns=[field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text is not None and not isinstance(text, str):
                raise DatasetError(f"{path} column {field!r} holds {type(text).__name__} values, not text")
            yield row, text or ""
            row += 1


def estimate_tokens(sources: Sequence[Source], tokenizer: Any, seq_len: int, text_field: str = "text") -> int:
    """About how many tokens packing all of ``sources`` gives, from their sizes and a tokenised sample.

    The first documents give tokens per byte of file (per row for Parquet, whose
    bytes are compressed); the rest of the corpus is assumed to be alike.
    """
    sampled_bytes, sampled_rows, sampled_tokens = 0, 0, 0
    for document in read_documents(sources, text_field):
        ids = tokenizer(document.text, add_special_tokens=False)["input_ids"]
        sampled_tokens += len(ids) + 1  # and its EOS
        sampled_bytes += len(document.text.encode()) + 1  # and the newline or blank line around it
        sampled_rows += 1
        if sampled_rows == _ESTIMATE_SAMPLE:
            break
    if not sampled_rows:
        return 0
    stream = 0.0
    for source in sources:
        if source.kind == "parquet":
            import pyarrow.parquet as parquet

            stream += parquet.ParquetFile(source.path).metadata.num_rows * sampled_tokens / sampled_rows
        else:
            stream += source.path.stat().st_size * sampled_tokens / sampled_bytes
    sequences = int(stream // (seq_len - 1))  # each sequence is a BOS and seq_len - 1 tokens of the stream
    return sequences * seq_len


def special_token(tokenizer: Any, which: str) -> tuple[int, str] | None:
    token_id = getattr(tokenizer, f"{which}_token_id", None)
    if token_id is None:
        return None
    return int(token_id), str(getattr(tokenizer, f"{which}_token", None) or tokenizer.convert_ids_to_tokens(token_id))


def tokenizer_description(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else repr(getattr(tokenizer, "get_vocab", dict)())
    return {
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "bos": special_token(tokenizer, "bos"),
        "eos": special_token(tokenizer, "eos"),
        "sha256": hashlib.sha256(definition.encode()).hexdigest(),
    }


@dataclass
class Packed:
    """A batch of packed sequences, ``[sequences, seq_len]`` each, and the texts it touches."""

    tokens: np.ndarray  # int32
    document: np.ndarray  # int64, -1 for added BOS/EOS
    char_start: np.ndarray  # int32
    char_end: np.ndarray  # int32
    texts: dict[int, Document]


class _Segment:
    """One document's token stream (its tokens, then EOS), and how much of it is used."""

    __slots__ = ("document", "tokens", "char_start", "char_end", "used")

    def __init__(self, document: int, tokens: np.ndarray, char_start: np.ndarray, char_end: np.ndarray) -> None:
        self.document = document
        self.tokens = tokens
        self.char_start = char_start
        self.char_end = char_end
        self.used = 0


class Packer:
    """Cuts the token stream of ``documents`` into sequences, from a resumable position."""

    def __init__(
        self,
        documents: Iterator[Document],
        tokenizer: Any,
        seq_len: int,
        *,
        start: tuple[int, int] = (0, 0),
    ) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise DatasetError(
                f"collecting needs a fast (Rust) tokenizer for character offsets; {type(tokenizer).__name__} is not "
                "one: load it with AutoTokenizer.from_pretrained(..., use_fast=True)"
            )
        self._documents = documents
        self._tokenizer = tokenizer
        self.seq_len = seq_len
        bos, eos = special_token(tokenizer, "bos"), special_token(tokenizer, "eos")
        self._bos = None if bos is None else bos[0]
        self._eos = None if eos is None else eos[0]
        self._start = start
        self._next_document = start[0]
        self._segments: deque[_Segment] = deque()
        self._texts: dict[int, Document] = {}
        self._exhausted = False

    @property
    def position(self) -> tuple[int, int]:
        """(document, token within its stream) of the next token to pack."""
        if self._segments:
            head = self._segments[0]
            return head.document, head.used
        resumed = self._next_document == self._start[0]  # nothing read yet since resuming mid-document
        return self._next_document, self._start[1] if resumed else 0

    def _fill(self) -> bool:
        group = []
        for document in self._documents:
            if document.index < self._start[0]:
                continue  # before the resume point
            group.append(document)
            if len(group) == _TOKENISE_GROUP:
                break
        if not group:
            self._exhausted = True
            return False
        encoded = self._tokenizer(
            [d.text for d in group], add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False
        )
        for document, ids, offsets in zip(group, encoded["input_ids"], encoded["offset_mapping"]):
            spans = np.asarray(offsets, dtype=np.int32).reshape(-1, 2)
            tokens = np.asarray(ids, dtype=np.int32)
            starts, ends = spans[:, 0], spans[:, 1]
            if self._eos is not None:
                tokens = np.append(tokens, np.int32(self._eos))
                starts, ends = np.append(starts, np.int32(0)), np.append(ends, np.int32(0))
            segment = _Segment(document.index, tokens, starts, ends)
            if document.index == self._start[0]:
                segment.used = self._start[1]
            self._next_document = document.index + 1
            if segment.used < len(tokens):
                self._segments.append(segment)
                self._texts[document.index] = document
        return True

    def take(self, sequences: int) -> Packed:
        """Up to ``sequences`` packed sequences; fewer (maybe none) once the documents run out."""
        length = self.seq_len
        tokens = np.empty((sequences, length), dtype=np.int32)
        document = np.full((sequences, length), -1, dtype=np.int64)
        char_start = np.zeros((sequences, length), dtype=np.int32)
        char_end = np.zeros((sequences, length), dtype=np.int32)
        texts: dict[int, Document] = {}
        first = 0 if self._bos is None else 1
        for row in range(sequences):
            if not self._ensure(length - first):
                return Packed(tokens[:row], document[:row], char_start[:row], char_end[:row], texts)
            if self._bos is not None:
                tokens[row, 0] = self._bos
            column = first
            while column < length:
                head = self._segments[0]
                n = min(length - column, len(head.tokens) - head.used)
                taken = slice(head.used, head.used + n)
                tokens[row, column : column + n] = head.tokens[taken]
                char_start[row, column : column + n] = head.char_start[taken]
                char_end[row, column : column + n] = head.char_end[taken]
                real = n - (1 if self._eos is not None and head.used + n == len(head.tokens) else 0)
                document[row, column : column + real] = head.document
                texts[head.document] = self._texts[head.document]
                head.used += n
                column += n
                if head.used == len(head.tokens):
                    self._segments.popleft()
                    del self._texts[head.document]
        return Packed(tokens, document, char_start, char_end, texts)

    def _ensure(self, needed: int) -> bool:
        while sum(len(s.tokens) - s.used for s in self._segments) < needed:
            if self._exhausted or not self._fill():
                return False
        return True
