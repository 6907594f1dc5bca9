"""A timed-out upstream call names the limit that fired: several run at once while an answer starts
(connect, the silence between reads, a stream's first byte, the total), and the operator must know
which setting to change."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import Process, hashed, start_gateway, start_simulator, write_gateway

KEY = "sk-timeout-messages"
LIMITS = {
    # name: (timeouts, stream, the setting the error must name)
    "idle": ("{connect_s: 1, first_byte_s: 5, idle_s: 0.5, total_s: 10}", True, "timeouts.idle_s"),
    "first": ("{connect_s: 1, first_byte_s: 0.5, idle_s: 5, total_s: 10}", True, "timeouts.first_byte_s"),
    "total": ("{connect_s: 1, first_byte_s: 0.5, idle_s: 5, total_s: 0.5}", False, "timeouts.total_s"),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Process, Process]]:
    folder = tmp_path_factory.mktemp("timeouts")
    sim = start_simulator(folder, "instant")
    upstreams = "".join(
        f"  {name}:\n    kind: openai\n    base_url: {sim.url}/v1\n    models: [kimi-k2-thinking]\n"
        f"    timeouts: {timeouts}\n"
        for name, (timeouts, _, _) in LIMITS.items()
    )
    models = "".join(f"  {name}: {{candidates: [{name}/kimi-k2-thinking]}}\n" for name in LIMITS)
    config = write_gateway(folder, upstreams, f'tenant: timeouts\nkeys: ["{hashed(KEY)}"]\nmodels:\n{models}')
    gateway = start_gateway(config)
    yield gateway, sim
    gateway.stop()
    sim.stop()


@pytest.mark.parametrize("limit", sorted(LIMITS))
def test_the_error_names_the_limit_that_fired(setup: tuple[Process, Process], limit: str) -> None:
    gateway, sim = setup
    _, stream, setting = LIMITS[limit]
    httpx.post(sim.url + "/_sim/faults", json={"stall_s": 2}).raise_for_status()
    body = {"model": limit, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    resp = httpx.post(
        gateway.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30
    )
    assert resp.status_code == 504, resp.text
    message = resp.json()["error"]["message"]
    assert setting in message and "0.5 s" in message, message
    for other in {s for _, _, s in LIMITS.values()} - {setting}:
        assert other not in message
