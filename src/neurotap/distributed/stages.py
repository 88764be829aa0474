"""Pipeline stages: which rank owns which part of a decoder, and the module tree each rank holds.

Every rank builds the whole module tree on the ``meta`` device (no memory), puts
stand-ins in the places other ranks own, and reads from the model folder's
safetensors files only the tensors of the parts it keeps. So the module paths,
and with them the point names, are the same on every rank as in one process.

Rank ``r`` owns the decoder layers ``ranges[r]`` (contiguous); rank 0 also owns
the embeddings, the last rank the final norm and the head. The glue code around
them (the root's and the decoder body's own ``forward``: positions, the causal
mask, the rotary tables) runs on every rank, each computing it for its layers.
"""

from __future__ import annotations

import collections
import json
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import NeurotapError
from ..model.plan import is_cache


@dataclass(frozen=True)
class Layout:
    """Where one family of causal LMs keeps its parts (module paths)."""

    layers: str  # the ModuleList of decoder layers
    first: tuple[str, ...]  # run before the layers, on rank 0
    last: tuple[str, ...]  # run after the layers, on the last rank; the head (output embeddings) last of all
    shared: tuple[str, ...]  # small parts every rank runs for its own layers (rotary tables)
    saved_as: tuple[tuple[str, str], ...] = ()  # (module path prefix, the prefix its tensors have in the files)


LAYOUTS = {
    # Llama, SmolLM2, Mistral, Qwen2, Gemma: model.layers, embed_tokens, norm, rotary_emb, lm_head
    "llama": Layout("model.layers", ("model.embed_tokens",), ("model.norm", "lm_head"), ("model.rotary_emb",)),
    "gpt2": Layout("transformer.h", ("transformer.wte", "transformer.wpe"), ("transformer.ln_f", "lm_head"), ()),
    "gpt_neox": Layout(
        "gpt_neox.layers",
        ("gpt_neox.embed_in",),
        ("gpt_neox.final_layer_norm", "lm_head"),
        ("gpt_neox.rotary_emb",),
        saved_as=(("lm_head.", "embed_out."),),  # transformers renames the head as it loads
    ),
}
# config.model_type -> layout
FAMILIES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "gemma": "llama",
    "gpt2": "gpt2",
    "gpt_neox": "gpt_neox",
}


@dataclass(frozen=True)
class Split:
    """Which rank owns which decoder layers: ``ranges[r] = (start, stop)``."""

    layout: Layout
    ranges: tuple[tuple[int, int], ...]

    @classmethod
    def even(cls, layout: Layout, layers: int, world: int) -> Split:
        if not 1 <= world <= layers:
            raise NeurotapError(
                f"a model with {layers} decoder layers can be split over 1 to {layers} ranks, not {world}"
            )
        base, extra = divmod(layers, world)
        ranges, start = [], 0
        for rank in range(world):
            stop = start + base + (rank < extra)
            ranges.append((start, stop))
            start = stop
        return cls(layout, tuple(ranges))

    @property
    def world(self) -> int:
        return len(self.ranges)

    @property
    def last(self) -> int:
        return self.world - 1

    def layer_owner(self, index: int) -> int:
        for rank, (start, stop) in enumerate(self.ranges):
            if start <= index < stop:
                return rank
        raise NeurotapError(f"no rank owns decoder layer {index}")

    def part_owner(self, path: str) -> int | None:
        """The rank owning the module at ``path`` and below; None for glue and shared parts."""
        layers = self.layout.layers + "."
        if path.startswith(layers):
            index = path[len(layers) :].partition(".")[0]
            if index.isdigit():
                return self.layer_owner(int(index))
        for parts, rank in ((self.layout.first, 0), (self.layout.last, self.last)):
            if any(path == p or path.startswith(p + ".") for p in parts):
                return rank
        return None

    def describe(self) -> list[dict[str, Any]]:
        rows = []
        for rank, (start, stop) in enumerate(self.ranges):
            layers = f"{start}-{stop - 1}" if stop - start > 1 else f"{start}"
            parts = [f"{self.layout.layers}.{layers}"]
            if rank == 0:
                parts = [*self.layout.first, *parts]
            if rank == self.last:
                parts = [*parts, *self.layout.last]
            rows.append({"rank": rank, "layers": [start, stop], "parts": parts})
        return rows


