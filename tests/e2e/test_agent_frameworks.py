"""Agent frameworks drive K2 tool loops through the gateway unchanged, base_url and key being the only
change: openai-agents' chat-completions model, langchain-openai's ``bind_tools`` loop, the anthropic
SDK without thinking blocks, and the openai SDK's own loop.

None of the first three sends K2's reasoning back on its assistant tool-call messages; the upstream
is the simulator in Moonshot's dialect, which refuses such a message with K2's 400, with
``tool_rounds: 3`` so that each framework's default loop runs three tool steps before the answer.
The gateway puts back what it served, for pass, strip and redact tenants, from memory or from Redis
shared by two replicas; what it cannot put back gets the placeholder, nothing (vLLM), or a 400
before any spend (``when_missing: reject``)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.conftest import PYTHON, Process, free_port, hashed, start_gateway, start_simulator, write_gateway

ROUNDS = 3
MODEL = "kimi-k2-thinking"
KEYS = {
    "pass": "sk-frameworks-pass",
    "strip": "sk-frameworks-strip",
    "redact": "sk-frameworks-redact",
    "reject": "sk-frameworks-reject",
}
REASONING = {
    "pass": "{}",
    "strip": "{mode: strip}",
    "redact": "{mode: redact}",
    "reject": "{when_missing: reject}",
}
QUESTION = "Weather and time in Beijing, please."
OPENAI_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": f"The {what} in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
    for name, what in (("get_weather", "weather"), ("get_time", "local time"))
]


def start_tool_round_simulator(folder: Path, profile: str = "instant") -> Process:
    """``kimi-gateway simulate`` whose model calls tools for ``ROUNDS`` rounds before it answers."""
    port = free_port()
    args = [PYTHON, "-m", "gateway.cli", "simulate", "--port", str(port), "--profile", profile]
    args += ["--ttft-ms", "0", "--tokens-per-s", "0", "--tool-rounds", str(ROUNDS)]
    return Process(args, port, folder / f"simulator-{port}.log", "/health")


def upstreams_yaml(moonshot: Process, vllm: Process | None = None) -> str:
    text = f"""\
  sim:
    kind: openai
    base_url: {moonshot.url}/v1
    models: [{MODEL}]
"""
    if vllm is not None:
        text += f"""\
  vllm:
    kind: openai
    base_url: {vllm.url}/v1
    reasoning_field: reasoning
    models: {{{MODEL}: moonshotai/Kimi-K2-Thinking}}
"""
    return text


def policy(tenant: str, vllm: bool = True) -> str:
    return (
        f'tenant: {tenant}\nkeys: ["{hashed(KEYS[tenant])}"]\n'
        f"models:\n  {MODEL}: {{candidates: [sim/{MODEL}]}}\n"
        + (f"  k2-vllm: {{candidates: [vllm/{MODEL}]}}\n" if vllm else "")
        + f"reasoning: {REASONING[tenant]}\n"
    )


@pytest.fixture(scope="module")
def sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Process]]:
    folder = tmp_path_factory.mktemp("framework-sims")
    procs = {"moonshot": start_tool_round_simulator(folder)}
    try:
        procs["vllm"] = start_simulator(folder, "vllm", "--ttft-ms", "0", "--tokens-per-s", "0")
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, sims: dict[str, Process]) -> Iterator[Process]:
    folder = tmp_path_factory.mktemp("frameworks")
    config = write_gateway(folder, upstreams_yaml(sims["moonshot"], sims["vllm"]), policy("pass"))
    for tenant in ("strip", "redact", "reject"):
        (config.parent / "gateway-policies" / f"{tenant}.yaml").write_text(policy(tenant))
    proc = start_gateway(config)
    yield proc
    proc.stop()


@pytest.fixture()
def sim(sims: dict[str, Process]) -> Process:
    httpx.post(sims["moonshot"].url + "/_sim/reset", timeout=5)
    return sims["moonshot"]


def upstream_bodies(sim: Process, limit: int = 0) -> list[dict[str, Any]]:
    suffix = f"?limit={limit}" if limit else ""
    return [e["body"] for e in httpx.get(f"{sim.url}/_sim/requests{suffix}", timeout=5).json()]


def restored(gw: Process, tenant: str) -> dict[str, float]:
    sources = ("store", "client", "placeholder", "none")
    return {s: gw.metric("gateway_reasoning_restored_total", tenant=tenant, source=s) for s in sources}


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def assert_loop_kept_its_reasoning(sim: Process) -> None:
    """The last upstream request carried K2's own reasoning on every tool-call turn, never a blank."""
    sent = upstream_bodies(sim, 1)[0]["messages"]
    turns = [m for m in sent if m["role"] == "assistant" and m.get("tool_calls")]
    assert len(turns) == ROUNDS
    assert all(isinstance(m.get("reasoning_content"), str) and m["reasoning_content"].strip() for m in turns), turns


