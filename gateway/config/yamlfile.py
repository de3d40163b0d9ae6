"""Reading config YAML: safe, exact (floats become Decimal as written), strict about repeated keys."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ExactLoader", "read_yaml"]

_MERGE_TAG = "tag:yaml.org,2002:merge"


class ExactLoader(yaml.SafeLoader):
    """A SafeLoader that reads floats as Decimal and rejects a key repeated in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        """The mapping, after checking that no key is written twice."""
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE_TAG:
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key '{key_node.value}'", key_node.start_mark)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


def _construct_decimal(loader: ExactLoader, node: yaml.ScalarNode) -> Decimal:
    """A YAML float as the exact Decimal its text spells (0.1 -> Decimal("0.1"))."""
    text = str(loader.construct_scalar(node)).replace("_", "")
    try:
        return Decimal(text)
    except InvalidOperation:
        raise yaml.constructor.ConstructorError(
            None, None, f"cannot read '{text}' as a decimal number", node.start_mark) from None


ExactLoader.add_constructor("tag:yaml.org,2002:float", _construct_decimal)


def read_yaml(path: Path) -> tuple[Any, str | None]:
    """The document parsed from `path`, or None and why it cannot be used (empty included)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, "file not found"
    except UnicodeDecodeError:
        return None, "file is not UTF-8 text"
    except OSError as exc:
        return None, f"cannot read file: {exc.strerror}"
    try:
        value = yaml.load(text, Loader=ExactLoader)  # noqa: S506 - ExactLoader is a SafeLoader
    except yaml.YAMLError as exc:
        return None, _syntax_message(exc)
    return value, "file is empty" if value is None else None


def _syntax_message(exc: yaml.YAMLError) -> str:
    """What is wrong and on which line, without quoting the file's text."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return "invalid YAML"
    mark = exc.problem_mark or exc.context_mark
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"invalid YAML{where}: {exc.problem or exc.context}"