# -- stand-ins for the parts other ranks own -----------------------------------------------------------


class Link:
    """What a stand-in needs from the pipeline: the hidden states in and out, and the kind of pass."""

    def receive(self, like: torch.Tensor) -> torch.Tensor:  # pragma: no cover - replaced by the pipe
        raise NotImplementedError

    def send(self, hidden: torch.Tensor) -> None:  # pragma: no cover
        raise NotImplementedError

    generating = False


class AbsentLayer(nn.Module):
    """A decoder layer that another rank owns.

    The one just before this rank's layers receives the hidden states they start
    from; the one just after sends this rank's result on; the others pass their
    input through. With a KV cache, each appends a placeholder one unit wide, so
    the cache's length (positions, mask sizes) counts as on one process while
    only the owning rank holds the real keys and values.
    """

    def __init__(self, index: int, role: str, link: Link) -> None:
        super().__init__()
        self.index = index
        self.role = role
        self.link = link

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        past_key_values = kwargs.get("past_key_values")
        if past_key_values is None:  # GPT-2 passes its cache positionally
            past_key_values = next((a for a in args if is_cache(a)), None)
        if past_key_values is not None:
            rows, length = hidden_states.shape[0], hidden_states.shape[1]
            empty = hidden_states.new_zeros(rows, 1, length, 1)
            past_key_values.update(empty, empty, self.index)
        if self.role == "receive":
            return self.link.receive(hidden_states)
        if self.role == "send":
            self.link.send(hidden_states)
        return hidden_states


