"""The wire format between ``nt.connect`` clients and ``neurotap serve``: the one place that defines it.

A message is one safetensors file. Its tensors are the message's tensors; its
``__metadata__["neurotap"]`` entry is a JSON document describing everything else,
in which a tensor appears as ``{"$tensor": "t0"}`` (its name in the file). Other
values that JSON lacks are tagged the same way:

=======================  ===========================================================
Python                   JSON
=======================  ===========================================================
None, bool, int, float,  themselves (ints must fit in 64 bits)
str
list                     a JSON list
tuple                    ``{"$tuple": [...]}``
dict (str keys)          ``{"$dict": {...}}``
dict (other keys)        ``{"$map": [[key, value], ...]}``: a key is None, a bool, an int, a
                         float, a str, or a tuple of at most 64 of those
set, frozenset           ``{"$set": [...]}``, ``{"$frozenset": [...]}`` of such keys
namedtuple               ``{"$namedtuple": "Pair", "fields": [["x", value], ...]}``: the
                         name and at most 64 field names are identifiers of at most 100
                         characters (fields unique, none starting with ``_``); the decoder
                         builds a namedtuple class of that name and those fields, nothing
                         is looked up or imported, and a message holds at most 64 of them
``...``                  ``{"$ellipsis": null}``
slice                    ``{"$slice": [start, stop, step]}``
torch.Tensor             ``{"$tensor": "t0"}``
a patch (nt.Mean, ...)   ``{"$patch": "Mean", "fields": {field: value, ...}}``
a loss (CrossEntropy)    ``{"$loss": "CrossEntropy", "fields": {...}}``
a model output mapping   ``{"$output": {...}}`` (transformers' ModelOutput and the like)
a value the server       ``{"$unsupported": "TypeName"}``, in its place: the client gets a
could not send           :class:`NotSent` string there and a :class:`~neurotap.NotSentWarning`
=======================  ===========================================================

Requests are encoded strictly: a value that cannot travel raises :class:`WireError` at the
client. What the server sends back (outputs, traces, recordings) is encoded leniently: such a
value (an object of the probe's own class, an int over 64 bits, a tensor as a dict key, a tensor
safetensors cannot hold: sparse, complex128, ...) is replaced by ``$unsupported`` where it was,
never left out (an output's KV cache alone is left out). A message nests at most 48 levels deep
(the document itself is level 0); in an answer, a container 48 levels down that holds more (a list
holding itself, say) is the placeholder.

A probe is ``{"point": name, "grad": bool, "fn": <patch>}`` (and ``"optional": true``
for one the pass may not reach; ``"trace": true`` for one whose saves come back in
the answer, ``"trace": [{"point", "grad", "data"}, ...]`` in execution order,
instead of staying in the session: ``RemoteModel.run``), or, only for servers
started with ``--allow-code``, ``{"point", "grad", "fn": {"$code": <uint8 tensor>}}``
holding the function pickled with cloudpickle. A request's ``loss`` is a built-in
loss (``$loss``) or, likewise only with ``--allow-code``, ``{"$code": <uint8 tensor>}``:
a function of the model's output returning one number. The server never unpickles
anything unless it was started with ``--allow-code``; the client never unpickles
anything at all.

Keyword arguments a request passes on to the model are plain data from an
allow-list (:data:`ARGUMENTS`, per op): token ids, masks and positions as integer
tensors, ``inputs_embeds`` as a float tensor, flags, counts, sampling numbers and
token-id lists; ``cache_implementation`` only from the server's set. Anything
else (``trust_remote_code``, ``custom_generate``, ``streamer``, processors, cache
objects, an argument that names a file, a module or a class) is refused with a
:class:`WireError` naming it. Positional arguments are tensors only. A server
started with ``--allow-code`` also passes on other plain-data arguments, since
its clients may run code anyway. How much work the arguments may ask for is
bounded separately, by the server's limits (:mod:`.limits`).

A message's safetensors header is at most :data:`MAX_HEADER_BYTES` and its JSON
document at most :data:`MAX_DOCUMENT_BYTES`, whatever the size of its tensors.

A model's tokenizer travels as plain JSON (``GET /v1/tokenizer``, see
:func:`describe_tokenizer`): the ``tokenizers`` library's own serialisation of
it (``tokenizer.json``), its special tokens, maximum length, padding side and
chat template. The client rebuilds a fast tokenizer from that; nothing is
pickled, and models whose tokenizer is not a fast one send ``null``.

Every request carries the header ``X-Neurotap-Protocol: 1``; a server speaking
another version refuses it with a message saying which side to upgrade. Errors
come back as JSON ``{"error": type, "message": ..., "traceback": ... | null}``.
Recordings stream as frames: an 8-byte little-endian length, then a message
``{"point": name, "data": {...}}``; a zero length ends the stream.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import keyword
import math
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import NeurotapError, PatchError
from ..model.losses import LOSSES, CrossEntropy, LogitDiff, is_builtin_loss, logits_of  # noqa: F401  (re-exported)
from ..model.trace import Trace
from ..probes import PATCHES, SAE, Custom, Patch, Record

PROTOCOL = 1
PROTOCOL_HEADER = "X-Neurotap-Protocol"
SESSION_HEADER = "X-Neurotap-Session"
MEDIA_TYPE = "application/vnd.neurotap+safetensors"
FRAMES_MEDIA_TYPE = "application/vnd.neurotap.frames"

_METADATA_KEY = "neurotap"
_MAX_DEPTH = 48
_MAX_NAME = 100  # characters of a namedtuple's name or field name, and of a placeholder's type name
_MAX_ITEMS = 64  # fields of a namedtuple, items of a tuple key, namedtuple classes in one message
MAX_HEADER_BYTES = 4 << 20  # the safetensors header: tensor names, shapes and offsets, plus the document
MAX_DOCUMENT_BYTES = 1 << 20
MAX_INDEX_ELEMENTS = 1 << 20  # of one index tensor in a patch
_INT64 = 2**63
_FRAME_LENGTH = struct.Struct("<Q")
OPS = ("forward", "generate", "backward")


class WireError(NeurotapError, ValueError):
    """A message that does not follow the wire format."""


class CodeNotAllowedError(NeurotapError, PermissionError):
    """A probe function sent as code to a server that does not run code."""


CODE_NOT_ALLOWED = (
    "this server does not run code sent by clients, so probes must be the library's own patches "
    "(nt.Record, nt.Mean, nt.Sum, nt.Max, nt.Norm, nt.Project, nt.TopK, nt.Zero, nt.Add, nt.Replace, nt.Scale). "
    "To run your own probe functions, the server's operator can start it with `neurotap serve --allow-code`; "
    "that lets every client holding a token run any Python code on the server machine as the server's user"
)

LOSS_NOT_ALLOWED = (
    "the loss is a Python function, and this server does not run code sent by clients: pass a built-in loss, "
    "nt.CrossEntropy(targets) or nt.LogitDiff(correct, wrong). To run your own loss functions, the server's "
    "operator can start it with `neurotap serve --allow-code`; that lets every client holding a token run any "
    "Python code on the server machine as the server's user"
)


# -- requests and results ---------------------------------------------------------------------------


@dataclass
class ProbeSpec:
    """One probe of a request: a patch (plain data) or, with code allowed, any function."""

    point: str
    fn: Callable[..., Any]
    grad: bool = False
    optional: bool = False  # the pass may not reach the point (a branch not taken) without failing
    trace: bool = False  # what it saves comes back with the answer (RunResult.trace), not kept in the session


@dataclass
class RunRequest:
    """A forward, generate or backward (forward, then ``loss.backward()``) pass with probes."""

    op: str
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    probes: list[ProbeSpec] = field(default_factory=list)
    outputs: list[str] | None = None  # which output fields to send back; None: every tensor
    loss: Any = None  # for "backward": CrossEntropy, LogitDiff or (with code allowed) a function of the output
    stop_at: str | None = None  # a forward ends once this point has fired and returns the value there
    session: str = ""
    timeout: float | None = None  # seconds it may run once its pass starts
    deadline: float | None = None  # time.time() after which the server gives up on it, queued or running
    cancelled: bool = False  # set by the server when the client goes away: the request stops and keeps nothing
    owner: str = ""  # whose share of the server-wide recording limit its recordings take (a token's label)


class Output(dict):
    """A model output mapping (transformers' ModelOutput) after the trip: keys or attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"the output has no field {name!r}; it has {list(self)}") from None


@dataclass
class ErrorInfo:
    status: int
    type: str
    message: str
    traceback: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.type, "message": self.message, "traceback": self.traceback}


