"""The published JSON Schema of each config file kind, made from the models (`gateway schema`).

Editors validate and complete `config.yaml`, `pricing.yaml` and `policies/*.yaml` with it. Every string
is resolved before validation, so where a number, a boolean, a choice or a patterned string is expected
the schema also takes a string holding a `${VAR}` reference: what it resolves to is checked at load.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any

from pydantic import TypeAdapter
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from gateway.config.model import Policy, PolicyList, PricingFile, Settings

__all__ = ["KINDS", "schema_of", "schema_text"]

KINDS: dict[str, Any] = {"config": Settings, "policy": Policy | PolicyList, "pricing": PricingFile}
_TITLES = {"config": "gateway config.yaml", "policy": "gateway policy file", "pricing": "gateway pricing file"}
_REFERENCE = {"type": "string", "pattern": r"\$\{[A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?\}",
              "description": "a ${VAR} or ${VAR:-default} reference, checked once resolved"}


class _FileSchema(GenerateJsonSchema):
    """pydantic's schema, where values that a `${VAR}` string may stand for also take one; no generated titles."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False

    def int_schema(self, schema: core_schema.IntSchema) -> JsonSchemaValue:
        return _or_reference(super().int_schema(schema))

    def float_schema(self, schema: core_schema.FloatSchema) -> JsonSchemaValue:
        return _or_reference(super().float_schema(schema))

    def decimal_schema(self, schema: core_schema.DecimalSchema) -> JsonSchemaValue:
        # pydantic also allows any string for a decimal: a number (or a reference) is what files hold
        branches = [branch for branch in super().decimal_schema(schema)["anyOf"] if branch != {"type": "string"}]
        return branches[0] if len(branches) == 1 else {"anyOf": branches}

    def bool_schema(self, schema: core_schema.BoolSchema) -> JsonSchemaValue:
        return _or_reference(super().bool_schema(schema))

    def literal_schema(self, schema: core_schema.LiteralSchema) -> JsonSchemaValue:
        return _or_reference(super().literal_schema(schema))

    def str_schema(self, schema: core_schema.StringSchema) -> JsonSchemaValue:
        plain = super().str_schema(schema)
        return _or_reference(plain) if "pattern" in plain else plain


def _or_reference(schema: JsonSchemaValue) -> JsonSchemaValue:
    """`schema`, or a string with a reference."""
    return {"anyOf": [schema, _REFERENCE]}


@cache
def schema_of(kind: str) -> dict[str, Any]:
    """The JSON Schema of one kind of file: config, policy or pricing."""
    schema = TypeAdapter(KINDS[kind]).json_schema(schema_generator=_FileSchema)
    if kind == "policy":   # as the loader tells them apart: by the `policies` key
        one, many = schema.pop("anyOf")
        schema |= {"type": "object", "if": {"required": ["policies"]}, "then": many, "else": one}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema, "title": _TITLES[kind]}


def schema_text(kind: str) -> str:
    """The schema as `gateway schema` prints it and the repository ships it."""
    return json.dumps(schema_of(kind), indent=2, sort_keys=True) + "\n"
