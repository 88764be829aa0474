"""The inventory: one dry run that records every point that fires.

Every module gets input/output hooks and its tapped forward; every helper that
model code calls is entered. The first time a point fires, its name, kind,
shape, dtype and source line are written down, so the list comes out in
execution order.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..errors import SourceUnavailableWarning
from .aliases import EMBEDDINGS, find_aliases
from .attach import ARGUMENTS, Attachment, Frame, forward_replaced, signature, tapped_callee, tapped_forward
from .point import Kind, Point, join, narrowed_name
from .rewrite import Site, TappedFunction, expandable, push_helper_frame, reset_helper_frames


def describe(value: Any) -> tuple[tuple[int, ...] | None, str | None, str]:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape), str(value.dtype).removeprefix("torch."), "Tensor"
    return None, None, type(value).__name__


def _members(value: Any) -> list[tuple[int | str, Any]]:
    """The tensors inside a tuple, list or mapping output, one level down."""
    if isinstance(value, (tuple, list)):
        return [(i, v) for i, v in enumerate(value) if isinstance(v, torch.Tensor)]
    if isinstance(value, Mapping):
        return [(k, v) for k, v in value.items() if isinstance(k, str) and isinstance(v, torch.Tensor)]
    return []


class Inventory:
    """What the dry run saw: the points in order, and every site that could fire."""

    def __init__(self, ran: bool = True) -> None:
        self.ran = ran  # False: read from the code alone, without a dry run, so shapes are unknown
        self.points: dict[str, Point] = {}
        self.static: dict[str, Point] = {}  # every module's input and output, and sites in code that ran
        self.aliases: dict[str, str] = {}  # short canonical name -> raw point name
        self.module_calls: set[str] = set()  # call sites of submodules: their value is the submodule's output

    def add(self, point: Point, value: Any) -> None:
        if point.name in self.points:
            return
        self.points[point.name] = point
        if point.kind != "op":
            for key, member in _members(value):
                name = narrowed_name(point.name, [key])
                shape, dtype, kind = describe(member)
                self.points[name] = Point(name, point.kind, shape, dtype, kind, point.source, point.module, point.scope)

    def add_static(
        self, module: str, scope: tuple[str, ...], function: TappedFunction, owner: torch.nn.Module | None
    ) -> None:
        prefix = join(module, ".".join(scope)) if scope else module
        for site in function.sites.values():
            name = join(prefix, site.name)
            if _calls_submodule(site, owner):
                self.module_calls.add(name)
            elif name not in self.static:
                source = f"{os.path.basename(function.filename)}:{site.line}  {site.code}"
                self.static[name] = Point(name, "op", None, None, "", source, module, (*scope, site.name))


def _calls_submodule(site: Site, owner: torch.nn.Module | None) -> bool:
    """Whether ``site`` is a call ``self.X(...)`` of a submodule: its value is ``X.output``, not an op point."""
    return site.attribute is not None and owner is not None and site.attribute in owner._modules


class _RecordingFrame(Frame):
    __slots__ = ("inventory", "module", "scope", "function", "prefix")

    def __init__(
        self,
        inventory: Inventory,
        module: str,
        scope: tuple[str, ...],
        function: TappedFunction,
        owner: torch.nn.Module | None,
    ):
        super().__init__()
        self.inventory = inventory
        self.module = module
        self.scope = scope
        self.function = function
        self.prefix = join(module, ".".join(scope)) if scope else module
        self.fn = self._enter
        inventory.add_static(module, scope, function, owner)

    def out(self, name: str, value: Any) -> Any:
        full = join(self.prefix, name)
        if full in self.inventory.module_calls:
            return value
        site = self.function.sites[name]
        shape, dtype, kind = describe(value)
        source = f"{os.path.basename(self.function.filename)}:{site.line}  {site.code}"
        self.inventory.add(Point(full, "op", shape, dtype, kind, source, self.module, (*self.scope, name)), value)
        return value

    def dropped(self, name: str, value: Any) -> None:
        self.out(name, value)

    def _enter(self, name: str, callee: Any) -> Any:
        if isinstance(callee, torch.nn.Module):  # decoder_layer(...) in a loop: that layer's own points
            self.inventory.module_calls.add(join(self.prefix, name))
            return callee
        if not expandable(callee):
            return callee
        entered = tapped_callee(callee)
        if entered is None:
            return callee
        owner = getattr(callee, "__self__", None)
        owner = owner if isinstance(owner, torch.nn.Module) else None
        push_helper_frame(_RecordingFrame(self.inventory, self.module, (*self.scope, name), entered[1], owner))
        return entered[0]


def argument_name(path: str, name: str) -> str:
    return join(path, f"{ARGUMENTS}.{name}")


def _module_points(path: str, module: torch.nn.Module, source: str) -> list[Point]:
    """A called module's input, argument and output points, as its signature names them."""
    arguments = [
        Point(argument_name(path, name), "argument", None, None, "", source, path, (name,))
        for name in signature(module).others
    ]
    return [
        Point(join(path, "input"), "input", None, None, "", source, path),
        *arguments,
        Point(join(path, "output"), "output", None, None, "", source, path),
    ]


