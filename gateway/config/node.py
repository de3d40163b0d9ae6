"""Pass two of config validation: typed reads of YAML values that report problems instead of raising.

A `Node` is a value at a key path in one document. Its reads (`text`, `integer`, `decimal`, ...) resolve
`${VAR}` references, decode, check a `Bound`, and on any problem report it to the document's issue list
and return the caller's default, so decoding goes on and every problem is found in one run. Messages say
what a value must be, never what it was: the value may have come from a secret.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, TypeVar, cast

from gateway.config.interpolate import interpolate
from gateway.errors import ConfigIssue

__all__ = [
    "Doc", "Node", "InvalidValue", "Bound", "at_least", "above", "between", "FRACTION",
    "as_text", "as_name", "is_name", "repeats",
]

T = TypeVar("T")
D = TypeVar("D")
H = TypeVar("H", bound=Hashable)

_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_INTEGER = re.compile(r"[+-]?[0-9]+")
_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})
_UNRESOLVED = object()


class InvalidValue(ValueError):
    """A value that cannot be decoded; the message says what it must be."""


@dataclass(frozen=True)
class Bound:
    """A numeric range and the message reported for a value outside it."""

    contains: Callable[[Decimal | int], bool]
    message: str


def at_least(low: int) -> Bound:
    """Values >= `low`."""
    return Bound(lambda value: value >= low, f"must be >= {low}")


def above(low: int) -> Bound:
    """Values > `low`."""
    return Bound(lambda value: value > low, f"must be > {low}")


def between(low: int, high: int) -> Bound:
    """Values from `low` to `high`, both included."""
    return Bound(lambda value: low <= value <= high, f"must be between {low} and {high}")


FRACTION = Bound(lambda value: 0 < value <= 1, "must be > 0 and <= 1")


@dataclass(frozen=True)
class Doc:
    """One YAML file being decoded: its name in messages, the environment, the shared issue list."""

    file: str
    env: Mapping[str, str]
    issues: list[ConfigIssue]

    def report(self, path: str, message: str) -> None:
        """Record a problem at `path` in this file."""
        self.issues.append(ConfigIssue(self.file, path, message))


@dataclass(frozen=True)
class Node:
    """A value at a key path in one document, with typed reads that report to the document."""

    value: Any
    path: str
    doc: Doc

    @property
    def absent(self) -> bool:
        """True when the key is missing or written with no value."""
        return self.value is None

    def report(self, message: str) -> None:
        """Record a problem at this node's key path."""
        self.doc.report(self.path, message)

    def quoted(self, text: str) -> str:
        """`text` quoted for a message when written literally; never a value that came from the environment."""
        return f"'{text}'" if text == self.value else "(a value from the environment)"

    def at(self, key: str, *, required: bool = False) -> Node:
        """The value under `key` of this mapping; reports `is required` when asked to and it is absent."""
        value = self.value.get(key) if isinstance(self.value, dict) else None
        child = Node(value, f"{self.path}.{key}" if self.path else key, self.doc)
        if required and child.absent:
            child.report("is required")
        return child

    def entries(self) -> list[tuple[str, Node]]:
        """The (key, node) pairs of this mapping, in file order."""
        if not isinstance(self.value, dict):
            return []
        return [(key, self.at(key)) for key in self.value]

    def elements(self) -> list[Node]:
        """The nodes of this list, in file order."""
        if not isinstance(self.value, list):
            return []
        return [Node(item, f"{self.path}[{index}]", self.doc) for index, item in enumerate(self.value)]

    def parse(self, parser: Callable[[Any], T], default: D) -> T | D:
        """The value decoded by `parser` after interpolation; `default` when absent or invalid."""
        value = self._interpolated()
        if value is None or value is _UNRESOLVED:
            return default
        try:
            return parser(value)
        except InvalidValue as exc:
            self.report(str(exc))
            return default

    def text(self, default: D) -> str | D:
        """A string."""
        return self.parse(as_text, default)

    def integer(self, default: D, bound: Bound | None = None) -> int | D:
        """An integer (a digit string from the environment counts), within `bound`."""
        return self.parse(lambda value: _within(_as_int(value), bound), default)

    def decimal(self, default: D, bound: Bound | None = None) -> Decimal | D:
        """An exact finite number, within `bound`."""
        return self.parse(lambda value: _within(_as_decimal(value), bound), default)

    def number(self, default: D, bound: Bound | None = None) -> float | D:
        """A finite number as a float (durations and ratios, never money), within `bound`."""
        return self.parse(lambda value: float(_within(_as_decimal(value), bound)), default)

    def flag(self, default: bool) -> bool:
        """A boolean (true/false, yes/no, on/off from the environment count)."""
        return self.parse(_as_bool, default)

    def choice(self, options: tuple[T, ...], default: D) -> T | D:
        """One of `options`."""
        return self.parse(lambda value: _one_of(as_text(value), options), default)

    def texts(self) -> tuple[str, ...]:
        """A list of strings; bad items are reported and left out."""
        return tuple(item for item in (element.text(None) for element in self.elements()) if item is not None)

    def _interpolated(self) -> Any:
        """The value with `${VAR}` references resolved; _UNRESOLVED after reporting unset variables."""
        if not isinstance(self.value, str):
            return self.value
        text, missing = interpolate(self.value, self.doc.env)
        for name in missing:
            self.report(f"environment variable {name} is not set")
        return _UNRESOLVED if missing else text


def repeats(items: Iterable[tuple[Node, H]]) -> Iterator[tuple[Node, H, Node]]:
    """Each (node, value, first node) whose value an earlier item already had."""
    first: dict[H, Node] = {}
    for node, value in items:
        if value in first:
            yield node, value, first[value]
        else:
            first[value] = node


def as_text(value: Any) -> str:
    """`value` when it is a string."""
    if not isinstance(value, str):
        raise InvalidValue("must be a string")
    return value


def is_name(text: str) -> bool:
    """True for a name of letters, digits, `_`, `.` and `-` (providers, keys, policies)."""
    return _NAME.fullmatch(text) is not None


def as_name(value: Any) -> str:
    """`value` when it is a valid name."""
    text = as_text(value)
    if not is_name(text):
        raise InvalidValue("must be a name of letters, digits, '_', '.' and '-'")
    return text


def _as_int(value: Any) -> int:
    """An int, or a string of digits."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        return int(value)
    raise InvalidValue("must be an integer")


def _as_decimal(value: Any) -> Decimal:
    """A finite Decimal from an int, a Decimal (YAML floats) or a numeric string."""
    if isinstance(value, bool) or not isinstance(value, (int, Decimal, str)):
        raise InvalidValue("must be a number")
    try:
        number = Decimal(value.strip() if isinstance(value, str) else value)
    except InvalidOperation:
        raise InvalidValue("must be a number") from None
    if not number.is_finite():
        raise InvalidValue("must be a finite number")
    return number


def _as_bool(value: Any) -> bool:
    """A bool, or a true/false word."""
    if isinstance(value, bool):
        return value
    word = value.strip().lower() if isinstance(value, str) else None
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise InvalidValue("must be true or false")


def _within(number: T, bound: Bound | None) -> T:
    """`number` when it is inside `bound`."""
    if bound is not None and not bound.contains(cast("Decimal | int", number)):
        raise InvalidValue(bound.message)
    return number


def _one_of(text: str, options: tuple[T, ...]) -> T:
    """`text` when it is one of `options`."""
    if text not in options:
        raise InvalidValue("must be one of: " + ", ".join(str(option) for option in options))
    return cast(T, text)
