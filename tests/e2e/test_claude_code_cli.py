"""Claude Code itself, headless, through the gateway: ``claude -p`` (the pinned npm release, installed
by ``tests/npm_clis.py``) with ``ANTHROPIC_BASE_URL`` at a real ``kimi-gateway serve`` in front of
the simulator process, which enforces K2's reasoning rule on tool-call turns.

Claude Code's first request is the one that used to fail (a ``role: "system"`` message inside
``messages``, adaptive thinking with omitted display, context management, effort, a deferred tool).
Its tools are restricted to ``Read`` so the round trip is harmless: the simulated model calls it
with a synthetic ``file_path`` ("example"), the CLI reads the file of that name the test put in its
working directory, and the second request carries the ``tool_result`` with the file's text.

The CLI runs offline: a throwaway ``HOME``, Claude Code's switches for telemetry, error reports,
updates and other non-essential traffic off, and a proxy on a closed loopback port for anything but
loopback, so a request that tried to leave the machine would fail instead of going out.

Where the CLI cannot be installed, ``test_captured_requests_replay_through_the_gateway`` still
replays the requests this version sent (tests/fixtures/claude_code_2.1.328_messages.json).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, Process, free_port, hashed, start_gateway, write_gateway
from tests.npm_clis import CLAUDE_CODE, npm_cli

MODEL = "kimi-k2-thinking"
KEYS = {mode: f"sk-claude-code-{mode}" for mode in ("pass", "strip", "redact")}
FILE_TEXT = "the secret word is pineapple"
PROMPT = "Read the file named example and tell me what it says."
FIXTURE = ROOT / "tests" / "fixtures" / "claude_code_2.1.328_messages.json"
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, simulator: Process) -> Iterator[Process]:
    folder = tmp_path_factory.mktemp("claude-code")
    upstreams = f"""\
  sim:
    kind: openai
    base_url: {simulator.url}/v1
    models: [{MODEL}]
"""

    def policy(mode: str) -> str:
        return (
            f'tenant: claude-code-{mode}\nkeys: ["{hashed(KEYS[mode])}"]\n'
            f"models:\n  {MODEL}: {{candidates: [sim/{MODEL}]}}\nreasoning: {{mode: {mode}}}\n"
        )

    config = write_gateway(folder, upstreams, policy("pass"))
    for mode in ("strip", "redact"):
        (folder / "gateway-policies" / f"{mode}.yaml").write_text(policy(mode))
    proc = start_gateway(config)
    yield proc
    proc.stop()


def run_claude(gateway: Process, key: str, tmp: Path, *options: str) -> subprocess.CompletedProcess[str]:
    exe = npm_cli(CLAUDE_CODE)
    work, home = tmp / "work", tmp / "home"
    work.mkdir()
    home.mkdir()
    (work / "example").write_text(FILE_TEXT + "\n")
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "TERM": "dumb",
        "ANTHROPIC_BASE_URL": gateway.url,
        "ANTHROPIC_API_KEY": key,
        "DISABLE_TELEMETRY": "1",
        "DISABLE_ERROR_REPORTING": "1",
        "DISABLE_AUTOUPDATER": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "HTTPS_PROXY": dead_proxy,
        "HTTP_PROXY": dead_proxy,
        "NO_PROXY": "127.0.0.1,localhost",
        **{
            name: MODEL
            for name in (
                "ANTHROPIC_MODEL",
                "ANTHROPIC_SMALL_FAST_MODEL",
                "ANTHROPIC_DEFAULT_HAIKU_MODEL",
                "ANTHROPIC_DEFAULT_SONNET_MODEL",
                "ANTHROPIC_DEFAULT_OPUS_MODEL",
                "CLAUDE_CODE_SUBAGENT_MODEL",
            )
        },
    }
    args = [str(exe), "-p", PROMPT, "--tools", "Read", "--max-turns", "4", "--no-session-persistence", *options]
    return subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def upstream_requests(sim: Process) -> list[dict[str, Any]]:
    return [r["body"] for r in httpx.get(sim.url + "/_sim/requests", timeout=5).json()]


def assert_tool_round_trip(sent: list[dict[str, Any]]) -> None:
    """The first upstream request made a Read call; the next one carried its call and the file's text."""
    assert len(sent) >= 2, sent
    first, second = sent[0], sent[1]
    assert [t["function"]["name"] for t in first["tools"]] == ["Read"]  # the deferred placeholder stays out
    assert first["messages"][-1]["role"] == "user"  # the mid-conversation system message folded in
    assert "<system-reminder>\n# Environment" in first["messages"][-1]["content"]
    assert PROMPT in first["messages"][-1]["content"]
    assert all(m["role"] != "system" for m in first["messages"][1:])
    [call_turn] = [m for m in second["messages"] if m["role"] == "assistant" and m.get("tool_calls")]
    [call] = call_turn["tool_calls"]
    assert call["function"]["name"] == "Read"
    assert call_turn["reasoning_content"].strip()  # K2's reasoning went back with the call
    results = [m for m in second["messages"] if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in results] == [call["id"]]
    assert FILE_TEXT in results[0]["content"]  # the CLI really ran the tool


