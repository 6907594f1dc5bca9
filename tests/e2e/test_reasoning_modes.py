"""Reasoning modes end to end: the official openai SDK against ``kimi-gateway serve`` in front of the
simulator's HTTP servers (Moonshot, vLLM with parsers, vLLM without a reasoning parser).

The tool loops check both ends: what the client receives (never any reasoning under ``strip``) and
what the simulated upstream receives (the original reasoning on every assistant tool-call message,
which the Moonshot profile insists on with the same 400 as the real API)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from simulator.text import REASONING
from tests.conftest import Process, hashed, start_gateway, start_simulator, write_gateway
from tests.e2e.test_dropin import TOOLS

KEY_STRIP = "sk-tenant-strip"
KEY_REDACT = "sk-tenant-redact"
KEY_PASS = "sk-tenant-pass"
REASONING_KEYS = ("reasoning_content", "reasoning")
FIRST_REASONING = REASONING.take(1, 0)[0][0].strip()  # "The user wants"


def expected_reasoning(chunks: int) -> str:
    """The simulator's reasoning for ``chunks`` pieces (deterministic; a different text per length)."""
    return "".join(REASONING.take(chunks, 0)[0])


@pytest.fixture(scope="module")
def vllm_sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Process]]:
    folder = tmp_path_factory.mktemp("reasoning-sims")
    procs = {
        "vllm": start_simulator(folder, "vllm", "--ttft-ms", "0", "--tokens-per-s", "0"),
        "raw": start_simulator(folder, "vllm-raw", "--ttft-ms", "0", "--tokens-per-s", "0"),
    }
    yield procs
    for proc in procs.values():
        proc.stop()


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, simulator: Process, vllm_sims: dict[str, Process]
) -> Iterator[Process]:
    folder = tmp_path_factory.mktemp("reasoning")
    upstreams = f"""\
  sim:
    kind: openai
    base_url: {simulator.url}/v1
    models: [kimi-k2-thinking]
  vllm:
    kind: openai
    base_url: {vllm_sims["vllm"].url}/v1
    reasoning_field: reasoning
    models: {{kimi-k2-thinking: moonshotai/Kimi-K2-Thinking}}
  raw:
    kind: openai
    base_url: {vllm_sims["raw"].url}/v1
    reasoning_field: reasoning
    think_in_content: true
    models: {{kimi-k2-thinking: moonshotai/Kimi-K2-Thinking}}
"""
    models = """\
models:
  k2: {candidates: [sim/kimi-k2-thinking]}
  k2-vllm: {candidates: [vllm/kimi-k2-thinking]}
  k2-raw: {candidates: [raw/kimi-k2-thinking]}
"""
    policy = f'tenant: strip\nkeys: ["{hashed(KEY_STRIP)}"]\n{models}reasoning: {{mode: strip}}\n'
    config = write_gateway(folder, upstreams, policy)
    policies = config.parent / "gateway-policies"
    (policies / "redact.yaml").write_text(
        f'tenant: redact\nkeys: ["{hashed(KEY_REDACT)}"]\n{models}'
        "reasoning:\n  mode: redact\n  field: reasoning\n"
        "  redact: {patterns: [{kind: restated, regex: 'restate'}, {kind: wants, regex: 'wants'}]}\n"
    )
    (policies / "pass.yaml").write_text(
        f'tenant: pass\nkeys: ["{hashed(KEY_PASS)}"]\n{models}reasoning: {{field: reasoning}}\n'
    )
    proc = start_gateway(config)
    yield proc
    proc.stop()


def client(gw: Process, key: str) -> OpenAI:
    return gw.openai(key)


def upstream_requests(sim: Process, limit: int = 1) -> list[dict[str, Any]]:
    return [e["body"] for e in httpx.get(f"{sim.url}/_sim/requests?limit={limit}", timeout=5).json()]


def no_reasoning_keys(obj: Any) -> bool:
    """True when no dict anywhere in ``obj`` has a reasoning field."""
    if isinstance(obj, dict):
        return not any(k in obj for k in REASONING_KEYS) and all(no_reasoning_keys(v) for v in obj.values())
    if isinstance(obj, list):
        return all(no_reasoning_keys(v) for v in obj)
    return True


def one_turn(c: OpenAI, model: str, messages: list[Any], stream: bool, sim: dict[str, Any]) -> tuple[Any, str, str]:
    """One request; returns (assistant message to send back, finish_reason, everything received as JSON)."""
    if not stream:
        resp = c.chat.completions.create(model=model, messages=messages, tools=TOOLS, extra_body={"sim": sim})
        choice = resp.choices[0]
        # a typical client appends the SDK's message object itself
        return choice.message, str(choice.finish_reason), resp.model_dump_json()
    return assemble_stream(
        c.chat.completions.create(model=model, messages=messages, tools=TOOLS, stream=True, extra_body={"sim": sim})
    )


