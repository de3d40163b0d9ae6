"""pydantic's validation errors as our config issues: a key path and what the value must be, never what it was.

The wording comes from the published JSON Schema at the error's path: its bounds ("must be between 0 and
65535"), its choices, the keys it knows (for "did you mean ...?"). No message quotes the value: it may have
come from a secret.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from gateway.config.fields import PATTERN_MESSAGES
from gateway.config.interpolate import Loc
from gateway.config.suggest import did_you_mean

__all__ = ["Found", "found_in", "is_shape", "render"]

Found = tuple[Loc, str]   # where, and what is wrong

_SHAPES = {
    "dict_type": "must be a mapping", "dataclass_type": "must be a mapping", "model_type": "must be a mapping",
    "mapping_type": "must be a mapping", "list_type": "must be a list", "tuple_type": "must be a list",
}
_FIXED = {
    **_SHAPES,
    "missing": "is required", "missing_argument": "is required", "missing_keyword_only_argument": "is required",
    "int_type": "must be an integer", "int_parsing": "must be an integer", "int_from_float": "must be an integer",
    "float_type": "must be a number", "float_parsing": "must be a number", "decimal_type": "must be a number",
    "decimal_parsing": "must be a number", "finite_number": "must be a finite number",
    "bool_type": "must be true or false", "bool_parsing": "must be true or false",
    "string_type": "must be a string", "too_short": "must not be empty",
}
_UNKNOWN = ("extra_forbidden", "unexpected_keyword_argument")
_BOUNDS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def found_in(exc: ValidationError, schema: dict[str, Any]) -> list[Found]:
    """Each error of `exc` (validating a document described by `schema`) as a key path and a message."""
    errors = exc.errors()
    return [(tuple(error["loc"]), _message(error, schema)) for error in errors if not _echo(error, errors)]


def _echo(error: ErrorDetails, errors: list[ErrorDetails]) -> bool:
    """True for a list found too short only because an item of it was refused (reported already)."""
    loc = error["loc"]
    return error["type"] == "too_short" and any(other["loc"][:len(loc)] == loc != other["loc"] for other in errors)


def is_shape(message: str) -> bool:
    """True for a value of the wrong kind (a mapping, a list): the values inside it were not checked."""
    return message in _SHAPES.values()


def render(loc: Loc) -> str:
    """`a.b[0].c` for ("a", "b", 0, "c")."""
    text = ""
    for step in loc:
        text += f"[{step}]" if isinstance(step, int) else f".{step}" if text else str(step)
    return text


def _message(error: ErrorDetails, schema: dict[str, Any]) -> str:
    """What the value at the error's path must be."""
    kind, loc = error["type"], tuple(error["loc"])
    ctx = error.get("ctx") or {}
    if kind in _FIXED:
        return _FIXED[kind]
    if kind == "value_error":
        return str(ctx["error"])
    if kind in _UNKNOWN:
        return "unknown key" + did_you_mean(str(loc[-1]), _keys(_at(schema, loc[:-1])))
    if kind in _BOUNDS:
        return _bounds(_at(schema, loc)) or f"must be {_OPERATORS[kind]} {_number(next(iter(ctx.values())))}"
    if kind == "literal_error":
        return "must be one of: " + ", ".join(_choices(_at(schema, loc)))
    if kind == "string_pattern_mismatch":
        return PATTERN_MESSAGES.get(str(ctx.get("pattern")), "does not have the expected form")
    return error["msg"].replace("Input should be", "must be")


_OPERATORS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _bounds(schemas: list[dict[str, Any]]) -> str | None:
    """"must be between 0 and 10", "must be > 0 and <= 1", "must be >= 1": the range the schema sets."""
    for schema in schemas:
        low = [f"{op} {_number(schema[key])}" for key, op in (("minimum", ">="), ("exclusiveMinimum", ">"))
               if key in schema]
        high = [f"{op} {_number(schema[key])}" for key, op in (("maximum", "<="), ("exclusiveMaximum", "<"))
                if key in schema]
        if low and high and "minimum" in schema and "maximum" in schema:
            return f"must be between {_number(schema['minimum'])} and {_number(schema['maximum'])}"
        if low or high:
            return "must be " + " and ".join(low + high)
    return None


def _choices(schemas: list[dict[str, Any]]) -> list[str]:
    """The values the schema allows here."""
    return [str(value) for schema in schemas for value in schema.get("enum", [schema.get("const")])
            if value is not None]


def _number(value: Any) -> str:
    """0 for 0.0, 1024 for 1024, 0.5 for 0.5."""
    number = Decimal(str(value))
    return str(number.to_integral_value()) if number == number.to_integral_value() else str(number)


def _keys(schemas: list[dict[str, Any]]) -> set[str]:
    """The keys the schema knows here."""
    return {key for schema in schemas for key in schema.get("properties", {})}


def _at(root: dict[str, Any], loc: Loc) -> list[dict[str, Any]]:
    """Every schema that may describe the value at `loc` (one per branch of an anyOf)."""
    schemas = list(_branches(root, root))
    for step in loc:
        schemas = [branch for schema in schemas for branch in _branches(_step(schema, step), root)]
    return schemas


def _step(schema: dict[str, Any], step: str | int) -> dict[str, Any]:
    """The schema of one key or item inside `schema`."""
    if isinstance(step, int):
        items = schema.get("items", {})
        return items if isinstance(items, dict) else {}
    extra = schema.get("additionalProperties")
    return schema.get("properties", {}).get(step) or (extra if isinstance(extra, dict) else {})


def _branches(schema: dict[str, Any], root: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """`schema` with its $ref followed and its anyOf/oneOf/allOf and then/else spread out."""
    if "$ref" in schema:
        schema = root["$defs"][schema["$ref"].rsplit("/", 1)[-1]]
    yield schema
    for key in ("anyOf", "oneOf", "allOf"):
        for branch in schema.get(key, []):
            yield from _branches(branch, root)
    for key in ("then", "else"):
        if key in schema:
            yield from _branches(schema[key], root)
