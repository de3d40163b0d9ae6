"""One config file being loaded: how messages name it, its resolved data, and the issues found in it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.config.interpolate import Loc
from gateway.config.issues import render
from gateway.errors import ConfigIssue

__all__ = ["Doc"]


@dataclass
class Doc:
    """A file's resolved data; issues are reported here with a key path, and shared by every file of a load."""

    file: str
    issues: list[ConfigIssue]
    data: Any = None
    from_env: set[Loc] = field(default_factory=set)   # values that came from the environment
    unset: set[Loc] = field(default_factory=set)      # values left out: a variable they name is unset

    def report(self, loc: Loc, message: str) -> None:
        """Record a problem at `loc`, unless it is about a value already reported as unset."""
        if not any(loc[:len(gone)] == gone for gone in self.unset):
            self.issues.append(ConfigIssue(self.file, render(loc), message))

    def quoted(self, loc: Loc, text: str) -> str:
        """`text` quoted for a message when written literally; never a value that came from the environment."""
        return "(a value from the environment)" if loc in self.from_env else f"'{text}'"
