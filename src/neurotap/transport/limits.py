"""The server's settings, and what one request may cost it, checked before it runs.

:class:`ServerSettings` are the options of ``neurotap serve`` (``--help`` names
each) and :class:`Limits` the part of them that bounds one request. A request's
arguments are plain data by the time they get here (:mod:`.wire`); this module
bounds the work they ask for: :func:`check_request` refuses a request whose
generation settings, token count or estimated activation memory are over them,
with an error that says which setting to change. While a request
runs, :func:`check_selection` bounds what a patch's ``index=`` selects and what
a ``TopK`` keeps, before the patch allocates it; an ``SAE``'s top examples
(``examples x d_sae``), known from the patch alone, are bounded before the pass,
and its dense feature activations (``tokens x d_sae`` per call) count towards the
request's memory estimate, as do the tensors the request sends (patch values, SAE
weights, directions, indices: :func:`sent_bytes`).

The memory estimate is deliberately rough (activations of one layer at a time,
attention scores, logits, the KV cache, the outputs asked for); it exists to
refuse requests that are orders of magnitude too large, not to pack memory
tightly.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..errors import NeurotapError
from ..probes import SAE, Probability
from .wire import RunRequest, WireError

MIN_TOKEN_LENGTH = 16


class RequestTooCostlyError(WireError):
    """A request asks for more work or memory than the server's limits allow."""


@dataclass(frozen=True)
class Limits:
    max_new_tokens: int = 1024
    max_beams: int = 8
    max_return_sequences: int = 16
    cache_implementations: tuple[str, ...] = ("dynamic",)
    max_request_tokens: int = 32768  # positions computed by one request: rows x (prompt + new tokens)
    max_request_memory: int = 4 << 30  # estimated activation bytes of one request
    max_input_elements: int = 1 << 16  # of one input tensor
    max_probes: int = 512  # probes (and patches) in one request
    max_selection_elements: int = 1 << 24  # what an index= may select, beyond the value's own size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ServerSettings:
    name: str = "model"
    tokens: list[str] = field(default_factory=list)
    allow_code: bool = False
    request_timeout: float = 120.0
    idle_timeout: float | None = None
    max_request_bytes: int = 256 << 20
    max_inflight_bytes: int = 1 << 30  # request bodies being received at once, all connections together
    max_session_bytes: int = 1 << 30
    max_total_bytes: int = 4 << 30
    max_sessions_per_token: int = 64
    max_experiments_per_token: int = 4  # the inspector's, under way or waiting
    max_batch: int = 32
    session_timeout: float = 3600.0
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    max_connections: int = 256
    allowed_hosts: list[str] = field(default_factory=list)  # besides the bound address and loopback names
    allowed_origins: list[str] = field(default_factory=list)  # web pages that may call the server
    limits: Limits = field(default_factory=Limits)

    @property
    def max_owner_bytes(self) -> int:
        """What one token's sessions may record together: the tokens share ``max_total_bytes`` evenly."""
        return self.max_total_bytes // max(len(self.tokens), 1)

    def check(self) -> None:
        """Refuse settings that cannot work, naming the option."""
        positive = {
            "--request-timeout": self.request_timeout,
            "--session-timeout": self.session_timeout,
            "--header-timeout": self.header_timeout,
            "--body-timeout": self.body_timeout,
            "--max-request-bytes": self.max_request_bytes,
            "--max-inflight-bytes": self.max_inflight_bytes,
            "--max-probes": self.limits.max_probes,
            "--max-session-bytes": self.max_session_bytes,
            "--max-total-bytes": self.max_total_bytes,
            "--max-sessions-per-token": self.max_sessions_per_token,
            "--max-experiments-per-token": self.max_experiments_per_token,
            "--max-batch": self.max_batch,
            "--max-connections": self.max_connections,
            "--max-new-tokens": self.limits.max_new_tokens,
            "--max-beams": self.limits.max_beams,
            "--max-return-sequences": self.limits.max_return_sequences,
            "--max-request-tokens": self.limits.max_request_tokens,
            "--max-request-memory": self.limits.max_request_memory,
            "--max-input-elements": self.limits.max_input_elements,
            "--max-selection-elements": self.limits.max_selection_elements,
        }
        if self.idle_timeout is not None:
            positive["--idle-timeout"] = self.idle_timeout
        for option, value in positive.items():
            if not (isinstance(value, (int, float)) and value > 0 and value == value and value != float("inf")):
                raise NeurotapError(f"{option} must be a positive number, got {value}")
        if self.max_session_bytes > self.max_total_bytes:
            raise NeurotapError(
                f"--max-session-bytes ({self.max_session_bytes}) is more than --max-total-bytes "
                f"({self.max_total_bytes}), the limit for all sessions together"
            )
        if self.max_request_bytes > self.max_inflight_bytes:
            raise NeurotapError(
                f"--max-request-bytes ({self.max_request_bytes}) is more than --max-inflight-bytes "
                f"({self.max_inflight_bytes}), the limit for all bodies being received at once"
            )
        for token in self.tokens:
            if len(token) < MIN_TOKEN_LENGTH:
                raise NeurotapError(f"tokens must be at least {MIN_TOKEN_LENGTH} characters long")


