"""The simulator as a real HTTP server: a raw ASGI app for uvicorn (uvloop + httptools, keep-alive).

No framework: the `instant` profile is the upstream of proxy benchmarks, so the request path is a
dict lookup, one `Simulator.handle` call and one or a few `send` calls.

Routes
  POST /v1/chat/completions   JSON, or SSE (each event is its own body message)
  GET  /v1/models             OpenAI list shape, owned_by "simulator"
  GET  /health
  GET  /metrics               Prometheus text; vLLM's metric names for the vllm dialect
  POST /_sim/faults           a Fault as JSON, or a list of them
  DELETE /_sim/faults
  GET  /_sim/stats            SimStats as JSON, plus the pending faults
  GET  /_sim/requests?limit=N the last request bodies (decoded) with their headers, newest last
  POST /_sim/keys             per-key tier limits and revoked keys (simulator/keys.py)
  POST /_sim/reset

The connection plumbing (reading a body, racing a reply against a disconnect, aborting a
connection for a fault) is in `transport.py`, the `/metrics` text in `metrics.py`, and running the
app under uvicorn (in the foreground or on a background thread) in `serving.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

import orjson
from prometheus_client import generate_latest

from gateway.asgi import Receive, Scope, Send, send_bytes, send_json

from .engine import Simulator
from .errors import error_body
from .faults import Fault
from .metrics import CONTENT_TYPE as PROMETHEUS
from .metrics import metrics_registry
from .profiles import Profile
from .reply import SimReply, SimulatedDisconnect
from .transport import ABORT_SETTLE_S, encode_headers, pump, race, read_request, transport_of, until_disconnect


class SimulatorApp:
    """ASGI application serving one `Simulator` (available as `.simulator` for in-process tests)."""

    def __init__(self, simulator: Simulator) -> None:
        self.simulator = simulator
        self.profile = simulator.profile
        created = int(time.time())
        models: list[dict[str, Any]] = []
        for model in simulator.profile.models:
            if model in simulator.profile.retired:
                continue
            entry: dict[str, Any] = {"id": model, "object": "model", "created": created, "owned_by": "simulator"}
            if simulator.profile.dialect == "vllm":
                entry.update(root=simulator.profile.models[0], max_model_len=simulator.profile.context_tokens)
            models.append(entry)
        self._models = orjson.dumps({"object": "list", "data": models})
        self._health = orjson.dumps({"status": "ok", "simulator": simulator.profile.name})
        self._metrics_registry = metrics_registry(simulator)
        self._routes: dict[tuple[str, str], Callable[[Scope, Receive, Send], Awaitable[None]]] = {
            ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/chat/completions"): self._chat,
            ("GET", "/v1/models"): self._models_route,
            ("GET", "/models"): self._models_route,
            ("GET", "/health"): self._health_route,
            ("GET", "/metrics"): self._metrics,
            ("POST", "/_sim/faults"): self._add_faults,
            ("DELETE", "/_sim/faults"): self._clear_faults,
            ("GET", "/_sim/stats"): self._stats,
            ("GET", "/_sim/requests"): self._requests,
            ("POST", "/_sim/keys"): self._keys,
            ("POST", "/_sim/reset"): self._reset,
        }
        self._paths = {path for _, path in self._routes}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            route = self._routes.get((scope["method"], scope["path"]))
            if route is not None:
                await route(scope, receive, send)
            elif scope["path"] in self._paths:
                await self._error(send, 405, f"method {scope['method']} not allowed on {scope['path']}")
            else:
                await self._error(send, 404, f"no route {scope['path']} on this simulator")
        elif kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    async def _error(self, send: Send, status: int, message: str) -> None:
        await send_bytes(send, status, error_body(self.profile.dialect, status, message), [])

    # -- chat ----------------------------------------------------------------------------------------

    async def _chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await read_request(receive)
        if body is None:
            return
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        reply = self.simulator.handle(body, headers=headers)
        if reply.events is not None:
            await self._stream(reply, receive, send)
            return
        if reply.may_block:
            work = asyncio.ensure_future(reply.wait())
            finished, watch = await race(work, receive)
            if not finished:
                return  # the client left while we "generated"; nothing to send
            if watch is not None:
                watch.cancel()
                work.result()  # re-raise what went wrong
        else:
            await reply.wait()
        if reply.drop:
            await self._abort(send, receive, None, graceful=False)
            return
        encoded = encode_headers(reply.headers)
        await send_bytes(send, reply.status, reply.body or b"", encoded.others, encoded.content_type)

    async def _stream(self, reply: SimReply, receive: Receive, send: Send) -> None:
        assert reply.events is not None
        headers = encode_headers(reply.headers).all
        if not reply.may_block:  # no timing: the stream is written in one go, nothing to watch
            try:
                await pump(reply.events, send, headers)
            except SimulatedDisconnect:
                await self._abort(send, receive, None, graceful=True)
            return
        streaming = asyncio.ensure_future(pump(reply.events, send, headers))
        finished, watch = await race(streaming, receive)
        if finished and watch is not None:  # the pump failed
            error = streaming.exception()
            if isinstance(error, SimulatedDisconnect):
                await self._abort(send, receive, watch, graceful=True)
                return
            watch.cancel()
            assert error is not None
            raise error

    async def _abort(self, send: Send, receive: Receive, watch: asyncio.Future[None] | None, *, graceful: bool) -> None:
        """Kill the connection: close after what was written (cut stream) or reset it (drop)."""
        transport = transport_of(send)
        if transport is None:
            if watch is not None:
                watch.cancel()
            raise SimulatedDisconnect("simulator: connection dropped (injected fault)")
        if graceful:
            transport.close()
        else:
            transport.abort()
        # let the server see the disconnect before we return, or it would complain that the app
        # "returned without completing response" (and try to answer 500 to a dropped request)
        waiter = watch if watch is not None else asyncio.ensure_future(until_disconnect(receive))
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(waiter, ABORT_SETTLE_S)

    # -- other routes --------------------------------------------------------------------------------

    async def _models_route(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_bytes(send, 200, self._models, [])

    async def _health_route(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_bytes(send, 200, self._health, [])

    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_bytes(send, 200, generate_latest(self._metrics_registry), [], PROMETHEUS)

    async def _add_faults(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await read_request(receive)
        if body is None:
            return
        try:
            data = orjson.loads(body)
            faults = [Fault.from_dict(item) for item in (data if isinstance(data, list) else [data])]
        except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
            await self._error(send, 400, f"invalid fault: {exc}")
            return
        for fault in faults:
            self.simulator.add_fault(fault)
        await send_json(send, 200, {"ok": True, "pending": self.simulator.faults.pending()})

    async def _clear_faults(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.simulator.clear_faults()
        await send_json(send, 200, {"ok": True})

    async def _stats(self, scope: Scope, receive: Receive, send: Send) -> None:
        sim = self.simulator
        await send_json(
            send,
            200,
            {
                **sim.stats.as_dict(),
                "profile": sim.profile.name,
                "pending_faults": sim.faults.pending(),
                "prefix_cache_entries": len(sim.cache),
                "keys": sim.keys.stats(),
            },
        )

    async def _requests(self, scope: Scope, receive: Receive, send: Send) -> None:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        sim = self.simulator
        try:
            limit = int(query.get("limit", [str(len(sim.recent))])[0])
        except ValueError:
            await self._error(send, 400, "limit must be an integer")
            return
        pairs = list(zip(sim.recent, sim.recent_headers, strict=True))
        pairs = pairs[-limit:] if limit > 0 else []
        out = []
        for raw, headers in pairs:
            try:
                entry: dict[str, Any] = {"body": orjson.loads(raw), "headers": headers}
            except orjson.JSONDecodeError:
                entry = {"body": None, "raw": raw.decode("utf-8", "replace"), "headers": headers}
            out.append(entry)
        await send_json(send, 200, out)

    async def _keys(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await read_request(receive)
        if body is None:
            return
        try:
            self.simulator.keys.configure_json(orjson.loads(body))
        except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
            await self._error(send, 400, f"invalid key limits: {exc}")
            return
        await send_json(send, 200, {"ok": True})

    async def _reset(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.simulator.reset()
        await send_json(send, 200, {"ok": True})


def build_app(profile: Profile, *, seed: int = 0, request_log: str | None = None) -> SimulatorApp:
    """An ASGI app simulating `profile`; its `Simulator` is `app.simulator`; `request_log` names a file
    that gets one JSON line per answer (the request's `user`, stream or not, the usage reported)."""
    return SimulatorApp(Simulator(profile, seed=seed, request_log=request_log))
