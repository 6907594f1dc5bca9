"""The client-facing envelope end to end: the official openai SDK against ``kimi-gateway serve`` in front
of the simulator's HTTP servers in vLLM's wire format (which answers as ``moonshotai/Kimi-K2-Thinking``,
with ``tool_calls: []`` and ``stop_reason: null``) and Moonshot's (top-level ``cached_tokens``).

Three tenants: ``chain`` reads reasoning as ``reasoning_content`` (the vLLM answer is parsed by the
reasoning transform, the envelope edits parsed chunks), ``bytes`` reads it as vLLM's ``reasoning`` (the
answer is relayed as bytes, the envelope edits bytes), and ``raw`` (``envelope: raw``) gets the upstream's
own bytes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import Process, hashed, start_gateway, start_simulator, write_gateway
from tests.e2e.test_dropin import TOOLS

VIRTUAL = "kimi-k2-thinking"
MOONSHOT_VIRTUAL = "kimi-k2-thinking-moonshot"
VLLM_ID = "moonshotai/Kimi-K2-Thinking"
KEYS = {"chain": "sk-envelope-chain", "bytes": "sk-envelope-bytes", "raw": "sk-envelope-raw"}
MESSAGES = [{"role": "user", "content": "Why is the sky blue?"}]


@pytest.fixture(scope="module")
def vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    proc = start_simulator(tmp_path_factory.mktemp("envelope-sim"), "vllm", "--ttft-ms", "0", "--tokens-per-s", "0")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, simulator: Process, vllm: Process) -> Iterator[Process]:
    folder = tmp_path_factory.mktemp("envelope")
    upstreams = f"""\
  vllm:
    kind: openai
    base_url: {vllm.url}/v1
    reasoning_field: reasoning
    models: {{kimi-k2-thinking: {VLLM_ID}}}
  moonshot:
    kind: openai
    base_url: {simulator.url}/v1
    models: [kimi-k2-thinking]
"""
    models = f"""\
models:
  {VIRTUAL}: {{candidates: [vllm/kimi-k2-thinking]}}
  {MOONSHOT_VIRTUAL}: {{candidates: [moonshot/kimi-k2-thinking]}}
