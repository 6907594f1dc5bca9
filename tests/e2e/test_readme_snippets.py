"""The README's SDK examples, run as written against the demo configuration (its simulated upstreams
made instant, its ledger in a temporary folder): a user who copies them gets an answer, not an error."""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, Process, start_gateway

SNIPPETS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.DOTALL)


def instant_demo_config(folder: Path) -> Path:
    """config/demo.yaml with absolute paths, a ledger of its own and upstreams that answer at once."""
    data = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text(encoding="utf-8"))
    data["policies_dir"] = str(ROOT / "policies")
    data["prices"] = str(ROOT / "config" / data["prices"])
    data["ledger"] = {"url": f"sqlite:///{folder / 'demo-ledger.db'}"}
    for upstream in data["upstreams"].values():
        upstream.update(ttft_ms=0, tokens_per_s=0)
    path = folder / "demo.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    proc = start_gateway(instant_demo_config(tmp_path_factory.mktemp("readme")))
    yield proc
    proc.stop()


def test_the_readme_has_sdk_snippets() -> None:
    joined = "\n".join(SNIPPETS)
    assert "from openai import OpenAI" in joined and "from anthropic import Anthropic" in joined
    assert all("http://localhost:4000" in snippet for snippet in SNIPPETS)


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_readme_snippet_runs_against_the_demo_gateway(demo: Process, snippet: str) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(snippet.replace("http://localhost:4000", demo.url), {"__name__": "readme"})
    assert len(out.getvalue().strip()) > 20, out.getvalue()