class AbsentEmbedding(nn.Module):
    """The embeddings on a rank after the first: a zero tensor of the right shape, which nothing reads."""

    def __init__(self, hidden: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.hidden = hidden
        self.dtype = dtype

    def forward(self, ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros(*ids.shape, self.hidden, dtype=self.dtype, device=ids.device)


class AbsentPassThrough(nn.Module):
    """The final norm on a rank before the last."""

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden


class AbsentHead(nn.Module):
    """The head on a rank before the last: logits come from the last rank (see the pipe).

    A plain forward gets no columns (nothing reads them); a generation step gets
    zeros of the vocabulary's width, so that generate's own logits processing
    runs unchanged before the last rank's scores replace them.
    """

    def __init__(self, vocab: int, link: Link) -> None:
        super().__init__()
        self.vocab = vocab
        self.link = link

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        width = self.vocab if self.link.generating else 0
        return hidden.new_zeros(*hidden.shape[:-1], width)


# keep the tapped-forward machinery off the stand-ins: their code is not the model's, and no point of theirs
# is ever offered (every rank's inventory keeps only the points its own parts produce)
for _stand_in in (AbsentLayer, AbsentEmbedding, AbsentPassThrough, AbsentHead):
    _stand_in.__module__ = "torch.nn.modules.neurotap_stand_ins"


# -- building a stage ----------------------------------------------------------------------------------


@dataclass
class Stage:
    module: nn.Module
    split: Split
    rank: int
    parameters: dict[str, int]  # file key -> element count, of the tensors this rank loaded
    peak_rss_mb: float


def peak_rss_mb() -> float:
    """The most memory this process has held (its peak resident set, VmHWM), in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def family_of(config: Any) -> str:
    family = FAMILIES.get(getattr(config, "model_type", ""))
    if family is None:
        known = ", ".join(sorted(FAMILIES))
        raise NeurotapError(
            f"sharded serving supports the model types {known} so far, not {getattr(config, 'model_type', '?')!r}"
        )
    return family


def model_class(config: Any) -> type:
    """The class that saved the model (``architectures``), else the causal LM of its model type."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    saved_as = getattr(transformers, (getattr(config, "architectures", None) or [""])[0], None)
    return saved_as if saved_as is not None else MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]


def check_folder(folder: Path) -> None:
    """Fail before any rank starts on a model that cannot be sharded."""
    import transformers

    family_of(transformers.AutoConfig.from_pretrained(folder))
    _tensor_files(folder)


def build_stage(
    folder: Path,
    rank: int,
    world: int,
    link: Link,
    device: torch.device,
    *,
    attn_implementation: str = "eager",
) -> Stage:
    """Rank ``rank``'s module tree for the model in ``folder`` on ``device``, holding only its own part's
    weights."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    layout = LAYOUTS[family_of(config)]
    cls = model_class(config)
    from accelerate import init_empty_weights

    # parameters on meta (no memory); buffers as the model computes them, since those it does not save
    # (embedding scales, rotary tables) are in no file
    with init_empty_weights(include_buffers=False):
        module = cls._from_config(config, attn_implementation=attn_implementation)
    module.eval()
    layers: nn.ModuleList = module.get_submodule(layout.layers)
    split = Split.even(layout, len(layers), world)
    start, stop = split.ranges[rank]
    files = _tensor_files(folder)
    dtype = _file_dtype(files)

    for index in range(len(layers)):
        if start <= index < stop:
            continue
        role = "receive" if index == start - 1 else "send" if index == stop else "pass"
        layers[index] = AbsentLayer(index, role, link)
    if rank != 0:
        for path in layout.first:
            _set(module, path, AbsentEmbedding(config.hidden_size, dtype))
    if rank != split.last:
        for path in layout.last:
            stand_in = AbsentHead(config.vocab_size, link) if path == layout.last[-1] else AbsentPassThrough()
            _set(module, path, stand_in)
    for path in layout.shared:  # computed, not loaded: rebuilt on the CPU from the config
        old = module.get_submodule(path)
        with torch.device("cpu"):
            _set(module, path, type(old)(config=config))

    tied = {**_saved_names(layout, files), **_tied_names(module, config)}
    loaded = _load_owned(module, files, tied, device)
    module.to(device)  # the buffers the model computed, on the CPU (the weights were read onto the device)
    return Stage(module, split, rank, loaded, peak_rss_mb())


def _set(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def _tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise NeurotapError(
            f"sharded serving reads safetensors files; {folder} has neither model.safetensors nor "
            "model.safetensors.index.json (save the model with save_pretrained(..., safe_serialization=True))"
        )
    from safetensors import safe_open

    with safe_open(single, framework="pt") as handle:
        return {name: single for name in handle.keys()}


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _file_dtype(files: dict[str, Path]) -> torch.dtype:
    """The floating dtype the weights are saved in, read from a header, not from a tensor."""
    from safetensors import safe_open

    for name, path in files.items():
        with safe_open(path, framework="pt") as handle:
            dtype = _DTYPES.get(handle.get_slice(name).get_dtype())
        if dtype is not None:
            return dtype
    return torch.float32


def _saved_names(layout: Layout, files: dict[str, Path]) -> dict[str, str]:
    """Parameter name -> the name the files hold it under, where transformers renames tensors as it loads."""
    renamed = {}
    for prefix, saved in layout.saved_as:
        renamed.update({prefix + key[len(saved) :]: key for key in files if key.startswith(saved)})
    return renamed


def _tied_names(module: nn.Module, config: Any) -> dict[str, str]:
    """Parameter name -> the name it is saved under when weights are tied (the head and the embeddings)."""
    if not getattr(config, "tie_word_embeddings", False):
        return {}
    tied = getattr(module, "_tied_weights_keys", None) or {}
    if not isinstance(tied, dict):
        return {}
    both = dict(tied)
    both.update({source: target for target, source in tied.items()})
    return both


def _load_owned(
    module: nn.Module, files: dict[str, Path], tied: dict[str, str], device: torch.device
) -> dict[str, int]:
    """Replace every meta parameter left in the tree, and every buffer the files hold, with its tensor from them.

    Only the tensors of the parts this rank keeps are read, each straight from
    its file onto ``device`` with ``safe_open``; a tensor that the file holds
    once for two tied names is read once and shared. Buffers the files lack
    keep the value the model computed for them.
    """
    from safetensors import safe_open

    wanted: dict[str, list[tuple[nn.Module, str, bool]]] = {}
    for owner_path, owner in module.named_modules():
        for kind, table in (("parameter", owner._parameters), ("buffer", owner._buffers)):
            for name, tensor in table.items():
                if tensor is None:
                    continue
                full = f"{owner_path}.{name}" if owner_path else name
                key = full if full in files else tied.get(full, full)
                if tensor.device.type != "meta":
                    if kind == "buffer" and key in files:
                        wanted.setdefault(key, []).append((owner, name, False))
                    continue
                if key not in files:
                    if kind == "buffer":
                        raise NeurotapError(f"the buffer {full!r} is in no safetensors file of the model folder")
                    raise NeurotapError(f"the parameter {full!r} is in no safetensors file of the model folder")
                wanted.setdefault(key, []).append((owner, name, kind == "parameter"))
    by_file: dict[Path, list[str]] = {}
    for key in wanted:
        by_file.setdefault(files[key], []).append(key)
    counts: dict[str, int] = {}
    for path, keys in by_file.items():
        with safe_open(path, framework="pt", device=str(device)) as handle:
            for key in keys:
                tensor = handle.get_tensor(key)
                if tensor.device.type == "cpu":
                    # a tensor on the CPU is mapped from the file, its pages read only when first used (an
                    # embedding's rows one by one): read them all now, so that the first requests do not, and
                    # the rank's peak RSS once loaded counts its weights
                    tensor.reshape(-1).view(torch.uint8)[:: resource.getpagesize()].sum()
                counts[key] = tensor.numel()
                shared: nn.Parameter | None = None
                for owner, name, is_parameter in wanted[key]:
                    if is_parameter:
                        if shared is None:
                            shared = nn.Parameter(tensor, requires_grad=owner._parameters[name].requires_grad)
                        owner._parameters[name] = shared
                    else:
                        owner._buffers[name] = tensor
    return counts


def point_owners(inventory: Any, split: Split, rank: int) -> tuple[list[Any], list[Any], dict[str, bool]]:
    """The points this rank's values are real at, in execution order, and its static sites.

    Returns ``(points, static, between)``: the inventory's points that this rank
    computes for real, the static sites it owns, and, by name, glue points that
    fire between decoder layers (each call another layer's, so no single rank
    sees them whole). A glue site the dry run did not reach (the loss, without
    labels) runs where the last site before it in the same code ran.
    """
    names = list(inventory.points)
    in_layers = [i for i, n in enumerate(names) if _under(inventory.points[n].module, split.layout.layers)]
    first, last = (in_layers[0], in_layers[-1]) if in_layers else (len(names), -1)
    between: dict[str, bool] = {}

    def owner_at(position: int, point: Any) -> int | None:
        owner = split.part_owner(point.module)
        if owner is None and not _under(point.module, split.layout.layers):
            if position > last:
                return split.last
            if position > first:
                between[point.name] = True
                return 0  # listed once; refused when probed
            return rank  # before the layers: every rank computes it for itself
        return owner

    points = [point for position, point in enumerate(inventory.points.values()) if owner_at(position, point) == rank]
    sites: dict[tuple, list[tuple[int, int]]] = collections.defaultdict(list)  # a function's sites that ran
    for position, point in enumerate(inventory.points.values()):
        if point.kind == "op":
            sites[(point.module, point.scope[:-1])].append((_line(point), position))
    static = []
    for name, point in inventory.static.items():
        if name in inventory.points:
            continue
        ran_before = [
            position for line, position in sites.get((point.module, point.scope[:-1]), []) if line <= _line(point)
        ]
        if point.kind == "op" and ran_before:
            owner = owner_at(max(ran_before), point)
        else:
            owner = split.part_owner(point.module)
            owner = rank if owner is None else owner
        if owner == rank:
            static.append(point)
    return points, static, between


def _line(point: Any) -> int:
    """The line of the model's code a point's source names (``file.py:123  code``)."""
    location = point.source.split("  ")[0]
    number = location.rpartition(":")[2]
    return int(number) if number.isdigit() else 0


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")
