"""Pass one of config validation: only known keys, and every value has the shape its key expects.

Shapes describe what a YAML document may contain (see `gateway.config.schema`). `Shape.check` reports
unknown keys (naming the known key most like each, when one is close) and misshapen values; it returns
False only for misshapen ones, after which the document is not decoded (an unknown key alone leaves the
rest safe to decode, so pass two still runs).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.config.node import Doc
from gateway.config.suggest import did_you_mean

__all__ = ["Shape", "Scalar", "Keys", "MapOf", "ListOf", "Either", "IfKey", "SCALAR"]


class Shape:
    """What one YAML value may be; `None` (a key with no value) always fits."""

    noun = "a value"

    def accepts(self, value: Any) -> bool:
        """True when `value` is of this shape's kind (mapping, list or single value)."""
        raise NotImplementedError

    def check(self, value: Any, path: str, doc: Doc) -> bool:
        """Report problems in `value` at `path`; False when it is misshapen."""
        if value is None:
            return True
        if not self.accepts(value):
            doc.report(path, f"must be {self.noun}")
            return False
        return self.check_inside(value, path, doc)

    def check_inside(self, value: Any, path: str, doc: Doc) -> bool:
        """Check what `value`, already of the right kind, contains."""
        return True


class Scalar(Shape):
    """A single value: string, number, boolean."""

    noun = "a single value, not a mapping or a list"

    def accepts(self, value: Any) -> bool:
        return not isinstance(value, (dict, list))


SCALAR = Scalar()


class _Mapping(Shape):
    """A mapping with string keys."""

    noun = "a mapping"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, dict)

    def check_inside(self, value: Any, path: str, doc: Doc) -> bool:
        return all([self.check_entry(key, item, _join(path, key), doc) for key, item in value.items()])

    def check_entry(self, key: Any, item: Any, path: str, doc: Doc) -> bool:
        """Check one key and its value."""
        raise NotImplementedError


@dataclass(frozen=True)
class Keys(_Mapping):
    """A mapping with a fixed set of keys, each with its own shape."""

    fields: Mapping[str, Shape]

    def check_entry(self, key: Any, item: Any, path: str, doc: Doc) -> bool:
        if key not in self.fields:
            doc.report(path, "unknown key" + did_you_mean(str(key), self.fields))
            return True
        return self.fields[key].check(item, path, doc)


@dataclass(frozen=True)
class MapOf(_Mapping):
    """A mapping from names of the user's choosing to values of one shape."""

    value: Shape

    def check_entry(self, key: Any, item: Any, path: str, doc: Doc) -> bool:
        if not isinstance(key, str):
            doc.report(path, "key must be a string")
            return False
        return self.value.check(item, path, doc)


@dataclass(frozen=True)
class ListOf(Shape):
    """A list of values of one shape."""

    item: Shape
    noun = "a list"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, list)

    def check_inside(self, value: Any, path: str, doc: Doc) -> bool:
        return all([self.item.check(item, f"{path}[{index}]", doc) for index, item in enumerate(value)])


@dataclass(frozen=True)
class Either(Shape):
    """The first of `options` whose kind fits the value (e.g. a name or a mapping)."""

    options: tuple[Shape, ...]
    noun: str = "a value"

    def accepts(self, value: Any) -> bool:
        return any(option.accepts(value) for option in self.options)

    def check_inside(self, value: Any, path: str, doc: Doc) -> bool:
        option = next(option for option in self.options if option.accepts(value))
        return option.check(value, path, doc)


@dataclass(frozen=True)
class IfKey(Shape):
    """A mapping shaped as `present` when it has `key`, else as `absent`."""

    key: str
    present: Shape
    absent: Shape
    noun = "a mapping"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, dict)

    def check_inside(self, value: Any, path: str, doc: Doc) -> bool:
        shape = self.present if self.key in value else self.absent
        return shape.check(value, path, doc)


def _join(path: str, key: Any) -> str:
    """`path.key`, or `key` at the top."""
    return f"{path}.{key}" if path else str(key)