@pytest.mark.parametrize("mode", ["pass", "strip", "redact"])
def test_claude_p_runs_a_tool_round_trip(gateway: Process, sim: Process, tmp_path: Path, mode: str) -> None:
    done = run_claude(gateway, KEYS[mode], tmp_path, "--output-format", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert result["type"] == "result" and result["subtype"] == "success" and not result["is_error"]
    assert result["num_turns"] == 2 and result["result"].strip()
    assert result["usage"]["output_tokens"] > 0
    assert_tool_round_trip(upstream_requests(sim))


def test_claude_p_stream_json_shows_the_tool_use_and_its_result(gateway: Process, sim: Process, tmp_path: Path) -> None:
    done = run_claude(gateway, KEYS["pass"], tmp_path, "--output-format", "stream-json", "--verbose")
    assert done.returncode == 0, done.stdout + done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    blocks = [
        (e["type"], b)
        for e in events
        if e.get("type") in ("assistant", "user")
        for b in e["message"]["content"]
        if isinstance(b, dict)
    ]
    [use] = [b for kind, b in blocks if kind == "assistant" and b["type"] == "tool_use"]
    assert use["name"] == "Read"
    [back] = [b for kind, b in blocks if kind == "user" and b["type"] == "tool_result"]
    assert back["tool_use_id"] == use["id"] and FILE_TEXT in json.dumps(back["content"])
    assert events[-1]["type"] == "result" and events[-1]["subtype"] == "success"
    assert_tool_round_trip(upstream_requests(sim))


def test_captured_requests_replay_through_the_gateway(gateway: Process, sim: Process) -> None:
    """The requests Claude Code 2.1.328 sent, byte for byte as captured (headers, ``?beta=true``),
    answered 200 with Anthropic's event stream; the upstream got a valid K2 request."""
    captured = json.loads(FIXTURE.read_text())["requests"]
    for request in captured:
        headers = {**request["headers"], "x-api-key": KEYS["pass"]}
        headers.pop("accept-encoding", None)
        reply = httpx.post(gateway.url + request["path"], json=request["body"], headers=headers, timeout=30)
        assert reply.status_code == 200, reply.text
        assert reply.headers["content-type"].startswith("text/event-stream")
        assert "event: message_stop" in reply.text and "event: error" not in reply.text
    sent = upstream_requests(sim)
    assert len(sent) == len(captured)
    assert [t["function"]["name"] for t in sent[0]["tools"]][:3] == ["Agent", "Bash", "Edit"]
    assert "DeferredToolPlaceholder" not in json.dumps(sent[0]["tools"])
    assert not any("x-anthropic-billing-header" in json.dumps(body["messages"]) for body in sent)
    counted = {k: v for k, v in captured[0]["body"].items() if k not in ("max_tokens", "stream")}
    reply = httpx.post(
        gateway.url + "/v1/messages/count_tokens?beta=true", json=counted, headers={"x-api-key": KEYS["pass"]}
    )
    assert reply.status_code == 200 and reply.json()["input_tokens"] > 1000
    assert len(upstream_requests(sim)) == len(captured)  # counting calls no upstream
