"""The model wrapper: ``nt.wrap(module)`` and its probe, patch and record API."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from ..errors import (
    MissedPointError,
    MissedPointWarning,
    NeurotapError,
    UnknownPointError,
    raised_at_the_call,
    shortened,
)
from ..points import (
    Attachment,
    Inventory,
    PointList,
    expand,
    in_execution_order,
    matching,
    ordered_names,
    static_inventory,
    take_inventory,
    unknown_point,
)
from ..probes import Norm, Patch, Probability, Probe, Project, Record, Recordings, SaveContext, Skip, probe
from .lens import LogitLens, logit_lens, unembed
from .losses import Loss, check_loss, loss_value
from .plan import GRADIENT_TARGETS, MANAGED_CALLS, Plan, Stopped, managed_call, stopping_probe
from .text import check_token_ids, is_text, text_to_ids
from .trace import Trace

_KEPT_PLANS = 4  # few: a plan keeps its probes, and their tensors, alive

PatchSpec = Mapping[str, Callable[..., Any] | Sequence[Callable[..., Any]]]


def _listed(value: Any) -> Sequence[Any]:
    """The patches at one point of a ``patch({...})``: one, or a list of them."""
    return value if isinstance(value, (list, tuple)) else (value,)


def patches_to_probes(patches: PatchSpec, *, optional: bool = False) -> list[Probe]:
    """``{point: patch or [patches]}`` -> probes, in order."""
    if type(patches) is not dict and not isinstance(patches, Mapping):  # a dict, mostly: no ABC check
        raise TypeError("patch() takes a dict {point name: patch or list of patches}")
    return [probe(point, fn, optional=optional) for point, value in patches.items() for fn in _listed(value)]


class _PatchBlock:
    """``with m.patch({...}):``: the block's probes are on from entry to exit (a class: no generator to run)."""

    __slots__ = ("model", "layer", "key", "plan", "refs")

    def __init__(self, model: Model, layer: list[Probe], key: tuple, plan: Plan, refs: list | None) -> None:
        self.model, self.layer, self.key, self.plan = model, layer, key, plan
        self.refs = refs  # the weak references to the patches that the kept plan had, made for that plan

    def __enter__(self) -> Model:
        plan = self.model._enter_block(self.layer, self.key, self.plan)
        if plan is not self.plan:
            self.plan, self.refs = plan, None
        return self.model

    def __exit__(self, *_: Any) -> None:
        self.refs = self.model._exit_block(self.layer, self.key, self.plan, self.refs)


