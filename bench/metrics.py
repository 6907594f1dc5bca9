"""Metrics benchmark: the gateway's request-path metric updates against other ways of making them.

What is measured: the CPU of the metric updates one streamed, metered request makes (what
``relay._observe`` and ``Meter.settle`` do): the request counter by status, the duration, TTFT
and overhead histograms, four token counters, spend and cache savings: 3 observations and 7
increments. Four ways of making them, on the gateway's own metric objects:

  labels            ``METRIC.labels(...).inc()`` / ``.observe()`` for every update (plain library use)
  children          the children looked up once and kept, ``child.inc()`` / ``child.observe()``
                    directly: public prometheus-client API only
  pending-counters  counters add up in ``PendingCounter`` (a plain float) until a flush, histograms
                    observed directly: the layer the gateway had until 2026-12-04 (with, before that,
                    histograms batched by writing the library's private ``_buckets``/``_sum``)
  gateway           what the gateway does: ``series()``'s cached children (RESULTS.md §7 measured
                    the batching layers under the 10 % line, and the library is used instead)

``pending-counters`` flushes every ``--flush-every`` requests (2,000 requests is about a second of
one gateway core at its highest measured rate), so the flush is in the cost. Each mode runs in a
fresh interpreter: ``single`` (one process, prometheus-client's in-memory values with a lock) and
``multiprocess`` (``PROMETHEUS_MULTIPROC_DIR`` set, as ``kimi-gateway serve --workers N`` does:
every value is a slot in an mmapped file). Each repetition runs every variant once in each mode,
the variant order rotating; cells are µs of CPU (``time.process_time``) per request, median
[min-max].

  .venv/bin/python bench/metrics.py      # ~1 min
  ... bench/metrics.py --reps 7 --requests 200000 --modes single
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead import cell  # type: ignore[import-not-found]

VARIANTS = ("labels", "children", "pending-counters", "gateway")
KEY = ("bench", "kimi-k2-thinking", "moonshot/kimi-k2-thinking")


class PendingCounter:
    """A counter child's increments added up in a plain number until a flush: the layer the gateway
    had until 2026-12-04, kept here as the alternative measured against the library."""

    __slots__ = ("child", "pending")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.pending = 0.0

    def inc(self, amount: float = 1) -> None:
        self.pending += amount

    def flush(self) -> None:
        if self.pending:
            amount, self.pending = self.pending, 0.0
            self.child.inc(amount)


def one_rep(order: list[str], requests: int, flush_every: int) -> dict[str, float]:
    """µs of CPU per request for each variant (run in this process, in ``order``)."""
    from gateway import observability as o

    tenant, model, upstream = KEY

    def labels_request(i: int) -> None:
        o.REQUESTS.labels(tenant, model, upstream, "200").inc()
        o.DURATION.labels(tenant, model, upstream, "true").observe(0.0123 + i % 7 * 0.01)
        o.TTFT.labels(tenant, model, upstream).observe(0.0021 + i % 5 * 0.001)
        o.OVERHEAD.labels("true").observe(0.0004 + i % 3 * 0.0001)
        o.TOKENS.labels(tenant, model, upstream, "prompt").inc(1200)
        o.TOKENS.labels(tenant, model, upstream, "cached").inc(800)
        o.TOKENS.labels(tenant, model, upstream, "completion").inc(350)
        o.TOKENS.labels(tenant, model, upstream, "reasoning").inc(200)
        o.SPEND.labels(tenant, model, upstream).inc(0.00123)
        o.CACHE_SAVINGS.labels(tenant, model, upstream).inc(0.00036)

    children: dict[str, Any] = {
        "status": o.REQUESTS.labels(tenant, model, upstream, "200"),
        "duration": o.DURATION.labels(tenant, model, upstream, "true"),
        "ttft": o.TTFT.labels(tenant, model, upstream),
        "overhead": o.OVERHEAD.labels("true"),
        "prompt": o.TOKENS.labels(tenant, model, upstream, "prompt"),
        "cached": o.TOKENS.labels(tenant, model, upstream, "cached"),
        "completion": o.TOKENS.labels(tenant, model, upstream, "completion"),
        "reasoning": o.TOKENS.labels(tenant, model, upstream, "reasoning"),
        "spend": o.SPEND.labels(tenant, model, upstream),
        "savings": o.CACHE_SAVINGS.labels(tenant, model, upstream),
    }

    def cached(get: Any) -> Any:
        def request(i: int) -> None:
            s = get()
            s["status"].inc()
            s["duration"].observe(0.0123 + i % 7 * 0.01)
            s["ttft"].observe(0.0021 + i % 5 * 0.001)
            s["overhead"].observe(0.0004 + i % 3 * 0.0001)
            s["prompt"].inc(1200)
            s["cached"].inc(800)
            s["completion"].inc(350)
            s["reasoning"].inc(200)
            s["spend"].inc(0.00123)
            s["savings"].inc(0.00036)

        return request

    # pending counters, histograms straight to their children (a dict lookup stands in for series())
    half = {k: (v if k in ("duration", "ttft", "overhead") else PendingCounter(v)) for k, v in children.items()}

    def pending_request(i: int) -> None:
        s = o.series(tenant, model, upstream, True)
        s.status(200).inc()
        s.duration.observe(0.0123 + i % 7 * 0.01)
        s.ttft.observe(0.0021 + i % 5 * 0.001)
        s.overhead.observe(0.0004 + i % 3 * 0.0001)
        s.prompt.inc(1200)
        s.cached.inc(800)
        s.completion.inc(350)
        s.reasoning.inc(200)
        s.spend.inc(0.00123)
        s.savings.inc(0.00036)

    def flush_half() -> None:
        for v in half.values():
            if isinstance(v, PendingCounter):
                v.flush()

    runs = {
        "labels": (labels_request, None),
        "children": (cached(lambda: children), None),
        "pending-counters": (cached(lambda: half), flush_half),
        "gateway": (pending_request, None),
    }
    out: dict[str, float] = {}
    for name in order:
        request, flush = runs[name]
        for i in range(2000):  # warm
            request(i)
        if flush:
            flush()
        t0 = time.process_time()
        for i in range(requests):
            request(i)
            if flush and i % flush_every == flush_every - 1:
                flush()
        if flush:
            flush()
        out[name] = (time.process_time() - t0) / requests * 1e6
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5, help="repetitions (default 5)")
    p.add_argument("--requests", type=int, default=100_000, help="requests per variant and repetition")
    p.add_argument("--flush-every", type=int, default=2000, help="requests between flushes (default 2000)")
    p.add_argument("--modes", default="single,multiprocess")
    p.add_argument("--cpu", type=int, help="pin the measuring processes to that CPU")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(one_rep(args.child.split(","), args.requests, args.flush_every)))
        return

    modes = args.modes.split(",")
    results: dict[tuple[str, str], list[float]] = {}
    loads = [os.getloadavg()]
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    for rep in range(args.reps):
        order = list(VARIANTS[rep % 4 :] + VARIANTS[: rep % 4])
        for mode in modes:
            with tempfile.TemporaryDirectory(prefix="bench-metrics-") as d:
                env = {**os.environ}
                env.pop("PROMETHEUS_MULTIPROC_DIR", None)
                if mode == "multiprocess":
                    env["PROMETHEUS_MULTIPROC_DIR"] = d
                argv = [sys.executable, str(Path(__file__).resolve()), "--child", ",".join(order)]
                argv += ["--requests", str(args.requests), "--flush-every", str(args.flush_every)]
                if args.cpu is not None:
                    argv = ["taskset", "-c", str(args.cpu), *argv]
                out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True, timeout=600).stdout
            for name, us in json.loads(out).items():
                results.setdefault((mode, name), []).append(us)
            print(f"{time.strftime('%H:%M:%S')} rep {rep + 1} {mode}: {out.strip()}", file=sys.stderr, flush=True)
        loads.append(os.getloadavg())

    import prometheus_client

    version = getattr(prometheus_client, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version

        version = dist_version("prometheus-client")
    print(
        f"\nmetrics.py, {started}, {args.reps} reps x {args.requests:,} requests per variant, flush every "
        f"{args.flush_every:,}; prometheus-client {version}; load average during the run "
        + ", ".join(f"{la[0]:.2f}" for la in loads)
        + "\n"
    )
    print("CPU µs per request (10 metric updates)\n")
    print("| variant | " + " | ".join(modes) + " |")
    print("|---|" + "---:|" * len(modes))
    for name in VARIANTS:
        print(f"| {name} | " + " | ".join(cell(results[(m, name)]) for m in modes) + " |")
    print("\nagainst `gateway` (medians; negative: the variant is cheaper than what the gateway does)\n")
    print("| against | " + " | ".join(modes) + " |")
    print("|---|" + "---:|" * len(modes))
    for name in VARIANTS[:-1]:
        cells = []
        for m in modes:
            ours, other = statistics.median(results[(m, "gateway")]), statistics.median(results[(m, name)])
            cells.append(f"{other - ours:+.2f} µs")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
