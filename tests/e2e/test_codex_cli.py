"""Codex CLI against ``POST /v1/responses``: the real ``codex exec`` (npm ``@openai/codex``, the version
pinned in tests/npm_clis.py) run headless, and its captured requests replayed byte for byte.

Codex speaks only the Responses API, statelessly: every turn is ``stream: true, store: false`` with
``include: ["reasoning.encrypted_content"]``, and K2's reasoning has to travel to the next turn inside the
reasoning item's ``encrypted_content``. The simulated upstream enforces Moonshot's rule (an assistant
tool-call message without ``reasoning_content`` is a 400) and makes two rounds of tool calls, so a run
only ends with exit 0 and a final message when the whole loop works: tool call out, Codex runs it, the
output comes back, and the reasoning of the earlier turn reaches the upstream again, for ``pass``,
``strip`` and ``redact`` tenants alike.

The fixture ``tests/fixtures/codex_0.169.0_responses.json`` holds the two requests that version sent
(the first turn and the turn after a tool call) and the minimal streams it accepted; the replay tests
check the event stream Codex's parser needs (codex-rs ``process_sse``): items in
``response.output_item.done``, a ``response.completed`` with an ``id`` and integer usage, then EOF.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import PYTHON, Process, free_port, hashed, start_gateway, write_gateway
from tests.e2e.test_reasoning_modes import FIRST_REASONING
from tests.npm_clis import CODEX, npm_cli

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "codex_0.169.0_responses.json"
MODEL = "kimi-k2-thinking"
TOOL_ROUNDS = 2
KEYS = {"pass": "sk-codex-pass", "strip": "sk-codex-strip", "redact": "sk-codex-redact"}
# the words of the simulator's reasoning the redact tenant hides (its reasoning starts "The user wants")
REDACTED = ("wants", "restate")
CODEX_TIMEOUT_S = 120


def captured() -> dict[str, Any]:
    return dict(json.loads(FIXTURE.read_text()))


def start_tool_simulator(folder: Path, rounds: int) -> Process:
    """An instant Moonshot-shaped simulator whose model calls tools for ``rounds`` rounds."""
    port = free_port()
    args = [PYTHON, "-m", "gateway.cli", "simulate", "--port", str(port), "--profile", "instant"]
    return Process([*args, "--tool-rounds", str(rounds)], port, folder / f"simulator-{port}.log", "/health")


def tenants_gateway(folder: Path, sim: Process, keys: dict[str, str], name: str = "gateway") -> Path:
    """A gateway config with one tenant per reasoning mode, all on the simulator."""
    upstreams = f"  sim:\n    kind: openai\n    base_url: {sim.url}/v1\n    models: [{MODEL}]\n"
    models = f"models:\n  {MODEL}: {{candidates: [sim/{MODEL}]}}\n"
    pass_policy = f'tenant: {keys["pass"]}\nkeys: ["{hashed(keys["pass"])}"]\n{models}'
    config = write_gateway(folder, upstreams, pass_policy, name=name)
    policies = folder / f"{name}-policies"
    (policies / "strip.yaml").write_text(
        f'tenant: {keys["strip"]}\nkeys: ["{hashed(keys["strip"])}"]\n{models}reasoning: {{mode: strip}}\n'
    )
    patterns = ", ".join(f"{{kind: word{i}, regex: '{w}'}}" for i, w in enumerate(REDACTED))
    (policies / "redact.yaml").write_text(
        f'tenant: {keys["redact"]}\nkeys: ["{hashed(keys["redact"])}"]\n{models}'
        f"reasoning:\n  mode: redact\n  redact: {{patterns: [{patterns}]}}\n"
    )
    return config


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("codex")


@pytest.fixture(scope="module")
def tool_sim(folder: Path) -> Iterator[Process]:
    proc = start_tool_simulator(folder, TOOL_ROUNDS)
    yield proc
    proc.stop()


# both gateways seal with the same secret, as replicas do; they share nothing else (memory state)
SEAL_ENV = {"KIMI_GATEWAY_SEAL_KEY": "test-seal-secret-0123456789abcdef0123456789abcdef"}


@pytest.fixture(scope="module")
def gateway(folder: Path, tool_sim: Process) -> Iterator[Process]:
    proc = start_gateway(tenants_gateway(folder, tool_sim, KEYS), env=SEAL_ENV)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def other_gateway(folder: Path, tool_sim: Process) -> Iterator[Process]:
    """A second gateway process that never saw turn one: only ``encrypted_content`` can tell it K2's
    reasoning."""
    proc = start_gateway(tenants_gateway(folder, tool_sim, KEYS, name="other"), env=SEAL_ENV)
    yield proc
    proc.stop()


@pytest.fixture()
def sim(tool_sim: Process) -> Process:
    httpx.post(tool_sim.url + "/_sim/reset", timeout=5)
    return tool_sim


def upstream_bodies(sim: Process) -> list[dict[str, Any]]:
    """What the simulated upstream received since its last reset, oldest first."""
    return [e["body"] for e in httpx.get(f"{sim.url}/_sim/requests?limit=100", timeout=5).json()]


def ledger_rows(folder: Path, tenant: str) -> list[dict[str, Any]]:
    with contextlib.closing(sqlite3.connect(folder / "gateway-ledger.db")) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM ledger WHERE tenant = ? ORDER BY id", (tenant,))]


def ledger_count(folder: Path, tenant: str) -> int:
    """How many ledger rows the tenant has so far (0 before the ledger file exists)."""
    try:
        return len(ledger_rows(folder, tenant))
    except sqlite3.Error:
        return 0


def wait_for_ledger(folder: Path, tenant: str, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The tenant's ledger rows once ``count`` of them are flushed (the ledger writes in batches)."""
    import time

    deadline = time.monotonic() + timeout
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        with contextlib.suppress(sqlite3.Error):
            rows = ledger_rows(folder, tenant)
        if len(rows) >= count:
            return rows
        time.sleep(0.05)
    raise AssertionError(f"{len(rows)} ledger rows for {tenant} after {timeout} s, expected {count}: {rows}")


