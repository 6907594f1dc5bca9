"""Load awareness for self-hosted vLLM: scrape ``/metrics`` and turn a queue into expected delay.

vLLM exports ``vllm:num_requests_waiting``, ``vllm:num_requests_running`` and
``vllm:kv_cache_usage_perc``. While every slot is busy, slots free up at about ``running / service``
per second (``service`` = the time a request holds a slot), so a request with ``k`` requests ahead
of it starts after about ``(k + 1) * service / running``; a nearly full KV cache (preemptions) adds
one more time to first token. The router adds that delay to the candidate's expected TTFT, so a
queueing server looks slow and loses to a faster one when the SLO demands it.

Between scrapes the picture is kept current: requests the gateway sent there count as arrivals (no
herding onto a server that looked idle), and slots that finished since the scrape count as
departures (a saturated server is not treated as if frozen at its last scrape). The service time is
learned from the answers: a request's time at the server less the wait that was expected for it.
The state is per gateway process: each replica scrapes the server itself.
"""

from __future__ import annotations

import asyncio
import math
import re
from dataclasses import dataclass

from gateway.observability import log
from gateway.routing.metrics import VLLM_QUEUE
from gateway.routing.router import Router
from gateway.routing.stats import COLD_COMPLETION_TOKENS

_LINE = re.compile(r"^(vllm:[a-z_]+)(?:\{[^}]*\})?\s+([0-9.eE+-]+|NaN)\s*$")
KV_FULL = 0.98
SERVICE_ALPHA = 0.1  # EWMA weight of one answer in the learned service time (many requests share a server)


@dataclass(frozen=True, slots=True)
class Load:
    waiting: float = 0.0
    running: float = 0.0
    kv_usage: float = 0.0


def parse_metrics(text: str) -> Load:
    """Sum each gauge over its label sets (one per served model)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = _LINE.match(line)
        if match and match.group(2) != "NaN":
            values[match.group(1)] = values.get(match.group(1), 0.0) + float(match.group(2))
    return Load(
        values.get("vllm:num_requests_waiting", 0.0),
        values.get("vllm:num_requests_running", 0.0),
        values.get("vllm:kv_cache_usage_perc", values.get("vllm:gpu_cache_usage_perc", 0.0)),
    )


class LoadState:
    """One vLLM server as this gateway sees it: the last scrape plus what happened since.

    Once the server has been seen queueing, its concurrency limit is known (the running count at
    that moment); until then a free slot is assumed and no wait is expected.
    """

    def __init__(self) -> None:
        self.load = Load()
        self.capacity = math.inf
        self.dispatched = 0
        self.scraped_at = 0.0
        self.service_s: float | None = None  # learned time a request holds a slot (None: cold)

    def scraped(self, load: Load, now: float) -> None:
        self.load = load
        if load.waiting > 0:
            self.capacity = max(load.running, 1.0)
        self.dispatched = 0
        self.scraped_at = now

    def served(self, seconds: float) -> None:
        """A request's time at the server less its expected wait: how long it held a slot."""
        seconds = max(0.0, seconds)
        old = self.service_s
        self.service_s = seconds if old is None else old + SERVICE_ALPHA * (seconds - old)

    def queue_delay(self, ttft_s: float, tokens_per_s: float, now: float) -> float:
        load = self.load
        service = self.service_s if self.service_s is not None else cold_service(ttft_s, tokens_per_s)
        free = max(0.0, self.capacity - load.running) if load.waiting == 0 else 0.0
        # slots that finished since the scrape, at the rate a busy server frees them
        drained = load.running * max(0.0, now - self.scraped_at) / service if service > 0 else 0.0
        ahead = load.waiting + self.dispatched - free - drained
        return queue_delay(Load(ahead, load.running, load.kv_usage), ttft_s, tokens_per_s, service)


def cold_service(ttft_s: float, tokens_per_s: float) -> float:
    """Time in a slot before any answer was seen: first token plus a cold tenant's output."""
    return ttft_s + (COLD_COMPLETION_TOKENS / tokens_per_s if tokens_per_s > 0 else 0.0)


def queue_delay(load: Load, ttft_s: float, tokens_per_s: float, service_s: float | None = None) -> float:
    """Expected wait before a slot, with ``load.waiting`` requests ahead (negative: slots free)."""
    service = service_s if service_s is not None else cold_service(ttft_s, tokens_per_s)
    # k ahead: the (k + 1)-th slot to free is ours; a fraction of a free slot is partly ours already
    delay = max(0.0, load.waiting + 1.0) * service / max(load.running, 1.0)
    if load.kv_usage >= KV_FULL:
        delay += ttft_s
    return delay


def apply_load(router: Router, upstream: str, load: Load) -> None:
    state = router.loads.get(upstream)
    if state is None:
        state = router.loads[upstream] = LoadState()
    state.scraped(load, router.clock())
    VLLM_QUEUE.labels(upstream).set(load.waiting)


class VllmScraper:
    def __init__(self, router: Router, upstream: str, base_url: str, interval_s: float) -> None:
        self.router = router
        self.upstream = upstream
        root = base_url.removesuffix("/v1")
        self.url = f"{root}/metrics"
        self.interval_s = interval_s
        self._warned = False

    async def run(self) -> None:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=max(1.0, self.interval_s))
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                try:
                    async with session.get(self.url) as resp:
                        text = await resp.text()
                    apply_load(self.router, self.upstream, parse_metrics(text))
                    self._warned = False
                except (aiohttp.ClientError, TimeoutError) as exc:
                    if not self._warned:  # one line per outage, not one per scrape
                        log.warning("vLLM metrics of %s unavailable at %s: %s", self.upstream, self.url, exc)
                        self._warned = True
                await asyncio.sleep(self.interval_s)
