#!/usr/bin/env python3
"""Throughput of ``kimi-gateway serve --workers N`` on this machine, and who used the cores.

With one worker the gateway is one process on one core; ``--workers 2`` (Redis state, the only
state several workers may share) is how it uses both cores of a 2-core machine. Nothing is pinned
here, unlike overhead.py: the workers, the load generator (wrk, one thread) and the upstream
simulator (``python -m simulator --profile instant``, one process) share the two cores as they would
on a small host, and every cell states what each of them used, in % of one core: the load
generator's and the upstream's share is CPU the gateway did not get.

Per repetition and worker count (the order rotates between repetitions): a fresh gateway with
``--workers N`` and Redis state, a warm-up, then wrk at ``--conc`` connections for the non-stream and
the stream body (``bodies/``), ``--duration`` seconds each. Cells are median [min-max] req/s.

  PYTHONPATH=. .venv/bin/python bench/workers.py                      # 1 and 2 workers, 3 repetitions
  PYTHONPATH=. .venv/bin/python bench/workers.py --workers 1,2 --reps 5 --duration 5 --conc 64

Needs ``wrk`` and a Redis (``--redis-url``, default redis://127.0.0.1:6379/0; keys under a namespace
of their own that expire by themselves).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from overhead import (  # type: ignore[import-not-found]  # noqa: E402
    Proc,
    cell,
    children_cpu,
    clean_env,
    cpu_busy,
    cpu_seconds,
    log,
    port_in_use,
    wait_ready,
    write_config,
    wrk,
)


def load(args: argparse.Namespace, gw: Proc, sim: Proc, mode: str) -> dict | None:
    """One wrk cell, with the CPU each party used over it (% of one core)."""
    g0, u0, c0, b0, t0 = cpu_seconds(gw.pids()), cpu_seconds(sim.pids()), children_cpu(), cpu_busy(), time.monotonic()
    res = wrk(args, args.gateway_port, mode, args.conc, args.duration)
    wall = time.monotonic() - t0
    g1, u1, c1, b1 = cpu_seconds(gw.pids()), cpu_seconds(sim.pids()), children_cpu(), cpu_busy()
    if res is None:
        return None
    ours = (g1 - g0) + (u1 - u0) + (c1 - c0)
    busy = sum(b1[c] - b0.get(c, 0) for c in b1)
    res |= {
        "gateway_cpu_pct": 100 * (g1 - g0) / wall,
        "upstream_cpu_pct": 100 * (u1 - u0) / wall,
        "wrk_cpu_pct": 100 * (c1 - c0) / wall,  # wrk has exited: its CPU is in our children's rusage
        "other_cpu_pct": max(0.0, 100 * (busy - ours) / wall),
        "gateway_cpu_us_per_req": 1e6 * (g1 - g0) / res["requests"] if res["requests"] else None,
    }
    return res


def run_gateway(args: argparse.Namespace, work: Path, n: int, rep: int) -> dict:
    d = work / f"w{n}-r{rep}"
    d.mkdir()
    state = f"state: {{backend: redis, url: '{args.redis_url}', namespace: bench-workers-{os.getpid()}-{rep}-{n}}}\n"
    config = write_config(d, args.gateway_port, args.sim_port, True, state)
    exe = Path(args.python).parent / "kimi-gateway"
    cmd = [str(exe)] if exe.exists() else [args.python, "-m", "gateway.cli"]
    argv = [*cmd, "serve", "--config", str(config), "--port", str(args.gateway_port), "--workers", str(n)]
    env = clean_env(PYTHONPATH=str(REPO))
    gw = Proc(f"gateway-{n}", argv, d / "gateway.log", env, d)
    body = (args.bodies / "nonstream.json").read_bytes()
    try:
        if wait_ready(gw, args.gateway_port, body, 60) is None:
            raise SystemExit(f"gateway --workers {n} did not start; see {d / 'gateway.log'}")
        for mode in ("nonstream", "stream"):
            wrk(args, args.gateway_port, mode, args.conc, args.warmup)
        out = {mode: load(args, gw, sim_proc, mode) for mode in ("nonstream", "stream")}
        procs = len(gw.pids())
    finally:
        gw.stop()
    log(
        f"workers {n}: {out['nonstream'] and round(out['nonstream']['rps'])} req/s, "
        f"{out['stream'] and round(out['stream']['rps'])} streams/s ({procs} processes)"
    )
    return out


def table(results: dict[int, list[dict]]) -> str:
    rows = [
        "| workers | mode | req/s | gateway CPU % | wrk CPU % | upstream CPU % | other CPU % | gateway CPU µs/req |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n, reps in results.items():
        for mode in ("nonstream", "stream"):
            cells = [r[mode] for r in reps if r.get(mode)]

            def col(key: str, digits: int = 0, cells: list[dict] = cells) -> str:
                return cell([c[key] for c in cells], digits)

            rows.append(
                f"| {n} | {mode} | {col('rps')} | {col('gateway_cpu_pct')} | {col('wrk_cpu_pct')} | "
                f"{col('upstream_cpu_pct')} | {col('other_cpu_pct')} | {col('gateway_cpu_us_per_req')} |"
            )
    return "\n".join(rows)


sim_proc: Proc


def main() -> None:
    global sim_proc
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    venv_py = REPO / ".venv" / "bin" / "python"
    ap.add_argument("--python", default=str(venv_py) if venv_py.exists() else sys.executable)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--conc", type=int, default=64)
    ap.add_argument("--sim-port", type=int, default=19301)
    ap.add_argument("--gateway-port", type=int, default=19304)
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--bodies", type=Path, default=HERE / "bodies")
    args = ap.parse_args()
    args.client_cpu = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))  # wrk: unpinned
    counts = [int(n) for n in args.workers.split(",")]
    busy = [p for p in (args.sim_port, args.gateway_port) if port_in_use(p)]
    if busy:
        sys.exit(f"port(s) in use: {busy}")
    work = Path(tempfile.mkdtemp(prefix="kgw-workers-"))
    log(f"work dir {work}; {os.cpu_count()} CPUs")
    sim_argv = [args.python, "-m", "simulator", "--port", str(args.sim_port), "--profile", "instant"]
    sim_proc = Proc("simulator", sim_argv, work / "simulator.log", clean_env(PYTHONPATH=str(REPO)), work)
    results: dict[int, list[dict]] = {n: [] for n in counts}
    try:
        if wait_ready(sim_proc, args.sim_port, (args.bodies / "nonstream.json").read_bytes(), 60) is None:
            raise SystemExit("simulator did not start")
        for rep in range(args.reps):
            order = counts[rep % len(counts) :] + counts[: rep % len(counts)]
            for n in order:
                results[n].append(run_gateway(args, work, n, rep))
    finally:
        sim_proc.stop()
    print(f"{args.reps} repetitions, {args.duration} s per cell, {args.conc} connections, {os.cpu_count()} CPUs; "
          "CPU % of one core (200 % = both cores)")  # fmt: skip
    print(table(results))


if __name__ == "__main__":
    main()
