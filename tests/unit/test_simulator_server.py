"""The simulator over real HTTP (uvicorn + uvloop + httptools on loopback), with httpx and the openai SDK."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from simulator import BackgroundServer, profile_from
from simulator.__main__ import main

ROOT = Path(__file__).resolve().parents[2]
USER: Any = {"role": "user", "content": "What is the weather in Beijing?"}
WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME: Any = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]},
    },
}


def chat(**fields: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {"model": "kimi-k2-thinking", "messages": [USER]}
    payload.update(fields)
    return payload


def _server(profile_name: str, **overrides: Any) -> Iterator[BackgroundServer]:
    with BackgroundServer(profile_from(profile_name, **overrides)) as srv:
        yield srv


@pytest.fixture(scope="module")
def _moonshot() -> Iterator[BackgroundServer]:
    yield from _server("instant")


@pytest.fixture(scope="module")
def _timed() -> Iterator[BackgroundServer]:
    # ~0.3 s per reply: slow enough to disconnect mid-stream, fast enough for a unit test
    yield from _server("moonshot-standard", ttft_s=0.02, tokens_per_s=600)


@pytest.fixture(scope="module")
def _vllm() -> Iterator[BackgroundServer]:
    yield from _server("vllm", ttft_s=0, tokens_per_s=0)


@pytest.fixture(scope="module")
def _vllm_raw() -> Iterator[BackgroundServer]:
    yield from _server("vllm-raw", ttft_s=0, tokens_per_s=0, max_concurrency=0)


def _fresh(srv: BackgroundServer) -> BackgroundServer:
    assert httpx.post(srv.url + "/_sim/reset").json() == {"ok": True}
    return srv


@pytest.fixture
def moonshot(_moonshot: BackgroundServer) -> BackgroundServer:
    return _fresh(_moonshot)


@pytest.fixture
def timed(_timed: BackgroundServer) -> BackgroundServer:
    return _fresh(_timed)


@pytest.fixture
def vllm(_vllm: BackgroundServer) -> BackgroundServer:
    return _fresh(_vllm)


@pytest.fixture
def vllm_raw(_vllm_raw: BackgroundServer) -> BackgroundServer:
    return _fresh(_vllm_raw)


def sdk(srv: BackgroundServer, key: str = "sk-sim-test") -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=10)


def stats(srv: BackgroundServer) -> dict[str, Any]:
    return httpx.get(srv.url + "/_sim/stats").json()


def wait_for_stats(
    srv: BackgroundServer, condition: Callable[[dict[str, Any]], bool], timeout: float = 5.0
) -> dict[str, Any]:
    """The server's stats once ``condition`` holds on them, polled until a deadline (never a fixed
    sleep: the server runs on its own thread and gets to a state when the machine lets it)."""
    deadline = time.monotonic() + timeout
    while True:
        current = stats(srv)
        if condition(current) or time.monotonic() > deadline:
            return current
        time.sleep(0.01)


def sse_data(raw: bytes) -> list[bytes]:
    return [block[6:] for block in raw.split(b"\n\n") if block.startswith(b"data: ")]


# -- plain routes --------------------------------------------------------------------------------------


def test_health_models_and_routing(moonshot: BackgroundServer) -> None:
    with httpx.Client(base_url=moonshot.url) as client:
        assert client.get("/health").json() == {"status": "ok", "simulator": "instant"}
        models = client.get("/v1/models").json()
        assert models["object"] == "list"
        assert {m["id"] for m in models["data"]} == {
            "kimi-k2-thinking",
            "kimi-k2-thinking-turbo",
            "kimi-k2.6",
            "kimi-k3",
        }
        assert all(m["owned_by"] == "simulator" and m["object"] == "model" for m in models["data"])
        assert client.get("/nope").status_code == 404
        assert client.get("/v1/chat/completions").status_code == 405
        assert [m.id for m in sdk(moonshot).models.list()] == [m["id"] for m in models["data"]]


# -- Moonshot dialect through the openai SDK -----------------------------------------------------------


def test_sdk_non_stream_reasoning_and_usage(moonshot: BackgroundServer) -> None:
    completion = sdk(moonshot).chat.completions.create(model="kimi-k2-thinking", messages=[USER])
    message = completion.choices[0].message
    assert message.content and getattr(message, "reasoning_content", None)
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and getattr(completion.usage, "cached_tokens") == 0  # noqa: B009
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


def test_sdk_stream_without_include_usage(moonshot: BackgroundServer) -> None:
    stream = sdk(moonshot).chat.completions.create(model="kimi-k2-thinking", messages=[USER], stream=True)
    chunks = list(stream)
    assert all(chunk.choices for chunk in chunks)  # no choices:[] usage chunk when not asked for
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert reasoning.startswith("The user wants") and content.startswith("This answer")
    final = chunks[-1].choices[0]
    assert final.finish_reason == "stop"
    assert (final.model_extra or {})["usage"]["completion_tokens"] > 0  # Moonshot: usage inside the choice


def test_sdk_stream_with_include_usage(moonshot: BackgroundServer) -> None:
    stream = sdk(moonshot).chat.completions.create(
        model="kimi-k2-thinking",
        messages=[USER],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens_details is not None
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 0
    assert getattr(chunks[-1].usage, "cached_tokens") == 0  # noqa: B009
    assert sum(1 for c in chunks if not c.choices) == 1


def test_sdk_parallel_tool_calls_and_stream_assembly(moonshot: BackgroundServer) -> None:
    client = sdk(moonshot)
    completion = client.chat.completions.create(model="kimi-k2-thinking", messages=[USER], tools=[WEATHER, TIME])
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "tool_calls"
    assert message.tool_calls is not None
    functions = [(c.id, c.function) for c in message.tool_calls if c.type == "function"]
    assert [(call_id, f.name) for call_id, f in functions] == [
        ("get_weather:0", "get_weather"),
        ("get_time:1", "get_time"),
    ]
    assert orjson.loads(functions[0][1].arguments) == {"city": "Beijing"}
    calls: dict[int, dict[str, str]] = {}
    for chunk in client.chat.completions.create(
        model="kimi-k2-thinking",
        messages=[USER],
        tools=[WEATHER, TIME],
        stream=True,
    ):
        for delta in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            entry = calls.setdefault(delta.index, {"id": "", "args": ""})
            entry["id"] += delta.id or ""
            entry["args"] += (delta.function.arguments or "") if delta.function else ""
    assert [calls[i]["id"] for i in sorted(calls)] == ["get_weather:0", "get_time:1"]
    assert orjson.loads(calls[1]["args"]) == {"tz": "example"}


def test_cached_tokens_rise_across_a_conversation(moonshot: BackgroundServer) -> None:
    client = sdk(moonshot)
    messages: Any = [{"role": "system", "content": "Be precise. " * 120}, USER]
    cached = []
    for turn in range(3):
        completion = client.chat.completions.create(
            model="kimi-k2-thinking",
            messages=messages,
            tools=[WEATHER],
        )
        cached.append(getattr(completion.usage, "cached_tokens"))  # noqa: B009
        message = completion.choices[0].message.model_dump(exclude_none=True)
        messages.append(message)
        for call in message.get("tool_calls", []):
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": "21 C"})
        messages.append({"role": "user", "content": f"and turn {turn}?"}) if "tool_calls" not in message else None
    assert cached[0] == 0 and 0 < cached[1] < cached[2]
    assert stats(moonshot)["cached_tokens"] == sum(cached)


@pytest.mark.parametrize(
    ("fields", "status", "fragment"),
    [
        ({"model": "kimi-k1"}, 404, "Not found the model kimi-k1 or Permission denied"),
        ({"temperature": 1.7}, 400, "temperature"),
        ({"tools": [WEATHER], "tool_choice": "required"}, 400, "'required' is not supported"),
        (
            {
                "messages": [
                    USER,
                    {
                        "role": "assistant",
                        "content": "",
                        "tool_calls": [
                            {
                                "id": "get_weather:0",
                                "type": "function",
                                "function": {"name": "get_weather", "arguments": "{}"},
                            }
                        ],
                    },
                    {"role": "tool", "tool_call_id": "get_weather:0", "content": "ok"},
                ],
                "tools": [WEATHER],
            },
            400,
            "reasoning_content is missing in assistant tool call message at index 1",
        ),
        ({"max_tokens": 300_000}, 400, "Your request exceeded model token limit: 262144"),
        ({"n": 9}, 400, "n must be at most 5"),
    ],
)
def test_sdk_sees_moonshot_errors(
    moonshot: BackgroundServer, fields: dict[str, Any], status: int, fragment: str
) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        sdk(moonshot).chat.completions.create(**chat(**fields))
    assert caught.value.status_code == status
    body = caught.value.response.json()
    assert fragment in body["error"]["message"] and "code" not in body["error"]
    assert body["error"]["type"] == ("resource_not_found_error" if status == 404 else "invalid_request_error")


def test_bad_json_body(moonshot: BackgroundServer) -> None:
    response = httpx.post(
        moonshot.url + "/v1/chat/completions", content=b"{oops", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


# -- vLLM dialects ------------------------------------------------------------------------------------


def test_vllm_fields_over_http(vllm: BackgroundServer) -> None:
    with httpx.Client(base_url=vllm.url) as client:
        body = chat(model="moonshotai/Kimi-K2-Thinking", tools=[WEATHER])
        data = client.post("/v1/chat/completions", json=body).json()
        message = data["choices"][0]["message"]
        assert message["reasoning"] and "reasoning_content" not in message
        assert message["tool_calls"][0]["id"] == "functions.get_weather:0"
        assert data["usage"]["prompt_tokens_details"]["cached_tokens"] == 0 and "cached_tokens" not in data["usage"]
        raw = client.post("/v1/chat/completions", json=chat(stream=True)).content
        events = sse_data(raw)
        assert events[-1] == b"[DONE]"
        decoded = [orjson.loads(e) for e in events[:-1]]
        assert any("reasoning" in d["choices"][0]["delta"] for d in decoded)
        assert not any("usage" in d or "usage" in d["choices"][0] for d in decoded)
        with_usage = sse_data(
            client.post("/v1/chat/completions", json=chat(stream=True, stream_options={"include_usage": True})).content
        )
        assert orjson.loads(with_usage[-2])["choices"] == []
        missing = client.post("/v1/chat/completions", json=chat(model="kimi-k2.6"))
        assert missing.status_code == 404
        assert missing.json() == {
            "object": "error",
            "message": "The model `kimi-k2.6` does not exist.",
            "type": "NotFoundError",
            "param": None,
            "code": 404,
        }


def test_vllm_raw_markers_over_http(vllm_raw: BackgroundServer) -> None:
    completion = sdk(vllm_raw).chat.completions.create(model="kimi-k2-thinking", messages=[USER], tools=[WEATHER])
    content = completion.choices[0].message.content or ""
    assert completion.choices[0].finish_reason == "stop" and not completion.choices[0].message.tool_calls
    assert "</think><|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0" in content
    assert content.endswith("<|tool_calls_section_end|>")


def test_vllm_metrics(vllm: BackgroundServer) -> None:
    big = [{"role": "system", "content": "z" * 3000}, USER]
    for _ in range(2):
        httpx.post(vllm.url + "/v1/chat/completions", json=chat(messages=big)).raise_for_status()
    response = httpx.get(vllm.url + "/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    label = '{model_name="moonshotai/Kimi-K2-Thinking"}'
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert f"# TYPE {name} gauge" in text and f"{name}{label} 0.0" in text
    assert "# TYPE vllm:prefix_cache_queries_total counter" in text  # prometheus-client names the family so
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if not line.startswith("#")}
    queries = values[f"vllm:prefix_cache_queries_total{label}"]
    hits = values[f"vllm:prefix_cache_hits_total{label}"]
    assert queries > 1500 and 0 < hits < queries / 2 + 1  # the second request hit the first one's prefix
    assert hits % 16 == 0  # whole KV blocks


@pytest.mark.asyncio
async def test_queueing_shows_in_metrics_and_latency() -> None:
    running = 'vllm:num_requests_running{model_name="moonshotai/Kimi-K2-Thinking"} 1.0'
    waiting = 'vllm:num_requests_waiting{model_name="moonshotai/Kimi-K2-Thinking"} 2.0'
    # each reply holds the one slot for 0.3 s: the queue of two lasts that long, however slowly the
    # three requests get to the server; /metrics is polled until it shows them, not read once
    with BackgroundServer(profile_from("vllm", ttft_s=0.3, tokens_per_s=0, max_concurrency=1)) as srv:
        async with httpx.AsyncClient(base_url=srv.url, timeout=10) as client:
            start = time.monotonic()
            calls = [asyncio.ensure_future(client.post("/v1/chat/completions", json=chat())) for _ in range(3)]
            deadline = time.monotonic() + 5
            while True:
                text = (await client.get("/metrics")).text
                if (running in text and waiting in text) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.005)
            responses = await asyncio.gather(*calls)
            elapsed = time.monotonic() - start
    assert all(r.status_code == 200 for r in responses)
    assert running in text and waiting in text
    assert elapsed >= 0.89  # three replies of 0.3 s, one at a time


# -- faults --------------------------------------------------------------------------------------------


def test_fault_429_with_retry_after(moonshot: BackgroundServer) -> None:
    added = httpx.post(moonshot.url + "/_sim/faults", json={"status": 429, "retry_after": 3}).json()
    assert added["pending"][0]["remaining"] == 1
    with pytest.raises(openai.RateLimitError) as caught:
        sdk(moonshot).chat.completions.create(**chat())
    assert caught.value.response.headers["retry-after"] == "3"
    assert caught.value.response.json()["error"]["type"] == "rate_limit_reached_error"
    assert sdk(moonshot).chat.completions.create(**chat()).choices[0].finish_reason == "stop"


def test_fault_list_5xx_and_clear(moonshot: BackgroundServer) -> None:
    httpx.post(moonshot.url + "/_sim/faults", json=[{"status": 503, "count": -1}]).raise_for_status()
    for _ in range(2):
        with pytest.raises(openai.InternalServerError) as caught:
            sdk(moonshot).chat.completions.create(**chat())
        assert caught.value.response.json()["error"]["type"] == "server_error"
    assert httpx.delete(moonshot.url + "/_sim/faults").json() == {"ok": True}
    assert sdk(moonshot).chat.completions.create(**chat()).choices
    bad = httpx.post(moonshot.url + "/_sim/faults", json={"status": 200})
    assert bad.status_code == 400 and "status" in bad.json()["error"]["message"]


def test_fault_per_request_through_extra_body(moonshot: BackgroundServer) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        sdk(moonshot).chat.completions.create(**chat(), extra_body={"sim": {"fault": {"status": 502}}})
    assert caught.value.status_code == 502
    assert stats(moonshot)["faults_applied"] == 1


def test_fault_drop_is_a_connection_error(moonshot: BackgroundServer) -> None:
    httpx.post(moonshot.url + "/_sim/faults", json={"drop": True}).raise_for_status()
    with pytest.raises(openai.APIConnectionError):
        sdk(moonshot).chat.completions.create(**chat())
    with httpx.Client(base_url=moonshot.url) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            client.post("/v1/chat/completions", json=chat(sim={"fault": {"drop": True}}))
        assert client.post("/v1/chat/completions", json=chat()).status_code == 200  # a new connection works
    assert stats(moonshot)["aborted"] == 2


@pytest.mark.parametrize("server", ["moonshot", "timed"])
def test_fault_cut_stream_is_an_error_not_a_clean_end(server: str, request: pytest.FixtureRequest) -> None:
    srv: BackgroundServer = request.getfixturevalue(server)
    received = bytearray()
    body = chat(stream=True, sim={"fault": {"cut_after_events": 4}})
    with (
        httpx.Client(base_url=srv.url) as client,
        pytest.raises(httpx.RemoteProtocolError),
        client.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        for data in response.iter_bytes():
            received += data
    events = sse_data(bytes(received))
    assert len(events) == 4 and b"[DONE]" not in received
    httpx.post(srv.url + "/_sim/faults", json={"cut_after_events": 2}).raise_for_status()
    seen = 0
    with pytest.raises((httpx.HTTPError, openai.APIError)):  # any transport-level error is right
        for _chunk in sdk(srv).chat.completions.create(**chat(stream=True)):
            seen += 1
    assert seen == 2
    assert wait_for_stats(srv, lambda s: s["aborted"] >= 2)["aborted"] == 2


def test_fault_stall_delays_the_first_byte(moonshot: BackgroundServer) -> None:
    start = time.monotonic()
    with httpx.stream(
        "POST", moonshot.url + "/v1/chat/completions", json=chat(stream=True, sim={"fault": {"stall_s": 0.2}})
    ) as response:
        chunks = response.iter_raw()
        first = next(chunks)
        ttfb = time.monotonic() - start
        rest = b"".join(chunks)
    assert first.startswith(b"data: ") and ttfb >= 0.19
    assert rest.endswith(b"data: [DONE]\n\n")
    start = time.monotonic()
    httpx.post(moonshot.url + "/v1/chat/completions", json=chat(sim={"fault": {"stall_mid_s": 0.15}}))
    assert time.monotonic() - start >= 0.14


# -- disconnects and the control endpoints -------------------------------------------------------------


def test_client_disconnect_mid_stream_is_cancelled(timed: BackgroundServer) -> None:
    # a 5 s pause after the first two events: the stream cannot finish before the client leaves,
    # however slowly the client gets to leave
    body = chat(stream=True, sim={"fault": {"stall_mid_s": 5}})
    with (
        httpx.Client(base_url=timed.url) as client,
        client.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        first = next(response.iter_raw())
        assert first.startswith(b"data: ")
    # leaving the block closed the connection halfway through the stream
    current = wait_for_stats(timed, lambda s: s["cancelled"] >= 1 and s["in_flight"] == 0)
    assert current["cancelled"] == 1 and current["completed"] == 0 and current["in_flight"] == 0
    # a non-stream client that leaves while its answer is being generated: it leaves once the server
    # is generating (a client timeout could fire before the server even read the request)
    raw = orjson.dumps(chat(sim={"fault": {"stall_s": 5}}))
    request = b"POST /v1/chat/completions HTTP/1.1\r\nhost: sim\r\ncontent-type: application/json\r\n"
    with socket.create_connection((timed.host, timed.port)) as conn:
        conn.sendall(request + b"content-length: %d\r\n\r\n" % len(raw) + raw)
        assert wait_for_stats(timed, lambda s: s["in_flight"] == 1)["in_flight"] == 1
    current = wait_for_stats(timed, lambda s: s["cancelled"] >= 2 and s["in_flight"] == 0)
    assert current["cancelled"] == 2 and current["completed"] == 0 and current["in_flight"] == 0


def test_stream_timing_through_http(timed: BackgroundServer) -> None:
    stamps = []
    start = time.monotonic()
    with httpx.stream("POST", timed.url + "/v1/chat/completions", json=chat(stream=True)) as response:
        for line in response.iter_lines():
            if line:
                stamps.append(time.monotonic() - start)
    assert len(stamps) > 30
    assert stamps[0] >= 0.015  # TTFT
    assert stamps[-1] - stamps[0] >= 0.15  # ~170 tokens at 600 tok/s
    assert stats(timed)["completed"] == 1


def test_recorded_requests_include_headers(moonshot: BackgroundServer) -> None:
    sdk(moonshot, key="sk-first").chat.completions.create(**chat(user="a"))
    sdk(moonshot, key="sk-second").chat.completions.create(**chat(user="b"))
    records = httpx.get(moonshot.url + "/_sim/requests?limit=1").json()
    assert len(records) == 1 and records[0]["body"]["user"] == "b"
    assert records[0]["headers"]["authorization"] == "Bearer sk-second"
    both = httpx.get(moonshot.url + "/_sim/requests").json()
    assert [r["body"]["user"] for r in both] == ["a", "b"]
    assert httpx.get(moonshot.url + "/_sim/requests?limit=x").status_code == 400
    current = stats(moonshot)
    assert current["requests"] == 2 and current["completed"] == 2 and current["profile"] == "instant"
    httpx.post(moonshot.url + "/_sim/reset")
    assert httpx.get(moonshot.url + "/_sim/requests").json() == [] and stats(moonshot)["requests"] == 0


def test_keep_alive_reuses_one_connection(moonshot: BackgroundServer) -> None:
    peers = set()
    with httpx.Client(base_url=moonshot.url) as client:
        for stream in (False, True, False):
            with client.stream("POST", "/v1/chat/completions", json=chat(stream=stream)) as response:
                response.read()
                peers.add(response.extensions["network_stream"].get_extra_info("socket").getsockname())
    assert len(peers) == 1


# -- the module entry point ----------------------------------------------------------------------------


def test_main_rejects_unknown_profile(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--profile", "nope"])
    assert caught.value.code == 2
    assert "unknown simulator profile 'nope'" in capsys.readouterr().err


def test_python_m_simulator_serves() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "simulator", "--port", str(port), "--profile", "vllm"]
    argv += ["--ttft-ms", "0", "--tokens-per-s", "0"]
    with subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as proc:
        try:
            deadline = time.monotonic() + 15
            while True:
                try:
                    health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                    break
                except httpx.TransportError:
                    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                    assert time.monotonic() < deadline, "the simulator did not start"
                    time.sleep(0.05)
            assert health.json()["simulator"] == "vllm"
            reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=chat())
            assert reply.json()["choices"][0]["message"]["reasoning"]
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=10)
    assert b"profile vllm (vllm" in err
