"""A plan: probes resolved against the inventory, ready to attach.

Resolving happens once, before the forward pass (unknown names fail here and
nothing is attached); while the model runs, a tap only loops over its bound
probes.
"""

from __future__ import annotations

import contextvars
import copy
import dataclasses
import functools
import sys
import types
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.utils.checkpoint

from ..errors import NeurotapError, PatchError, ProbeError, UnknownPointError, raised_at_the_module_call
from ..points import (
    Attachment,
    Frame,
    Inventory,
    Point,
    expand,
    first_parameter,
    is_pattern,
    reset_helper_frames,
    split_narrowing,
    unknown_point,
)
from ..probes import Add, Probe, Record, Replace, SaveContext, Scale, Skip, Zero

# torch stops a checkpoint's recompute early by raising from inside it, through any probe that runs there
_PASS_THROUGH = (NeurotapError, *filter(None, [getattr(torch.utils.checkpoint, "_StopRecomputationError", None)]))


_TENSOR_KINDS = ("parameter", "buffer")
_NOT_SPLIT = (*_TENSOR_KINDS, "output")  # the taps attach puts on by themselves, not through split_taps
_SAVE_NOTHING = (Zero, Add, Replace, Scale)  # patches that only edit: a recompute may run them on the real context


def _put_back(held: list[tuple[Any, dict[str, Any], torch.Tensor]]) -> None:
    """Between forwards the real parameters are in place (get_parameter, optimisers, state_dict see them)."""
    for tap, table, original in held:
        table[tap.point.scope[0]] = original


class Stopped(NeurotapError):
    """Ends a forward at its ``stop_at`` point, carrying the value there (caught by the model, never seen)."""

    def __init__(self, value: Any) -> None:
        super().__init__("the forward stopped at its stop_at point")
        self.value = value


def _counted_forward(state: RunState, forward: Callable[..., Any]) -> Callable[..., Any]:
    """The root's ``forward``, counting each call as a new forward first (see Plan._counted_in_forward)."""
    new_forward = state.new_forward

    def counted(*args: Any, **kwargs: Any) -> Any:
        new_forward()
        return forward(*args, **kwargs)

    # its signature is the forward's: generate reads it to choose what it passes (logits_to_keep, the cache)
    counted.__wrapped__ = forward  # type: ignore[attr-defined]
    return counted


def _stop(ctx: SaveContext, value: Any) -> None:
    raise Stopped(value)


@functools.lru_cache(maxsize=64)
def stopping_probe(point: str) -> Probe:
    """The probe that ends a forward at ``point``; the same one each time, so a plan with it can be reused."""
    if is_pattern(point):
        raise NeurotapError(f"stop_at takes one point name, not the pattern {point!r}")
    return Probe(point, _stop)


# How many calls are running through an nt.Model (any wrapper's, dry runs included): each checks its own points
# for misses. A list, so that Model._run counts its calls in and out without a Python call (see managed_call).
MANAGED_CALLS = [0]


class managed_call:
    """``with managed_call():`` around a call made through an ``nt.Model``."""

    __slots__ = ()

    def __enter__(self) -> None:
        MANAGED_CALLS[0] += 1

    def __exit__(self, *_: Any) -> None:
        MANAGED_CALLS[0] -= 1


class RunState:
    """Counters shared by the taps of one plan: which forward, which step, and the checkpointed layer running."""

    __slots__ = ("forward_id", "step", "forwards_this_call", "region", "on_direct_call", "direct_cache")
    _neurotap_hook = True  # registered itself as the root's forward pre-hook (with keywords): each starts a forward

    def __init__(self) -> None:
        self.forward_id = 0
        self.step = 0
        self.forwards_this_call = 0
        self.region: _Region | None = None
        # called at the first forward made directly on the root (not through an nt.Model): puts the check on
        self.on_direct_call: Callable[[], None] | None = None
        # the cache the last direct forward was passed or returned, weakly: a direct forward passed it goes on
        self.direct_cache: Callable[[], Any] | None = None

    def new_forward(self, _module: Any = None, _args: Any = None, kwargs: dict[str, Any] | None = None) -> None:
        self.forward_id += 1
        if not MANAGED_CALLS[0]:  # made directly on the root: a call of its own, unless it is a step of one
            cache = kwargs.get("past_key_values") if kwargs else None
            last = self.direct_cache
            if cache is None or last is None or last() is not cache:
                self.forwards_this_call = 0
            self.direct_cache = _weak(cache)
            if self.on_direct_call is not None:
                self.on_direct_call()
        self.step = self.forwards_this_call
        self.forwards_this_call += 1
        reset_helper_frames()

    __call__ = new_forward


