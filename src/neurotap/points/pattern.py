"""Point-name patterns: several points in one name.

A ``*`` stands for any part of one dotted component, never a dot:
``model.layers.*.mlp.mul`` is the product in every layer's MLP and not a
deeper name; ``model.layers.0.mlp.mul*`` is ``mul``, ``mul_1``, ... A range
``{a..b}`` stands for the numbers a to b, both included:
``blocks.{0..5}.resid_post``. A pattern names the points the dry run saw
(every point, for a model without one), aliases included, in execution order.
A narrowing after it (``blocks.*.attn.out[0]``) applies to each match.
"""

from __future__ import annotations

import difflib
import functools
import re
import weakref
from collections.abc import Iterable
from typing import Any

from ..errors import UnknownPointError
from .inventory import Inventory
from .point import split_narrowing

LISTING = "List them with model.points(prefix)."  # the command line says its own way instead
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_SEPARATORS = re.compile(r"([.\[\]])")
MAX_PATTERN_CHARACTERS = 1000
MAX_WILDCARDS_PER_PART = 2
_MAX_DIGITS = 18


def is_pattern(name: str) -> bool:
    return "*" in name or "{" in name


@functools.lru_cache(maxsize=512)
def compile_pattern(pattern: str, *, prefix: bool = False) -> re.Pattern[str]:
    """The regular expression of ``pattern``; with ``prefix``, names under a match match too.

    Matching costs at most a small polynomial of the name's length, whatever the
    pattern: each part between separators (``.``, ``[``, ``]``) has to cover the
    whole part of the name there, so it is matched once and never retried (an
    atomic group, written as a lookahead and a back-reference), and it holds at
    most :data:`MAX_WILDCARDS_PER_PART` wildcards. A range is a small expression
    over its digits, not one alternative per number.
    """
    if len(pattern) > MAX_PATTERN_CHARACTERS:
        raise UnknownPointError(
            f"the point pattern {pattern[:60]!r}... has {len(pattern)} characters; a pattern has at most "
            f"{MAX_PATTERN_CHARACTERS}: name fewer points at once"
        )
    regex, groups = [], 0
    for number, part in enumerate(_parts(pattern)):
        if number % 2:  # a separator
            regex.append(re.escape(part))
        elif part:
            groups += 1
            regex.append(f"(?=({_part(part, pattern)})(?![^.\\[\\]]))\\{groups}")  # to the part's end, once
    return re.compile("".join(regex) + (r"(?:[.\[].*)?" if prefix else ""))


def _parts(pattern: str) -> list[str]:
    """``pattern`` cut at its separators, the separators kept: part, separator, part, ... (ranges hold dots)."""
    masked = _RANGE.sub(lambda found: "{" + "," * (len(found.group(0)) - 2) + "}", pattern)
    parts, position = [], 0
    for piece in _SEPARATORS.split(masked):
        parts.append(pattern[position : position + len(piece)])
        position += len(piece)
    return parts


def _part(part: str, pattern: str) -> str:
    """The expression of one part of a pattern: literals, ``*`` and ranges, without separators."""
    part = re.sub(r"\*+", "*", part)
    if part.count("*") + len(_RANGE.findall(part)) > MAX_WILDCARDS_PER_PART:
        raise UnknownPointError(
            f"the point pattern {pattern[:80]!r} has more than {MAX_WILDCARDS_PER_PART} wildcards (* or {{a..b}}) "
            f"in its part {part[:40]!r}; write at most {MAX_WILDCARDS_PER_PART} between two dots"
        )
    pieces = []
    position = 0
    for found in _RANGE.finditer(part):
        pieces.append(_literal(part[position : found.start()], pattern))
        low, high = found.group(1), found.group(2)
        if len(high) > _MAX_DIGITS or len(low) > _MAX_DIGITS or int(low) > int(high):
            raise UnknownPointError(
                f"the range {found.group(0)} in the point pattern {pattern[:80]!r} is empty or too long: "
                f"write {{a..b}} with a <= b"
            )
        pieces.append(_numbers(int(low), int(high)))
        position = found.end()
    pieces.append(_literal(part[position:], pattern))
    return "".join(pieces)


def _numbers(low: int, high: int) -> str:
    """An expression for the numbers ``low`` to ``high`` as written in names (no leading zeros)."""
    alternatives = []
    for digits in range(len(str(low)), len(str(high)) + 1):
        first = max(low, 10 ** (digits - 1) if digits > 1 else 0)
        last = min(high, 10**digits - 1)
        if first <= last:
            alternatives += _same_length(str(first), str(last))
    return "(?:" + "|".join(alternatives) + ")"