def check_tool_loop_upstream(bodies: list[dict[str, Any]], rounds: int) -> None:
    """The upstream saw the whole loop: ``rounds`` tool-call turns came back, every assistant tool-call
    message with the original (unredacted, non-placeholder) reasoning, every tool result answering one
    of its calls."""
    assert len(bodies) == rounds + 1, [len(b.get("messages", ())) for b in bodies]
    messages = bodies[-1]["messages"]
    assistants = [m for m in messages if m.get("role") == "assistant" and m.get("tool_calls")]
    assert len(assistants) == rounds, messages
    for m in assistants:
        reasoning = m.get("reasoning_content")
        assert isinstance(reasoning, str) and FIRST_REASONING in reasoning, m
    call_ids = {c["id"] for m in assistants for c in m["tool_calls"]}
    results = [m for m in messages if m.get("role") == "tool"]
    assert results and {m["tool_call_id"] for m in results} == call_ids, (call_ids, results)


# --- the real CLI ------------------------------------------------------------------------------------


def codex_config(gateway: Process) -> str:
    """What a user puts in ``~/.codex/config.toml`` (README "Codex CLI"), kept offline for the test."""
    return f"""\
model = "{MODEL}"
model_provider = "kimi"
approval_policy = "never"
sandbox_mode = "read-only"
check_for_update_on_startup = false

[model_providers.kimi]
name = "Kimi Gateway"
base_url = "{gateway.url}/v1"
env_key = "KIMI_API_KEY"
wire_api = "responses"

[analytics]
enabled = false
"""


def run_codex(gateway: Process, key: str, tmp: Path, prompt: str) -> tuple[subprocess.CompletedProcess[str], str]:
    """``codex exec`` headless with its own CODEX_HOME; returns the process and its last message."""
    exe = npm_cli(CODEX)
    home, work = tmp / "codex-home", tmp / "work"
    home.mkdir()
    work.mkdir()
    (home / "config.toml").write_text(codex_config(gateway))
    last = tmp / "last-message.txt"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "CODEX_HOME": str(home),
        "KIMI_API_KEY": key,
        "NO_COLOR": "1",
    }
    args = [str(exe), "exec", "--json", "--ephemeral", "--strict-config", "--skip-git-repo-check"]
    args += ["--color", "never", "-o", str(last), prompt]
    # its own process group: the node launcher runs the native binary as a child, and a hung run must
    # take both down
    proc = subprocess.Popen(
        args,
        cwd=work,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=CODEX_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"codex exec did not finish in {CODEX_TIMEOUT_S} s\n{err[-3000:]}\n{gateway.output()[-3000:]}")
    done = subprocess.CompletedProcess(args, proc.returncode, out, err)
    return done, last.read_text() if last.exists() else ""