@dataclass
class RunResult:
    output: Any = None
    loss: float | None = None
    error: ErrorInfo | None = None
    trace: list[dict[str, Any]] | None = None  # {point, grad, data} of each traced probe, in execution order


def traced_probes(record: Sequence[str] | Mapping[str, Patch], grad: Sequence[str] = ()) -> list[ProbeSpec]:
    """The probes of a ``run``: whatever they read comes back in the answer's trace.

    ``record`` names the points, or maps each to the patch that reads its values there.
    """
    readings = record if isinstance(record, Mapping) else dict.fromkeys(record, Record())
    traced = [ProbeSpec(name, reading, trace=True) for name, reading in readings.items()]
    return traced + [ProbeSpec(name, Record(), grad=True, trace=True) for name in dict.fromkeys(grad)]


def trace_of(entries: Sequence[Mapping[str, Any]], loss: float | None = None) -> Trace:
    """The :class:`~neurotap.Trace` of an answer's ``trace`` entries: each the one list its reading appended to."""
    values: dict[str, list] = {}
    grads: dict[str, list] = {}
    for entry in entries:
        (grads if entry["grad"] else values)[entry["point"]] = next(iter(entry["data"].values()), [])
    return Trace(values, grads, loss)


# -- values -----------------------------------------------------------------------------------------


class NotSent(str):
    """Where the server had a value that cannot travel: the string ``"<Pair (could not be sent)>"``."""

    def __new__(cls, type_name: str) -> NotSent:
        placeholder = super().__new__(cls, f"<{type_name} (could not be sent)>")
        placeholder.type_name = type_name
        return placeholder

    def __reduce__(self) -> tuple:
        return NotSent, (self.type_name,)