# -- openai-agents, OpenAIChatCompletionsModel


def run_agent(base_url: str, key: str, streamed: bool, instructions: Any = "You are a helpful assistant.") -> Any:
    from agents import Agent, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)
    ran: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        ran.append(f"weather:{city}")
        return f"Sunny, 21 C in {city}"

    @function_tool
    def get_time(city: str) -> str:
        """The local time in a city."""
        ran.append(f"time:{city}")
        return f"14:05 in {city}"

    async def go() -> Any:
        client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0, timeout=30)
        agent = Agent(
            name="assistant",
            instructions=instructions,
            tools=[get_weather, get_time],
            model=OpenAIChatCompletionsModel(model=MODEL, openai_client=client),
        )
        if streamed:
            result = Runner.run_streamed(agent, QUESTION)
            async for _ in result.stream_events():
                pass
        else:
            result = await Runner.run(agent, QUESTION)
        await client.close()
        return result

    result = asyncio.run(go())
    return result, ran


@pytest.mark.parametrize("streamed", [False, True], ids=["run", "run_streamed"])
@pytest.mark.parametrize("tenant", ["pass", "strip", "redact"])
def test_openai_agents_chat_completions_model_runs_a_tool_loop(
    gateway: Process, sim: Process, tenant: str, streamed: bool
) -> None:
    before = restored(gateway, tenant)
    result, ran = run_agent(gateway.url, KEYS[tenant], streamed)
    assert len(ran) >= ROUNDS and len(ran) == 2 * ROUNDS  # two parallel calls per round
    assert isinstance(result.final_output, str) and result.final_output.strip()
    assert_loop_kept_its_reasoning(sim)
    # turns 2, 3 and 4 carried 1, 2 and 3 tool-call turns, none of them with reasoning from the SDK
    assert delta(restored(gateway, tenant), before) == {"store": 1 + 2 + 3}


def test_openai_agents_with_instructions_that_change_every_turn(gateway: Process, sim: Process) -> None:
    """Dynamic instructions rebuild the system prompt each step (here: a step counter), so the exact
    conversation key misses; the fallback key (last user message + tool calls) still finds them."""
    steps = iter(range(100))

    def instructions(_context: Any, _agent: Any) -> str:
        return f"You are a helpful assistant. This is step {next(steps)}."

    before = restored(gateway, "pass")
    result, ran = run_agent(gateway.url, KEYS["pass"], False, instructions)
    assert len(ran) == 2 * ROUNDS and result.final_output.strip()
    systems = [b["messages"][0]["content"] for b in upstream_bodies(sim)]
    assert len(set(systems)) == ROUNDS + 1  # every request had another system prompt
    assert_loop_kept_its_reasoning(sim)
    assert delta(restored(gateway, "pass"), before) == {"store": 1 + 2 + 3}


# -- langchain-openai


@pytest.mark.parametrize("stream", [False, True], ids=["invoke", "stream"])
def test_langchain_bind_tools_loop(gateway: Process, sim: Process, stream: bool) -> None:
    from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    ran: list[str] = []

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        ran.append(city)
        return f"Sunny in {city}"

    @tool
    def get_time(city: str) -> str:
        """The local time in a city."""
        ran.append(city)
        return f"14:05 in {city}"

    tools = {"get_weather": get_weather, "get_time": get_time}
    llm = ChatOpenAI(base_url=gateway.url + "/v1", api_key=KEYS["pass"], model=MODEL, max_retries=0)  # type: ignore[arg-type]
    bound = llm.bind_tools(list(tools.values()))
    messages: list[BaseMessage] = [SystemMessage("Answer briefly."), HumanMessage(QUESTION)]
    before = restored(gateway, "pass")
    answer: Any = None
    for _ in range(ROUNDS + 2):
        if stream:
            answer = None
            for piece in bound.stream(messages):
                answer = piece if answer is None else answer + piece
        else:
            answer = bound.invoke(messages)
        messages.append(answer)
        if not answer.tool_calls:
            break
        for call in answer.tool_calls:
            messages.append(ToolMessage(tools[call["name"]].invoke(call["args"]), tool_call_id=call["id"]))
    assert len(ran) == 2 * ROUNDS
    assert not answer.tool_calls and isinstance(answer.content, str) and answer.content.strip()
    assert_loop_kept_its_reasoning(sim)
    assert delta(restored(gateway, "pass"), before) == {"store": 1 + 2 + 3}


# -- anthropic SDK, Messages API, thinking blocks not sent back