def is_cache(value: Any) -> bool:
    """Whether ``value`` is a Hugging Face key-value cache (without importing transformers)."""
    cache_utils = sys.modules.get("transformers.cache_utils")  # loaded wherever a model made a cache
    return cache_utils is not None and isinstance(value, cache_utils.Cache)


def _weak(value: Any) -> Callable[[], Any] | None:
    """A weak reference to ``value`` (a cache, held by whoever runs the steps, never by neurotap)."""
    if value is None:
        return None
    try:
        return weakref.ref(value)
    except TypeError:  # a tuple of tensors (a cache of the old kind): each step passes a new one
        return None


def _member_key(value: Any, key: Any) -> Any:
    """The key of ``value`` that ``key`` names: a position in a mapping (a ModelOutput's fields) becomes its key."""
    if isinstance(key, int) and isinstance(value, Mapping) and key not in value:
        keys = list(value.keys())
        if -len(keys) <= key < len(keys):
            return keys[key]
    return key


def _narrow(value: Any, keys: tuple, point: str) -> Any:
    for key in keys:
        try:
            value = value[_member_key(value, key)]
        except (IndexError, KeyError, TypeError) as error:
            raise NeurotapError(
                f"cannot narrow the {type(value).__name__} at {point!r} with [{key!r}]: {error}"
            ) from None
    return value


def _replace(value: Any, keys: tuple, new: Any) -> Any:
    key, rest = _member_key(value, keys[0]), keys[1:]
    inner = _replace(value[key], rest, new) if rest else new
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        k = key % len(value)
        return (*value[:k], inner, *value[k + 1 :])
    if isinstance(value, list):
        copy = list(value)
        copy[key] = inner
        return copy
    if type(value) is dict:
        return {**value, key: inner}
    value[key] = inner  # ModelOutput and other mutable mappings: the forward's own fresh object
    return value


def _check_replacement(point: str, original: Any, result: Any) -> None:
    if not isinstance(original, torch.Tensor):
        return
    if not isinstance(result, torch.Tensor):
        raise PatchError(f"a probe at {point!r} returned a {type(result).__name__} in place of a tensor")
    if result.shape != original.shape or result.dtype != original.dtype:
        raise PatchError(
            f"a probe at {point!r} returned a {result.dtype} tensor of shape {tuple(result.shape)} in place of "
            f"the {original.dtype} value of shape {tuple(original.shape)} there; return a value of the same "
            "shape and dtype, or None to keep the original"
        )


class BoundProbe:
    """A probe with its save context and the narrowing of its point name."""

    __slots__ = ("fn", "ctx", "keys", "grad", "point", "optional", "trusted")

    def __init__(self, probe: Probe, ctx: SaveContext, keys: tuple) -> None:
        self.fn = probe.fn
        self.ctx = ctx
        self.keys = keys
        self.grad = probe.grad
        self.point = probe.point
        self.optional = probe.optional
        self.trusted = type(probe.fn) in _SAVE_NOTHING  # these return a tensor of the value's shape and dtype

    def __copy__(self) -> BoundProbe:
        # what the probe is now, whatever its plan binds next: written out, as copy's generic way cost each gradient
        # probe some 15 k instructions a call (bench_instructions' gradient row)
        twin = BoundProbe.__new__(BoundProbe)
        twin.fn, twin.ctx, twin.keys, twin.grad = self.fn, self.ctx, self.keys, self.grad
        twin.point, twin.optional, twin.trusted = self.point, self.optional, self.trusted
        return twin

    def _call(self, value: Any, call: int, step: int, ctx: SaveContext | None = None) -> Any:
        ctx = self.ctx if ctx is None else ctx
        object.__setattr__(ctx, "call", call)
        object.__setattr__(ctx, "step", step)
        try:
            return self.fn(ctx, value)
        except _PASS_THROUGH:
            raise
        except Exception as error:
            raise self.failed(error, call, step) from error

    def failed(self, error: Exception, call: int, step: int) -> ProbeError:
        return ProbeError(
            f"the probe {getattr(self.fn, '__name__', type(self.fn).__name__)} at {self.point!r} "
            f"(call {call}, step {step}) raised {type(error).__name__}: {error}"
        )

    def apply(self, value: Any, call: int, step: int, ctx: SaveContext | None = None) -> Any:
        """The value with this probe applied; ``ctx`` stands in for the probe's own save context if given."""
        target = _narrow(value, self.keys, self.point) if self.keys else value
        if self.grad:
            hooked = self._hook_gradient(target, call, step)
            if hooked is target:
                return value
            return _replace(value, self.keys, hooked) if self.keys else hooked
        result = self._call(target, call, step, ctx)
        if result is None or result is target:
            return value
        if not self.trusted:
            _check_replacement(self.point, target, result)
        return _replace(value, self.keys, result) if self.keys else result

    def _hook_gradient(self, target: Any, call: int, step: int) -> Any:
        """Hook the gradient of ``target``; returns the value to go on with (``target``, or a differentiable copy)."""
        differentiable = isinstance(target, torch.Tensor) and (target.is_floating_point() or target.is_complex())
        if differentiable and not target.requires_grad and torch.is_grad_enabled():
            # nothing upstream requires grad (frozen weights): the gradient starts here, the forward is unchanged
            target = target.detach().requires_grad_()
        if not differentiable or not target.requires_grad:
            raise NeurotapError(
                f"a gradient probe at {self.point!r}: the value there "
                + ("is not a floating-point tensor" if not differentiable else "does not require grad")
                + "; run the forward with autograd on (not under torch.no_grad or generate)"
            )
        targets = GRADIENT_TARGETS.get()
        if targets is not None:
            targets.append(target)

        # this forward's function: by the backward, the plan may have let it go, or taken a later call's probes
        now = copy.copy(self)

        def on_gradient(gradient: torch.Tensor) -> Any:
            result = now._call(gradient, call, step)
            if result is not None:
                _check_replacement(self.point + " (gradient)", gradient, result)
            return result

        target.register_hook(on_gradient)
        return target


