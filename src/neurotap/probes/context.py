"""The save context a probe writes to; it persists until ``clear_recordings()``."""

from __future__ import annotations

import html
from collections.abc import Iterator, Mapping
from typing import Any

from .._html import brief, table

_MAPPING_METHODS = frozenset(name for name in dir(Mapping) if not name.startswith("_"))


class SaveContext(Mapping):
    """Attribute assignment saves data: ``ctx.acts = value.detach()``.

    ``point``, ``step`` (generation step, 0 for the prompt) and ``call`` (how many
    times this point already fired in the current forward) say where the probe
    is; everything else assigned is saved and read back, by attribute or by key,
    from ``model.recordings()[point]``.
    """

    __slots__ = ("_data", "point", "step", "call")

    def __init__(self, point: str) -> None:
        object.__setattr__(self, "_data", {})
        object.__setattr__(self, "point", point)
        object.__setattr__(self, "step", 0)
        object.__setattr__(self, "call", 0)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("point", "step", "call"):
            object.__setattr__(self, name, value)
        elif name in _MAPPING_METHODS:
            raise AttributeError(
                f"ctx.{name} is a method of the save context and cannot be read back as an attribute; "
                f"save it as ctx[{name!r}] = ... or under another name"
            )
        else:
            self._data[name] = value

    def __getattr__(self, name: str) -> Any:
        # copy and pickle look up hooks such as __setstate__ on an instance whose slots are not filled yet
        if name.startswith("__") or name == "_data":
            raise AttributeError(name)
        try:
            return self._data[name]
        except KeyError:
            raise AttributeError(
                f"nothing was saved as {name!r} at {self.point!r}; saved: {list(self._data)}"
            ) from None

    def __delattr__(self, name: str) -> None:
        del self._data[name]

    def __setitem__(self, key: str, value: Any) -> None:
        self._data[key] = value

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"SaveContext({self.point!r}, {_summary(self._data)})"

    def __reduce__(self) -> tuple:
        return _rebuilt, (self.point, self.step, self.call, self._data)

    def _repr_html_(self) -> str:
        return f"<b>{html.escape(self.point)}</b>" + table(
            ["key", "value"], [(k, brief(v)) for k, v in self._data.items()]
        )


class Recordings(dict):
    """What probes saved, by point name: ``{point: SaveContext}``, shown in Jupyter as a table."""

    def _repr_html_(self) -> str:
        rows = [(point, key, brief(value)) for point, ctx in self.items() for key, value in ctx.items()]
        return table(["point", "key", "value"], rows)


def _rebuilt(point: str, step: int, call: int, data: dict[str, Any]) -> SaveContext:
    ctx = SaveContext(point)
    object.__setattr__(ctx, "step", step)
    object.__setattr__(ctx, "call", call)
    ctx._data.update(data)
    return ctx


def _summary(data: dict[str, Any]) -> str:
    parts = []
    for key, value in data.items():
        shape = getattr(value, "shape", None)
        if shape is not None:
            parts.append(f"{key}=Tensor{tuple(shape)}")
        elif isinstance(value, list):
            parts.append(f"{key}=[{len(value)} items]")
        else:
            parts.append(f"{key}={value!r}")
    return "{" + ", ".join(parts) + "}"
