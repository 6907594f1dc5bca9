"""The Responses API end to end: the official openai SDK's ``client.responses`` (and a replayed Codex
CLI request) against ``kimi-gateway serve`` in front of a simulator process in Moonshot's dialect,
which refuses an assistant tool-call message without ``reasoning_content`` and calls tools for
three rounds before it answers.

Tenants: pass, strip and redact, plus ``sealed`` (strip, nothing kept server-side by the reasoning
store, ``when_missing: reject``): its loops work only if K2's reasoning comes back through the
Responses API's own means (sealed ``encrypted_content``, stored responses, reasoning item ids), and
``hosted`` refuses hosted tools."""

from __future__ import annotations

import contextlib
import copy
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import PYTHON, Process, free_port, hashed, start_gateway, write_gateway

ROUNDS = 3
MODEL = "kimi-k2-thinking"
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "codex_0.169.0_responses.json"
REASONING = {
    "pass": "{}",
    "strip": "{mode: strip}",
    "redact": "{mode: redact}",
    "sealed": "{mode: strip, keep_for_tool_loops: false, when_missing: reject}",
    "hosted": "{}",
}
KEYS = {tenant: f"sk-responses-{tenant}" for tenant in REASONING}
TOOLS: list[Any] = [
    {
        "type": "function",
        "name": name,
        "description": f"The {what} in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        "strict": False,
    }
    for name, what in (("get_weather", "weather"), ("get_time", "local time"))
]
QUESTION = "Weather and time in Beijing, please."


def policy(tenant: str) -> str:
    extra = "responses: {hosted_tools: reject}\n" if tenant == "hosted" else ""
    return (
        f'tenant: {tenant}\nkeys: ["{hashed(KEYS[tenant])}"]\n'
        f"models:\n  {MODEL}: {{candidates: [sim/{MODEL}]}}\nreasoning: {REASONING[tenant]}\n{extra}"
    )


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    folder = tmp_path_factory.mktemp("responses-sim")
    port = free_port()
    args = [PYTHON, "-m", "gateway.cli", "simulate", "--port", str(port), "--profile", "instant"]
    args += ["--ttft-ms", "0", "--tokens-per-s", "0", "--tool-rounds", str(ROUNDS)]
    proc = Process(args, port, folder / f"simulator-{port}.log", "/health")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, upstream: Process) -> Iterator[Process]:
    folder = tmp_path_factory.mktemp("responses")
    upstreams = f"  sim:\n    kind: openai\n    base_url: {upstream.url}/v1\n    models: [{MODEL}]\n"
    config = write_gateway(folder, upstreams, policy("pass"))
    for tenant in REASONING:
        if tenant != "pass":
            (config.parent / "gateway-policies" / f"{tenant}.yaml").write_text(policy(tenant))
    proc = start_gateway(config, env={"KIMI_GATEWAY_SEAL_KEY": ""})  # the key lives in the shared state
    yield proc
    proc.stop()


@pytest.fixture()
def sim(upstream: Process) -> Process:
    httpx.post(upstream.url + "/_sim/reset", timeout=5)
    return upstream


def client(gw: Process, tenant: str = "pass") -> OpenAI:
    return gw.openai(KEYS[tenant])


def upstream_bodies(sim: Process) -> list[dict[str, Any]]:
    return [e["body"] for e in httpx.get(f"{sim.url}/_sim/requests", timeout=5).json()]


def ledger(gw: Process, request_id: str, timeout: float = 10.0) -> tuple[Any, ...] | None:
    """The ledger row of a request (status, outcome, cost, endpoint, tenant), waiting for the batch
    writer up to ``timeout``; None when none appeared."""
    db = gw.log.parent / "gateway-ledger.db"
    deadline = time.monotonic() + timeout
    while True:
        if db.exists():
            with contextlib.closing(sqlite3.connect(db)) as conn:
                row = conn.execute(
                    "SELECT status, outcome, cost_nanos, endpoint, tenant FROM ledger WHERE request_id = ?",
                    (request_id,),
                ).fetchone()
            if row is not None:
                return tuple(row)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def calls_of(response: Any) -> list[Any]:
    return [item for item in response.output if item.type == "function_call"]


