"""Rewrite a function's source so that every call and operator result passes a tap.

``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` becomes, in effect::

    __nt.out("down_proj", __nt.fn("down_proj", down_proj)(
        __nt.out("mul", __nt.out("act_fn", ...) * __nt.out("up_proj", ...))))

where ``__nt`` is a *frame*: any object with three methods,

- ``out(name, value) -> value``: the value computed at site ``name``, returned as is
  or replaced;
- ``dropped(name, value)``: the same for a value the code throws away (a call made
  as a statement), which therefore cannot be replaced;
- ``fn(name, callee) -> callable``: the function about to be called at site ``name``,
  returned as is or swapped for its own tapped version (to reach inside helpers
  such as ``eager_attention_forward``).

A forward rewritten in ``"method"`` mode reads its frame from the module instance
(``module.__dict__[FRAME_ATTR]``); a helper rewritten in ``"helper"`` mode takes the
frame that ``fn`` pushed just before the call. Each function is rewritten and
compiled once, with its decorators re-applied, its line numbers and file kept (so
tracebacks point at the original source), and cached.
"""

from __future__ import annotations
import __future__

import ast
import inspect
import operator
import sys
import textwrap
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

FRAME_ATTR = "_neurotap_frame"
Mode = Literal["method", "helper"]

OPERATOR_NAMES: dict[type, str] = {
    ast.Add: "add",
    ast.Sub: "sub",
    ast.Mult: "mul",
    ast.Div: "truediv",
    ast.FloorDiv: "floordiv",
    ast.Mod: "mod",
    ast.Pow: "pow",
    ast.MatMult: "matmul",
    ast.LShift: "lshift",
    ast.RShift: "rshift",
    ast.BitOr: "or_",
    ast.BitXor: "xor",
    ast.BitAnd: "and_",
}
UNARY_NAMES: dict[type, str] = {ast.USub: "neg", ast.UAdd: "pos", ast.Invert: "invert"}

# Builtins that never produce an activation; tapping them only adds noise and time.
UNTAPPED_CALLS = frozenset(
    "super isinstance issubclass len getattr hasattr setattr delattr type range enumerate "
    "zip print tuple list dict set frozenset int float bool str repr hash id iter next "
    "sorted reversed callable vars locals globals any all min max abs round divmod map "
    "filter slice object NotImplementedError ValueError TypeError RuntimeError KeyError "
    "AttributeError IndexError AssertionError Exception".split()
)

# Packages whose functions are infrastructure, not model code: never expanded.
_NOT_EXPANDED = frozenset({"torch", "neurotap", "numpy", "einops", "functools", "typing"})


@dataclass(frozen=True)
class Site:
    """One tapped call or operator in a function's source."""

    name: str  # local point name: "mul", "mul_1", "softmax", "attention_interface"
    line: int
    code: str  # the source line, stripped
    expands: bool  # a call whose callee may be a Python function neurotap can enter
    attribute: str | None = None  # X for a call self.X(...): a submodule's call, when X is one


@dataclass(frozen=True)
class TappedFunction:
    function: Callable[..., Any]
    sites: dict[str, Site]
    filename: str


def expandable(fn: Any) -> bool:
    """Whether a callee is model code that neurotap should enter (not a library)."""
    if type(fn) is types.MethodType:
        fn = fn.__func__
    if type(fn) is not types.FunctionType:
        return False
    if fn.__code__.co_flags & (inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR):
        return False
    module = fn.__module__ or ""
    top = module.partition(".")[0]
    if top in _NOT_EXPANDED or top in sys.stdlib_module_names:
        return False
    if top == "transformers":
        return module.startswith("transformers.models.")
    return True


_pending: list[Any] = []


def push_helper_frame(frame: Any) -> None:
    _pending.append(frame)


# forget frames pushed for calls that raised before entering the helper (list.clear itself: no Python frame)
reset_helper_frames = _pending.clear


def _helper_frame(_owner: Any) -> Any:
    return _pending.pop()


# owner.__dict__[FRAME_ATTR], read without a Python frame: the instance attribute wins over the class's
_method_frame = operator.attrgetter(FRAME_ATTR)


_cache: dict[tuple[Any, str, frozenset[str] | None], TappedFunction | None] = {}


def tapped(
    fn: Callable[..., Any], mode: Mode, owner_class: type | None = None, only: frozenset[str] | None = None
) -> TappedFunction | None:
    """The tapped version of ``fn``, or None when its source cannot be rewritten.

    ``only``: the sites passed to the frame (by name); the others run as written. Its
    ``sites`` are every site all the same, named as in the full rewrite.
    """
    key = (fn, mode, only)
    if key not in _cache:
        try:
            _cache[key] = _rewrite(fn, mode, owner_class, only)
        except (OSError, TypeError, SyntaxError, ValueError, IndexError):
            _cache[key] = None
    return _cache[key]


def defining_class(cls: type, name: str) -> type:
    for klass in cls.__mro__:
        if name in vars(klass):
            return klass
    return cls


