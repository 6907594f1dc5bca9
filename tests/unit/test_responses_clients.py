"""The Responses answer side as the real clients take it, in process: the openai SDK's stream
accumulator and ``responses.create``, openai-agents' default Responses model in a tool loop (run and
run_streamed), and the events Codex CLI 0.169 was seen to accept (tests/fixtures)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx2
import orjson
import pytest
from openai import AsyncOpenAI, OpenAI

from gateway.translate.responses_response import to_response
from gateway.translate.responses_stream import ResponsesStream
from gateway.translate.responses_types import ResponseContext
from tests.unit.test_responses_response import answer, chunks, ctx, run


def transport(bodies: list[tuple[bytes, str]], seen: list[dict[str, Any]]) -> httpx2.MockTransport:
    def handle(request: httpx2.Request) -> httpx2.Response:
        seen.append(orjson.loads(request.content))
        body, kind = bodies[len(seen) - 1]
        return httpx2.Response(200, content=body, headers={"content-type": kind})

    return httpx2.MockTransport(handle)


def sse_of(chat: dict[str, Any], rid: str) -> bytes:
    stream = ResponsesStream(ResponseContext(rid, "kimi", 1))
    return stream.feed(chunks(chat)) + stream.close()


def test_openai_sdk_stream_accumulates_our_events() -> None:
    chat = answer(
        reasoning="plan",
        text="It is sunny.",
        calls=[("call_1", "multi_agent_v1__spawn", '{"a":1}')],
        finish="tool_calls",
    )
    seen: list[dict[str, Any]] = []
    sse = ResponsesStream(ctx()).feed(chunks(chat))
    client = OpenAI(
        api_key="k",
        base_url="http://gw/v1",
        http_client=httpx2.Client(transport=transport([(sse, "text/event-stream")], seen)),
    )
    deltas = []
    with client.responses.stream(model="kimi", input="weather?") as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                deltas.append(event.snapshot)
        final = stream.get_final_response()
    assert deltas[-1] == "It is sunny." and final.output_text == "It is sunny."
    call = final.output[-1]
    assert call.type == "function_call" and (call.name, call.namespace, call.arguments) == (
        "spawn",
        "multi_agent_v1",
        '{"a":1}',
    )
    assert final.usage is not None and final.usage.input_tokens_details.cached_tokens == 100
    body = orjson.dumps(to_response(answer(text="plain"), ctx()))
    http = httpx2.Client(transport=transport([(body, "application/json")], []))
    client = OpenAI(api_key="k", base_url="http://gw/v1", http_client=http)
    assert client.responses.create(model="kimi", input="x").output_text == "plain"


@pytest.mark.parametrize("streamed", [False, True])
async def test_openai_agents_responses_model_runs_a_tool_loop_on_our_answers(streamed: bool) -> None:
    from agents import Agent, OpenAIResponsesModel, RunConfig, Runner, function_tool

    @function_tool
    def weather(city: str) -> str:
        """The weather in a city."""
        return f"sunny in {city}"

    turns = [
        answer(reasoning="need weather", calls=[("call_w", "weather", '{"city":"Paris"}')], finish="tool_calls"),
        answer(reasoning="done", text="Paris is sunny."),
    ]
    if streamed:
        bodies = [(sse_of(t, f"resp_{i}"), "text/event-stream") for i, t in enumerate(turns)]
    else:
        bodies = [
            (orjson.dumps(to_response(t, ResponseContext(f"resp_{i}", "kimi", 1))), "application/json")
            for i, t in enumerate(turns)
        ]
    seen: list[dict[str, Any]] = []
    client = AsyncOpenAI(
        api_key="k", base_url="http://gw/v1", http_client=httpx2.AsyncClient(transport=transport(bodies, seen))
    )
    agent = Agent(name="a", instructions="use tools", tools=[weather], model=OpenAIResponsesModel("kimi", client))
    config = RunConfig(tracing_disabled=True)
    if streamed:
        result = Runner.run_streamed(agent, "weather in Paris?", run_config=config)
        async for _ in result.stream_events():
            pass
    else:
        result = await Runner.run(agent, "weather in Paris?", run_config=config)  # type: ignore[assignment]
    assert result.final_output == "Paris is sunny."
    outputs = [i for i in seen[1]["input"] if i.get("type") == "function_call_output"]
    assert outputs and outputs[0]["call_id"] == "call_w" and "sunny in Paris" in outputs[0]["output"]


def test_codex_accepted_answers_are_a_subset_of_ours() -> None:
    """What Codex 0.169 was seen to accept (tests/fixtures): every event type and field it got, ours has."""
    fixture = orjson.loads((Path(__file__).parent.parent / "fixtures" / "codex_0.169.0_responses.json").read_bytes())
    chat = answer(reasoning="I should run a command.", calls=[("call_1", "exec_command", '{"cmd":"echo hi"}')])
    chat["choices"][0]["finish_reason"] = "tool_calls"
    ours = run(ctx(seal="SEALED({})".format), chunks(chat))
    theirs = [orjson.loads(b.split(b"\ndata: ", 1)[1]) for b in fixture["answers"][0].encode().split(b"\n\n") if b]
    assert {e["type"] for e in theirs} <= {e["type"] for e in ours}

    def keys(value: Any, at: str = "") -> set[str]:
        if isinstance(value, dict):
            return {f"{at}.{k}" for k in value} | {p for k, v in value.items() for p in keys(v, f"{at}.{k}")}
        if isinstance(value, list):
            return {p for v in value for p in keys(v, f"{at}[]")}
        return set()

    # (the capture server sent whole items in output_item.added too; ours, as OpenAI's, fill by deltas)
    for kind in {e["type"] for e in theirs} - {"response.output_item.added"}:
        want = set().union(*(keys(e) for e in theirs if e["type"] == kind))
        got = set().union(*(keys(e) for e in ours if e["type"] == kind))
        assert want <= got, (kind, want - got)
