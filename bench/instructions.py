#!/usr/bin/env python3
"""Instructions per request of each endpoint, counted by callgrind: a number the guest's drift
does not move.

Wall time on a shared 2-vCPU guest wanders by 5-10 % between runs of the same code; callgrind's
instruction count of the same work agrees within ~0.2 %. The gateway's ASGI app is called in-process
(no uvicorn, no sockets on the client side) by 16 concurrent tasks, against the shared harness's
``fake_upstream.py`` over loopback HTTP (the real aiohttp upstream client); the bench tenant's config
is ``overhead.py``'s. Per request = (Ir at ``--high`` requests - Ir at ``--low``) / (high - low), so
start-up cancels out. What it leaves out — uvicorn, httptools and the kernel — is the same for every
endpoint, so differences between rows are the endpoints' own; ratios overstate end-to-end ones.

  .venv/bin/python bench/instructions.py                       # every endpoint, stream and not
  .venv/bin/python bench/instructions.py --cases chat,responses --low 400 --high 1200
  .venv/bin/python bench/instructions.py --cases chat --pool   # the upstream behind a pool of 3 keys
  .venv/bin/python bench/instructions.py --cases "chat,chat stream" --access-log off,on   # the access log's cost

Needs ``valgrind`` on the PATH. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BODIES = HERE / "bodies"
CASES: dict[str, tuple[str, Path]] = {
    "chat": ("/v1/chat/completions", BODIES / "nonstream.json"),
    "chat stream": ("/v1/chat/completions", BODIES / "stream.json"),
    "responses": ("/v1/responses", BODIES / "endpoints" / "responses-nonstream.json"),
    "responses stream": ("/v1/responses", BODIES / "endpoints" / "responses-stream.json"),
    "messages": ("/v1/messages", BODIES / "endpoints" / "messages-nonstream.json"),
    "messages stream": ("/v1/messages", BODIES / "endpoints" / "messages-stream.json"),
}
BASE = {"responses": "chat", "responses stream": "chat stream"}
BASE |= {"messages": "chat", "messages stream": "chat stream"}


POOL = "    key_selection: cache_aware\n    api_keys:\n" + "".join(
    f"      - {{env: BENCH_POOL_{k}, label: {k.lower()}}}\n" for k in "ABC"
)


def with_pool(config: Path) -> None:
    """The bench upstream behind a pool of three keys (memory state), each key's variable set."""
    config.write_text(config.read_text() + POOL)
    for k in "ABC":
        os.environ[f"BENCH_POOL_{k}"] = f"sk-bench-pool-{k.lower()}"


def drive(case: str, n: int, upstream_port: int, pool: bool = False, access: bool = False) -> None:
    """The measured process: ``n`` requests of ``case`` through the app, 16 at a time."""
    sys.path.insert(0, str(HERE))
    from overhead import KEY, write_config  # type: ignore[import-not-found]

    from gateway.app import GatewayApp
    from gateway.wiring import load_all

    path, body_file = CASES[case]
    body = body_file.read_bytes()
    config = write_config(Path(tempfile.mkdtemp()), 1, upstream_port, True, access=access)
    if pool:
        with_pool(config)
    auth = (b"x-api-key", KEY.encode()) if path == "/v1/messages" else (b"authorization", b"Bearer " + KEY.encode())
    headers = [auth, (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]

    async def main() -> None:
        app = GatewayApp(load_all(config))
        await app.startup()

        async def one() -> None:
            scope = {"type": "http", "method": "POST", "path": path, "headers": headers, "query_string": b""}
            pending = [{"type": "http.request", "body": body, "more_body": False}]

            async def receive() -> dict[str, object]:
                if pending:
                    return pending.pop()
                await asyncio.Event().wait()  # the client never goes away
                raise AssertionError

            statuses: list[int] = []

            async def send(message: dict[str, object]) -> None:
                if message["type"] == "http.response.start":
                    statuses.append(message["status"])  # type: ignore[arg-type]

            await app(scope, receive, send)
            if statuses != [200]:
                raise SystemExit(f"{case}: status {statuses}")

        async def worker(k: int) -> None:
            for _ in range(k):
                await one()

        await asyncio.gather(*(worker(n // 16) for _ in range(16)))
        await app.shutdown()

    asyncio.run(main())


def count(python: str, case: str, n: int, port: int, pool: bool = False, access: bool = False) -> int:
    """Instructions of a whole driver run of ``n`` requests."""
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [
                *("valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/cg.out", python, __file__),
                *("--drive", case, "--n", str(n), "--port", str(port)),
                *(("--pool",) if pool else ()),
                *(["--access"] if access else []),
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            check=False,
        )
    found = re.search(r"Collected : (\d+)", out.stderr)
    if out.returncode or found is None:
        raise SystemExit(f"{case}: callgrind run failed:\n{out.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--python", default=str(REPO / ".venv" / "bin" / "python"))
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--low", type=int, default=400)
    ap.add_argument("--high", type=int, default=1200)
    ap.add_argument("--port", type=int, default=19555)
    ap.add_argument("--pool", action="store_true", help="the upstream behind a pool of three keys")
    ap.add_argument("--drive", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--access", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--access-log", default="off", help="off, on (log_level info: one JSON line a request) or off,on")
    args = ap.parse_args()
    if args.drive:
        drive(args.drive, args.n, args.port, args.pool, args.access)
        return
    logs = [m.strip() for m in args.access_log.split(",") if m.strip()]
    if not logs or set(logs) - {"off", "on"}:
        raise SystemExit("--access-log takes off and/or on")
    fake = REPO.parent / "shared" / "bench" / "fake_upstream.py"
    upstream = subprocess.Popen([args.python, str(fake), "--port", str(args.port)], stdout=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        per: dict[str, int] = {}
        logged: dict[str, int] = {}  # the same cases with the access log on, when both were asked for
        for case in args.cases.split(","):
            for mode in logs:
                on = mode == "on"
                high = count(args.python, case, args.high, args.port, args.pool, on)
                low = count(args.python, case, args.low, args.port, args.pool, on)
                ir = (high - low) // (args.high - args.low)
                (logged if on and len(logs) > 1 else per)[case] = ir
                print(f"{case} (access log {mode}): {ir:,}", file=sys.stderr)
    finally:
        upstream.terminate()
    if logged:
        print("| case | access log off | on | added |\n| --- | ---: | ---: | ---: |")
        for case, ir in per.items():
            print(
                f"| {case} | {ir / 1000:,.1f}k | {logged[case] / 1000:,.1f}k | {(logged[case] / ir - 1) * 100:+.2f} % |"
            )
        return
    print("| case | instructions per request | vs chat/completions |\n| --- | ---: | ---: |")
    for case, ir in per.items():
        base = per.get(BASE.get(case, ""))
        change = f"{(ir / base - 1) * 100:+.1f} %" if base else ""
        print(f"| {case} | {ir / 1000:,.0f}k | {change} |")


if __name__ == "__main__":
    main()
