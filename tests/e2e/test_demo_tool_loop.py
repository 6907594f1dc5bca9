"""What a newcomer sees on config/demo.yaml: a tool loop of a small agent (a system prompt and three
tools) stays on the upstream that holds its prefix, its second turn is a cache hit, and the spend
report shows cached tokens, savings and reasoning tokens, readable in 80 columns. Then the loop is
forced across dialects (a vLLM-shaped upstream fails mid-loop, a Moonshot-shaped one takes over, and
the other way round): the next turn is accepted by the upstream that enforces Moonshot's reasoning
rule, with the client's tool-call ids, arguments and reasoning intact. Stream and non-stream.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from gateway.metering.money import fmt_usd
from tests.conftest import DEMO_KEY, PYTHON, ROOT, Process, free_port, hashed, start_gateway, write_gateway
from tests.e2e.test_readme_snippets import instant_demo_config
from tests.waiting import settled

AUTH = {"authorization": f"Bearer {DEMO_KEY}"}
SYSTEM = (
    "You are a travel assistant for a booking website. Answer in the user's language. Use the tools "
    "for anything that changes: weather, flights and hotel availability; never guess prices or times. "
    "When a tool fails, say so and suggest what the user can do next. Keep answers short: a summary "
    "line, then at most five bullet points. Prices are in euros unless the user asks otherwise."
)
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather and a three-day forecast for a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name, e.g. Paris"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search_flights",
            "description": "Direct and one-stop flights between two airports on a date, cheapest first.",
            "parameters": {
                "type": "object",
                "properties": {
                    "origin": {"type": "string", "description": "IATA code, e.g. CDG"},
                    "destination": {"type": "string", "description": "IATA code, e.g. FCO"},
                    "date": {"type": "string", "description": "YYYY-MM-DD"},
                },
                "required": ["origin", "destination", "date"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "find_hotels",
            "description": "Hotels with free rooms in a city for a stay, with the nightly price.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "check_in": {"type": "string", "description": "YYYY-MM-DD"},
                    "nights": {"type": "integer", "minimum": 1},
                },
                "required": ["city", "check_in", "nights"],
            },
        },
    },
]
QUESTION = "I fly from Paris to Rome on 2026-12-18. Weather there, and a hotel for 3 nights?"


def conversation(name: str) -> list[dict[str, Any]]:
    """A new conversation of the agent (the same tools and system prompt, its own question)."""
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"{QUESTION} ({name})"}]


def turn(
    client: OpenAI, messages: list[dict[str, Any]], stream: bool, app: str
) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
    """One request of the loop: (gateway headers, the assistant message as the app sends it back, usage)."""
    extra = {"x-gateway-tags": f"loop={app}"}
    kwargs: dict[str, Any] = {"model": "kimi-k2-thinking", "messages": messages, "tools": TOOLS, "user": app}
    if not stream:
        raw = client.chat.completions.with_raw_response.create(**kwargs, extra_headers=extra)
        reply = raw.parse()
        assert reply.usage is not None
        message = reply.choices[0].message.model_dump(exclude_none=True)
        return dict(raw.headers), message, reply.usage.model_dump()
    raw = client.chat.completions.with_raw_response.create(
        **kwargs, stream=True, stream_options={"include_usage": True}, extra_headers=extra
    )
    content, reasoning, calls, usage = "", "", {}, None  # type: ignore[var-annotated]
    for chunk in raw.parse():
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            reasoning += getattr(delta, "reasoning_content", None) or ""
            for call in delta.tool_calls or ():
                slot = calls.setdefault(call.index, {"id": "", "type": "function", "name": "", "arguments": ""})
                slot["id"] = call.id or slot["id"]
                if call.function is not None:
                    slot["name"] += call.function.name or ""
                    slot["arguments"] += call.function.arguments or ""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for _, c in sorted(calls.items())
        ]
    assert usage is not None, "no usage chunk although include_usage was asked for"
    return dict(raw.headers), message, usage


def answer_tools(messages: list[dict[str, Any]], message: dict[str, Any]) -> None:
    messages.append(message)
    for call in message.get("tool_calls") or ():
        result = {"ok": True, "tool": call["function"]["name"], "args": json.loads(call["function"]["arguments"])}
        messages.append({"role": "tool", "tool_call_id": call["id"], "content": json.dumps(result)})


def cached_of(usage: dict[str, Any]) -> int:
    return int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or usage.get("cached_tokens") or 0)


# ------------------------------------------------------------------------------------------- the demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Process, Path]]:
    config = instant_demo_config(tmp_path_factory.mktemp("demo-loop"))
    proc = start_gateway(config)
    yield proc, config
    proc.stop()


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_the_demo_tool_loop_stays_where_its_prefix_is_cached_and_the_report_shows_it(
    demo: tuple[Process, Path], stream: bool
) -> None:
    gw, config = demo
    app = f"loop-{'stream' if stream else 'whole'}"
    client = gw.openai(DEMO_KEY)
    messages = conversation(app)
    served, reasons, usages = [], [], []
    for _ in range(4):  # the demo's model calls tools once, then answers
        if served:  # what route/explain says before the turn is sent
            plan = httpx.post(
                gw.url + "/v1/route/explain",
                json={"model": "kimi-k2-thinking", "messages": messages, "tools": TOOLS},
                headers=AUTH,
                timeout=10,
            ).json()
            assert plan["prefix_holder"] == served[0], plan
            assert plan["plan"][0]["candidate"] == served[0], plan
            assert plan["plan"][0]["held_prefix_tokens"] > 256, plan
            if plan["kept_on_prefix_holder"]:  # cheaper elsewhere this turn: the reason says why it stays
                assert plan["reason"].startswith(f"balanced: stays on {served[0]}"), plan
                assert "holds less of this conversation's prefix" in plan["plan"][1]["reason"], plan
        headers, message, usage = turn(client, messages, stream, app)
        served.append(headers["x-gateway-upstream"])
        reasons.append(headers["x-gateway-route-reason"])
        usages.append(usage)
        answer_tools(messages, message)
        if not message.get("tool_calls"):
            break
    assert len(served) == 2 and served[0] == served[1], (served, reasons)
    assert usages[0]["prompt_tokens"] > 256  # a real agent's prompt: past Moonshot's caching minimum
    # turn 2 repeats turn 1's prompt: a hit on all of it (turn 1 may hit the tools and system prompt
    # another conversation left in the same cache)
    assert cached_of(usages[1]) >= max(256, cached_of(usages[0])) and cached_of(usages[1]) > cached_of(usages[0])

    spend = settled(
        lambda: httpx.get(gw.url + "/v1/spend", params={"group_by": "user,endpoint"}, headers=AUTH, timeout=10)
    ).json()
    (row,) = [r for r in spend["data"] if r["user"] == app]
    assert row["endpoint"] == "chat/completions" and row["requests"] == 2
    assert row["cached_tokens"] == cached_of(usages[1])
    assert Decimal(row["cache_savings_usd"]) > 0
    reported_reasoning = sum((u.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0 for u in usages)
    if served[0].startswith("vllm-sim/"):  # vLLM reports reasoning tokens; Moonshot folds them into completion
        assert reported_reasoning > 0
    assert row["reasoning_tokens"] == reported_reasoning

    total = spend["data"][-1]
    assert total["total"] is True
    report = subprocess.run(
        [PYTHON, "-m", "gateway.cli", "spend", "report", "--config", str(config), "--by", "endpoint,upstream"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "80"},
        check=True,
    ).stdout
    lines = report.splitlines()
    assert max(len(line) for line in lines) <= 80, report
    assert fmt_usd(Decimal(total["cost_usd"])) in report and fmt_usd(Decimal(total["cache_savings_usd"])) in report
    assert "chat/completions" in report and "reasoning" in report and "cached" in report


# --------------------------------------------------------------- a forced move between the dialects


def start_sim(tmp: Path, profile: str) -> Process:
    port = free_port()
    args = [PYTHON, "-m", "gateway.cli", "simulate", "--port", str(port), "--profile", profile]
    args += ["--ttft-ms", "0", "--tokens-per-s", "0", "--tool-rounds", "2"]
    return Process(args, port, tmp / f"sim-{profile}-{port}.log", "/health")


@pytest.fixture(scope="module")
def sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Process]]:
    tmp = tmp_path_factory.mktemp("dialect-move")
    started = {"moonshot-sim": start_sim(tmp, "instant"), "vllm-sim": start_sim(tmp, "vllm")}
    yield started
    for proc in started.values():
        proc.stop()


def mirror_of_the_demo(folder: Path, sims: dict[str, Process], cheaper: str) -> Path:
    """The demo's kimi-k2-thinking route over real simulator processes (their request logs readable);
    ``cheaper`` is priced below the other so it serves the first turn."""
    upstreams = (
        f"  moonshot-sim:\n    kind: openai\n    base_url: {sims['moonshot-sim'].url}/v1\n"
        "    models: [kimi-k2-thinking]\n"
        f"  vllm-sim:\n    kind: openai\n    base_url: {sims['vllm-sim'].url}/v1\n    reasoning_field: reasoning\n"
        "    models:\n      kimi-k2-thinking: moonshotai/Kimi-K2-Thinking\n"
    )
    policy = (
        f"tenant: demo\nkeys: ['{hashed(DEMO_KEY)}']\nmodels:\n  kimi-k2-thinking:\n"
        "    candidates: [moonshot-sim/kimi-k2-thinking, vllm-sim/kimi-k2-thinking]\n"
    )
    cheap = {"input_miss": "0.30", "input_hit": "0.03", "output": "1.00"}
    return write_gateway(folder, upstreams, policy, prices={f"{cheaper}/kimi-k2-thinking": cheap}, name=cheaper)


def last_request(sim: Process) -> dict[str, Any]:
    seen = httpx.get(sim.url + "/_sim/requests", params={"limit": 1}, timeout=5).json()
    body: dict[str, Any] = seen[-1]["body"]
    return body


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
@pytest.mark.parametrize(("first", "then"), [("vllm-sim", "moonshot-sim"), ("moonshot-sim", "vllm-sim")])
def test_a_loop_forced_across_dialects_keeps_ids_arguments_and_reasoning(
    sims: dict[str, Process], tmp_path: Path, first: str, then: str, stream: bool
) -> None:
    for sim in sims.values():
        httpx.post(sim.url + "/_sim/reset", timeout=5)
    gw = start_gateway(mirror_of_the_demo(tmp_path, sims, cheaper=first))
    try:
        client = gw.openai(DEMO_KEY)
        messages = conversation(f"{first}-{stream}")
        headers, one, _ = turn(client, messages, stream, "move")
        assert headers["x-gateway-upstream"] == f"{first}/kimi-k2-thinking"
        calls = one["tool_calls"]
        assert calls and one["reasoning_content"]
        answer_tools(messages, one)

        # the holder fails from now on: the next turn fails over to the other dialect
        httpx.post(sims[first].url + "/_sim/faults", json={"status": 503, "count": -1}, timeout=5)
        try:
            headers, two, _ = turn(client, messages, stream, "move")
        finally:
            httpx.delete(sims[first].url + "/_sim/faults", timeout=5)
        assert headers["x-gateway-upstream"] == f"{then}/kimi-k2-thinking"
        assert "failover to candidate 2" in headers["x-gateway-route-reason"], headers["x-gateway-route-reason"]

        sent = last_request(sims[then])["messages"]
        (assistant,) = [m for m in sent if m.get("role") == "assistant"]
        assert [c["id"] for c in assistant["tool_calls"]] == [c["id"] for c in calls]
        assert [c["function"]["arguments"] for c in assistant["tool_calls"]] == [
            c["function"]["arguments"] for c in calls
        ]
        field = "reasoning" if then == "vllm-sim" else "reasoning_content"
        assert assistant[field] == one["reasoning_content"]
        assert [m["tool_call_id"] for m in sent if m.get("role") == "tool"] == [c["id"] for c in calls]

        # the loop goes on where it moved to, though the first upstream is healthy and cheaper again
        assert two.get("tool_calls"), two
        answer_tools(messages, two)
        headers, three, _ = turn(client, messages, stream, "move")
        assert headers["x-gateway-upstream"] == f"{then}/kimi-k2-thinking", headers["x-gateway-route-reason"]
        assert headers["x-gateway-route-reason"].startswith(f"balanced: stays on {then}/kimi-k2-thinking")
        assert three.get("content") and not three.get("tool_calls")
        ids = [c["id"] for m in messages if m.get("role") == "assistant" for c in m.get("tool_calls") or ()]
        assert len(ids) == len(set(ids)) == len(calls) + len(two["tool_calls"])
    finally:
        gw.stop()


def test_spend_by_endpoint_tells_the_apis_apart(demo: tuple[Process, Path]) -> None:
    gw, _ = demo
    user = "endpoints"
    gw.openai(DEMO_KEY).chat.completions.create(
        model="kimi-k2-thinking", messages=[{"role": "user", "content": "hi"}], user=user
    )
    gw.anthropic(DEMO_KEY).messages.create(
        model="kimi-k2-thinking",
        max_tokens=512,
        messages=[{"role": "user", "content": "hi"}],
        metadata={"user_id": user},
    )
    spend = settled(
        lambda: httpx.get(gw.url + "/v1/spend", params={"group_by": "user,endpoint"}, headers=AUTH, timeout=10)
    ).json()
    mine = {r["endpoint"]: r["requests"] for r in spend["data"] if r["user"] == user}
    assert mine == {"chat/completions": 1, "messages": 1}, spend
    csv = settled(
        lambda: httpx.get(
            gw.url + "/v1/spend", params={"group_by": "endpoint", "format": "csv"}, headers=AUTH, timeout=10
        )
    ).text
    assert csv.splitlines()[0].startswith("endpoint,requests,") and "\nmessages," in csv
    bad = httpx.get(gw.url + "/v1/spend", params={"group_by": "endpoints"}, headers=AUTH, timeout=10)
    assert bad.status_code == 400 and "did you mean 'endpoint'?" in bad.json()["error"]["message"]
    assert bad.json()["error"]["param"] == "group_by"
