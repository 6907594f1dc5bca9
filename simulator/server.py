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
  POST /_sim/reset

Connection faults.  ASGI has no "abort the connection" message, and an exception raised by the app
makes uvicorn answer 500 when no response has started.  uvicorn's `send` is a bound method of its
request cycle, which holds the connection's transport, so `_transport_of` reaches it: `drop` aborts it
(the client gets a reset / "server disconnected without a response") and a cut stream closes it after
the events already written (the client sees a chunked body without its terminating chunk, never a
clean end).  On a server without that attribute, the app raises `SimulatedDisconnect` instead, which
every ASGI server turns into a closed connection once the response has started.

Client disconnects.  uvicorn's `send` silently drops writes after the client went away, so a stream
would run to its end unnoticed.  While a reply takes time, a watcher task waits on `receive()` for
`http.disconnect` and cancels the reply, which the engine counts as `cancelled`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

import orjson

from .engine import SimReply, SimulatedDisconnect, Simulator
from .errors import error_body
from .faults import Fault
from .profiles import Profile
from .render import DONE_EVENT

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

ABORT_SETTLE_S = 1.0  # how long to wait for the server to notice a connection we closed ourselves
_JSON = [(b"content-type", b"application/json")]
_TEXT = [(b"content-type", b"text/plain; charset=utf-8")]
_PROMETHEUS = [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")]

_encoded_headers: dict[tuple[tuple[str, str], ...], list[tuple[bytes, bytes]]] = {}


def _encode_headers(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    """Reply headers as ASGI bytes pairs; the few distinct header sets are encoded once."""
    key = tuple(headers)
    encoded = _encoded_headers.get(key)
    if encoded is None:
        encoded = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        if len(_encoded_headers) < 256:
            _encoded_headers[key] = encoded
    return encoded


async def _send_body(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send(
        {"type": "http.response.start", "status": status, "headers": [*headers, (b"content-length", b"%d" % len(body))]}
    )
    await send({"type": "http.response.body", "body": body})


async def _send_json(send: Send, status: int, payload: Any) -> None:
    await _send_body(send, status, _JSON, orjson.dumps(payload))


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None when the client disconnected first."""
    message = await receive()
    if message["type"] == "http.disconnect":
        return None
    body = message.get("body", b"")
    if not message.get("more_body"):
        return body
    chunks = [body]
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _transport_of(send: Send) -> Any:
    """The connection's transport behind uvicorn's bound `send`, or None on other servers."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is not None and hasattr(transport, "abort") and hasattr(transport, "close"):
        return transport
    return None


async def _pump(events: AsyncIterator[bytes], send: Send, headers: list[tuple[bytes, bytes]]) -> None:
    """Send a stream's events, one body message each; headers go out with the first event.

    Holding the headers until the first event makes queueing, TTFT and stall faults visible as time to
    first byte, as behind a real upstream.
    """
    started = False
    try:
        async for event in events:
            if not started:
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                started = True
            last = event == DONE_EVENT
            await send({"type": "http.response.body", "body": event, "more_body": not last})
            if last:
                return
        if not started:  # defensive: an iterator that ends without [DONE] still ends the response
            await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()


async def _race(work: asyncio.Future[None], receive: Receive) -> tuple[bool, asyncio.Future[None] | None]:
    """Run `work` until done or until the client disconnects (then cancel it).

    Returns (finished, watcher); the watcher is still running when `work` raised, so the caller can
    wait for the disconnect it causes.
    """
    watch = asyncio.ensure_future(_until_disconnect(receive))
    try:
        await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        work.cancel()
        watch.cancel()
        raise
    if work.done():
        if work.cancelled() or work.exception() is None:
            watch.cancel()
            return True, None
        return True, watch
    work.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await work
    return False, None


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
        await _send_body(send, status, _JSON, error_body(self.profile.dialect, status, message))

    # -- chat ----------------------------------------------------------------------------------------

    async def _chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await _read_body(receive)
        if body is None:
            return
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        reply = self.simulator.handle(body, headers=headers)
        if reply.events is not None:
            await self._stream(reply, receive, send)
            return
        if reply.may_block:
            work = asyncio.ensure_future(reply.wait())
            finished, watch = await _race(work, receive)
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
        await _send_body(send, reply.status, _encode_headers(reply.headers), reply.body or b"")

    async def _stream(self, reply: SimReply, receive: Receive, send: Send) -> None:
        assert reply.events is not None
        headers = _encode_headers(reply.headers)
        if not reply.may_block:  # no timing: the stream is written in one go, nothing to watch
            try:
                await _pump(reply.events, send, headers)
            except SimulatedDisconnect:
                await self._abort(send, receive, None, graceful=True)
            return
        pump = asyncio.ensure_future(_pump(reply.events, send, headers))
        finished, watch = await _race(pump, receive)
        if finished and watch is not None:  # the pump failed
            error = pump.exception()
            if isinstance(error, SimulatedDisconnect):
                await self._abort(send, receive, watch, graceful=True)
                return
            watch.cancel()
            assert error is not None
            raise error

    async def _abort(self, send: Send, receive: Receive, watch: asyncio.Future[None] | None, *, graceful: bool) -> None:
        """Kill the connection: close after what was written (cut stream) or reset it (drop)."""
        transport = _transport_of(send)
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
        waiter = watch if watch is not None else asyncio.ensure_future(_until_disconnect(receive))
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(waiter, ABORT_SETTLE_S)

    # -- other routes --------------------------------------------------------------------------------

    async def _models_route(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send_body(send, 200, _JSON, self._models)

    async def _health_route(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send_body(send, 200, _JSON, self._health)

    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send_body(send, 200, _PROMETHEUS, metrics_text(self.simulator).encode())

    async def _add_faults(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await _read_body(receive)
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
        await _send_json(send, 200, {"ok": True, "pending": self.simulator.faults.pending()})

    async def _clear_faults(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.simulator.clear_faults()
        await _send_json(send, 200, {"ok": True})

    async def _stats(self, scope: Scope, receive: Receive, send: Send) -> None:
        sim = self.simulator
        await _send_json(
            send,
            200,
            {
                **sim.stats.as_dict(),
                "profile": sim.profile.name,
                "pending_faults": sim.faults.pending(),
                "prefix_cache_entries": len(sim.cache),
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
        await _send_json(send, 200, out)

    async def _reset(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.simulator.reset()
        await _send_json(send, 200, {"ok": True})


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


def build_app(profile: Profile, *, seed: int = 0) -> SimulatorApp:
    """An ASGI app simulating `profile`; its `Simulator` is `app.simulator`."""
    return SimulatorApp(Simulator(profile, seed=seed))


def uvicorn_config(app: ASGIApp, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning") -> Any:
    """The uvicorn settings the simulator runs with: uvloop + httptools, keep-alive, no access log."""
    import uvicorn

    loop = "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop=loop,
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level=log_level,
        server_header=False,
        backlog=4096,
        timeout_keep_alive=30,
    )


def serve(host: str, port: int, profile: Profile, *, seed: int = 0, log_level: str = "warning") -> None:
    """Run the simulator on host:port until interrupted (blocking)."""
    import uvicorn

    uvicorn.Server(uvicorn_config(build_app(profile, seed=seed), host, port, log_level=log_level)).run()


class BackgroundServer:
    """The simulator on a free loopback port in a background thread, for tests and e2e checks.

    ``with BackgroundServer(profile) as srv: httpx.get(srv.url + "/health")``; `srv.simulator` is the
    live engine (read its stats; change it through the /_sim/ endpoints, which run on its loop).
    """

    def __init__(self, profile: Profile, *, seed: int = 0, host: str = "127.0.0.1") -> None:
        import uvicorn

        self.app = build_app(profile, seed=seed)
        self.simulator = self.app.simulator
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, 0))
        self.host = host
        self.port: int = self._socket.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self._server = uvicorn.Server(uvicorn_config(self.app, host, self.port))
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name=f"simulator-{self.port}", daemon=True
        )

    def start(self, timeout: float = 10.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"simulator server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self._socket.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