# While set (by Model.backward), every value a gradient probe hooks is noted here: the backward asks for those.
GRADIENT_TARGETS: contextvars.ContextVar[list[torch.Tensor] | None] = contextvars.ContextVar(
    "neurotap_gradient_targets", default=None
)


_NOT_A_HOOK = object()  # Tap's ``output`` when it is called with the value alone


class Tap:
    """Everything bound at one point, called with the value each time it fires."""

    __slots__ = ("point", "bound", "state", "calls", "forward_id", "plain", "record_key")
    _neurotap_hook = True  # registered itself as a module's forward hook: the output is the value

    def __init__(self, point: Point, state: RunState) -> None:
        self.point = point
        self.bound: list[BoundProbe] = []
        self.state = state
        self.calls = 0
        self.forward_id = -1
        self.plain: BoundProbe | None = None  # the one probe, when it reads or edits the whole value
        self.record_key: str | None = None  # the key, when that probe is a Record of the whole value

    def bound_all(self) -> None:
        """Called once every probe is bound."""
        only = self.bound[0] if len(self.bound) == 1 else None
        self.plain = only if only is not None and not only.keys and not only.grad else None
        fn = self.plain.fn if self.plain is not None else None
        self.record_key = fn.key if type(fn) is Record and fn.index is None else None

    def __call__(self, first: Any, _inputs: Any = None, output: Any = _NOT_A_HOOK) -> Any:
        """The value, as the probes leave it; called with the value, or as a forward hook ``(module, inputs,
        output)``."""
        value = first if output is _NOT_A_HOOK else output
        if _replays:
            return value  # backward is recomputing a checkpointed layer: the replay's own taps act there
        state = self.state
        forward_id = state.forward_id
        if self.forward_id == forward_id:
            call = self.calls
        else:
            self.forward_id = forward_id
            call = 0
        self.calls = call + 1
        if state.region is not None:
            return state.region.fire(self, value, call, state.step)
        bound = self.plain
        if bound is not None:  # one probe on the whole value, no gradient: the common case, inlined
            ctx = bound.ctx
            _set_call(ctx, call)
            _set_step(ctx, state.step)
            try:
                if self.record_key is not None and isinstance(value, _Tensor):
                    # Record's own work, the commonest probe's, done here: a Python call less each value
                    ctx._data.setdefault(self.record_key, []).append(value.detach().clone())
                    return value
                result = bound.fn(ctx, value)
            except _PASS_THROUGH:
                raise
            except Exception as error:
                raise bound.failed(error, call, state.step) from error
            if result is None or result is value:
                return value
            if not bound.trusted:
                _check_replacement(bound.point, value, result)
            return result
        for bound in self.bound:
            value = bound.apply(value, call, state.step)
        return value

    # put on by its bound method, which Python calls without the tuples and the look-up that calling an
    # instance costs (see Plan.attach); the mark lets copies of a module with it as a hook leave it out
    __call__._neurotap_hook = True  # type: ignore[attr-defined]