def _same_length(low: str, high: str) -> list[str]:
    """Expressions for the digit strings from ``low`` to ``high``, both of one length."""
    if low == high:
        return [low]
    if len(low) == 1:
        return [f"[{low}-{high}]"]
    if low[0] == high[0]:
        return [low[0] + rest for rest in _same_length(low[1:], high[1:])]
    rest = len(low) - 1
    found = []
    start, end = int(low[0]), int(high[0])
    if low[1:] != "0" * rest:
        found += [low[0] + tail for tail in _same_length(low[1:], "9" * rest)]
        start += 1
    if high[1:] != "9" * rest:
        end -= 1
    if start <= end:
        found.append(f"[{start}-{end}][0-9]{{{rest}}}")
    if high[1:] != "9" * rest:
        found += [high[0] + tail for tail in _same_length("0" * rest, high[1:])]
    return found


def _literal(text: str, pattern: str) -> str:
    if "{" in text or "}" in text:
        raise UnknownPointError(
            f"cannot read the point pattern {pattern[:80]!r}: braces hold a range of numbers, {{0..5}}; "
            "* stands for one dotted component"
        )
    return r"[^.\[\]]*".join(re.escape(piece) for piece in text.split("*"))


def matching(pattern: str, names: Iterable[str], *, prefix: bool = False) -> list[str]:
    """The ``names`` that ``pattern`` matches, in their order."""
    regex = compile_pattern(pattern, prefix=prefix)
    return [name for name in names if regex.fullmatch(name)]


class _Index:
    """An inventory's names in execution order (aliases where their points are), their ranks, patterns' matches."""

    __slots__ = ("names", "ranks", "matches")

    def __init__(self, inventory: Inventory) -> None:
        position = {name: number for number, name in enumerate(inventory.points)}
        end = len(position)
        ranked = [(number, 0, name) for name, number in position.items()]
        for alias, target in inventory.aliases.items():
            ranked.append((position.get(split_narrowing(target)[0], end), 1, alias))
        self.names = [name for *_, name in sorted(ranked)]
        self.ranks = {name: number for number, name in enumerate(self.names)}
        self.matches: dict[str, list[str]] = {}


_indexes: weakref.WeakKeyDictionary[Inventory, _Index] = weakref.WeakKeyDictionary()


def _index(inventory: Inventory) -> _Index:
    if not inventory.ran:  # an inventory taken without a dry run grows as forwards enter helpers
        return _Index(inventory)
    index = _indexes.get(inventory)
    if index is None:
        index = _indexes[inventory] = _Index(inventory)
    return index


def ordered_names(inventory: Inventory) -> list[str]:
    """Every point name and alias of ``inventory``, in execution order."""
    return _index(inventory).names


def in_execution_order(values: dict[str, Any], inventory: Inventory) -> dict[str, Any]:
    """``{point name: ...}`` reordered as the points run (names the inventory lacks go last)."""
    ranks = _index(inventory).ranks
    end = len(ranks)

    def position(name: str) -> int:
        found = ranks.get(name)
        return found if found is not None else ranks.get(split_narrowing(name)[0], end)

    return dict(sorted(values.items(), key=lambda item: position(item[0])))


def expand(name: str, inventory: Inventory) -> list[str]:
    """The point names ``name`` stands for: itself, or every match of a pattern in execution order."""
    base, _ = split_narrowing(name)
    if not is_pattern(base):
        return [name]
    index = _index(inventory)
    found = index.matches.get(base)
    if found is None:
        found = matching(base, index.names)
        if not found:
            raise unknown_point(name, index.names)
        if len(index.matches) < 1024:
            index.matches[base] = found
    narrowing = name[len(base) :]
    return [match + narrowing for match in found]


def unknown_point(name: str, known: Iterable[str]) -> UnknownPointError:
    """An error for ``name`` (a point name or pattern) that lists the closest of the ``known`` names."""
    names = list(known)
    if name + ".output" in names:
        return UnknownPointError(
            f"{name!r} is a module, not a point: its call's value is {name + '.output'!r} and what it is called "
            f"with is {name + '.input'!r} (and its other arguments, {name + '.args.NAME'!r})"
        )
    parent = name.rsplit(".", 1)[0]
    nearby = [n for n in names if n.startswith(parent + ".")] or names
    close = difflib.get_close_matches(name, nearby, n=5, cutoff=0.5) or difflib.get_close_matches(
        name, names, n=5, cutoff=0.5
    )
    hint = f"; closest: {', '.join(close)}" if close else ""
    what = "matches" if is_pattern(name) else "named"
    return UnknownPointError(f"no point {what} {name!r} in this model{hint}. {LISTING}")
