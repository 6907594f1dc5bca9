"""The tasks the server runs beside requests: policy hot reload, vLLM load scrapes, route-stats sync.

Process-wide services, started and stopped by the app; they sit with the entry points because they
reach every layer (the policy loader, the router, the runtime)."""

from __future__ import annotations

import asyncio
import contextlib

from gateway.config import LoadedConfig
from gateway.reload import PolicyWatcher
from gateway.routing.load import VllmScraper


class RoutingTasks:
    def __init__(self, config: LoadedConfig, runtime: object) -> None:
        self.config = config
        self.runtime = runtime  # gateway.pipeline.Runtime
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        rt = self.runtime
        settings = self.config.settings
        if settings.routing.policy_reload_s > 0:
            watcher = PolicyWatcher(self.config, rt, rt.meter.prices, settings.routing.policy_reload_s)  # type: ignore[attr-defined]
            self.tasks.append(asyncio.create_task(watcher.run(), name="policy-reload"))
        for name, up in settings.upstreams.items():
            if up.vllm_metrics and up.base_url:
                scraper = VllmScraper(rt.router, name, up.base_url, up.metrics_interval_s)  # type: ignore[attr-defined]
                self.tasks.append(asyncio.create_task(scraper.run(), name=f"vllm-metrics-{name}"))
        self.tasks.append(asyncio.create_task(self._sync(), name="route-stats-sync"))

    async def _sync(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            await self.runtime.router.stats.sync()  # type: ignore[attr-defined]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.tasks.clear()
