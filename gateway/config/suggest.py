""""Did you mean ...?" for a name that is not one of the known ones (keys, teams, tags, models, YAML keys)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["closest", "did_you_mean"]

_CUTOFF = 0.6   # difflib's similarity ratio: one or two typos in a short name


def closest(word: str, known: Iterable[str]) -> str | None:
    """The known name most like `word`, or None when none is close."""
    matches = difflib.get_close_matches(word, sorted(set(known)), n=1, cutoff=_CUTOFF)
    return matches[0] if matches else None


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """`; did you mean 'x'?` to end an error message with, or nothing when no known name is close."""
    match = closest(word, known)
    return f"; did you mean '{match}'?" if match is not None else ""
