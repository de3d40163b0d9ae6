"""Pass two for policy files: each holds one policy or `policies: [...]`; names are unique across files.

A `match` may name only keys, teams, tags and models that exist (see `gateway.config.reach`).
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from gateway.config.model import AlertConfig, BudgetLimit, Policy, PolicyMatch, Route
from gateway.config.node import FRACTION, InvalidValue, Node, as_name, as_text, at_least, repeats
from gateway.config.prices import Prices
from gateway.config.reach import Reach

__all__ = ["decode_policies", "report_duplicate_names"]

_PERIODS: tuple[Literal["daily", "monthly"], ...] = ("daily", "monthly")
_LIMITS = ("usd", "tokens", "requests")
_ALERT_FORMATS: tuple[Literal["slack", "discord"], ...] = ("slack", "discord")
_DEFAULT = Policy(name="", match=PolicyMatch(), budgets=())

OnExceed = tuple[Literal["block", "downgrade"], str | None]


def decode_policies(root: Node, reach: Reach) -> list[tuple[Node, Policy]]:
    """The policies of one file, each with the node it was read from."""
    return [(node, _policy(node, reach)) for node in _policy_nodes(root)]


def report_duplicate_names(decoded: Sequence[tuple[Node, Policy]]) -> None:
    """Report every policy whose name an earlier one (in any file) already has."""
    named = ((node, policy.name) for node, policy in decoded if policy.name)
    for node, name, first in repeats(named):
        also = f"{first.doc.file} at {first.path}" if first.path else first.doc.file
        node.at("name").report(f"duplicate policy name {node.at('name').quoted(name)} (also in {also})")


def _policy_nodes(root: Node) -> list[Node]:
    """The file itself when it is one policy, else the items of its `policies` list (at least one)."""
    if "policies" not in root.value:
        return [root]
    listed = root.at("policies")
    if not listed.elements():
        listed.report("must list at least one policy")
    return listed.elements()


def _policy(node: Node, reach: Reach) -> Policy:
    """One policy."""
    on_exceed, downgrade_to = _on_exceed(node.at("on_exceed"), reach.prices, reach.routes)
    return Policy(
        name=node.at("name", required=True).parse(as_name, ""),
        match=_match(node.at("match"), reach),
        budgets=_budgets(node.at("budgets", required=True)),
        timezone=node.at("timezone").parse(_timezone, _DEFAULT.timezone),
        warn_at=_warn_at(node.at("warn_at")),
        on_exceed=on_exceed,
        downgrade_to=downgrade_to,
        max_output_tokens=node.at("max_output_tokens").integer(None, at_least(1)),
        source=node.doc.file,
        alerts=_alerts(node.at("alerts")),
    )


def _match(node: Node, reach: Reach) -> PolicyMatch:
    """Which requests the policy applies to; a name that can match nothing is reported."""
    return PolicyMatch(
        keys=_matchable(node, "keys", reach),
        teams=_matchable(node, "teams", reach),
        tags=_matchable(node, "tags", reach),
        models=_matchable(node, "models", reach),
    )


def _matchable(match: Node, field: str, reach: Reach) -> tuple[str, ...]:
    """The names listed under `field`; each that can match nothing is reported."""
    names = []
    for element in match.at(field).elements():
        name = element.text(None)
        if name is None:
            continue
        miss = reach.miss(field, name, element.quoted(name))
        if miss is not None:
            element.report(miss)
        names.append(name)
    return tuple(names)


def _budgets(node: Node) -> tuple[BudgetLimit, ...]:
    """At least one budget, no two for the same period."""
    elements = node.elements()
    if not elements and not node.absent:
        node.report("must list at least one budget")
    pairs = [(element, _budget(element)) for element in elements]
    budgets = [(element, budget) for element, budget in pairs if budget is not None]
    for element, period, first in repeats((element, budget.period) for element, budget in budgets):
        element.at("period").report(f"{period} budget already set at {first.path}")
    return tuple(budget for _, budget in budgets)


def _budget(node: Node) -> BudgetLimit | None:
    """One period's limits; None when its period is missing or wrong (already reported)."""
    period = node.at("period", required=True).choice(_PERIODS, None)
    if all(node.at(unit).absent for unit in _LIMITS):
        node.report("needs at least one limit: usd, tokens or requests")
    usd = node.at("usd").decimal(None, at_least(0))
    tokens = node.at("tokens").integer(None, at_least(0))
    requests = node.at("requests").integer(None, at_least(0))
    return BudgetLimit(period, usd, tokens, requests) if period else None


def _timezone(value: Any) -> str:
    """An IANA time zone name that zoneinfo knows."""
    name = as_text(value)
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise InvalidValue("unknown time zone: must be an IANA name such as UTC or Europe/Paris") from None
    return name


def _warn_at(node: Node) -> tuple[Decimal, ...]:
    """Spent shares that trigger a warning, ascending; the default when absent."""
    if node.absent:
        return _DEFAULT.warn_at
    shares = (element.decimal(None, FRACTION) for element in node.elements())
    return tuple(sorted({share for share in shares if share is not None}))


def _alerts(node: Node) -> AlertConfig | None:
    """The alert webhook (`${VAR}` allowed) and its message format; None when absent."""
    if node.absent:
        return None
    webhook = node.at("webhook", required=True).parse(_webhook_url, None)
    message_format = node.at("format").choice(_ALERT_FORMATS, "slack")
    return AlertConfig(webhook, message_format) if webhook else None


def _webhook_url(value: Any) -> str:
    """An http(s) URL with a host."""
    text = as_text(value)
    try:
        parts = urlsplit(text)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidValue("must be an http(s) URL")
    return text


def _on_exceed(node: Node, prices: Prices, routes: Sequence[Route]) -> OnExceed:
    """`block`, or `downgrade` with a priced, routed model."""
    if not isinstance(node.value, dict):
        node.parse(_block, "block")
        return "block", None
    target = node.at("downgrade", required=True)
    model = target.text(None)
    if model is not None:
        _check_downgrade(target, model, prices, routes)
    return "downgrade", model


def _block(value: Any) -> str:
    """The word `block`."""
    if value != "block":
        raise InvalidValue("must be 'block' or a mapping {downgrade: <model>}")
    return value


def _check_downgrade(node: Node, model: str, prices: Prices, routes: Sequence[Route]) -> None:
    """Report a downgrade model that has no price or that no route serves."""
    if prices is not None and model not in prices:
        node.report(f"model {node.quoted(model)} has no price")
    elif not any(route.matches(model) for route in routes):
        node.report(f"no route serves model {node.quoted(model)}")