class Model:
    """A wrapped module. Its own behaviour is unchanged until a probe or patch is active."""

    def __init__(self, module: torch.nn.Module, tokenizer: Any = None, example: Any = None) -> None:
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"nt.wrap takes a torch.nn.Module, got {type(module).__name__}")
        self.module = module
        self.tokenizer = tokenizer
        self._example = example
        self._inventory: Inventory | None = None
        self._modules: dict[str, torch.nn.Module] | None = None
        self._contexts: dict[str, SaveContext] = {}
        self._layers: list[list[Probe]] = []  # active patch() contexts, outermost first
        self._layer_plan: Plan | None = None
        self._attached: Attachment | None = None
        # recent calls' plans by their probes' ids; an entry goes when one of its probes does
        self._plans: OrderedDict[tuple[int, ...], tuple[Plan, list[weakref.ref]]] = OrderedDict()
        self._plans_of: Inventory | None = None  # the inventory those plans were resolved against
        # the key and plan of the last call with probes, while that key is in ``_plans``
        self._last_plan: list[Any] = [None, None]
        # the last plans made, by the shape of their probes (see ``_plan``), each with the key of its probes now
        self._spares: OrderedDict[tuple, tuple[Plan, tuple[int, ...]]] = OrderedDict()
        # recent patch() blocks' plans, let go of their patch objects, by their points and those objects' ids,
        # with weak references to the objects: a block entered again with the same patches reuses its plan
        self._blocks: OrderedDict[tuple, tuple[Plan, list[weakref.ref], Inventory]] = OrderedDict()
        self._block_plans: dict[int, Plan] = {}  # each active block's own plan, by id of its probes' list
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"nt.Model({type(self.module).__name__}, {len(self._layers)} patch layers active)"

    # -- points -----------------------------------------------------------------------------------

    @raised_at_the_call
    def points(self, prefix: str | None = None) -> PointList:
        """Every probe point, in execution order; only those under ``prefix`` if given.

        ``prefix`` may be a pattern (``model.layers.*.mlp``, ``blocks.{0..5}.resid_post``):
        the points under each match. An alias lists the raw point it stands for.
        """
        inventory = self.inventory()
        points = list(inventory.points.values())
        if prefix:
            chosen = set(matching(prefix, inventory.points, prefix=True))
            if not chosen:
                chosen = {inventory.aliases[alias] for alias in matching(prefix, inventory.aliases, prefix=True)}
            points = [p for p in points if p.name in chosen]
            if not points:
                raise unknown_point(prefix, ordered_names(inventory))
        return PointList(points)

    def aliases(self) -> dict[str, str]:
        """Short canonical names (``blocks.3.resid_post``, ``blocks.3.attn.pattern``) -> raw point names."""
        return dict(self.inventory().aliases)

    def inventory(self, args: tuple = (), kwargs: Mapping[str, Any] | None = None) -> Inventory:
        """The inventory, taken on first use from one dry run on a small example input.

        A module with no example input (none given, no config to make one from) gets
        the points its code names, without shapes, until a forward's inputs serve as the example.
        """
        inventory = self._inventory
        if inventory is not None and inventory.ran:  # taken once and for all: no lock needed to read it
            return inventory
        with self._lock:
            if self._inventory is None or not self._inventory.ran:
                example = self._example_inputs(args, dict(kwargs or {}))
                if example is None:
                    if self._inventory is None:
                        self._inventory = static_inventory(self.module)
                    return self._inventory
                call_args, call_kwargs = example
                buffers = [(b, b.detach().clone()) for b in self.module.buffers()]
                self._detach()
                devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
                try:
                    with torch.random.fork_rng(devices=devices), managed_call():  # nor draw from random streams
                        self._inventory = take_inventory(self.module, lambda: self.module(*call_args, **call_kwargs))
                finally:
                    with torch.no_grad():
                        for buffer, saved in buffers:  # a dry run must not move running statistics
                            buffer.copy_(saved)
                    self._reattach()
        return self._inventory

    def _example_inputs(self, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        if self._example is not None:
            example = self._example
            if isinstance(example, Mapping):
                return (), dict(example)
            return (tuple(example) if isinstance(example, (tuple, list)) else (example,)), {}
        config = getattr(self.module, "config", None)
        vocab = getattr(config, "vocab_size", None)
        if vocab:
            device = next(iter(self.module.parameters()), torch.empty(0)).device
            ids = (torch.arange(1, 6, device=device) % vocab).unsqueeze(0)
            return (), {getattr(self.module, "main_input_name", "input_ids"): ids}
        if args or kwargs:
            return args, kwargs
        return None

    # -- running ----------------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def forward(self, *args: Any, probes: Sequence[Probe] = (), stop_at: str | None = None, **kwargs: Any) -> Any:
        """The module's forward, with ``probes`` active for this call (and any patches).

        With ``stop_at`` (a point name or alias), the forward ends as soon as that
        point has fired and its probes have run, and returns the value there; what
        the probes recorded so far is kept, and nothing after the point runs.
        """
        try:  # raised_at_the_call, written out: its frame and the arguments packed again cost a tiny model 3 us a call
            return self._run(self.module, args, kwargs, probes, stop_at)
        except NeurotapError as error:
            raise shortened(error)  # noqa: B904 - the same error

    @raised_at_the_call
    def generate(self, *args: Any, probes: Sequence[Probe] = (), **kwargs: Any) -> Any:
        """The module's ``generate``; probes and patches fire at every step (``ctx.step``)."""
        generate = getattr(self.module, "generate", None)
        if generate is None:
            raise NeurotapError(f"{type(self.module).__name__} has no generate(); use forward()")
        return self._run(generate, args, kwargs, probes)

    @raised_at_the_call
    def backward(
        self, *args: Any, loss: Loss | Callable[[Any], torch.Tensor], probes: Sequence[Probe] = (), **kwargs: Any
    ) -> float:
        """Forward with ``probes``, a ``loss``, then the gradients the probes ask for; returns the loss.

        ``loss`` is a built-in loss of the logits, ``nt.CrossEntropy(targets)`` or
        ``nt.LogitDiff(correct, wrong)`` (plain data, so the same call runs on a
        server), or any function of the model's output returning one number.
        Gradient probes (``nt.probe(point, fn, grad=True)``) see the gradient at
        their points, frozen weights or not. Only those gradients are computed: the
        weights' ``.grad`` are left as they were, and tensors in the patches that
        require grad (an ``Add``'s delta) get theirs added to their ``.grad``.
        """
        return float(self._forward_backward(args, kwargs, loss, probes)[1].detach())

    def _forward_backward(
        self, args: tuple, kwargs: dict[str, Any], loss: Loss | Callable[[Any], torch.Tensor], probes: Sequence[Probe]
    ) -> tuple[Any, torch.Tensor]:
        check_loss(loss)
        if self.module.training and any(
            getattr(m, "gradient_checkpointing", False) is True for m in self.module.modules()
        ):
            return self._forward_backward_through_checkpoints(args, kwargs, loss, probes)
        targets: list[torch.Tensor] = []
        noting = GRADIENT_TARGETS.set(targets)
        try:
            with torch.enable_grad():
                output = self.forward(*args, probes=probes, **kwargs)
                value = loss_value(loss, output)
        finally:
            GRADIENT_TARGETS.reset(noting)
        own = _patch_leaves([*(p for layer in self._layers for p in layer), *probes])
        if targets or own:
            if not value.requires_grad:
                raise NeurotapError("the loss does not depend on the probed values or the patches' tensors")
            grads = torch.autograd.grad(value, [*targets, *own], allow_unused=True)
            for leaf, grad in zip(own, grads[len(targets) :]):
                if grad is not None:
                    leaf.grad = grad if leaf.grad is None else leaf.grad + grad
        return output, value

    def _forward_backward_through_checkpoints(
        self, args: tuple, kwargs: dict[str, Any], loss: Loss | Callable[[Any], torch.Tensor], probes: Sequence[Probe]
    ) -> tuple[Any, torch.Tensor]:
        """A whole backward, the weights' own gradients put back after: torch's reentrant checkpoint has no other."""
        parameters = list(self.module.parameters())
        kept = [p.grad for p in parameters]
        for parameter in parameters:  # backward accumulates into .grad in place: keep the user's out of reach
            parameter.grad = None
        try:
            with torch.enable_grad():
                output = self.forward(*args, probes=probes, **kwargs)
                value = loss_value(loss, output)
                value.backward()
        finally:
            for parameter, grad in zip(parameters, kept):
                parameter.grad = grad
        return output, value

    @raised_at_the_call
    def run(
        self,
        *args: Any,
        record: str | Sequence[str] | Mapping[str, Patch] = (),
        grad: str | Sequence[str] = (),
        loss: Loss | Callable[[Any], torch.Tensor] | None = None,
        probes: Sequence[Probe] = (),
        generate: bool = False,
        **kwargs: Any,
    ) -> tuple[Any, Trace]:
        """One forward, and a :class:`Trace` of the values it computed at the points in ``record``.

        ``record`` and ``grad`` take point names, aliases and patterns
        (``"blocks.*.resid_post"``); ``record`` also takes ``{name: reading}``, a
        patch that keeps a reading of each value rather than a copy of it
        (``nt.Record(index=...)``, ``nt.Norm``, ``nt.Project``, ``nt.Probability``):
        through a server only the readings travel. With ``loss`` (as for ``backward``) the
        forward is followed by a backward, and the trace holds the gradients at
        the points in ``grad`` (``trace.grad``) and the loss (``trace.loss``).
        With ``generate=True`` the call is ``generate`` instead, and
        ``trace.calls(name)`` holds the value at each step: the prompt's pass
        first, then one per generated token after the first.
        The values are detached copies belonging to this call alone: save
        contexts and ``recordings()`` are not touched. ``probes`` and any patches
        apply as in ``forward``; other keyword arguments go to the forward (or generate).
        """
        readings, grad = readings_of(record), point_names("grad", grad)
        check_run(grad, loss, generate)
        call = self.module
        if generate:
            call = getattr(self.module, "generate", None)
            if call is None:
                raise NeurotapError(f"{type(self.module).__name__} has no generate(); run without generate=True")
        args, kwargs = self._inputs(call, args, kwargs)
        inventory = self.inventory(args, kwargs)
        values: dict[str, SaveContext] = {}
        grads: dict[str, SaveContext] = {}
        traced = {match: reading for name, reading in readings.items() for match in expand(name, inventory)}
        tracing = [probe(name, _tracer(values, name, reading)) for name, reading in traced.items()]
        tracing += [probe(name, _tracer(grads, name, Record()), grad=True) for name in _expanded(grad, inventory)]
        with self._lock, self._no_new_empty_contexts():
            if loss is None:
                run = self.generate if generate else self.forward
                output = run(*args, probes=[*probes, *tracing], **kwargs)
                return output, Trace(in_execution_order(_recorded(values), inventory))
            output, value = self._forward_backward(args, kwargs, loss, [*probes, *tracing])
        recorded, gradients = (in_execution_order(_recorded(c), inventory) for c in (values, grads))
        return output, Trace(recorded, gradients, float(value.detach()))

    @contextlib.contextmanager
    def _no_new_empty_contexts(self) -> Iterator[None]:
        """Drop the save contexts a call made and left empty: a trace's probes save into contexts of their own."""
        before = set(self._contexts)
        try:
            yield
        finally:
            for name in [n for n, ctx in self._contexts.items() if n not in before and not len(ctx)]:
                del self._contexts[name]

    def _inputs(self, call: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        """Text as token ids; anything else where token ids go is refused with what to pass instead."""
        first = args[0] if args else kwargs.get("input_ids")
        if first is None or isinstance(first, torch.Tensor) and first.dtype == torch.long:
            return args, kwargs
        takes_ids = getattr(self.module, "main_input_name", None) == "input_ids"
        if is_text(first) and (takes_ids or self.tokenizer is not None):
            return text_to_ids(self.tokenizer, "forward" if call is self.module else "generate", args, kwargs)
        if takes_ids:
            check_token_ids(first)
        return args, kwargs

    def _run(
        self,
        call: Callable[..., Any],
        args: tuple,
        kwargs: dict[str, Any],
        probes: Sequence[Probe],
        stop_at: str | None = None,
    ) -> Any:
        # the checks below (_inputs' and _plan's common cases, managed_call, _detach's and _reattach's guards) are
        # written out here rather than called: with them called, the tiny model's per-call overhead over hand hooks
        # was x1.46 and x1.30 for its two bench_core tasks rather than x1.37 and x1.18 (medians of 7 processes)
        first = args[0] if args else kwargs.get("input_ids")
        if not (first is None or isinstance(first, torch.Tensor) and first.dtype == torch.long):
            args, kwargs = self._inputs(call, args, kwargs)
        if stop_at is not None:
            probes = [*probes, stopping_probe(stop_at)]  # last: the point's other probes run before it stops
        stopped = None
        with self._lock:  # hooks are per module, not per thread: one call at a time sees the right ones
            if not probes:
                if self._inventory is not None and not self._inventory.ran:
                    self.inventory(args, kwargs)  # the shapes, from the first call that has inputs
                plan = self._layer_plan
                if plan is None:
                    return call(*args, **kwargs)
                attached, check, key = self._attached, plan.direct_check, plan.liftable_start
                # the hook checking direct calls would only return at each forward: off for this call
                hook = check[0].pop(check[1], None) if check is not None else None
                # so is the pre-hook starting each forward, where this call can count its forwards itself: then
                # the root has no hooks of neurotap's, and each of generate's steps takes torch's quicker call
                lifted, once = None, call is self.module
                if key is not None and attached is not None:
                    counted = None if once else plan.counted_root_forward(self.module)
                    lifted = attached.lift_pre_hook(self.module, key, counted)
                MANAGED_CALLS[0] += 1  # first: a forward started here is not a direct call
                try:
                    since = plan.begin_call(lifted is not None and once)
                    result = call(*args, **kwargs)
                finally:
                    MANAGED_CALLS[0] -= 1
                    if lifted is not None:
                        attached.put_back_pre_hook(self.module, key, lifted)  # type: ignore[union-attr]
                    if hook is not None and self._attached is attached:  # still the same taps on
                        check[0][check[1]] = hook
            else:
                every = (*(p for layer in self._layers for p in layer), *probes) if self._layers else tuple(probes)
                key = tuple(map(id, every))
                last_key, last_plan = self._last_plan  # one read: a weakref callback may clear it
                if key == last_key:  # the probes of the call before (a loop's): its plan, already last in the cache
                    plan = last_plan
                else:
                    inventory = self._inventory
                    if inventory is None or not inventory.ran:
                        inventory = self.inventory(args, kwargs)
                    kept = self._plans.get(key) if self._plans_of is inventory else None
                    if kept is None:
                        plan = self._plan(every, inventory, key)
                    else:
                        self._plans.move_to_end(key)
                        plan = kept[0]
                    if inventory.ran:  # taken for good: the plan cannot go stale by a new one
                        self._last_plan[:] = key, plan
                once = call is self.module  # one root forward: start it here rather than from a hook on the root
                if self._attached is not None:
                    self._detach()
                try:
                    self._attached = plan.attach(self.module, self._modules or self._named_modules(), hooked=not once)
                    MANAGED_CALLS[0] += 1  # first: a forward started here is not a direct call
                    try:
                        since = plan.begin_call(once)
                        result = call(*args, **kwargs)
                    finally:
                        MANAGED_CALLS[0] -= 1
                except Stopped as stop:
                    result, stopped = stop.value, plan.bases[stop_at]  # type: ignore[index]
                finally:
                    attached, self._attached = self._attached, None
                    if attached is not None:
                        attached.detach()
                    if self._layer_plan is not None:
                        self._reattach()
        missed = plan.missed(since, stopped, self._inventory)
        if missed:
            self._missed(missed, generating=call is not self.module)
        return result

    def _plan(self, probes: tuple[Probe, ...], inventory: Inventory, key: tuple[int, ...] | None = None) -> Plan:
        """The plan for ``probes`` (``key``: their ids): the one made last time when the same probes come again
        (a loop's calls).

        The cache holds the probes only weakly, so probes made for one call (and
        what their functions hold) are not kept alive by it.
        """
        plans, last = self._plans, self._last_plan
        if self._plans_of is not inventory:
            plans.clear()
            last[:] = None, None
            self._plans_of = inventory
            self._spares.clear()
        key = tuple(map(id, probes)) if key is None else key
        kept = plans.get(key)
        if kept is not None:
            plans.move_to_end(key)
            return kept[0]
        for p in probes:  # checked once, here: a plan found again was made from the same probes
            if not isinstance(p, Probe):
                raise TypeError(f"probes must be made with nt.probe(point, fn), got {type(p).__name__}")
        # new probes at the points of a recent plan, of the same kinds (a sweep's next cell): that plan, and its
        # attachment, serve them, with their functions, once its own probes are gone (or it left the cache);
        # never from inside a call, nor while a block has it on
        shape = tuple((p.point, p.grad, p.optional, isinstance(p.fn, Skip)) for p in probes)
        spares, plan = self._spares, None
        spare = spares.get(shape)
        if spare is not None and not MANAGED_CALLS[0]:
            candidate, its_key = spare
            free = plans.get(its_key, (None,))[0] is not candidate
            if free and candidate is not self._layer_plan and candidate not in self._block_plans.values():
                plan = candidate
                plan.rebind(probes)
        if plan is None:
            plan = Plan(probes, inventory, self._contexts)
        spares[shape] = (plan, key)
        spares.move_to_end(shape)
        if len(spares) > _KEPT_PLANS:
            spares.popitem(last=False)

        def forget(_: weakref.ref) -> None:
            plans.pop(key, None)
            if last[0] == key:  # new probes may take the ids of these
                last[:] = None, None
            spare = spares.get(shape)
            if spare is not None and spare[0] is plan and spare[1] == key:  # still bound to these probes, now gone:
                plan.release()  # a spare plan keeps no patch alive

        plans[key] = (plan, [weakref.ref(p, forget) for p in probes])
        if len(plans) > _KEPT_PLANS and plans.popitem(last=False)[0] == last[0]:
            last[:] = None, None
        return plan

    def _missed(self, points: list[str], *, generating: bool, directly: bool = False) -> None:
        names = ", ".join(map(repr, points))
        what = "a call made directly on the module" if directly else "generate" if generating else "the forward"
        message = (
            f"{what} finished without reaching {names}, so the probes "
            "and patches there did nothing. The points exist, but these inputs do not run them (a branch not "
            "taken, a module skipped, a loss computed only with labels). Give inputs that reach them, or mark a "
            "probe that may miss with nt.probe(point, fn, optional=True) (m.patch(..., optional=True) for a block)"
        )
        if directly:  # one forward of something neurotap cannot see whole (generate, a training loop): warn
            warnings.warn(message, MissedPointWarning, stacklevel=2)
        elif generating:  # a generation may stop before a step that would have reached them: say so, keep the tokens
            warnings.warn(message, MissedPointWarning, stacklevel=4)
        else:
            raise MissedPointError(message, tuple(points))

    @raised_at_the_call
    def patch(self, patches: PatchSpec, *, optional: bool = False) -> contextlib.AbstractContextManager[Model]:
        """Apply ``{point: patch or [patches]}`` to every forward inside the ``with`` block.

        Nested blocks compose: inner patches run after outer ones at the same
        point, and each block's patches come off when it exits. A ``forward`` or
        ``generate`` in the block that does not reach a patched point fails as it
        would with that probe, unless the block is ``optional``.
        """
        with self._lock:
            layer = patches_to_probes(patches, optional=optional)
            key = (optional, *[(p.point, id(p.fn)) for p in layer])
            plan, refs = self._block_plan(layer, key)  # an unknown point fails here, at the call, not at entry
        return _PatchBlock(self, layer, key, plan, refs)

    def _block_plan(self, layer: list[Probe], key: tuple) -> tuple[Plan, list[weakref.ref] | None]:
        """The plan of a block of ``layer`` alone: the one made last time for the same points and patch objects,
        with the weak references to them it was kept by.

        A kept plan holds no patch object (see ``Plan.release``), and its entry goes when one of them does,
        so a patch's tensors are freed once its user drops it.
        """
        inventory = self.inventory()
        kept = self._blocks.pop(key, None)  # in use until the block ends: a block nested in itself makes its own
        if kept is not None:
            plan, refs, of = kept
            if of is inventory:
                for ref, p in zip(refs, layer):
                    if ref() is not p.fn:
                        break
                else:
                    plan.rebind(layer)
                    return plan, refs
        return Plan(layer, inventory, self._contexts), None

    def _keep_block_plan(self, layer: list[Probe], key: tuple, plan: Plan, refs: list | None) -> list | None:
        """Keep the plan of a block that ended, for the next block of the same patch objects; returns the weak
        references it is kept by (``refs``, made for this plan and key, if given)."""
        plan.release()
        blocks = self._blocks
        if refs is not None:
            blocks[key] = (plan, refs, self._inventory)
            if len(blocks) > _KEPT_PLANS:
                blocks.popitem(last=False)
            return refs

        def forget(_: weakref.ref) -> None:
            if blocks.get(key, (None,))[0] is plan:
                del blocks[key]

        try:
            refs = [weakref.ref(p.fn, forget) for p in layer]
        except TypeError:  # a patch that cannot be referred to weakly: its blocks are planned anew each time
            return None
        blocks[key] = (plan, refs, self._inventory)
        if len(blocks) > _KEPT_PLANS:
            blocks.popitem(last=False)
        return refs

    def _enter_block(self, layer: list[Probe], key: tuple, block_plan: Plan) -> Plan:
        """Put the block on; returns its own plan (a block entered a second time may need another)."""
        with self._lock:
            if self._blocks.get(key, (None,))[0] is block_plan:  # the same block object entered again
                del self._blocks[key]
            if block_plan in self._block_plans.values():  # Plan compares by identity
                block_plan = Plan(layer, self.inventory(), self._contexts)
            elif block_plan.released:  # this block object entered again
                block_plan.rebind(layer)
            plan = block_plan
            if self._layers:
                plan = self._plan((*(p for lay in self._layers for p in lay), *layer), self.inventory())
            self._detach()
            self._layers.append(layer)
            self._block_plans[id(layer)] = block_plan
            self._layer_plan = plan
            self._reattach()
            return block_plan

    def _exit_block(self, layer: list[Probe], key: tuple, block_plan: Plan, refs: list | None) -> list | None:
        with self._lock:
            self._detach()
            self._layers.remove(layer)
            del self._block_plans[id(layer)]
            if not self._layers:  # the outermost block: nothing to put back on
                self._layer_plan = None
            else:
                if len(self._layers) == 1:
                    self._layer_plan = self._block_plans[id(self._layers[0])]
                else:
                    remaining = tuple(p for lay in self._layers for p in lay)
                    self._layer_plan = self._plan(remaining, self.inventory()) if remaining else None
                self._reattach()
            return self._keep_block_plan(layer, key, block_plan, refs)

    def _named_modules(self) -> dict[str, torch.nn.Module]:
        if self._modules is None:
            self._modules = dict(self.module.named_modules())
        return self._modules

    def _detach(self) -> None:
        if self._attached is not None:
            attached, self._attached = self._attached, None
            attached.detach()

    def _reattach(self) -> None:
        if self._layer_plan is not None and self._attached is None:
            self._attached = self._layer_plan.attach(self.module, self._named_modules(), self._missed_directly)

    def _missed_directly(self, points: list[str]) -> None:
        self._missed(points, generating=False, directly=True)

    @raised_at_the_call
    def unembed(self, residual: torch.Tensor) -> torch.Tensor:
        """Logits of a residual-stream value ``[..., hidden]``: the model's final norm, then its output embeddings.

        For every aliased family (``ln_final`` and output embeddings); other models raise a NeurotapError.
        """
        return unembed(self, residual)

    @raised_at_the_call
    def logit_lens(
        self, ids: Any, positions: int | Sequence[int] | None = -1, *, top: int = 5, token: int | str | None = None
    ) -> LogitLens:
        """Every layer's residual (``blocks.N.resid_post``) at ``positions`` (None: all) read as logits.

        One forward, stopped after the last layer; returns an ``nt.LogitLens`` with each
        layer's ``top`` tokens and, given a ``token`` (an id, or the first token of a
        text), its rank and probability. ``ids``: token ids of one prompt, or text.
        """
        return logit_lens(self, ids, positions, top=top, token=token)

    # -- results ----------------------------------------------------------------------------------

    def recordings(self) -> dict[str, SaveContext]:
        """What probes saved, by point name (gradient probes: ``point + ".grad"``)."""
        return Recordings({name: ctx for name, ctx in self._contexts.items() if len(ctx)})

    def clear_recordings(self) -> None:
        for ctx in self._contexts.values():
            ctx._data.clear()

    def get_parameter(self, name: str) -> torch.nn.Parameter:
        try:
            return self.module.get_parameter(name)
        except AttributeError as error:
            raise UnknownPointError(f"no parameter named {name!r}: {error}") from None


def _patch_leaves(probes: Sequence[Probe]) -> list[torch.Tensor]:
    """The tensors of the probes' patches that ask for a gradient of their own (an ``Add``'s delta)."""
    leaves: dict[int, torch.Tensor] = {}
    for p in probes:
        if isinstance(p.fn, Patch) and dataclasses.is_dataclass(p.fn):
            for field in dataclasses.fields(p.fn):
                value = getattr(p.fn, field.name)
                if isinstance(value, torch.Tensor) and value.requires_grad and value.is_leaf:
                    leaves.setdefault(id(value), value)
    return list(leaves.values())


GRAD_NEEDS_LOSS = (
    "run(grad=...) needs something to differentiate: give a loss as well, "
    "loss=nt.CrossEntropy(targets) or loss=nt.LogitDiff(correct, wrong)"
)


def check_run(grad: list[str], loss: Any, generate: bool) -> None:
    """Refuse, before anything runs, a ``run`` whose arguments do not go together."""
    if generate and (grad or loss is not None):
        raise NeurotapError(
            "run(generate=True) traces values only: generate runs without autograd, so it takes no grad= or "
            "loss=; trace one forward of the generated tokens with loss= for gradients"
        )
    if grad and loss is None:
        raise NeurotapError(GRAD_NEEDS_LOSS)
    if loss is not None:
        check_loss(loss)


READINGS = (Record, Norm, Project, Probability)  # the patches that append one reading of each value to a list


def readings_of(record: str | Sequence[str] | Mapping[str, Patch]) -> dict[str, Patch]:
    """``record=`` as ``{point name or pattern: the patch that reads its values}``; names alone are recorded whole."""
    if not isinstance(record, Mapping):
        return {name: Record() for name in point_names("record", record)}
    for name, reading in record.items():
        point_names("record", [name])
        if not isinstance(reading, READINGS):
            kinds = ", ".join(f"nt.{kind.__name__}" for kind in READINGS)
            raise NeurotapError(
                f"run(record={{{name!r}: ...}}) takes a patch that reads each value ({kinds}), got "
                f"{type(reading).__name__}; put patches that change values or keep running totals in probes="
            )
    return dict(record)


def point_names(argument: str, names: str | Sequence[str]) -> list[str]:
    """``record=`` or ``grad=`` as a list of point names and patterns."""
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"run({argument}=...) takes point names or patterns (str), got {type(name).__name__}")
    return names


def _expanded(names: list[str], inventory: Inventory) -> list[str]:
    """Every name and every match of every pattern, once each."""
    return list(dict.fromkeys(match for name in names for match in expand(name, inventory)))


def _tracer(contexts: dict[str, SaveContext], name: str, reading: Patch) -> Callable[[SaveContext, Any], None]:
    """A probe that reads each value at ``name`` into a context of its own, away from the model's."""
    ctx = contexts[name] = SaveContext(name)

    def trace(_: SaveContext, value: Any) -> None:
        reading(ctx, value)

    return trace


def _recorded(contexts: dict[str, SaveContext]) -> dict[str, list[Any]]:
    """Each traced point's readings: the one list its reading patch appends to."""
    return {name: next(iter(ctx._data.values())) for name, ctx in contexts.items() if len(ctx)}


def wrap(module: torch.nn.Module, tokenizer: Any = None, *, example: Any = None) -> Model:
    """Wrap any ``torch.nn.Module``; nothing about it changes until a probe is active."""
    return Model(module, tokenizer, example)