def _rewrite(
    fn: Callable[..., Any], mode: Mode, owner_class: type | None, only: frozenset[str] | None
) -> TappedFunction | None:
    raw = inspect.unwrap(fn)
    if type(raw) is not types.FunctionType:
        return None
    lines, first_line = inspect.getsourcelines(raw)
    tree = ast.parse(textwrap.dedent("".join(lines)))
    ast.increment_lineno(tree, first_line - 1)
    funcdef = tree.body[0]
    if not isinstance(funcdef, ast.FunctionDef):
        return None
    positional = funcdef.args.posonlyargs + funcdef.args.args
    if mode == "method" and not positional:
        return None

    mangle_prefix = f"_{owner_class.__name__.lstrip('_')}" if owner_class is not None else None
    sites = _number_sites(funcdef, lines, first_line)
    passed = sites if only is None else {node: site for node, site in sites.items() if site.name in only}
    _Tapper(passed, mangle_prefix).visit(funcdef)

    owner_arg = positional[0].arg if mode == "method" else None
    prologue = ast.Assign(
        targets=[ast.Name("__nt", ast.Store())],
        value=ast.Call(
            ast.Name("__nt_frame", ast.Load()),
            [ast.Name(owner_arg, ast.Load()) if owner_arg else ast.Constant(None)],
            [],
        ),
    )
    body = funcdef.body
    has_docstring = body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
    body.insert(1 if has_docstring else 0, ast.copy_location(prologue, body[0]))

    free_names = [name for name in raw.__code__.co_freevars if name != "__class__"]
    cells = dict(zip(raw.__code__.co_freevars, raw.__closure__ or ()))
    free_values = [cells[name].cell_contents for name in free_names]  # ValueError if empty
    klass = cells["__class__"].cell_contents if "__class__" in cells else owner_class

    maker = ast.FunctionDef(
        name="__neurotap_maker__",
        args=ast.arguments(
            posonlyargs=[],
            args=[ast.arg(n) for n in ("__nt_frame", "__class__", *free_names)],
            kwonlyargs=[],
            kw_defaults=[],
            defaults=[],
        ),
        body=[funcdef, ast.Return(ast.Name(funcdef.name, ast.Load()))],
        decorator_list=[],
        returns=None,
    )
    if sys.version_info >= (3, 12):
        maker.type_params = []
    ast.copy_location(maker, funcdef)
    module = ast.fix_missing_locations(ast.Module(body=[maker], type_ignores=[]))
    filename = raw.__code__.co_filename
    flags = raw.__code__.co_flags & __future__.annotations.compiler_flag
    code = compile(module, filename, "exec", flags=flags, dont_inherit=True)
    namespace: dict[str, Any] = {}
    exec(code, raw.__globals__, namespace)
    frame_getter = _method_frame if mode == "method" else _helper_frame
    function = namespace["__neurotap_maker__"](frame_getter, klass, *free_values)
    return TappedFunction(function, {site.name: site for site in sites.values()}, filename)


def _is_annotation_free_child(parent: ast.AST, field: str) -> bool:
    return not (field in ("annotation", "returns") or (isinstance(parent, ast.AnnAssign) and field == "annotation"))


def _call_name(callee: str) -> str:
    # "input" and "output" name a module's own points; a call to self.output(...) must not hide them
    return f"call_{callee}" if callee in ("input", "output") else callee


def _site_base(node: ast.AST) -> tuple[str, bool, str | None] | None:
    """The base name of a tappable node, whether its callee may expand, and X for a call ``self.X(...)``."""
    if isinstance(node, ast.Call):
        func = node.func
        if isinstance(func, ast.Name):
            if func.id in UNTAPPED_CALLS:
                return None
            return _call_name(func.id), True, None
        if isinstance(func, ast.Attribute):
            on_self = isinstance(func.value, ast.Name) and func.value.id == "self"
            return _call_name(func.attr), on_self, func.attr if on_self else None
        return "call", False, None
    if isinstance(node, ast.BinOp):
        return OPERATOR_NAMES[type(node.op)], False, None
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY_NAMES:
        if isinstance(node.operand, ast.Constant):
            return None
        return UNARY_NAMES[type(node.op)], False, None
    if isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):
        return OPERATOR_NAMES[type(node.op)] + "_", False, None
    return None


def _number_sites(funcdef: ast.FunctionDef, lines: list[str], first_line: int) -> dict[int, Site]:
    """Name every tappable node; repeats in source order get _1, _2, ..."""
    found: list[tuple[int, int, int, ast.AST, str, bool, str | None]] = []

    def walk(node: ast.AST, depth: int) -> None:
        base = _site_base(node)
        if base is not None:
            found.append((node.lineno, node.col_offset, -depth, node, *base))
        for field, value in ast.iter_fields(node):
            if not _is_annotation_free_child(node, field):
                continue
            children = value if isinstance(value, list) else [value]
            for child in children:
                if isinstance(child, ast.AST):
                    walk(child, depth + 1)

    for statement in funcdef.body:
        walk(statement, 0)
    found.sort(key=lambda item: item[:3])
    counts: dict[str, int] = {}
    sites: dict[int, Site] = {}
    for line, _col, _depth, node, base, expands, attribute in found:
        count = counts.get(base, 0)
        counts[base] = count + 1
        name = base if count == 0 else f"{base}_{count}"
        code = lines[line - first_line].strip() if 0 <= line - first_line < len(lines) else ""
        sites[id(node)] = Site(name, line, code, expands, attribute)
    return sites


