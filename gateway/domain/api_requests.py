"""Requests of the two other wire APIs: OpenAI's Responses (`/v1/responses`) and Anthropic's Messages (`/v1/messages`).

Each is read into the same ProxyRequest as a chat request, so budgets, routing, retries and the ledger treat
them alike; what differs is checked here:

    responses   `max_output_tokens` bounds the output (else the policy or model cap); `input` (a string or a
                list of items) and `instructions` are the prompt. Refused, because the input or the cost
                they add cannot be bounded before the call: `previous_response_id`, `conversation`,
                `prompt` and `item_reference` input items (state kept at the provider), `background`
                (answered before its usage exists), hosted tools (web search, file search, code
                interpreter, MCP, a shell in a provider's container, ...: fees the price table does not
                hold, results added to the input).
    messages    `max_tokens` is required (as Anthropic requires it) and bounds the output; `system` and
                `messages` are the prompt; a request with tools adds TOOLS_OVERHEAD_TOKENS (Anthropic's
                own tool-use system prompt). Server tools (web search, web fetch, code execution) and
                `mcp_servers` are refused for the same reasons.

The prompt bound follows gateway.domain.tokens: UTF-8 bytes of every string (a token covers at least one
byte), MESSAGE_OVERHEAD_TOKENS per item, a fixed allowance per image, the bytes of a file's or document's
data (never less than that allowance; one sent by file id or URL is refused), and the JSON bytes of tool
definitions and output formats.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.domain.request import (
    MAX_TOKENS_LIMIT, Endpoint, ProxyRequest, checked_payload, forwarded_body, optional_int,
)
from gateway.domain.end_user import SESSION_HEADER, checked_id, end_user
from gateway.domain.tokens import MESSAGE_OVERHEAD_TOKENS, NON_TEXT_PART_TOKENS, PartKinds, json_bytes, parts_bound
from gateway.errors import InvalidRequest

__all__ = ["RESPONSES", "MESSAGES", "API_ENDPOINTS", "parse_api_request", "api_prompt_bound",
           "TOOLS_OVERHEAD_TOKENS", "HOSTED_TOOL_FIELDS"]

RESPONSES = Endpoint("responses", "/responses", True, "openai-responses")
MESSAGES = Endpoint("messages", "/messages", True, "anthropic-messages")
API_ENDPOINTS = {"responses": RESPONSES, "messages": MESSAGES}
TOOLS_OVERHEAD_TOKENS = 1_000    # Anthropic's tool-use system prompt is a few hundred tokens
HOSTED_TOOL_FIELDS = ("previous_response_id", "conversation", "prompt", "background", "mcp_servers")
# a kind not named here is bounded by its strings (these APIs' items and blocks are many)
_RESPONSES_PARTS = PartKinds(media=frozenset(("input_image", "computer_screenshot")), data=frozenset(("input_file", "input_audio")),
                             stateful=frozenset(("item_reference",)))
_MESSAGES_PARTS = PartKinds(media=frozenset(("image",)), data=frozenset(("document",)),
                            json=frozenset(("tool_use", "server_tool_use", "mcp_tool_use")))
_RESPONSES_TOOLS = frozenset(("function", "custom", "local_shell", "shell", "apply_patch"))
_MESSAGES_TOOLS = ("custom", "bash_", "text_editor_", "computer_", "memory_")   # client tools (type prefixes)
_EXTRA_FIELDS = ("tools", "tool_choice", "text", "output_format")


def parse_api_request(endpoint: Endpoint, body: bytes, user_header: str | None = None,
                      session_header: str | None = None) -> ProxyRequest:
    """The checked request for a Responses or Messages `endpoint` (with its end user and session headers);
    InvalidRequest when it is not one."""
    payload, model = checked_payload(body)
    _refuse_unbounded(endpoint, payload)
    max_tokens = _required_max_tokens(payload) if endpoint is MESSAGES else optional_int(payload, "max_output_tokens")
    stream = payload.get("stream") is True
    # Both APIs stream their usage on their own (response.completed, message_start + message_delta): nothing
    # is asked for and nothing is hidden, so the client "wants" the usage it gets.
    user = end_user(payload, user_header, messages=endpoint is MESSAGES)
    session = checked_id(session_header, SESSION_HEADER) if session_header else None
    return ProxyRequest(endpoint, forwarded_body(payload), payload, model, stream, True, max_tokens, user, session)


def _required_max_tokens(payload: dict[str, Any]) -> int:
    """Anthropic's `max_tokens`: required, a positive integer."""
    value = optional_int(payload, "max_tokens")
    if value is None or value < 1:
        raise InvalidRequest(f"'max_tokens' is required: an integer from 1 to {MAX_TOKENS_LIMIT}.",
                             param="max_tokens")
    return value


