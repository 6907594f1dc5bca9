"""openai-agents with its default model (``OpenAIResponsesModel``, ``POST /v1/responses``) through the
gateway: ``Runner.run`` and ``Runner.run_streamed`` drive a loop of three tool rounds with the SDK's
default settings, base_url and key being the only change, on ``pass``, ``strip`` and ``redact`` tenants.

What the SDK sends (fixture ``tests/fixtures/openai_agents_0.24.0_responses.json``): no ``store`` (so the
API's default, stored), ``include: []``, no ``previous_response_id`` — it re-sends the whole history each
turn, with the reasoning items it got back re-serialized. The simulated upstream enforces Moonshot's rule
(an assistant tool-call message without ``reasoning_content`` is a 400), so turn two only works when the
gateway restores K2's reasoning from what it served; the test also reads what the upstream received.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Process, start_gateway
from tests.e2e.test_codex_cli import (
    FIRST_REASONING,
    REDACTED,
    check_tool_loop_upstream,
    ledger_count,
    start_tool_simulator,
    tenants_gateway,
    upstream_bodies,
    wait_for_ledger,
)

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "openai_agents_0.24.0_responses.json"
MODEL = "kimi-k2-thinking"
TOOL_ROUNDS = 3
KEYS = {"pass": "sk-agents-pass", "strip": "sk-agents-strip", "redact": "sk-agents-redact"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("agents-responses")


@pytest.fixture(scope="module")
def tool_sim(folder: Path) -> Iterator[Process]:
    proc = start_tool_simulator(folder, TOOL_ROUNDS)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def gateway(folder: Path, tool_sim: Process) -> Iterator[Process]:
    proc = start_gateway(tenants_gateway(folder, tool_sim, KEYS))
    yield proc
    proc.stop()


@pytest.fixture()
def sim(tool_sim: Process) -> Process:
    httpx.post(tool_sim.url + "/_sim/reset", timeout=5)
    return tool_sim


def weather_agent(gateway: Process, key: str, calls: list[str]) -> Any:
    """An agent as the openai-agents quickstart writes one, pointed at the gateway."""
    from agents import Agent, function_tool, set_default_openai_client, set_tracing_disabled
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    set_default_openai_client(AsyncOpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=30))

    @function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        calls.append(city)
        return f"{city}: sunny, 21 C"

    return Agent(name="weather", instructions="Answer with the tools.", model=MODEL, tools=[get_weather])


def test_the_default_model_is_the_responses_model() -> None:
    from agents.models.openai_provider import OpenAIProvider
    from agents.models.openai_responses import OpenAIResponsesModel

    assert isinstance(OpenAIProvider(api_key="unused").get_model(MODEL), OpenAIResponsesModel)
    first = json.loads(FIXTURE.read_text())["requests"][0]["body"]
    assert "store" not in first and first["include"] == [] and "previous_response_id" not in first


def client_side_text(result: Any, raw_events: list[Any]) -> str:
    """Everything the app received from the gateway, as JSON text."""
    parts = [item.model_dump_json() for r in result.raw_responses for item in r.output]
    parts += [e.model_dump_json() for e in raw_events]
    for item in result.new_items:
        raw = item.raw_item
        parts.append(json.dumps(raw if isinstance(raw, dict) else raw.model_dump(), default=str))
    return "\n".join(parts)


@pytest.mark.parametrize("stream", [False, True], ids=["run", "run_streamed"])
@pytest.mark.parametrize("mode", ["pass", "strip", "redact"])
def test_agents_tool_loop_of_three_rounds(
    gateway: Process, sim: Process, folder: Path, mode: str, stream: bool
) -> None:
    from agents import Runner

    calls: list[str] = []
    before = ledger_count(folder, KEYS[mode])
    agent = weather_agent(gateway, KEYS[mode], calls)
    raw_events: list[Any] = []

    async def go() -> Any:
        if not stream:
            return await Runner.run(agent, "What is the weather in Paris?")
        result = Runner.run_streamed(agent, "What is the weather in Paris?")
        async for event in result.stream_events():
            if event.type == "raw_response_event":
                raw_events.append(event.data)
        return result

    result = asyncio.run(asyncio.wait_for(go(), 60))
    assert len(calls) >= TOOL_ROUNDS, calls
    assert isinstance(result.final_output, str) and result.final_output.strip(), result.final_output
    assert len(result.raw_responses) == TOOL_ROUNDS + 1, result.raw_responses
    assert all(r.response_id and r.response_id.startswith("resp") for r in result.raw_responses), result.raw_responses
    assert result.context_wrapper.usage.output_tokens > 0 and result.context_wrapper.usage.requests == TOOL_ROUNDS + 1
    if stream:
        kinds = [e.type for e in raw_events]
        assert kinds.count("response.completed") == TOOL_ROUNDS + 1, kinds
        assert "response.function_call_arguments.delta" in kinds, kinds
        # the final answer streamed as text deltas of the last response
        last = len(kinds) - 1 - kinds[::-1].index("response.created")
        deltas = "".join(e.delta for e in raw_events[last:] if e.type == "response.output_text.delta")
        assert deltas == result.final_output, (deltas, result.final_output)

    check_tool_loop_upstream(upstream_bodies(sim), TOOL_ROUNDS)
    rows = wait_for_ledger(folder, KEYS[mode], before + TOOL_ROUNDS + 1)[before:]
    assert [(r["status"], r["stream"], r["endpoint"]) for r in rows] == [(200, int(stream), "responses")] * (
        TOOL_ROUNDS + 1
    ), rows

    seen = client_side_text(result, raw_events)
    reasoning = [i for r in result.raw_responses for i in r.output if i.type == "reasoning"]
    if mode != "strip":  # one reasoning item per response, ids unique (strip/redact originals are keyed by them)
        assert len(reasoning) == TOOL_ROUNDS + 1 and len({i.id for i in reasoning}) == len(reasoning), reasoning
    if mode == "pass":  # the tenant sees K2's reasoning, in the reasoning items
        assert all(FIRST_REASONING in i.model_dump_json() for i in reasoning), reasoning
    if mode == "strip":
        assert FIRST_REASONING not in seen and '"reasoning_text"' not in seen, seen[:3000]
    if mode == "redact":
        assert not any(w in seen for w in REDACTED), seen[:3000]
