"""Run the simulator's ASGI app under uvicorn: in the foreground (``python -m simulator``) or on a
free loopback port in a background thread (tests, e2e checks).

Split from the app (`server.py`): how a process hosts the app (event loop, HTTP parser, sockets,
threads) is separate from what the app answers.
"""

from __future__ import annotations

import importlib.util
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.asgi import Receive, Scope, Send

from .profiles import Profile
from .server import build_app

ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


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


def serve(
    host: str,
    port: int,
    profile: Profile,
    *,
    seed: int = 0,
    log_level: str = "warning",
    request_log: str | None = None,
) -> None:
    """Run the simulator on host:port until interrupted (blocking)."""
    import uvicorn

    app = build_app(profile, seed=seed, request_log=request_log)
    uvicorn.Server(uvicorn_config(app, host, port, log_level=log_level)).run()


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
