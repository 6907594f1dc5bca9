"""Engine tests of the simulated upstream (no network): wire shapes, tokens, cache, validation, faults."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from simulator import PROFILES, Fault, Profile, SimReply, SimulatedDisconnect, Simulator, profile_from
from simulator.cache import PrefixCache, prefix_chain
from simulator.render import DONE_EVENT

INSTANT = profile_from("instant")
VLLM = profile_from("vllm", ttft_s=0, tokens_per_s=0, max_concurrency=0)
VLLM_RAW = profile_from("vllm-raw", ttft_s=0, tokens_per_s=0, max_concurrency=0)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {
                "tz": {"type": "string", "enum": ["UTC", "CET"]},
                "hours": {"type": "integer"},
                "dst": {"type": "boolean"},
            },
            "required": ["tz", "hours", "dst"],
        },
    },
}
USER = {"role": "user", "content": "What is the weather in Beijing?"}


def req(**fields: Any) -> bytes:
    payload: dict[str, Any] = {"model": "kimi-k2-thinking", "messages": [USER]}
    payload.update(fields)
    return orjson.dumps({k: v for k, v in payload.items() if v is not None})


async def body_of(reply: SimReply) -> dict[str, Any]:
    await reply.wait()
    assert reply.body is not None and reply.events is None
    return orjson.loads(reply.body)


async def events_of(reply: SimReply) -> list[bytes]:
    assert reply.events is not None, reply.body
    return [event async for event in reply.events]


def chunks(events: list[bytes]) -> list[dict[str, Any]]:
    """Decoded chunks; asserts every event is exactly one `data: ...\\n\\n` and the stream ends with [DONE]."""
    assert events[-1] == DONE_EVENT
    out = []
    for event in events[:-1]:
        assert event.startswith(b"data: ") and event.endswith(b"\n\n") and event.count(b"\n\n") == 1
        out.append(orjson.loads(event[6:]))
    return out


def error_of(reply: SimReply) -> dict[str, Any]:
    assert reply.body is not None
    return orjson.loads(reply.body)


async def until(condition: Callable[[], bool]) -> None:
    """Let the loop run until ``condition`` holds, within 5 s (a deadline, never a fixed sleep, then
    the test's own exact assertions)."""
    deadline = time.monotonic() + 5
    while not condition():
        assert time.monotonic() < deadline, "the simulator never got there"
        await asyncio.sleep(0.001)


# -- profiles ------------------------------------------------------------------------------------------


def test_builtin_profiles() -> None:
    assert set(PROFILES) >= {"moonshot-standard", "moonshot-turbo", "vllm", "vllm-raw", "instant"}
    assert PROFILES["moonshot-standard"].ttft_s > PROFILES["moonshot-turbo"].ttft_s
    assert PROFILES["moonshot-turbo"].tokens_per_s > PROFILES["moonshot-standard"].tokens_per_s
    assert PROFILES["vllm"].dialect == "vllm" and PROFILES["vllm"].parsers and PROFILES["vllm"].max_concurrency == 32
    assert not PROFILES["vllm-raw"].parsers
    assert "moonshotai/Kimi-K2-Thinking" in PROFILES["vllm"].models
    assert {"kimi-k2-thinking", "kimi-k2-thinking-turbo", "kimi-k2.6", "kimi-k3"} <= set(PROFILES["instant"].models)
    assert PROFILES["instant"].ttft_s == 0 and not PROFILES["instant"].timed
    assert PROFILES["moonshot-standard"].context_tokens == 262_144


def test_profile_from_overrides_and_errors() -> None:
    fast = profile_from("moonshot-standard", ttft_s=0, tokens_per_s=0, retired=["kimi-k2-thinking"])
    assert fast.ttft_s == 0 and fast.seconds_per_token == 0 and fast.retired == ("kimi-k2-thinking",)
    assert PROFILES["moonshot-standard"].ttft_s == 0.6  # the built-in is untouched
    with pytest.raises(ValueError, match=r"unknown simulator profile 'nope'.*instant"):
        profile_from("nope")
    with pytest.raises(ValueError, match=r"unknown profile field.*'ttft'"):
        profile_from("instant", ttft=1)
    with pytest.raises(ValueError, match="dialect"):
        profile_from("instant", dialect="openai")
    with pytest.raises(ValueError, match="ttft_s"):
        Profile("x", ttft_s=-1)


# -- Moonshot dialect ----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_moonshot_non_stream_shape() -> None:
    sim = Simulator(INSTANT)
    reply = sim.handle(req())
    assert reply.status == 200 and ("content-type", "application/json") in reply.headers
    data = await body_of(reply)
    assert data["object"] == "chat.completion" and data["model"] == "kimi-k2-thinking"
    assert data["id"].startswith("chatcmpl-") and isinstance(data["created"], int)
    choice = data["choices"][0]
    assert choice["finish_reason"] == "stop"
    message = choice["message"]
    assert message["role"] == "assistant" and message["content"] and message["reasoning_content"]
    assert "reasoning" not in message and "tool_calls" not in message
    usage = data["usage"]
    assert usage["cached_tokens"] == 0 and "prompt_tokens_details" not in usage
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert sim.stats.completed == 1 and sim.stats.in_flight == 0 and sim.stats.requests == 1


@pytest.mark.asyncio
async def test_moonshot_stream_shape_without_include_usage() -> None:
    sim = Simulator(INSTANT)
    parsed = chunks(await events_of(sim.handle(req(stream=True))))
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "kimi-k2-thinking" for c in parsed)
    assert len({c["id"] for c in parsed}) == 1 and all("created" in c for c in parsed)
    assert parsed[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    kinds = [next(iter(c["choices"][0]["delta"]), None) for c in parsed[1:-1]]
    assert kinds.count("reasoning_content") == INSTANT.reasoning_chunks
    assert kinds.count("content") == INSTANT.content_chunks
    assert kinds.index("content") > max(i for i, k in enumerate(kinds) if k == "reasoning_content")
    final = parsed[-1]
    assert final["choices"][0]["delta"] == {} and final["choices"][0]["finish_reason"] == "stop"
    usage = final["choices"][0]["usage"]  # Moonshot: usage inside the choice
    assert set(usage) == {"prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens"}
    assert "usage" not in final
    assert all(c["choices"] for c in parsed)  # no choices:[] chunk unless asked for
    assert sim.stats.completed == 1


@pytest.mark.asyncio
async def test_moonshot_stream_include_usage_adds_choices_empty_chunk() -> None:
    sim = Simulator(INSTANT)
    parsed = chunks(await events_of(sim.handle(req(stream=True, stream_options={"include_usage": True}))))
    last = parsed[-1]
    assert last["choices"] == []
    assert last["usage"]["cached_tokens"] == last["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert parsed[-2]["choices"][0]["usage"]["completion_tokens"] == last["usage"]["completion_tokens"] > 0


@pytest.mark.asyncio
async def test_stream_and_non_stream_carry_the_same_text() -> None:
    sim = Simulator(INSTANT)
    data = await body_of(sim.handle(req()))
    parsed = chunks(await events_of(sim.handle(req(stream=True))))
    deltas = [c["choices"][0]["delta"] for c in parsed]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == data["choices"][0]["message"]["reasoning_content"]
    assert "".join(d.get("content") or "" for d in deltas) == data["choices"][0]["message"]["content"]


@pytest.mark.asyncio
async def test_tools_give_parallel_calls_with_moonshot_ids() -> None:
    sim = Simulator(INSTANT)
    data = await body_of(sim.handle(req(tools=[WEATHER, TIME])))
    choice = data["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] == "" and message["reasoning_content"]
    calls = message["tool_calls"]
    assert [c["id"] for c in calls] == ["get_weather:0", "get_time:1"]
    assert orjson.loads(calls[0]["function"]["arguments"]) == {"city": "Beijing"}
    assert orjson.loads(calls[1]["function"]["arguments"]) == {"tz": "UTC", "hours": 1, "dst": True}
    assert all(c["type"] == "function" for c in calls)


@pytest.mark.asyncio
async def test_streamed_tool_call_fragments() -> None:
    sim = Simulator(INSTANT)
    parsed = chunks(await events_of(sim.handle(req(tools=[WEATHER, TIME], stream=True))))
    fragments = [c["choices"][0]["delta"]["tool_calls"][0] for c in parsed if "tool_calls" in c["choices"][0]["delta"]]
    assert len(fragments) > 2
    args: dict[int, str] = {}
    for fragment in fragments:
        index = fragment["index"]
        if index not in args:  # first fragment of a call: id, type and name, empty arguments
            assert fragment["id"] == ("get_weather:0" if index == 0 else "get_time:1")
            assert fragment["type"] == "function" and fragment["function"]["arguments"] == ""
            args[index] = ""
        else:
            assert set(fragment) == {"index", "function"} and set(fragment["function"]) == {"arguments"}
            args[index] += fragment["function"]["arguments"]
    assert orjson.loads(args[0]) == {"city": "Beijing"} and orjson.loads(args[1])["tz"] == "UTC"
    assert parsed[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert not any("content" in c["choices"][0]["delta"] for c in parsed[1:])


@pytest.mark.asyncio
async def test_after_tool_results_the_model_answers_in_text() -> None:
    sim = Simulator(INSTANT)
    first = await body_of(sim.handle(req(tools=[WEATHER])))
    assistant = first["choices"][0]["message"]
    messages = [USER, assistant, {"role": "tool", "tool_call_id": "get_weather:0", "content": '{"temp_c": 21}'}]
    second = await body_of(sim.handle(req(tools=[WEATHER], messages=messages)))
    assert second["choices"][0]["finish_reason"] == "stop"
    assert second["choices"][0]["message"]["content"].startswith("Based on the tool results")
    assert "tool_calls" not in second["choices"][0]["message"]


@pytest.mark.asyncio
async def test_tool_rounds_keep_the_loop_going_with_ids_unique_across_rounds() -> None:
    sim = Simulator(profile_from("instant", tool_rounds=3))
    messages: list[dict[str, Any]] = [USER]
    ids: list[str] = []
    for _ in range(3):
        answer = await body_of(sim.handle(req(tools=[WEATHER], messages=messages)))
        message = answer["choices"][0]["message"]
        assert answer["choices"][0]["finish_reason"] == "tool_calls"
        messages.append(message)
        for call in message["tool_calls"]:
            ids.append(call["id"])
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": "ok"})
    assert ids == ["get_weather:0", "get_weather:1", "get_weather:2"]
    final = await body_of(sim.handle(req(tools=[WEATHER], messages=messages)))
    assert final["choices"][0]["finish_reason"] == "stop"


@pytest.mark.asyncio
async def test_sim_overrides_counts() -> None:
    sim = Simulator(INSTANT)
    none = await body_of(sim.handle(req(tools=[WEATHER, TIME], sim={"tool_calls": 0})))
    assert none["choices"][0]["finish_reason"] == "stop" and none["choices"][0]["message"]["content"]
    three = await body_of(sim.handle(req(tools=[WEATHER], sim={"tool_calls": 3})))
    calls = three["choices"][0]["message"]["tool_calls"]
    assert [c["id"] for c in calls] == ["get_weather:0", "get_weather:1", "get_weather:2"]
    assert [orjson.loads(c["function"]["arguments"])["city"] for c in calls] == ["Beijing", "Shanghai", "Shenzhen"]
    parsed = chunks(await events_of(sim.handle(req(stream=True, sim={"reasoning_chunks": 2, "content_chunks": 5}))))
    kinds = [next(iter(c["choices"][0]["delta"]), None) for c in parsed[1:-1]]
    assert kinds == ["reasoning_content"] * 2 + ["content"] * 5
    bad = sim.handle(req(sim={"tool_calls": -1}))
    assert bad.status == 400 and "sim.tool_calls" in error_of(bad)["error"]["message"]
    typo = sim.handle(req(sim={"toolcalls": 1}))
    assert typo.status == 400 and "unknown sim option" in error_of(typo)["error"]["message"]


@pytest.mark.asyncio
async def test_tool_choice_none_prevents_calls() -> None:
    data = await body_of(Simulator(INSTANT).handle(req(tools=[WEATHER], tool_choice="none")))
    assert data["choices"][0]["finish_reason"] == "stop"


@pytest.mark.asyncio
async def test_max_tokens_cuts_reasoning_first_with_length() -> None:
    sim = Simulator(INSTANT)
    data = await body_of(sim.handle(req(max_tokens=10)))
    choice = data["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"] == ""  # reasoning used the whole budget, as on K2
    assert data["usage"]["completion_tokens"] == 10
    full = await body_of(sim.handle(req(max_completion_tokens=100_000)))
    budget = full["usage"]["completion_tokens"] - 3
    cut = await body_of(sim.handle(req(max_tokens=budget)))
    assert cut["choices"][0]["finish_reason"] == "length" and cut["usage"]["completion_tokens"] == budget
    assert full["choices"][0]["message"]["content"].startswith(cut["choices"][0]["message"]["content"])
    tools = await body_of(sim.handle(req(tools=[WEATHER], max_tokens=full["usage"]["completion_tokens"] - 60)))
    assert tools["choices"][0]["finish_reason"] == "length" and "tool_calls" not in tools["choices"][0]["message"]


@pytest.mark.asyncio
async def test_n_choices() -> None:
    data = await body_of(Simulator(INSTANT).handle(req(n=3)))
    assert [c["index"] for c in data["choices"]] == [0, 1, 2]
    per_choice = sum(len(c["message"]["content"]) for c in data["choices"])
    assert per_choice > 0 and data["usage"]["completion_tokens"] > 0
    parsed = chunks(await events_of(Simulator(INSTANT).handle(req(n=2, stream=True))))
    finals = [c["choices"][0] for c in parsed if c["choices"][0]["finish_reason"]]
    assert sorted(f["index"] for f in finals) == [0, 1] and all("usage" in f for f in finals)


# -- vLLM dialect --------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_vllm_non_stream_fields() -> None:
    sim = Simulator(VLLM)
    data = await body_of(sim.handle(req(model="moonshotai/Kimi-K2-Thinking", tools=[WEATHER])))
    message = data["choices"][0]["message"]
    assert message["reasoning"] and "reasoning_content" not in message
    assert message["content"] is None
    assert [c["id"] for c in message["tool_calls"]] == ["functions.get_weather:0"]
    assert data["choices"][0]["finish_reason"] == "tool_calls"
    assert "cached_tokens" not in data["usage"] and data["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    plain = await body_of(sim.handle(req(model="kimi-k2-thinking")))
    assert plain["choices"][0]["message"]["tool_calls"] == [] and plain["choices"][0]["message"]["content"]


@pytest.mark.asyncio
async def test_vllm_stream_usage_only_with_include_usage() -> None:
    sim = Simulator(VLLM)
    parsed = chunks(await events_of(sim.handle(req(stream=True))))
    assert any("reasoning" in c["choices"][0]["delta"] for c in parsed)
    assert not any("reasoning_content" in c["choices"][0]["delta"] for c in parsed)
    assert not any("usage" in c or "usage" in c["choices"][0] for c in parsed)
    assert parsed[-1]["choices"][0]["finish_reason"] == "stop"
    with_usage = chunks(await events_of(sim.handle(req(stream=True, stream_options={"include_usage": True}))))
    assert with_usage[-1]["choices"] == [] and "prompt_tokens_details" in with_usage[-1]["usage"]
    assert "cached_tokens" not in with_usage[-1]["usage"]
    assert "usage" not in with_usage[-2]["choices"][0]


@pytest.mark.asyncio
async def test_vllm_accepts_reasoning_on_assistant_messages() -> None:
    sim = Simulator(VLLM)
    messages: list[dict[str, Any]] = [
        USER,
        {
            "role": "assistant",
            "content": None,
            "reasoning": "call it",
            "tool_calls": [
                {
                    "id": "functions.get_weather:0",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Beijing"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny"},
    ]
    reply = sim.handle(req(messages=messages, tools=[WEATHER]))
    assert reply.status == 200
    # no reasoning at all is fine too: vLLM does not enforce Moonshot's rule
    del messages[1]["reasoning"]
    assert sim.handle(req(messages=messages, tools=[WEATHER])).status == 200


@pytest.mark.asyncio
async def test_vllm_raw_puts_reasoning_and_markers_in_content() -> None:
    sim = Simulator(VLLM_RAW)
    data = await body_of(sim.handle(req(tools=[WEATHER, TIME])))
    choice = data["choices"][0]
    message = choice["message"]
    assert choice["finish_reason"] == "stop" and message["tool_calls"] == []
    assert "reasoning" not in message and "reasoning_content" not in message
    content = message["content"]
    reasoning, rest = content.split("</think>")
    assert reasoning.startswith("The user wants")
    assert rest.startswith(
        "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"
    )
    assert "<|tool_call_end|><|tool_call_begin|>functions.get_time:1<|tool_call_argument_begin|>" in rest
    assert rest.endswith("<|tool_call_end|><|tool_calls_section_end|>")
    parsed = chunks(await events_of(sim.handle(req(tools=[WEATHER, TIME], stream=True))))
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in parsed)
    assert streamed == content
    assert all(set(c["choices"][0]["delta"]) <= {"role", "content"} for c in parsed)
    text = await body_of(sim.handle(req()))
    assert "</think>" in text["choices"][0]["message"]["content"]
    stripped = await body_of(sim.handle(req(tools=[WEATHER], skip_special_tokens=True)))
    assert "<|" not in stripped["choices"][0]["message"]["content"]


@pytest.mark.asyncio
async def test_vllm_errors_use_vllm_shape() -> None:
    sim = Simulator(VLLM)
    reply = sim.handle(req(model="kimi-k3"))
    assert reply.status == 404
    assert error_of(reply) == {
        "object": "error",
        "message": "The model `kimi-k3` does not exist.",
        "type": "NotFoundError",
        "param": None,
        "code": 404,
    }
    bad = sim.handle(b"{")
    assert bad.status == 400 and error_of(bad)["type"] == "BadRequestError" and error_of(bad)["code"] == 400
    options = sim.handle(req(stream_options={"include_usage": True}))
    assert options.status == 400 and "stream=True" in error_of(options)["message"]
    builtin = sim.handle(req(tools=[{"type": "builtin_function", "function": {"name": "$web_search"}}]))
    assert builtin.status == 400
    long = sim.handle(req(max_tokens=262_144))
    assert long.status == 400 and "maximum context length is 262144" in error_of(long)["message"]


# -- tokens and the prefix cache -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_prompt_tokens_grow_with_the_prompt() -> None:
    sim = Simulator(INSTANT)
    short = await body_of(sim.handle(req()))
    long = await body_of(sim.handle(req(messages=[{"role": "user", "content": "x" * 4000}])))
    tools = await body_of(sim.handle(req(tools=[WEATHER, TIME], sim={"tool_calls": 0})))
    assert short["usage"]["prompt_tokens"] < tools["usage"]["prompt_tokens"] < long["usage"]["prompt_tokens"]
    assert 1000 <= long["usage"]["prompt_tokens"] <= 1020  # ~4 bytes per token


@pytest.mark.asyncio
async def test_cached_tokens_rise_in_a_growing_tool_loop() -> None:
    sim = Simulator(INSTANT)
    system = {"role": "system", "content": "You are a careful agent. " * 60}  # ~400 tokens: cacheable
    messages: list[dict[str, Any]] = [system, USER]
    cached: list[int] = []
    prompts: list[int] = []
    for turn in range(4):
        data = await body_of(sim.handle(req(messages=messages, tools=[WEATHER])))
        cached.append(data["usage"]["cached_tokens"])
        prompts.append(data["usage"]["prompt_tokens"])
        message = data["choices"][0]["message"]
        messages.append(message)
        for call in message.get("tool_calls", []):
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": f"result {turn}"})
        if "tool_calls" not in message:
            messages.append({"role": "user", "content": f"and now turn {turn}?"})
    assert cached[0] == 0
    assert cached[1] == prompts[0] and cached[2] == prompts[1] and cached[3] == prompts[2]
    assert cached == sorted(cached) and cached[3] > cached[1] > 0
    assert sim.stats.cached_tokens == sum(cached)


@pytest.mark.asyncio
async def test_short_prefixes_are_not_cached_and_models_are_separate() -> None:
    sim = Simulator(INSTANT)
    await body_of(sim.handle(req()))
    again = await body_of(sim.handle(req()))
    assert again["usage"]["cached_tokens"] == 0  # below cache_min_tokens (256)
    big = [{"role": "system", "content": "y" * 2000}, USER]
    await body_of(sim.handle(req(messages=big)))
    hit = await body_of(sim.handle(req(messages=big)))
    other = await body_of(sim.handle(req(messages=big, model="kimi-k2-thinking-turbo")))
    assert hit["usage"]["cached_tokens"] == hit["usage"]["prompt_tokens"]
    assert other["usage"]["cached_tokens"] == 0


def test_prefix_cache_ttl_lru_and_blocks() -> None:
    now = [0.0]
    cache = PrefixCache(ttl_s=10, min_tokens=5, max_entries=3, clock=lambda: now[0])
    hashes, tokens = prefix_chain("m", [b"x" * 40, b"y" * 40, b"z" * 40])
    assert tokens == [10, 20, 30]
    assert cache.lookup_and_store(hashes, tokens) == 0
    assert cache.lookup_and_store(hashes, tokens) == 30
    assert cache.lookup_and_store([*hashes[:2], hash("other")], [10, 20, 31]) == 20
    now[0] = 11.0
    assert cache.lookup_and_store(hashes, tokens) == 0  # expired
    assert len(cache) <= 3
    blocks = PrefixCache(ttl_s=10, min_tokens=1, block_tokens=16, clock=lambda: 0.0)
    h, t = prefix_chain("m", [b"a" * 200])
    blocks.lookup_and_store(h, t)
    assert blocks.lookup_and_store(h, t) == 48  # min(50, 49) rounded down to whole 16-token blocks


# -- Moonshot validation -------------------------------------------------------------------------------

TOOL_CALL_HISTORY: list[dict[str, Any]] = [
    USER,
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "get_weather:0",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Beijing"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "get_weather:0", "content": "sunny"},
]


def _bad_tool(name: str = "get_weather", params: Any = None) -> dict[str, Any]:
    function: dict[str, Any] = {"name": name}
    function["parameters"] = params if params is not None else {"type": "object", "properties": {}}
    return {"type": "function", "function": function}


@pytest.mark.parametrize(
    ("body", "status", "error_type", "fragment"),
    [
        (b"not json", 400, "invalid_request_error", "not valid JSON"),
        (b"[1, 2]", 400, "invalid_request_error", "JSON object"),
        (orjson.dumps({"messages": [USER]}), 400, "invalid_request_error", "model is required"),
        (orjson.dumps({"model": "kimi-k2-thinking"}), 400, "invalid_request_error", "messages"),
        (req(model="gpt-4o"), 404, "resource_not_found_error", "Not found the model gpt-4o or Permission denied"),
        (req(temperature=1.5), 400, "invalid_request_error", "temperature"),
        (req(n=6), 400, "invalid_request_error", "n must be at most 5"),
        (req(tools=[_bad_tool(f"tool_{i}") for i in range(129)]), 400, "invalid_request_error", "too many tools"),
        (req(tools=[_bad_tool("ab")]), 400, "invalid_request_error", "function.name"),
        (req(tools=[_bad_tool("1abc")]), 400, "invalid_request_error", "function.name"),
        (req(tools=[_bad_tool(params={"type": "array"})]), 400, "invalid_request_error", "type is object"),
        (req(tools=[WEATHER], tool_choice="required"), 400, "invalid_request_error", "'required' is not supported"),
        (
            req(functions=[{"name": "get_weather", "parameters": {"type": "object"}}]),
            400,
            "invalid_request_error",
            "functions is not supported",
        ),
        (
            req(tools=[WEATHER], messages=TOOL_CALL_HISTORY),
            400,
            "invalid_request_error",
            "thinking is enabled but reasoning_content is missing in assistant tool call message at index 1",
        ),
        (
            req(tools=[WEATHER], messages=[*TOOL_CALL_HISTORY[:1], {**TOOL_CALL_HISTORY[1], "reasoning_content": "r"}]),
            400,
            "invalid_request_error",
            "tool_call_id get_weather:0 is not found",
        ),
        (
            req(messages=[USER, {"role": "tool", "tool_call_id": "x:0", "content": "?"}]),
            400,
            "invalid_request_error",
            "tool_call_id x:0 is not found",
        ),
        (
            req(messages=[{"role": "user", "content": "z" * 1_100_000}]),
            400,
            "invalid_request_error",
            "Your request exceeded model token limit: 262144",
        ),
        (req(max_tokens=262_144), 400, "invalid_request_error", "exceeded model token limit"),
        (req(thinking=True), 400, "invalid_request_error", "thinking must be an object"),
        (req(messages=[{"role": "robot", "content": "hi"}]), 400, "invalid_request_error", "role"),
        (req(messages=[1, 2]), 400, "invalid_request_error", "messages[0]"),
        (req(tools="nope"), 400, "invalid_request_error", "tools"),
    ],
)
def test_moonshot_validation_errors(body: bytes, status: int, error_type: str, fragment: str) -> None:
    sim = Simulator(INSTANT)
    reply = sim.handle(body)
    assert reply.status == status
    error = error_of(reply)
    assert set(error) == {"error"} and set(error["error"]) == {"message", "type"}  # no code field
    assert error["error"]["type"] == error_type
    assert fragment in error["error"]["message"]
    assert sim.stats.errors == 1


def test_retired_model_and_valid_history() -> None:
    sim = Simulator(profile_from("instant", retired=("kimi-k2-thinking",)))
    reply = sim.handle(req())
    assert reply.status == 404 and error_of(reply)["error"]["type"] == "resource_not_found_error"
    assert sim.handle(req(model="kimi-k2.6")).status == 200
    history = [*TOOL_CALL_HISTORY]
    history[1] = {**history[1], "reasoning_content": "need the weather"}
    assert Simulator(INSTANT).handle(req(tools=[WEATHER], messages=history)).status == 200
    # kimi-k3 supports tool_choice "required" (2026); kimi-k2.6 may switch thinking off
    assert Simulator(INSTANT).handle(req(model="kimi-k3", tools=[WEATHER], tool_choice="required")).status == 200
    no_thinking = req(model="kimi-k2.6", tools=[WEATHER], messages=TOOL_CALL_HISTORY, thinking={"type": "disabled"})
    assert Simulator(INSTANT).handle(no_thinking).status == 200


def test_handle_never_raises_on_odd_input() -> None:
    sim = Simulator(INSTANT)
    odd = [
        b"",
        b"null",
        b'"x"',
        b"{}",
        req(messages=[{"role": "user", "content": {"x": 1}}], n="2"),
        req(tools=[{"type": "function", "function": "get"}]),
        req(stream="yes"),
        req(max_tokens=0),
        req(tool_choice={"type": "function"}),
        req(sim=[1]),
        req(sim={"fault": {"bogus": 1}}),
        req(messages=[USER, {"role": "assistant", "tool_calls": "x", "reasoning_content": ""}]),
        req(temperature="hot"),
        req(stream_options=[1], stream=True),
        "ü".encode("latin-1"),
    ]
    for body in odd:
        reply = sim.handle(body)
        assert 400 <= reply.status < 500, body
        assert "error" in error_of(reply)


def test_recent_records_bodies_and_headers() -> None:
    sim = Simulator(INSTANT)
    for i in range(3):
        sim.handle(req(user=f"u{i}"), headers=[("Authorization", f"Bearer k{i}")])
    assert [orjson.loads(b)["user"] for b in sim.recent] == ["u0", "u1", "u2"]
    assert sim.recent_headers[-1]["authorization"] == "Bearer k2"
    sim.reset()
    assert not sim.recent and sim.stats.requests == 0


def test_api_keys_are_enforced_when_configured() -> None:
    sim = Simulator(profile_from("instant", api_keys=("sk-good",)))
    denied = sim.handle(req(), headers={"authorization": "Bearer sk-bad"})
    assert denied.status == 401 and error_of(denied)["error"]["type"] == "invalid_authentication_error"
    assert sim.handle(req(), headers={"authorization": "Bearer sk-good"}).status == 200


# -- faults --------------------------------------------------------------------------------------------


def test_fault_status_429_and_5xx() -> None:
    sim = Simulator(INSTANT)
    sim.add_fault(Fault(status=429, retry_after=2))
    limited = sim.handle(req())
    assert limited.status == 429 and ("retry-after", "2") in limited.headers
    error = error_of(limited)["error"]
    assert error["type"] == "rate_limit_reached_error" and "try again after 2 seconds" in error["message"]
    assert sim.handle(req()).status == 200  # count=1: used up
    sim.add_fault(Fault(status=503, count=2))
    assert [sim.handle(req()).status for _ in range(3)] == [503, 503, 200]
    sim.add_fault(Fault(status=500))
    assert error_of(sim.handle(req()))["error"]["type"] == "server_error"
    sim.add_fault(Fault(status=429, error_type="exceeded_current_quota_error", message="quota"))
    assert error_of(sim.handle(req()))["error"] == {"type": "exceeded_current_quota_error", "message": "quota"}
    assert sim.stats.faults_applied == 5 and sim.stats.errors == 5


def test_fault_count_until_cleared_and_model_filter() -> None:
    sim = Simulator(INSTANT)
    sim.add_fault(Fault(status=500, count=-1, model="kimi-k2-thinking-turbo"))
    assert sim.handle(req()).status == 200
    assert [sim.handle(req(model="kimi-k2-thinking-turbo")).status for _ in range(4)] == [500] * 4
    sim.clear_faults()
    assert sim.handle(req(model="kimi-k2-thinking-turbo")).status == 200


def test_per_request_fault_and_vllm_fault_shape() -> None:
    sim = Simulator(INSTANT)
    sim.add_fault(Fault(status=500))
    reply = sim.handle(req(sim={"fault": {"status": 429}}))
    assert reply.status == 429
    assert sim.handle(req()).status == 500  # the queued fault was left for the next request
    vllm = Simulator(VLLM).handle(req(sim={"fault": {"status": 503}}))
    assert vllm.status == 503 and error_of(vllm)["type"] == "ServiceUnavailableError"
    with pytest.raises(ValueError, match="unknown fault field"):
        Fault.from_dict({"stauts": 500})
    with pytest.raises(ValueError, match="status"):
        Fault(status=200)


@pytest.mark.asyncio
async def test_fault_drop_and_stall() -> None:
    sim = Simulator(INSTANT)
    sim.add_fault(Fault(drop=True))
    dropped = sim.handle(req())
    assert dropped.drop and dropped.body is None and dropped.events is None
    assert sim.stats.aborted == 1
    stalled = sim.handle(req(sim={"fault": {"stall_s": 0.05}}))
    assert stalled.may_block and stalled.delay_s == pytest.approx(0.05)
    start = time.monotonic()
    await stalled.wait()
    assert time.monotonic() - start >= 0.045
    events = sim.handle(req(stream=True, sim={"fault": {"stall_mid_s": 0.05}}))
    start = time.monotonic()
    got = await events_of(events)
    assert got[-1] == DONE_EVENT and time.monotonic() - start >= 0.045


@pytest.mark.asyncio
async def test_fault_cut_stream_raises_without_done() -> None:
    sim = Simulator(INSTANT)
    sim.add_fault(Fault(cut_after_events=3))
    reply = sim.handle(req(stream=True))
    assert reply.events is not None
    received = []
    with pytest.raises(SimulatedDisconnect):
        async for event in reply.events:
            received.append(event)
    assert len(received) == 3 and DONE_EVENT not in received
    assert sim.stats.aborted == 1 and sim.stats.completed == 0 and sim.stats.in_flight == 0
    cut_json = sim.handle(req(sim={"fault": {"cut_after_events": 1}}))
    assert cut_json.drop  # a non-stream body cannot be cut halfway


@pytest.mark.asyncio
async def test_fault_garbage_streams_put_their_garbage_after_the_real_events() -> None:
    def fresh(fault: dict[str, Any] | None = None) -> SimReply:  # a new simulator: the same ids each time
        return Simulator(INSTANT).handle(req(stream=True, **({"sim": {"fault": fault}} if fault else {})))

    real = await events_of(fresh())
    for kind, line in (("not_json", b"data: upstream hiccup"), ("wrong_shape", b"keepalive"), ("html_mid", b"<html>")):
        got = await events_of(fresh({"garbage": kind, "garbage_after_events": 1}))
        assert line in got[1] and got[0] == real[0] and got[-1] == DONE_EVENT
    truncated = await events_of(fresh({"garbage": "truncated"}))
    assert truncated[:2] == real[:2] and b"".join(truncated[2:]) == b""  # then a clean end, no [DONE]
    no_done = await events_of(fresh({"garbage": "no_done"}))
    assert b"".join(no_done) == b"".join(real[:-1])
    plain = fresh({"garbage": "text_plain"})
    assert ("content-type", "text/plain") in plain.headers and await events_of(plain) == real
    with pytest.raises(ValueError, match="'garbage' must be one of html, truncated"):
        Fault(garbage="junk")
    with pytest.raises(ValueError, match="'garbage_after_events' must be an integer >= 0"):
        Fault(garbage="not_json", garbage_after_events=-1)


def test_fault_garbage_bodies() -> None:
    sim = Simulator(INSTANT)
    real = sim.handle(req()).body
    assert real is not None
    bodies = {k: sim.handle(req(sim={"fault": {"garbage": k}})) for k in ("not_json", "wrong_shape", "html_mid")}
    assert bodies["not_json"].body == b"upstream hiccup, not json"
    assert b"choices" not in (bodies["wrong_shape"].body or b"")
    assert b"<html>" in (bodies["html_mid"].body or b"")
    plain = sim.handle(req(sim={"fault": {"garbage": "text_plain"}}))
    assert ("content-type", "text/plain") in plain.headers and orjson.loads(plain.body or b"")["choices"]


# -- timing and concurrency accounting -----------------------------------------------------------------


@pytest.mark.asyncio
async def test_timing_follows_ttft_and_tokens_per_s() -> None:
    profile = profile_from("moonshot-standard", ttft_s=0.05, tokens_per_s=2000)
    sim = Simulator(profile)
    reply = sim.handle(req())
    data = await body_of(reply)
    expected = 0.05 + data["usage"]["completion_tokens"] / 2000
    assert reply.delay_s == pytest.approx(expected)
    stream = sim.handle(req(stream=True))
    assert stream.events is not None
    start = time.monotonic()
    first = await anext(stream.events)
    ttft = time.monotonic() - start
    rest = [event async for event in stream.events]
    total = time.monotonic() - start
    assert first.startswith(b"data: ") and rest[-1] == DONE_EVENT
    assert 0.045 <= ttft < 0.5
    assert total >= expected - 0.01


@pytest.mark.asyncio
async def test_cancelled_stream_is_counted_and_frees_its_slot() -> None:
    sim = Simulator(profile_from("instant", tokens_per_s=200))
    reply = sim.handle(req(stream=True))
    assert reply.events is not None
    await anext(reply.events)
    assert sim.stats.in_flight == 1
    await reply.events.aclose()  # type: ignore[attr-defined]
    assert sim.stats.cancelled == 1 and sim.stats.in_flight == 0 and sim.stats.completed == 0

    async def consume(r: SimReply) -> None:
        assert r.events is not None
        async for _ in r.events:
            pass

    task = asyncio.ensure_future(consume(sim.handle(req(stream=True))))
    await until(lambda: sim.stats.in_flight == 1)  # streaming: cancelled before its first pull, it never started
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sim.stats.cancelled == 2 and sim.stats.in_flight == 0 and sim.stats.kv_tokens == 0


@pytest.mark.asyncio
async def test_max_concurrency_queues_requests() -> None:
    profile = profile_from("vllm", ttft_s=0.05, tokens_per_s=0, max_concurrency=1)
    sim = Simulator(profile)
    replies = [sim.handle(req()) for _ in range(3)]
    start = time.monotonic()
    tasks = [asyncio.ensure_future(r.wait()) for r in replies]
    await until(lambda: sim.stats.waiting == 2)
    assert sim.stats.in_flight == 1 and sim.stats.waiting == 2 and sim.stats.kv_tokens > 0
    await asyncio.gather(*tasks)
    assert time.monotonic() - start >= 0.14  # served one after the other
    assert sim.stats.completed == 3 and sim.stats.in_flight == 0 and sim.stats.waiting == 0


@pytest.mark.asyncio
async def test_cancelled_waiter_leaves_the_queue() -> None:
    sim = Simulator(profile_from("vllm", ttft_s=0.05, tokens_per_s=0, max_concurrency=1))
    first, second, third = (sim.handle(req()) for _ in range(3))
    t1 = asyncio.ensure_future(first.wait())
    t2 = asyncio.ensure_future(second.wait())
    t3 = asyncio.ensure_future(third.wait())
    await until(lambda: sim.stats.waiting == 2)  # the second is queued, not yet to start
    t2.cancel()
    await asyncio.gather(t1, t3, return_exceptions=True)
    assert t2.cancelled()
    assert sim.stats.completed == 2 and sim.stats.cancelled == 1
    assert sim.stats.in_flight == 0 and sim.stats.waiting == 0
