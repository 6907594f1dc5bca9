"""The coding-agent CLIs the e2e tests drive, installed from the npm registry at pinned versions.

They are installed once per machine into a cache folder (``KIMI_GATEWAY_NPM_CACHE``, default
``~/.cache/kimi-gateway-test-clis``) the first time a test needs them; node and npm are on the
machine. A CLI that cannot be installed skips its test with the reason, which CI turns into a
failure (``KIMI_GATEWAY_REQUIRE_SERVICES=1``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

# the versions the tests and their captured-request fixtures were made with
CLAUDE_CODE = ("@anthropic-ai/claude-code", "2.1.328", "claude")
CODEX = ("@openai/codex", "0.169.0", "codex")

_LOCK = threading.Lock()


def _folder() -> Path:
    return Path(os.environ.get("KIMI_GATEWAY_NPM_CACHE", Path.home() / ".cache" / "kimi-gateway-test-clis"))


def npm_cli(package: tuple[str, str, str]) -> Path:
    """The path of the CLI's executable, installing ``name@version`` first when it is missing."""
    name, version, binary = package
    folder = _folder() / f"{binary}-{version}"
    exe = folder / "node_modules" / ".bin" / binary
    with _LOCK:
        if exe.exists():
            return exe
        npm = shutil.which("npm")
        if npm is None:
            _unavailable(f"npm is not on PATH: cannot install {name}@{version}")
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--silent", "--prefix", str(folder), f"{name}@{version}"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0 or not exe.exists():
            _unavailable(f"npm install {name}@{version} failed: {done.stderr.strip()[-2000:]}")
    return exe


def _unavailable(reason: str) -> None:
    if os.environ.get("KIMI_GATEWAY_REQUIRE_SERVICES") == "1":
        pytest.fail(reason)
    pytest.skip(reason)
