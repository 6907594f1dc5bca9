"""Front end benchmark: the gateway's raw ASGI front end against the same handler on Starlette and FastAPI.

What is measured: one ``POST /v1/chat/completions`` handler, written three ways, each served by
uvicorn with httptools and uvloop (one process, pinned to its own CPU):

  raw        plain ASGI with the gateway's own helpers, as gateway/api/openai.py uses them:
             ``header_map``, ``check_json_content_type``, ``read_body``, ``DisconnectWatch``,
             ``send_bytes`` and ``http.response.body`` messages per upstream block
  starlette  a Starlette ``Route``: ``Request.body()``, ``Response`` / ``StreamingResponse``
  fastapi    a FastAPI ``@app.post`` route taking a ``Request``, same responses

Everything else is shared and identical: the bearer check, ``gateway.api.openai.parse_chat_body`` (the
real request validation), a request id, and one pooled aiohttp session to the same fake upstream
(/work/shared/bench/fake_upstream.py: raw asyncio, ~50k req/s, so it is not the limit). The
difference between the rows is therefore the cost of the framework layer only, not of the gateway's
routing, metering or state (bench/overhead.py measures those).

Load: ``wrk -t1`` (closed loop, bench/wrk_post.lua) with the non-stream body and the stream body
(35 SSE events, 7.5 KB, ``include_usage``) at each ``--conns``. wrk and the upstream run on CPU 0,
the server under test on CPU 1. Every repetition runs each cell for every front end in turn, the
order rotating between repetitions, so drift from other load on the machine hits all three alike.
Cells show median [min-max] over repetitions; "other CPU1 %" is busy time on the server's CPU that
the server did not use (someone else's load: treat such cells with suspicion).

  cd /work/wt-bench && PYTHONPATH=. /work/main/.venv/bin/python bench/frontends.py          # ~5 min
  ... bench/frontends.py --reps 3 --duration 4 --conns 1,64 --fronts raw,fastapi

Internal: ``bench/frontends.py --serve FRONT --port P --upstream-port U`` runs one server.
"""

# ruff: noqa: RUF001  (en dashes in the markdown output are intended)
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead import HERE, REPO, cell, cpu_busy, cpu_seconds, log  # type: ignore[import-not-found]

FRONTS = ("raw", "starlette", "fastapi")
AUTH = b"Bearer sk-bench"
SHARED_UPSTREAM = REPO.parent / "shared" / "bench" / "fake_upstream.py"  # the shared harness, beside the repo


# ------------------------------------------------------------------------------------------ the servers


class Upstream:
    """One pooled aiohttp session to the fake upstream (made on first use, in the server's loop)."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/v1/chat/completions"
        self.session: Any = None

    async def post(self, body: bytes) -> Any:
        import aiohttp

        if self.session is None:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=512, keepalive_timeout=60),
                headers={"Content-Type": "application/json", "Authorization": "Bearer upstream-key"},
                read_bufsize=1 << 16,
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return await self.session.post(self.url, data=body)


def raw_app(upstream: Upstream) -> Any:
    from gateway.api.openai import parse_chat_body
    from gateway.asgi import (
        CT_SSE,
        NO_CACHE,
        DisconnectWatch,
        check_json_content_type,
        header_map,
        new_request_id,
        read_body,
        send_bytes,
        send_error,
    )
    from gateway.errors import GatewayError, not_found

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] != "/v1/chat/completions" or scope["method"] != "POST":
            await send_error(send, not_found(scope["path"]))
            return
        rid = [(b"x-request-id", new_request_id().encode())]
        headers = header_map(scope)
        try:
            if headers.get(b"authorization") != AUTH:
                raise GatewayError(401, "bad key", code="invalid_api_key")
            check_json_content_type(headers)
            raw = await read_body(receive, headers, 1 << 22)
            body = parse_chat_body(raw)
        except GatewayError as exc:
            await send_error(send, exc, rid)
            return
        watch = DisconnectWatch(receive)
        resp = None
        try:
            resp = await upstream.post(raw)
            if not body.get("stream"):
                payload = await resp.read()
                watch.finish()
                await send_bytes(send, resp.status, payload, rid)
                return
            first = await resp.content.readany()
            await send({"type": "http.response.start", "status": resp.status, "headers": [CT_SSE, NO_CACHE, *rid]})
            if first:
                await send({"type": "http.response.body", "body": first, "more_body": True})
            async for block in resp.content.iter_any():
                await send({"type": "http.response.body", "body": block, "more_body": True})
            watch.finish()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:  # as gateway/api/openai.py: a client that went away is not an error
            if resp is not None:
                resp.close()
            if not watch.disconnected:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        finally:
            watch.finish()

    return app


def _framework_endpoint(upstream: Upstream) -> Any:
    """The same handler as ``raw_app`` in Starlette's request/response classes (FastAPI reuses them)."""
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse

    from gateway.api.openai import parse_chat_body
    from gateway.asgi import check_json_content_type, new_request_id
    from gateway.errors import GatewayError

    async def chat(request: Request) -> Response:
        rid = {"x-request-id": new_request_id()}
        try:
            if request.headers.get("authorization") != AUTH.decode():
                raise GatewayError(401, "bad key", code="invalid_api_key")
            ct = request.headers.get("content-type")
            check_json_content_type({} if ct is None else {b"content-type": ct.encode("latin-1")})
            raw = await request.body()
            body = parse_chat_body(raw)
        except GatewayError as exc:
            return Response(exc.body(), exc.status, {**rid, **dict(exc.headers)}, "application/json")
        resp = await upstream.post(raw)
        if not body.get("stream"):
            return Response(await resp.read(), resp.status, rid, "application/json")
        first = await resp.content.readany()

        async def relay() -> Any:
            try:
                if first:
                    yield first
                async for block in resp.content.iter_any():
                    yield block
            finally:  # a stream cut short (client gone) drops its upstream connection, as in raw_app
                if resp.content.at_eof():
                    resp.release()
                else:
                    resp.close()

        return StreamingResponse(relay(), resp.status, {**rid, "cache-control": "no-cache"}, "text/event-stream")

    return chat


