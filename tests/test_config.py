"""Config loading: every validation rule has a fixture named after the mistake it catches."""

from __future__ import annotations

import fnmatch
import hashlib
import itertools
import random
import shutil
from decimal import Decimal
from pathlib import Path

import pytest

from gateway.config.globs import globs_overlap
from gateway.config.interpolate import interpolate
from gateway.config.loader import load_settings, startup_line, summarize
from gateway.config.model import RouteTarget, Settings
from gateway.errors import ConfigError
from gateway.http.auth import key_digest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "config"
PROVIDER_ENV = {"HOLYSHEEP_API_KEY": "sk-holy", "OPENAI_API_KEY": "sk-open"}
CLIENT_ENV = {"WEB_APP_KEY": "web-secret", "BATCH_JOBS_KEY": "batch-secret"}
MINIMAL = """\
providers:
  mock:
    base_url: http://127.0.0.1:9000/v1
    api_key: ${MOCK_API_KEY:-sk-mock}
routes:
  gpt-4.1: [mock]
pricing:
  gpt-4.1: {input: 2.00, output: 8.00}
"""


def load_fixture(name: str, monkeypatch: pytest.MonkeyPatch, env: dict[str, str] | None = None) -> Settings:
    """Load a fixture's config.yaml from inside its directory, so messages name files as a user would."""
    monkeypatch.chdir(FIXTURES / name)
    return load_settings("config.yaml", env=env or {})


def fixture_issues(name: str, monkeypatch: pytest.MonkeyPatch, env: dict[str, str] | None = None) -> list[str]:
    """Every issue a broken fixture raises, as `file: path: message` lines."""
    with pytest.raises(ConfigError) as caught:
        load_fixture(name, monkeypatch, env)
    return [str(issue) for issue in caught.value.issues]