def outputs(calls: list[Any]) -> list[dict[str, Any]]:
    return [{"type": "function_call_output", "call_id": c.call_id, "output": f'{{"{c.name}": "ok"}}'} for c in calls]


def run(c: OpenAI, stream: bool, **kwargs: Any) -> Any:
    if not stream:
        return c.responses.create(model=MODEL, **kwargs)
    with c.responses.stream(model=MODEL, **kwargs) as events:
        for _ in events:
            pass
        return events.get_final_response()


def assert_turns_kept_reasoning(sim: Process) -> None:
    """Every upstream request of the loop carried non-blank reasoning on each tool-call turn."""
    for body in upstream_bodies(sim):
        for message in body["messages"]:
            if message["role"] == "assistant" and message.get("tool_calls"):
                assert message.get("reasoning_content", "").strip(), message


# ------------------------------------------------------------------------------------------ text


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
def test_text_answer(gateway: Process, sim: Process, stream: bool) -> None:
    c = client(gateway)
    if stream:
        with c.responses.stream(model=MODEL, input="Why is the sky blue?", instructions="Be brief.") as events:
            kinds = [event.type for event in events]
            response = events.get_final_response()
        assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
        assert "response.output_text.delta" in kinds
    else:
        raw = c.responses.with_raw_response.create(model=MODEL, input="Why is the sky blue?", instructions="Be brief.")
        response = raw.parse()
        assert raw.headers["x-gateway-upstream"] == f"sim/{MODEL}"
        assert float(raw.headers["x-gateway-cost-usd"]) > 0
        row = ledger(gateway, raw.headers["x-request-id"])
        assert row is not None and row[:2] == (200, "ok") and row[3] == "responses"
    assert response.status == "completed" and response.model == MODEL
    assert response.output_text
    assert response.usage is not None and response.usage.input_tokens > 0 and response.usage.output_tokens > 0
    [sent] = upstream_bodies(sim)
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Why is the sky blue?"},
    ]


# ------------------------------------------------------------------------------------ tool loops


@pytest.mark.parametrize("tenant", ["pass", "strip", "redact", "sealed"])
@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
def test_tool_loop_resending_the_history(gateway: Process, sim: Process, tenant: str, stream: bool) -> None:
    """openai-agents' way: every turn sends the whole history, output items as received."""
    c = client(gateway, tenant)
    history: list[Any] = [{"role": "user", "content": QUESTION}]
    for _ in range(ROUNDS):
        response = run(c, stream, input=history, tools=TOOLS)
        calls = calls_of(response)
        assert calls and all(call.call_id and call.arguments for call in calls)
        history += [item.model_dump(exclude_none=True) for item in response.output] + outputs(calls)
    final = run(c, stream, input=history, tools=TOOLS)
    assert not calls_of(final) and final.output_text
    assert_turns_kept_reasoning(sim)
    if tenant in ("strip", "sealed"):
        shown = [item for item in final.output if item.type == "reasoning"]
        assert all(not item.summary and not item.content for item in shown)


@pytest.mark.parametrize("tenant", ["pass", "strip", "sealed"])
@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
def test_tool_loop_with_previous_response_id(gateway: Process, sim: Process, tenant: str, stream: bool) -> None:
    c = client(gateway, tenant)
    response = run(c, stream, input=QUESTION, tools=TOOLS, instructions="Use the tools.")
    for _ in range(ROUNDS):
        calls = calls_of(response)
        assert calls
        response = run(c, stream, input=outputs(calls), tools=TOOLS, previous_response_id=response.id)
    assert not calls_of(response) and response.output_text
    assert response.previous_response_id is not None
    assert_turns_kept_reasoning(sim)
    first, last = upstream_bodies(sim)[0]["messages"], upstream_bodies(sim)[-1]["messages"]
    assert first[0] == {"role": "system", "content": "Use the tools."}
    assert last[0] == {"role": "user", "content": QUESTION}  # instructions are not carried over
    assert [m["role"] for m in last].count("assistant") == ROUNDS


