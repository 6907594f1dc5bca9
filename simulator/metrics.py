"""The simulator's ``/metrics``: Prometheus text, with vLLM's own metric names for the vllm dialect.

Split from the app (`server.py`) because it is a contract of its own: the gateway's load-aware
routing scrapes these names (``vllm:num_requests_waiting`` and friends) from a real vLLM, and the
simulator has to be scrapable the same way.
"""

from __future__ import annotations

from .engine import Simulator


def metrics_text(sim: Simulator) -> str:
    """Prometheus text exposition of the simulator's state.

    The vllm dialect uses vLLM's names (protocols.md §4.7), so load-aware routing can scrape the
    simulator exactly like a real vLLM; `simulator_*` series exist for every dialect.
    """
    stats = sim.stats
    profile = sim.profile
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, value: float, label: str) -> None:
        base = name[:-6] if kind == "counter" and name.endswith("_total") else name
        lines.append(f"# HELP {base} {help_text}")
        lines.append(f"# TYPE {base} {kind}")
        lines.append(f"{name}{{{label}}} {float(value)!r}")

    if profile.dialect == "vllm":
        label = f'model_name="{_escape(profile.models[0])}"'
        kv = min(1.0, stats.kv_tokens / profile.kv_cache_tokens)
        metric(
            "vllm:num_requests_running",
            "gauge",
            "Number of requests in model execution batches.",
            stats.in_flight,
            label,
        )
        metric(
            "vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.", stats.waiting, label
        )
        metric("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", kv, label)
        metric(
            "vllm:prefix_cache_queries_total",
            "counter",
            "Prefix cache queries, in terms of number of queried tokens.",
            stats.prompt_tokens,
            label,
        )
        metric(
            "vllm:prefix_cache_hits_total",
            "counter",
            "Prefix cache hits, in terms of number of cached tokens.",
            stats.cached_tokens,
            label,
        )
        metric("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.", stats.prompt_tokens, label)
        metric(
            "vllm:generation_tokens_total",
            "counter",
            "Number of generation tokens processed.",
            stats.completion_tokens,
            label,
        )
    label = f'profile="{_escape(profile.name)}"'
    for name, kind, help_text, value in (
        ("simulator_requests_total", "counter", "Request bodies handled.", stats.requests),
        ("simulator_requests_completed_total", "counter", "Replies fully produced.", stats.completed),
        ("simulator_requests_cancelled_total", "counter", "Replies abandoned by the client.", stats.cancelled),
        ("simulator_requests_aborted_total", "counter", "Connections dropped or cut by faults.", stats.aborted),
        ("simulator_errors_total", "counter", "Error replies.", stats.errors),
        ("simulator_faults_applied_total", "counter", "Requests a fault applied to.", stats.faults_applied),
        ("simulator_requests_running", "gauge", "Replies holding a concurrency slot.", stats.in_flight),
        ("simulator_requests_waiting", "gauge", "Replies queued for a slot.", stats.waiting),
        ("simulator_prompt_tokens_total", "counter", "Prompt tokens (approximate).", stats.prompt_tokens),
        (
            "simulator_cached_tokens_total",
            "counter",
            "Prompt tokens served from the prefix cache.",
            stats.cached_tokens,
        ),
        ("simulator_completion_tokens_total", "counter", "Completion tokens (approximate).", stats.completion_tokens),
    ):
        metric(name, kind, help_text, value, label)
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
