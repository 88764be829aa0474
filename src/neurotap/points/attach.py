"""Attach taps to a live module tree, and take them all off again.

Module points use PyTorch's own forward hooks. Op points swap in the tapped
forward (see ``rewrite``) on just the module instances that need it, as an
instance attribute; everything else runs its original code untouched.
"""

from __future__ import annotations

import copyreg
import functools
import inspect
import itertools
import types
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from ..errors import PatchError
from .rewrite import FRAME_ATTR, TappedFunction, defining_class, expandable, push_helper_frame, tapped

Fire = Callable[[Any], Any]


_tapped_forwards: dict[tuple[type, Any, frozenset[str] | None], TappedFunction | None] = {}


def tapped_forward(module: torch.nn.Module, only: frozenset[str] | None = None) -> TappedFunction | None:
    """The module's tapped forward; with ``only``, one that passes just those sites to its frame."""
    cls = type(module)
    key = (cls, cls.forward, only)  # the class's forward as it is now: code may have replaced it since
    if key not in _tapped_forwards:
        if cls.__module__.partition(".")[0] == "torch":
            _tapped_forwards[key] = None  # torch's own layers: their inputs and outputs are the points
        else:
            _tapped_forwards[key] = tapped(cls.forward, "method", defining_class(cls, "forward"), only)
    return _tapped_forwards[key]


def forward_replaced(module: torch.nn.Module) -> bool:
    """Whether other code set ``module.forward`` on the instance, so the class's forward may never run."""
    own = module.__dict__
    return "forward" in own and "_old_forward" not in own and FRAME_ATTR not in own


def tapped_callee(callee: Any) -> tuple[Any, TappedFunction] | None:
    """The tapped version of a helper about to be called, ready to call."""
    if type(callee) is types.MethodType:
        func = callee.__func__
        owner = defining_class(type(callee.__self__), func.__name__)
        result = tapped(func, "helper", owner)
        return (types.MethodType(result.function, callee.__self__), result) if result else None
    result = tapped(callee, "helper")
    return (result.function, result) if result else None


_NOTHING_TO_ENTER: dict[str, Any] = {}


class Frame:
    """Routes a tapped function's sites to taps; ``children`` frames enter helpers (add them with ``child``)."""

    __slots__ = ("taps", "children", "fn", "_sites")

    def __init__(self) -> None:
        self.taps: dict[str, Fire] = {}
        self.children: dict[str, Frame] = {}
        self._sites: frozenset[str] | None = None
        # fn(name, callee): the callee to call at site ``name``; with no child frame, every callee as it is,
        # by a dict's get, which costs no Python frame at each of the many calls a forward makes
        self.fn: Callable[[str, Any], Any] = _NOTHING_TO_ENTER.get

    def child(self, name: str, frame: Frame | None = None) -> Frame:
        """The frame for the helper called at site ``name``, ``frame`` if given, made if there is none."""
        self.fn = self.enter
        if frame is not None:
            self.children[name] = frame
        return self.children.setdefault(name, Frame())

    def sites(self) -> frozenset[str]:
        """The sites it taps or enters helpers at, worked out on the first ask: a frame is complete by then."""
        sites = self._sites
        if sites is None:
            sites = self._sites = frozenset(self.taps.keys() | self.children.keys())
        return sites

    def out(self, name: str, value: Any) -> Any:
        tap = self.taps.get(name)
        return value if tap is None else tap(value)

    def dropped(self, name: str, value: Any) -> None:
        tap = self.taps.get(name)
        if tap is not None and tap(value) is not value:
            point = _point_of(tap)
            where = f"{point.name!r} ({point.source.replace('  ', ': ', 1)})" if point is not None else repr(name)
            raise PatchError(
                f"a patch at {where} cannot take effect: that statement throws its value away, so a replacement "
                "would reach nothing. Patch a value that later code uses instead (the next op or module input "
                "that reads it), or assign the statement's value in the model's code"
            )

    @staticmethod
    def merged(first: Frame, second: Frame) -> Frame:
        """One frame that runs ``first``'s taps and then ``second``'s at every site."""
        frame = Frame()
        for name in first.taps.keys() | second.taps.keys():
            a, b = first.taps.get(name), second.taps.get(name)
            frame.taps[name] = a if b is None else b if a is None else _Chained(a, b)
        for name in first.children.keys() | second.children.keys():
            a, b = first.children.get(name), second.children.get(name)
            frame.child(name, a if b is None else b if a is None else Frame.merged(a, b))
        return frame

    def enter(self, name: str, callee: Any) -> Any:
        child = self.children.get(name)
        if child is None or not expandable(callee):
            return callee
        entered = tapped_callee(callee)
        if entered is None:
            return callee
        push_helper_frame(child)
        return entered[0]