def assemble_stream(chunks: Iterable[Any]) -> tuple[dict[str, Any], str, str]:
    """An SDK chat stream as (the assistant message a client sends back, finish_reason, every chunk
    received as JSON)."""
    content, finish = "", ""
    calls: dict[int, dict[str, Any]] = {}
    seen: list[Any] = []
    for chunk in chunks:
        seen.append(chunk.model_dump())
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            for tc in delta.tool_calls or ():
                entry = calls.setdefault(
                    tc.index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
                )
                entry["id"] = tc.id or entry["id"]
                if tc.function is not None:
                    entry["function"]["name"] = tc.function.name or entry["function"]["name"]
                    entry["function"]["arguments"] += tc.function.arguments or ""
            finish = choice.finish_reason or finish
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return message, finish, json.dumps(seen)


def run_tool_loop(gw: Process, sim: Process, key: str, model: str, stream: bool, field: str, turns: int = 6) -> None:
    c = client(gw, key)
    messages: list[Any] = [{"role": "user", "content": "Weather and time in Beijing, then Shanghai, then more?"}]
    expected: list[str] = []
    for turn in range(turns):
        chunks = 2 + turn  # a different reasoning text every turn
        message, finish, received = one_turn(c, model, messages, stream, {"tool_calls": 2, "reasoning_chunks": chunks})
        assert finish == "tool_calls"
        assert no_reasoning_keys(json.loads(received)), received[:500]
        assert FIRST_REASONING not in received
        expected.append(expected_reasoning(chunks))
        messages.append(message)
        calls = message.tool_calls if not isinstance(message, dict) else message["tool_calls"]
        assert len(calls) == 2  # parallel calls
        for call in calls:
            call_id = call.id if not isinstance(call, dict) else call["id"]
            messages.append({"role": "tool", "tool_call_id": call_id, "content": '{"ok": true}'})
        sent = upstream_requests(sim)[0]["messages"]
        assistants = [m for m in sent if m["role"] == "assistant"]
        assert [m[field] for m in assistants] == expected[:-1]
        assert all(m.get("tool_calls") for m in assistants)
    # the answer after the last tool results
    message, finish, received = one_turn(c, model, messages, stream, {"reasoning_chunks": 3})
    assert finish == "stop" and FIRST_REASONING not in received and no_reasoning_keys(json.loads(received))
    sent = upstream_requests(sim)[0]["messages"]
    assert [m[field] for m in sent if m["role"] == "assistant"] == expected
    other = "reasoning" if field == "reasoning_content" else "reasoning_content"
    assert not any(other in m for m in sent)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_strip_tool_loop_on_moonshot_restores_reasoning_every_turn(
    gateway: Process, sim: Process, stream: bool
) -> None:
    before = gateway.metric("gateway_reasoning_restored_total", tenant="strip", source="store")
    misses = gateway.metric("gateway_reasoning_restored_total", tenant="strip", source="placeholder")
    run_tool_loop(gateway, sim, KEY_STRIP, "k2", stream, "reasoning_content")
    # turns 2..7 restore 1+2+...+6 assistant messages, all from the store
    assert gateway.metric("gateway_reasoning_restored_total", tenant="strip", source="store") - before == 21
    assert gateway.metric("gateway_reasoning_restored_total", tenant="strip", source="placeholder") == misses


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_strip_tool_loop_on_vllm_restores_reasoning_in_its_field(
    gateway: Process, vllm_sims: dict[str, Process], stream: bool
) -> None:
    httpx.post(vllm_sims["vllm"].url + "/_sim/reset", timeout=5)
    run_tool_loop(gateway, vllm_sims["vllm"], KEY_STRIP, "k2-vllm", stream, "reasoning", turns=5)


