"""The simulator's ``/metrics``: Prometheus text, with vLLM's own metric names for the vllm dialect.

Split from the app (`server.py`) because it is a contract of its own: the gateway's load-aware
routing scrapes these names (``vllm:num_requests_waiting`` and friends) from a real vLLM, and the
simulator has to be scrapable the same way.

The text is prometheus-client's exposition, as vLLM's is: each app has its own registry holding one
collector that reads `SimStats` at scrape time (the counters already live there, so nothing is
counted twice, and the process-wide registry of a gateway running simulated upstreams in-process
never sees them).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from .engine import Simulator

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4.encode()  # the text format generate_latest writes

# name (counters without their _total suffix), type, help, the SimStats field (or a gauge derived below)
_VLLM: tuple[tuple[str, str, str, str], ...] = (
    ("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.", "in_flight"),
    ("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.", "waiting"),
    ("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", "kv_usage"),
    (
        "vllm:prefix_cache_queries",
        "counter",
        "Prefix cache queries, in terms of number of queried tokens.",
        "prompt_tokens",
    ),
    ("vllm:prefix_cache_hits", "counter", "Prefix cache hits, in terms of number of cached tokens.", "cached_tokens"),
    ("vllm:prompt_tokens", "counter", "Number of prefill tokens processed.", "prompt_tokens"),
    ("vllm:generation_tokens", "counter", "Number of generation tokens processed.", "completion_tokens"),
)
_SIMULATOR: tuple[tuple[str, str, str, str], ...] = (
    ("simulator_requests", "counter", "Request bodies handled.", "requests"),
    ("simulator_requests_completed", "counter", "Replies fully produced.", "completed"),
    ("simulator_requests_cancelled", "counter", "Replies abandoned by the client.", "cancelled"),
    ("simulator_requests_aborted", "counter", "Connections dropped or cut by faults.", "aborted"),
    ("simulator_errors", "counter", "Error replies.", "errors"),
    ("simulator_faults_applied", "counter", "Requests a fault applied to.", "faults_applied"),
    ("simulator_requests_running", "gauge", "Replies holding a concurrency slot.", "in_flight"),
    ("simulator_requests_waiting", "gauge", "Replies queued for a slot.", "waiting"),
    ("simulator_prompt_tokens", "counter", "Prompt tokens (approximate).", "prompt_tokens"),
    ("simulator_cached_tokens", "counter", "Prompt tokens served from the prefix cache.", "cached_tokens"),
    ("simulator_completion_tokens", "counter", "Completion tokens (approximate).", "completion_tokens"),
)


class SimulatorCollector:
    """One simulator's state as metric families, read when scraped.

    The vllm dialect adds vLLM's names (protocols.md §4.7), labelled ``model_name`` with the served
    model, so load-aware routing scrapes the simulator exactly like a real vLLM; the ``simulator_*``
    series, labelled ``profile``, exist for every dialect.
    """

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    def collect(self) -> Iterator[Metric]:
        stats = self.sim.stats
        profile = self.sim.profile
        values = {**stats.as_dict(), "kv_usage": min(1.0, stats.kv_tokens / profile.kv_cache_tokens)}
        if profile.dialect == "vllm":
            yield from _families(_VLLM, "model_name", profile.models[0], values)
        yield from _families(_SIMULATOR, "profile", profile.name, values)


def _families(
    table: tuple[tuple[str, str, str, str], ...], label: str, label_value: str, values: dict[str, float]
) -> Iterator[Metric]:
    for name, kind, help_text, field in table:
        family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, help_text, labels=[label])
        family.add_metric([label_value], float(values[field]))
        yield family


def metrics_registry(sim: Simulator) -> CollectorRegistry:
    """A registry of its own for `sim` (never the process-wide one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SimulatorCollector(sim))
    return registry


def metrics_text(sim: Simulator) -> str:
    """Prometheus text exposition of the simulator's state (what ``GET /metrics`` answers)."""
    return generate_latest(metrics_registry(sim)).decode()
