"""Shared fixtures: real processes on loopback ports.

The gateway runs as ``kimi-gateway serve`` (uvicorn, uvloop, httptools) and the upstream as the
simulator's own HTTP server, each in its own process, so the end-to-end tests see exactly what a
user's app would. Servers a test needs but this machine lacks (Redis, PostgreSQL) are skipped with
a loud message, unless ``KIMI_GATEWAY_REQUIRE_SERVICES=1`` (set by CI) turns that into a failure.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

if TYPE_CHECKING:
    from anthropic import Anthropic
    from openai import OpenAI

ROOT = Path(__file__).resolve().parent.parent
DEMO_KEY = "sk-demo-kimi-gateway"
PYTHON = sys.executable
SDK_OPTIONS: dict[str, Any] = {"max_retries": 0, "timeout": 30.0}


def hashed(key: str) -> str:
    """A key as policy files store it: ``sha256:`` and the hex digest, never the key itself."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_service(name: str, reason: str) -> None:
    """Skip loudly, or fail when CI demands every service."""
    message = f"*** {name} is not available: {reason}. Tests that need it are SKIPPED. ***"
    if os.environ.get("KIMI_GATEWAY_REQUIRE_SERVICES") == "1":
        pytest.fail(message + " (KIMI_GATEWAY_REQUIRE_SERVICES=1 makes this a failure)")
    print("\n" + message, file=sys.stderr)
    pytest.skip(message)


class Process:
    """A child process serving HTTP on a loopback port; its output goes to a log file."""

    def __init__(self, args: list[str], port: int, log: Path, ready_path: str, env: dict[str, str] | None = None):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self._out = log.open("wb")
        merged = {**os.environ, **(env or {})}
        merged.pop("http_proxy", None)
        merged.pop("HTTP_PROXY", None)
        self.proc = subprocess.Popen(args, stdout=self._out, stderr=subprocess.STDOUT, env=merged, cwd=ROOT)
        self._wait_ready(ready_path)

    def _wait_ready(self, path: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"process exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + path, timeout=0.5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"not ready after {timeout} s:\n{self.output()}")

    def openai(self, key: str, **options: Any) -> OpenAI:
        """The official OpenAI SDK pointed at this server as an app would point it (``base_url`` and a
        key), without retries so every error a test provokes reaches the test, and with a timeout so
        a hung request fails the test instead of stalling the suite."""
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=key, **{**SDK_OPTIONS, **options})

    def anthropic(self, key: str, **options: Any) -> Anthropic:
        """The official Anthropic SDK pointed at this server (it appends ``/v1/messages`` itself)."""
        from anthropic import Anthropic

        return Anthropic(base_url=self.url, api_key=key, **{**SDK_OPTIONS, **options})

    def metric(self, name: str, **labels: str) -> float:
        """One sample of this server's ``GET /metrics`` (0 when absent), matched on all its labels."""
        text = httpx.get(self.url + "/metrics", timeout=5).text
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            if line.startswith(name + "{"):
                got = ",".join(sorted(line[len(name) + 1 : line.index("}")].split(",")))
                if got == want:
                    return float(line.rsplit(" ", 1)[1])
        return 0.0

    def output(self) -> str:
        self._out.flush()
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()


def start_simulator(tmp: Path, profile: str = "instant", *extra: str) -> Process:
    port = free_port()
    args = [PYTHON, "-m", "simulator", "--port", str(port), "--profile", profile, *extra]
    return Process(args, port, tmp / f"simulator-{port}.log", "/health")


def start_gateway(config: Path, env: dict[str, str] | None = None) -> Process:
    port = free_port()
    args = [PYTHON, "-m", "gateway.cli", "serve", "--config", str(config), "--port", str(port)]
    return Process(args, port, config.parent / f"gateway-{port}.log", "/readyz", env=env)


# Moonshot's kimi-k2-thinking list prices, USD per 1M tokens: the default for test candidates
K2_PRICES = {"input_miss": "0.60", "input_hit": "0.15", "output": "2.50"}


def write_prices(path: Path, targets: dict[str, dict[str, str]]) -> None:
    import yaml

    entries = [{"target": t, "effective_from": "2025-01-01", **p} for t, p in sorted(targets.items())]
    path.write_text(yaml.safe_dump({"currency": "USD", "prices": entries}))


def write_gateway(
    folder: Path,
    upstreams_yaml: str,
    policy_yaml: str,
    extra_yaml: str = "",
    name: str = "gateway",
    prices: dict[str, dict[str, str]] | None = None,
) -> Path:
    """A config file, one policy file and a prices file in ``folder``; returns the config path.

    Every candidate of the policy gets Moonshot's kimi-k2-thinking prices unless ``prices`` says
    otherwise; the ledger is a SQLite file in ``folder``.
    """
    import yaml

    policies = folder / f"{name}-policies"
    policies.mkdir(parents=True, exist_ok=True)
    (policies / "tenant.yaml").write_text(policy_yaml)
    targets = {c: dict(K2_PRICES) for vm in yaml.safe_load(policy_yaml)["models"].values() for c in vm["candidates"]}
    targets.update(prices or {})
    write_prices(folder / f"{name}-prices.yaml", targets)
    config = folder / f"{name}.yaml"
    config.write_text(
        f"policies_dir: {policies.name}\nprices: {name}-prices.yaml\n"
        f'ledger: {{url: "sqlite:///{name}-ledger.db"}}\n{extra_yaml}\nupstreams:\n{upstreams_yaml}'
    )
    return config


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("servers")


@pytest.fixture(scope="session")
def simulator(session_tmp: Path) -> Iterator[Process]:
    """One instant simulator process for the session; tests reset it before use."""
    proc = start_simulator(session_tmp, "instant")
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def raw_vllm(session_tmp: Path) -> Iterator[Process]:
    """One instant vLLM simulator started without parsers (raw K2 tool-call markers and ``</think>``
    inside content) for the session; tests that read its request log reset it first or read the last."""
    proc = start_simulator(session_tmp, "vllm-raw", "--ttft-ms", "0", "--tokens-per-s", "0")
    yield proc
    proc.stop()


@pytest.fixture()
def sim(simulator: Process) -> Process:
    httpx.post(simulator.url + "/_sim/reset", timeout=5)
    return simulator


@contextlib.contextmanager
def running(proc: Process) -> Iterator[Process]:
    try:
        yield proc
    finally:
        proc.stop()
