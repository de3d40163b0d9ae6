"""The served model is the model: a downgraded request is logged, ledgered and counted under the model that
served it, with the requested model kept beside it and a header that says it was downgraded.
"""

from __future__ import annotations

from decimal import Decimal
from urllib.parse import urlencode

import orjson
import pytest

from gateway.domain.pricing import Usage, cost_nano, nano_to_usd
from gateway.http.appkeys import BUDGET
from tests.support.metrics import RecordingLog, scrape, total, value
from tests.support.settings import ADMIN_KEY, PRICES, make_policy, make_settings

CHAT = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "serve me something cheaper"}], "max_tokens": 9}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_downgraded_request_appears_under_the_model_that_served_it(
        upstream, start_gateway, http, store_config, stream: bool) -> None:
    policies = (make_policy("global", usd="10"),        # what holds (and ledgers) the downgraded request
                make_policy("web-gpt41", requests=1, models=("gpt-4.1",), downgrade_to="gpt-4o-mini"))
    log = RecordingLog()
    gateway = await start_gateway(make_settings({"primary": upstream.url}, store=store_config, policies=policies),
                                  access_log=log)
    assert (await http(gateway, "POST", "/v1/chat/completions", json=CHAT)).status == 200

    reply = await http(gateway, "POST", "/v1/chat/completions", json={**CHAT, "stream": stream})

    assert reply.status == 200 and upstream.requests[-1].json["model"] == "gpt-4o-mini"
    assert reply.headers["x-gateway-model"] == "gpt-4o-mini"
    assert reply.headers["x-gateway-downgraded-from"] == "gpt-4.1"
    line = orjson.loads([r for r in log.records if r.path == "/v1/chat/completions"][-1].line())
    assert (line["model"], line["requested_model"], line["downgraded_from"]) == ("gpt-4o-mini", "gpt-4.1", "gpt-4.1")
    await gateway.app[BUDGET].settled()
    rows = await gateway.app[BUDGET].store.ledger(0, 2**40, 10)
    assert [(row.model, row.requested_model) for row in rows] == [("gpt-4.1", "gpt-4.1"), ("gpt-4o-mini", "gpt-4.1")]
    report = await http(gateway, "GET", "/v1/budget/usage?" + urlencode({"group_by": "model"}), key=ADMIN_KEY)
    by_model = {row["group"]: row for row in report.json()["data"]}
    assert set(by_model) == {"gpt-4.1", "gpt-4o-mini"} and by_model["gpt-4o-mini"]["requests"] == 1
    mini = Decimal(by_model["gpt-4o-mini"]["cost_usd"])
    if not stream:                                # a stream's usage chunk reports the same usage
        billed = upstream.billed.models["gpt-4o-mini"]
        assert mini == nano_to_usd(cost_nano(PRICES["gpt-4o-mini"], Usage(billed.prompt_tokens,
                                                                           billed.completion_tokens)))
    text = await scrape(gateway, http)
    assert Decimal(str(value(text, "gateway_cost_usd_total", model="gpt-4o-mini", provider="primary"))) == mini
    assert total(text, "gateway_requests_total", model="gpt-4o-mini") == 1