def jsonl(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("mode", ["pass", "strip", "redact"])
def test_codex_exec_runs_a_tool_loop_to_a_final_message(
    gateway: Process, sim: Process, folder: Path, tmp_path: Path, mode: str
) -> None:
    key = KEYS[mode]
    before = ledger_count(folder, key)
    done, last = run_codex(gateway, key, tmp_path, "List the files here, then tell me what you found.")
    assert done.returncode == 0, f"codex exit {done.returncode}\n{done.stderr[-3000:]}\n{gateway.output()[-3000:]}"
    events = jsonl(done.stdout)
    items = [e["item"] for e in events if e.get("type") == "item.completed"]
    commands = [i for i in items if i.get("type") == "command_execution"]
    messages = [i["text"] for i in items if i.get("type") == "agent_message"]
    # every round the simulated model calls exec_command; Codex ran each one and sent its output back
    assert len(commands) >= TOOL_ROUNDS, items
    assert all(c["status"] in ("completed", "failed") and c["exit_code"] is not None for c in commands), commands
    assert last.strip() and messages and messages[-1].strip() == last.strip(), (last, messages)
    assert any(e.get("type") == "turn.completed" and e["usage"]["input_tokens"] > 0 for e in events), events[-2:]

    bodies = upstream_bodies(sim)
    check_tool_loop_upstream(bodies, TOOL_ROUNDS)
    results = [m for m in bodies[-1]["messages"] if m.get("role") == "tool"]
    assert any("Process exited with code" in str(m.get("content")) for m in results), results
    # Codex's hosted web_search never reaches an upstream that cannot serve it
    assert all(t.get("type") == "function" for t in bodies[0]["tools"]), bodies[0]["tools"]

    rows = wait_for_ledger(folder, key, before + TOOL_ROUNDS + 1)[before:]
    assert [r["status"] for r in rows] == [200] * (TOOL_ROUNDS + 1), rows
    assert all(r["stream"] == 1 and r["virtual_model"] == MODEL and r["endpoint"] == "responses" for r in rows), rows

    shown = done.stdout + done.stderr
    if mode == "pass":  # K2's reasoning is the tenant's to see: Codex shows it as its reasoning items
        reasoning = [i for i in items if i.get("type") == "reasoning"]
        assert any(FIRST_REASONING in str(i.get("text")) for i in reasoning), reasoning
    if mode == "strip":
        reasoning = [i for i in items if i.get("type") == "reasoning" and i.get("text")]
        assert FIRST_REASONING not in shown and not reasoning, reasoning
    if mode == "redact":
        reasoning = [i for i in items if i.get("type") == "reasoning"]
        assert not any(w in shown for w in REDACTED), reasoning
        assert any("[REDACTED:word0]" in str(i.get("text")) for i in reasoning), reasoning


# --- the captured requests replayed --------------------------------------------------------------------


def parse_sse(text: str) -> list[tuple[str | None, dict[str, Any]]]:
    """(``event:`` name, data) of each SSE event, in order."""
    events: list[tuple[str | None, dict[str, Any]]] = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        name, data = None, []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip())
        if data:
            events.append((name, json.loads("\n".join(data))))
    return events


def codex_headers(request: dict[str, Any], key: str) -> dict[str, str]:
    """The captured request's headers, with the tenant's key and without the hop-specific ones."""
    skip = {"authorization", "host", "content-length"}
    headers = {k: v for k, v in request["headers"].items() if k.lower() not in skip}
    return {**headers, "authorization": f"Bearer {key}"}


def post_stream(gateway: Process, body: dict[str, Any], headers: dict[str, str]) -> tuple[httpx.Response, str]:
    with httpx.stream("POST", gateway.url + "/v1/responses", json=body, headers=headers, timeout=30) as reply:
        return reply, reply.read().decode()