_Tensor = torch.Tensor
_set_call, _set_step = SaveContext.call.__set__, SaveContext.step.__set__  # past SaveContext's own __setattr__

# How many checkpointed layers are being recomputed right now (by backward, in any thread).
_replays = 0


class _Region:
    """One call of a gradient-checkpointed layer: its forward, then every recompute of it during backward.

    The forward notes, per tap and call, which probes replaced the value; a
    recompute attaches just those again (with the same call and step), so the
    values it saves for backward are the patched ones, and probes that only read
    are not called twice. A probe that replaced and may also have saved something
    (an SAE, a function) runs again on a scratch copy of its save context as it
    was before that call, so it computes the same replacement and saves nothing
    twice. A gradient probe in a reentrant checkpoint, whose forward runs without
    autograd, hooks the recomputed value instead.
    """

    __slots__ = ("plan", "modules", "function", "log", "ran", "defer_gradients")

    def __init__(self, plan: Plan, modules: Mapping[str, torch.nn.Module], function: Any) -> None:
        self.plan = plan
        self.modules = modules
        self.function = function
        # per tap and call: the probes that replaced the value, each copied (a block that ends before the
        # backward lets go of its patches: see Plan.release), with its save context's data before the call
        self.log: dict[Tap, list[tuple[int, int, tuple[tuple[BoundProbe, dict | None], ...]]]] = {}
        self.ran = False
        self.defer_gradients = torch.is_grad_enabled()

    def fire(self, tap: Tap, value: Any, call: int, step: int) -> Any:
        again = []
        for bound in tap.bound:
            if bound.grad and self.defer_gradients and not torch.is_grad_enabled():
                again.append((copy.copy(bound), None))
                continue
            before = None if isinstance(bound.fn, _SAVE_NOTHING) else dict(bound.ctx._data)
            result = bound.apply(value, call, step)
            if result is not value:
                again.append((copy.copy(bound), before))
            value = result
        self.log.setdefault(tap, []).append((call, step, tuple(again)))
        return value

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.ran:
            return self._recompute(args, kwargs)
        self.ran = True
        state = self.plan.state
        outer, state.region = state.region, self
        try:
            return self.function(*args, **kwargs)
        finally:
            state.region = outer

    def _recompute(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        global _replays
        attachment = Attachment()
        _replays += 1
        try:
            attach_taps(attachment, [(tap.point, _Replay(tap, calls)) for tap, calls in self.log.items()], self.modules)
            return self.function(*args, **kwargs)
        finally:
            attachment.detach()
            _replays -= 1


class _Replay:
    """A tap during a recompute: the probes that changed the value at each call, run again."""

    __slots__ = ("tap", "calls", "fired", "point")

    def __init__(self, tap: Tap, calls: list[tuple[int, int, tuple[tuple[BoundProbe, dict | None], ...]]]) -> None:
        self.tap = tap
        self.calls = calls
        self.fired = 0
        self.point = tap.point

    def __call__(self, value: Any) -> Any:
        fired = self.fired
        self.fired = fired + 1
        if fired >= len(self.calls):
            return value
        call, step, again = self.calls[fired]
        for bound, before in again:
            value = bound.apply(value, call, step, None if before is None else _scratch(bound.ctx, before))
        return value


def _scratch(ctx: SaveContext, data: dict[str, Any]) -> SaveContext:
    """A throwaway save context holding ``data``, its lists and dicts copied, so writes to it reach nothing."""
    scratch = SaveContext(ctx.point)
    scratch._data.update({k: copy.copy(v) if isinstance(v, (list, dict)) else v for k, v in data.items()})
    return scratch


def _checkpointed(own: dict[str, Any]) -> bool:
    """Whether the layer with instance attributes ``own`` has gradient checkpointing on."""
    return own.get("gradient_checkpointing") is True and "_gradient_checkpointing_func" in own


def _checkpoint_region(
    plan: Plan, modules: Mapping[str, torch.nn.Module], checkpoint: Any, function: Any, *args: Any, **kwargs: Any
) -> Any:
    """Stands in for a layer's ``_gradient_checkpointing_func`` (Hugging Face's hook for torch's checkpoint)."""
    return checkpoint(_Region(plan, modules, function), *args, **kwargs)


def attach_taps(
    attachment: Attachment, taps: Iterable[tuple[Point, Any]], modules: Mapping[str, torch.nn.Module]
) -> None:
    """Put each ``(point, fire)`` on the module tree: hooks for module points, frames for op points."""
    hooks, frames = split_taps(taps)
    attach_split(attachment, hooks, frames, modules)


def split_taps(taps: Iterable[tuple[Point, Any]]) -> tuple[list[tuple[Point, Any]], dict[str, Frame]]:
    """The module-point taps, and the op-point taps gathered into one frame per module path."""
    hooks = []
    frames: dict[str, Frame] = {}
    for point, fire in taps:
        if point.kind in ("input", "output", "argument"):
            hooks.append((point, fire))
            continue
        frame = frames.get(point.module)
        if frame is None:
            frame = frames[point.module] = Frame()
        for site in point.scope[:-1]:
            frame = frame.child(site)
        frame.taps[point.scope[-1]] = fire
    return hooks, frames


def attach_split(
    attachment: Attachment,
    hooks: list[tuple[Point, Any]],
    frames: dict[str, Frame],
    modules: Mapping[str, torch.nn.Module],
) -> None:
    for point, fire in hooks:
        module = modules[point.module]
        if point.kind == "input":
            attachment.on_input(module, fire)
        elif point.kind == "output":
            attachment.on_output(module, fire)
        else:
            attachment.on_argument(module, point.scope[0], fire)
    for path, frame in frames.items():
        if not attachment.on_ops(modules[path], frame):
            where = path or "the root module"
            raise NeurotapError(
                f"cannot reach the operations inside {where}: other code replaced its forward on the "
                "instance (module.forward = ...), so neurotap's would never run. Probe its input and "
                "output points instead, or remove that instance forward"
            )


class _Skipping:
    """Stands in for a skipped module's forward; counts as its point firing."""

    __slots__ = ("point", "bound", "state", "forward_id", "skip", "keyword")

    def __init__(self, point: Point, bound: BoundProbe, state: RunState, skip: Skip) -> None:
        self.point = point
        self.bound = [bound]
        self.state = state
        self.forward_id = -1
        self.skip = skip
        self.keyword: str | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.forward_id = self.state.forward_id
        if self.skip.value is not None:
            return self.skip.value
        if args:
            return args[0]
        if self.keyword is not None and self.keyword in kwargs:
            return kwargs[self.keyword]
        raise PatchError(
            f"Skip at {self.bound[0].point!r}: the module was called without an input to pass on in its place; "
            "give the output it should have, Skip(value=...)"
        )


def _checked_skip(probe: Probe, skip: Skip, point: Point) -> Skip:
    if point.kind not in ("input", "output") or probe.grad:
        what = "a gradient probe" if probe.grad else f"the {point.kind} point {point.name!r}"
        raise PatchError(
            f"Skip at {probe.point!r}: a skip stands in for a whole module call, so it goes at a module's "
            f"output point ({point.module + '.output' if point.module else 'output'}), not at {what}"
        )
    if split_narrowing(probe.point)[1]:
        raise PatchError(f"Skip at {probe.point!r}: a skip replaces the whole output; leave out the narrowing")
    if skip.value is not None and not isinstance(skip.value, torch.Tensor):
        try:
            return Skip(value=torch.as_tensor(skip.value))
        except (TypeError, ValueError, RuntimeError) as error:
            raise PatchError(f"Skip at {probe.point!r}: value {skip.value!r} is not a tensor: {error}") from None
    return skip


def expand_probes(probes: Iterable[Any], inventory: Inventory) -> list[Any]:
    """Each probe at a pattern (``model.layers.*.mlp.mul``) as one probe per point it matches, in execution order.

    Takes any dataclass with a ``point``: probes, and the server's probe specs.
    """
    expanded = []
    for probe in probes:
        try:
            names = expand(probe.point, inventory)
        except ValueError as error:
            raise UnknownPointError(str(error)) from None
        expanded.extend(probe if name == probe.point else dataclasses.replace(probe, point=name) for name in names)
    return expanded


class Plan:
    """Probes resolved to taps; ``attach`` puts them on the module tree."""

    def __init__(self, probes: Iterable[Probe], inventory: Inventory, contexts: dict[str, SaveContext]) -> None:
        self.state = RunState()
        self.taps: dict[str, Tap] = {}
        self.skips: dict[str, _Skipping] = {}  # module path -> what runs in place of its forward
        self.bases: dict[str, str] = {}  # each probe's point name -> the raw point it resolved to
        self._held: list[tuple[Tap, dict[str, Any], torch.Tensor]] = []  # parameters and buffers patched
        self._above_taps: tuple[tuple[str, dict], ...] | None = None  # the modules that contain a tapped one
        # what attach puts where, worked out on the first attach: taps on tensors, on module outputs (with their
        # modules), other hooks, one frame per module
        self._split: (
            tuple[list[Tap], list[tuple[torch.nn.Module, Tap]], list[tuple[Point, Tap]], dict[str, Frame]] | None
        ) = None
        # the hook after each direct forward of the root, while attached (see ``attach``): its table and key
        self.direct_check: tuple[dict, int] | None = None
        # the key of the root's pre-hook starting each forward, when a call through the model may lift it and
        # count its forwards itself (see ``counted_root_forward``)
        self.liftable_start: int | None = None
        self._counted: Callable[..., Any] | None = None
        self._direct_hook: functools.partial | None = None  # that hook, kept for the next attach
        # the last attachment made, how, and whether it may be put on again as it was (see Attachment.reattach)
        self._last_attached: tuple[Attachment, bool, Callable[[list[str]], None] | None] | None = None
        made: dict[str, SaveContext] = {}  # new contexts, put into ``contexts`` once every probe is resolved
        # where each probe's function went, by the probe's place in ``probes``: for release and rebind
        self._fns: list[tuple[BoundProbe, int]] = []
        self._skip_fns: list[tuple[_Skipping, int]] = []
        self.released = False  # whether ``release`` let go of the functions and no ``rebind`` gave them back yet
        for number, probe in ((n, e) for n, p in enumerate(probes) for e in expand_probes([p], inventory)):
            try:
                base, keys = split_narrowing(probe.point)
            except ValueError as error:
                raise UnknownPointError(str(error)) from None
            if base in inventory.aliases:
                base, alias_keys = split_narrowing(inventory.aliases[base])
                keys = alias_keys + keys
            point = inventory.points.get(base) or inventory.static.get(base)
            if point is None:
                raise unknown_point(base, dict.fromkeys([*inventory.points, *inventory.static, *inventory.aliases]))
            self.bases[probe.point] = base
            name = probe.context_name
            ctx = contexts.get(name)
            if ctx is None:
                ctx = made.get(name)
            if ctx is None:
                ctx = made[name] = SaveContext(name)
            if isinstance(probe.fn, Skip):
                skip = _checked_skip(probe, probe.fn, point)
                if point.module not in self.skips:
                    self.skips[point.module] = _Skipping(point, BoundProbe(probe, ctx, ()), self.state, skip)
                    self._skip_fns.append((self.skips[point.module], number))
                continue
            if base not in self.taps:
                self.taps[base] = Tap(point, self.state)
            bound = BoundProbe(probe, ctx, keys)
            self.taps[base].bound.append(bound)
            self._fns.append((bound, number))
        for tap in self.taps.values():
            tap.bound_all()
        # the taps and skips that must fire: what ``missed`` looks at after each call
        self._required = tuple(
            tap for tap in (*self.taps.values(), *self.skips.values()) if not all(b.optional for b in tap.bound)
        )
        contexts.update(made)

    def release(self) -> None:
        """Let go of the probes' functions (a patch and its tensors), until ``rebind`` gives them back."""
        self.released = True
        for bound, _ in self._fns:
            bound.fn = None
        for skipping, _ in self._skip_fns:
            skipping.bound[0].fn = skipping.skip = None

    def rebind(self, probes: Sequence[Probe]) -> None:
        """Take the functions of ``probes``: probes at the points the plan was made for, one by one, each with the
        same ``grad`` and ``optional`` and a skip where there was one (the same objects, or new ones)."""
        self.released = False
        for bound, number in self._fns:
            fn = bound.fn = probes[number].fn
            bound.trusted = type(fn) in _SAVE_NOTHING
        for tap in self.taps.values():
            tap.bound_all()
        for skipping, number in self._skip_fns:
            probe = probes[number]
            skipping.bound[0].fn = probe.fn
            skipping.skip = _checked_skip(probe, probe.fn, skipping.point)

    def missed(self, since: int, stopped_at: str | None = None, inventory: Inventory | None = None) -> list[str]:
        """The points, as the probes name them, that no forward after forward number ``since`` reached.

        A forward that stopped at ``stopped_at`` is expected to have reached only
        the points that the dry run saw before it.
        """
        if not stopped_at:
            for tap in self._required:
                if tap.forward_id <= since:
                    break
            else:  # every one fired: the common case, without building a list of names
                return []
        names: dict[str, None] = {}
        if not stopped_at:
            for tap in self.taps.values():
                if tap.forward_id <= since:
                    names.update((bound.point, None) for bound in tap.bound if not bound.optional)
            for skipping in self.skips.values():
                if skipping.forward_id <= since and not skipping.bound[0].optional:
                    names[skipping.bound[0].point] = None
            return list(names)
        order = {name: number for number, name in enumerate(inventory.points)} if inventory else {}
        end = order.get(stopped_at, -1)
        for tap in (*self.taps.values(), *self.skips.values()):
            if end is not None and order.get(tap.point.name, end) >= end:
                continue
            if tap.forward_id <= since:
                names.update((bound.point, None) for bound in tap.bound if not bound.optional)
        return list(names)

    def attach(
        self,
        root: torch.nn.Module,
        modules: Mapping[str, torch.nn.Module],
        on_missed: Callable[[list[str]], None] | None = None,
        *,
        hooked: bool = True,
    ) -> Attachment:
        """Put the plan on the module tree; ``on_missed(points)`` after each forward made directly on ``root``
        (not through the model wrapper) that did not reach some of the plan's points; a neurotap error
        raised in such a forward loses the frames below torch's module call.

        ``hooked``: the root's every forward starts a new one (generate, direct
        calls in a ``patch`` block). Without it, for a caller that runs the root
        exactly once, nothing is put on the root for that; the caller calls ``begin_call(once=True)``.

        The attachment made last time is put on again when it can be (see ``Attachment.reattach``).
        """
        last = self._last_attached
        if last is not None and last[1] is hooked and last[2] == on_missed and not self._checkpointing():
            attachment = last[0]
            if attachment.reattach():
                self.direct_check = None
                self._watch_direct_calls(attachment, root, on_missed)
                return attachment
        if self._split is None:
            on_tensors = [tap for tap in self.taps.values() if tap.point.kind in _TENSOR_KINDS]
            outputs = [
                (modules[tap.point.module], tap.__call__) for tap in self.taps.values() if tap.point.kind == "output"
            ]
            others = [(tap.point, tap.__call__) for tap in self.taps.values() if tap.point.kind not in _NOT_SPLIT]
            self._split = (on_tensors, outputs, *split_taps(others))
        on_tensors, outputs, hooks, frames = self._split
        attachment = Attachment()
        self.direct_check = self.liftable_start = None
        try:
            held = [(tap, *attachment.hold_tensor(modules[tap.point.module], tap.point.scope[0])) for tap in on_tensors]
            self._held = held
            if hooked and held:
                attachment.hook(root, self.start_forward, before=True, with_kwargs=True, first=True)
                attachment.after_forward(root, functools.partial(_put_back, held))
            elif hooked and on_missed is None and self._counted_in_forward(root, hooks, frames):
                attachment.swap(
                    root, "forward", _counted_forward(self.state, types.MethodType(type(root).forward, root))
                )
                attachment.runs_class_forward(root)
            elif hooked:
                key = attachment.hook(root, self.state, before=True, with_kwargs=True, first=True)
                if self._counted_in_forward(root, hooks, frames):
                    self.liftable_start = key
            # each call made for nothing costs as much as a few table writes: a plan mostly has one kind of tap
            if outputs:
                attachment.on_outputs(outputs)
            if hooks or frames:
                attach_split(attachment, hooks, frames, modules)
            for path, skipping in self.skips.items():
                skipping.keyword = first_parameter(modules[path])
                attachment.skip(modules[path], skipping)
            checkpointed = (self._above_taps is None or self._above_taps) and self._through_checkpoints(
                attachment, modules
            )
            self._watch_direct_calls(attachment, root, on_missed)
        except BaseException:
            attachment.detach()
            raise
        # what it puts on is the same each time, but for the patched tensors and the checkpointed layers' regions
        if not held and not checkpointed:
            attachment.mark_replayable()
        self._last_attached = (attachment, hooked, on_missed)
        return attachment

    def _counted_in_forward(
        self, root: torch.nn.Module, hooks: list[tuple[Point, Tap]], frames: dict[str, Frame]
    ) -> bool:
        """Whether each forward of the root can be counted by a forward of neurotap's set on the root rather
        than by a pre-hook: a module with no hooks runs torch's quicker call (a generate's every step), but
        the count then comes after the root's pre-hooks, so none of them may be a tap, and the root's own
        forward must be free (no op taps or skip there, no forward other code set)."""
        own = root.__dict__
        return (
            "" not in frames
            and "" not in self.skips
            and "forward" not in own
            and "_old_forward" not in own
            and not any(point.module == "" for point, _ in hooks)
        )

    def counted_root_forward(self, root: torch.nn.Module) -> Callable[..., Any]:
        """The root's forward, counting each call as a new forward: what a call through the model that lifts
        the pre-hook at ``liftable_start`` (a ``generate`` in a ``patch`` block) sets on the root meanwhile."""
        counted = self._counted
        bound = None if counted is None else counted.__wrapped__  # type: ignore[attr-defined]
        if bound is None or bound.__self__ is not root or bound.__func__ is not type(root).forward:
            counted = self._counted = _counted_forward(self.state, types.MethodType(type(root).forward, root))
        return counted

    def _watch_direct_calls(
        self, attachment: Attachment, root: torch.nn.Module, on_missed: Callable[[list[str]], None] | None
    ) -> None:
        self.state.on_direct_call = None
        if on_missed is not None:
            hook = self._direct_hook
            if hook is None or hook.args[0] != on_missed:
                hook = self._direct_hook = functools.partial(self._after_direct_call, on_missed)
            # put on at the first direct call only: calls through the wrapper, which check their own
            # points, are most, and would each take it off for their run
            self.state.on_direct_call = functools.partial(self._check_direct_calls, attachment, root, hook)

    def _check_direct_calls(self, attachment: Attachment, root: torch.nn.Module, hook: Callable[..., None]) -> None:
        """Put the check after each direct forward of the root on, from within the first one's pre-hook: it
        goes after the hooks already there (the root's output taps fire before it), and torch's call runs it."""
        self.state.on_direct_call = None
        self.direct_check = (root.__dict__["_forward_hooks"], attachment.hook(root, hook, always=True))

    def _after_direct_call(
        self, on_missed: Callable[[list[str]], None], _module: Any, _args: Any, output: Any = None
    ) -> None:
        """After each forward of the root, also one that raised: one made directly on it, not through the
        model wrapper, that did not reach some of the plan's points calls ``on_missed``."""
        if MANAGED_CALLS[0]:  # the wrapper checks its own call's points, and shortens its errors
            return
        cache = getattr(output, "past_key_values", None)
        if cache is None and type(output) is tuple:  # return_dict=False: the cache is one of the values
            cache = next((value for value in output if is_cache(value)), None)
        if cache is not None:  # a forward passed it next is the next step of this one's call
            self.state.direct_cache = _weak(cache)
        if raised_at_the_module_call():
            return
        missed = self.missed(self.state.forward_id - 1)
        if missed:
            on_missed(missed)

    def begin_call(self, once: bool) -> int:
        """Start a call through the model; ``once``: its one root forward too (the plan was attached without a
        hook on the root to start it). Returns the number of the last forward before the call's."""
        state = self.state
        since = state.forward_id
        state.forwards_this_call = 0
        if once:
            if self._held:
                self.start_forward()
            else:
                state.new_forward()
        return since

    def start_forward(self, _module: Any = None, _args: Any = None, kwargs: dict[str, Any] | None = None) -> None:
        """Each forward starts from the real parameters and buffers, patched anew (a delta may have changed);
        registered itself as the root's forward pre-hook, with keywords."""
        self.state.new_forward(_module, _args, kwargs)
        if not self._held:
            return
        grad = torch.is_grad_enabled()
        for tap, table, original in self._held:
            # a gradient probe hooks a view, never the parameter itself, whose hooks would outlive the call
            seed = original.view_as(original) if grad and any(b.grad for b in tap.bound) else original
            table[tap.point.scope[0]] = tap(seed)

    start_forward._neurotap_hook = True  # type: ignore[attr-defined]  # on the function: its bound methods have it

    def _checkpointing(self) -> bool:
        """Whether a layer above a tap has gradient checkpointing on (the last attach may have seen it off)."""
        for _, own in self._above_taps or ():
            if _checkpointed(own):
                return True
        return False

    def _through_checkpoints(self, attachment: Attachment, modules: Mapping[str, torch.nn.Module]) -> bool:
        """Make each gradient-checkpointed layer above a tap recompute with the taps on (see ``_Region``);
        whether there was one."""
        if self._above_taps is None:
            layers: set[str] = set()
            for tap in self.taps.values():
                parts = tap.point.module.split(".") if tap.point.module else []
                layers.update(".".join(parts[:depth]) for depth in range(len(parts)))
            # only modules with a gradient_checkpointing attribute can be checkpointed: Hugging Face's
            # gradient_checkpointing_enable turns on those alone
            self._above_taps = tuple(
                (path, modules[path].__dict__) for path in layers if hasattr(modules[path], "gradient_checkpointing")
            )
        found = False
        for path, own in self._above_taps:
            if _checkpointed(own):
                module = modules[path]
                wrapped = functools.partial(_checkpoint_region, self, modules, own["_gradient_checkpointing_func"])
                attachment.swap(module, "_gradient_checkpointing_func", wrapped)
                found = True
        return found
