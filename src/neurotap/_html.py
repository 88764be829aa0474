"""Compact HTML tables for Jupyter (``_repr_html_``); every cell is escaped text."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

MAX_ROWS = 1000  # a notebook cell stays readable; the rest is counted


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, indents: Sequence[int] | None = None) -> str:
    """``rows`` under ``headers``; ``indents[i]`` indents row ``i``'s first cell by that many steps."""
    head = "".join(f"<th style='text-align:left'>{html.escape(str(h))}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows[:MAX_ROWS]):
        cells = []
        for j, cell in enumerate(row):
            style = "text-align:left"
            if j == 0 and indents:
                style += f";padding-left:{0.5 + 1.2 * indents[i]:.1f}em"
            cells.append(f"<td style='{style}'>{html.escape(str(cell))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    if len(rows) > MAX_ROWS:
        more = f"… and {len(rows) - MAX_ROWS} more rows (print it for all of them)"
        body.append(f"<tr><td colspan='{len(headers)}'>{html.escape(more)}</td></tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def brief(value: Any) -> str:
    """A value in a few words: a tensor's dtype and shape (and its numbers when it has few), a list's length."""
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "dtype"):
        dtype = str(value.dtype).removeprefix("torch.")
        text = f"{dtype} {tuple(shape)}"
        if value.numel() <= 8:
            text += " " + str([round(v, 6) if isinstance(v, float) else v for v in value.flatten().tolist()])
        return text
    if isinstance(value, (list, tuple)):
        kinds = {brief(v) for v in value[:64]}
        inner = f": {kinds.pop()}" if len(kinds) == 1 and value else ""
        return f"{type(value).__name__} of {len(value)}{inner}"
    if isinstance(value, Mapping):
        return f"dict of {len(value)}: {', '.join(map(str, list(value)[:6]))}" + (", …" if len(value) > 6 else "")
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