class _Chained:
    """Two taps at one site, one after the other; named after the later one's point."""

    __slots__ = ("first", "second", "point")

    def __init__(self, first: Fire, second: Fire) -> None:
        self.first, self.second = first, second
        self.point = _point_of(second) or _point_of(first)

    def __call__(self, value: Any) -> Any:
        return self.second(self.first(value))


def _point_of(fire: Fire) -> Any:
    """The point ``fire`` taps, when it says: its own, or for a bound method, its object's."""
    return getattr(getattr(fire, "__self__", fire), "point", None)


ARGUMENTS = "args"  # P.args.NAME: the argument NAME of module P's forward, however it is passed


@dataclass(frozen=True)
class Signature:
    """The parameters of a module's ``forward`` that a call can pass (after self)."""

    first: str | None  # the input point's parameter
    others: tuple[str, ...]  # the argument points', in the signature's order
    positions: dict[str, int]  # where each may come positionally (index into the call's args)
    any_keyword: bool  # **kwargs: keywords outside the signature are arguments too


_signatures: dict[type, Signature] = {}


def signature(module: torch.nn.Module) -> Signature:
    cls = type(module)
    if cls not in _signatures:
        try:
            params = list(inspect.signature(cls.forward).parameters.values())[1:]
        except (TypeError, ValueError):
            params = []
        P = inspect.Parameter
        named = [p for p in params if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)]
        positional = [p.name for p in params if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
        # a keyword-only first parameter (forward(self, *, x)) is the input too: it can only come by keyword
        first = named[0].name if params and params[0] in named else None
        _signatures[cls] = Signature(
            first=first,
            others=tuple(p.name for p in named if p.name != first),
            positions={name: index for index, name in enumerate(positional)},
            any_keyword=any(p.kind == P.VAR_KEYWORD for p in params),
        )
    return _signatures[cls]


def first_parameter(module: torch.nn.Module) -> str | None:
    """Name of the first argument of ``forward`` (after self), for keyword calls."""
    return signature(module).first


def passed_arguments(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> list[tuple[str, Any]]:
    """The arguments of one call other than the input, by parameter name, in the signature's order."""
    found = signature(module)
    passed = []
    for name in found.others:
        position = found.positions.get(name)
        if name in kwargs:
            passed.append((name, kwargs[name]))
        elif position is not None and position < len(args):
            passed.append((name, args[position]))
    if found.any_keyword:
        known = {found.first, *found.others}
        passed.extend((name, value) for name, value in kwargs.items() if name not in known)
    return passed


_ABSENT = object()  # what an attribute or table entry neurotap set was before it: there was none
_HOOK_MARK = "_neurotap_hook"  # set on every hook neurotap registers, so copies can leave them out
_REDUCE = "__reduce_ex__"
_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def _untapped_reduce(module: torch.nn.Module, _attachments: list, pristine: dict, _protocol: int) -> tuple:
    """What pickling or copying ``module`` sees: its state as if nothing were attached."""
    state = type(module).__getstate__(module)
    for name in (_REDUCE, FRAME_ATTR):
        state.pop(name, None)
    for slot, value in pristine.items():
        if isinstance(slot, tuple):  # a parameter or buffer: (its table, its name)
            table, name = slot
            state[table] = {**state[table], name: value}
        elif value is _ABSENT:
            state.pop(slot, None)
        else:
            state[slot] = value
    ours = {
        key
        for name in ("_forward_pre_hooks", "_forward_hooks")
        for key, hook in state.get(name, {}).items()
        if getattr(hook, _HOOK_MARK, False)
    }
    if ours:
        for name in _HOOK_DICTS:
            if name in state:
                state[name] = OrderedDict((key, value) for key, value in state[name].items() if key not in ours)
    return copyreg.__newobj__, (type(module),), state


class _Guard(functools.partial):
    """What a module carries while attachments are on it: ``_Guard(_untapped_reduce, module, attachments,
    pristine)``, the attachments oldest first, and the instance attributes, parameters and buffers they
    replaced, as they were before.

    It is the instance's ``__reduce_ex__``, which copy, deepcopy and pickle look up on the
    instance, so a copy made inside a ``patch`` block neither fails on neurotap's taps nor keeps them.
    (A partial, made without a Python frame: one is made for each module at each call's attach.)
    """

    __slots__ = ()


_ATTACHMENTS, _PRISTINE = 1, 2  # where a guard's args hold them


_serials = itertools.count()


class Attachment:
    """Hooks and tapped forwards on one module tree; ``detach()`` restores it exactly.

    Everything it does is setting an entry of some table (an instance's ``__dict__``,
    a hook dict, a parameter table), noted with what was there, so one loop undoes it all.
    Attachments on one module (two wrappers of it) may be detached in any order: one
    made later is taken off first and put on again after (see ``detach``).

    One marked replayable keeps its log when detached, and ``reattach`` writes the same
    entries again: the next call with the same probes costs a loop over a list, not a
    plan's worth of attach calls.
    """

    __slots__ = (
        "_log",
        "_guards",
        "_steps",
        "_serial",
        "_joined",
        "_replay",
        "_checks",
        "_firsts",
        "_forwards",
        "_replay_guards",
        "_pops",
        "_restores",
    )

    def __init__(self) -> None:
        # (table, key, what was there or _ABSENT, what it put there), in order
        self._log: list[tuple[dict, Any, Any, Any]] = []
        self._guards: list[_Guard] = []  # those of the modules it is on
        self._steps: list[tuple[Callable[..., Any], tuple]] = []  # each call that put something on: (fn, args)
        self._serial = next(_serials)
        self._joined = False  # whether it went on a module another attachment was on
        self._replay: int | None = None  # the log's length when marked replayable, while it still may be
        self._checks: list[tuple[dict, Any, Any]] = []  # entries a reattach needs to find as they were
        self._firsts: list[tuple[dict, int]] = []  # hooks that go ahead of the others in their table
        self._forwards: list[tuple[type, Any]] = []  # the class forwards its tapped forwards were made from
        self._replay_guards: list[_Guard] = []
        # what undoing the log comes to, while replayable: the entries to drop, and those to set back as they were
        self._pops: list[tuple[dict, Any]] = []
        self._restores: list[tuple[dict, Any, Any]] = []

    def _put(self, table: dict, key: Any, value: Any) -> None:
        self._log.append((table, key, table.get(key, _ABSENT), value))
        table[key] = value

    def _claim(self, module: torch.nn.Module) -> _Guard:
        own = module.__dict__
        guard = own.get(_REDUCE)
        if type(guard) is not _Guard:
            guard = _Guard(_untapped_reduce, module, [self], {})
            self._put(own, _REDUCE, guard)
            self._guards.append(guard)
            return guard
        on = guard.args[_ATTACHMENTS]
        if on and (on[-1] is self or self in on):
            return guard
        on.append(self)
        self._guards.append(guard)
        self._joined = True
        return guard

    def _remember(self, module: torch.nn.Module, name: str | tuple[str, str], value: Any) -> None:
        """Keep what ``name`` was before neurotap, for copies made while it is replaced."""
        pristine = self._claim(module).args[_PRISTINE]
        if name not in pristine:
            self._put(pristine, name, value)

    def hold_tensor(self, module: torch.nn.Module, name: str) -> tuple[dict[str, Any], torch.Tensor]:
        """The table holding parameter or buffer ``name`` and its tensor; the tensor goes back there on detach.

        The caller may put a stand-in into the table (a patched weight) for each forward.
        """
        self._steps.append((Attachment.hold_tensor, (module, name)))
        table_name = "_parameters" if name in module._parameters else "_buffers"
        table = module.__dict__[table_name]
        original = table[name]
        self._remember(module, (table_name, name), original)
        self._put(table, name, original)
        return table, original

    def swap(self, module: torch.nn.Module, name: str, value: Any) -> None:
        """Set the instance attribute ``name`` of ``module`` to ``value`` until ``detach()``."""
        self._steps.append((Attachment.swap, (module, name, value)))
        self._remember(module, name, module.__dict__.get(name, _ABSENT))
        self._put(module.__dict__, name, value)

    def hook(
        self,
        module: torch.nn.Module,
        hook: Callable[..., Any],
        *,
        before: bool = False,
        with_kwargs: bool = False,
        always: bool = False,
        first: bool = False,
    ) -> int:
        """Register ``hook`` as ``register_forward_hook`` (``before``: ``register_forward_pre_hook``) would.

        It goes straight into the module's hook tables, without a handle to remove it by: ``detach()`` does.
        Returns its key there.
        """
        self._steps.append((_hook_again, (module, hook, before, with_kwargs, always, first)))
        own = module.__dict__
        guard = own.get(_REDUCE)
        if type(guard) is not _Guard or guard.args[_ATTACHMENTS][-1] is not self:
            self._claim(module)
        if not getattr(hook, _HOOK_MARK, False):
            setattr(hook, _HOOK_MARK, True)
        key = RemovableHandle.next_id  # drawn from the counter torch's own handles use, so no key can clash
        RemovableHandle.next_id = key + 1
        hooks = own["_forward_pre_hooks" if before else "_forward_hooks"]
        hooks[key] = hook
        log = self._log
        log.append((hooks, key, _ABSENT, hook))
        if with_kwargs:  # a new key: nothing was there before
            flags = own["_forward_pre_hooks_with_kwargs" if before else "_forward_hooks_with_kwargs"]
            flags[key] = True
            log.append((flags, key, _ABSENT, True))
        if always:
            flags = own["_forward_hooks_always_called"]
            flags[key] = True
            log.append((flags, key, _ABSENT, True))
        if first:
            hooks.move_to_end(key, last=False)
            self._firsts.append((hooks, key))
        return key

    def lift_pre_hook(self, module: torch.nn.Module, key: int, forward: Callable[..., Any] | None) -> tuple | None:
        """Take its forward pre-hook ``key`` off ``module`` for one call, and set ``forward`` (which does that
        hook's work; None: the caller does it) as the module's forward meanwhile, so that a module with no other
        hooks takes torch's quicker call each time. Returns what ``put_back_pre_hook`` needs (None: nothing lifted).
        """
        own = module.__dict__
        guard = own.get(_REDUCE)
        if type(guard) is not _Guard or guard not in self._guards:
            return None
        if forward is not None and ("forward" in own or "_old_forward" in own):  # other code's forward: keep it
            return None
        hook = own["_forward_pre_hooks"].pop(key, None)
        if hook is None:
            return None
        noted = False
        if forward is not None:
            own["forward"] = forward
            pristine = guard.args[_PRISTINE]
            noted = "forward" not in pristine
            if noted:  # a copy made meanwhile has the class's forward, not this one
                pristine["forward"] = _ABSENT
        return hook, forward, guard, noted

    def put_back_pre_hook(self, module: torch.nn.Module, key: int, lifted: tuple) -> None:
        """Undo ``lift_pre_hook``: the pre-hook goes back ahead of the others, if this attachment is still on."""
        hook, forward, guard, noted = lifted
        own = module.__dict__
        if forward is not None and own.get("forward") is forward:
            del own["forward"]
        if noted:
            guard.args[_PRISTINE].pop("forward", None)
        if guard in self._guards and own.get(_REDUCE) is guard:
            hooks = own["_forward_pre_hooks"]
            hooks[key] = hook
            hooks.move_to_end(key, last=False)

    def on_outputs(self, hooks: list[tuple[torch.nn.Module, Fire]]) -> None:
        """``on_output(module, hook)`` for each pair, each ``hook`` marked as a hook: one call for a plan's many."""
        self._steps.append((Attachment.on_outputs, (hooks,)))
        log, guards = self._log, self._guards
        key = RemovableHandle.next_id
        for module, hook in hooks:
            own = module.__dict__
            guard = own.get(_REDUCE, _ABSENT)
            if type(guard) is not _Guard:  # the first attachment on the module: _claim, inlined
                previous = guard
                own[_REDUCE] = guard = _Guard(_untapped_reduce, module, [self], {})
                log.append((own, _REDUCE, previous, guard))
                guards.append(guard)
            elif guard.args[_ATTACHMENTS][-1] is not self:
                self._claim(module)
            table = own["_forward_hooks"]
            table[key] = hook
            log.append((table, key, _ABSENT, hook))
            key += 1
        RemovableHandle.next_id = key

    def on_input(self, module: torch.nn.Module, fire: Fire) -> None:
        keyword = first_parameter(module)

        def pre_hook(_module: Any, args: tuple, kwargs: dict) -> Any:
            if args:
                value = fire(args[0])
                return None if value is args[0] else ((value, *args[1:]), kwargs)
            if keyword is not None and keyword in kwargs:
                original = kwargs[keyword]
                value = fire(original)
                if value is not original:
                    kwargs = {**kwargs, keyword: value}
                    return args, kwargs
            return None

        self.hook(module, pre_hook, before=True, with_kwargs=True)

    def on_argument(self, module: torch.nn.Module, name: str, fire: Fire) -> None:
        """``fire`` the argument ``name`` of each call of ``module`` that passes it, positionally or by keyword."""
        position = signature(module).positions.get(name)

        def pre_hook(_module: Any, args: tuple, kwargs: dict) -> Any:
            if name in kwargs:
                original = kwargs[name]
                value = fire(original)
                return None if value is original else (args, {**kwargs, name: value})
            if position is not None and position < len(args):
                original = args[position]
                value = fire(original)
                return None if value is original else ((*args[:position], value, *args[position + 1 :]), kwargs)
            return None

        self.hook(module, pre_hook, before=True, with_kwargs=True)

    def on_arguments(self, module: torch.nn.Module, fire: Callable[[str, Any], None]) -> None:
        """``fire(name, value)`` for every argument but the input of each call of ``module`` (reading only)."""

        def pre_hook(_module: Any, args: tuple, kwargs: dict) -> None:
            for name, value in passed_arguments(module, args, kwargs):
                fire(name, value)

        self.hook(module, pre_hook, before=True, with_kwargs=True)

    def on_output(self, module: torch.nn.Module, fire: Fire) -> None:
        """``fire`` the output of each call of ``module``; a ``fire`` marked as a hook is registered itself."""
        self.hook(module, fire if getattr(fire, _HOOK_MARK, False) else _OutputHook(fire))

    def after_forward(self, module: torch.nn.Module, callback: Callable[[], None]) -> None:
        """Run ``callback`` after every forward of ``module``, also one that raised."""
        self.hook(module, lambda *_: callback(), always=True)

    def on_ops(self, module: torch.nn.Module, frame: Frame, *, combine: bool = True) -> bool:
        """Run ``module``'s tapped forward with ``frame``; False if it has none.

        A frame already there (another wrapper of the same module, attached now)
        keeps working: its taps run first, then ``frame``'s, unless ``combine`` is off.
        """
        if forward_replaced(module):
            return False
        own = module.__dict__
        previous_frame = own.get(FRAME_ATTR)
        merged = frame
        if combine and previous_frame is not None:  # another attachment (a second wrapper) is on it already
            merged = Frame.merged(previous_frame, frame)
        # a forward that calls its frame at the sites it taps alone: each site passed costs a Python call
        result = tapped_forward(module, merged.sites() if type(merged) is Frame else None)
        if result is None:
            return False
        self._steps.append((_ops_again, (module, frame, combine)))  # its own frame: redone, it merges anew
        self.runs_class_forward(module)
        # accelerate's hooks keep the real forward as _old_forward and call it from an instance forward of
        # their own: tap that one so their device handling stays in place
        slot = "_old_forward" if "_old_forward" in own else "forward"
        self._remember(module, slot, own.get(slot, _ABSENT))
        self._put(own, FRAME_ATTR, merged)
        self._put(own, slot, types.MethodType(result.function, module))
        return True

    def runs_class_forward(self, module: torch.nn.Module) -> None:
        """Note that something it put on runs the class forward of ``module`` as it is now: once other code
        replaces that, the attachment is not put on again as it was (see ``reattach``)."""
        self._forwards.append((type(module), type(module).forward))

    def skip(self, module: torch.nn.Module, forward: Callable[..., Any]) -> None:
        """Run ``forward(*args, **kwargs)`` in place of the module's own (after its pre-hooks, before its hooks)."""
        self.swap(module, "_old_forward" if "_old_forward" in module.__dict__ else "forward", forward)

    def mark_replayable(self) -> None:
        """Keep the log when detached, so ``reattach`` can put the same things on again; call it once the
        attachment is complete. An attachment sharing a module with another one is never replayed."""
        if not self._joined:
            self._replay = len(self._log)
            self._replay_guards = list(self._guards)  # all of its own making
            # hook tables' keys are new numbers nobody else holds; every other entry must be as it was
            self._checks = [(table, key, previous) for table, key, previous, _ in self._log if type(key) is not int]
            first_seen: dict[tuple[int, Any], tuple[dict, Any, Any]] = {}
            for table, key, previous, _ in self._log:
                first_seen.setdefault((id(table), key), (table, key, previous))
            self._pops = [(table, key) for table, key, previous in first_seen.values() if previous is _ABSENT]
            self._restores = [entry for entry in first_seen.values() if entry[2] is not _ABSENT]

    def reattach(self) -> bool:
        """Put on again what it put on before it was detached, if that is still exactly what a new attachment
        would put on (no table it wrote to changed since, no class forward replaced); whether it did."""
        if self._replay is None or self._guards:
            return False
        for table, key, previous in self._checks:
            if table.get(key, _ABSENT) is not previous:
                self._replay = None
                return False
        for cls, forward in self._forwards:
            if cls.forward is not forward:
                self._replay = None
                return False
        for table, key, _, value in self._log:
            table[key] = value
        for table, key in self._firsts:
            table.move_to_end(key, last=False)
        self._guards.extend(self._replay_guards)  # which still list it alone (see _undo)
        self._serial = next(_serials)
        return True

    def detach(self) -> None:
        """Take everything off. Attachments made later on the same modules come off first and go on again
        after, as they were made (their frames merged anew with what is still there), so they stay in effect
        and each table gets back exactly what it held."""
        for guard in self._guards:
            if guard.args[_ATTACHMENTS][-1] is not self:
                break
        else:  # the last on each of its modules: the common case
            self._undo()
            return
        later = self._later()
        for other in reversed(later):
            other._replay = None  # put on again below, merged anew: its log will be another
            other._undo()
        self._undo()
        for other in later:
            steps, other._steps = other._steps, []
            for step, args in steps:
                step(other, *args)

    def _later(self) -> list[Attachment]:
        """The attachments made after this one on a module it is on, and after those on theirs, oldest first."""
        found: dict[int, Attachment] = {}
        pending = [self]
        while pending:
            attachment = pending.pop()
            for guard in attachment._guards:
                on = guard.args[_ATTACHMENTS]
                if on[-1] is attachment:
                    continue
                for other in on[on.index(attachment) + 1 :]:
                    if other._serial not in found:
                        found[other._serial] = other
                        pending.append(other)
        return [found[serial] for serial in sorted(found)]

    def _undo(self) -> None:
        log = self._log
        if self._replay == len(log):  # nothing went on after it was marked: undo what the log comes to
            for table, key in self._pops:
                table.pop(key, None)
            for table, key, previous in self._restores:
                table[key] = previous
            # its guards, all of its own making, are off the modules now: they keep listing it alone, for reattach
            self._guards.clear()
            return
        for table, key, previous, _ in reversed(log):
            if previous is _ABSENT:
                table.pop(key, None)
            else:
                table[key] = previous
        # something went on after it was marked (or it never was): not replayable
        self._replay = None
        log.clear()
        self._firsts.clear()
        self._forwards.clear()
        for guard in self._guards:
            guard.args[_ATTACHMENTS].remove(self)
        self._guards.clear()


def _hook_again(attachment: Attachment, module: torch.nn.Module, hook: Callable[..., Any], *flags: bool) -> None:
    before, with_kwargs, always, first = flags
    attachment.hook(module, hook, before=before, with_kwargs=with_kwargs, always=always, first=first)


def _ops_again(attachment: Attachment, module: torch.nn.Module, frame: Frame, combine: bool) -> None:
    attachment.on_ops(module, frame, combine=combine)


class _OutputHook:
    """A forward hook handing the output to ``fire``; what it returns is the output from then on."""

    __slots__ = ("fire",)
    _neurotap_hook = True

    def __init__(self, fire: Fire) -> None:
        self.fire = fire

    def __call__(self, _module: Any, _args: Any, output: Any) -> Any:
        return self.fire(output)  # the same object back counts as no change