ANTHROPIC_TOOLS = [
    {
        "name": t["function"]["name"],
        "description": t["function"]["description"],
        "input_schema": t["function"]["parameters"],
    }
    for t in OPENAI_TOOLS
]


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
def test_anthropic_sdk_loop_without_thinking_blocks(gateway: Process, sim: Process, stream: bool) -> None:
    client = gateway.anthropic(KEYS["pass"])
    messages: list[Any] = [{"role": "user", "content": QUESTION}]
    before = restored(gateway, "pass")
    ran = 0
    for _ in range(ROUNDS + 2):
        kwargs: dict[str, Any] = {"model": MODEL, "max_tokens": 4000, "tools": ANTHROPIC_TOOLS, "messages": messages}
        if stream:
            with client.messages.stream(**kwargs) as events:
                reply = events.get_final_message()
        else:
            reply = client.messages.create(**kwargs)
        assert any(b.type == "thinking" for b in reply.content)  # shown, and dropped below
        kept = [b.model_dump(exclude_none=True) for b in reply.content if b.type in ("text", "tool_use")]
        messages.append({"role": "assistant", "content": kept})
        uses = [b for b in reply.content if b.type == "tool_use"]
        if reply.stop_reason != "tool_use":
            break
        ran += len(uses)
        messages.append(
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": u.id, "content": "ok"} for u in uses]}
        )
    assert ran == 2 * ROUNDS
    assert reply.stop_reason == "end_turn" and reply.content[-1].type == "text" and reply.content[-1].text
    assert_loop_kept_its_reasoning(sim)
    assert delta(restored(gateway, "pass"), before) == {"store": 1 + 2 + 3}


# -- the openai SDK's own loop


def openai_loop(urls: list[str], key: str, echo: str | None, stream: bool = False) -> list[Any]:
    """A hand-written loop that appends ``message.model_dump()``: without the reasoning
    (``echo=None``), or with the client's own text in its place. Requests alternate over ``urls``."""
    clients = [openai.OpenAI(base_url=u + "/v1", api_key=key, max_retries=0, timeout=30) for u in urls]
    messages: list[Any] = [{"role": "user", "content": QUESTION}]
    for n in range(ROUNDS + 2):
        c = clients[n % len(clients)]
        if stream:
            content, calls = "", {}  # type: ignore[var-annotated]
            for chunk in c.chat.completions.create(model=MODEL, messages=messages, tools=OPENAI_TOOLS, stream=True):
                for choice in chunk.choices:
                    content += choice.delta.content or ""
                    for tc in choice.delta.tool_calls or ():
                        entry = calls.setdefault(
                            tc.index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
                        )
                        entry["id"] = tc.id or entry["id"]
                        if tc.function is not None:
                            entry["function"]["name"] += tc.function.name or ""
                            entry["function"]["arguments"] += tc.function.arguments or ""
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = [calls[i] for i in sorted(calls)]
        else:
            reply = c.chat.completions.create(model=MODEL, messages=messages, tools=OPENAI_TOOLS)
            message = reply.choices[0].message.model_dump(exclude_none=True, exclude={"reasoning_content"})
        if echo is not None and message.get("tool_calls"):
            message["reasoning_content"] = f"{echo} {n}"
        messages.append(message)
        if not message.get("tool_calls"):
            break
        for call in message["tool_calls"]:
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": "ok"})
    for c in clients:
        c.close()
    return messages


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_openai_sdk_loop_sending_model_dump_back_without_reasoning(
    gateway: Process, sim: Process, stream: bool
) -> None:
    before = restored(gateway, "pass")
    messages = openai_loop([gateway.url], KEYS["pass"], None, stream)
    assert sum(len(m.get("tool_calls") or ()) for m in messages) == 2 * ROUNDS
    assert messages[-1]["role"] == "assistant" and messages[-1]["content"]
    assert_loop_kept_its_reasoning(sim)
    assert delta(restored(gateway, "pass"), before) == {"store": 1 + 2 + 3}


def test_openai_sdk_loop_that_sends_its_reasoning_back_is_never_overridden(gateway: Process, sim: Process) -> None:
    before = restored(gateway, "pass")
    openai_loop([gateway.url], KEYS["pass"], "the client's own notes")
    sent = upstream_bodies(sim, 1)[0]["messages"]
    turns = [m["reasoning_content"] for m in sent if m["role"] == "assistant" and m.get("tool_calls")]
    assert turns == [f"the client's own notes {n}" for n in range(ROUNDS)]
    assert delta(restored(gateway, "pass"), before) == {"client": 1 + 2 + 3}


# -- two replicas sharing Redis


