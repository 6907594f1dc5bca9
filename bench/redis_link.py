"""Redis link benchmark: the gateway's auto-pipelined connection against plain pooled redis-py.

What is measured: the Redis work of one metered, rate-limited gateway request, issued through the
gateway's real state classes (``RedisRateLimitState``, ``RedisBudgetState``), one call after the
other as a request makes them:

  1. ``hit``     the rate-limit script for two limits (requests and tokens per minute)
  2. ``reserve`` the budget reservation script for two counters (daily and monthly)
  3. ``settle``  the settlement script
  4. ``adjust``  the token-limit correction script

by ``--conc`` concurrent "requests" (tasks, each looping until the cell's time is up), through two
links with the same ``call``/``run`` interface:

  pipelined  gateway.state.redis_link.RedisLink: one connection, concurrent calls batched
  pool       redis.asyncio ``Redis`` on a ``BlockingConnectionPool`` of ``--pool-size`` connections
             (default 256: no call waits for a connection) with RedisLink's own pool settings
             (0.25 s socket timeouts, one retry on a connection error, health checks),
             ``execute_command``/``evalsha`` per call, NOSCRIPT handled the same way

With ``--cluster-url`` a third link joins, ``cluster``: the same pipelined calls through
``gateway.state.redis_cluster.ClusterLink`` (redis-py's ``RedisCluster`` pipeline) against a Redis
Cluster, to show what the cluster costs against one server. The counters of a request share one
hash slot (their families' tags), so each batch goes to one master, as in the gateway. A 3-master
cluster on loopback for it (ports 7101-7103):

  for p in 7101 7102 7103; do mkdir -p /tmp/rc/$p; (cd /tmp/rc/$p && redis-server --port $p \
    --cluster-enabled yes --cluster-config-file nodes.conf --save '' --appendonly no --daemonize yes); done
  redis-cli --cluster create 127.0.0.1:7101 127.0.0.1:7102 127.0.0.1:7103 --cluster-yes
  ... bench/redis_link.py --conc 1,64 --cluster-url redis+cluster://127.0.0.1:7101

Limits and caps are far too high to bite, so every request does the same work. Reported per cell:
requests/s (4 Redis calls each), the benchmark process's CPU µs per request (``time.process_time``:
the client side, which is what the gateway pays; Redis itself runs elsewhere) and request latency.
Each repetition runs every cell for both links, the order alternating, on uvloop, in this one
process (pinned to ``--cpu`` when given). Keys live under ``bench-redis-<pid>-<random>:`` and are
deleted at the end (they also expire by themselves).

  cd /work/wt-bench && PYTHONPATH=. /work/main/.venv/bin/python bench/redis_link.py        # ~2 min
  ... bench/redis_link.py --reps 3 --duration 3 --conc 1,64,256 --url redis://127.0.0.1:6379/0

It also times the link's hand-written RESP packer (``redis_link.pack``) against redis-py's
``Connection.pack_commands`` on three typical state commands, in-process (``timeit``, interleaved).
"""

# ruff: noqa: RUF001  (en dashes in the markdown output are intended)
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from gateway.state.base import Limit, RateLimit
from gateway.state.redis import RedisBudgetState, RedisRateLimitState
from gateway.state.redis_cluster import ClusterLink
from gateway.state.redis_link import RedisLink, RedisSettings, Script, connection_pool

sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead import cell  # type: ignore[import-not-found]

BIG = 10**15