def _module_source(module: torch.nn.Module) -> str:
    """``file:line  Class.forward`` for the forward that a module point belongs to."""
    cls = type(module)
    forward = inspect.unwrap(cls.forward)
    try:
        where = f"{os.path.basename(inspect.getsourcefile(forward) or '?')}:{forward.__code__.co_firstlineno}"
    except (TypeError, AttributeError):
        where = "?"
    return f"{where}  {cls.__name__}.forward"


def take_inventory(root: torch.nn.Module, run: Callable[[], Any]) -> Inventory:
    """Run ``run()`` once (under no_grad) with every point recording itself."""
    inventory = Inventory()
    attachment = Attachment()
    unreadable: list[str] = []
    replaced: list[str] = []
    try:
        for path, module in root.named_modules():
            source = _module_source(module)

            def recorder(name: str, kind: Kind, path: str = path, source: str = source) -> Callable[[Any], Any]:
                def fire(value: Any) -> Any:
                    shape, dtype, type_name = describe(value)
                    inventory.add(Point(name, kind, shape, dtype, type_name, source, path), value)
                    return value

                return fire

            if _has_own_forward(module):  # a ModuleList is never called
                for point in _module_points(path, module, source):  # known even where the dry run does not go
                    inventory.static[point.name] = point

            def record_argument(name: str, value: Any, path: str = path, source: str = source) -> None:
                shape, dtype, type_name = describe(value)
                point = Point(argument_name(path, name), "argument", shape, dtype, type_name, source, path, (name,))
                inventory.add(point, value)

            attachment.on_input(module, recorder(join(path, "input"), "input"))
            attachment.on_arguments(module, record_argument)
            if forward_replaced(module):
                replaced.append(path or type(module).__qualname__)
            elif tapped_forward(module) is not None:
                frame = _RecordingFrame(inventory, path, (), tapped_forward(module), module)  # type: ignore[arg-type]
                attachment.on_ops(module, frame, combine=False)  # the dry run records, it does not patch
            elif type(module).__module__.partition(".")[0] != "torch" and _has_own_forward(module):
                unreadable.append(type(module).__qualname__)
            attachment.on_output(module, recorder(join(path, "output"), "output"))
        reset_helper_frames()
        with torch.no_grad():
            run()
    finally:
        attachment.detach()
        reset_helper_frames()
    if unreadable:
        names = ", ".join(sorted(set(unreadable)))
        warnings.warn(
            f"neurotap cannot read the source of the forward of {names}: only their input and output "
            "points exist, not the operations inside them.",
            SourceUnavailableWarning,
            stacklevel=3,
        )
    if replaced:
        warnings.warn(
            f"other code replaced the forward of {', '.join(replaced)} on the instance (module.forward = ...): "
            "neurotap leaves it in place, so only their input and output points exist, not the operations inside.",
            SourceUnavailableWarning,
            stacklevel=3,
        )
    for name in inventory.module_calls:
        inventory.static.pop(name, None)
        inventory.points.pop(name, None)
    for name, point in inventory.static.items():
        inventory.static[name] = inventory.points.get(name, point)
    _add_tensors(inventory, root)
    inventory.aliases = find_aliases(set(inventory.points) | set(inventory.static), _embedding_points(root))
    return inventory


