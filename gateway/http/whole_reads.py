"""What a client connection keeps of the read that brought its request (see wire_hits)."""

from __future__ import annotations

__all__ = ["ReadKeeper", "forget_read"]


class ReadKeeper:
    """A mixin of the server's protocol (gateway.serving.connections), which keeps the last read when one
    request's head was parsed from it."""

    __slots__ = ()

    def take_read(self) -> bytes | None:
        """The read kept for the request being served (None: none), let go of."""
        raise NotImplementedError

    def stands_at_boundary(self) -> None:
        """Note that the read just taken proved to be exactly one request: nothing before or after it."""
        raise NotImplementedError


def forget_read(protocol: object) -> None:
    """Let go of the read kept for a request once it was handled (an idle connection keeps none)."""
    if isinstance(protocol, ReadKeeper):
        protocol.take_read()
