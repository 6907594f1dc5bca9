"""A failover starts from the client's request as received: nothing candidate 1's attempt rewrote in
place (its reasoning field, its tool dialect, nested in the messages and tools) reaches candidate 2.

A Moonshot-shaped upstream that fails with a 503 is followed by a vLLM-raw-shaped one (reasoning in
``reasoning``, raw K2 tool-call markers); the body the second upstream receives must be exactly the
body it receives when it is the only candidate, on a tool loop whose reasoning the gateway restores.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.conftest import Process, hashed, start_gateway, start_simulator, write_gateway

KEY = "sk-failover-isolation"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": "Read a file of the repository",
            "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
        },
    }
]


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Process, Process]]:
    folder = tmp_path_factory.mktemp("failover-sims")
    moonshot = start_simulator(folder, "moonshot-standard", "--ttft-ms", "0", "--tokens-per-s", "0")
    vllm = start_simulator(folder, "vllm-raw", "--ttft-ms", "0", "--tokens-per-s", "0")
    yield moonshot, vllm
    moonshot.stop()
    vllm.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, upstreams: tuple[Process, Process]) -> Iterator[Process]:
    moonshot, vllm = upstreams
    config = write_gateway(
        tmp_path_factory.mktemp("failover-gw"),
        f"""\
  m:
    kind: openai
    base_url: {moonshot.url}/v1
    models: [kimi-k2-thinking]
  v:
    kind: openai
    base_url: {vllm.url}/v1
    reasoning_field: reasoning
    tool_call_markers: true
    models: {{kimi-k2-thinking: moonshotai/Kimi-K2-Thinking}}
""",
        f"""\
tenant: isolation
keys: ["{hashed(KEY)}"]
models:
  kimi-k2-thinking: {{candidates: [m/kimi-k2-thinking, v/kimi-k2-thinking], strategy: pinned}}
  vllm-only: {{candidates: [v/kimi-k2-thinking]}}
""",
    )
    proc = start_gateway(config)
    yield proc
    proc.stop()


def last_body(sim: Process) -> dict[str, Any]:
    seen = httpx.get(sim.url + "/_sim/requests", params={"limit": 100}).json()
    return seen[-1]["body"]


def foreign_history(stream: bool) -> list[dict[str, Any]]:
    """A tool loop written elsewhere: the gateway kept no reasoning for its tool-call turn."""
    call: dict[str, Any] = {"id": f"read_file:{int(stream)}", "type": "function"}
    call["function"] = {"name": "read_file", "arguments": '{"path": "README.md"}'}
    return [
        {"role": "user", "content": f"read the README elsewhere (stream={stream})"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "# README"},
    ]


def served_history(client: OpenAI, stream: bool) -> list[dict[str, Any]]:
    """A tool loop the gateway served: it kept the reasoning of the tool-call turn, which the client
    drops (as frameworks do) and the gateway puts back."""
    history: list[dict[str, Any]] = [{"role": "user", "content": f"read the README (stream={stream})"}]
    first = client.chat.completions.create(
        model="kimi-k2-thinking",
        messages=history,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        extra_body={"sim": {"tool_calls": 1}},
    )
    message = first.choices[0].message
    assert message.tool_calls, "the first turn must be a tool call"
    calls = [c.model_dump() for c in message.tool_calls]
    history.append({"role": "assistant", "content": message.content or "", "tool_calls": calls})
    history += [{"role": "tool", "tool_call_id": c.id, "content": "# README"} for c in message.tool_calls]
    return history


@pytest.mark.parametrize("kept", [True, False], ids=["reasoning-restored", "nothing-kept"])
@pytest.mark.parametrize("stream", [False, True])
def test_the_second_candidate_gets_the_request_it_would_get_alone(
    gateway: Process, upstreams: tuple[Process, Process], stream: bool, kept: bool
) -> None:
    moonshot, vllm = upstreams
    history = served_history(gateway.openai(KEY), stream) if kept else foreign_history(stream)

    def turn(model: str) -> httpx.Response:
        body = {"model": model, "messages": history, "tools": TOOLS, "stream": stream}
        headers = {"Authorization": f"Bearer {KEY}"}
        resp = httpx.post(gateway.url + "/v1/chat/completions", json=body, headers=headers, timeout=30)
        assert resp.status_code == 200, resp.text
        return resp

    httpx.post(moonshot.url + "/_sim/faults", json={"status": 503}).raise_for_status()
    failed_over = turn("kimi-k2-thinking")
    assert failed_over.headers["x-gateway-upstream"] == "v/kimi-k2-thinking"
    # Moonshot refuses a tool-call turn without reasoning: its attempt carried the kept text or a placeholder
    tried = last_body(moonshot)
    assert tried["messages"][1].get("reasoning_content"), tried["messages"][1]
    after_failover = last_body(vllm)

    alone = turn("vllm-only")
    assert alone.headers["x-gateway-upstream"] == "v/kimi-k2-thinking"
    assert after_failover == last_body(vllm)
    assert "reasoning_content" not in after_failover["messages"][1]  # Moonshot's field name did not leak


@pytest.mark.parametrize("stream", [False, True])
def test_an_anthropic_tool_loop_fails_over_as_if_the_second_candidate_were_alone(
    gateway: Process, upstreams: tuple[Process, Process], stream: bool
) -> None:
    """The Messages API front end translates first; the failover then starts from that translation,
    not from what the Moonshot attempt made of it."""
    moonshot, vllm = upstreams
    call_id = f"toolu_elsewhere_{int(stream)}"
    body: dict[str, Any] = {
        "max_tokens": 256,
        "stream": stream,
        "tools": [
            {"name": "read_file", "description": "Read a file", "input_schema": TOOLS[0]["function"]["parameters"]}
        ],
        "messages": [
            {"role": "user", "content": f"read the README via Messages (stream={stream})"},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": call_id, "name": "read_file", "input": {"path": "README.md"}}],
            },
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call_id, "content": "# README"}]},
        ],
    }
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}

    def turn(model: str) -> httpx.Response:
        resp = httpx.post(gateway.url + "/v1/messages", json={**body, "model": model}, headers=headers, timeout=30)
        assert resp.status_code == 200, resp.text
        return resp

    httpx.post(moonshot.url + "/_sim/faults", json={"status": 503}).raise_for_status()
    assert turn("kimi-k2-thinking").headers["x-gateway-upstream"] == "v/kimi-k2-thinking"
    assert last_body(moonshot)["messages"][1].get("reasoning_content")  # the placeholder Moonshot needs
    after_failover = last_body(vllm)
    turn("vllm-only")
    assert after_failover == last_body(vllm)
    assert "reasoning_content" not in after_failover["messages"][1] and "reasoning" not in after_failover["messages"][1]