def starlette_app(upstream: Upstream) -> Any:
    from starlette.applications import Starlette
    from starlette.routing import Route

    return Starlette(routes=[Route("/v1/chat/completions", _framework_endpoint(upstream), methods=["POST"])])


def fastapi_app(upstream: Upstream) -> Any:
    from fastapi import FastAPI, Request
    from fastapi.responses import Response

    chat = _framework_endpoint(upstream)
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    async def chat_completions(request: Request) -> Response:
        response: Response = await chat(request)
        return response

    # the annotations are strings here (``from __future__ import annotations``) naming local imports
    chat_completions.__annotations__ = {"request": Request, "return": Response}
    app.post("/v1/chat/completions")(chat_completions)
    return app


def serve(front: str, port: int, upstream_port: int) -> None:
    import uvicorn

    upstream = Upstream(upstream_port)
    app = {"raw": raw_app, "starlette": starlette_app, "fastapi": fastapi_app}[front](upstream)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level="warning",
        backlog=2048,
    )


# ----------------------------------------------------------------------------------------------- driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port} after {timeout} s")


def run_wrk(port: int, body: Path, conns: int, duration: int, cpu: int) -> dict[str, Any]:
    argv = ["taskset", "-c", str(cpu), "wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--latency", "--timeout", "10s"]
    argv += ["-s", str(HERE / "wrk_post.lua"), f"http://127.0.0.1:{port}/v1/chat/completions"]
    out = subprocess.run(
        argv, env={**os.environ, "WRK_BODY": str(body)}, capture_output=True, timeout=duration + 30, check=False
    ).stdout
    m = re.search(rb"^WRKJSON (.*)$", out, re.M)
    if m is None:
        raise SystemExit(f"wrk printed no WRKJSON line:\n{out.decode(errors='replace')}")
    w = json.loads(m.group(1))
    errors = sum(w["errors"].values())
    return {
        "rps": w["requests"] / (w["duration_us"] / 1e6),
        "requests": w["requests"],
        "p50_ms": w["lat_us"]["p50"] / 1000,
        "p99_ms": w["lat_us"]["p99"] / 1000,
        "errors": errors,
    }


