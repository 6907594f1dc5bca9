"""Tool-call defects out, end to end: an upstream that gets tool calls wrong in every way peers have
seen (protocols.md §6.2), behind ``kimi-gateway serve``, read by the openai SDK's own parsers."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import uvicorn
from openai import OpenAI

from tests.conftest import Process, free_port, hashed, start_gateway, write_gateway
from tests.e2e.test_dropin import TOOLS, USER

KEY = "sk-defects-tenant"
HEAD = {"id": "chatcmpl-d", "created": 1, "model": "broken-k2"}
# what the broken upstream answers: no ids, no type, object arguments, an empty arguments string
WHOLE_CALLS = [
    {"function": {"name": "get_weather", "arguments": {"city": "Beijing"}}},
    {"id": "call_kept", "function": {"name": "get_time", "arguments": ""}},
]
# stream fragments: no index, the id and name repeated on every fragment, object arguments, no id
STREAM_DELTAS: list[list[dict[str, Any]]] = [
    [{"id": "get_weather:0", "function": {"name": "get_weather", "arguments": '{"city": '}}],
    [{"id": "get_weather:0", "function": {"name": "get_weather", "arguments": '"Beijing"}'}}],
    [{"function": {"name": "get_time", "arguments": {"city": "Shanghai"}}}],
]


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    body = {
        **HEAD,
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(body) + b"\n\n"


async def broken_upstream(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    request = orjson.loads(body) if body else {}
    if scope["path"] == "/health":
        payload, kind = b"ok", b"text/plain"
    elif request.get("stream"):
        events = [_chunk({"role": "assistant", "content": ""})]
        events += [_chunk({"tool_calls": d}) for d in STREAM_DELTAS]
        events += [_chunk({}, "stop"), b"data: [DONE]\n\n"]
        payload, kind = b"".join(events), b"text/event-stream"
    else:
        message = {"role": "assistant", "content": "", "tool_calls": json.loads(json.dumps(WHOLE_CALLS))}
        usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
        answer = {
            **HEAD,
            "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        }
        payload, kind = orjson.dumps({**answer, "usage": usage}), b"application/json"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", kind)]})
    await send({"type": "http.response.body", "body": payload})


@pytest.fixture(scope="module")
def upstream_url() -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(broken_upstream, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, upstream_url: str) -> Iterator[OpenAI]:
    upstreams = f"  broken:\n    kind: openai\n    base_url: {upstream_url}/v1\n    models: [broken-k2]\n"
    policy = f'tenant: d\nkeys: ["{hashed(KEY)}"]\nmodels:\n  broken-k2: {{candidates: [broken/broken-k2]}}\n'
    proc: Process = start_gateway(write_gateway(tmp_path_factory.mktemp("defects"), upstreams, policy))
    yield proc.openai(KEY)
    proc.stop()


def test_defective_tool_calls_are_repaired_non_stream(client: OpenAI) -> None:
    choice = client.chat.completions.create(model="broken-k2", messages=USER, tools=TOOLS).choices[0]
    calls = choice.message.tool_calls or []
    assert [(c.id, c.type, c.function.name, c.function.arguments) for c in calls] == [
        ("functions.get_weather:0", "function", "get_weather", '{"city":"Beijing"}'),
        ("call_kept", "function", "get_time", "{}"),
    ]
    assert choice.finish_reason == "tool_calls"


def test_defective_tool_call_deltas_are_repaired_stream(client: OpenAI) -> None:
    with client.chat.completions.stream(model="broken-k2", messages=USER, tools=TOOLS) as stream:
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls or []
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather:0", "get_weather", {"city": "Beijing"}),
        ("functions.get_time:1", "get_time", {"city": "Shanghai"}),
    ]
    assert final.choices[0].finish_reason == "tool_calls"


def test_without_tools_the_answer_is_relayed_untouched(client: OpenAI) -> None:
    """No tools in the request: no repair transform runs (the byte relay is kept)."""
    raw = client.chat.completions.with_raw_response.create(model="broken-k2", messages=USER)
    body = json.loads(raw.text)
    assert body["choices"][0]["message"]["tool_calls"][0] == WHOLE_CALLS[0]
    assert body["choices"][0]["finish_reason"] == "stop"
