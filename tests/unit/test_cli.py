"""The command line: config check, key hashing, and refusing unsafe serve options."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, write_gateway

CLI = [sys.executable, "-m", "gateway.cli"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


def config(tmp_path: Path, budget: str = "") -> Path:
    upstreams = "  sim: {kind: simulated, profile: instant, models: [kimi-k2-thinking]}\n"
    policy = (
        f'tenant: t\nkeys: ["sha256:{"a" * 64}"]\nmodels:\n  kimi-k2-thinking: {{candidates: [sim/kimi-k2-thinking]}}\n'
        + budget
    )
    return write_gateway(tmp_path, upstreams, policy)


def test_config_check_ok_and_demo_config_is_valid(tmp_path: Path) -> None:
    out = run("config", "check", str(config(tmp_path)))
    assert out.returncode == 0 and "ok" in out.stdout
    demo = run("config", "check", "config/demo.yaml")
    assert demo.returncode == 0, demo.stderr


def test_config_check_lists_problems_and_exits_2(tmp_path: Path) -> None:
    path = config(tmp_path)
    path.write_text(path.read_text().replace("profile: instant", "profile: warp"))
    out = run("config", "check", str(path))
    assert out.returncode == 2 and "upstreams.sim.profile" in out.stderr and "warp" in out.stderr


def test_a_candidate_without_price_refuses_the_start(tmp_path: Path) -> None:
    path = config(tmp_path)
    (tmp_path / "gateway-prices.yaml").write_text("prices: []\n")
    out = run("serve", "--config", str(path), "--port", "9")
    assert out.returncode == 2 and "sim/kimi-k2-thinking has no price" in out.stderr


def test_keys_hash_matches_sha256() -> None:
    out = run("keys", "hash", "sk-example")
    assert out.stdout.strip() == "sha256:" + hashlib.sha256(b"sk-example").hexdigest()


def test_workers_with_in_memory_budgets_are_refused(tmp_path: Path) -> None:
    out = run("serve", "--config", str(config(tmp_path, "budget: {daily_usd: 5}\n")), "--workers", "2", "--port", "9")
    assert out.returncode == 2 and "2x the limits" in out.stderr and "state.backend: redis" in out.stderr


def test_workers_with_in_memory_state_are_refused_even_without_limits(tmp_path: Path) -> None:
    """The reasoning store and cache affinity would be split across workers too: no budget needed."""
    out = run("serve", "--config", str(config(tmp_path)), "--workers", "3", "--port", "9")
    assert out.returncode == 2 and "--workers 3" in out.stderr and "state.backend: redis" in out.stderr
    assert "stored reasoning" in out.stderr and "x the limits" not in out.stderr
    path = config(tmp_path)
    path.write_text("workers: 2\n" + path.read_text())  # from the config file, the same refusal
    out = run("serve", "--config", str(path), "--port", "9")
    assert out.returncode == 2 and "--workers 2" in out.stderr


def test_simulate_serves_the_simulator_over_http(tmp_path: Path) -> None:
    import httpx

    from tests.conftest import Process, free_port

    port = free_port()
    proc = Process(
        [*CLI, "simulate", "--port", str(port), "--profile", "vllm", "--ttft-ms", "0"],
        port,
        tmp_path / "sim.log",
        "/health",
    )
    try:
        reply = httpx.post(
            proc.url + "/v1/chat/completions",
            json={
                "model": "moonshotai/Kimi-K2-Thinking",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 64,
            },
            timeout=10,
        ).json()
        assert "reasoning" in reply["choices"][0]["message"]  # vLLM's field name
        assert "prompt_tokens_details" in reply["usage"] or "cached_tokens" not in reply["usage"]
    finally:
        proc.stop()
    bad = run("simulate", "--profile", "warp")
    assert bad.returncode == 2 and "warp" in bad.stderr


def test_multiprocess_metrics_folder_is_emptied_before_workers_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counts a previous run left behind must not come back in /metrics."""
    from gateway.cli import prepare_multiprocess_metrics

    folder = tmp_path / "metrics"
    folder.mkdir()
    (folder / "counter_4242.db").write_bytes(b"stale")
    (folder / "notes.txt").write_text("not ours")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(folder))
    prepare_multiprocess_metrics()
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    prepare_multiprocess_metrics()  # none given: a fresh folder of its own
    made = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    assert made.is_dir() and made != folder and not any(made.iterdir())
