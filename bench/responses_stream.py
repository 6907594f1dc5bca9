#!/usr/bin/env python3
"""What translating one chat/completions stream into Responses API events costs, in process: the
general path (every chunk parsed) against the byte test for delta-only chunks, on the same answer.

    .venv/bin/python bench/responses_stream.py            # 40 chunks, the simulator's shape
    .venv/bin/python bench/responses_stream.py --deltas 400

The answer is shaped like the simulator's (and Moonshot's) stream: a role chunk, reasoning deltas,
content deltas, the finish chunk with usage inside the choice, the usage chunk, ``[DONE]``; one
chunk per feed, as the pipeline hands them over when the upstream is fast. Prints µs per stream,
the best of ``--rounds`` rounds (other processes only ever add time), both paths interleaved.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.translate.responses_stream import ResponsesStream
from gateway.translate.responses_types import ResponseContext

HEAD = {"id": "chatcmpl-sim0000000001", "object": "chat.completion.chunk", "created": 1796406232}


def chunk(delta: dict[str, object], finish: str | None = None, **inside: object) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish, **inside}
    return b"data: " + orjson.dumps({**HEAD, "model": "kimi-k2-thinking", "choices": [choice]}) + b"\n\n"


def answer(deltas: int) -> list[bytes]:
    usage = {"prompt_tokens": 34, "completion_tokens": 169, "total_tokens": 203, "cached_tokens": 0}
    half = deltas // 2
    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"reasoning_content": f"thinking step {i}. "}) for i in range(half)]
    events += [chunk({"content": f"answer words {i} "}) for i in range(deltas - half)]
    events.append(chunk({}, "stop", usage=usage))
    events.append(b"data: " + orjson.dumps({**HEAD, "choices": [], "usage": usage}) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


def translate(events: list[bytes]) -> int:
    stream = ResponsesStream(ResponseContext("resp_bench", "kimi-k2-thinking", 1))
    return sum(len(stream.feed(e)) for e in events) + len(stream.close())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--deltas", type=int, default=36, help="text + reasoning delta chunks (default 36: 40 in all)")
    ap.add_argument("--n", type=int, default=2000, help="streams per round")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    events = answer(args.deltas)
    fast = ResponsesStream._delta_only

    def general(self: ResponsesStream, event: bytes, out: list[bytes]) -> bool:
        return False

    best = {"general path": float("inf"), "delta-only byte test": float("inf")}
    for _ in range(args.rounds):
        for name, method in (("general path", general), ("delta-only byte test", fast)):
            ResponsesStream._delta_only = method  # type: ignore[method-assign]
            start = time.perf_counter()
            for _ in range(args.n):
                translate(events)
            best[name] = min(best[name], (time.perf_counter() - start) / args.n * 1e6)
    ResponsesStream._delta_only = fast  # type: ignore[method-assign]
    print(f"{len(events)} chunks per stream, best of {args.rounds} rounds of {args.n} streams\n")
    print("| path | µs per stream | µs per chunk |\n|---|---:|---:|")
    for name, us in best.items():
        print(f"| {name} | {us:.1f} | {us / len(events):.2f} |")


if __name__ == "__main__":
    main()
