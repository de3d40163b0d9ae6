"""`${VAR}` and `${VAR:-default}` references in config strings, resolved from a given environment."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Loc", "Resolved", "interpolate", "resolve"]

Loc = tuple[str | int, ...]
_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate(text: str, env: Mapping[str, str]) -> tuple[str, list[str]]:
    """`text` with its references replaced, and the names of unset variables that had no default.

    As in the shell, `${VAR:-default}` uses the default when VAR is unset or empty. Replaced values are
    never scanned again, so a secret containing `${` or YAML syntax is taken literally.
    """
    missing: list[str] = []

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = env.get(name)
        if default is not None:
            return value or default
        if value is None:
            missing.append(name)
            return ""
        return value

    return _REFERENCE.sub(replace, text), list(dict.fromkeys(missing))


@dataclass
class Resolved:
    """A YAML document with every string's references resolved, and where that changed something."""

    value: Any
    from_env: set[Loc] = field(default_factory=set)          # values that came (partly) from the environment
    missing: dict[Loc, list[str]] = field(default_factory=dict)   # values left out: these variables are unset


def resolve(document: Any, env: Mapping[str, str]) -> Resolved:
    """`document` with references resolved; a value naming an unset variable is left out (its default applies)."""
    resolved = Resolved(None)
    resolved.value = _walk(document, (), env, resolved)
    return resolved


def _walk(value: Any, loc: Loc, env: Mapping[str, str], resolved: Resolved) -> Any:
    """One value, resolved; mapping keys are names, never resolved."""
    if isinstance(value, dict):   # a key with no value, or naming an unset variable, counts as left out
        pairs = [(key, _walk(item, (*loc, key), env, resolved)) for key, item in value.items() if item is not None]
        return {key: item for key, item in pairs if (*loc, key) not in resolved.missing}
    if isinstance(value, list):
        return [_walk(item, (*loc, index), env, resolved) for index, item in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value
    text, missing = interpolate(value, env)
    if missing:
        resolved.missing[loc] = missing
    if text != value:
        resolved.from_env.add(loc)
    return text