class PoolLink:
    """RedisLink's interface on plain redis-py: every call takes a connection from a pool."""

    def __init__(self, settings: RedisSettings, size: int) -> None:
        self.settings = settings
        # RedisLink's own pool settings, sized for the concurrency (the wait for a free connection
        # never ends a call at the default size)
        pool = connection_pool(settings, max_connections=size, wait_s=5)
        self.client = Redis(connection_pool=pool)

    async def call(self, *args: Any) -> Any:
        return await self.client.execute_command(*args)

    async def run(self, s: Script, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self.client.evalsha(s.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.client.script_load(s.source)
            return await self.client.evalsha(s.sha, len(keys), *keys, *args)

    async def close(self) -> None:
        await self.client.aclose()


class Workload:
    def __init__(self, link: Any) -> None:
        self.rate = RedisRateLimitState(link)
        self.budget = RedisBudgetState(link, reservation_ttl_s=600)
        self.rate_limits = [
            RateLimit("rate:tenant=bench:rpm", BIG, 60, 1),
            RateLimit("rate:tenant=bench:tpm", BIG, 60, 500),
        ]
        self.budget_limits = [
            Limit("budget:tenant=bench:day", BIG, 2 * 86400),
            Limit("budget:tenant=bench:month", BIG, 40 * 86400),
        ]
        self.n = 0

    async def request(self, tag: str) -> None:
        self.n += 1
        rid = f"{tag}-{self.n}"
        now = time.time()
        ok, counts = await self.rate.hit(self.rate_limits, now)
        assert ok
        assert await self.budget.reserve(rid, self.budget_limits, 1_000_000) is None
        await self.budget.settle(rid, 900_000)
        await self.rate.adjust(self.rate_limits[1].key, 60, counts[1].window, -100)


async def run_cell(work: Workload, tag: str, conc: int, duration: float) -> dict[str, float]:
    latencies: list[float] = []
    stop = time.perf_counter() + duration

    async def worker() -> None:
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            await work.request(tag)
            latencies.append(time.perf_counter() - t0)

    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conc)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    latencies.sort()
    n = len(latencies)
    return {
        "rps": n / wall,
        "cpu_us": cpu / n * 1e6,
        "p50_ms": latencies[n // 2] * 1000,
        "p99_ms": latencies[min(n - 1, int(n * 0.99))] * 1000,
    }


def pack_us(reps: int, number: int = 20000) -> dict[str, list[float]]:
    """µs per command of ``redis_link.pack`` and of redis-py's ``Connection.pack_commands`` on typical
    state calls (a budget EVALSHA of 14 arguments, an affinity MGET, a 600-byte SET), interleaved."""
    import timeit

    from redis.asyncio.connection import Connection

    from gateway.state.redis_link import pack

    ns = "bench-ns"
    commands: list[tuple[Any, ...]] = [
        ("EVALSHA", "a" * 40, 6, f"{ns}:reservation:req_1", f"{ns}:reservations", f"{ns}:budget:day",
         f"{ns}:budget:day:open", f"{ns}:budget:month", f"{ns}:budget:month:open", "req_1", "1000000",
         1733300000000, 600000),
        ("MGET", f"{ns}:kv:affinity:" + "f" * 32, f"{ns}:kv:affinity:" + "e" * 32),
        ("SET", f"{ns}:kv:reasoning:" + "d" * 32, b"x" * 600, "PX", 3600000),
    ]  # fmt: skip
    conn = Connection()
    fns = {"pack": lambda: pack(commands), "redis-py": lambda: conn.pack_commands(commands)}
    out: dict[str, list[float]] = {}
    for rep in range(reps):
        for name in fns if rep % 2 == 0 else list(fns)[::-1]:
            t = min(timeit.repeat(fns[name], number=number, repeat=3))
            out.setdefault(name, []).append(t / number / len(commands) * 1e6)
    return out


async def main_async(args: argparse.Namespace) -> None:
    ns = f"bench-redis-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    settings = RedisSettings(args.url, ns)
    links: dict[str, Any] = {"pipelined": RedisLink(settings), "pool": PoolLink(settings, args.pool_size)}
    if args.cluster_url:
        links["cluster"] = ClusterLink(RedisSettings(args.cluster_url, ns))
    works = {name: Workload(link) for name, link in links.items()}
    concs = [int(c) for c in args.conc.split(",")]
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    loads = [os.getloadavg()]
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    try:
        for name, work in works.items():  # scripts loaded, connections made
            await run_cell(work, name, 64, args.warmup)
        names = list(works)
        for rep in range(args.reps):
            for conc in concs:
                for name in names if rep % 2 == 0 else names[::-1]:
                    r = await run_cell(works[name], name, conc, args.duration)
                    results.setdefault((name, conc), []).append(r)
                    print(
                        f"{time.strftime('%H:%M:%S')} rep {rep + 1} {name:9} c={conc:<3} "
                        f"{r['rps']:8,.0f}/s {r['cpu_us']:6.0f} µs",
                        flush=True,
                    )
            loads.append(os.getloadavg())
    finally:
        for name in ("pool", "cluster") if args.cluster_url else ("pool",):
            client = links[name].client
            keys = [k async for k in client.scan_iter(match=ns + ":*", count=1000)]
            for key in keys:
                await client.delete(key)
        for link in links.values():
            await link.close()

    import redis

    print(
        f"\nredis_link.py, {started}, {args.reps} reps x {args.duration:g} s per cell, redis-py {redis.__version__}, "
        f"{args.url}; 4 Redis calls (scripts) per request; load average during the run "
        + ", ".join(f"{la[0]:.2f}" for la in loads)
        + "\n"
    )
    print("| conc | link | requests/s | client CPU µs/request | p50 ms | p99 ms |")
    print("|---:|---|---:|---:|---:|---:|")
    for conc in concs:
        for name in works:
            rs = results[(name, conc)]
            print(
                f"| {conc} | {name} | {cell([r['rps'] for r in rs], 0)} | {cell([r['cpu_us'] for r in rs], 0)} | "
                f"{cell([r['p50_ms'] for r in rs], 2)} | {cell([r['p99_ms'] for r in rs], 2)} |"
            )
    print("\npipelined against pool (medians; gain = pipelined / pool − 1, CPU = pool / pipelined − 1)\n")
    print("| conc | requests/s gain | pool CPU/request over pipelined |")
    print("|---:|---:|---:|")
    for conc in concs:
        p, q = results[("pipelined", conc)], results[("pool", conc)]
        gain = statistics.median(r["rps"] for r in p) / statistics.median(r["rps"] for r in q) - 1
        cpu = statistics.median(r["cpu_us"] for r in q) / statistics.median(r["cpu_us"] for r in p) - 1
        print(f"| {conc} | {gain * 100:+.1f} % | {cpu * 100:+.1f} % |")
    if "cluster" in works:
        print("\ncluster against one server, both pipelined (medians)\n")
        print("| conc | cluster requests/s over one server | cluster CPU/request over one server |")
        print("|---:|---:|---:|")
        for conc in concs:
            p, c = results[("pipelined", conc)], results[("cluster", conc)]
            gain = statistics.median(r["rps"] for r in c) / statistics.median(r["rps"] for r in p) - 1
            cpu = statistics.median(r["cpu_us"] for r in c) / statistics.median(r["cpu_us"] for r in p) - 1
            print(f"| {conc} | {gain * 100:+.1f} % | {cpu * 100:+.1f} % |")


def print_pack(reps: int) -> None:
    out = pack_us(reps)
    print("\nRESP packing, µs per command (EVALSHA of 14 arguments, MGET of 2 keys, 600-byte SET)\n")
    print("| packer | µs per command |")
    print("|---|---:|")
    for name, vals in out.items():
        print(f"| {name} | {cell(vals, 2)} |")
    gain = statistics.median(out["redis-py"]) / statistics.median(out["pack"]) - 1
    print(f"\nredis-py's packer takes {gain + 1:.1f} times as long as pack.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5, help="repetitions (default 5)")
    p.add_argument("--duration", type=float, default=3.0, help="seconds per cell (default 3)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per link (default 1)")
    p.add_argument("--conc", default="1,64,256", help="concurrent requests, comma-separated (default 1,64,256)")
    p.add_argument("--url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--cluster-url", help="also measure the cluster link against this Redis Cluster")
    p.add_argument("--pool-size", type=int, default=256, help="connections of the pool variant (default 256)")
    p.add_argument("--cpu", type=int, help="pin this process to that CPU")
    args = p.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    import uvloop

    uvloop.run(main_async(args))
    print_pack(args.reps)


if __name__ == "__main__":
    main()
