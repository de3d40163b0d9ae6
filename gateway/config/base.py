"""What every config model shares: strict validation, the file context, and problems reported at a key path.

Config models are pydantic dataclasses (`@dataclass(frozen=True, config=STRICT)`): validated like pydantic
models, yet plain frozen dataclasses at run time, so reading a field or hashing a value costs what it
always did (a `BaseModel` field read is about three times slower: its `__getattr__` hook defeats
CPython's attribute cache). `dataclasses.replace` validates the changed copy again.

A file is validated with `FileContext`: only then do models accept their file form (a provider's name
from its key, `on_exceed: {downgrade: model}`, plaintext keys turned into digests) and refuse the fields
the loader fills in.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ConfigDict, TypeAdapter, ValidationError, ValidationInfo, WrapValidator
from pydantic_core import InitErrorDetails, core_schema

__all__ = [
    "STRICT", "FileContext", "Problems", "file_context", "problem", "unknown_key", "checked", "again", "read_as",
    "file_form",
]

T = TypeVar("T")
Loc = tuple[str | int, ...]
Problems = list[InitErrorDetails]

STRICT = ConfigDict(
    extra="forbid", allow_inf_nan=False, validate_by_name=True, validate_by_alias=True,
    use_attribute_docstrings=True,
)
_BUILTIN_ERRORS = frozenset(typing.get_args(core_schema.ErrorType))


@dataclass(frozen=True)
class FileContext:
    """What validating a file needs beyond its text: the directory paths start from, the environment."""

    base_dir: Path
    env: Mapping[str, str] = field(default_factory=dict)


def file_context(info: ValidationInfo) -> FileContext | None:
    """The file being validated, or None when a model is built in code."""
    context = info.context
    return context if isinstance(context, FileContext) else None


def problem(loc: Loc, message: str) -> InitErrorDetails:
    """A problem at `loc` (relative to the value being validated), worded by us."""
    return InitErrorDetails(type="value_error", loc=loc, input=None, ctx={"error": ValueError(message)})


def unknown_key(key: str) -> InitErrorDetails:
    """A key this place does not take, reported like pydantic's own."""
    return InitErrorDetails(type="unexpected_keyword_argument", loc=(key,), input=None)


def checked(handler: Callable[[Any], T], data: Any, problems: Problems, inline: str | None = None) -> T:
    """`handler(data)`, raising its errors together with `problems` so that none hides another.

    `inline` names a field whose keys a file writes beside the others: its errors lose that step of the path.
    """
    errors = list(problems)
    try:
        result = handler(data)
    except ValidationError as exc:
        errors += [again(error, _unless(error["loc"], inline)) for error in exc.errors()]
    if errors:
        raise ValidationError.from_exception_data("config", errors)
    return result


def _unless(loc: Loc, inline: str | None) -> Loc:
    """`loc` without its first step when that is `inline`."""
    return tuple(loc[1:]) if inline is not None and loc[:1] == (inline,) else tuple(loc)


def again(error: Any, loc: Loc) -> InitErrorDetails:
    """An error pydantic reported, to raise again at `loc`."""
    kind = error["type"]
    if kind not in _BUILTIN_ERRORS:
        return problem(loc, error["msg"])
    return InitErrorDetails(type=kind, loc=loc, input=error.get("input"), ctx=error.get("ctx") or {})


def file_form(data: Any, info: ValidationInfo, filled: Iterable[str]) -> tuple[dict[str, Any] | None, Problems]:
    """A file's mapping without the `filled` keys (the loader sets those), and a problem for each written."""
    if file_context(info) is None or not isinstance(data, dict):
        return None, []
    written = [key for key in filled if key in data]
    return {key: value for key, value in data.items() if key not in written}, [unknown_key(k) for k in written]


def read_as(file_type: Any, convert: Callable[[Any], Any]) -> WrapValidator:
    """A field written in files as `file_type` (which the JSON Schema publishes), kept as `convert` makes it."""
    adapter: TypeAdapter[Any] = TypeAdapter(file_type)

    def validate(value: Any, handler: Callable[[Any], Any], info: ValidationInfo) -> Any:
        """The file form validated and converted; a value built in code as it is."""
        if file_context(info) is None and not isinstance(value, Mapping):
            return handler(value)
        return handler(convert(adapter.validate_python(value, context=info.context, by_name=False)))

    return WrapValidator(validate, json_schema_input_type=file_type)
