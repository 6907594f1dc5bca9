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
        assert row["p95_latency_s"] >= row["p95_ttft_s"] > 0 and row["mean_ttft_s"] > 0
    assert set(rows[2]["served"]) == {"moonshot-turbo/kimi-k2-thinking-turbo"}
    text = table(rows)
    assert text.count("\n") == 4 and "| balanced |" in text
    assert "latency-no-cache" in POLICIES and "balanced-no-cache" in POLICIES


def test_without_turbo_cache_awareness_changes_the_latency_strategy() -> None:
    """With no upstream fastest whatever the caches hold, a latency route that knows where the prefix
    is cached keeps a conversation there; the cache-blind baseline moves it and pays the prefill."""
    from bench.route_sim.sim import WITHOUT_TURBO

    # enough conversations at once that vLLM queues and some turns move to standard
    aware = run("latency", make_workload(60, seed=3, window_s=120), seed=3, upstreams=WITHOUT_TURBO)
    blind = run("latency-no-cache", make_workload(60, seed=3, window_s=120), seed=3, upstreams=WITHOUT_TURBO)
    assert aware.requests == blind.requests > 0
    assert "moonshot-turbo/kimi-k2-thinking-turbo" not in aware.served | blind.served
    assert aware.cached / aware.prompt > blind.cached / blind.prompt
    assert sum(aware.ttfts) < sum(blind.ttfts)


def test_a_baseline_needs_its_upstream() -> None:
    import pytest

    from bench.route_sim.sim import WITHOUT_TURBO

    with pytest.raises(ValueError, match="always-turbo needs"):
        run("always-turbo", make_workload(1, seed=1, window_s=10), seed=1, upstreams=WITHOUT_TURBO)
