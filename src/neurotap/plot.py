"""Pictures of results: attention patterns, heat maps and logit-lens grids, as matplotlib figures.

Each function takes values already computed (a tensor, a trace or recordings, an
experiment's result, a logit lens) and only draws them; it returns a
``matplotlib.figure.Figure`` (shown by Jupyter) and, given ``path``, also saves it
as a PNG there. matplotlib is an optional extra (``pip install 'neurotap[plot]'``),
imported on the first call, so the rest of neurotap never needs it. Figures are
made without pyplot, so nothing is left open behind a script's back.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import NeurotapError

__all__ = ["attention", "heatmap", "logit_lens"]


def attention(
    source: Any,
    layer: int | None = None,
    head: int = 0,
    *,
    tokens: Sequence[str] | None = None,
    path: str | Path | None = None,
) -> Any:
    """One head's attention pattern: queries down, keys across.

    ``source`` is the attention probabilities, ``[queries, keys]``, ``[heads,
    queries, keys]`` or ``[batch, heads, queries, keys]`` (the first row), or a
    mapping that holds them for ``layer``: a trace (``m.run``), recordings
    (``m.recordings()``, a ``Record`` probe's first value) or ``{point: tensor}``,
    under ``blocks.{layer}.attn.pattern`` or the layer's ``...softmax`` op point.
    ``tokens`` label both axes.
    """
    pattern = _pattern(source, layer)
    if pattern.dim() == 4:
        pattern = pattern[0]
    if pattern.dim() == 3:
        if not -pattern.shape[0] <= head < pattern.shape[0]:
            raise NeurotapError(f"head {head} is out of range: the pattern has {pattern.shape[0]} heads")
        pattern = pattern[head]
    if pattern.dim() != 2:
        raise NeurotapError(
            "an attention pattern is [queries, keys], [heads, queries, keys] or [batch, heads, queries, keys]; "
            f"got shape {tuple(pattern.shape)}"
        )
    title = "attention" + (f", layer {layer}" if layer is not None else "") + f", head {head}"
    figure = _grid(pattern, title=title, rows=tokens, cols=tokens, colour="Blues", bar="probability")
    figure.axes[0].set_xlabel("key")
    figure.axes[0].set_ylabel("query")
    return _saved(figure, path)


def heatmap(
    result: Any,
    *,
    rows: Sequence[str] | None = None,
    cols: Sequence[str] | None = None,
    title: str | None = None,
    path: str | Path | None = None,
) -> Any:
    """A 2-D result as a heat map, rows down and columns across.

    ``result`` is a 2-D tensor (or anything ``torch.as_tensor`` takes), or an
    experiment's result with ``values`` ``[points, positions]``, whose ``points``
    and ``tokens`` label the rows and columns (an activation-patching or
    causal-trace result) unless ``rows`` and ``cols`` are given.
    """
    values = getattr(result, "values", result)
    if callable(values):  # a mapping's values() method, not an experiment's field
        values = result
    matrix = _tensor(values, "heatmap")
    if matrix.dim() != 2:
        raise NeurotapError(f"heatmap draws a 2-D value; got shape {tuple(matrix.shape)}: pick or reduce dimensions")
    rows = rows if rows is not None else getattr(result, "points", None)
    cols = cols if cols is not None else getattr(result, "tokens", None)
    if title is None:
        title = " ".join(
            str(part) for part in (getattr(result, "experiment", ""), getattr(result, "metric", "")) if part
        )
    low, high = float(matrix.min()), float(matrix.max())
    centred = low < 0 < high  # signed effects: zero is white
    bound = max(abs(low), abs(high))
    figure = _grid(
        matrix,
        title=title or None,
        rows=rows,
        cols=cols,
        colour="RdBu_r" if centred else "viridis",
        limits=(-bound, bound) if centred else None,
    )
    return _saved(figure, path)


def logit_lens(lens: Any, *, path: str | Path | None = None) -> Any:
    """Layers (up) by positions (across): the top token of each cell, coloured by its probability.

    ``lens`` is a logit lens result (with ``top_probs`` ``[layers, positions, k]``,
    ``top_tokens``, ``points`` and ``tokens``), or the JSON the server's
    ``POST /v1/logit_lens`` answers.
    """
    if isinstance(lens, Mapping) and "layers" in lens:
        layers = lens["layers"]
        positions = lens.get("positions") or list(range(len(lens["pieces"])))
        probs = torch.tensor([[cell[0] for cell in row["probs"]] for row in layers])
        words = [[cell[0] for cell in row["pieces"]] for row in layers]
        names = [row.get("point", f"blocks.{row['layer']}.resid_post") for row in layers]
        tokens = [lens["pieces"][t] for t in positions]
    elif hasattr(lens, "top_probs") and hasattr(lens, "top_tokens"):
        probs = _tensor(lens.top_probs, "logit_lens")[..., 0]
        words = [[cell[0] for cell in row] for row in lens.top_tokens]
        names, tokens = list(lens.points), list(lens.tokens)
    else:
        raise NeurotapError(
            "logit_lens draws a logit lens result (m.logit_lens(...)) or the JSON of POST /v1/logit_lens; "
            f"got {type(lens).__name__}"
        )
    figure = _grid(
        probs,
        title="logit lens: top token, its probability",
        rows=names,
        cols=tokens,
        colour="Purples",
        limits=(0.0, 1.0),
        origin="lower",
        bar="probability",
    )
    axes = figure.axes[0]
    for i, row in enumerate(words):
        for j, word in enumerate(row):
            dark = float(probs[i, j]) > 0.5
            axes.text(j, i, repr(word)[1:-1], ha="center", va="center", fontsize=7, color="white" if dark else "black")
    figure.set_size_inches(max(6.0, 0.9 * len(tokens) + 2.5), max(4.0, 0.3 * len(names) + 1.5))
    return _saved(figure, path)


# -- drawing -------------------------------------------------------------------------------------


def _figure() -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("nt.plot draws with matplotlib: pip install 'neurotap[plot]'") from None
    figure = Figure(figsize=(6.5, 5.0), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _grid(
    matrix: torch.Tensor,
    *,
    title: str | None,
    rows: Sequence[str] | None,
    cols: Sequence[str] | None,
    colour: str,
    limits: tuple[float, float] | None = None,
    origin: str = "upper",
    bar: str | None = None,
) -> Any:
    figure = _figure()
    axes = figure.add_subplot()
    low, high = limits or (None, None)
    image = axes.imshow(
        matrix.numpy(), cmap=colour, vmin=low, vmax=high, aspect="auto", origin=origin, interpolation="nearest"
    )
    figure.colorbar(image, ax=axes, label=bar)
    for labels, size, ticks, set_labels in (
        (rows, matrix.shape[0], axes.set_yticks, axes.set_yticklabels),
        (cols, matrix.shape[1], axes.set_xticks, axes.set_xticklabels),
    ):
        if labels is None:
            continue
        labels = [str(label) for label in labels]
        if len(labels) != size:
            raise NeurotapError(f"{len(labels)} labels for {size} rows or columns: give one label each")
        ticks(range(size))
        set_labels([repr(label)[1:-1] for label in labels], fontsize=7)
    if cols is not None:
        axes.tick_params(axis="x", labelrotation=60)
    if title:
        axes.set_title(title)
    return figure


def _saved(figure: Any, path: str | Path | None) -> Any:
    if path is not None:
        figure.savefig(Path(path), format="png", dpi=110)
    return figure


# -- reading the inputs --------------------------------------------------------------------------


def _tensor(value: Any, what: str) -> torch.Tensor:
    try:
        tensor = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as error:
        raise NeurotapError(
            f"{what} needs numbers (a tensor or nested lists), got {type(value).__name__}: {error}"
        ) from None
    return tensor.detach().float().cpu()


def _pattern(source: Any, layer: int | None) -> torch.Tensor:
    if not isinstance(source, Mapping):
        return _tensor(source, "attention")
    if layer is None:
        raise NeurotapError("attention(trace, layer, head): say which layer's pattern to draw")
    names = [f"blocks.{layer}.attn.pattern"]
    names += [n for n in source if re.search(rf"(^|\.){layer}\.(.*\.)?[a-z_]*softmax(_\d+)?$", n)]
    found = next((n for n in names if n in source), None)
    if found is None:
        raise NeurotapError(
            f"no attention pattern of layer {layer} here: record blocks.{layer}.attn.pattern (or the layer's "
            f"attention softmax op point); these points are here: {', '.join(list(source)[:8])}"
        )
    value = source[found]
    if isinstance(value, Mapping):  # a recording: the first value a Record probe kept
        if "record" not in value or not value["record"]:
            raise NeurotapError(f"the recording at {found!r} holds no Record values (it has {list(value)})")
        value = value["record"][0]
    return _tensor(value, "attention")
