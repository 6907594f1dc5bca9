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


def test_the_pool_scenario_keeps_loops_on_their_key_within_every_quota() -> None:
    """Three keys with tier-1 limits and their own caches: cache-aware stickiness caches at least 20 %
    more than key round-robin at the same SLO, sends nothing over a key's quota, and never refuses a
    client while a key had room."""
    from bench.route_sim.pool import SELECTIONS, make_loops, pool_table, run_pool

    loops = make_loops(40, seed=3, window_s=120, turns=(5, 15))
    rows = {s: run_pool(s, loops).row() for s in SELECTIONS}
    rr, sticky = rows["round_robin"], rows["cache_aware"]
    assert rr["requests"] == sticky["requests"] == rows["least_loaded"]["requests"] > 0
    assert sticky["cached_tokens"] >= 1.2 * rr["cached_tokens"]
    assert sticky["spend_usd"] < rr["spend_usd"]
    assert sticky["slo_attainment"] >= rr["slo_attainment"] - 0.01
    for row in rows.values():
        assert row["over_quota"] == 0 and row["client_429_with_room"] == 0
        assert sum(row["served"].values()) == row["requests"]
    assert pool_table(list(rows.values())).count("\n") == 4