def _refuse_unbounded(endpoint: Endpoint, payload: dict[str, Any]) -> None:
    """400 for fields and tools whose input or cost the gateway cannot bound before the call."""
    for name in HOSTED_TOOL_FIELDS:
        if payload.get(name) not in (None, False):
            raise InvalidRequest(f"'{name}' is not supported through the gateway: the input or cost it adds "
                                 "cannot be bounded before the call.", param=name)
    _refuse_hosted_tools(endpoint, payload.get("tools"), "tools")
    if endpoint is RESPONSES:
        for field in ("input", "instructions"):
            items = payload.get(field)
            for item in items if isinstance(items, list) else ():
                if not isinstance(item, dict):
                    continue
                if item.get("type") is None and item.get("role") is None:
                    raise InvalidRequest("An input item with neither a type nor a role is an item reference: the "
                                         "input it stands for is kept at the provider and cannot be bounded before "
                                         "the call.", param=field)
                _refuse_hosted_tools(endpoint, item.get("tools"), field)   # additional_tools, tool_search_output


def _refuse_hosted_tools(endpoint: Endpoint, tools: Any, param: str) -> None:
    """400 for a tool among `tools` that runs at the provider."""
    for tool in tools if isinstance(tools, list) else ():
        tool = tool if isinstance(tool, dict) else {}
        if not _client_tool(endpoint, tool):
            raise InvalidRequest(f"Tool type '{tool.get('type')}' runs at the provider, with fees and results the "
                                 "gateway cannot bound before the call; only client tools are supported.",
                                 param=param)


def _client_tool(endpoint: Endpoint, tool: dict[str, Any]) -> bool:
    """Whether a tool runs at the client (its cost is the tokens of its definition and results)."""
    kind = tool.get("type")
    if endpoint is MESSAGES:
        return kind is None or (isinstance(kind, str) and kind.startswith(_MESSAGES_TOOLS))
    if kind == "shell":                       # a shell with an environment other than the local one is hosted
        environment = tool.get("environment")
        return environment is None or isinstance(environment, dict) and environment.get("type") == "local"
    return isinstance(kind, str) and kind in _RESPONSES_TOOLS


def _items(value: Any) -> int:
    """Items of a prompt list (each gets MESSAGE_OVERHEAD_TOKENS); a string or object is one."""
    return len(value) if isinstance(value, list) else 1


def api_prompt_bound(req: ProxyRequest, image_tokens: int = NON_TEXT_PART_TOKENS) -> int:
    """An upper bound of the input tokens of a Responses or Messages request, each image counted `image_tokens`."""
    payload = req.payload
    prompt_field, system_field = ("messages", "system") if req.endpoint is MESSAGES else ("input", "instructions")
    prompt, system = payload.get(prompt_field), payload.get(system_field)
    try:
        kinds = (_MESSAGES_PARTS if req.endpoint is MESSAGES else _RESPONSES_PARTS).for_images(image_tokens)
        total = parts_bound(prompt, kinds) + parts_bound(system, kinds)
        total += MESSAGE_OVERHEAD_TOKENS * (_items(prompt) + 1)
        total += json_bytes(payload, _EXTRA_FIELDS)
    except (RecursionError, orjson.JSONEncodeError):
        raise InvalidRequest("The request body is nested too deeply.") from None
    if req.endpoint is MESSAGES and payload.get("tools"):
        total += TOOLS_OVERHEAD_TOKENS
    return total
