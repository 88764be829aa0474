"""Activation patching and causal tracing, batched: each row of a forward is one patched run.

Everything here goes through the public model API (``forward`` with probes,
``aliases``, ``tokenizer``), so the same calls run on an ``nt.Model`` and on an
``nt.RemoteModel``. A cell's patch is an ``nt.Replace`` whose ``index`` names the
rows and positions it restores, so a forward of ``batch`` rows measures ``batch``
cells, and only plain data travels to a server.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import NeurotapError, raised_at_the_call
from ..model import LogitDiff, Model
from ..model.lens import chosen_positions, layer_points, prompt_ids, text_tokens
from ..model.losses import logits_of
from ..model.trace import Trace
from ..points import is_pattern, split_narrowing
from ..probes import Add, Patch, Probability, Probe, Record, Replace, Skip, probe
from .results import PatchingResult

Metric = Callable[[torch.Tensor], torch.Tensor] | LogitDiff


class Runner:
    """One experiment's view of a model: its inputs, its forwards, and what it needs to know of it."""

    def __init__(self, model: Any) -> None:
        if not hasattr(model, "forward") or not hasattr(model, "aliases"):
            raise NeurotapError(
                f"experiments take an nt.Model (nt.wrap, nt.load) or an nt.RemoteModel (nt.connect), "
                f"got {type(model).__name__}"
            )
        self.model = model
        self.local = isinstance(model, Model)
        self.aliases = model.aliases()

    # -- inputs -----------------------------------------------------------------------------------

    def tokenizer(self, what: str) -> Any:
        tokenizer = self.model.tokenizer
        if tokenizer is None:
            raise NeurotapError(f"the model has no tokenizer, so {what} must be given as token ids")
        return tokenizer

    def ids(self, prompt: Any, name: str = "the prompt") -> torch.Tensor:
        """``[1, seq]`` token ids of text or ids."""
        if isinstance(prompt, str):
            return torch.tensor([text_tokens(self.model.tokenizer, prompt, name)])
        return prompt_ids(prompt, name)

    def prompt_pair(self, clean: Any, corrupt: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The token ids of a clean and a corrupted prompt, which must be of one length."""
        clean_ids, corrupt_ids = self.ids(clean, "the clean prompt"), self.ids(corrupt, "the corrupted prompt")
        if clean_ids.shape != corrupt_ids.shape:
            raise NeurotapError(
                f"the clean and corrupted prompts must have the same number of tokens, got {clean_ids.shape[1]} "
                f"and {corrupt_ids.shape[1]}; reword one of them"
            )
        return clean_ids, corrupt_ids

    def token(self, target: Any) -> int:
        """A token id: an int, or the first token of a text (``" Paris"``)."""
        if isinstance(target, str):
            return text_tokens(self.model.tokenizer, target, "the target", special=False)[0]
        if isinstance(target, int) and not isinstance(target, bool):
            return target
        raise NeurotapError(f"the target must be a token id (int) or text, got {type(target).__name__}")

    def tokens(self, ids: torch.Tensor) -> tuple[str, ...]:
        tokenizer = self.model.tokenizer
        if tokenizer is None:
            return tuple(str(int(i)) for i in ids[0])
        return tuple(tokenizer.decode([int(i)]) for i in ids[0])

    def positions(self, positions: Any, length: int) -> list[int]:
        return chosen_positions(positions, length)

    def layers(self) -> list[str]:
        """Every ``blocks.N.resid_post``, in layer order."""
        found = layer_points(self.aliases)
        if not found:
            raise NeurotapError(
                "this model has no blocks.N.resid_post aliases (see m.aliases()); pass the points of the "
                "hidden states to restore, points=[...]"
            )
        return found

    # -- running ----------------------------------------------------------------------------------

    def arguments(self) -> dict[str, Any]:
        if "logits" in self.aliases:  # a causal LM: compute (and send) only the logits that are read
            return {"logits_to_keep": 1, "use_cache": False}
        return {}

    def scores(self, ids: torch.Tensor, metric: Measure, probes: Sequence[Probe] = ()) -> torch.Tensor:
        """The metric of every row, ``[rows]``, float32 on the CPU."""
        return self.capture(ids, [], metric, probes)[0]

    def capture(
        self, ids: torch.Tensor, points: Sequence[str], metric: Measure, probes: Sequence[Probe] = (), *, rows: Any = 0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The metric of every row and ``value[rows]`` at each point (patterns expanded), in one forward.

        A built-in metric is read at the logits where the model runs, so through a
        server one or two numbers per row come back rather than the vocabulary's logits.
        """
        record: dict[str, Any] = {p: Record() for p in points}
        at = self.aliases.get("logits") if metric.reading is not None else None
        if at is not None:
            record[at] = metric.reading
        kwargs = self.arguments()
        if not self.local:
            kwargs["outputs"] = [] if at is not None else ["logits"]
        with torch.no_grad():
            if record:
                output, trace = self.model.run(ids, record=record, probes=list(probes), **kwargs)
            else:  # a metric function of the logits, and no values wanted
                output, trace = self.model.forward(ids, probes=list(probes), **kwargs), Trace({})
        if at is not None:
            scores = metric.of_reading(_tensor(at, trace[at]).float().cpu())
        else:
            logits = logits_of(output)[:, -1].detach().float().cpu()
            scores = _checked(torch.as_tensor(metric.score(logits)), logits).detach().float().cpu()
        names = [p for p in trace.points if p != at] if any(map(is_pattern, points)) else list(points)
        return scores, {p: _tensor(p, trace[p])[rows] for p in names}

    def gradients(
        self, ids: torch.Tensor, points: Sequence[str], metric: Measure
    ) -> tuple[float, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The metric, each point's value and the metric's gradient there (first row): one forward, one backward."""
        if not self.local:
            if not isinstance(metric.given, LogitDiff):
                raise NeurotapError(
                    "through a server, the gradient is taken there, of a built-in loss: pass the metric as "
                    "nt.LogitDiff(correct, wrong)"
                )
            _, trace = self.model.run(
                ids, record=points, grad=points, loss=metric.given, outputs=[], **self.arguments()
            )
            values = {p: _tensor(p, trace[p])[0] for p in points}
            return trace.loss, values, {p: _tensor(p, trace.grad[p])[0] for p in points}
        kept: dict[str, torch.Tensor] = {}

        def keeper(point: str) -> Callable[[Any, Any], Any]:
            def keep(_ctx: Any, value: Any) -> Any:
                tensor = _tensor(point, value)
                if not tensor.requires_grad:  # frozen weights: let the gradient reach this value all the same
                    tensor = tensor + torch.zeros_like(tensor).requires_grad_()
                kept[point] = tensor
                return tensor

            return keep

        with torch.enable_grad():
            output = self.model.forward(ids, probes=[probe(p, keeper(p)) for p in points], **self.arguments())
            logits = logits_of(output)[:, -1].float()
            value = _checked(metric.score(logits), logits)
            grads = torch.autograd.grad(value.sum(), [kept[p] for p in points], allow_unused=True)
        values = {p: kept[p][0].detach() for p in points}
        return float(value.detach()[0]), values, {p: _zeros_if_none(g, kept[p])[0] for p, g in zip(points, grads)}


def _tensor(point: str, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise NeurotapError(
            f"the value at {point!r} is a {type(value).__name__}, not a tensor; narrow the point to a tensor in "
            f"it, e.g. {point + '[0]'!r}"
        )
    return value


def _zeros_if_none(grad: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(value) if grad is None else grad  # a point the metric does not depend on


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _restoring(cells: list[tuple[str, int]], clean: dict[str, torch.Tensor], copies: int = 1) -> list[Probe]:
    """One ``Replace`` per point: row ``k * copies + c`` gets the clean value of cell ``k`` at its position."""
    by_point: dict[str, tuple[list[int], list[int]]] = {}
    for k, (point, position) in enumerate(cells):
        rows, positions = by_point.setdefault(point, ([], []))
        rows.extend(range(k * copies, (k + 1) * copies))
        positions.extend([position] * copies)
    return [
        probe(point, Replace(clean[point][positions], index=(torch.tensor(rows), torch.tensor(positions))))
        for point, (rows, positions) in by_point.items()
    ]


@dataclass(frozen=True)
class Measure:
    """A metric of the last position's logits ``[rows, vocab] -> [rows]``, and for a built-in one how to read it.

    ``reading`` is a patch that reads, at the logits, only what the metric needs
    (two logits, one probability), and ``of_reading`` turns what it read into the
    metric; so the metric is computed where the model runs, a server's included.
    """

    name: str
    score: Callable[[torch.Tensor], torch.Tensor]
    given: Any = None  # the metric as the caller gave it
    reading: Patch | None = None
    of_reading: Callable[[torch.Tensor], torch.Tensor] = lambda read: read


def _measure(metric: Metric, runner: Runner) -> Measure:
    if isinstance(metric, LogitDiff):
        if metric.position != -1:
            raise NeurotapError("experiments read the last position's logits: use nt.LogitDiff(correct, wrong)")
        correct, wrong = metric.correct, metric.wrong
        names = runner.tokens(torch.tensor([[correct, wrong]]))
        return Measure(
            f"logit diff {names[0]!r} - {names[1]!r}",
            lambda logits: logits[:, correct] - logits[:, wrong],
            metric,
            Record(index=(slice(None), -1, torch.tensor([correct, wrong]))),
            lambda read: read[:, 0] - read[:, 1],
        )
    if callable(metric):
        return Measure(getattr(metric, "__name__", type(metric).__name__), metric, metric)
    raise NeurotapError(
        "metric must be nt.LogitDiff(correct, wrong) or a function of the last position's logits "
        f"[rows, vocab] returning [rows], got {type(metric).__name__}"
    )


def _probability(token: int, runner: Runner) -> Measure:
    return Measure(
        f"p({runner.tokens(torch.tensor([[token]]))[0]!r})",
        lambda logits: torch.softmax(logits, dim=-1)[:, token],
        reading=Probability(token, index=(slice(None), -1)),
    )


def _checked(values: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    if tuple(values.shape) != (logits.shape[0],):
        raise NeurotapError(
            f"the metric must return one number per row, shape ({logits.shape[0]},), for logits of shape "
            f"{tuple(logits.shape)}; it returned shape {tuple(values.shape)}"
        )
    return values


def _point_names(points: Any) -> list[str]:
    names = [points] if isinstance(points, str) else list(points)
    if not names or not all(isinstance(p, str) for p in names):
        raise NeurotapError("points must be a point name or a non-empty list of point names")
    return names


def _clean_run(
    model: Any, clean: Any, corrupt: Any, metric: Metric, points: Any, positions: Any
) -> tuple[Runner, torch.Tensor, torch.Tensor, list[int], Measure, float, dict[str, torch.Tensor]]:
    """What both patchings start from: the runner, both prompts' ids, the positions, the metric, and the
    clean run's metric and values at the points (patterns expanded)."""
    runner = Runner(model)
    clean_ids, corrupt_ids = runner.prompt_pair(clean, corrupt)
    names = _point_names(points)
    chosen = runner.positions(positions, clean_ids.shape[1])
    measure = _measure(metric, runner)
    clean_scores, values = runner.capture(clean_ids, names, measure)
    return runner, clean_ids, corrupt_ids, chosen, measure, float(clean_scores[0]), values


@raised_at_the_call
def activation_patching(
    model: Any,
    clean: Any,
    corrupt: Any,
    metric: Metric,
    points: str | Sequence[str],
    positions: int | Sequence[int] | None = None,
    *,
    batch: int = 64,
) -> PatchingResult:
    """The metric on the corrupted prompt with each (point, position) restored from the clean one.

    ``clean`` and ``corrupt`` are text or token ids of the same length; ``metric``
    is ``nt.LogitDiff(correct, wrong)`` or a function of the last position's logits
    ``[rows, vocab] -> [rows]``; ``positions`` (default: all) index each point's
    second dimension, the sequence for residual-stream points. Each forward runs
    ``batch`` patched copies of the corrupted prompt, one cell each.
    """
    _check_batch(batch)
    runner, clean_ids, corrupt_ids, chosen, measure, clean_score, values = _clean_run(
        model, clean, corrupt, metric, points, positions
    )
    names = list(values)
    corrupt_scores = runner.scores(corrupt_ids, measure)
    cells = [(point, position) for point in names for position in chosen]
    scores = [
        runner.scores(corrupt_ids.expand(len(chunk), -1), measure, _restoring(chunk, values))
        for chunk in _chunks(cells, batch)
    ]
    return PatchingResult(
        "activation_patching",
        torch.cat(scores).view(len(names), len(chosen)),
        tuple(names),
        tuple(chosen),
        tuple(runner.tokens(clean_ids)[t] for t in chosen),
        measure.name,
        clean_score,
        float(corrupt_scores[0]),
    )


@raised_at_the_call
def attribution_patching(
    model: Any,
    clean: Any,
    corrupt: Any,
    metric: Metric,
    points: str | Sequence[str],
    positions: int | Sequence[int] | None = None,
) -> PatchingResult:
    """Activation patching to first order: one forward on the clean prompt, one forward and backward on the corrupted.

    ``values[i, j]`` estimates what :func:`activation_patching` measures: the
    corrupted run's metric plus ``(clean - corrupt) . gradient`` at point ``i``,
    position ``j`` (summed over the value's other dimensions), the gradient being
    the metric's on the corrupted run. Arguments as for ``activation_patching``;
    through a server the metric must be ``nt.LogitDiff(correct, wrong)``, whose
    gradient the server takes.
    """
    runner, clean_ids, corrupt_ids, chosen, measure, clean_score, clean_values = _clean_run(
        model, clean, corrupt, metric, points, positions
    )
    names = list(clean_values)
    corrupt_metric, corrupt_values, grads = runner.gradients(corrupt_ids, names, measure)
    rows = []
    for point in names:
        delta = (clean_values[point] - corrupt_values[point]).float() * grads[point].float()
        rows.append(delta[chosen].flatten(1).sum(1).cpu() + corrupt_metric)
    return PatchingResult(
        "attribution_patching",
        torch.stack(rows),
        tuple(names),
        tuple(chosen),
        tuple(runner.tokens(clean_ids)[t] for t in chosen),
        measure.name,
        clean_score,
        corrupt_metric,
    )


def _check_batch(batch: Any) -> None:
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise NeurotapError(f"batch (rows per forward) must be a positive integer, got {batch!r}")


def subject_span(runner: Runner, prompt: Any, ids: torch.Tensor, subject: Any) -> tuple[int, int]:
    """The positions ``[start, end)`` of the subject: its text within a text prompt, or positions given."""
    length = ids.shape[1]
    if isinstance(subject, str):
        if not isinstance(prompt, str):
            raise NeurotapError("a subject given as text needs the prompt as text; or pass its positions")
        start = prompt.find(subject)
        if not subject or start < 0:
            raise NeurotapError(f"the subject {subject!r} is not in the prompt {prompt!r}")
        end = start + len(subject)
        offsets = runner.tokenizer("the prompt")(prompt, return_offsets_mapping=True)["offset_mapping"]
        inside = [t for t, (a, b) in enumerate(offsets) if a < end and b > start and b > a]
        return inside[0], inside[-1] + 1
    chosen = runner.positions(subject, length)
    if not chosen or chosen != list(range(chosen[0], chosen[-1] + 1)):
        raise NeurotapError(f"the subject's positions must be consecutive, got {subject!r}")
    return chosen[0], chosen[-1] + 1


@raised_at_the_call
def causal_trace(
    model: Any,
    prompt: Any,
    subject: Any,
    target: Any,
    noise: float = 3.0,
    samples: int = 10,
    seed: int = 0,
    *,
    points: Sequence[str] | None = None,
    batch: int = 64,
) -> PatchingResult:
    """Causal tracing (Meng et al. 2022): which hidden states carry the fact that the prompt recalls.

    The subject's token embeddings (``subject``: its text in the prompt, or its
    positions) get Gaussian noise of ``noise`` times the standard deviation of the
    prompt's embeddings, ``samples`` draws from ``seed``; then each hidden state
    (``points``, default every ``blocks.N.resid_post``) at each position is restored
    from the clean run, and ``values[layer, position]`` is the probability of
    ``target`` (a token id, or the first token of a text) at the last position,
    averaged over the draws. The same draws serve every cell.
    """
    runner = Runner(model)
    ids = runner.ids(prompt)
    start, end = subject_span(runner, prompt, ids, subject)
    token = runner.token(target)
    layers = list(points) if points is not None else runner.layers()
    if "embed" not in runner.aliases:
        raise NeurotapError("causal_trace noises the token embeddings, and this model has no 'embed' alias")
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise NeurotapError(f"samples must be a positive integer, got {samples!r}")
    _check_batch(batch)
    probability = _probability(token, runner)
    clean_scores, clean = runner.capture(ids, [*layers, "embed"], probability)
    layers = [name for name in clean if name != "embed"]
    embeddings = clean["embed"]
    draws = torch.randn(samples, end - start, embeddings.shape[-1], generator=torch.Generator().manual_seed(seed))
    noises = draws * (float(noise) * embeddings.float().std())

    def corrupted(copies: int) -> Probe:
        return probe("embed", Add(noises.repeat(copies, 1, 1), index=(slice(None), slice(start, end))))

    cells = [(layer, position) for layer in layers for position in range(ids.shape[1])]
    per_forward = max(1, batch // samples)
    scores = []
    raw = [runner.aliases[layer] for layer in layers]
    if points is None and all(not split_narrowing(name)[1] for name in raw):
        # The layers before a restored one compute what the noised run computed: skip them, and start
        # from that run's hidden state with the one position restored. Half the work, the same numbers.
        noised_scores, noised = runner.capture(
            ids.expand(samples, -1), layers, probability, [corrupted(1)], rows=slice(None)
        )
        corrupt = noised_scores.mean()
        for depth, layer in enumerate(layers):
            skipped = [probe(name, Skip()) for name in raw[:depth]]
            for chunk in _chunks([cell for cell in cells if cell[0] == layer], per_forward):
                hidden = noised[layer].repeat(len(chunk), 1, 1)
                for k, (_, position) in enumerate(chunk):
                    hidden[k * samples : (k + 1) * samples, position] = clean[layer][position]
                restored = probe(raw[depth], Skip(value=hidden))
                restored_scores = runner.scores(ids.expand(hidden.shape[0], -1), probability, [*skipped, restored])
                scores.append(restored_scores.view(len(chunk), samples).mean(1))
    else:
        corrupt = runner.scores(ids.expand(samples, -1), probability, [corrupted(1)]).mean()
        for chunk in _chunks(cells, per_forward):
            restoring = [corrupted(len(chunk)), *_restoring(chunk, clean, samples)]
            restored_scores = runner.scores(ids.expand(len(chunk) * samples, -1), probability, restoring)
            scores.append(restored_scores.view(len(chunk), samples).mean(1))
    return PatchingResult(
        "causal_trace",
        torch.cat(scores).view(len(layers), ids.shape[1]),
        tuple(layers),
        tuple(range(ids.shape[1])),
        runner.tokens(ids),
        probability.name,
        float(clean_scores[0]),
        float(corrupt),
    )
