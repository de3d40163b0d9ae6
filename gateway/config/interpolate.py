"""`${VAR}` and `${VAR:-default}` references in config strings, resolved from a given environment."""

from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = ["interpolate"]

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