@pytest.mark.parametrize("tenant", ["pass", "strip", "redact", "sealed"])
@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
def test_stateless_loop_with_sealed_reasoning(gateway: Process, sim: Process, tenant: str, stream: bool) -> None:
    """Codex CLI's way: store false, include reasoning.encrypted_content, the history sent back."""
    c = client(gateway, tenant)
    options: dict[str, Any] = {"tools": TOOLS, "store": False, "include": ["reasoning.encrypted_content"]}
    history: list[Any] = [{"role": "user", "content": QUESTION}]
    for _ in range(ROUNDS):
        response = run(c, stream, input=history, **options)
        reasoning = [item for item in response.output if item.type == "reasoning"]
        assert reasoning and all(item.encrypted_content for item in reasoning)
        history += [item.model_dump(exclude_none=True) for item in response.output] + outputs(calls_of(response))
    final = run(c, stream, input=history, **options)
    assert final.output_text and not calls_of(final)
    assert_turns_kept_reasoning(sim)
    sent = [m for m in upstream_bodies(sim)[-1]["messages"] if m["role"] == "assistant"]
    for item, message in zip([i for i in history if i.get("type") == "reasoning"], sent, strict=True):
        assert message["reasoning_content"] not in item["encrypted_content"]  # sealed, not encoded
    with pytest.raises(openai.NotFoundError):  # store: false keeps nothing
        c.responses.retrieve(final.id)


def _stateless_turn(c: OpenAI) -> list[Any]:
    response = c.responses.create(
        model=MODEL, input=QUESTION, tools=TOOLS, store=False, include=["reasoning.encrypted_content"]
    )
    items = [item.model_dump(exclude_none=True) for item in response.output]
    return [{"role": "user", "content": QUESTION}, *items, *outputs(calls_of(response))]


def _assert_refused_before_any_spend(gw: Process, sim: Process, c: OpenAI, history: list[Any], index: int) -> None:
    before = len(upstream_bodies(sim))
    with pytest.raises(openai.BadRequestError) as info:
        c.responses.create(model=MODEL, input=history, tools=TOOLS, store=False)
    body = info.value.body
    assert isinstance(body, dict) and body["param"] == f"input[{index}].encrypted_content"
    assert body["code"] == "invalid_encrypted_content"
    assert len(upstream_bodies(sim)) == before
    later = c.responses.with_raw_response.create(model=MODEL, input="a later request", store=False)
    assert ledger(gw, later.headers["x-request-id"]) is not None  # a later request's row is written...
    rid = info.value.response.headers["x-request-id"]
    assert ledger(gw, rid, timeout=1.0) is None  # ...and the refused request has none: nothing reserved or spent


def test_forged_encrypted_content_is_refused_before_any_spend(gateway: Process, sim: Process) -> None:
    c = client(gateway, "strip")
    history = _stateless_turn(c)
    index = next(i for i, item in enumerate(history) if item.get("type") == "reasoning")
    forged = copy.deepcopy(history)
    blob = forged[index]["encrypted_content"]
    forged[index]["encrypted_content"] = blob[:-6] + ("AAAAAA" if not blob.endswith("AAAAAA") else "BBBBBB")
    _assert_refused_before_any_spend(gateway, sim, c, forged, index)
    made_up = copy.deepcopy(history)
    made_up[index]["encrypted_content"] = "SEALED-BLOB-1"
    _assert_refused_before_any_spend(gateway, sim, c, made_up, index)


def test_another_tenants_encrypted_content_is_refused(gateway: Process, sim: Process) -> None:
    history = _stateless_turn(client(gateway, "pass"))
    index = next(i for i, item in enumerate(history) if item.get("type") == "reasoning")
    _assert_refused_before_any_spend(gateway, sim, client(gateway, "strip"), history, index)


# -------------------------------------------------------------------------------- stored responses