def check(port: int, body: Path) -> None:
    """One request of each body: 200, and the stream ends with [DONE] (so every front end relays it whole)."""
    import http.client

    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("POST", "/v1/chat/completions", body.read_bytes(), {"Authorization": AUTH.decode()})
    r = c.getresponse()
    data = r.read()
    c.close()
    if r.status != 200 or (b'"stream": true' in body.read_bytes() and not data.rstrip().endswith(b"[DONE]")):
        raise SystemExit(f"port {port}: {r.status} {data[:200]!r}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5, help="repetitions (default 5)")
    p.add_argument("--duration", type=int, default=4, help="seconds per wrk cell (default 4)")
    p.add_argument("--warmup", type=int, default=2, help="seconds of warm-up per front end and body")
    p.add_argument("--conns", default="1,64", help="comma-separated connection counts (default 1,64)")
    p.add_argument("--fronts", default=",".join(FRONTS), help="which front ends (default all three)")
    p.add_argument("--bodies", default="nonstream,stream")
    p.add_argument("--upstream", type=Path, default=SHARED_UPSTREAM, help="the fake upstream script")
    p.add_argument("--client-cpu", type=int, default=0, help="CPU of wrk and the upstream (default 0)")
    p.add_argument("--server-cpu", type=int, default=1, help="CPU of the server under test (default 1)")
    p.add_argument("--json", type=Path, help="also write the raw cells here")
    p.add_argument("--serve", choices=FRONTS, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--upstream-port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.upstream_port)
        return

    fronts = args.fronts.split(",")
    conns = [int(c) for c in args.conns.split(",")]
    bodies = {b: HERE / "bodies" / f"{b}.json" for b in args.bodies.split(",")}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    ports: dict[str, int] = {}
    up_port = free_port()
    procs["upstream"] = subprocess.Popen(
        ["taskset", "-c", str(args.client_cpu), sys.executable, str(args.upstream), "--port", str(up_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    results: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    loads = [os.getloadavg()]
    try:
        wait_port(up_port)
        for front in fronts:
            ports[front] = free_port()
            argv = [sys.executable, __file__, "--serve", front, "--port", str(ports[front])]
            argv += ["--upstream-port", str(up_port)]
            procs[front] = subprocess.Popen(["taskset", "-c", str(args.server_cpu), *argv], env=env)
        for front in fronts:
            wait_port(ports[front])
            for body in bodies.values():
                check(ports[front], body)
                run_wrk(ports[front], body, 16, args.warmup, args.client_cpu)
        for rep in range(args.reps):
            order = fronts[rep % len(fronts) :] + fronts[: rep % len(fronts)]
            for name, body in bodies.items():
                for c in conns:
                    for front in order:
                        pid = procs[front].pid
                        cpu0, busy0 = cpu_seconds([pid]), cpu_busy()[args.server_cpu]
                        r = run_wrk(ports[front], body, c, args.duration, args.client_cpu)
                        cpu = cpu_seconds([pid]) - cpu0
                        busy = cpu_busy()[args.server_cpu] - busy0
                        r["cpu_us"] = cpu / max(r["requests"], 1) * 1e6
                        r["other_pct"] = max(0.0, busy - cpu) / args.duration * 100
                        results.setdefault((front, name, c), []).append(r)
                        log(f"rep {rep + 1} {front:9} {name:9} c={c:<3} {r['rps']:8,.0f}/s  {r['cpu_us']:5.0f} µs")
            loads.append(os.getloadavg())
    finally:
        for proc in reversed(procs.values()):  # the servers, stopped, before their upstream
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()

    import fastapi
    import starlette
    import uvicorn

    print(
        f"\nfrontends.py, {started}, {args.reps} reps x {args.duration:g} s per cell; uvicorn {uvicorn.__version__}, "
        f"starlette {starlette.__version__}, fastapi {fastapi.__version__}; load average during the run "
        + ", ".join(f"{la[0]:.2f}" for la in loads)
        + "\n"
    )
    print("| body | conns | front end | req/s | p50 ms | p99 ms | server CPU µs/req | other CPU1 % | errors |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for name in bodies:
        for c in conns:
            for front in fronts:
                rs = results.get((front, name, c), [])
                print(
                    f"| {name} | {c} | {front} | {cell([r['rps'] for r in rs], 0)} | "
                    f"{cell([r['p50_ms'] for r in rs], 2)} | {cell([r['p99_ms'] for r in rs], 2)} | "
                    f"{cell([r['cpu_us'] for r in rs], 0)} | {statistics.median([r['other_pct'] for r in rs]):.0f} | "
                    f"{sum(r['errors'] for r in rs)} |"
                )
    if "raw" in fronts:
        others = [f for f in fronts if f != "raw"]
        print(
            "\nraw ASGI against each framework (medians; req/s gain = raw / framework − 1, CPU = framework / raw − 1)\n"
        )
        print("| body | conns | " + " | ".join(f"req/s gain vs {f} | {f} CPU/req over raw" for f in others) + " |")
        print("|---|---:|" + "---:|---:|" * len(others))
        for name in bodies:
            for c in conns:
                raw = results[("raw", name, c)]
                cells = []
                for f in others:
                    fr = results[(f, name, c)]
                    rps = statistics.median(r["rps"] for r in raw) / statistics.median(r["rps"] for r in fr) - 1
                    cpu = statistics.median(r["cpu_us"] for r in fr) / statistics.median(r["cpu_us"] for r in raw) - 1
                    cells += [f"{rps * 100:+.1f} %", f"{cpu * 100:+.1f} %"]
                print(f"| {name} | {c} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({f"{k[0]}/{k[1]}/{k[2]}": v for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
