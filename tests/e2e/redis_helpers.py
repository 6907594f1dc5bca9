"""Redis for end-to-end tests: the shared server (a unique namespace per test) or a private
``redis-server`` process on a free port that a test may stop and restart."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

from tests.conftest import free_port, require_service

REDIS_URL = os.environ.get("KIMI_GATEWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def shared_redis() -> tuple[str, str]:
    """(url, fresh namespace) on the shared Redis, or a loud skip."""
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_timeout=2, socket_connect_timeout=2).ping()
    except (redis.RedisError, OSError) as exc:
        require_service("Redis", f"cannot connect to {REDIS_URL} ({exc!r}); set KIMI_GATEWAY_TEST_REDIS_URL")
    return REDIS_URL, f"kgtest-{uuid.uuid4().hex[:12]}"


def state_yaml(url: str, namespace: str, fail: str = "closed", timeout_s: float = 0.25) -> str:
    return (
        f"state: {{backend: redis, url: '{url}', namespace: {namespace}, connect_timeout_s: {timeout_s}, "
        f"timeout_s: {timeout_s}, fail: {{budgets: {fail}, rate_limits: {fail}}}}}\n"
    )


def drop_namespace(url: str, namespace: str) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=2)
    keys = list(client.scan_iter(match=namespace + ":*"))
    if keys:
        client.delete(*keys)
    client.close()


class RedisServer:
    """A redis-server of this test's own on a fixed port across restarts; with ``persist`` it keeps its
    data in an append-only file (fsync on every write) as the compose file's Redis does."""

    def __init__(self, folder: Path, persist: bool = False) -> None:
        if shutil.which("redis-server") is None:
            require_service("redis-server", "the redis-server binary is not on PATH")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.folder = folder
        self.proc: subprocess.Popen[bytes] | None = None
        self.persistence = ["--appendonly", "yes", "--appendfsync", "always"] if persist else ["--appendonly", "no"]

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *self.persistence],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.folder,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                redis.Redis(port=self.port, socket_timeout=0.5).ping()
                return
            except (redis.RedisError, OSError):
                time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
