#!/usr/bin/env python3
"""What each wire format costs on one gateway: chat/completions against the Responses API (and the
Messages API), the same prompt, the same instant upstream.

Translation to and from chat/completions is the only difference between the endpoints, so they run
against one gateway process and one simulator, interleaved: every repetition measures every
endpoint at every connection count back to back, in an order that rotates between repetitions, so
the guest's drift hits all of them alike. Pinning as in ``overhead.py``: wrk and the simulator on
CPU 0, the gateway alone on CPU 1.

  .venv/bin/python bench/endpoints.py                      # 3 repetitions, 1 and 64 connections
  .venv/bin/python bench/endpoints.py --repeats 5 --duration 5 --conc 1,16,64

Prints a markdown table: median req/s [min-max] per endpoint and mode, the change against
chat/completions (median of the per-repetition ratios), and gateway CPU µs per request.
"""

# ruff: noqa: RUF001  (en dashes and minus signs in the markdown output are intended)
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead import (  # type: ignore[import-not-found]
    HERE,
    REPO,
    Gateway,
    Proc,
    clean_env,
    cpu_seconds,
    log,
    taskset,
    wait_ready,
    wrk,
)

BODIES = HERE / "bodies"
# endpoint label -> (path, non-stream body, stream body or None)
ENDPOINTS: dict[str, tuple[str, Path, Path | None]] = {
    "chat/completions": ("/v1/chat/completions", BODIES / "nonstream.json", BODIES / "stream.json"),
    "responses": (
        "/v1/responses",
        BODIES / "endpoints" / "responses-nonstream.json",
        BODIES / "endpoints" / "responses-stream.json",
    ),
    "responses store:true": ("/v1/responses", BODIES / "endpoints" / "responses-store-nonstream.json", None),
    "messages": (
        "/v1/messages",
        BODIES / "endpoints" / "messages-nonstream.json",
        BODIES / "endpoints" / "messages-stream.json",
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--python", default=str(REPO / ".venv" / "bin" / "python"))
    ap.add_argument("--duration", type=int, default=4, help="seconds per wrk cell (default 4)")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--conc", default="1,64")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--endpoints", default=",".join(ENDPOINTS))
    ap.add_argument("--client-cpu", type=int, default=0)
    ap.add_argument("--gateway-cpu", type=int, default=1)
    ap.add_argument("--sim-port", type=int, default=19301)
    ap.add_argument("--gateway-port", type=int, default=19304)
    args = ap.parse_args()
    args.bodies = BODIES
    concs = [int(c) for c in args.conc.split(",")]
    names = [e.strip() for e in args.endpoints.split(",") if e.strip()]
    unknown = set(names) - set(ENDPOINTS)
    if unknown:
        sys.exit(f"unknown endpoint(s) {sorted(unknown)}; known: {', '.join(ENDPOINTS)}")
    os.sched_setaffinity(0, {args.client_cpu})
    work = Path(tempfile.mkdtemp(prefix="kgw-endpoints-"))
    body = (BODIES / "nonstream.json").read_bytes()
    started: list[Proc] = []
    # (endpoint, mode, conc) -> per repetition: (req/s, gateway µs per request)
    cells: dict[tuple[str, str, int], list[tuple[float, float]]] = {}
    try:
        sim = Proc(
            "simulator",
            taskset(
                args.client_cpu,
                [args.python, "-m", "simulator", "--port", str(args.sim_port), "--profile", "instant"],
            ),
            work / "simulator.log",
            clean_env(PYTHONPATH=str(REPO)),
            work,
        )
        started.append(sim)
        if wait_ready(sim, args.sim_port, body, 60) is None:
            sys.exit(f"simulator did not start; see {work / 'simulator.log'}")
        gateway = Gateway("gateway", REPO, args.python)
        gw = gateway.spawn(args, work, args.gateway_port)
        started.append(gw)
        if wait_ready(gw, args.gateway_port, body, 60) is None:
            sys.exit(f"gateway did not start; see {work / 'gateway.log'}")
        for name in names:  # warm every code path once
            path, nonstream, stream = ENDPOINTS[name]
            for b in (nonstream, stream):
                if b is not None:
                    wrk(args, args.gateway_port, "warmup", 16, args.warmup, path=path, body=b)
        for rep in range(args.repeats):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            log(f"=== repetition {rep + 1}/{args.repeats}: {', '.join(order)}")
            for conc in concs:
                for name in order:
                    path, nonstream, stream = ENDPOINTS[name]
                    for mode, b in (("nonstream", nonstream), ("stream", stream)):
                        if b is None:
                            continue
                        before = cpu_seconds(gw.pids())
                        r = wrk(args, args.gateway_port, mode, conc, args.duration, path=path, body=b)
                        used = cpu_seconds(gw.pids()) - before
                        if r is None or r["errors"] or not r["requests"]:
                            sys.exit(f"{name} {mode} c={conc}: wrk failed or saw errors: {r}")
                        cells.setdefault((name, mode, conc), []).append((r["rps"], used / r["requests"] * 1e6))
                        log(f"{name} {mode} c={conc}: {r['rps']:,.0f} req/s")
    finally:
        for p in reversed(started):
            p.stop()
    print(table(cells, names, concs, args))


def table(
    cells: dict[tuple[str, str, int], list[tuple[float, float]]],
    names: list[str],
    concs: list[int],
    args: argparse.Namespace,
) -> str:
    lines = [
        f"{time.strftime('%Y-%m-%d %H:%M')}, {args.repeats} repetitions x {args.duration} s per cell, "
        "instant simulator; vs chat = median over repetitions of endpoint / chat - 1",
        "",
        "| endpoint | mode | conns | req/s median [min–max] | vs chat | gateway µs/req |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for mode in ("nonstream", "stream"):
        for conc in concs:
            base = cells.get(("chat/completions", mode, conc))
            for name in names:
                runs = cells.get((name, mode, conc))
                if not runs:
                    continue
                rps = [r for r, _ in runs]
                us = statistics.median(u for _, u in runs)
                versus = "–"
                if base and name != "chat/completions":
                    ratios = [r / b - 1 for (r, _), (b, _) in zip(runs, base, strict=False)]
                    versus = f"{statistics.median(ratios) * 100:+.1f} %"
                lines.append(
                    f"| {name} | {mode} | {conc} | {statistics.median(rps):,.0f} [{min(rps):,.0f}–{max(rps):,.0f}] "
                    f"| {versus} | {us:,.0f} |"
                )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
