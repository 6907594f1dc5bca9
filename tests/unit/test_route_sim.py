"""The routing benchmark runs the real router on a tiny workload and reports every column."""

from __future__ import annotations

from bench.route_sim.__main__ import table
from bench.route_sim.sim import POLICIES, make_workload, report, run


def test_tiny_workload_reports_each_policy() -> None:
    outcomes = {
        p: run(p, make_workload(3, seed=1, window_s=30), seed=1) for p in ("balanced", "round-robin", "always-turbo")
    }
    rows = report(outcomes)
    assert [r["policy"] for r in rows] == ["balanced", "round-robin", "always-turbo"]
    for row in rows:
        assert row["requests"] == sum(row["served"].values()) > 0
        assert row["spend_usd"] > 0
        assert 0 <= row["cache_hit_share"] <= 1 and 0 <= row["slo_attainment"] <= 1
        assert row["p95_latency_s"] >= row["p95_ttft_s"] > 0
    assert set(rows[2]["served"]) == {"moonshot-turbo/kimi-k2-thinking-turbo"}
    text = table(rows)
    assert text.count("\n") == 4 and "| balanced |" in text
    assert "latency-no-cache" in POLICIES
