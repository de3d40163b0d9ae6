"""The `routes` section: a model's providers in failover order, a weighted split, a canary, or rules.

In a file a route is a list of providers (primary first, the rest failover targets), or a mapping with one of
`split` (weights, optionally `sticky`), `canary` (control, candidate, steps, promote_after, rollback_if) or
`rules` (first match picks the model). Rules across the section (known providers, prices, rule targets
routed) are in `gateway.config.checks`.
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Callable
from decimal import Decimal
from functools import cached_property
from typing import Annotated, Any, Literal, Self

from pydantic import Field, GetJsonSchemaHandler, TypeAdapter, ValidationError, ValidationInfo, WrapValidator
from pydantic import model_validator
from pydantic.dataclasses import dataclass
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from gateway.config.base import STRICT, problem
from gateway.config.fields import Count, Fraction

__all__ = [
    "RouteTarget", "SplitTarget", "PromoteAfter", "RollbackIf", "CanaryConfig", "RuleWhen", "Rule", "RouteSpec",
    "Route", "Sticky", "RouteForm", "routes_of",
]

Sticky = Literal["key", "user", "none"]
Handler = Callable[[Any], Any]


@dataclass(frozen=True, config=STRICT)
class RouteTarget:
    """One provider of a route, with the model name that provider knows; in a file, a name or a mapping."""

    provider: str
    upstream_model: str | None = Field(default=None, validation_alias="model")
    """None: the client's model name is forwarded as is."""

    @model_validator(mode="before")
    @classmethod
    def _a_name(cls, data: Any) -> Any:
        """A provider named alone."""
        return {"provider": data} if isinstance(data, str) else data

    @staticmethod
    def __get_pydantic_json_schema__(schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        """A provider name, or {provider, model}."""
        return {"anyOf": [{"type": "string", "description": "a provider name"}, handler(schema)]}


@dataclass(frozen=True, config=STRICT)
class SplitTarget:
    """One arm of a split: a provider (and the model it knows) and its positive weight."""

    provider: str
    weight: int = Field(gt=0)
    """Relative share of requests (95 and 5: 95% and 5%)."""
    upstream_model: str | None = Field(default=None, validation_alias="model")


@dataclass(frozen=True, config=STRICT)
class PromoteAfter:
    """A canary step is promoted once both hold: this many candidate requests and minutes in the step."""

    requests: Count = 500
    """Requests served by the candidate in the step."""
    minutes: float = Field(default=10.0, ge=0)


@dataclass(frozen=True, config=STRICT)
class RollbackIf:
    """The candidate is rolled back when any of these holds in a step (ratios: candidate over control)."""

    error_rate: Fraction | None = Decimal("0.05")
    """The candidate's share of failed requests."""
    p95_latency_ratio: float | None = Field(default=1.5, gt=0)
    cost_per_request_ratio: float | None = Field(default=1.2, gt=0)
    min_requests: Count | None = None
    """Candidate requests in a step before these are judged; default a fifth of promote_after.requests."""


def _steps(steps: tuple[int, ...]) -> tuple[int, ...]:
    """Percentages that only grow and end at 100."""
    if any(later <= earlier for earlier, later in zip(steps, steps[1:])):
        raise ValueError("must be increasing (each step a larger percent than the one before)")
    if steps[-1] != 100:
        raise ValueError("must end at 100")
    return steps


@dataclass(frozen=True, config=STRICT)
class CanaryConfig:
    """Traffic moved from `control` to `candidate` step by step, judged in each step, rolled back by itself."""

    control: RouteTarget
    """Where the traffic is today."""
    candidate: RouteTarget
    """Where it is going."""
    steps: Annotated[tuple[Annotated[int, Field(ge=1, le=100)], ...], Field(min_length=1),
                     WrapValidator(lambda value, handler: _steps(handler(value)))] = (5, 20, 50, 100)
    """Percent of requests to the candidate, step by step."""
    promote_after: PromoteAfter = PromoteAfter()
    rollback_if: RollbackIf = RollbackIf()

    @model_validator(mode="after")
    def _two_providers(self) -> Self:
        """A canary moves traffic between two providers."""
        if self.control.provider == self.candidate.provider:
            raise ValidationError.from_exception_data("config", [problem(
                ("candidate",), "must be another provider than control")])
        return self

    @cached_property
    def digest(self) -> str:
        """Names this canary's configuration: a change of any of it starts the canary again."""
        return hashlib.sha256(repr(self).encode()).hexdigest()[:16]

    @property
    def judged_from(self) -> int:
        """Candidate requests in a step from which rollback_if is judged."""
        return self.rollback_if.min_requests or max(1, self.promote_after.requests // 5)


@dataclass(frozen=True, config=STRICT)
class RuleWhen:
    """What a request must have for a rule to pick its model; every condition given must hold."""

    prompt_tokens_max: int | None = Field(default=None, ge=0)
    """The prompt's token bound (the one budgets reserve) is at most this."""
    tools: bool | None = None
    """The request does (true) or does not (false) offer tools or functions."""
    images: bool | None = None
    """The request does (true) or does not (false) carry images."""
    teams: tuple[str, ...] = ()
    """The caller's team is one of these."""
    tags: tuple[str, ...] = ()
    """The caller has one of these tags."""
    tier: str | None = None
    """The request's `x-gateway-tier` header is this value."""

    @property
    def always(self) -> bool:
        """True when the rule has no condition: it matches every request."""
        return self == _ALWAYS


_ALWAYS = RuleWhen()


@dataclass(frozen=True, config=STRICT)
class Rule:
    """A rule of an `auto` route: when its conditions hold, `model` serves the request."""

    model: str
    when: RuleWhen = RuleWhen()


@dataclass(frozen=True, config=STRICT)
class RouteSpec:
    """A route written as a mapping: exactly one of split, canary or rules."""

    split: Annotated[tuple[SplitTarget, ...], Field(min_length=1)] | None = None
    """Weighted choice among providers; the others stay failover targets, in the order listed."""
    sticky: Sticky = "none"
    """key: a caller keeps its arm; user: an end user (the request's `user`, else the key) keeps it."""
    canary: CanaryConfig | None = None
    rules: Annotated[tuple[Rule, ...], Field(min_length=1)] | None = None
    """First match wins; the last rule must have no `when` (the catch-all)."""

    @model_validator(mode="after")
    def _one_kind(self) -> Self:
        """One way of routing, and a catch-all rule last."""
        kinds = [name for name in ("split", "canary", "rules") if getattr(self, name) is not None]
        if len(kinds) != 1:
            raise _at((), "needs exactly one of split, canary or rules" + (f" (has {', '.join(kinds)})" if kinds else ""))
        if self.sticky != "none" and self.rules is not None:
            raise _at(("sticky",), "applies to split and canary routes only")
        if self.rules is not None and not self.rules[-1].when.always:
            raise _at(("rules", len(self.rules) - 1), "the last rule must have no `when`: it catches every request "
                                                      "the others do not")
        return self


@dataclass(frozen=True, config=STRICT)
class Route:
    """A model name or glob and how it is served: providers in failover order, with a split, canary or rules."""

    pattern: str
    targets: tuple[RouteTarget, ...]
    """Failover order (split: as listed; canary: control, candidate; rules: none)."""
    weights: tuple[int, ...] = ()
    """A split's weight per target."""
    sticky: Sticky = "none"
    canary: CanaryConfig | None = None
    rules: tuple[Rule, ...] = ()

    def matches(self, model: str) -> bool:
        """True when `model` is this route's name or matches its glob."""
        return model == self.pattern or fnmatch.fnmatchcase(model, self.pattern)

    @property
    def plain(self) -> bool:
        """True for a list of providers: no split, canary or rules."""
        return not self.weights and self.canary is None and not self.rules


def _route(pattern: str, form: list[RouteTarget] | RouteSpec) -> Route:
    """The route of one `routes` entry as the file wrote it."""
    if isinstance(form, list):
        return Route(pattern, tuple(form))
    if form.split is not None:
        targets = tuple(RouteTarget(arm.provider, arm.upstream_model) for arm in form.split)
        return Route(pattern, targets, tuple(arm.weight for arm in form.split), form.sticky)
    if form.canary is not None:
        return Route(pattern, (form.canary.control, form.canary.candidate), sticky=form.sticky, canary=form.canary)
    return Route(pattern, (), rules=form.rules or ())


def routes_of(routes: dict[str, list[RouteTarget] | RouteSpec]) -> tuple[Route, ...]:
    """Routes in file order."""
    return tuple(_route(pattern, form) for pattern, form in routes.items())


_LIST: TypeAdapter[list[RouteTarget]] = TypeAdapter(Annotated[list[RouteTarget], Field(min_length=1)])
_SPEC: TypeAdapter[RouteSpec] = TypeAdapter(RouteSpec)


def _route_form(value: Any, handler: Handler, info: ValidationInfo) -> Any:
    """A list of providers, or a mapping: validated as the one it is, so a mistake is reported once."""
    if isinstance(value, dict):
        return _SPEC.validate_python(value, context=info.context, by_name=False)
    return _LIST.validate_python(value, context=info.context, by_name=False)


class _ListOrSpec:
    """In the JSON Schema, a list is checked as a list and anything else as a mapping (if/then/else, not anyOf),
    so an editor points at the mistake inside the route rather than at the whole route."""

    @staticmethod
    def __get_pydantic_json_schema__(schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        listed, spec = handler(schema)["anyOf"]
        return {"if": {"type": "array"}, "then": listed, "else": spec}


RouteForm = Annotated[Any, WrapValidator(_route_form, json_schema_input_type=(
    Annotated[list[RouteTarget], Field(min_length=1)] | RouteSpec)), _ListOrSpec()]
"""One `routes` entry in a file."""


def _at(loc: tuple[str | int, ...], message: str) -> ValidationError:
    """A problem at `loc` of the value being validated, to raise."""
    return ValidationError.from_exception_data("config", [problem(loc, message)])
