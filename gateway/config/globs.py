"""Whether two fnmatch globs (`*`, `?`, `[...]`) can match the same name: a policy's model glob vs a route's."""

from __future__ import annotations

import fnmatch
from functools import cache

__all__ = ["is_glob", "globs_overlap"]

_GLOB_CHARS = frozenset("*?[")


def is_glob(pattern: str) -> bool:
    """True when `pattern` has a glob character, so it may match more than its own text."""
    return not _GLOB_CHARS.isdisjoint(pattern)


def globs_overlap(first: str, second: str) -> bool:
    """True when some name matches both globs (fnmatchcase semantics)."""
    a, b = _tokens(first), _tokens(second)

    @cache
    def meet(i: int, j: int) -> bool:
        """True when some string matches both a[i:] and b[j:]."""
        if i == len(a) and j == len(b):
            return True
        if i < len(a) and a[i] == "*" and meet(i + 1, j):
            return True
        if j < len(b) and b[j] == "*" and meet(i, j + 1):
            return True
        if i == len(a) or j == len(b) or a[i] == b[j] == "*" or not _share_a_char(a[i], b[j]):
            return False   # two stars eating the same character loop back to (i, j): nothing new
        return meet(i + (a[i] != "*"), j + (b[j] != "*"))

    return meet(0, 0)


def _tokens(pattern: str) -> list[str]:
    """`*`, `?`, a `[...]` class or one literal character each, split as fnmatch.translate does."""
    tokens, i = [], 0
    while i < len(pattern):
        end = _class_end(pattern, i) if pattern[i] == "[" else i
        tokens.append(pattern[i:end + 1])
        i = end + 1
    return tokens


def _class_end(pattern: str, start: int) -> int:
    """Where the class opened at `start` closes; `start` itself when it never does (a literal `[`)."""
    j = start + 1
    if j < len(pattern) and pattern[j] == "!":
        j += 1
    if j < len(pattern) and pattern[j] == "]":
        j += 1
    while j < len(pattern) and pattern[j] != "]":
        j += 1
    return j if j < len(pattern) else start


def _share_a_char(first: str, second: str) -> bool:
    """True when one character matches both tokens.

    Each token's characters are a union of ranges whose bounds its text names (or the complement of one),
    so a shared character, if any, is the lowest one, a character of either text or the one just after it.
    """
    candidates = {"\0", *first, *second, *(chr(ord(c) + 1) for c in first + second if ord(c) < 0x10FFFF)}
    return any(_fits(first, c) and _fits(second, c) for c in candidates)


def _fits(token: str, char: str) -> bool:
    """True when `char` matches the one-character token (`*` and `?` take any)."""
    return token in ("*", "?") or fnmatch.fnmatchcase(char, token)