@dataclass(frozen=True)
class ModelShape:
    """The sizes that a request's cost depends on; zeros where the model does not say."""

    layers: int = 0
    hidden: int = 0
    intermediate: int = 0
    vocab: int = 0
    heads: int = 0
    kv_width: int = 0  # key (= value) features per position and layer
    max_positions: int = 0
    default_new_tokens: int = 0  # the model's generation_config.max_new_tokens, or 0 where it sets max_length
    default_max_length: int = 20
    value_bytes: int = 4

    @classmethod
    def of(cls, module: torch.nn.Module) -> ModelShape:
        config = getattr(module, "config", None)
        if config is None:
            return cls()
        text = config.get_text_config() if hasattr(config, "get_text_config") else config

        def first(*names: str, default: int = 0) -> int:
            for name in names:
                value = getattr(text, name, None)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    return value
            return default

        hidden = first("hidden_size", "n_embd", "d_model")
        heads = first("num_attention_heads", "n_head", default=1)
        head_dim = first("head_dim", default=hidden // heads if heads else 0)
        generation = getattr(module, "generation_config", None)
        parameter = next(iter(module.parameters()), None)
        return cls(
            layers=first("num_hidden_layers", "n_layer", "num_layers"),
            hidden=hidden,
            intermediate=first("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
            vocab=first("vocab_size"),
            heads=heads,
            kv_width=first("num_key_value_heads", default=heads) * head_dim,
            max_positions=first("max_position_embeddings", "n_positions"),
            default_new_tokens=int(getattr(generation, "max_new_tokens", None) or 0),
            default_max_length=int(getattr(generation, "max_length", None) or 20),
            value_bytes=parameter.element_size() if parameter is not None else 4,
        )


def _rows_and_length(request: RunRequest) -> tuple[int, int]:
    for value in [*request.args, *request.kwargs.values()]:
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return (value.shape[0], value.shape[1]) if value.dim() >= 2 else (1, value.shape[0])
    return 1, 0


def _new_tokens(request: RunRequest, length: int, shape: ModelShape) -> int:
    kwargs = request.kwargs
    if kwargs.get("max_new_tokens") is not None:
        return kwargs["max_new_tokens"]
    if kwargs.get("max_length") is not None:
        return max(kwargs["max_length"] - length, 0)
    return shape.default_new_tokens or max(shape.default_max_length - length, 0)


def estimate(request: RunRequest, shape: ModelShape) -> tuple[int, int]:
    """(positions computed, activation bytes) of a request, roughly."""
    rows, length = _rows_and_length(request)
    kwargs = request.kwargs
    b = shape.value_bytes
    per_position = 4 * shape.hidden + 2 * shape.intermediate  # one layer's live activations
    if request.op == "generate":
        streams = rows * max(kwargs.get("num_beams") or 1, 1) * max(kwargs.get("num_return_sequences") or 1, 1)
        new = _new_tokens(request, length, shape)
        total = length + new
        memory = 2 * shape.layers * streams * total * shape.kv_width * b  # the KV cache
        memory += streams * length * per_position * b + 2 * streams * shape.heads * length * length * b
        memory += 2 * streams * shape.vocab * 4  # one step's logits and scores
        kept = sum(bool(kwargs.get(k)) for k in ("output_scores", "output_logits"))
        memory += kept * new * streams * shape.vocab * 4
        if kwargs.get("output_attentions"):
            memory += new * shape.layers * streams * shape.heads * total * b + shape.layers * streams * length**2 * b
        if kwargs.get("output_hidden_states"):
            memory += (shape.layers + 1) * streams * total * shape.hidden * b
        return streams * total, memory
    positions = rows * length
    attention = shape.heads * rows * length * length * b
    memory = positions * shape.vocab * 4 + positions * per_position * b + 2 * attention
    if kwargs.get("use_cache", True):
        memory += 2 * shape.layers * positions * shape.kv_width * b
    if kwargs.get("output_hidden_states"):
        memory += (shape.layers + 1) * positions * shape.hidden * b
    if kwargs.get("output_attentions"):
        memory += shape.layers * attention
    if request.op == "backward":  # every layer's activations stay for the backward, and their gradients
        memory += 2 * shape.layers * (positions * (2 * per_position) * b + 2 * attention) + positions * shape.vocab * 4
    return positions, memory


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def check_request(request: RunRequest, limits: Limits, shape: ModelShape) -> int:
    """Refuse a request that asks for more than ``limits``; its estimated activation bytes otherwise."""
    if len(request.probes) > limits.max_probes:
        raise RequestTooCostlyError(
            f"this request has {len(request.probes)} probes; this server takes {limits.max_probes} (--max-probes): "
            "probe fewer points, or record several values with one probe's index="
        )
    for spec in request.probes:
        if isinstance(spec.fn, SAE) and spec.fn.examples * spec.fn.d_sae > limits.max_selection_elements:
            sae = spec.fn
            raise RequestTooCostlyError(
                f"SAE at {spec.point!r}: examples={sae.examples} for its {sae.d_sae} features keeps "
                f"{sae.examples * sae.d_sae} top examples; this server allows {limits.max_selection_elements} "
                f"(--max-selection-elements): ask for at most {limits.max_selection_elements // sae.d_sae} examples"
            )
    for value in [*request.args, *request.kwargs.values()]:
        if isinstance(value, torch.Tensor) and value.numel() > limits.max_input_elements:
            raise RequestTooCostlyError(
                f"an input tensor has {value.numel()} elements; this server takes {limits.max_input_elements} "
                "(--max-input-elements): split the request"
            )
    rows, length = _rows_and_length(request)
    if shape.max_positions and length > shape.max_positions:
        raise RequestTooCostlyError(
            f"an input of length {length} is longer than the model's {shape.max_positions} positions "
            "(max_position_embeddings)"
        )
    kwargs = request.kwargs
    if request.op == "generate":
        new = _new_tokens(request, length, shape)
        if new > limits.max_new_tokens:
            source = "max_new_tokens" if "max_new_tokens" in kwargs else "the model's default generation length"
            raise RequestTooCostlyError(
                f"{source} asks for {new} new tokens; this server generates at most {limits.max_new_tokens} "
                "(--max-new-tokens): pass max_new_tokens=... within it"
            )
        for name, bound, flag in (
            ("num_beams", limits.max_beams, "--max-beams"),
            ("num_return_sequences", limits.max_return_sequences, "--max-return-sequences"),
        ):
            if (kwargs.get(name) or 1) > bound:
                raise RequestTooCostlyError(f"{name}={kwargs[name]} is over this server's {bound} ({flag})")
        cache = kwargs.get("cache_implementation")
        if cache is not None and cache not in limits.cache_implementations:
            raise RequestTooCostlyError(
                f"cache_implementation={cache!r} is not offered by this server; it offers "
                f"{', '.join(limits.cache_implementations)} (--cache-implementations)"
            )
        if shape.max_positions and length + new > shape.max_positions:
            raise RequestTooCostlyError(
                f"{length} prompt tokens and {new} new ones are more than the model's {shape.max_positions} "
                "positions (max_position_embeddings)"
            )
    positions, memory = estimate(request, shape)
    features = _sae_feature_bytes(request, positions)
    sent = sent_bytes(request)
    memory += features + sent
    if positions > limits.max_request_tokens:
        raise RequestTooCostlyError(
            f"this request computes {positions} positions (rows x tokens, beams and return sequences included); "
            f"this server takes {limits.max_request_tokens} per request (--max-request-tokens): split it"
        )
    if memory > limits.max_request_memory and 2 * sent >= memory:
        raise RequestTooCostlyError(
            f"the tensors this request sends (patch values, SAE weights, directions, indices, inputs) take "
            f"{_size(sent)}, about {_size(memory)} with its activations; this server allows "
            f"{_size(limits.max_request_memory)} per request (--max-request-memory): send smaller tensors "
            "(an SAE with fewer features, a value for index=... only), or start the server with a larger "
            "--max-request-memory"
        )
    if memory > limits.max_request_memory and features:
        saes = [spec for spec in request.probes if isinstance(spec.fn, SAE)]
        widths = " + ".join(f"{spec.fn.d_sae} at {spec.point!r}" for spec in saes[:3]) + (" + ..." if saes[3:] else "")
        # fewer rows or shorter ones cost no more a token; what the request sends costs the same at any length
        fitting = positions * max(limits.max_request_memory - sent, 0) // (memory - sent)
        raise RequestTooCostlyError(
            f"this request's SAE features ({positions} tokens x {widths} features, dense in each call) would need, "
            f"with its other activations, about {_size(memory)}; this server allows "
            f"{_size(limits.max_request_memory)} per request (--max-request-memory): send at most {fitting} tokens "
            "a request, or start the server with a larger --max-request-memory"
        )
    if memory > limits.max_request_memory:
        raise RequestTooCostlyError(
            f"this request would need about {_size(memory)} of activations; this server allows "
            f"{_size(limits.max_request_memory)} per request (--max-request-memory): send fewer rows or tokens"
        )
    return memory


def sent_bytes(request: RunRequest) -> int:
    """The bytes of the tensors a request brings along (its inputs, its patches' values, directions, indices and
    SAE weights, its loss's targets): held from its arrival until it is answered, and read in every call."""

    def size(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, (list, tuple)):
            return sum(size(v) for v in value)
        if isinstance(value, dict):
            return sum(size(v) for v in value.values())
        if dataclasses.is_dataclass(value) and not isinstance(value, type):  # a patch or a loss
            return sum(size(getattr(value, f.name)) for f in dataclasses.fields(value))
        return 0

    return size([request.args, request.kwargs, request.loss, [spec.fn for spec in request.probes]])


def _sae_feature_bytes(request: RunRequest, positions: int) -> int:
    """What the SAEs of a request hold at once in one call: pre-activations, features and their mask,
    ``[tokens, d_sae]`` each, at most every position of the pass at once."""
    total = 0
    for spec in request.probes:
        if isinstance(spec.fn, SAE):
            total += positions * spec.fn.d_sae * (3 * spec.fn.W_enc.element_size() + 1)
    return total


# -- while a request runs ------------------------------------------------------------------------------


def selection_size(shape: tuple[int, ...], index: Any) -> int:
    """An upper bound on the elements ``value[index]`` holds for a value of ``shape``, without indexing."""
    parts = list(index) if isinstance(index, tuple) else [index]
    used = sum(
        p.dim() if isinstance(p, torch.Tensor) and p.dtype == torch.bool else 0 if p is None or p is Ellipsis else 1
        for p in parts
    )
    dims = list(shape)
    size, broadcast, cursor = 1, [], 0
    for part in parts:
        if part is None:
            continue
        if part is Ellipsis:
            skipped = max(len(dims) - used, 0)
            for d in dims[cursor : cursor + skipped]:
                size *= d
            cursor += skipped
        elif isinstance(part, torch.Tensor) and part.dtype == torch.bool:
            size *= math.prod(dims[cursor : cursor + part.dim()]) if part.dim() else 1
            cursor += part.dim()
        elif isinstance(part, (torch.Tensor, list)):
            broadcast.append(tuple(torch.as_tensor(part).shape) if isinstance(part, list) else tuple(part.shape))
            cursor += 1
        else:  # an int drops its dimension; a slice keeps at most all of it
            if isinstance(part, slice) and cursor < len(dims):
                size *= dims[cursor]
            cursor += 1
    for d in dims[cursor:]:
        size *= d
    if broadcast:
        try:
            size *= math.prod(torch.broadcast_shapes(*broadcast))
        except RuntimeError:
            pass  # indexing will fail with its own message
    return size


def check_selection(point: str, patch: Any, value: Any, limits: Limits) -> None:
    """Refuse a patch whose ``index=`` (or ``TopK``) would allocate far more than the value it acts on."""
    if not isinstance(value, torch.Tensor):
        return
    index = getattr(patch, "index", None)
    selected = value.numel() if index is None else selection_size(tuple(value.shape), index)
    bound = max(value.numel(), limits.max_selection_elements)
    entries = 1
    if isinstance(patch, Probability) and not isinstance(patch.token, int):
        # it keeps the selection's entries ``token`` of the last dimension: with an index, that dimension's
        # size is not known here, so every selected element is counted once per token
        entries = torch.as_tensor(patch.token).numel()
        exact = index is None and value.dim()
        selected = (selected // max(value.shape[-1], 1) if exact else selected) * entries
    if selected > bound:
        tokens = f" with {entries} token entries" if entries > 1 else ""
        raise RequestTooCostlyError(
            f"{type(patch).__name__} at {point!r}: index={_brief(index)}{tokens} select about {selected} elements "
            f"of a value of shape {tuple(value.shape)}; this server allows {bound} (--max-selection-elements)"
        )
    k = getattr(patch, "k", None)
    if isinstance(k, int) and value.dim() and not isinstance(patch, SAE):  # an SAE's k keeps nothing across calls
        try:
            units = value.shape[getattr(patch, "dim", -1)]
        except IndexError:
            return  # the patch fails with its own message
        units = units if index is None else min(units, selected)
        if k * units * (2 + value.dim()) > bound:
            raise RequestTooCostlyError(
                f"{type(patch).__name__} at {point!r}: k={k} for {units} units keeps {k * units} entries; "
                f"this server allows {bound} elements (--max-selection-elements): use a smaller k or an index"
            )


def _brief(index: Any) -> str:
    text = repr(index) if not isinstance(index, tuple) else repr(tuple(_brief_part(p) for p in index))
    return text if len(text) <= 80 else text[:77] + "..."


def _brief_part(part: Any) -> Any:
    return f"tensor{list(part.shape)}" if isinstance(part, torch.Tensor) else part