@pytest.mark.redis
def test_the_loop_alternates_between_two_replicas_on_redis(tmp_path: Path, sim: Process) -> None:
    from tests.e2e.redis_helpers import drop_namespace, shared_redis, state_yaml

    url, namespace = shared_redis()
    procs: list[Process] = []
    try:
        for i in range(2):
            config = write_gateway(
                tmp_path,
                upstreams_yaml(sim),
                policy("pass", vllm=False),
                extra_yaml=state_yaml(url, namespace),
                name=f"replica{i}",
            )
            procs.append(start_gateway(config))
        before = [restored(p, "pass") for p in procs]
        messages = openai_loop([p.url for p in procs], KEYS["pass"], None)
        assert sum(len(m.get("tool_calls") or ()) for m in messages) == 2 * ROUNDS
        assert_loop_kept_its_reasoning(sim)
        # requests 1 and 3 (with 1 and 3 tool-call turns) went to replica 1, request 2 to replica 0:
        # each found turns the other replica had served
        gained = [delta(restored(p, "pass"), b) for p, b in zip(procs, before, strict=True)]
        assert gained == [{"store": 2}, {"store": 1 + 3}]
    finally:
        for proc in procs:
            proc.stop()
        drop_namespace(url, namespace)


# -- nothing kept: placeholder, nothing, or reject

UNSEEN = [
    {"role": "user", "content": "A conversation this gateway never served"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "get_weather:0",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "get_weather:0", "content": "rain"},
]


def test_unseen_history_gets_the_placeholder_on_moonshot_and_nothing_on_vllm(
    gateway: Process, sim: Process, sims: dict[str, Process]
) -> None:
    c = gateway.openai(KEYS["pass"])
    before = restored(gateway, "pass")
    c.chat.completions.create(model=MODEL, messages=UNSEEN, tools=OPENAI_TOOLS)
    assert upstream_bodies(sim, 1)[0]["messages"][1]["reasoning_content"] == " "
    assert delta(restored(gateway, "pass"), before) == {"placeholder": 1}
    httpx.post(sims["vllm"].url + "/_sim/reset", timeout=5)
    c.chat.completions.create(model="k2-vllm", messages=UNSEEN, tools=OPENAI_TOOLS)
    sent = upstream_bodies(sims["vllm"], 1)[0]["messages"][1]
    assert "reasoning" not in sent and "reasoning_content" not in sent
    assert delta(restored(gateway, "pass"), before) == {"placeholder": 1, "none": 1}


def ledger_row(gw: Process, request_id: str) -> tuple[Any, ...]:
    db = gw.log.parent / "gateway-ledger.db"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if db.exists():
            with contextlib.closing(sqlite3.connect(db)) as conn:
                row = conn.execute(
                    "SELECT status, outcome, cost_nanos, prompt_tokens, completion_tokens, upstream FROM ledger "
                    "WHERE request_id = ?",
                    (request_id,),
                ).fetchone()
            if row is not None:
                return tuple(row)
        time.sleep(0.05)
    raise AssertionError(f"no ledger row for {request_id}")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_reject_answers_400_before_any_upstream_call_or_spend(gateway: Process, sim: Process, stream: bool) -> None:
    c = gateway.openai(KEYS["reject"])
    calls_before = len(upstream_bodies(sim))
    with pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(model=MODEL, messages=UNSEEN, tools=OPENAI_TOOLS, stream=stream)
    error = info.value
    assert error.status_code == 400
    assert error.code == "reasoning_missing" and error.param == "messages[1].reasoning_content"
    assert "messages[1]" in error.message and "Send the message back with the 'reasoning_content'" in error.message
    assert len(upstream_bodies(sim)) == calls_before  # nothing reached the upstream
    status, outcome, cost, prompt, completion, _ = ledger_row(gateway, error.response.headers["x-request-id"])
    assert (status, outcome, cost, prompt, completion) == (400, "rejected", 0, 0, 0)


def test_reject_tenant_loop_goes_on_when_the_gateway_kept_the_reasoning(gateway: Process, sim: Process) -> None:
    before = restored(gateway, "reject")
    messages = openai_loop([gateway.url], KEYS["reject"], None)
    assert sum(len(m.get("tool_calls") or ()) for m in messages) == 2 * ROUNDS
    assert delta(restored(gateway, "reject"), before) == {"store": 1 + 2 + 3}


def test_reject_through_the_messages_api_is_an_anthropic_400(gateway: Process, sim: Process) -> None:
    client = gateway.anthropic(KEYS["reject"])
    calls_before = len(upstream_bodies(sim))
    messages: list[Any] = [
        {"role": "user", "content": "A conversation this gateway never served"},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "get_weather:0", "name": "get_weather", "input": {"city": "Oslo"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "get_weather:0", "content": "rain"}]},
    ]  # fmt: skip
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model=MODEL, max_tokens=1000, tools=ANTHROPIC_TOOLS, messages=messages)
    body = info.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error" and "without its reasoning" in body["error"]["message"]
    assert len(upstream_bodies(sim)) == calls_before
