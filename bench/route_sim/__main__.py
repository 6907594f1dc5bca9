"""``python -m bench.route_sim [--conversations N] [--seed S] [--policies a,b]``: print the table."""

from __future__ import annotations

import argparse
import sys
import time

from bench.route_sim.sim import POLICIES, make_workload, report, run


def table(rows: list[dict[str, object]]) -> str:
    by = {r["policy"]: r for r in rows}
    lines = [
        "| policy | spend USD | vs round-robin | vs always-turbo | cache-hit share of input | TTFT SLO met "
        "| p95 TTFT s | p95 latency s | served (standard / turbo / vLLM) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    rr = by.get("round-robin", {}).get("spend_usd")
    turbo = by.get("always-turbo", {}).get("spend_usd")
    for r in rows:
        spend = float(r["spend_usd"])  # type: ignore[arg-type]
        served = r["served"]
        counts = " / ".join(
            str(served.get(label, 0))  # type: ignore[union-attr]
            for label in ("moonshot/kimi-k2-thinking", "moonshot-turbo/kimi-k2-thinking-turbo", "vllm/kimi-k2-thinking")
        )
        lines.append(
            f"| {r['policy']} | {spend:.2f} | {spend / rr:.0%} | {spend / turbo:.0%} | "  # type: ignore[operator]
            f"{r['cache_hit_share']:.1%} | {r['slo_attainment']:.2%} of {r['slo_feasible_requests']} | "
            f"{r['p95_ttft_s']:.2f} | {r['p95_latency_s']:.1f} | {counts} |"
            if rr and turbo
            else f"| {r['policy']} | {spend:.2f} | | | {r['cache_hit_share']:.1%} | {r['slo_attainment']:.2%} | "
            f"{r['p95_ttft_s']:.2f} | {r['p95_latency_s']:.1f} | {counts} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.route_sim", description=__doc__)
    parser.add_argument("--conversations", type=int, default=300)
    parser.add_argument("--window-s", type=float, default=2400.0, help="conversations start within this window")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--policies", default=",".join(POLICIES))
    args = parser.parse_args(argv)
    policies = [p for p in args.policies.split(",") if p]
    unknown = sorted(set(policies) - set(POLICIES))
    if unknown:
        parser.error(f"unknown policies {unknown}; known: {', '.join(POLICIES)}")
    outcomes = {}
    started = time.perf_counter()
    for policy in policies:
        outcomes[policy] = run(policy, make_workload(args.conversations, args.seed, args.window_s), args.seed)
    rows = report(outcomes)
    print(table(rows))
    print(
        f"\n{rows[0]['requests']} requests per policy, {args.conversations} conversations, seed {args.seed}, "
        f"{time.perf_counter() - started:.1f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