def check_codex_stream(
    reply: httpx.Response, text: str, gateway: Process
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The stream satisfies codex-rs ``process_sse``; returns (output_item.done items, completed response)."""
    assert reply.status_code == 200, text[:2000] + "\n--- gateway log:\n" + gateway.output()[-3000:]
    assert reply.headers["content-type"].startswith("text/event-stream"), reply.headers
    events = parse_sse(text)
    kinds = [data["type"] for _, data in events]
    assert all(name is None or name == data["type"] for name, data in events), events
    assert [data.get("sequence_number") for _, data in events] == list(range(len(events))), kinds
    assert kinds[0] == "response.created" and isinstance(events[0][1].get("response"), dict), kinds
    assert kinds[-1] == "response.completed" and kinds.count("response.completed") == 1, kinds
    assert not {"response.failed", "error", "response.incomplete"} & set(kinds), kinds
    completed = events[-1][1]["response"]
    assert isinstance(completed["id"], str) and completed["id"] and completed["model"] == MODEL, completed
    usage = completed["usage"]
    for field in ("input_tokens", "output_tokens", "total_tokens"):
        assert type(usage[field]) is int, usage  # a null here makes Codex retry five times and give up
    assert type(usage["input_tokens_details"]["cached_tokens"]) is int, usage
    assert type(usage["output_tokens_details"]["reasoning_tokens"]) is int, usage
    assert usage["output_tokens"] > 0 and usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"], usage
    items = [data["item"] for _, data in events if data["type"] == "response.output_item.done"]
    added = [data["item"]["type"] for _, data in events if data["type"] == "response.output_item.added"]
    assert [i["type"] for i in items] == added, (added, items)
    assert [i.get("type") for i in completed["output"]] == [i["type"] for i in items], completed["output"]
    for item in items:
        if item["type"] == "function_call":
            assert item["name"] and item["call_id"], item
            assert isinstance(json.loads(item["arguments"]), dict), item
        if item["type"] == "reasoning":
            assert isinstance(item["summary"], list), item
        if item["type"] == "message":
            assert item["role"] == "assistant" and item["content"][0]["type"] == "output_text", item
    return items, completed


def as_codex_sends_back(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Output items the way Codex 0.169 puts them in its next request (fixture ``requests[1]``): as
    received, ``content`` / ``encrypted_content`` null when absent, and a function_call_output per call."""
    history: list[dict[str, Any]] = []
    for item in items:
        if item["type"] == "reasoning":
            history.append({"content": None, "encrypted_content": None, **item})
        elif item["type"] == "function_call":
            history.append(item)
    for item in items:
        if item["type"] == "function_call":
            output = "Chunk ID: 1a2b3c\nWall time: 0.0010 seconds\nProcess exited with code 0\nOutput:\nREADME.md\n"
            history.append(
                {"type": "function_call_output", "id": "fco_1", "call_id": item["call_id"], "output": output}
            )
    return history


def test_fixture_is_what_codex_sends() -> None:
    """The fixture has the shape the gateway is built for: if a re-capture changes it, this says what."""
    first, second = (r["body"] for r in captured()["requests"])
    for body in (first, second):
        assert body["stream"] is True and body["store"] is False
        assert body["include"] == ["reasoning.encrypted_content"] and body["reasoning"] == {"summary": "auto"}
        assert body["parallel_tool_calls"] is True and body["prompt_cache_key"] and body["client_metadata"]
        assert {t["type"] for t in body["tools"]} == {"function", "namespace", "web_search"}
    assert [i["type"] for i in second["input"][-3:]] == ["reasoning", "function_call", "function_call_output"]


@pytest.mark.parametrize("mode", ["pass", "strip"])
def test_replayed_codex_turns_carry_reasoning_in_encrypted_content(
    gateway: Process, other_gateway: Process, sim: Process, mode: str
) -> None:
    fixture = captured()
    request = fixture["requests"][0]
    headers = codex_headers(request, KEYS[mode])
    body = request["body"]
    reply, text = post_stream(gateway, body, headers)
    items, _ = check_codex_stream(reply, text, gateway)
    assert "web_search" in " ".join(reply.headers.values()), dict(reply.headers)  # the dropped hosted tool, named

    calls = [i for i in items if i["type"] == "function_call"]
    reasoning = [i for i in items if i["type"] == "reasoning"]
    assert calls and {c["name"] for c in calls} <= {t.get("name") for t in body["tools"]}, calls
    assert len(reasoning) == 1 and isinstance(reasoning[0].get("encrypted_content"), str), reasoning
    sealed = reasoning[0]["encrypted_content"]
    assert FIRST_REASONING not in sealed and len(sealed) > 16, sealed
    if mode == "strip":
        assert FIRST_REASONING not in text, text[:2000]

    upstream = upstream_bodies(sim)[-1]
    namespace = next(t for t in body["tools"] if t["type"] == "namespace")
    functions = [t for t in body["tools"] if t["type"] == "function"]
    assert len(upstream["tools"]) == len(functions) + len(namespace["tools"]), upstream["tools"]
    upstream_names = [t["function"]["name"] for t in upstream["tools"]]
    for tool in namespace["tools"]:
        assert any(n.endswith(tool["name"]) for n in upstream_names), (tool["name"], upstream_names)

    # turn 2, as Codex sends it: no previous_response_id, nothing stored; the reasoning is in the item,
    # sent to a gateway process that has no memory of turn one (for strip, the item has no text at all)
    follow = {**body, "input": [*body["input"], *as_codex_sends_back(items)]}
    reply, text = post_stream(other_gateway, follow, headers)
    check_codex_stream(reply, text, other_gateway)
    last = upstream_bodies(sim)[-1]["messages"]
    assistant = next(m for m in last if m.get("role") == "assistant" and m.get("tool_calls"))
    assert [c["id"] for c in assistant["tool_calls"]] == [c["call_id"] for c in calls], assistant
    assert FIRST_REASONING in str(assistant.get("reasoning_content")), assistant


def test_replayed_codex_turn_without_stream_is_a_response_object(gateway: Process, sim: Process) -> None:
    body = {**captured()["requests"][0]["body"], "stream": False}
    reply = httpx.post(
        gateway.url + "/v1/responses", json=body, headers={"authorization": f"Bearer {KEYS['pass']}"}, timeout=30
    )
    assert reply.status_code == 200, reply.text[:2000] + "\n--- gateway log:\n" + gateway.output()[-3000:]
    response = reply.json()
    assert response["object"] == "response" and response["status"] == "completed" and response["model"] == MODEL
    kinds = [i["type"] for i in response["output"]]
    assert "function_call" in kinds and "reasoning" in kinds, response["output"]
    assert type(response["usage"]["input_tokens_details"]["cached_tokens"]) is int, response["usage"]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
def test_a_namespace_tool_call_comes_back_with_its_namespace(gateway: Process, sim: Process, stream: bool) -> None:
    """Codex runs a member of its ``multi_agent_v1`` namespace only when the function_call names the
    namespace (``"name": "close_agent"`` alone is "unsupported call: close_agent", measured on 0.169.0),
    and it sends the call back next turn with that ``namespace`` field."""
    request = captured()["requests"][0]
    # Codex's own tools minus its function tools: the simulated model calls the first two it is given
    tools = [t for t in request["body"]["tools"] if t["type"] != "function"]
    members = {t["name"] for t in tools[0]["tools"]}
    body = {**request["body"], "tools": tools, "stream": stream}
    headers = codex_headers(request, KEYS["pass"])
    if stream:
        items, _ = check_codex_stream(*post_stream(gateway, body, headers), gateway)
    else:
        reply = httpx.post(gateway.url + "/v1/responses", json=body, headers=headers, timeout=30)
        assert reply.status_code == 200, reply.text[:2000]
        items = reply.json()["output"]
    calls = [i for i in items if i["type"] == "function_call"]
    assert len(calls) == 2 and all(c["name"] in members and c.get("namespace") == "multi_agent_v1" for c in calls), (
        calls
    )
    upstream = upstream_bodies(sim)[-1]

    follow = {**body, "stream": True, "input": [*body["input"], *as_codex_sends_back(items)]}
    check_codex_stream(*post_stream(gateway, follow, headers), gateway)
    last = upstream_bodies(sim)[-1]["messages"]
    assistant = next(m for m in last if m.get("role") == "assistant" and m.get("tool_calls"))
    sent = {t["function"]["name"] for t in upstream["tools"]}
    assert all(c["function"]["name"] in sent for c in assistant["tool_calls"]), (assistant, sent)


def test_codex_exec_recovers_from_an_upstream_stream_cut(gateway: Process, sim: Process, tmp_path: Path) -> None:
    """The upstream drops the first stream mid-way: the gateway ends it with ``response.failed`` (not a
    bare EOF), Codex treats that as retryable ("Reconnecting... 1/5"), and the retried turn finishes."""
    fault = {"cut_after_events": 3, "count": 1}
    assert httpx.post(sim.url + "/_sim/faults", json=fault, timeout=5).status_code == 200
    done, last = run_codex(gateway, KEYS["pass"], tmp_path, "List the files here.")
    assert done.returncode == 0, f"codex exit {done.returncode}\n{done.stderr[-3000:]}\n{gateway.output()[-3000:]}"
    assert last.strip(), done.stdout[-2000:]
    assert "Reconnecting... 1/5" in done.stdout + done.stderr, done.stderr[-2000:]
    assert len(upstream_bodies(sim)) == TOOL_ROUNDS + 2  # the cut turn was asked again


def test_codex_exec_with_a_wrong_key_stops_with_the_gateways_message(gateway: Process, tmp_path: Path) -> None:
    """A 401 in OpenAI's shape: Codex 0.169 retries a 401 five times itself (it would refresh a ChatGPT
    login), then stops with the gateway's message and request id."""
    done, _ = run_codex(gateway, "sk-not-a-tenant", tmp_path, "hello")
    assert done.returncode == 1, done.stdout[-2000:]
    failed = [e for e in jsonl(done.stdout) if e.get("type") == "turn.failed"]
    assert failed and "401" in failed[0]["error"]["message"], done.stdout[-2000:]
    assert "Incorrect API key provided" in failed[0]["error"]["message"] and "req_" in failed[0]["error"]["message"]
