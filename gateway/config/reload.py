"""Live reload: a changed config or policy file is applied within a second, an invalid one is refused.

The watcher polls a fingerprint of every YAML file in the directories the config was read from (so a
new policy file counts too). A change is loaded and validated beside the active config; only a
complete, valid config replaces it, as one reference swap. `server` and `store` need a restart: a
change to them is reported and the running values are kept.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from gateway.config.holder import ConfigHolder
from gateway.config.loader import load_settings, startup_line
from gateway.config.model import Settings
from gateway.errors import ConfigError

__all__ = ["Fingerprint", "fingerprint", "ConfigReloader"]

log = logging.getLogger("gateway.config")
Fingerprint = tuple[tuple[str, int, int], ...]
POLL_INTERVAL_S = 0.5


def fingerprint(files: Iterable[str]) -> Fingerprint:
    """Name, mtime and size of every YAML file beside the given files."""
    entries = []
    for directory in sorted({Path(f).parent for f in files}):
        for path in sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")]):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            entries.append((str(path), stat.st_mtime_ns, stat.st_size))
    return tuple(entries)


class ConfigReloader:
    """Applies valid edits of the config files; counts reloads by result."""

    def __init__(self, holder: ConfigHolder, path: str,
                 on_change: Iterable[Callable[[Settings], None]] = ()) -> None:
        self.holder = holder
        self.path = path
        self.on_change = list(on_change)
        self.results = {"success": 0, "failure": 0}
        self._seen = fingerprint(holder.current.source_files)

    async def poll(self, interval_s: float = POLL_INTERVAL_S) -> bool | None:
        """Wait `interval_s`, then `check` (one turn of the watcher, which `keep_running` repeats)."""
        await asyncio.sleep(interval_s)
        return await self.check()

    async def check(self) -> bool | None:
        """Reload when a file changed: True applied, False refused, None nothing changed."""
        files = self.holder.current.source_files
        current = await asyncio.to_thread(fingerprint, files)
        if current == self._seen:
            return None
        self._seen = current
        try:
            fresh = await asyncio.to_thread(load_settings, self.path)
        except ConfigError as exc:
            self.results["failure"] += 1
            for issue in exc.issues:
                log.error("config reload refused, keeping the last good config: %s", issue)
            return False
        self.apply(fresh)
        return True

    def apply(self, fresh: Settings) -> None:
        """Swap in `fresh`, keeping the settings that need a restart."""
        active = self.holder.current
        for section in ("server", "store"):
            if getattr(fresh, section) != getattr(active, section):
                log.warning("config reload: '%s' changes need a restart; keeping the running values", section)
        fresh = dataclasses.replace(fresh, server=active.server, store=active.store)
        self.holder.swap(fresh)
        for callback in self.on_change:
            callback(fresh)
        self.results["success"] += 1
        log.info("config reloaded: %s", startup_line(fresh))
