"""What restoring reasoning into tool-call turns costs per request, on the request path and at the
answer's end, against the pass path before restore existed (one substring search).

    .venv/bin/python bench/reasoning_restore.py                 # memory state, ~20 s
    .venv/bin/python bench/reasoning_restore.py --turns 30      # a longer loop
    .venv/bin/python bench/reasoning_restore.py --redis redis://127.0.0.1:6379/0

Each case runs the real ``prepare_reasoning`` (and, where the answer calls tools, the recorder's
work when the answer ends: fingerprinting the conversation and queuing the write) on a fresh copy of
a tool-loop request of ``--turns`` rounds, shaped like an openai-agents loop: a 2 KB system prompt,
each round an assistant tool-call turn (two calls) and two 1 KB tool results, reasoning of 2 KB.
Per case it prints p50 and p90 in microseconds, wall time, GC on: the best of ``--rounds`` rounds of
``--n`` runs each, since other processes on a shared machine only ever add time:

* ``first-turn``: no history yet, the request has tools (the recorder is attached; the answer is
  text, so nothing is hashed).
* ``echoing-client``: every turn carries its reasoning (the openai SDK loop sending
  ``model_dump()`` back): walked once, never hashed, no state round trip.
* ``dropping-client``: no turn carries it (frameworks): all found in the store by the exact key.
* ``rebuilt-system-prompt``: as above with another system prompt: found by the fallback key.
* ``answer-with-tool-calls``: the recorder keeping a tool-call answer (hash of the conversation, two
  writes queued), measured apart from the request path.

The copy of the request (``copy.deepcopy``) is made outside the timed region.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.config import UpstreamConfig
from gateway.policy.model import CapturePolicy, ReasoningPolicy
from gateway.reasoning.inbound import prepare_reasoning
from gateway.reasoning.record import TurnRecorder
from gateway.reasoning.store import writes_done
from gateway.state.base import KeyValueState
from gateway.state.memory import MemoryKeyValueState
from gateway.transforms.chain import apply_whole

TOOLS = [
    {
        "type": "function",
        "function": {"name": n, "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
    }
    for n in ("get_weather", "get_time")
]
FILL = "lorem ipsum dolor sit amet, consectetur adipiscing elit. "


def text(n: int, seed: int) -> str:
    return (f"[{seed}] " + FILL * (n // len(FILL) + 1))[:n]


def calls(turn: int) -> list[dict[str, Any]]:
    return [
        {"id": f"{name}:{2 * turn + i}", "type": "function",
         "function": {"name": name, "arguments": orjson.dumps({"city": f"City {turn}"}).decode()}}
        for i, name in enumerate(("get_weather", "get_time"))
    ]  # fmt: skip


def conversation(turns: int, system: str = "system") -> tuple[list[dict[str, Any]], list[str]]:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": text(2048, hash(system) % 1000)},
        {"role": "user", "content": "Plan my trip across these cities and check the weather and time of each."},
    ]
    reasonings = []
    for t in range(turns):
        reasonings.append(text(2048, 10_000 + t))
        messages.append({"role": "assistant", "content": None, "tool_calls": calls(t)})
        for call in calls(t):
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": text(1024, 20_000 + t)})
    return messages, reasonings


def exchange(policy: ReasoningPolicy, messages: list[dict[str, Any]]) -> Any:
    body = {"model": "kimi-k2-thinking", "messages": messages, "tools": TOOLS}
    tenant = SimpleNamespace(name="bench", reasoning=policy, capture=CapturePolicy())
    return SimpleNamespace(
        candidate=SimpleNamespace(upstream="u", label="u/kimi-k2-thinking"), tenant=tenant, body=body,
        raw=orjson.dumps(body), transforms=[SimpleNamespace(stage=20)], dirty=False, model="kimi-k2-thinking",
    )  # fmt: skip


def runtime(kv: KeyValueState) -> Any:
    config = UpstreamConfig.model_validate(
        {"kind": "openai", "base_url": "http://x/v1", "models": ["kimi-k2-thinking"]}
    )
    return SimpleNamespace(upstreams={"u": SimpleNamespace(config=config, reasoning_field="reasoning_content")}, kv=kv)


def answer(turn: int, reasoning: str) -> bytes:
    message = {"role": "assistant", "content": "", "reasoning_content": reasoning, "tool_calls": calls(turn)}
    return orjson.dumps({"choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}]})


async def seed(rt: Any, policy: ReasoningPolicy, turns: int) -> None:
    """Serve the loop once, turn by turn, so the store holds what the gateway answered."""
    full, reasonings = conversation(turns)
    for t in range(turns):
        history = full[: 2 + 3 * t]
        ex = exchange(policy, copy.deepcopy(history))
        await prepare_reasoning(rt, ex)
        apply_whole([x for x in ex.transforms if isinstance(x, TurnRecorder)], answer(t, reasonings[t]))
        await writes_done()


async def timed(n: int, make: Any, run: Any) -> list[float]:
    out = []
    for _ in range(n):
        arg = make()
        start = time.perf_counter()
        await run(arg)
        out.append((time.perf_counter() - start) * 1e6)
    await writes_done()
    return out


async def main(args: argparse.Namespace) -> None:
    if args.redis:
        from gateway.config import StateConfig
        from gateway.state.build import build_states

        config = StateConfig.model_validate({"backend": "redis", "url": args.redis, "namespace": "bench-restore"})
        state = build_states(config, 900)
        kv: KeyValueState = state.kv
    else:
        kv = MemoryKeyValueState()
    policy = ReasoningPolicy()
    rt = runtime(kv)
    await seed(rt, policy, args.turns)
    dropped, reasonings = conversation(args.turns)
    echoed = copy.deepcopy(dropped)
    for msg, r in zip([m for m in echoed if m.get("tool_calls")], reasonings, strict=True):
        msg["reasoning_content"] = r
    rebuilt, _ = conversation(args.turns, system="another system prompt")
    first, _ = conversation(0)

    async def request(ex: Any) -> None:
        await prepare_reasoning(rt, ex)

    async def before(ex: Any) -> None:
        _ = b'"reasoning"' in ex.raw  # the pass path before restore existed: one substring search

    cases: dict[str, Any] = {
        "first-turn": lambda: exchange(policy, copy.deepcopy(first)),
        "echoing-client": lambda: exchange(policy, copy.deepcopy(echoed)),
        "dropping-client": lambda: exchange(policy, copy.deepcopy(dropped)),
        "rebuilt-system-prompt": lambda: exchange(policy, copy.deepcopy(rebuilt)),
    }

    async def record(ex: Any) -> None:
        apply_whole([x for x in ex.transforms if isinstance(x, TurnRecorder)], payload)

    payload = answer(args.turns, text(2048, 99))

    async def prepared() -> Any:
        ex = exchange(policy, copy.deepcopy(dropped))
        await prepare_reasoning(rt, ex)
        return ex

    where = "redis" if args.redis else "memory"
    print(f"{args.turns} tool rounds, {len(orjson.dumps(dropped)) // 1024} KB of messages, state: {where}")
    print(f"best of {args.rounds} rounds of {args.n} runs; µs")
    print(f"{'case':24} {'before p50':>10} {'now p50':>8} {'added p50':>9} {'now p90':>8}")

    async def best(make: Any, run: Any) -> tuple[float, float]:
        rounds = [statistics.quantiles(await timed(args.n, make, run), n=10) for _ in range(args.rounds)]
        return min(q[4] for q in rounds), min(q[8] for q in rounds)

    for name, make in cases.items():
        old, _ = await best(make, before)
        p50, p90 = await best(make, request)
        print(f"{name:24} {old:10.1f} {p50:8.1f} {p50 - old:9.1f} {p90:8.1f}")
    rounds = []
    for _ in range(args.rounds):
        recorded = []
        for _ in range(args.n):
            ex = await prepared()
            start = time.perf_counter()
            await record(ex)
            recorded.append((time.perf_counter() - start) * 1e6)
            await writes_done()
        rounds.append(statistics.quantiles(recorded, n=10))
    p50, p90 = min(q[4] for q in rounds), min(q[8] for q in rounds)
    print(f"{'answer-with-tool-calls':24} {0:10.1f} {p50:8.1f} {p50:9.1f} {p90:8.1f}")
    if args.redis:
        await state.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=10, help="tool rounds in the history (default 10)")
    parser.add_argument("--n", type=int, default=1000, help="runs per round (default 1000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per case; the best p50 is shown (default 5)")
    parser.add_argument("--redis", help="a Redis URL: the store on Redis instead of memory")
    asyncio.run(main(parser.parse_args()))