def test_get_list_delete_and_other_tenants(gateway: Process, sim: Process) -> None:
    c = client(gateway, "strip")
    response = c.responses.create(model=MODEL, input="Remember me.", metadata={"ticket": "42"})
    got = c.responses.retrieve(response.id)
    assert got.id == response.id and got.output_text == response.output_text and got.metadata == {"ticket": "42"}
    items = c.responses.input_items.list(response.id)
    assert [item.type for item in items.data] == ["message"] and items.data[0].id
    other = client(gateway, "pass")
    for call in (
        lambda: other.responses.retrieve(response.id),
        lambda: other.responses.delete(response.id),
        lambda: other.responses.input_items.list(response.id),
    ):
        with pytest.raises(openai.NotFoundError) as info:
            call()
        assert isinstance(info.value.body, dict) and info.value.body["code"] == "response_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        other.responses.create(model=MODEL, input="go on", previous_response_id=response.id)
    assert isinstance(bad.value.body, dict) and bad.value.body["param"] == "previous_response_id"
    deleted = httpx.delete(
        f"{gateway.url}/v1/responses/{response.id}", headers={"authorization": f"Bearer {KEYS['strip']}"}, timeout=5
    )
    assert deleted.status_code == 200 and deleted.json() == {"id": response.id, "object": "response", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(response.id)
    assert httpx.get(f"{gateway.url}/v1/responses/{response.id}", timeout=5).status_code == 401


def test_a_stream_refused_before_its_first_event_is_a_plain_json_error(gateway: Process, sim: Process) -> None:
    """An upstream error before any byte reaches the client as the Responses API's JSON error, with
    its status, the way the SDKs raise it, not as an event stream wrapped around an error body."""
    httpx.post(sim.url + "/_sim/faults", json={"status": 400, "message": "bad things", "count": 2})
    headers = {"authorization": f"Bearer {KEYS['pass']}"}
    body = {"model": MODEL, "input": "hi", "stream": True}
    with httpx.stream("POST", f"{gateway.url}/v1/responses", json=body, headers=headers, timeout=30) as reply:
        reply.read()
    assert reply.status_code == 400 and reply.headers["content-type"].startswith("application/json")
    error = reply.json()["error"]
    assert "bad things" in error["message"] and set(error) >= {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError) as info, client(gateway).responses.stream(model=MODEL, input="hi") as e:
        for _ in e:
            pass
    assert isinstance(info.value.body, dict) and "bad things" in info.value.body["message"]


# ------------------------------------------------------------------------- hosted and unsupported


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
def test_hosted_tools_are_left_out_and_named(gateway: Process, sim: Process, stream: bool) -> None:
    body = {
        "model": MODEL,
        "input": QUESTION,
        "tools": [*TOOLS, {"type": "web_search"}, {"type": "code_interpreter", "container": {"type": "auto"}}],
        "stream": stream,
    }
    headers = {"authorization": f"Bearer {KEYS['pass']}"}
    with httpx.stream("POST", f"{gateway.url}/v1/responses", json=body, headers=headers, timeout=30) as reply:
        reply.read()
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-gateway-omitted-tools"] == "web_search, code_interpreter"
    [sent] = upstream_bodies(sim)
    assert [t["function"]["name"] for t in sent["tools"]] == ["get_weather", "get_time"]


def test_hosted_tools_refused_for_a_reject_tenant(gateway: Process, sim: Process) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client(gateway, "hosted").responses.create(
            model=MODEL, input=QUESTION, tools=[TOOLS[0], {"type": "web_search"}]
        )
    assert isinstance(info.value.body, dict)
    assert (info.value.body["param"], info.value.body["code"]) == ("tools[1].type", "unsupported_tool")
    assert upstream_bodies(sim) == []


@pytest.mark.parametrize(
    ("field", "value"), [("background", True), ("conversation", "conv_1"), ("prompt", {"id": "pmpt_1"})]
)
def test_unsupported_features_are_400_with_param(gateway: Process, sim: Process, field: str, value: Any) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client(gateway).responses.create(model=MODEL, input="hi", extra_body={field: value})
    assert isinstance(info.value.body, dict) and info.value.body["param"] == field
    assert upstream_bodies(sim) == []


# ----------------------------------------------------------------------------------- Codex CLI


def _sse(reply: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in reply.iter_lines() if line.startswith("data: ")]


def test_replayed_codex_request(gateway: Process, sim: Process) -> None:
    """Codex CLI 0.169.0's captured requests (store false, parallel tool calls, include, a namespace
    tool and the hosted web_search), replayed with its headers: turn 1 as captured, turn 2 with the
    items the gateway answered; the captured turn 2 itself carries a blob the gateway never sealed."""
    capture = json.loads(FIXTURE.read_text())
    first = capture["requests"][0]
    headers = {k: v for k, v in first["headers"].items() if k not in ("authorization", "content-length")}
    headers["authorization"] = f"Bearer {KEYS['strip']}"
    url = f"{gateway.url}/v1/responses"
    with httpx.stream("POST", url, json=first["body"], headers=headers, timeout=30) as reply:
        events = _sse(reply)
    assert reply.status_code == 200 and reply.headers["x-gateway-omitted-tools"] == "web_search"
    assert events[-1]["type"] == "response.completed"
    output = events[-1]["response"]["output"]
    calls = [item for item in output if item["type"] == "function_call"]
    assert calls and any(item["type"] == "reasoning" and item.get("encrypted_content") for item in output)
    sent = upstream_bodies(sim)[-1]
    assert "multi_agent_v1" not in {t["function"]["name"] for t in sent["tools"]}
    assert sent["prompt_cache_key"] == first["body"]["prompt_cache_key"]
    second = copy.deepcopy(capture["requests"][1]["body"])
    base = len(first["body"]["input"])
    replies = [{"type": "function_call_output", "call_id": c["call_id"], "output": "hello-from-tool\n"} for c in calls]
    second["input"] = second["input"][:base] + output + replies
    with httpx.stream("POST", url, json=second, headers=headers, timeout=30) as reply:
        events = _sse(reply)
    assert reply.status_code == 200 and events[-1]["type"] == "response.completed"
    assert_turns_kept_reasoning(sim)
    verbatim = httpx.post(url, json=capture["requests"][1]["body"], headers=headers, timeout=30)
    assert verbatim.status_code == 400
    assert verbatim.json()["error"]["param"] == f"input[{base}].encrypted_content"


# ------------------------------------------------------------------- two replicas sharing Redis


@pytest.mark.redis
def test_replicas_on_redis_share_sealing_key_and_stored_responses(tmp_path: Path, sim: Process) -> None:
    """No sealing secret configured: the key both replicas use (and a restarted one finds) is the one
    created in Redis. A stateless loop and a previous_response_id loop alternate between them, for a
    tenant whose tool turns work only through the Responses API's own means."""
    from tests.e2e.redis_helpers import drop_namespace, shared_redis, state_yaml

    url, namespace = shared_redis()
    upstreams = f"  sim:\n    kind: openai\n    base_url: {sim.url}/v1\n    models: [{MODEL}]\n"
    configs = [
        write_gateway(tmp_path, upstreams, policy("sealed"), extra_yaml=state_yaml(url, namespace), name=f"r{i}")
        for i in range(2)
    ]
    env = {"KIMI_GATEWAY_SEAL_KEY": ""}
    procs = [start_gateway(config, env=env) for config in configs]
    try:
        clients = [p.openai(KEYS["sealed"]) for p in procs]
        options: dict[str, Any] = {"tools": TOOLS, "store": False, "include": ["reasoning.encrypted_content"]}
        history: list[Any] = [{"role": "user", "content": QUESTION}]
        for n in range(ROUNDS):
            response = clients[n % 2].responses.create(model=MODEL, input=history, **options)
            history += [item.model_dump(exclude_none=True) for item in response.output] + outputs(calls_of(response))
        procs[0].stop()  # a restarted replica finds the same key in Redis
        procs[0] = start_gateway(configs[0], env=env)
        clients[0] = procs[0].openai(KEYS["sealed"])
        final = clients[0].responses.create(model=MODEL, input=history, **options)
        assert final.output_text and not calls_of(final)
        response = clients[0].responses.create(model=MODEL, input=QUESTION, tools=TOOLS)
        for n in range(ROUNDS):
            response = clients[(n + 1) % 2].responses.create(
                model=MODEL, input=outputs(calls_of(response)), tools=TOOLS, previous_response_id=response.id
            )
        assert response.output_text and not calls_of(response)
        assert clients[0].responses.retrieve(response.id).output_text == response.output_text
        assert_turns_kept_reasoning(sim)
    finally:
        for proc in procs:
            proc.stop()
        drop_namespace(url, namespace)