def tensor_points(root: torch.nn.Module) -> dict[str, list[Point]]:
    """Each module's own parameters and buffers as points, by module path."""
    found: dict[str, list[Point]] = {}
    for path, module in root.named_modules():
        own = [
            *(("parameter", name, value) for name, value in module._parameters.items()),
            *(("buffer", name, value) for name, value in module._buffers.items()),
        ]
        for kind, name, value in own:
            if isinstance(value, torch.Tensor):
                shape, dtype, type_name = describe(value)
                point = Point(join(path, name), kind, shape, dtype, type(value).__name__, "", path, (name,))  # type: ignore[arg-type]
                found.setdefault(path, []).append(point)
    return found


def _add_tensors(inventory: Inventory, root: torch.nn.Module) -> None:
    """Put each module's parameters and buffers right after its input point (at the end if it never ran)."""
    tensors = tensor_points(root)
    ordered: dict[str, Point] = {}
    placed: set[str] = set()
    pending: str | None = None  # a module whose input was just listed: its tensors go after its arguments
    for name, point in inventory.points.items():
        if pending is not None and (point.module != pending or point.kind not in ("input", "argument")):
            for tensor in tensors.get(pending, ()):
                ordered.setdefault(tensor.name, tensor)
            pending = None
        ordered[name] = point
        if point.kind == "input" and name == join(point.module, "input") and point.module not in placed:
            placed.add(point.module)
            pending = point.module
    for tensor in tensors.get(pending, ()) if pending is not None else ():
        ordered.setdefault(tensor.name, tensor)
    for path, points in tensors.items():
        if path not in placed:
            for tensor in points:
                ordered.setdefault(tensor.name, tensor)
    inventory.points = ordered
    for points in tensors.values():
        for tensor in points:
            inventory.static.setdefault(tensor.name, ordered[tensor.name])


def static_inventory(root: torch.nn.Module) -> Inventory:
    """The points known without running ``root``: every module's input and output, and the ops in each forward.

    Helpers that a forward calls are found only when it runs, so their ops are missing here.
    """
    inventory = Inventory(ran=False)
    seen: set[int] = set()

    def add(point: Point) -> None:
        inventory.points[point.name] = inventory.static[point.name] = point

    def visit(path: str, module: torch.nn.Module) -> None:
        seen.add(id(module))
        source = _module_source(module)
        called = _has_own_forward(module)  # a ModuleList has no forward and no points of its own
        own = _module_points(path, module, source) if called else []
        for point in own[:-1]:
            add(point)
        function = None if forward_replaced(module) else tapped_forward(module)
        if function is not None:
            where = os.path.basename(function.filename)
            for site in function.sites.values():
                if _calls_submodule(site, module):
                    continue
                name = join(path, site.name)
                add(Point(name, "op", None, None, "", f"{where}:{site.line}  {site.code}", path, (site.name,)))
        for child_name, child in module.named_children():
            if id(child) not in seen:
                visit(join(path, child_name), child)
        if called:
            add(own[-1])

    visit("", root)
    _add_tensors(inventory, root)
    inventory.aliases = find_aliases(set(inventory.points), _embedding_points(root))
    return inventory


def _embedding_points(root: torch.nn.Module) -> dict[str, str]:
    """``embed`` and ``logits`` as the model names them (Hugging Face's embedding getters)."""
    paths = {id(module): path for path, module in root.named_modules()}
    found: dict[str, str] = {}
    for alias, getter in zip(EMBEDDINGS, ("get_input_embeddings", "get_output_embeddings"), strict=True):
        get = getattr(root, getter, None)
        try:
            module = get() if callable(get) else None
        except (AttributeError, NotImplementedError):
            module = None
        if isinstance(module, torch.nn.Module) and id(module) in paths:
            found[alias] = join(paths[id(module)], "output")
    return found


def _has_own_forward(module: torch.nn.Module) -> bool:
    return type(module).forward is not torch.nn.Module.forward
