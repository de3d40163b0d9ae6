"""Load config.yaml, and the pricing and policy files it names, into frozen `Settings`.

Each file is read as exact YAML, its `${VAR}` references resolved from `env` (the only place the gateway
reads the environment), then validated against the models of `gateway.config.model`; the rules across
sections and files follow (`gateway.config.checks`). Every problem of every file is collected and raised
as one ConfigError, each naming the file and the key path. As in envoy's ratelimit, a value of the wrong
shape (a list where a mapping belongs) is reported alone: what it holds is not checked.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from gateway.config.base import FileContext
from gateway.config.checks import Loaded, PolicyAt, check
from gateway.config.document import Doc
from gateway.config.interpolate import Loc, resolve
from gateway.config.issues import found_in, is_shape
from gateway.config.model import CacheConfig, Keys, Policy, PolicyList, PricingFile, Routes, ServerConfig, Settings
from gateway.config.reach import Prices
from gateway.config.schema import schema_of
from gateway.config.summary import startup_line, summarize
from gateway.config.yamlfile import read_yaml
from gateway.errors import ConfigError, ConfigIssue

__all__ = ["load_settings", "summarize", "startup_line"]

_DEFAULT_POLICY_DIR = "policies"
_ADAPTERS: dict[Any, TypeAdapter[Any]] = {
    kind: TypeAdapter(kind)
    for kind in (Settings, PricingFile, Policy, PolicyList, ServerConfig, Keys, Routes, CacheConfig)
}


def load_settings(path: str | Path, env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate the config at `path`; raise ConfigError listing every problem found."""
    config = Path(path)
    loading = _Loading(config.parent, FileContext(config.absolute().parent, os.environ if env is None else env))
    settings = loading.load(config, str(path))
    if settings is None or loading.issues:
        raise ConfigError(sorted(loading.issues, key=lambda issue: issue.file != str(path)))   # config.yaml's first
    return settings


