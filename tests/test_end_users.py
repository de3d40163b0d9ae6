"""End users and sessions: read from the OpenAI `user` field or the x-gateway-user header, checked, ledgered,
grouped in the usage report, and scoped to the key that sent them."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import openai
import pytest

from gateway.domain.end_user import MAX_ID_CHARS, end_user
from gateway.errors import InvalidRequest
from gateway.http.appkeys import BUDGET
from tests.support.settings import ADMIN_KEY, CLIENT_KEY, OTHER_KEY, make_policy, make_settings

MESSAGES = [{"role": "user", "content": "Whose spend is this?"}]
POLICIES = (make_policy("global", usd="100"),)


async def grouped(http, gateway, key: str, group_by: str) -> dict[str | None, dict[str, Any]]:
    reply = await http(gateway, "GET", "/v1/budget/usage?" + urlencode({"group_by": group_by}), key=key)
    assert reply.status == 200, reply.body
    return {entry["group"]: entry for entry in reply.json()["data"]}


async def test_users_from_the_sdk_field_and_the_header_are_grouped_by_user_and_session(
        upstream, start_gateway, sdk, http, store_config):
    gateway = await start_gateway(make_settings({"primary": upstream.url}, store=store_config, policies=POLICIES))
    web, batch = sdk(gateway), sdk(gateway, key=OTHER_KEY)

    for _ in range(2):
        await web.chat.completions.create(model="gpt-4.1", messages=MESSAGES, user="alice",
                                          extra_headers={"x-gateway-session": "s-1"})
    # the header wins over the body's field
    await web.chat.completions.create(model="gpt-4.1", messages=MESSAGES, user="alice",
                                      extra_headers={"x-gateway-user": "bob", "x-gateway-session": "s-2"})
    await web.chat.completions.create(model="gpt-4.1", messages=MESSAGES)
    await batch.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, user="carol")
    await gateway.app[BUDGET].settled()

    users = await grouped(http, gateway, ADMIN_KEY, "user")
    assert {user: row["requests"] for user, row in users.items()} == {"alice": 2, "bob": 1, None: 1, "carol": 1}
    sessions = await grouped(http, gateway, ADMIN_KEY, "session")
    assert {session: row["requests"] for session, row in sessions.items()} == {"s-1": 2, "s-2": 1, None: 2}
    assert sum(int(row["prompt_tokens"]) for row in users.values()) > 0

    # a key sees only its own end users (and sessions)
    assert set(await grouped(http, gateway, CLIENT_KEY, "user")) == {"alice", "bob", None}
    assert set(await grouped(http, gateway, OTHER_KEY, "user")) == {"carol"}
    assert set(await grouped(http, gateway, OTHER_KEY, "session")) == {None}


@pytest.mark.parametrize("field, headers, param", [
    ({"user": "x" * (MAX_ID_CHARS + 1)}, {}, "user"),
    ({"user": 42}, {}, "user"),
    ({"user": "tab\there"}, {}, "user"),
    ({}, {"x-gateway-user": "y" * (MAX_ID_CHARS + 1)}, "x-gateway-user"),
    ({}, {"x-gateway-session": "z" * (MAX_ID_CHARS + 1)}, "x-gateway-session"),
])
async def test_an_end_user_or_session_that_is_too_long_or_not_printable_is_a_400(
        upstream, start_gateway, http, field, headers, param):
    gateway = await start_gateway(make_settings({"primary": upstream.url}, policies=POLICIES))
    body = {"model": "gpt-4.1", "messages": MESSAGES, **field}
    reply = await http(gateway, "POST", "/v1/chat/completions", json=body, headers=headers)
    assert reply.status == 400
    error = reply.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert upstream.hits == 0


async def test_the_sdk_gets_a_bad_request_error_for_a_bad_user(upstream, start_gateway, sdk):
    gateway = await start_gateway(make_settings({"primary": upstream.url}, policies=POLICIES))
    with pytest.raises(openai.BadRequestError, match="printable"):
        await sdk(gateway).chat.completions.create(model="gpt-4.1", messages=MESSAGES, user="a\x00b")


def test_the_messages_api_names_its_end_user_in_metadata_and_the_header_still_wins():
    assert end_user({"metadata": {"user_id": "ann"}}, None, messages=True) == "ann"
    assert end_user({"metadata": {"user_id": "ann"}}, "hdr", messages=True) == "hdr"
    assert end_user({"user": "not-read-here"}, None, messages=True) is None
    with pytest.raises(InvalidRequest, match="metadata.user_id"):
        end_user({"metadata": {"user_id": 7}}, None, messages=True)