def write_config(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    """A config file in tmp_path."""
    path = tmp_path / name
    path.write_text(text)
    return path


# --- the shipped files -------------------------------------------------------------------------------------

def test_shipped_config_loads_with_provider_and_client_keys_from_env() -> None:
    settings = load_settings(REPO / "config.yaml", env={**PROVIDER_ENV, **CLIENT_ENV})
    assert list(settings.providers) == ["holysheep", "openai"]
    assert settings.providers["holysheep"].base_url == "https://api.holysheep.ai/v1"
    assert settings.providers["openai"].api_key == "sk-open"
    assert settings.store.url is None
    assert settings.keys[0].sha256 == hashlib.sha256(b"web-secret").hexdigest()
    assert settings.route_for("claude-sonnet-4.5").targets[1] == RouteTarget("openai", "gpt-4.1")
    assert {policy.name for policy in settings.policies} == {"global", "team-web", "team-data"}


def test_demo_config_loads_with_an_empty_environment() -> None:
    settings = load_settings(REPO / "demo.yaml", env={})
    assert settings.server.auth == "none"
    assert settings.providers["mock"].base_url == "http://127.0.0.1:9000/v1"
    assert {route.pattern for route in settings.routes} == set(settings.pricing)
    teams = {name: settings.key_index[key_digest(name)].identity.team for name in ("demo-web-key", "demo-batch-key")}
    assert teams == {"demo-web-key": "web", "demo-batch-key": "data"}   # the demo's team policies can match


def test_shipped_prices_are_exact_decimals() -> None:
    prices = load_settings(REPO / "demo.yaml", env={}).pricing
    assert prices["gpt-4o-mini"].cached_input == Decimal("0.075")
    assert prices["gpt-4.1"].input == Decimal("2.00")
    assert prices["deepseek-v3.2"].output == Decimal("0.42")
    assert len(prices) >= 9


def test_shipped_team_policy_downgrades_to_a_priced_model() -> None:
    settings = load_settings(REPO / "demo.yaml", env={})
    web = next(policy for policy in settings.policies if policy.name == "team-web")
    assert (web.on_exceed, web.downgrade_to) == ("downgrade", "gpt-4o-mini")
    assert web.budgets[0].requests is not None
    assert web.source == str(REPO / "policies" / "teams.yaml")


# --- one fixture per mistake ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("fixture", "expected"), [
    ("missing_env_var", "config.yaml: providers.mock.api_key: environment variable MOCK_KEY_NOT_SET is not set"),
    ("port_not_integer", "config.yaml: server.port: must be an integer"),
    ("port_out_of_range", "config.yaml: server.port: must be between 0 and 65535"),
    ("header_timeout_not_positive", "config.yaml: server.header_timeout_s: must be > 0"),
    ("header_timeout_not_positive", "config.yaml: server.keepalive_timeout_s: must be > 0"),
    ("header_timeout_not_positive", "config.yaml: server.shutdown_grace_s: must be >= 0"),
    ("connection_cap_zero", "config.yaml: server.max_connections: must be >= 1"),
    ("base_url_not_http", "config.yaml: providers.mock.base_url: must be an http(s) URL"),
    ("max_response_bytes_too_small", "config.yaml: providers.mock.max_response_bytes: must be >= 1024"),
    ("route_unknown_provider", "config.yaml: routes.gpt-4.1[1]: unknown provider 'nope'"),
    ("route_split_weight_not_positive", "config.yaml: routes.gpt-4.1.split[1].weight: must be > 0"),
    ("route_split_unknown_provider", "config.yaml: routes.gpt-4.1.split[1]: unknown provider 'nope'"),
    ("route_canary_steps_not_increasing", "config.yaml: routes.gpt-4.1.canary.steps: must be increasing (each step "
                                          "a larger percent than the one before)"),
    ("route_canary_steps_not_ending_at_100", "config.yaml: routes.gpt-4.1.canary.steps: must end at 100"),
    ("route_canary_on_a_glob", "config.yaml: routes.gpt-4*: a canary route must name one model, not a glob"),
    ("route_two_kinds", "config.yaml: routes.gpt-4.1: needs exactly one of split, canary or rules (has split, rules)"),
    ("route_rules_last_not_catch_all", "config.yaml: routes.auto.rules[1]: the last rule must have no `when`: it "
                                       "catches every request the others do not"),
    ("route_rule_model_unpriced", "config.yaml: routes.auto.rules[0].model: model 'deepseek-v3.2' has no price: a "
                                  "rule's model is what the request is charged"),
    ("route_rule_model_unrouted", "config.yaml: routes.auto.rules[0].model: no route serves model 'gpt-4o-mini'"),
    ("route_provider_twice",
     "config.yaml: routes.gpt-4.1[1].provider: provider 'mock' is already listed at routes.gpt-4.1[0]"),
    ("route_model_unpriced", "config.yaml: routes.gpt-4o: model 'gpt-4o' has no price"),
    ("route_target_unpriced", "config.yaml: routes.gpt-4o: model 'gpt-4o' has no price for provider 'backup': "
                              "every target of a route needs one (its upstream model's, else the client model's)"),
    ("auth_none_public_host", "config.yaml: server.auth: 'none' is only allowed when server.host is a loopback "
                              "address (127.0.0.0/8, ::1, localhost)"),
    ("key_digest_invalid", "config.yaml: keys[0].sha256: must be a SHA-256 hex digest (64 hex characters)"),
    ("key_duplicate_name", "config.yaml: keys[1].name: duplicate key name 'web-app' (also at keys[0].name)"),
    ("key_duplicate_digest", "config.yaml: keys[1]: same key as keys[0]"),
    ("key_env_missing", "config.yaml: keys[0].key_env: environment variable WEB_APP_KEY is not set"),
    ("pricing_file_missing", "config.yaml: pricing: file not found: prices.yaml"),
    ("price_negative", "pricing.yaml: models.gpt-4.1.input: must be >= 0"),
    ("yaml_syntax_error",
     "config.yaml: invalid YAML at line 9, column 3: expected the node content, but found '-'"),
    ("yaml_duplicate_key", "config.yaml: invalid YAML at line 8, column 1: duplicate key 'routes'"),
    ("policy_negative_limit", "policies/team.yaml: budgets[0].usd: must be >= 0"),
    ("policy_duplicate_name",
     "policies/b.yaml: policies[0].name: duplicate policy name 'web' (also in policies/a.yaml)"),
    ("policy_unknown_timezone",
     "policies/team.yaml: timezone: unknown time zone: must be an IANA name such as UTC or Europe/Paris"),
    ("policy_unknown_key", "policies/team.yaml: on_exceeded: unknown key; did you mean 'on_exceed'?"),
    ("policy_budgets_misspelled", "policies/team.yaml: budgts: unknown key; did you mean 'budgets'?"),
    ("policy_match_unknown_team", "policies/team.yaml: match.teams[0]: no key has team 'wbe', so the policy can "
                                  "never match; did you mean 'web'?"),
    ("policy_match_unknown_key_name", "policies/team.yaml: match.keys[0]: no key is named 'web-ap', so the policy "
                                      "can never match; did you mean 'web-app'?"),
    ("policy_match_unknown_tag", "policies/team.yaml: match.tags[0]: no key has tag 'prdo', so the policy can "
                                 "never match; did you mean 'prod'?"),
    ("policy_match_model_unrouted", "policies/team.yaml: match.models[0]: no route serves a model matching 'gpt4*', "
                                    "so the policy can never match; did you mean 'gpt-4*'?"),
    ("policy_match_model_rules_route", "policies/team.yaml: match.models[0]: no route serves a model matching "
                                       "'auto', so the policy can never match"),
    ("policy_match_model_unpriced_glob",
     "policies/team.yaml: match.models[0]: no route serves a model matching 'claude-opus-*', so the policy can "
     "never match; did you mean 'claude-*'?"),
    ("policy_file_empty", "policies/team.yaml: file is empty"),
    ("policy_file_truncated", "policies/team.yaml: policies[0].budgets[0].period: must be one of: daily, monthly"),
    ("policy_period_twice", "policies/team.yaml: budgets[1].period: daily budget already set at budgets[0]"),
    ("policy_budget_without_limit",
     "policies/team.yaml: budgets[0]: needs at least one limit: usd, tokens or requests"),
    ("policy_downgrade_unpriced", "policies/team.yaml: on_exceed.downgrade: model 'gpt-4o-mini' has no price"),
    ("cache_model_unrouted", "config.yaml: cache.models[1]: no route serves a model matching 'gpt4o*', so nothing "
                             "is cached by it; did you mean 'gpt-4o*'?"),
    ("cache_scope_unknown", "config.yaml: cache.scope: must be one of: key, team, global"),
    ("cache_entry_over_max_bytes", "config.yaml: cache.max_entry_bytes: must be <= max_bytes"),
    ("policy_rate_limit_without_per", "policies/team.yaml: rate_limits[0].per: is required"),
    ("policy_rate_limit_zero", "policies/team.yaml: rate_limits[0].requests: must be >= 1"),
    ("policy_rate_window_twice",
     "policies/team.yaml: rate_limits[1].per: a per-minute limit is already set at rate_limits[0]"),
    ("policy_max_concurrent_zero", "policies/team.yaml: max_concurrent: must be >= 1"),
    ("policy_each_unknown", "policies/team.yaml: each: must be one of: key, team, model, user"),
    ("policy_forecast_alert_without_webhook",
     "policies/team.yaml: forecast_alert: needs budgets and alerts.webhook to send it to"),
    ("policy_without_user_unknown", "policies/team.yaml: without_user: must be one of: refuse, anonymous"),
    ("policy_limits_nothing", "policies/team.yaml: needs at least one of: budgets, rate_limits, max_concurrent"),
    ("provider_rate_limit_without_limit",
     "config.yaml: providers.mock.rate_limits[0]: needs at least one limit: requests or tokens"),
])
def test_mistake_is_reported_with_file_and_key_path(fixture: str, expected: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    assert expected in fixture_issues(fixture, monkeypatch)


def test_unknown_keys_are_reported_at_every_level(monkeypatch: pytest.MonkeyPatch) -> None:
    assert fixture_issues("unknown_key", monkeypatch) == [
        "config.yaml: server.hots: unknown key; did you mean 'host'?",
        "config.yaml: providers.mock.timeouts.conect_s: unknown key; did you mean 'connect_s'?",
        "config.yaml: routes.gpt-4.1[0].modle: unknown key; did you mean 'model'?",
        "config.yaml: pricing.gpt-4.1.cached: unknown key; did you mean 'cached_input'?",
        "config.yaml: rate_limits: unknown key",   # nothing close: no guess
    ]


def test_every_problem_is_reported_not_just_the_first(monkeypatch: pytest.MonkeyPatch) -> None:
    assert sorted(fixture_issues("many_mistakes", monkeypatch)) == sorted([
        "config.yaml: server.colour: unknown key",
        "config.yaml: server.port: must be an integer",
        "config.yaml: providers.mock.base_url: must be an http(s) URL",
        "config.yaml: pricing.gpt-4.1.input: must be >= 0",
        "config.yaml: routes.gpt-4.1[1]: unknown provider 'nope'",
    ])


def test_a_misshapen_file_stops_after_pass_one(monkeypatch: pytest.MonkeyPatch) -> None:
    assert fixture_issues("wrong_shape", monkeypatch) == [
        "config.yaml: providers: must be a mapping",
        "config.yaml: routes.gpt-4.1: must be a list",
    ]


def test_admin_key_and_its_digest_together_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    issues = fixture_issues("admin_key_twice", monkeypatch, env={"ADMIN_KEY": "s3cret"})
    assert issues == ["config.yaml: server.admin_key: set admin_key or admin_key_sha256, not both"]


def test_store_url_must_be_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    issues = fixture_issues("store_url_not_redis", monkeypatch, env={"STORE_URL": "http://cache:6379"})
    assert issues == ["config.yaml: store.url: must be a redis://, rediss://, redis+cluster:// or "
                      "redis+sentinel:// URL, or empty"]


def test_glob_routes_and_unpriced_upstream_models_are_fine(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_fixture("glob_and_upstream_unpriced_ok", monkeypatch)
    assert settings.route_for("gpt-4.1").targets[1] == RouteTarget("backup", "my-gpt-4.1-deployment")
    assert settings.route_for("claude-opus-4").pattern == "claude-*"


def test_a_policy_may_match_every_caller_and_model_that_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    web, models = load_fixture("policy_match_names_that_exist_ok", monkeypatch).policies
    assert (web.match.keys, web.match.teams, web.match.tags) == (("web-app", "admin"), ("web",), ("eu",))
    assert models.match.models == ("gpt-4.1", "gpt-*", "gemini-2.5-*", "claude-opus-*", "[cg]*")


def test_the_caller_without_a_key_is_matchable_only_under_auth_none(tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    write_config(tmp_path, "name: p\nmatch: {keys: [local]}\nbudgets: [{period: daily, usd: 1}]\n",
                 "policies/p.yaml")
    open_config = write_config(tmp_path, "server: {auth: none}\n" + MINIMAL)
    assert load_settings(open_config, env={}).policies[0].match.keys == ("local",)
    with pytest.raises(ConfigError, match="no key is named 'local'"):
        load_settings(write_config(tmp_path, MINIMAL), env={})


GLOB_TOKENS = ("a", "-", "*", "?", "[ab]", "[!a]", "[a-d]", "[!a-bd]", "[", "[!-z]")


def test_model_globs_overlap_exactly_when_some_name_matches_both() -> None:
    globs = ["".join(tokens) for size in range(4) for tokens in itertools.product(GLOB_TOKENS, repeat=size)]
    globs = globs[:111] + random.Random(7).sample(globs[111:], 60)   # all of up to two tokens, some of three
    # a shortest name two such globs share has at most 4 characters: these names hold it if there is one
    names = ["".join(chars) for size in range(5) for chars in itertools.product("abcd-[z", repeat=size)]
    matched = {glob: {name for name in names if fnmatch.fnmatchcase(name, glob)} for glob in globs}
    for first, second in itertools.product(globs, repeat=2):
        assert globs_overlap(first, second) == bool(matched[first] & matched[second]), (first, second)


# --- interpolation and secrets -----------------------------------------------------------------------------

def test_interpolation_uses_defaults_and_names_missing_variables() -> None:
    assert interpolate("${A}/${B:-x}/${C:-}", {"A": "1", "B": ""}) == ("1/x/", [])
    assert interpolate("${NOPE}-${NOPE}", {}) == ("-", ["NOPE"])


def test_a_secret_with_yaml_syntax_is_taken_literally(tmp_path: Path) -> None:
    secret = "a: [b, {c: d}] # ${NOT_A_REF} '\"\n- e"
    settings = load_settings(write_config(tmp_path, MINIMAL), env={"MOCK_API_KEY": secret})
    assert settings.providers["mock"].api_key == secret


def test_error_text_never_contains_an_environment_secret(tmp_path: Path) -> None:
    secrets = {
        "ADMIN": "adm1n-s3cret", "STORE": "http://user:redis-s3cret@cache:6379", "URL": "ftp://u:url-s3cret@x",
        "PORT": "port-s3cret", "PROVIDER": "provider-s3cret", "KEY": "key-s3cret", "TZ_SECRET": "tz-s3cret",
    }
    config = write_config(tmp_path, f"""\
server: {{host: 0.0.0.0, auth: none, port: "${{PORT}}", admin_key: "${{ADMIN}}", admin_key_sha256: "${{ADMIN}}"}}
store: {{url: "${{STORE}}"}}
providers:
  mock: {{base_url: "${{URL}}", api_key: "${{KEY}}", headers: {{X-Key: "${{KEY}}"}}}}
routes:
  gpt-4.1: ["${{PROVIDER}}", mock, "${{PROVIDER}}"]
pricing: {{gpt-4.1: {{input: 2, output: 8}}}}
keys: [{{name: "${{KEY}}", key_env: KEY}}, {{name: a, sha256: "${{KEY}}"}}]
""")
    (tmp_path / "policies").mkdir()
    write_config(tmp_path, 'name: p\nbudgets: [{period: daily, usd: 1}]\ntimezone: "${TZ_SECRET}"\n'
                           'on_exceed: {downgrade: "${PROVIDER}"}\n', "policies/p.yaml")
    with pytest.raises(ConfigError) as caught:
        load_settings(config, env=secrets)
    text = str(caught.value)
    assert len(caught.value.issues) >= 8
    assert not [value for value in secrets.values() if value in text]


def test_summaries_never_show_secrets(tmp_path: Path) -> None:
    env = {**PROVIDER_ENV, **CLIENT_ENV, "GATEWAY_ADMIN_KEY": "adm1n-s3cret",
           "GATEWAY_REDIS_URL": "redis://default:redis-s3cret@cache.internal:6379/0"}
    settings = load_settings(REPO / "config.yaml", env=env)
    line, summary = startup_line(settings), summarize(settings)
    assert "store: redis (cache.internal:6379)" in line
    assert not [value for value in env.values() if value in line + summary]


@pytest.mark.parametrize(("server", "metrics"), [
    ("{host: 0.0.0.0}", "/metrics: public (no metrics_key set)"),
    ("{host: '::'}", "/metrics: public (no metrics_key set)"),
    ("{host: 0.0.0.0, metrics_key: m3trics}", "/metrics: needs metrics_key"),
    ("{host: 127.0.0.1}", "/metrics: loopback only"),
    ("{host: localhost}", "/metrics: loopback only"),
])
def test_the_startup_line_and_summary_say_who_may_read_metrics(tmp_path: Path, server: str, metrics: str) -> None:
    settings = load_settings(write_config(tmp_path, f"server: {server}\n" + MINIMAL), env={})
    assert startup_line(settings).endswith(f"; {metrics}")
    assert summarize(settings).splitlines()[0].endswith(f", {metrics}")


# --- decoding details ----------------------------------------------------------------------------------------

def test_floats_are_exact_decimals(tmp_path: Path) -> None:
    text = MINIMAL.replace("{input: 2.00, output: 8.00}", "{input: 0.1, output: 0.30000000000000004}")
    price = load_settings(write_config(tmp_path, text), env={}).pricing["gpt-4.1"]
    assert (price.input, price.output) == (Decimal("0.1"), Decimal("0.30000000000000004"))


def test_empty_store_url_means_embedded_and_paths_follow_the_config_dir(tmp_path: Path) -> None:
    text = 'store: {url: "${GATEWAY_REDIS_URL:-}", path: state/gw.db}\n' + MINIMAL
    store = load_settings(write_config(tmp_path, text), env={"GATEWAY_REDIS_URL": ""}).store
    assert store.url is None
    assert store.path == str(tmp_path / "state" / "gw.db")


def test_max_response_bytes_defaults_to_32_mib_and_can_be_set(tmp_path: Path) -> None:
    assert load_settings(write_config(tmp_path, MINIMAL), env={}).providers["mock"].max_response_bytes == 32 << 20
    text = MINIMAL.replace("    api_key:", "    max_response_bytes: 1048576\n    api_key:")
    assert load_settings(write_config(tmp_path, text), env={}).providers["mock"].max_response_bytes == 1 << 20


def test_admin_key_from_env_is_kept_only_as_its_digest(tmp_path: Path) -> None:
    text = 'server: {admin_key: "${GATEWAY_ADMIN_KEY:-}"}\n' + MINIMAL
    server = load_settings(write_config(tmp_path, text), env={"GATEWAY_ADMIN_KEY": "open-sesame"}).server
    assert server.admin_key_sha256 == hashlib.sha256(b"open-sesame").hexdigest()


def test_numbers_from_the_environment_are_decoded(tmp_path: Path) -> None:
    text = 'server: {port: "${PORT:-8080}", access_log: "${LOG:-false}"}\n' + MINIMAL
    server = load_settings(write_config(tmp_path, text), env={"PORT": "9090"}).server
    assert (server.port, server.access_log) == (9090, False)


def test_policies_listed_as_files_keep_their_order_and_source(tmp_path: Path) -> None:
    for name in ("b", "a"):
        write_config(tmp_path, f"name: {name}\nbudgets: [{{period: monthly, tokens: 5}}]\n", f"{name}.yaml")
    settings = load_settings(write_config(tmp_path, MINIMAL + "policies: [b.yaml, a.yaml]\n"), env={})
    assert [(policy.name, Path(policy.source).name) for policy in settings.policies] == [("b", "b.yaml"),
                                                                                          ("a", "a.yaml")]
    assert str(tmp_path / "a.yaml") in settings.source_files


def test_a_missing_policies_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="policies: directory not found"):
        load_settings(write_config(tmp_path, MINIMAL + "policies: team-policies\n"), env={})


def test_a_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml: file not found"):
        load_settings(tmp_path / "nope.yaml", env={})


def test_a_copied_demo_resolves_pricing_and_policies_beside_it(tmp_path: Path) -> None:
    for name in ("demo.yaml", "pricing.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "policies", tmp_path / "policies")
    settings = load_settings(tmp_path / "demo.yaml", env={})
    assert len(settings.source_files) == 4
    assert all(path.startswith(str(tmp_path)) for path in settings.source_files)
