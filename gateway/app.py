"""The ASGI application: routes, lifespan, health.

A plain ASGI callable with a dict of routes keeps the per-request cost of the chat endpoints near
the floor measured for a bare proxy (bench/RESULTS.md). The lifespan opens the upstream clients
inside the server's event loop and closes them on shutdown.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from gateway import access_log, errors
from gateway.api import anthropic as anthropic_api
from gateway.api import explain as explain_api
from gateway.api import openai as openai_api
from gateway.api import responses as responses_api
from gateway.api import responses_items
from gateway.asgi import ClientGone, Receive, Scope, Send, send_bytes, send_error, send_json
from gateway.background import RoutingTasks
from gateway.capture.factory import capture_store_from_url
from gateway.drain import Drain
from gateway.exchange import Runtime
from gateway.metering.budget import Budgets, seed_from_ledger
from gateway.metering.journal import Journal
from gateway.metering.journal_records import reservation_estimate
from gateway.metering.journal_replay import replay_journals
from gateway.metering.ledger import Ledger
from gateway.metering.ledger_factory import ledger_from_url
from gateway.metering.meter import Meter
from gateway.observability import log, metrics_payload, setup_logging
from gateway.ratelimit import RateLimiter
from gateway.routing.router import Router
from gateway.state.build import build_states
from gateway.upstreams.base import Upstream
from gateway.upstreams.factory import build_upstreams
from gateway.wiring import Loaded, load_all

CONFIG_ENV = "KIMI_GATEWAY_CONFIG"
CLEAN_UP_WAIT_S = 5.0  # at shutdown, how long requests cancelled by the grace period get to settle
WORKERS_ENV = "KIMI_GATEWAY_WORKERS"  # set by ``serve --workers N`` for the worker processes

Handler = Callable[[Scope, Receive, Send], Awaitable[None]]


class GatewayApp:
    """Everything one gateway process serves."""

    def __init__(self, loaded: Loaded) -> None:
        config = loaded.config
        self.config = config
        self.upstreams: dict[str, Upstream] = build_upstreams(config)
        ledger_cfg = config.settings.ledger
        self.ledger: Ledger = ledger_from_url(
            config.ledger_url, batch_size=ledger_cfg.batch_size, max_delay=ledger_cfg.flush_interval_s
        )
        longest = max(up.timeouts.total_s for up in config.settings.upstreams.values())
        self.state = build_states(config.settings.state, longest, config.path.parent)
        self.budgets = Budgets(self.state.budgets)
        self.journal_dir = config.journal_dir
        self.journal = (
            Journal(self.journal_dir, self.ledger, fsync_ms=ledger_cfg.journal_fsync_ms)
            if self.journal_dir is not None
            else None
        )
        self.meter = Meter(loaded.prices, self.budgets, self.ledger, self.journal)
        limits = RateLimiter(self.state.rate_limits)
        kv = self.state.kv
        self.runtime = Runtime(
            loaded.policies,
            self.upstreams,
            self.meter,
            kv,
            Router.from_config(config, loaded.prices, kv, exchange=self.state.stats, key_state=self.state.key_quotas),
            limits=limits,
        )
        self.runtime.capture = capture_store_from_url(config.ledger_url)  # beside the ledger
        self.background = RoutingTasks(config, self.runtime)
        self.admin_key = os.environ.get(config.settings.admin_key_env) or None
        self._finance_app: Any = None
        self.ready = False
        self.drain = Drain(config.settings.shutdown.drain_s)
        self._inflight: set[asyncio.Task[Any] | None] = set()  # HTTP requests being handled
        access_log.configure(config.settings.access_log, config.settings.log_level)
        limit = config.settings.max_body_bytes
        rt = self.runtime

        async def chat(scope: Scope, receive: Receive, send: Send) -> None:
            await openai_api.chat_completions(rt, limit, scope, receive, send)

        async def anthropic_messages(scope: Scope, receive: Receive, send: Send) -> None:
            await anthropic_api.messages(rt, limit, scope, receive, send)

        async def anthropic_count_tokens(scope: Scope, receive: Receive, send: Send) -> None:
            await anthropic_api.count_tokens(rt, limit, scope, receive, send)

        seal_secret = os.environ.get(config.settings.responses.seal_key_env) or None
        self.responses = responses = responses_api.ResponsesService(rt, seal_secret)

        async def responses_create(scope: Scope, receive: Receive, send: Send) -> None:
            await responses_api.create(responses, limit, scope, receive, send)

        async def models(scope: Scope, receive: Receive, send: Send) -> None:
            await openai_api.list_models(rt, scope, send)

        async def explain(scope: Scope, receive: Receive, send: Send) -> None:
            await explain_api.route_explain(rt, limit, scope, receive, send)

        finance = self._finance
        self.routes: dict[str, dict[str, Handler]] = {
            "/v1/spend": {"GET": finance},
            "/v1/budget": {"GET": finance},
            "/finance/docs": {"GET": finance},
            "/finance/openapi.json": {"GET": finance},
            "/v1/chat/completions": {"POST": chat},
            "/chat/completions": {"POST": chat},
            "/v1/messages": {"POST": anthropic_messages},
            "/v1/messages/count_tokens": {"POST": anthropic_count_tokens},
            "/v1/responses": {"POST": responses_create},
            "/v1/route/explain": {"POST": explain},
            "/v1/models": {"GET": models},
            "/models": {"GET": models},
            "/healthz": {"GET": self._healthz},
            "/readyz": {"GET": self._readyz},
            "/metrics": {"GET": self._metrics},
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            path = scope["path"]
            methods = self.routes.get(path)
            if methods is None and path.endswith("/") and len(path) > 1:
                methods = self.routes.get(path.rstrip("/"))
            if methods is None:
                stored = responses_items.split_path(path)  # /v1/responses/{id}...: looked at only on a miss
                if stored is not None:
                    await responses_items.handle(self.responses, scope, receive, send, *stored)
                    return
                await send_error(send, errors.not_found(path))
                return
            handler = methods.get(scope["method"])
            if handler is None:
                error = errors.method_not_allowed(scope["method"], path)
                error.headers.append((b"allow", ", ".join(methods).encode()))
                await send_error(send, error)
                return
            task = asyncio.current_task()
            self._inflight.add(task)
            try:
                await handler(scope, receive, send)
            except ClientGone as gone:
                log.info("%s %s: %s; nothing answered", scope["method"], path, gone)
            finally:
                self._inflight.discard(task)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:  # the server must not start half-configured
                    log.exception("start-up failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def startup(self) -> None:
        await self.ledger.open()
        await self.state.open()
        if self.runtime.capture is not None:
            await self.runtime.capture.open()  # deletes rows past their retention, then daily
        settings = self.config.settings
        workers = max(settings.workers, int(os.environ.get(WORKERS_ENV, "1")))
        shared = not self.config.ledger_url.startswith("sqlite:") or workers > 1
        # with other processes on the same ledger, leave their requests in flight alone
        longest = max(up.timeouts.total_s for up in settings.upstreams.values())
        if self.journal is not None:
            assert self.journal_dir is not None
            # the journals of dead processes first: their rows are exact, and they settle the open
            # reservations that the database would otherwise estimate below
            await replay_journals(self.journal_dir, self.ledger, self.meter.prices.at)
            self.journal.open()
        await reconcile_and_seed(self.ledger, self.meter, self.runtime, time.time() - longest if shared else None)
        for upstream in self.upstreams.values():
            await upstream.start()
        self.background.start()
        tune_gc()
        self.drain.install()  # after start-up: a SIGTERM before it stops at once, as it always did
        self.ready = True
        log.info(
            "kimi-gateway ready: %d tenants, upstreams %s",
            len(self.runtime.policies.tenants),
            ", ".join(sorted(self.upstreams)),
        )

    async def shutdown(self) -> None:
        self.ready = False
        if self._inflight:
            # uvicorn cancelled these when the grace period ran out and does not wait for them: let
            # their settlement (ledger row, budget release, access-log line) finish before closing
            await asyncio.wait([t for t in self._inflight if t is not None], timeout=CLEAN_UP_WAIT_S)
        await self.background.stop()
        for upstream in self.upstreams.values():
            await upstream.close()
        await self.state.close()
        await self.ledger.close()
        if self.journal is not None:
            await self.journal.close(stored_everything=not self.ledger.left_unwritten)
        if self.runtime.capture is not None:
            await self.runtime.capture.close()
        access_log.ACCESS.flush()  # the last requests' lines, before the process exits

    async def _finance(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The finance API is a FastAPI app, built on first use to keep start-up fast."""
        if self._finance_app is None:
            from gateway.api.finance import build_finance_app

            self._finance_app = build_finance_app(self.runtime, self.admin_key)
        await self._finance_app(scope, receive, send)

    async def _healthz(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_json(send, 200, {"status": "ok"})

    async def _readyz(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.drain.draining:  # SIGTERM: a load balancer polling readiness moves traffic away
            await send_bytes(send, 503, orjson.dumps({"status": "draining"}), [])
        elif self.ready:
            # retired candidates, with the seconds until each one's next probe
            retired = self.runtime.dead.snapshot()
            await send_json(send, 200, {"status": "ready", "upstreams": sorted(self.upstreams), "retired": retired})
        else:
            await send_bytes(send, 503, orjson.dumps({"status": "starting"}), [])

    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        payload, content_type = metrics_payload()
        await send_bytes(send, 200, payload, [], content_type.encode())


def tune_gc() -> None:
    """Make the cyclic garbage collector cheap for a long-running server.

    Every request allocates a few hundred short-lived containers; with CPython's default thresholds
    (700, 10, 10) the collector runs every few requests and its older generations keep scanning
    everything loaded at start-up. Freezing the start-up heap and collecting the young generation
    less often measured +14 % non-stream and +15 % stream throughput (bench/RESULTS.md, "Earlier:
    HEAD with garbage-collector tuning"). Cycles are still collected, only in larger batches.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


async def reconcile_and_seed(ledger: Ledger, meter: Meter, runtime: Runtime, opened_before: float | None) -> None:
    """Crash recovery, then budget counters: reservations a dead process left open (and its journal
    did not settle: a replica whose disk is gone) become estimated ledger rows, billed for the
    prompt, not the worst case held; the in-process counters start from what the ledger says was
    spent."""
    await ledger.reconcile_open_reservations(
        reason="the gateway stopped before this request settled",
        estimate=lambda res: reservation_estimate(res, meter.prices.at),
        opened_before=opened_before,
    )
    tenants = [(t.name, t.budget) for t in runtime.policies.tenants.values()]
    await seed_from_ledger(meter.budgets, ledger, tenants, time.time())


def create_app(config_path: str | None = None) -> GatewayApp:
    """App factory for uvicorn (``--factory``); the config path comes from the CLI or ``KIMI_GATEWAY_CONFIG``."""
    path = config_path or os.environ.get(CONFIG_ENV)
    if not path:
        raise RuntimeError(f"no config: pass a path or set {CONFIG_ENV}")
    loaded = load_all(path)
    setup_logging(loaded.config.settings.log_level)  # worker processes configure their own logging
    return GatewayApp(loaded)
