"""Points: the named places in a model where a value can be tapped."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from .._html import table

Kind = Literal["input", "argument", "output", "op", "parameter", "buffer"]
Key = int | str  # one step of narrowing: output[0], output["logits"]

_NARROWING = re.compile(r"\[(-?\d+|\"[^\"]*\"|'[^']*')\]")


@dataclass(frozen=True)
class Point:
    """A place in a model's execution where a value can be read or replaced.

    ``module`` is the path of the module whose forward computes the value ("" for
    the root); for op points, ``scope`` is the chain of helper call sites entered
    from that forward followed by the op's local name.
    """

    name: str
    kind: Kind
    shape: tuple[int, ...] | None
    dtype: str | None
    type: str
    source: str
    module: str
    scope: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "shape": list(self.shape) if self.shape is not None else None,
            "dtype": self.dtype,
            "type": self.type,
            "source": self.source,
            "module": self.module,
            "scope": list(self.scope),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Point:
        shape = data.get("shape")
        return cls(
            name=data["name"],
            kind=data["kind"],
            shape=tuple(shape) if shape is not None else None,
            dtype=data.get("dtype"),
            type=data.get("type", ""),
            source=data.get("source", ""),
            module=data.get("module", ""),
            scope=tuple(data.get("scope", ())),
        )


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def split_narrowing(name: str) -> tuple[str, tuple[Key, ...]]:
    """``'a.output[0]["x"]'`` -> ``('a.output', (0, 'x'))``."""
    bracket = name.find("[")
    if bracket < 0:
        return name, ()
    base, rest = name[:bracket], name[bracket:]
    keys: list[Key] = []
    position = 0
    for match in _NARROWING.finditer(rest):
        if match.start() != position:
            break
        token = match.group(1)
        keys.append(int(token) if token[0] not in "\"'" else token[1:-1])
        position = match.end()
    if position != len(rest):
        raise ValueError(f'cannot parse the narrowing in point name {name!r}: use [0] or ["key"] after the name')
    return base, tuple(keys)


def narrowed_name(base: str, keys: Iterable[Key]) -> str:
    return base + "".join(f"[{k}]" if isinstance(k, int) else f'["{k}"]' for k in keys)


class PointList(list):
    """A list of points that prints as an indented table."""

    def __str__(self) -> str:
        if not self:
            return "(no points)"
        points: list[Point] = list(self)
        base_depth = min(p.module.count(".") + bool(p.module) for p in points)
        rows = []
        for p in points:
            depth = p.module.count(".") + bool(p.module) - base_depth
            shape = "(" + ", ".join(map(str, p.shape)) + ")" if p.shape is not None else p.type
            rows.append(("  " * depth + p.name, p.kind, shape, p.dtype or "", p.source))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[4] for row in rows]
        return "\n".join(line.rstrip() for line in lines)

    def __repr__(self) -> str:
        return f"<{len(self)} points>\n{self}"

    def names(self) -> list[str]:
        return [p.name for p in self]

    def _repr_html_(self) -> str:
        if not self:
            return "<i>(no points)</i>"
        depths = [p.module.count(".") + bool(p.module) for p in self]
        rows = [(p.name, p.kind, p.type if p.shape is None else tuple(p.shape), p.dtype or "", p.source) for p in self]
        return table(["name", "kind", "shape", "dtype", "source"], rows, indents=[d - min(depths) for d in depths])