@dataclass
class _Loading:
    """One load in progress: where relative paths start, the environment, every issue and file read."""

    display_dir: Path
    context: FileContext
    issues: list[ConfigIssue] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def load(self, config: Path, display: str) -> Settings | None:
        """config.yaml and the files it names."""
        doc = self.read(config, display)
        if doc is None:
            return None
        data = dict(doc.data) if isinstance(doc.data, dict) else doc.data
        prices = self.pricing(doc, data) if isinstance(data, dict) else None
        policies = self.policies(doc, data) if isinstance(data, dict) else []
        settings, misshapen = self.validate(doc, Settings, data, "config")
        if misshapen:
            self.issues[:] = [issue for issue in self.issues if issue.file == doc.file]
            return None
        check(Loaded(
            config=doc, server=self.section(ServerConfig, data.get("server", {})),
            keys=self.section(Keys, data.get("keys", ())), routes=self.section(Routes, data.get("routes")),
            providers=_names(data.get("providers")), prices=prices, policies=policies,
            cache=self.section(CacheConfig, data.get("cache", {})),
        ))
        return None if settings is None else dataclasses.replace(settings, source_files=tuple(self.files))

    def read(self, path: Path, display: str) -> Doc | None:
        """A file's data with its references resolved; None after reporting why it cannot be used."""
        doc = Doc(display, self.issues)
        value, why = read_yaml(path)
        if why is not None:
            doc.report((), why)
            return None
        self.files.append(str(path.absolute()))
        resolved = resolve(value, self.context.env)
        for loc, names in resolved.missing.items():
            for name in names:
                doc.report(loc, f"environment variable {name} is not set")
        doc.data, doc.from_env, doc.unset = resolved.value, resolved.from_env, set(resolved.missing)
        return doc

    def validate(self, doc: Doc, kind: Any, data: Any, schema: str) -> tuple[Any, bool]:
        """`data` validated as `kind`, or None after reporting why; and whether some value had the wrong shape."""
        try:
            return _ADAPTERS[kind].validate_python(data, context=self.context, by_name=False), False
        except ValidationError as exc:
            found = found_in(exc, schema_of(schema))
        misshapen = any(is_shape(message) for _, message in found)
        for loc, message in found:
            if not misshapen or is_shape(message) or message.startswith("unknown key"):
                doc.report(loc, message)
        return None, misshapen

    def section(self, kind: Any, data: Any) -> Any:
        """One section validated alone for the cross rules; None when it has a mistake (reported already)."""
        try:
            return _ADAPTERS[kind].validate_python(data, context=self.context, by_name=False)
        except ValidationError:
            return None

    def pricing(self, doc: Doc, data: dict[str, Any]) -> Prices:
        """The priced model names; the file `pricing` names is read and its prices put in its place."""
        value = data.get("pricing")
        if not isinstance(value, str):
            return _names(value)
        data["pricing"] = {}
        located = self.existing_file(doc, ("pricing",), value)
        prices = self.read(*located) if located else None
        if prices is None:
            return None
        parsed, _ = self.validate(prices, PricingFile, prices.data, "pricing")
        if parsed is not None:
            data["pricing"] = parsed.models
        return _names(prices.data.get("models")) if isinstance(prices.data, dict) else None

    def policies(self, doc: Doc, data: dict[str, Any]) -> list[PolicyAt]:
        """Every policy in the policy files, put in place of the `policies` key."""
        found = []
        for path, display in self.policy_files(doc, data.get("policies")):
            policy_doc = self.read(path, display)
            if policy_doc is not None:
                found += self.policies_in(policy_doc)
        data["policies"] = tuple(at.policy for at in found)
        return found

    def policies_in(self, doc: Doc) -> list[PolicyAt]:
        """The policies of one file: the file itself, or the items of its `policies` list."""
        many = isinstance(doc.data, dict) and "policies" in doc.data
        parsed, _ = self.validate(doc, PolicyList if many else Policy, doc.data, "policy")
        if parsed is None:
            return []
        policies: tuple[Policy, ...] = parsed.policies if many else (parsed,)
        return [PolicyAt(doc, ("policies", index) if many else (), dataclasses.replace(policy, source=doc.file))
                for index, policy in enumerate(policies)]

    def policy_files(self, doc: Doc, value: Any) -> list[tuple[Path, str]]:
        """The listed files, or the *.yaml files of the directory (default `policies`, if it exists)."""
        if isinstance(value, list):
            listed = [self.existing_file(doc, ("policies", index), item) for index, item in enumerate(value)]
            return [located for located in listed if located]
        if value is None:
            path, display = self.locate(_DEFAULT_POLICY_DIR)
            return _yaml_files_in(path, display) if path.is_dir() else []
        if not isinstance(value, str):
            doc.report(("policies",), "must be a directory or a list of files")
            return []
        path, display = self.locate(value)
        if not path.is_dir():
            doc.report(("policies",), f"directory not found: {display}")
            return []
        return _yaml_files_in(path, display)

    def existing_file(self, doc: Doc, loc: Loc, relative: Any) -> tuple[Path, str] | None:
        """The file a value names, or None after reporting that it is not there."""
        if not isinstance(relative, str):
            doc.report(loc, "must be a string")
            return None
        path, display = self.locate(relative)
        if not path.is_file():
            doc.report(loc, f"file not found: {display}")
            return None
        return path, display

    def locate(self, relative: str) -> tuple[Path, str]:
        """Where `relative` (to the config file's directory) is on disk, and how messages name it."""
        return self.context.base_dir / relative, str(self.display_dir / relative)


def _names(mapping: Any) -> frozenset[str] | None:
    """The keys of a mapping, or None when it is not one."""
    return frozenset(mapping) if isinstance(mapping, dict) else None


def _yaml_files_in(directory: Path, display: str) -> list[tuple[Path, str]]:
    """The directory's *.yaml files, sorted by name."""
    return [(path, str(Path(display) / path.name)) for path in sorted(directory.glob("*.yaml")) if path.is_file()]
