"""``kind: litellm`` upstreams: a gateway whose upstream is Anthropic's API through litellm, with the
provider's HTTP mocked by respx, answering a tool call (stream and non-stream) to the openai SDK.

The gateway runs in-process (respx patches httpx inside this process) behind httpx's ASGI transport.
litellm sends through an aiohttp transport by default, which respx cannot see; litellm's supported
switch ``litellm.disable_aiohttp_transport = True`` puts it on plain httpx, which respx intercepts.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import respx

from gateway.app import GatewayApp
from gateway.upstreams.litellm_upstream import import_litellm
from gateway.wiring import load_all
from tests.conftest import hashed, write_gateway

pytest.importorskip("litellm")
# litellm's own pydantic models warn about ReadOnly TypedDict items at import; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:Items? .* (is|are) using the `ReadOnly` qualifier:UserWarning")

KEY = "sk-litellm-tenant"
ANTHROPIC = "https://api.anthropic.com/v1/messages"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
USER = [{"role": "user", "content": "Weather in Beijing?"}]
USAGE = {"input_tokens": 120, "output_tokens": 30, "cache_read_input_tokens": 64, "cache_creation_input_tokens": 0}
MESSAGE = {
    "id": "msg_01",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5",
    "content": [
        {"type": "thinking", "thinking": "The user wants the weather.", "signature": "sig"},
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Beijing"}},
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": USAGE,
}
# USD per 1M tokens; 120 uncached + 64 cached input, 30 output
PRICE = {"input_miss": "3.00", "input_hit": "0.30", "output": "15.00"}
EXPECTED_COST = (Decimal(120) * 3 + Decimal(64) * Decimal("0.30") + Decimal(30) * 15) / 1_000_000


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


STREAM = "".join(
    [
        _event(
            "message_start",
            {"type": "message_start", "message": {**MESSAGE, "content": [], "stop_reason": None, "usage": USAGE}},
        ),
        _event(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        _event(
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Let me check."}},
        ),
        _event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        _event(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 1,
                "content_block": {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {}},
            },
        ),
        _event(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": '{"city": '},
            },
        ),
        _event(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": '"Beijing"}'},
            },
        ),
        _event("content_block_stop", {"type": "content_block_stop", "index": 1}),
        _event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                "usage": {"output_tokens": 30},
            },
        ),
        _event("message_stop", {"type": "message_stop"}),
    ]
)


def _anthropic_reply(request: httpx.Request) -> httpx.Response:
    if json.loads(request.content).get("stream"):
        return httpx.Response(200, content=STREAM.encode(), headers={"content-type": "text/event-stream"})
    return httpx.Response(200, json=MESSAGE)


@pytest.fixture()
async def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[GatewayApp]:
    import_litellm().disable_aiohttp_transport = True
    monkeypatch.setenv("TEST_ANTHROPIC_KEY", "sk-ant-upstream")
    upstreams = """\
  anthropic:
    kind: litellm
    api_key_env: TEST_ANTHROPIC_KEY
    models: {claude: anthropic/claude-sonnet-4-5}
"""
    policy = f'tenant: t\nkeys: ["{hashed(KEY)}"]\nmodels:\n  claude: {{candidates: [anthropic/claude]}}\n'
    config = write_gateway(tmp_path, upstreams, policy, prices={"anthropic/claude": PRICE})
    gateway = GatewayApp(load_all(config))
    await gateway.startup()
    yield gateway
    await gateway.shutdown()


@pytest.fixture()
def client(app: GatewayApp) -> openai.AsyncOpenAI:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")
    return openai.AsyncOpenAI(base_url="http://gateway/v1", api_key=KEY, http_client=http, max_retries=0)


async def test_litellm_anthropic_upstream_answers_a_tool_call_non_stream(client: openai.AsyncOpenAI) -> None:
    with respx.mock(assert_all_called=True) as mock:
        route = mock.post(ANTHROPIC).mock(side_effect=_anthropic_reply)
        raw = await client.chat.completions.with_raw_response.create(model="claude", messages=USER, tools=TOOLS)
    reply = raw.parse()
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls or []
    assert (call.id, call.type, call.function.name) == ("toolu_01", "function", "get_weather")
    assert json.loads(call.function.arguments) == {"city": "Beijing"}
    assert choice.message.content == "Let me check."
    assert getattr(choice.message, "reasoning_content", None) == "The user wants the weather."
    assert reply.usage is not None and reply.usage.prompt_tokens == 184 and reply.usage.completion_tokens == 30
    assert reply.usage.prompt_tokens_details is not None and reply.usage.prompt_tokens_details.cached_tokens == 64
    assert Decimal(raw.headers["x-gateway-cost-usd"]) == EXPECTED_COST
    sent = route.calls[0].request
    assert sent.headers["x-api-key"] == "sk-ant-upstream"
    assert json.loads(sent.content)["tools"][0]["name"] == "get_weather"


async def test_litellm_anthropic_upstream_answers_a_tool_call_stream(
    client: openai.AsyncOpenAI, app: GatewayApp
) -> None:
    calls: dict[int, dict[str, str]] = {}
    text, finish, usage = "", None, None
    with respx.mock(assert_all_called=True) as mock:
        mock.post(ANTHROPIC).mock(side_effect=_anthropic_reply)
        stream = await client.chat.completions.create(
            model="claude", messages=USER, tools=TOOLS, stream=True, stream_options={"include_usage": True}
        )
        async for chunk in stream:
            usage = chunk.usage or usage
            for choice in chunk.choices:
                text += choice.delta.content or ""
                for tc in choice.delta.tool_calls or []:
                    entry = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                    entry["id"] += tc.id or ""
                    entry["name"] += (tc.function.name or "") if tc.function else ""
                    entry["arguments"] += (tc.function.arguments or "") if tc.function else ""
                finish = choice.finish_reason or finish
    assert finish == "tool_calls" and text == "Let me check."
    assert calls == {0: {"id": "toolu_01", "name": "get_weather", "arguments": '{"city": "Beijing"}'}}
    assert usage is not None and usage.prompt_tokens == 184 and usage.completion_tokens == 30


async def test_litellm_provider_error_keeps_its_status(client: openai.AsyncOpenAI) -> None:
    error = {"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: too large"}}
    with respx.mock() as mock:
        mock.post(ANTHROPIC).mock(return_value=httpx.Response(400, json=error))
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model="claude", messages=USER)
    assert "max_tokens: too large" in caught.value.message


async def test_litellm_upstream_without_a_price_refuses_to_start(tmp_path: Path) -> None:
    from gateway.yamlfile import ConfigError

    upstreams = "  anthropic:\n    kind: litellm\n    models: {claude: anthropic/claude-sonnet-4-5}\n"
    policy = f'tenant: t\nkeys: ["{hashed(KEY)}"]\nmodels:\n  claude: {{candidates: [anthropic/claude]}}\n'
    config = write_gateway(tmp_path, upstreams, policy, prices={})
    prices = tmp_path / "gateway-prices.yaml"
    prices.write_text("currency: USD\nprices: []\n")
    with pytest.raises(ConfigError) as caught:
        load_all(config)
    assert "anthropic/claude has no price" in str(caught.value)