def _local_names(funcdef: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    """Variables local to ``funcdef``: its parameters and what it assigns, less global and nonlocal names."""
    args = funcdef.args
    names = {a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg) if a}
    declared: set[str] = set()
    pending: list[ast.AST] = list(funcdef.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            continue  # a nested scope of its own
        if isinstance(node, ast.Lambda):
            continue
        if isinstance(node, (ast.Global, ast.Nonlocal)):
            declared.update(node.names)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        pending.extend(ast.iter_child_nodes(node))
    return names - declared


def _in_place_target(node: ast.expr) -> str | None:
    """``h`` for ``h.mul_(...)``: a variable whose in-place method returns it."""
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
        return None
    owner, method = node.func.value, node.func.attr
    if not isinstance(owner, ast.Name) or owner.id == "self":
        return None
    return owner.id if method.endswith("_") and not method.endswith("__") else None


def _frame_call(method: str, *args: ast.expr) -> ast.Call:
    return ast.Call(ast.Attribute(ast.Name("__nt", ast.Load()), method, ast.Load()), list(args), [])


class _Tapper(ast.NodeTransformer):
    def __init__(self, sites: dict[int, Site], mangle_prefix: str | None):
        self.sites = sites
        self.mangle_prefix = mangle_prefix
        self._locals: list[set[str]] = []  # the local variables of each function being visited, innermost last

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> ast.AST:
        self._locals.append(_local_names(node))
        try:
            return self.generic_visit(node)
        finally:
            self._locals.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node: ast.Lambda) -> ast.AST:
        self._locals.append(set())  # a lambda holds no statements
        try:
            return self.generic_visit(node)
        finally:
            self._locals.pop()

    def _mangle(self, name: str) -> str:
        if self.mangle_prefix and name.startswith("__") and not name.endswith("__") and name != "__nt":
            return self.mangle_prefix + name
        return name

    def generic_visit(self, node: ast.AST) -> ast.AST:
        for field, old in ast.iter_fields(node):
            if not _is_annotation_free_child(node, field):
                continue
            if isinstance(old, list):
                new: list[Any] = []
                for item in old:
                    if isinstance(item, ast.AST):
                        item = self.visit(item)
                        if item is None:
                            continue
                        if isinstance(item, list):
                            new.extend(item)
                            continue
                    new.append(item)
                old[:] = new
            elif isinstance(old, ast.AST):
                setattr(node, field, self.visit(old))
        return node

    def visit_Name(self, node: ast.Name) -> ast.Name:
        node.id = self._mangle(node.id)
        return node

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        node.attr = self._mangle(node.attr)
        return self.generic_visit(node)

    def visit_arg(self, node: ast.arg) -> ast.arg:
        node.arg = self._mangle(node.arg)
        return node

    def visit_keyword(self, node: ast.keyword) -> ast.AST:
        if node.arg is not None:
            node.arg = self._mangle(node.arg)
        return self.generic_visit(node)

    def _tap(self, node: ast.expr, method: str = "out") -> ast.expr:
        site = self.sites.get(id(node))
        self.generic_visit(node)
        if site is None:
            return node
        if site.expands and isinstance(node, ast.Call):
            node.func = ast.copy_location(_frame_call("fn", ast.Constant(site.name), node.func), node.func)
        return ast.copy_location(_frame_call(method, ast.Constant(site.name), node), node)

    visit_Call = visit_BinOp = visit_UnaryOp = _tap

    def visit_Expr(self, node: ast.Expr) -> ast.AST:
        """A statement whose value is thrown away: a replacement there could never reach later code.

        ``h.mul_(2.0)`` returns ``h`` itself, so it becomes ``h = <tapped h.mul_(2.0)>``
        and a patch there reaches everything after it; any other discarded value is
        tapped with ``dropped``, which refuses a replacement.
        """
        if id(node.value) not in self.sites:
            return self.generic_visit(node)
        target = _in_place_target(node.value)
        if target is None or not self._locals or target not in self._locals[-1]:  # rebinding must stay local
            node.value = self._tap(node.value, "dropped")
            return node
        rebind = ast.Assign(targets=[ast.Name(self._mangle(target), ast.Store())], value=self._tap(node.value))
        return ast.copy_location(rebind, node)

    def visit_AugAssign(self, node: ast.AugAssign) -> ast.AST | list[ast.AST]:
        site = self.sites.get(id(node))
        self.generic_visit(node)
        if site is None:
            return node
        target = node.target.id  # type: ignore[attr-defined]  # only Name targets get sites
        retap = ast.Assign(
            targets=[ast.Name(target, ast.Store())],
            value=_frame_call("out", ast.Constant(site.name), ast.Name(target, ast.Load())),
        )
        return [node, ast.copy_location(retap, node)]