def not_sent(value: Any, where: str) -> list[str]:
    """Where ``value`` holds :class:`NotSent` placeholders, each as ``where[key]... (a TypeName)``."""
    if isinstance(value, NotSent):
        return [f"{where} ({value.type_name})"]
    found: list[str] = []
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            if isinstance(item, (str, list, tuple, dict, set, frozenset)):
                found += not_sent(item, f"{where}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, NotSent):
                found.append(f"a key of {where} ({key.type_name})")
            found += not_sent(item, f"{where}[{key!r}]")
    elif isinstance(value, (set, frozenset)):
        found += [f"a member of {where} ({item.type_name})" for item in value if isinstance(item, NotSent)]
    return found


def _namedtuple_problem(name: Any, fields: Any) -> str | None:
    """What keeps ``name`` and ``fields`` from making a namedtuple class on the other side; None if nothing."""

    def identifier(text: Any) -> bool:
        return isinstance(text, str) and len(text) <= _MAX_NAME and text.isidentifier() and not keyword.iskeyword(text)

    if not identifier(name):
        return f"a namedtuple's name must be an identifier of at most {_MAX_NAME} characters, got {_short(name)}"
    if not isinstance(fields, (list, tuple)) or len(fields) > _MAX_ITEMS:
        return f"the namedtuple {name} may have at most {_MAX_ITEMS} fields"
    for part in fields:
        if not identifier(part) or part.startswith("_"):
            return f"the namedtuple {name} has a field {_short(part)}: fields are identifiers not starting with _"
    if len(set(fields)) != len(fields):
        return f"the namedtuple {name} names a field twice: {_short(fields)}"
    return None


@functools.lru_cache(maxsize=256)
def _namedtuple_class(name: str, fields: tuple[str, ...]) -> type:
    cls = collections.namedtuple(name, fields, module=__name__)
    cls.__reduce__ = _reduce_namedtuple  # its class lives nowhere to import it from: pickles rebuild it
    return cls


def _reduce_namedtuple(value: tuple) -> tuple:
    return _rebuilt_namedtuple, (type(value).__name__, type(value)._fields, tuple(value))


def _rebuilt_namedtuple(name: str, fields: tuple[str, ...], values: tuple) -> tuple:
    return _namedtuple_class(name, fields)._make(values)


def _is_key(value: Any) -> bool:
    """Whether ``value`` can be a dict key or a set member on the wire: a plain scalar, or a short tuple of them."""
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return len(value) <= _MAX_ITEMS and all(_is_scalar(v) for v in value)
    return _is_scalar(value)


def _is_scalar(value: Any) -> bool:
    return value is None or type(value) in (bool, int, float, str)


class _Encoder:
    def __init__(self, lenient: bool = False) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.lenient = lenient  # outputs and recordings: a placeholder for what cannot travel instead of failing

    def tensor(self, value: torch.Tensor) -> dict[str, str]:
        kind = _unsendable(value)
        if kind is not None:
            raise WireError(f"a {kind} tensor cannot travel: send a dense tensor of a dtype that safetensors holds")
        name = f"t{len(self.tensors)}"
        # safetensors refuses views that share storage; a copy also drops autograd and moves to the CPU
        self.tensors[name] = value.detach().to("cpu", copy=True).contiguous()
        return {"$tensor": name}

    def value(self, value: Any, depth: int = 0) -> Any:
        if not self.lenient:
            return self._value(value, depth)
        try:
            return self._value(value, depth)
        except WireError:
            if depth > _MAX_DEPTH:  # a placeholder there is too deep as well: the enclosing value becomes one
                raise
            kind = _unsendable(value) if isinstance(value, torch.Tensor) else None
            return {"$unsupported": f"{kind} Tensor" if kind else type(value).__name__[:_MAX_NAME]}

    def _value(self, value: Any, depth: int) -> Any:
        if depth > _MAX_DEPTH:  # the decoder reads no deeper (and a value that holds itself ends here)
            raise WireError(f"the value nests deeper than {_MAX_DEPTH} levels")
        if isinstance(value, NotSent):
            return {"$unsupported": value.type_name[:_MAX_NAME]}
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            if not -_INT64 <= value < _INT64:
                raise WireError(f"the integer {value} does not fit in 64 bits")
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {"$float": repr(value)}
        if isinstance(value, torch.Tensor):
            return self.tensor(value)
        inner = depth + 1
        if isinstance(value, list):
            return [self.value(v, inner) for v in value]
        if isinstance(value, tuple):
            fields = getattr(value, "_fields", None)
            if fields is None:
                return {"$tuple": [self.value(v, inner) for v in value]}
            problem = _namedtuple_problem(type(value).__name__, fields)
            if problem is not None:
                raise WireError(problem)
            items = [[f, self.value(v, inner)] for f, v in zip(fields, value)]
            return {"$namedtuple": type(value).__name__, "fields": items}
        if isinstance(value, (set, frozenset)):
            return {"$set" if isinstance(value, set) else "$frozenset": [self.key(v, inner) for v in value]}
        if value is Ellipsis:
            return {"$ellipsis": None}
        if isinstance(value, slice):
            if not all(part is None or _is_int(part) for part in (value.start, value.stop, value.step)):
                raise WireError(f"slice bounds must be integers or None, got {_short(value)}")
            return {"$slice": [self.value(part, inner) for part in (value.start, value.stop, value.step)]}
        if isinstance(value, Patch):
            if isinstance(value, Custom):
                raise WireError("nt.Custom holds a function, not data; it travels as code (see --allow-code)")
            return {"$patch": type(value).__name__, "fields": self.fields(value, inner)}
        if isinstance(value, tuple(LOSSES.values())):
            return {"$loss": type(value).__name__, "fields": self.fields(value, inner)}
        if isinstance(value, Mapping):
            if all(isinstance(key, str) for key in value):
                items = {key: self.value(item, inner) for key, item in value.items()}
                return {"$dict" if type(value) is dict else "$output": items}
            return {"$map": [[self.key(key, inner), self.value(item, inner)] for key, item in value.items()]}
        raise WireError(
            f"a {type(value).__name__} cannot travel: send tensors, numbers, strings, "
            "lists, tuples, dicts, sets, namedtuples, slices, ... and the library's patches"
        )

    def key(self, key: Any, depth: int) -> Any:
        """A dict key or set member: only plain scalars and short tuples of them, never a tensor or a container."""
        if isinstance(key, NotSent) or _is_key(key):
            return self.value(key, depth)
        if self.lenient:
            return {"$unsupported": type(key).__name__[:_MAX_NAME]}
        raise WireError(
            f"a {type(key).__name__} cannot be a dict key or a set member on the wire: keys are None, bools, "
            f"ints, floats, strings, or tuples of at most {_MAX_ITEMS} of them"
        )

    def fields(self, value: Any, depth: int) -> dict[str, Any]:
        return {f.name: self.value(getattr(value, f.name), depth) for f in dataclasses.fields(value)}


def _unsendable(tensor: torch.Tensor) -> str | None:
    """What kind of tensor safetensors cannot carry ``tensor`` is ("sparse_coo", "complex128"); None if it can."""
    if tensor.is_nested or tensor.is_meta:
        return "nested" if tensor.is_nested else "meta"
    if tensor.layout != torch.strided:
        return str(tensor.layout).removeprefix("torch.")
    return None if _dtype_travels(tensor.dtype) else str(tensor.dtype).removeprefix("torch.")


@functools.cache
def _dtype_travels(dtype: torch.dtype) -> bool:
    """Whether safetensors writes and reads back tensors of ``dtype`` (not complex128, nor the sub-byte ones)."""
    from safetensors.torch import load, save

    try:
        load(save({"t": torch.empty(0, dtype=dtype)}))
    except Exception:  # torch cannot make some dtypes, and safetensors raises its own error types
        return False
    return True


class _Decoder:
    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.namedtuples: set[tuple[str, tuple[str, ...]]] = set()

    def value(self, value: Any, depth: int = 0) -> Any:
        if depth > _MAX_DEPTH:
            raise WireError(f"the message nests deeper than {_MAX_DEPTH} levels")
        if value is None or isinstance(value, (bool, str, float)):
            return value
        if isinstance(value, int):
            if not -_INT64 <= value < _INT64:
                raise WireError(f"the integer {value} does not fit in 64 bits")
            return value
        if isinstance(value, list):
            return [self.value(v, depth + 1) for v in value]
        if not isinstance(value, dict) or len(value) not in (1, 2):
            raise WireError(f"unexpected JSON value {_short(value)}: tagged values are objects with one $key")
        tag = next(iter(value))
        body = value[tag]
        if tag == "$tensor" and len(value) == 1:
            if not isinstance(body, str) or body not in self.tensors:
                raise WireError(f"the message refers to a tensor {_short(body)} that it does not contain")
            return self.tensors[body]
        if tag == "$tuple" and len(value) == 1 and isinstance(body, list):
            return tuple(self.value(v, depth + 1) for v in body)
        if tag in ("$dict", "$output") and len(value) == 1 and isinstance(body, dict):
            items = {str(k): self.value(v, depth + 1) for k, v in body.items()}
            return items if tag == "$dict" else Output(items)
        if tag == "$ellipsis" and len(value) == 1:
            return Ellipsis
        if tag == "$float" and len(value) == 1 and body in ("nan", "inf", "-inf"):
            return float(body)
        if tag == "$slice" and len(value) == 1 and isinstance(body, list) and len(body) == 3:
            parts = [self.value(v, depth + 1) for v in body]
            if not all(p is None or (isinstance(p, int) and not isinstance(p, bool)) for p in parts):
                raise WireError(f"slice bounds must be integers or null, got {_short(body)}")
            return slice(*parts)
        if tag in ("$patch", "$loss") and set(value) == {tag, "fields"}:
            return self.dataclass(tag, body, value["fields"], depth)
        if tag == "$map" and len(value) == 1 and isinstance(body, list):
            if not all(isinstance(pair, list) and len(pair) == 2 for pair in body):
                raise WireError(f"$map holds [key, value] pairs, got {_short(body)}")
            return {self.key(k, depth + 1): self.value(v, depth + 1) for k, v in body}
        if tag in ("$set", "$frozenset") and len(value) == 1 and isinstance(body, list):
            members = [self.key(v, depth + 1) for v in body]
            return set(members) if tag == "$set" else frozenset(members)
        if tag == "$namedtuple" and set(value) == {tag, "fields"}:
            return self.namedtuple(body, value["fields"], depth)
        if tag == "$unsupported" and len(value) == 1 and isinstance(body, str) and len(body) <= _MAX_NAME:
            return NotSent(body)
        raise WireError(f"unknown tagged value {_short(value)}")

    def key(self, value: Any, depth: int) -> Any:
        """A dict key or set member: a scalar, a ``$float``, a ``$tuple`` of scalars, or a placeholder."""
        if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in ("$float", "$tuple", "$unsupported"):
            key = self.value(value, depth)
        elif isinstance(value, (str, int, float)) or value is None:  # bool is an int
            key = self.value(value, depth)
        else:
            raise WireError(f"a dict key or set member is a scalar or a tuple of them, got {_short(value)}")
        if not (isinstance(key, NotSent) or _is_key(key)):
            raise WireError(f"a dict key or set member is a scalar or a tuple of them, got {_short(value)}")
        return key

    def namedtuple(self, name: Any, pairs: Any, depth: int) -> tuple:
        if not isinstance(pairs, list) or not all(
            isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str) for pair in pairs
        ):
            raise WireError(f"a namedtuple's fields are [name, value] pairs, got {_short(pairs)}")
        fields = tuple(pair[0] for pair in pairs)
        problem = _namedtuple_problem(name, fields)
        if problem is not None:
            raise WireError(problem)
        self.namedtuples.add((name, fields))
        if len(self.namedtuples) > _MAX_ITEMS:
            raise WireError(f"a message holds at most {_MAX_ITEMS} namedtuple classes")
        return _namedtuple_class(name, fields)._make(self.value(v, depth + 1) for _, v in pairs)

    def dataclass(self, tag: str, name: Any, fields: Any, depth: int) -> Any:
        table = LOSSES if tag == "$loss" else {k: v for k, v in {**PATCHES, "SAE": SAE}.items() if v is not Custom}
        if not isinstance(name, str) or name not in table:
            raise WireError(f"unknown {tag[1:]} {_short(name)}; known: {', '.join(sorted(table))}")
        cls = table[name]
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(fields, dict) or not set(fields) <= known:
            raise WireError(f"{name} has the fields {sorted(known)}, got {_short(fields)}")
        values = {k: self.value(v, depth + 1) for k, v in fields.items()}
        for key, item in values.items():
            _check_field(name, key, item)
        try:
            return cls(**values)
        except (PatchError, TypeError, ValueError) as error:  # a patch that checks its own fields (SAE shapes)
            raise WireError(f"{name}: {error}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_index(name: str, index: Any, depth: int = 0) -> None:
    if index is None or index is Ellipsis or _is_int(index) or isinstance(index, slice):
        return
    if isinstance(index, torch.Tensor):
        if index.numel() > MAX_INDEX_ELEMENTS:
            raise WireError(f"{name}.index: an index tensor has {index.numel()} elements, over {MAX_INDEX_ELEMENTS}")
        if index.dtype == torch.bool or not (index.is_floating_point() or index.is_complex()):
            return
    elif isinstance(index, (tuple, list)) and depth < 2:
        for part in index:
            _check_index(name, part, depth + 1)
        return
    raise WireError(f"{name}.index: {_short(index)} is not an index (ints, slices, ..., None, lists, int tensors)")


def _check_field(cls: str, key: str, value: Any) -> None:
    where = f"{cls}.{key}"
    if key == "index":
        _check_index(cls, value)
    elif key == "dims":
        parts = value if isinstance(value, (tuple, list)) else [value]
        if not (value is None or all(_is_int(d) for d in parts)):
            raise WireError(f"{where} must be an int, a list of ints or null, got {_short(value)}")
    elif key in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        if value is None and key == "threshold":
            return
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or not 1 <= value.ndim <= 2:
            raise WireError(f"{where} must be a floating-point tensor of 1 or 2 dimensions")
    elif key in ("apply_b_dec_to_input", "error_term", "record"):
        if not isinstance(value, bool):
            raise WireError(f"{where} must be true or false")
    elif key == "examples":
        if not _is_int(value) or not 0 <= value <= 10_000:
            raise WireError(f"{where} must be an integer from 0 to 10000")
    elif key == "k" and value is None and cls == "SAE":
        return
    elif key in ("k", "dim", "position", "ignore_index", "correct", "wrong"):
        if not _is_int(value) or (key == "k" and not 1 <= value <= 10_000):
            raise WireError(f"{where} must be an integer" + (" from 1 to 10000" if key == "k" else ""))
    elif key == "token":  # entries of the last dimension
        if isinstance(value, torch.Tensor):
            kinds = (value.is_floating_point(), value.is_complex(), value.dtype == torch.bool)
            fits = value.ndim <= 1 and not any(kinds) and value.numel() <= MAX_INDEX_ELEMENTS
        else:
            entries = value if isinstance(value, list) else [value]
            fits = len(entries) <= MAX_INDEX_ELEMENTS and all(_is_int(e) for e in entries)
        if not fits:
            raise WireError(
                f"{where} must be a token id or a list of at most {MAX_INDEX_ELEMENTS} of them, got {_short(value)}"
            )
    elif key == "key":
        if not isinstance(value, str) or not 0 < len(value) <= 200:
            raise WireError(f"{where} must be a non-empty string")
    elif key == "value" and value is None and cls == "Skip":
        return  # the module's first input
    elif key in ("p", "factor", "value", "direction", "targets"):
        numbers = (int, float, torch.Tensor)
        if not (isinstance(value, numbers) and not isinstance(value, bool)) and not (
            key in ("direction", "targets", "value") and isinstance(value, list)
        ):
            raise WireError(f"{where} must be a number or a tensor, got {_short(value)}")


# -- arguments passed on to the model -----------------------------------------------------------------

IDS, MASK, EMBEDS, FLAG, COUNT, NUMBER, TOKENS, CHOICE = (
    "ids",
    "mask",
    "embeds",
    "flag",
    "count",
    "number",
    "tokens",
    "choice",
)

_MODEL_INPUTS = {
    "input_ids": IDS,
    "attention_mask": MASK,
    "position_ids": IDS,
    "token_type_ids": IDS,
    "inputs_embeds": EMBEDS,
}
_FORWARD = {
    **_MODEL_INPUTS,
    "labels": IDS,
    "use_cache": FLAG,
    "output_attentions": FLAG,
    "output_hidden_states": FLAG,
    "return_dict": FLAG,
    "logits_to_keep": COUNT,
}
# generation strategies that transformers loads as code from the Hub (group beam search, contrastive
# search, DoLa, constraints) and assisted generation are left out on purpose
_GENERATE = {
    **_MODEL_INPUTS,
    **{name: COUNT for name in ("max_new_tokens", "min_new_tokens", "max_length", "min_length", "top_k")},
    **{name: COUNT for name in ("num_beams", "num_return_sequences", "no_repeat_ngram_size")},
    **{name: COUNT for name in ("pad_token_id", "bos_token_id")},
    **{name: NUMBER for name in ("temperature", "top_p", "min_p", "typical_p", "repetition_penalty")},
    **{name: NUMBER for name in ("length_penalty", "epsilon_cutoff", "eta_cutoff")},
    **{name: FLAG for name in ("do_sample", "early_stopping", "use_cache", "renormalize_logits")},
    **{name: FLAG for name in ("return_dict_in_generate", "output_scores", "output_logits")},
    **{name: FLAG for name in ("output_attentions", "output_hidden_states")},
    "eos_token_id": TOKENS,
    "suppress_tokens": TOKENS,
    "begin_suppress_tokens": TOKENS,
    "cache_implementation": CHOICE,  # from the server's --cache-implementations
}
ARGUMENTS: dict[str, dict[str, str]] = {"forward": _FORWARD, "backward": _FORWARD, "generate": _GENERATE}
MAX_POSITIONAL = 3


def _argument_fits(kind: str, value: Any) -> bool:
    if kind in (IDS, MASK, EMBEDS):
        if not isinstance(value, torch.Tensor):
            return False
        if kind == EMBEDS:
            return value.is_floating_point()
        return kind == MASK or not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
    if kind == FLAG:
        return isinstance(value, bool)
    if kind == COUNT:
        return _is_int(value) and 0 <= value < 2**31
    if kind == NUMBER:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == TOKENS:
        items = value if isinstance(value, list) else [value]
        return len(items) <= 1024 and all(_is_int(v) and 0 <= v < 2**31 for v in items)
    return isinstance(value, str) and len(value) <= 64  # CHOICE: the server checks it against its set


_KIND_TEXT = {
    IDS: "an integer tensor",
    MASK: "a tensor",
    EMBEDS: "a float tensor",
    FLAG: "true or false",
    COUNT: "an integer from 0 to 2**31 - 1",
    NUMBER: "a finite number",
    TOKENS: "a token id or a list of at most 1024 token ids",
    CHOICE: "a string",
}


def check_arguments(op: str, args: Sequence[Any], kwargs: Mapping[str, Any], *, allow_code: bool) -> None:
    """Refuse what a request may not pass on to the model; see the module docstring."""
    if len(args) > MAX_POSITIONAL or not all(isinstance(a, torch.Tensor) for a in args):
        raise WireError(
            f"positional arguments to {op} must be at most {MAX_POSITIONAL} tensors (token ids first); "
            "pass the rest by name"
        )
    allowed = ARGUMENTS[op]
    for name, value in kwargs.items():
        kind = allowed.get(name)
        if kind is None:
            if allow_code and not _holds_objects(value):
                continue
            raise WireError(
                f"{op} does not take the argument {name!r} on this server: requests may pass on "
                f"{', '.join(sorted(allowed))}"
                + ("" if allow_code else " (other arguments only on a server started with --allow-code)")
            )
        if not _argument_fits(kind, value):
            raise WireError(f"the argument {name!r} of {op} must be {_KIND_TEXT[kind]}, got {_short(value)}")


def _holds_objects(value: Any) -> bool:
    """Whether a decoded value holds a patch, a loss or another object rather than plain data."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return False
    if isinstance(value, (list, tuple)):
        return any(_holds_objects(v) for v in value)
    if isinstance(value, Mapping):
        return any(_holds_objects(v) for v in value.values())
    return True


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# -- messages ---------------------------------------------------------------------------------------


def encode(document: Any, *, lenient: bool = False) -> bytes:
    """One message: ``document`` (any value in the table above) as safetensors bytes."""
    from safetensors.torch import save

    encoder = _Encoder(lenient)
    body = encoder.value(document)
    return save(encoder.tensors, metadata={_METADATA_KEY: json.dumps(body, separators=(",", ":"))})


def _open(data: bytes) -> tuple[Any, dict[str, torch.Tensor]]:
    """The JSON document and the tensors of a message."""
    from safetensors.torch import load

    if len(data) < 8:
        raise WireError(f"a message is a safetensors file (content type {MEDIA_TYPE}); got {len(data)} bytes")
    try:
        (size,) = _FRAME_LENGTH.unpack_from(data)
        if size > len(data) - 8:
            raise ValueError("the safetensors header is longer than the message")
        if size > MAX_HEADER_BYTES:
            raise _TooLarge(f"the message's header has {size} bytes; at most {MAX_HEADER_BYTES} are read")
        header = json.loads(bytes(data[8 : 8 + size]))
        text = header["__metadata__"][_METADATA_KEY]
        if len(text) > MAX_DOCUMENT_BYTES:
            raise _TooLarge(
                f"the message's JSON document has {len(text)} bytes; at most {MAX_DOCUMENT_BYTES} are read "
                "(send large values as tensors)"
            )
        document = json.loads(text)
        tensors = load(bytes(data))
    except _TooLarge as error:
        raise WireError(str(error)) from None
    except Exception as error:  # safetensors raises its own error type
        raise WireError(f"the body is not a neurotap message ({type(error).__name__}: {error})") from None
    return document, tensors


class _TooLarge(Exception):
    pass


def decode(data: bytes) -> Any:
    """The value that :func:`encode` wrote; :class:`WireError` for anything malformed."""
    document, tensors = _open(data)
    return _Decoder(tensors).value(document)


def frame(document: Any, *, lenient: bool = True) -> bytes:
    """One frame of a stream: length, then the message."""
    message = encode(document, lenient=lenient)
    return _FRAME_LENGTH.pack(len(message)) + message


END_OF_STREAM = _FRAME_LENGTH.pack(0)


def read_frames(chunks: Any) -> Any:
    """Decode the frames of a stream of byte chunks; :class:`WireError` if it ends early."""
    buffer = bytearray()
    for chunk in chunks:
        buffer += chunk
        while len(buffer) >= 8:
            (size,) = _FRAME_LENGTH.unpack_from(buffer)
            if size == 0:
                return
            if len(buffer) < 8 + size:
                break
            yield decode(bytes(buffer[8 : 8 + size]))
            del buffer[: 8 + size]
    raise WireError("the stream ended before its end marker; the server may have stopped")


# -- requests ---------------------------------------------------------------------------------------


def encode_probe(spec: ProbeSpec, *, code: bool) -> Any:
    """JSON-ready description of a probe; a function that is not a patch is pickled only if ``code``."""
    fn = spec.fn
    if isinstance(fn, Patch) and not isinstance(fn, Custom):
        described: Any = fn
    elif not code:
        raise CodeNotAllowedError(
            f"the probe at {spec.point!r} is a Python function; " + CODE_NOT_ALLOWED.split(", so ", 1)[1]
        )
    else:
        described = {"$code": _pickled(fn.fn if isinstance(fn, Custom) else fn)}
    return {"point": spec.point, "grad": bool(spec.grad), "fn": described}


def _pickled(fn: Callable[..., Any]) -> torch.Tensor:
    import cloudpickle

    return torch.frombuffer(bytearray(cloudpickle.dumps(fn)), dtype=torch.uint8)


def _unpickled(decoder: _Decoder, code: Any, what: str) -> Callable[..., Any]:
    """The function in a ``{"$code": ...}`` value; the caller has checked that the server runs code."""
    payload = decoder.value(code)
    if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8:
        raise WireError("$code must be a uint8 tensor of cloudpickle bytes")
    import cloudpickle

    try:
        return cloudpickle.loads(payload.numpy().tobytes())
    except Exception as error:
        raise WireError(f"could not unpickle {what}: {type(error).__name__}: {error}") from None


def _is_code(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"$code"}


def encode_request(request: RunRequest) -> bytes:
    encoder = _Encoder()
    probes = []
    for spec in request.probes:
        described = encode_probe(spec, code=True)
        fn = described["fn"]
        if isinstance(fn, dict) and "$code" in fn:
            fn = {"$code": encoder.tensor(fn["$code"])}
        else:
            fn = encoder.value(fn)
        probe = {"point": described["point"], "grad": described["grad"], "fn": fn}
        if spec.optional:
            probe["optional"] = True
        if spec.trace:
            probe["trace"] = True
        probes.append(probe)
    loss = request.loss
    code = callable(loss) and not is_builtin_loss(loss)
    body = {
        "op": request.op,
        "args": encoder.value(list(request.args)),
        "kwargs": encoder.value(dict(request.kwargs)),
        "probes": probes,
        "outputs": request.outputs,
        "loss": {"$code": encoder.tensor(_pickled(loss))} if code else encoder.value(loss),
    }
    if request.stop_at is not None:
        body["stop_at"] = request.stop_at
    from safetensors.torch import save

    return save(encoder.tensors, metadata={_METADATA_KEY: json.dumps(body, separators=(",", ":"))})


_PROBE_FIELDS = {"point", "grad", "fn", "optional", "trace"}


def decode_request(data: bytes, *, allow_code: bool) -> RunRequest:
    """A :class:`RunRequest` from a body; code probes are unpickled only with ``allow_code``."""
    body, tensors = _open(data)
    if not isinstance(body, dict):
        raise WireError("a request is a JSON object with op, args, kwargs, probes, outputs, loss, stop_at")
    unknown = set(body) - {"op", "args", "kwargs", "probes", "outputs", "loss", "stop_at"}
    if unknown:
        raise WireError(f"unknown request fields {sorted(unknown)}")
    decoder = _Decoder(tensors)
    op = body.get("op")
    if op not in OPS:
        raise WireError(f"op must be one of {', '.join(OPS)}, got {_short(op)}")
    args = decoder.value(body.get("args", []))
    kwargs = decoder.value(body.get("kwargs", {"$dict": {}}))
    if not isinstance(args, list) or not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise WireError("args must be a list and kwargs a dict with str keys")
    check_arguments(op, args, kwargs, allow_code=allow_code)
    outputs = body.get("outputs")
    if outputs is not None and not (isinstance(outputs, list) and all(isinstance(o, str) for o in outputs)):
        raise WireError("outputs must be null or a list of output field names")
    stop_at = body.get("stop_at")
    if stop_at is not None and not (isinstance(stop_at, str) and op == "forward"):
        raise WireError(f"stop_at is a point name, and only a forward takes it; got {_short(stop_at)} for {op}")
    loss = body.get("loss")
    if _is_code(loss):
        if not allow_code:
            raise CodeNotAllowedError(LOSS_NOT_ALLOWED)
        loss = _unpickled(decoder, loss["$code"], "the loss")
        if not callable(loss):
            raise WireError(f"the loss sent as code is a {type(loss).__name__}, not a function")
    else:
        loss = decoder.value(loss)
        if op == "backward" and not is_builtin_loss(loss):
            raise WireError(f"a backward request needs a loss: one of {', '.join(LOSSES)}, or a function as code")
    raw_probes = body.get("probes", [])
    if not isinstance(raw_probes, list):
        raise WireError("probes must be a list")
    probes = []
    for raw in raw_probes:
        if not isinstance(raw, dict) or not {"point", "grad", "fn"} <= set(raw) <= _PROBE_FIELDS:
            raise WireError(f"a probe is {{point, grad, fn}} (optional, trace), got {_short(raw)}")
        point, grad, fn = raw["point"], raw["grad"], raw["fn"]
        optional, traced = raw.get("optional", False), raw.get("trace", False)
        if not isinstance(optional, bool) or not isinstance(traced, bool):
            raise WireError(f"a probe's optional and trace must be booleans, got {_short(raw)}")
        if not isinstance(point, str) or not isinstance(grad, bool):
            raise WireError(f"a probe's point must be a string and grad a boolean, got {_short(raw)}")
        if _is_code(fn):
            if not allow_code:
                raise CodeNotAllowedError(f"the probe at {point!r} is a Python function; " + CODE_NOT_ALLOWED)
            fn = _unpickled(decoder, fn["$code"], f"the probe at {point!r}")
        else:
            fn = decoder.value(fn)
            if not isinstance(fn, Patch):
                raise WireError(f"a probe's fn must be a patch ({{'$patch': ...}}) or code, got {_short(raw['fn'])}")
        probes.append(ProbeSpec(point, fn, grad, optional, traced))
    return RunRequest(op, tuple(args), kwargs, probes, outputs, loss, stop_at)


# -- tokenizers -------------------------------------------------------------------------------------


def describe_tokenizer(tokenizer: Any) -> dict[str, Any] | None:
    """A fast tokenizer as plain JSON (see the module docstring); None for one without a ``tokenizers`` backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    length = getattr(tokenizer, "model_max_length", None)
    return {
        "tokenizer_json": backend.to_str(),
        "special_tokens": {k: str(v) for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)},
        "model_max_length": length if isinstance(length, int) and length < 2**31 else None,
        "padding_side": getattr(tokenizer, "padding_side", "right"),
        "chat_template": tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
    }


def build_tokenizer(description: Mapping[str, Any]) -> Any:
    """The tokenizer that :func:`describe_tokenizer` described, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    extra = {"model_max_length": description["model_max_length"]} if description.get("model_max_length") else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(description["tokenizer_json"]),
        padding_side=description.get("padding_side") or "right",
        chat_template=description.get("chat_template"),
        **{k: v for k, v in description.get("special_tokens", {}).items() if k.endswith("_token")},
        **extra,
    )