"""
    config = write_gateway(folder, upstreams, f'tenant: chain\nkeys: ["{hashed(KEYS["chain"])}"]\n{models}')
    policies = config.parent / "gateway-policies"
    (policies / "bytes.yaml").write_text(
        f'tenant: bytes\nkeys: ["{hashed(KEYS["bytes"])}"]\n{models}reasoning: {{field: reasoning}}\n'
    )
    (policies / "raw.yaml").write_text(
        f'tenant: raw\nkeys: ["{hashed(KEYS["raw"])}"]\n{models}reasoning: {{field: reasoning}}\nenvelope: raw\n'
    )
    proc = start_gateway(config)
    yield proc
    proc.stop()


def direct_usage(vllm: Process, stream: bool) -> dict[str, Any]:
    """The usage the vLLM simulator itself reports for the request the tests send."""
    body: dict[str, Any] = {"model": VLLM_ID, "messages": MESSAGES}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    reply = httpx.post(vllm.url + "/v1/chat/completions", json=body, timeout=10)
    if not stream:
        usage: dict[str, Any] = reply.json()["usage"]
        return usage
    chunks = [orjson.loads(line[6:]) for line in reply.text.splitlines() if line.startswith("data: {")]
    return next(c["usage"] for c in chunks if c.get("usage"))


def check_usage(usage: dict[str, Any], reported: dict[str, Any]) -> None:
    assert isinstance(usage["prompt_tokens_details"]["cached_tokens"], int)
    want = (reported.get("completion_tokens_details") or {}).get("reasoning_tokens")
    if want:  # "where known": the simulator reports it like current vLLM with a reasoning parser
        assert usage["completion_tokens_details"]["reasoning_tokens"] == want > 0
    else:
        assert not (usage.get("completion_tokens_details") or {}).get("reasoning_tokens")


@pytest.mark.parametrize("tenant", ["chain", "bytes"])
def test_vllm_answer_says_the_virtual_model(gateway: Process, vllm: Process, tenant: str) -> None:
    raw = gateway.openai(KEYS[tenant]).chat.completions.with_raw_response.create(model=VIRTUAL, messages=MESSAGES)
    assert raw.headers["x-gateway-upstream"] == "vllm/kimi-k2-thinking"
    reply = raw.parse()
    assert reply.model == VIRTUAL
    check_usage(reply.usage.model_dump(), direct_usage(vllm, stream=False))
    body = orjson.loads(raw.content)
    assert VLLM_ID not in raw.text
    choice = body["choices"][0]
    assert "stop_reason" not in choice and choice["finish_reason"] == "stop"
    assert "tool_calls" not in choice["message"] and choice["message"]["content"]
    field = "reasoning_content" if tenant == "chain" else "reasoning"
    assert choice["message"][field]


@pytest.mark.parametrize("tenant", ["chain", "bytes"])
def test_vllm_stream_says_the_virtual_model_in_every_chunk(gateway: Process, vllm: Process, tenant: str) -> None:
    c = gateway.openai(KEYS[tenant])
    chunks = [
        chunk.model_dump()
        for chunk in c.chat.completions.create(
            model=VIRTUAL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    ]
    assert len(chunks) > 5 and {chunk["model"] for chunk in chunks} == {VIRTUAL}
    assert all("stop_reason" not in choice for chunk in chunks for choice in chunk["choices"])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]
    check_usage(chunks[-1]["usage"], direct_usage(vllm, stream=True))
    text = "".join(ch["delta"]["content"] or "" for chunk in chunks for ch in chunk["choices"])
    assert text


def test_stream_without_include_usage_still_hides_the_usage_chunk(gateway: Process) -> None:
    c = gateway.openai(KEYS["bytes"])
    chunks = list(c.chat.completions.create(model=VIRTUAL, messages=MESSAGES, stream=True))
    assert chunks and all(chunk.model == VIRTUAL and chunk.usage is None for chunk in chunks)
    assert all(chunk.choices for chunk in chunks)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_tool_calls_through_the_envelope(gateway: Process, stream: bool) -> None:
    c = gateway.openai(KEYS["bytes"])
    if not stream:
        reply = c.chat.completions.create(model=VIRTUAL, messages=MESSAGES, tools=TOOLS)
        assert reply.model == VIRTUAL and reply.choices[0].finish_reason == "tool_calls"
        assert [call.function.name for call in reply.choices[0].message.tool_calls or ()] == ["get_weather", "get_time"]
        return
    chunks = list(c.chat.completions.create(model=VIRTUAL, messages=MESSAGES, tools=TOOLS, stream=True))
    assert {chunk.model for chunk in chunks} == {VIRTUAL}
    names = [t.function.name for ch in chunks for choice in ch.choices for t in choice.delta.tool_calls or () if t.id]
    assert names == ["get_weather", "get_time"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_moonshot_usage_gets_the_openai_shape_and_keeps_cached_tokens(gateway: Process, stream: bool) -> None:
    c = gateway.openai(KEYS["bytes"])
    messages = [{"role": "user", "content": "cache me " * 200}]  # over Moonshot's 256-token minimum
    for _ in range(2):  # the second request hits the simulator's prefix cache
        if stream:
            last = list(
                c.chat.completions.create(
                    model=MOONSHOT_VIRTUAL, messages=messages, stream=True, stream_options={"include_usage": True}
                )
            )[-1]
            assert last.model == MOONSHOT_VIRTUAL
            usage = last.usage
        else:
            reply = c.chat.completions.create(model=MOONSHOT_VIRTUAL, messages=messages)
            assert reply.model == MOONSHOT_VIRTUAL
            usage = reply.usage
    assert usage is not None and usage.prompt_tokens_details is not None
    cached = usage.prompt_tokens_details.cached_tokens
    assert cached and cached == (usage.model_extra or {})["cached_tokens"]  # Moonshot's own field stays


def test_raw_tenant_gets_the_upstreams_bytes(gateway: Process) -> None:
    url = gateway.url + "/v1/chat/completions"
    headers = {"authorization": f"Bearer {KEYS['raw']}"}
    body = httpx.post(url, json={"model": VIRTUAL, "messages": MESSAGES}, headers=headers, timeout=10).json()
    assert body["model"] == VLLM_ID
    assert body["choices"][0]["message"]["tool_calls"] == [] and "stop_reason" in body["choices"][0]
    stream = {"model": VIRTUAL, "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
    text = httpx.post(url, json=stream, headers=headers, timeout=10).text
    chunks = [orjson.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    assert {chunk["model"] for chunk in chunks} == {VLLM_ID}
    assert any("stop_reason" in choice for chunk in chunks for choice in chunk["choices"])
    # the same tenant's models still come through its other transforms: the bytes are vLLM's own
    assert gateway.openai(KEYS["raw"]).chat.completions.create(model=VIRTUAL, messages=MESSAGES).model == VLLM_ID