def test_moonshot_profile_rejects_a_tool_loop_without_reasoning(sim: Process) -> None:
    """What the gateway's restore prevents (tests/e2e/test_agent_frameworks.py): straight to the
    simulator, a tool-call turn without reasoning, or with an empty one, gets K2's 400; the
    placeholder " " passes."""
    c = OpenAI(base_url=sim.url + "/v1", api_key="unused", max_retries=0, timeout=10)
    for reasoning in (None, ""):
        extra = {} if reasoning is None else {"reasoning_content": reasoning}
        messages: list[Any] = [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "", **extra, "tool_calls": [
                {"id": "get_weather:0", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "get_weather:0", "content": "sunny"},
        ]  # fmt: skip
        with pytest.raises(openai.BadRequestError) as info:
            c.chat.completions.create(model="kimi-k2-thinking", messages=messages, tools=TOOLS)
        assert "reasoning_content is missing in assistant tool call message at index 1" in str(info.value)
    messages[1]["reasoning_content"] = " "
    assert c.chat.completions.create(model="kimi-k2-thinking", messages=messages, tools=TOOLS).choices


def test_strip_unknown_turn_falls_back_to_the_placeholder_and_counts_it(gateway: Process, sim: Process) -> None:
    c = client(gateway, KEY_STRIP)
    before = gateway.metric("gateway_reasoning_restored_total", tenant="strip", source="placeholder")
    messages: list[Any] = [
        {"role": "user", "content": "A conversation this gateway never saw"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "get_weather:0", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "get_weather:0", "content": "sunny"},
    ]  # fmt: skip
    resp = c.chat.completions.create(model="k2", messages=messages, tools=TOOLS)
    assert resp.choices[0].finish_reason == "stop"
    assert upstream_requests(sim)[0]["messages"][1]["reasoning_content"] == " "
    assert gateway.metric("gateway_reasoning_restored_total", tenant="strip", source="placeholder") == before + 1


def test_client_sent_reasoning_goes_upstream_in_the_upstreams_field(
    gateway: Process, vllm_sims: dict[str, Process]
) -> None:
    """A pass tenant's client echoes ``reasoning_content``; vLLM >= 0.16 reads only ``reasoning``."""
    c = client(gateway, KEY_PASS)
    messages: list[Any] = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "reasoning_content": "I should call the tool.", "content": "", "tool_calls": [
            {"id": "functions.get_weather:0", "type": "function",
             "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny"},
    ]  # fmt: skip
    c.chat.completions.create(model="k2-vllm", messages=messages, tools=TOOLS)
    sent = upstream_requests(vllm_sims["vllm"])[0]["messages"][1]
    assert list(sent) == ["role", "reasoning", "content", "tool_calls"]  # renamed in place
    assert sent["reasoning"] == "I should call the tool."


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_pass_tenant_reads_reasoning_under_its_own_field_name(gateway: Process, sim: Process, stream: bool) -> None:
    c = client(gateway, KEY_PASS)
    args: dict[str, Any] = {"model": "k2", "messages": [{"role": "user", "content": "hi"}]}
    args["extra_body"] = {"sim": {"reasoning_chunks": 3}}
    if stream:
        chunks = list(c.chat.completions.create(stream=True, **args))
        reasoning = "".join(
            (ch.choices[0].delta.model_extra or {}).get("reasoning") or "" for ch in chunks if ch.choices
        )
        assert all("reasoning_content" not in (ch.choices[0].delta.model_extra or {}) for ch in chunks if ch.choices)
    else:
        message = c.chat.completions.create(**args).choices[0].message
        reasoning = (message.model_extra or {}).get("reasoning")
        assert "reasoning_content" not in (message.model_extra or {})
    assert reasoning == expected_reasoning(3)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_redact_tenant_sees_redacted_reasoning_and_upstream_gets_the_original(
    gateway: Process, sim: Process, stream: bool
) -> None:
    c = client(gateway, KEY_REDACT)
    messages: list[Any] = [{"role": "user", "content": "Weather in Beijing?"}]
    sim_opts = {"tool_calls": 1, "reasoning_chunks": 4}
    if stream:
        chunks = list(c.chat.completions.create(model="k2", messages=messages, tools=TOOLS, stream=True,
                                                extra_body={"sim": sim_opts}))  # fmt: skip
        shown = "".join((ch.choices[0].delta.model_extra or {}).get("reasoning") or "" for ch in chunks if ch.choices)
        call = next(ch.choices[0].delta.tool_calls[0] for ch in chunks if ch.choices and ch.choices[0].delta.tool_calls)
        calls = [{"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": ""}}]
        calls[0]["function"]["arguments"] = "".join(
            tc.function.arguments or ""
            for ch in chunks
            if ch.choices and ch.choices[0].delta.tool_calls
            for tc in ch.choices[0].delta.tool_calls
        )
        echoed = {"role": "assistant", "content": "", "reasoning": shown, "tool_calls": calls}
    else:
        msg = c.chat.completions.create(model="k2", messages=messages, tools=TOOLS, extra_body={"sim": sim_opts})
        message = msg.choices[0].message
        shown = (message.model_extra or {})["reasoning"]
        echoed = message  # type: ignore[assignment]
        calls = [{"id": message.tool_calls[0].id}]  # type: ignore[index]
    original = expected_reasoning(4)
    assert "restate" in original and "wants" in original
    assert shown == original.replace("restate", "[REDACTED:restated]").replace("wants", "[REDACTED:wants]")
    # the client echoes the redacted copy back: the upstream still gets the original
    messages += [echoed, {"role": "tool", "tool_call_id": calls[0]["id"], "content": "sunny"}]
    c.chat.completions.create(model="k2", messages=messages, tools=TOOLS)
    sent = upstream_requests(sim)[0]["messages"][1]
    assert sent["reasoning_content"] == original and "reasoning" not in sent


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_strip_removes_think_text_from_content_of_a_parserless_vllm(
    gateway: Process, vllm_sims: dict[str, Process], stream: bool
) -> None:
    c = client(gateway, KEY_STRIP)
    args: dict[str, Any] = {"model": "k2-raw", "messages": [{"role": "user", "content": "hi"}]}
    args["extra_body"] = {"sim": {"reasoning_chunks": 5, "content_chunks": 4}}
    if stream:
        chunks = list(c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args))
        content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert chunks[-2].choices[0].finish_reason == "stop"
        received = "".join(ch.model_dump_json() for ch in chunks)
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    else:
        resp = c.chat.completions.create(**args)
        content = resp.choices[0].message.content or ""
        received = resp.model_dump_json()
    # the raw upstream really sent reasoning and </think> inside content
    raw = httpx.post(
        vllm_sims["raw"].url + "/v1/chat/completions",
        json={"model": "moonshotai/Kimi-K2-Thinking", "messages": args["messages"], **args["extra_body"]},
        timeout=5,
    ).json()["choices"][0]["message"]["content"]
    assert "</think>" in raw and FIRST_REASONING in raw
    assert content == raw.split("</think>", 1)[1]
    assert FIRST_REASONING not in received and "think>" not in received


