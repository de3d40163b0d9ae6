"""One swappable reference to the active Settings, so a reload never half-applies."""

from __future__ import annotations

from gateway.config.model import Settings

__all__ = ["ConfigHolder"]


class ConfigHolder:
    """Holds the active Settings; readers take `current` once per request."""

    def __init__(self, settings: Settings, path: str | None = None) -> None:
        self.current = settings
        self.path = path

    def swap(self, settings: Settings) -> None:
        """Make `settings` active for every request that starts from now on."""
        self.current = settings
