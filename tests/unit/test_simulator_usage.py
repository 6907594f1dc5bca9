"""The simulator reports usage the way each provider does: vLLM (with a reasoning parser) counts
reasoning tokens under ``completion_tokens_details`` and caches whole 16-token blocks from the first
block on; Moonshot reports top-level ``cached_tokens``, no reasoning-token split, and caches prefixes
of 256 tokens or more. Stream and non-stream agree."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from simulator import Simulator, profile_from

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def body(content: str, *, stream: bool = False, model: str = "kimi-k2-thinking") -> bytes:
    request: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": content}]}
    if stream:
        request.update(stream=True, stream_options={"include_usage": True})
    return orjson.dumps(request)


def usage_of(sim: Simulator, raw: bytes) -> dict[str, Any]:
    reply = sim.handle(raw)
    if reply.body is not None:
        found: dict[str, Any] = orjson.loads(reply.body)["usage"]
        return found

    async def events() -> list[bytes]:
        assert reply.events is not None
        return [e async for e in reply.events]

    chunks = [orjson.loads(e[6:]) for e in asyncio.run(events()) if e.startswith(b"data: {")]
    (last,) = [c for c in chunks if not c["choices"]]  # the include_usage chunk
    final: dict[str, Any] = last["usage"]
    return final


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_vllm_reports_its_reasoning_tokens_and_moonshot_does_not(stream: bool) -> None:
    vllm = Simulator(profile_from("vllm", ttft_s=0, tokens_per_s=0))
    moonshot = Simulator(profile_from("instant"))
    got = usage_of(vllm, body("hi", stream=stream, model="moonshotai/Kimi-K2-Thinking"))
    reasoning = got["completion_tokens_details"]["reasoning_tokens"]
    assert 0 < reasoning < got["completion_tokens"]
    plain = usage_of(moonshot, body("hi", stream=stream))
    assert "completion_tokens_details" not in plain and plain["completion_tokens"] == got["completion_tokens"]


def test_a_vllm_without_a_reasoning_parser_reports_no_reasoning_tokens() -> None:
    raw = Simulator(profile_from("vllm-raw", ttft_s=0, tokens_per_s=0))
    assert "completion_tokens_details" not in usage_of(raw, body("hi", model="moonshotai/Kimi-K2-Thinking"))


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_vllm_caches_whole_blocks_of_a_short_prefix_and_moonshot_only_from_256_tokens(stream: bool) -> None:
    short = "a tool loop's first turn " * 8  # about 60 prompt tokens
    vllm = Simulator(profile_from("vllm", ttft_s=0, tokens_per_s=0))
    moonshot = Simulator(profile_from("instant"))
    for sim, model in ((vllm, "moonshotai/Kimi-K2-Thinking"), (moonshot, "kimi-k2-thinking")):
        assert usage_of(sim, body(short, stream=stream, model=model))["prompt_tokens"] < 256
    again = usage_of(vllm, body(short, stream=stream, model="moonshotai/Kimi-K2-Thinking"))
    cached = again["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0 and cached % 16 == 0 and cached < again["prompt_tokens"]
    assert usage_of(moonshot, body(short, stream=stream))["cached_tokens"] == 0

    long = "a real agent's system prompt and tools " * 40  # past Moonshot's minimum
    usage_of(moonshot, body(long, stream=stream))
    hit = usage_of(moonshot, body(long, stream=stream))
    assert hit["cached_tokens"] == hit["prompt_tokens"] >= 256