def test_strip_leaks_nothing_when_the_stream_breaks_or_the_upstream_errors(gateway: Process, sim: Process) -> None:
    # a stream cut in the middle of the reasoning: an error event, and still no reasoning
    with httpx.stream(
        "POST",
        gateway.url + "/v1/chat/completions",
        headers={"authorization": f"Bearer {KEY_STRIP}"},
        json={
            "model": "k2",
            "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
            "sim": {"reasoning_chunks": 8, "fault": {"cut_after_events": 5}},
        },
        timeout=10,
    ) as resp:
        body = resp.read().decode()
    assert resp.status_code == 200 and '"error"' in body
    assert FIRST_REASONING not in body and not re.search(r'"reasoning(_content)?"', body)
    # an upstream error answer
    r = httpx.post(
        gateway.url + "/v1/chat/completions",
        headers={"authorization": f"Bearer {KEY_STRIP}"},
        json={"model": "k2", "messages": [{"role": "user", "content": "hi"}], "sim": {"fault": {"status": 503}}},
        timeout=10,
    )
    assert r.status_code == 502 and "error" in r.json()
    assert FIRST_REASONING not in r.text and "reasoning" not in r.text


def test_pass_tenant_with_matching_field_relays_upstream_bytes_untouched(
    gateway: Process, vllm_sims: dict[str, Process]
) -> None:
    """No transform for a pass tenant that reads the upstream's own field: byte-for-byte relay."""
    body = {"model": "k2-vllm", "messages": [{"role": "user", "content": "hi"}], "sim": {"reasoning_chunks": 2}}
    via = httpx.post(gateway.url + "/v1/chat/completions", headers={"authorization": f"Bearer {KEY_PASS}"}, json=body)
    # the pass tenant reads `reasoning`, which vLLM writes: the key order of vLLM's message survives
    message = via.json()["choices"][0]["message"]
    assert list(message)[:3] == ["role", "content", "reasoning"]
    assert message["reasoning"] == expected_reasoning(2)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_redact_moves_think_text_of_a_parserless_vllm_into_the_reasoning_field(
    gateway: Process, vllm_sims: dict[str, Process], stream: bool
) -> None:
    c = client(gateway, KEY_REDACT)
    args: dict[str, Any] = {"model": "k2-raw", "messages": [{"role": "user", "content": "hi"}]}
    args["extra_body"] = {"sim": {"reasoning_chunks": 4, "content_chunks": 3}}
    if stream:
        chunks = list(c.chat.completions.create(stream=True, **args))
        content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        shown = "".join((ch.choices[0].delta.model_extra or {}).get("reasoning") or "" for ch in chunks if ch.choices)
    else:
        message = c.chat.completions.create(**args).choices[0].message
        content, shown = message.content or "", (message.model_extra or {}).get("reasoning")
    assert shown == expected_reasoning(4).replace("restate", "[REDACTED:restated]").replace("wants", "[REDACTED:wants]")
    assert "think>" not in content and FIRST_REASONING not in content and content
