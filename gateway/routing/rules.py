"""Rules of an `auto` route: what a request has (prompt bound, tools, images, caller, tier header), and the
first rule whose conditions all hold.

The prompt bound is the one budgets reserve (`gateway.domain.worst_case.prompt_bound`, by the request's API, each
image at the default allowance: the model is what the rules choose): an upper bound of the prompt's tokens,
worked out only when a rule asks for it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from gateway.config.model import CallerIdentity
from gateway.config.routes import Rule, RuleWhen
from gateway.domain.request import ProxyRequest
from gateway.domain.worst_case import prompt_bound

__all__ = ["TIER_HEADER", "Traits", "first_match", "has_tools", "has_images"]

TIER_HEADER = "x-gateway-tier"
_IMAGE_PARTS = frozenset({"image_url", "input_image", "image"})


def has_tools(payload: Mapping[str, Any]) -> bool:
    """True when the request offers tools or (legacy) functions."""
    return bool(payload.get("tools") or payload.get("functions"))


def has_images(payload: Mapping[str, Any]) -> bool:
    """True when a chat message carries an image part."""
    messages = payload.get("messages")
    if not isinstance(messages, list):
        return False
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(isinstance(part, dict) and part.get("type") in _IMAGE_PARTS
                                             for part in content):
            return True
    return False


class Traits:
    """What the rules may ask of one request, each worked out once, when first asked."""

    def __init__(self, req: ProxyRequest, caller: CallerIdentity, headers: Mapping[str, str]) -> None:
        self.req, self.payload, self.caller, self.headers = req, req.payload, caller, headers
        self._prompt: int | None = None
        self._tools: bool | None = None
        self._images: bool | None = None

    @property
    def prompt_tokens(self) -> int:
        """The prompt's token bound."""
        if self._prompt is None:
            self._prompt = prompt_bound(self.req)
        return self._prompt

    @property
    def tools(self) -> bool:
        """Whether the request offers tools."""
        if self._tools is None:
            self._tools = has_tools(self.payload)
        return self._tools

    @property
    def images(self) -> bool:
        """Whether the request carries images."""
        if self._images is None:
            self._images = has_images(self.payload)
        return self._images

    def meet(self, when: RuleWhen) -> bool:
        """True when every condition of `when` holds."""
        if when.prompt_tokens_max is not None and self.prompt_tokens > when.prompt_tokens_max:
            return False
        if when.tools is not None and self.tools != when.tools:
            return False
        if when.images is not None and self.images != when.images:
            return False
        if when.teams and self.caller.team not in when.teams:
            return False
        if when.tags and not any(tag in when.tags for tag in self.caller.tags):
            return False
        return when.tier is None or self.headers.get(TIER_HEADER) == when.tier


def first_match(rules: Sequence[Rule], traits: Traits) -> Rule:
    """The first rule `traits` meet (the last rule, a catch-all, meets every request)."""
    for rule in rules:
        if traits.meet(rule.when):
            return rule
    return rules[-1]
