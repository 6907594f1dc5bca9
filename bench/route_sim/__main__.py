"""``python -m bench.route_sim [--conversations N] [--seed S] [--policies a,b] [--without-turbo]``: print the table.

``python -m bench.route_sim --pool [--conversations N] [--turns 5-15]``: the key-pool scenario instead
(bench/route_sim/pool.py): one upstream, three keys with tier-1 limits and their own caches."""

from __future__ import annotations

import argparse
import sys
import time

from bench.route_sim.sim import BASELINES, POLICIES, UPSTREAMS, WITHOUT_TURBO, make_workload, report, run


def table(rows: list[dict[str, object]]) -> str:
    by = {r["policy"]: r for r in rows}
    lines = [
        "| policy | spend USD | vs round-robin | vs always-turbo | cache-hit share of input | TTFT SLO met "
        "| mean TTFT s | p95 TTFT s | p95 latency s | served (standard / turbo / vLLM) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    rr = float(by["round-robin"]["spend_usd"]) if "round-robin" in by else None  # type: ignore[arg-type]
    turbo = float(by["always-turbo"]["spend_usd"]) if "always-turbo" in by else None  # type: ignore[arg-type]
    for r in rows:
        spend = float(r["spend_usd"])  # type: ignore[arg-type]
        served = r["served"]
        counts = " / ".join(
            str(served.get(label, 0))  # type: ignore[union-attr]
            for label in ("moonshot/kimi-k2-thinking", "moonshot-turbo/kimi-k2-thinking-turbo", "vllm/kimi-k2-thinking")
        )
        vs_rr = f"{spend / rr:.0%}" if rr else ""
        vs_turbo = f"{spend / turbo:.0%}" if turbo else ""
        lines.append(
            f"| {r['policy']} | {spend:.2f} | {vs_rr} | {vs_turbo} | "
            f"{r['cache_hit_share']:.1%} | {r['slo_attainment']:.2%} of {r['slo_feasible_requests']} | "
            f"{r['mean_ttft_s']:.2f} | {r['p95_ttft_s']:.2f} | {r['p95_latency_s']:.1f} | {counts} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.route_sim", description=__doc__)
    parser.add_argument("--conversations", type=int, default=300)
    parser.add_argument("--window-s", type=float, default=2400.0, help="conversations start within this window")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--policies", default=None, help="comma-separated (default: every one that applies)")
    parser.add_argument(
        "--without-turbo",
        action="store_true",
        help="candidates are Moonshot standard and vLLM only: no upstream is fastest whatever the caches hold",
    )
    parser.add_argument("--pool", action="store_true", help="the key-pool scenario (three keys of one upstream)")
    parser.add_argument("--turns", default="5-15", help="--pool: turns per tool loop, MIN-MAX (default 5-15)")
    args = parser.parse_args(argv)
    if args.pool:
        return pool_main(args.conversations, args.seed, args.window_s, args.turns)
    upstreams = WITHOUT_TURBO if args.without_turbo else UPSTREAMS
    known = [p for p in POLICIES if p not in BASELINES or any(u.label == BASELINES[p] for u in upstreams)]
    policies = [p for p in (args.policies or ",".join(known)).split(",") if p]
    unknown = sorted(set(policies) - set(known))
    if unknown:
        parser.error(f"unknown policies {unknown}; known here: {', '.join(known)}")
    outcomes = {}
    started = time.perf_counter()
    for policy in policies:
        workload = make_workload(args.conversations, args.seed, args.window_s)
        outcomes[policy] = run(policy, workload, args.seed, upstreams)
    rows = report(outcomes)
    print(table(rows))
    print(
        f"\n{rows[0]['requests']} requests per policy, {args.conversations} conversations, seed {args.seed}, "
        f"{time.perf_counter() - started:.1f} s",
        file=sys.stderr,
    )
    return 0


def pool_main(conversations: int, seed: int, window_s: float, turns: str) -> int:
    from bench.route_sim.pool import SELECTIONS, make_loops, pool_table, run_pool

    low, _, high = turns.partition("-")
    started = time.perf_counter()
    loops = make_loops(conversations, seed, window_s, (int(low), int(high or low)))
    rows = [run_pool(selection, loops).row() for selection in SELECTIONS]
    print(pool_table(rows))
    print(
        f"\n{rows[0]['requests']} requests per selection, {conversations} tool loops of {turns} turns, seed {seed}, "
        f"{time.perf_counter() - started:.1f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
