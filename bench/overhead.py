#!/usr/bin/env python3
"""kimi-gateway overhead benchmark: what one gateway hop costs against a zero-latency upstream.

Stdlib only (plus `wrk` and `taskset` on PATH); the simulator and the gateway run with the venv's Python.

Pinning, as in the shared peer harness (/work/shared/bench): this script, `wrk`, its own TTFB client and
the upstream simulator (`python -m simulator --profile instant`) run on CPU 0; the gateway runs
alone on CPU 1. Every run measures, in this order:

  direct   client -> simulator (no gateway): the baseline for "added" latency
  gateway  client -> kimi-gateway -> simulator, for each --gateway-src

and for each path: wrk (non-stream and stream bodies, one thread, closed loop at --conc connections,
--duration seconds per cell), a stream TTFB run at 1 connection (raw-socket client; TTFB = request
written -> first SSE `data:` chunk decoded), and for the gateway: CPU µs per request from /proc deltas,
peak RSS (VmHWM), cold start (spawn -> first 200 on POST /v1/chat/completions, --cold-starts spawns),
an end-to-end check of what survives (reasoning_content, include_usage chunk, [DONE], turbo model) and
the number of ledger rows the run wrote (metering is on whenever the gateway's config has a ledger).

Several --gateway-src give a before/after comparison in one run (e.g. a `git worktree` of an older
commit); each gateway runs with PYTHONPATH=<src> in front, and the module path that actually ran is
checked and printed. With --repeats N the paths alternate order between repetitions and every cell
shows median [min-max].

  .venv/bin/python bench/overhead.py                                   # current tree, ~2 min
  .venv/bin/python bench/overhead.py --gateway-src now=/work/main --gateway-src premeter=/tmp/gw-premeter
  .venv/bin/python bench/overhead.py --duration 10 --conc 1,16,64,128 --repeats 3
  .venv/bin/python bench/overhead.py --states memory,redis --repeats 3     # state backends side by side

--journal off,on runs every gateway with the ledger's crash journal off and on (labels get
/journal-off, /journal-on): what the journal costs, the rest of the code the same.

--access-log off,on runs every gateway with the access log off (log_level: warning, the default here)
and on (log_level: info; labels get /log-off, /log-on); its lines go to the gateway's log file.

--states runs every gateway once per state backend (labels get /memory, /redis). With more than the
default `memory`, the bench tenant also gets a budget and RPM/TPM limits too high to bite, so that every
request reserves, settles and counts in the backend: the comparison is what the backend costs, not what
the limits cost. --redis-url (default redis://127.0.0.1:6379/0) names the Redis; keys live under a
namespace of their own per run and expire by themselves.

Writes <out>/run.json and <out>/summary.md (default bench/results/<stamp>/, git-ignored) and prints the
markdown tables.
"""

# ruff: noqa: RUF001, RUF002  (en dashes and minus signs in the markdown output are intended)
from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import re
import resource
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
KEY = "sk-bench"
TICK = os.sysconf("SC_CLK_TCK")
MODELS = ("kimi-k2-thinking", "kimi-k2-thinking-turbo")
TARGETS = {  # the gateway's performance targets (one core, zero-latency upstream)
    "nonstream_rps_64": 2500,
    "added_p50_ms_1": 0.6,
    "stream_rps_64": 1500,
    "added_ttfb_p50_ms_1": 0.6,
    "peak_rss_mb": 120,
    "cold_start_s": 1.5,
}


def log(*a: object) -> None:
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "PYTHONPATH"}
    env.update(NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", **extra)
    return env


# ------------------------------------------------------------------------------------------- /proc
def tree(pid: int) -> list[int]:
    """pid and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICK  # utime + stime
        except (OSError, IndexError, ValueError):
            pass
    return total


def status_kb(pids: list[int], field: str) -> int:
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def cpu_busy() -> dict[int, float]:
    """Busy seconds per CPU since boot (everything but idle and iowait), from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            m = re.match(r"cpu(\d+) (.*)", line)
            if m:
                v = [int(x) for x in m.group(2).split()]
                out[int(m.group(1))] = (sum(v[:8]) - v[3] - v[4]) / TICK  # minus idle, iowait; guest is in user
    return out


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ------------------------------------------------------------------------------------------- processes
class Proc:
    """A process this script started; stop() signals only its PID (and descendants it recorded)."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str], cwd: Path) -> None:
        self.name = name
        self.log_path = log_path
        self.logfile = open(log_path, "wb")  # noqa: SIM115
        self.t_spawn = time.perf_counter()
        self.proc = subprocess.Popen(argv, stdout=self.logfile, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        self.known = {self.proc.pid}

    def pids(self) -> list[int]:
        if self.proc.poll() is not None:
            return []
        found = tree(self.proc.pid)
        self.known.update(found)
        return found

    def stop(self, grace: float = 15) -> None:
        self.pids()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                log(f"{self.name}: no exit after SIGTERM, SIGKILL")
                self.proc.kill()
                self.proc.wait()
        for pid in self.known - {self.proc.pid}:  # leftovers of ours (workers), by PID
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.logfile.close()


def taskset(cpu: int, argv: list[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *argv]


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def post_ok(port: int, body: bytes) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=body,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
        )
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status == 200 and b'"choices"' in data
    except (OSError, http.client.HTTPException):
        return False


def wait_ready(proc: Proc, port: int, body: bytes, limit_s: float) -> float | None:
    """Seconds from spawn to the first 200 on POST; None if it died or timed out."""
    while time.perf_counter() - proc.t_spawn < limit_s:
        if proc.proc.poll() is not None:
            return None
        if post_ok(port, body):
            return time.perf_counter() - proc.t_spawn
        time.sleep(0.005)
    return None


# ------------------------------------------------------------------------------------------- gateway setup
def git_desc(src: Path) -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        diff = subprocess.run(
            ["git", "-C", str(src), "diff", "HEAD", "--", "gateway"], capture_output=True, timeout=30
        ).stdout
        if not rev:
            return "?"
        # uncommitted changes to gateway/ (others edit in parallel): name them by a hash of the diff
        return rev + (f"+dirty:{hashlib.sha1(diff).hexdigest()[:8]}" if diff else "")
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def has_metering(src: Path) -> bool:
    """Whether this checkout's config knows a ledger (metering landed with it)."""
    try:
        return "class LedgerConfig" in (src / "gateway" / "config.py").read_text()
    except OSError:
        return False


def write_config(
    d: Path,
    port: int,
    upstream_port: int,
    metering: bool,
    state: str = "",
    limits: bool = False,
    access: bool = False,
    journal: bool = True,
) -> Path:
    """Same shape as bench/gateway_peer.sh; the pre-metering config schema has no prices/ledger keys.
    ``state`` is a config ``state:`` line; ``limits`` gives the tenant a budget and rate limits that
    never bite, so each request goes through the state backend. ``access`` runs at ``log_level: info``,
    which turns the access log on (one JSON line per request); the default ``warning`` has it off."""
    (d / "policies").mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    (d / "policies" / "bench.yaml").write_text(
        f"tenant: bench\nkeys:\n  - sha256:{digest}\nmodels:\n"
        + "".join(f"  {m}:\n    candidates: [bench-upstream/{m}]\n" for m in MODELS)
        + ("budget: {daily_usd: 1000000}\nrate_limits: {rpm: 1000000000, tpm: 1000000000000}\n" if limits else "")
    )
    level = "info" if access else "warning"
    text = f"listen: {{host: 127.0.0.1, port: {port}}}\nlog_level: {level}\npolicies_dir: policies\n{state}"
    if metering:
        (d / "prices.yaml").write_text(
            "currency: USD\nprices:\n"
            + "".join(
                f'  - {{target: bench-upstream/{m}, effective_from: 2025-01-01, input_miss: "0.60", '
                f'input_hit: "0.15", output: "2.50"}}\n'
                for m in MODELS
            )
        )
        # journal: the ledger's crash journal (on by default); off only to measure what it costs
        off = "" if journal else ", journal: false"
        text += f'policy_files: [bench.yaml]\nprices: prices.yaml\nledger: {{url: "sqlite:///{d}/ledger.db"{off}}}\n'
    text += (
        f"upstreams:\n  bench-upstream:\n    kind: openai\n    base_url: http://127.0.0.1:{upstream_port}/v1\n"
        f"    models: [{', '.join(MODELS)}]\n"
    )
    path = d / "gateway.yaml"
    path.write_text(text)
    return path


class Gateway:
    def __init__(
        self,
        label: str,
        src: Path,
        python: str,
        state: str = "",
        limits: bool = False,
        access: bool = False,
        journal: bool = True,
    ) -> None:
        self.label, self.src, self.python = label, src, python
        self.state, self.limits, self.access, self.journal = state, limits, access, journal
        self.rev = git_desc(src)
        self.metering = has_metering(src)
        exe = Path(python).parent / "kimi-gateway"
        self.cmd = [str(exe)] if exe.exists() else [python, "-m", "gateway.cli"]
        self.env = clean_env(PYTHONPATH=str(src))
        self.module_file: str | None = None

    def probe(self, cwd: Path) -> str:
        """The gateway package file this interpreter + environment imports (the code that runs)."""
        p = subprocess.run(
            [self.python, "-c", "import gateway; print(gateway.__file__)"],
            capture_output=True,
            text=True,
            timeout=60,
            env=self.env,
            cwd=cwd,
        )
        return p.stdout.strip() or p.stderr.strip()[-300:]

    def spawn(self, args: argparse.Namespace, d: Path, port: int) -> Proc:
        config = write_config(d, port, args.sim_port, self.metering, self.state, self.limits, self.access, self.journal)
        argv = [*self.cmd, "serve", "--config", str(config), "--port", str(port), "--host", "127.0.0.1"]
        return Proc(self.label, taskset(args.gateway_cpu, argv), d / "gateway.log", self.env, d)


# ------------------------------------------------------------------------------------------- load tools
def wrk(
    args: argparse.Namespace,
    port: int,
    mode: str,
    conc: int,
    duration: float,
    path: str = "/v1/chat/completions",
    body: Path | None = None,
) -> dict | None:
    env = clean_env(WRK_BODY=str(body or args.bodies / f"{mode}.json"), WRK_KEY=KEY)
    duration = max(1, round(duration))  # wrk takes whole seconds
    argv = taskset(
        args.client_cpu,
        [
            "wrk",
            "-t1",
            f"-c{conc}",
            f"-d{duration}s",
            "--timeout",
            "10s",
            "--latency",
            "-s",
            str(HERE / "wrk_post.lua"),
            f"http://127.0.0.1:{port}{path}",
        ],
    )
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        out, err = proc.communicate(timeout=duration + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        log("wrk timed out")
    m = re.search(rb"^WRKJSON (.*)$", out, re.M)
    if not m:
        log("wrk failed:", (out + err).decode(errors="replace").strip()[-300:])
        return None
    r = json.loads(m.group(1))
    secs = r["duration_us"] / 1e6
    return {
        "requests": r["requests"],
        "rps": r["requests"] / secs,
        "errors": sum(r["errors"].values()),
        "error_detail": r["errors"],
        "lat_ms": {k: v / 1000 for k, v in r["lat_us"].items()},
    }


def read_response(sock: socket.socket) -> tuple[int, float | None, bool]:
    """One HTTP/1.1 response: (status, time of the first SSE `data:` chunk or first body byte, keep-alive)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = sock.recv(65536)
        if not d:
            raise ConnectionError("closed before headers")
        buf += d
    head, _, data = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers[k.strip().lower()] = v.strip().lower()
    keep = headers.get(b"connection") != b"close"
    first = None
    if headers.get(b"transfer-encoding") == b"chunked":
        pos = 0
        while True:
            nl = data.find(b"\r\n", pos)
            if nl >= 0:
                size = int(data[pos:nl].split(b";")[0], 16)
                end = nl + 2 + size + 2
                if len(data) >= end:
                    if size == 0:
                        return status, first, keep
                    if first is None and b"data:" in data[nl + 2 : nl + 2 + size]:
                        first = time.perf_counter()
                    pos = end
                    continue
            d = sock.recv(65536)
            if not d:
                raise ConnectionError("closed mid-body")
            data += d
    length = int(headers.get(b"content-length", b"0"))
    if data:
        first = time.perf_counter()
    while len(data) < length:
        d = sock.recv(65536)
        if not d:
            raise ConnectionError("closed mid-body")
        if first is None:
            first = time.perf_counter()
        data += d
    return status, first, keep


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def ttfb_run(args: argparse.Namespace, port: int, mode: str, duration: float, warmup: float) -> dict:
    """Closed loop on one keep-alive connection from this (CPU 0-pinned) process."""
    body = (args.bodies / f"{mode}.json").read_bytes()
    req = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body

    def connect() -> socket.socket:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    sock = connect()
    ttfb, total, errors, sent = [], [], 0, 0
    t_start = time.perf_counter() + warmup
    deadline = t_start + duration
    while True:
        t0 = time.perf_counter()
        if t0 >= deadline:
            break
        try:
            sock.sendall(req)
            status, first, keep = read_response(sock)
        except (OSError, ValueError):
            errors += 1
            sock.close()
            sock = connect()
            continue
        t1 = time.perf_counter()
        sent += 1
        if t0 < t_start:
            continue
        if status != 200 or first is None:
            errors += 1
        else:
            ttfb.append((first - t0) * 1000)
            total.append((t1 - t0) * 1000)
        if not keep:
            sock.close()
            sock = connect()
    sock.close()
    return {
        "requests": len(total),
        "requests_all": sent,  # warm-up included: the CPU window covers it too
        "rps": len(total) / duration,
        "errors": errors,
        "ttfb_ms": {f"p{q}": pct(ttfb, q) for q in (50, 90, 99)},
        "total_ms": {f"p{q}": pct(total, q) for q in (50, 90, 99)},
    }


def measured(fn, gw: Proc | None, sim: Proc, *a) -> dict | None:  # type: ignore[no-untyped-def]
    """Run one load; attach gateway CPU % and µs/request, and CPU 0's (client + upstream) busy %."""
    g0 = cpu_seconds(gw.pids()) if gw else 0.0
    b0 = cpu_busy()
    u0, c0, s0, t0 = cpu_seconds(sim.pids()), children_cpu(), self_cpu(), time.monotonic()
    res = fn(*a)
    wall = time.monotonic() - t0
    g1 = cpu_seconds(gw.pids()) if gw else 0.0
    u1, c1, s1 = cpu_seconds(sim.pids()), children_cpu(), self_cpu()
    b1 = cpu_busy()
    if res is not None:
        ours0 = (u1 - u0) + (c1 - c0) + (s1 - s0)
        res["cpu0_pct"] = 100 * ours0 / wall
        res["upstream_cpu_pct"] = 100 * (u1 - u0) / wall
        # busy time of anything else on the machine (other users' processes, kernel threads): noise
        busy = sum(b1[c] - b0.get(c, 0) for c in b1)
        res["other_cpu_pct"] = max(0.0, 100 * (busy - ours0 - (g1 - g0)) / wall)
        if gw:
            res["gw_cpu_pct"] = 100 * (g1 - g0) / wall
            # requests wrk counted in its window; the gateway CPU window also holds wrk's start/stop
            n = res.get("requests_all", res["requests"])
            res["gw_cpu_us_per_req"] = 1e6 * (g1 - g0) / n if n else None
    return res


# ------------------------------------------------------------------------------------------- check
def check(port: int) -> dict:
    """What survives end to end: reasoning_content, content, include_usage chunk, [DONE], turbo, /v1/models."""
    out: dict = {}

    def call(method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request(
            method,
            path,
            body=json.dumps(body) if body is not None else None,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
        )
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, data

    msgs = [{"role": "user", "content": "Why is the sky blue?"}]
    try:
        status, data = call("POST", "/v1/chat/completions", {"model": MODELS[0], "messages": msgs})
        msg = json.loads(data)["choices"][0]["message"] if status == 200 else {}
        out["nonstream"] = {
            "status": status,
            "reasoning_content": bool(msg.get("reasoning_content")),
            "content": bool(msg.get("content")),
            "usage": status == 200 and "usage" in json.loads(data),
        }
        for model, usage in ((MODELS[0], True), (MODELS[1], False)):
            body = {"model": model, "messages": msgs, "stream": True}
            if usage:
                body["stream_options"] = {"include_usage": True}
            status, data = call("POST", "/v1/chat/completions", body)
            events = [ln[5:].strip() for ln in data.decode(errors="replace").split("\n") if ln.startswith("data:")]
            r = c = 0
            usage_chunk = None
            for e in events:
                if e == "[DONE]":
                    continue
                chunk = json.loads(e)
                if chunk.get("usage") and not chunk.get("choices"):
                    usage_chunk = sorted(chunk["usage"])
                for ch in chunk.get("choices") or []:
                    delta = ch.get("delta") or {}
                    r += bool(delta.get("reasoning_content"))
                    c += bool(delta.get("content"))
            out["stream_usage" if usage else "stream_turbo"] = {
                "status": status,
                "events": len(events),
                "reasoning_deltas": r,
                "content_deltas": c,
                "usage_chunk": usage_chunk,
                "done": events[-1:] == ["[DONE]"],
            }
        status, data = call("GET", "/v1/models")
        out["models"] = [m["id"] for m in json.loads(data)["data"]] if status == 200 else status
    except (OSError, ValueError, KeyError, IndexError, http.client.HTTPException) as exc:
        out["error"] = repr(exc)
    return out


def check_summary(c: dict) -> str:
    if "error" in c:
        return "ERROR " + c["error"]
    ns, su, st = c.get("nonstream", {}), c.get("stream_usage", {}), c.get("stream_turbo", {})
    parts = [
        f"non-stream {ns.get('status')} reasoning_content {'kept' if ns.get('reasoning_content') else 'LOST'}",
        f"stream {su.get('status')} {su.get('events')} events ({su.get('reasoning_deltas')} reasoning, "
        f"{su.get('content_deltas')} content), include_usage chunk {'yes' if su.get('usage_chunk') else 'NO'}, "
        f"[DONE] {'yes' if su.get('done') else 'NO'}",
        f"turbo stream {st.get('status')} usage chunk without include_usage: "
        f"{'yes' if st.get('usage_chunk') else 'no'}",
        f"/v1/models {c.get('models')}",
    ]
    return "; ".join(parts)


def ledger_rows(d: Path) -> int | None:
    db = d / "ledger.db"
    if not db.exists():
        return None
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
            return int(conn.execute("SELECT count(*) FROM ledger").fetchone()[0])
    except sqlite3.Error as exc:
        log("ledger count failed:", exc)
        return None


# ------------------------------------------------------------------------------------------- one path
def bench_path(args: argparse.Namespace, port: int, gw: Proc | None, sim: Proc) -> dict:
    res: dict = {"wrk": {}, "ttfb": {}}
    name = gw.name if gw else "direct"
    for mode in ("nonstream", "stream"):
        if args.warmup > 0:
            wrk(args, port, mode, 16, args.warmup)  # not recorded
        for c in args.conc:
            log(f"{name}: wrk {mode} c={c}")
            res["wrk"].setdefault(mode, {})[str(c)] = measured(wrk, gw, sim, args, port, mode, c, args.duration)
    log(f"{name}: stream TTFB c=1")
    res["ttfb"]["stream"] = measured(ttfb_run, gw, sim, args, port, "stream", args.ttfb_duration, 0.5)
    return res


# ------------------------------------------------------------------------------------------- tables
def med(values: list) -> float | None:
    v = [x for x in values if x is not None]
    return statistics.median(v) if v else None


def fmt(v: float | None, digits: int = 2) -> str:
    if v is None:
        return "–"
    if digits == 0:
        return f"{v:,.0f}"
    return f"{v:,.{digits}f}"


def cell(values: list, digits: int = 2) -> str:
    """median, and [min–max] when there are several repetitions."""
    v = [x for x in values if x is not None]
    if not v:
        return "–"
    s = fmt(statistics.median(v), digits)
    return s + (f" [{fmt(min(v), digits)}–{fmt(max(v), digits)}]" if len(v) > 1 else "")


def get(d: dict | None, *path: str):  # type: ignore[no-untyped-def]
    for p in path:
        if d is None:
            return None
        d = d.get(p)
    return d


def tables(result: dict, args: argparse.Namespace) -> str:
    reps = result["repeats"]
    labels = ["direct", *[g["label"] for g in result["gateways"]]]
    out: list[str] = []
    settings = (
        f"{args.duration:g} s per wrk cell, {args.ttfb_duration:g} s TTFB run, {args.warmup:g} s warm-up per body, "
        f"{len(reps)} repetition(s); simulator `--profile {args.profile}` + client on CPU {args.client_cpu}, "
        f"gateway on CPU {args.gateway_cpu}"
    )
    out.append(f"Run {result['started']} — {settings}.\n")

    def per(label: str, *path: str) -> list:
        return [get(r.get(label), *path) for r in reps]

    def added(label: str, path_fn) -> list:  # type: ignore[no-untyped-def]
        vals = []
        for r in reps:
            a, b = path_fn(r.get(label)), path_fn(r.get("direct"))
            vals.append(a - b if a is not None and b is not None else None)
        return vals

    titles = {
        "nonstream": "Non-stream, wrk (latency = whole JSON response)",
        "stream": "Stream, wrk (latency = whole SSE stream)",
    }
    for mode in ("nonstream", "stream"):
        out.append(f"#### {titles[mode]}\n")
        out.append(
            "| path | conns | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | gw CPU % | gw CPU µs/req "
            "| CPU0 % (client+upstream) | other CPU % | errors |"
        )
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for label in labels:
            for c in args.conc:
                k = ("wrk", mode, str(c))
                is_gw = label != "direct"
                out.append(
                    "| "
                    + " | ".join(
                        [
                            label,
                            str(c),
                            cell(per(label, *k, "rps"), 0),
                            cell(per(label, *k, "lat_ms", "p50")),
                            cell(per(label, *k, "lat_ms", "p99")),
                            cell(added(label, lambda p, k=k: get(p, *k, "lat_ms", "p50"))) if is_gw else "",
                            cell(added(label, lambda p, k=k: get(p, *k, "lat_ms", "p99"))) if is_gw else "",
                            cell(per(label, *k, "gw_cpu_pct"), 0) if is_gw else "",
                            cell(per(label, *k, "gw_cpu_us_per_req"), 0) if is_gw else "",
                            cell(per(label, *k, "cpu0_pct"), 0),
                            cell(per(label, *k, "other_cpu_pct"), 0),
                            cell(per(label, *k, "errors"), 0),
                        ]
                    )
                    + " |"
                )
        out.append("")
    out.append("#### Stream time to first SSE event, 1 connection (raw-socket client)\n")
    out.append(
        "| path | streams/s | TTFB p50 ms | TTFB p99 ms | total p50 ms | total p99 ms | added TTFB p50 ms "
        "| added TTFB p99 ms | gw CPU µs/stream | other CPU % | streams | errors |"
    )
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    k = ("ttfb", "stream")
    for label in labels:
        is_gw = label != "direct"
        out.append(
            "| "
            + " | ".join(
                [
                    label,
                    cell(per(label, *k, "rps"), 0),
                    cell(per(label, *k, "ttfb_ms", "p50"), 3),
                    cell(per(label, *k, "ttfb_ms", "p99"), 3),
                    cell(per(label, *k, "total_ms", "p50"), 3),
                    cell(per(label, *k, "total_ms", "p99"), 3),
                    cell(added(label, lambda p: get(p, *k, "ttfb_ms", "p50")), 3) if is_gw else "",
                    cell(added(label, lambda p: get(p, *k, "ttfb_ms", "p99")), 3) if is_gw else "",
                    cell(per(label, *k, "gw_cpu_us_per_req"), 0) if is_gw else "",
                    cell(per(label, *k, "other_cpu_pct"), 0),
                    cell(per(label, *k, "requests"), 0),
                    cell(per(label, *k, "errors"), 0),
                ]
            )
            + " |"
        )
    out.append("")
    out.append("#### Gateway process\n")
    out.append(
        "| gateway | code that ran | metering | cold start s, median [min–max] (spawns) | first spawn s "
        "| peak RSS (VmHWM) MB | ledger rows (all requests) / requests in measured cells |"
    )
    out.append("|---|---|---|---:|---:|---:|---:|")
    for g in result["gateways"]:
        label = g["label"]
        colds = [x for r in reps for x in (get(r.get(label), "cold_starts_s") or [])]
        firsts = [
            get(
                r.get(label),
                "cold_starts_s",
            )
            for r in reps
        ]
        first = firsts[0][0] if firsts and firsts[0] else None
        rows = per(label, "ledger_rows")
        counted = per(label, "requests_counted")
        ledger = " ; ".join(f"{r if r is not None else 'no ledger'} / {c}" for r, c in zip(rows, counted, strict=True))
        out.append(
            "| "
            + " | ".join(
                [
                    f"{label} ({g['rev']})",
                    f"`{g['module_file']}`",
                    "on (SQLite ledger)" if g["metering"] else "off",
                    f"{cell(colds, 3)} ({len(colds)})",
                    fmt(first, 3),
                    cell(per(label, "peak_rss_mb"), 1),
                    ledger,
                ]
            )
            + " |"
        )
    out.append("")
    out.append("#### End-to-end check\n")
    out.append("| gateway | result |")
    out.append("|---|---|")
    for g in result["gateways"]:
        out.append(f"| {g['label']} | {check_summary(get(reps[0].get(g['label']), 'check') or {'error': 'none'})} |")
    out.append("")
    out.append("#### Targets (one core for the gateway, zero-latency upstream)\n")
    out.append("| target | " + " | ".join(g["label"] for g in result["gateways"]) + " |")
    out.append("|---|" + "---:|" * len(result["gateways"]))
    c_hi = str(max(args.conc))
    rows_spec = [
        (
            f"non-stream req/s at {c_hi} conns ≥ {TARGETS['nonstream_rps_64']:,}",
            lambda lb: med(per(lb, "wrk", "nonstream", c_hi, "rps")),
            TARGETS["nonstream_rps_64"],
            True,
            0,
        ),
        (
            f"added p50 at 1 conn ≤ {TARGETS['added_p50_ms_1']} ms",
            lambda lb: med(added(lb, lambda p: get(p, "wrk", "nonstream", "1", "lat_ms", "p50"))),
            TARGETS["added_p50_ms_1"],
            False,
            3,
        ),
        (
            f"stream streams/s at {c_hi} conns ≥ {TARGETS['stream_rps_64']:,}",
            lambda lb: med(per(lb, "wrk", "stream", c_hi, "rps")),
            TARGETS["stream_rps_64"],
            True,
            0,
        ),
        (
            f"added TTFB p50 at 1 conn ≤ {TARGETS['added_ttfb_p50_ms_1']} ms",
            lambda lb: med(added(lb, lambda p: get(p, "ttfb", "stream", "ttfb_ms", "p50"))),
            TARGETS["added_ttfb_p50_ms_1"],
            False,
            3,
        ),
        (
            f"peak RSS ≤ {TARGETS['peak_rss_mb']} MB",
            lambda lb: med(per(lb, "peak_rss_mb")),
            TARGETS["peak_rss_mb"],
            False,
            1,
        ),
        (
            f"cold start ≤ {TARGETS['cold_start_s']} s",
            lambda lb: med([x for r in reps for x in (get(r.get(lb), "cold_starts_s") or [])]),
            TARGETS["cold_start_s"],
            False,
            3,
        ),
    ]
    for title, fn, limit, higher, digits in rows_spec:
        cells = []
        for g in result["gateways"]:
            v = fn(g["label"])
            ok = v is not None and (v >= limit if higher else v <= limit)
            cells.append(f"{fmt(v, digits)} {'met' if ok else 'NOT met'}")
        out.append(f"| {title} | " + " | ".join(cells) + " |")
    out.append("")
    if len(result["gateways"]) > 1:
        base = result["gateways"][0]["label"]
        others = [g["label"] for g in result["gateways"][1:]]
        out.append(f"#### Throughput relative to `{base}` (median req/s; ratio = {base} / other − 1)\n")
        out.append(f"| body | conns | {base} | " + " | ".join(f"{o} | {base} vs {o}" for o in others) + " |")
        out.append("|---|---:|---:|" + "---:|---:|" * len(others))
        for mode in ("nonstream", "stream"):
            for c in args.conc:
                b = med(per(base, "wrk", mode, str(c), "rps"))
                row = [mode, str(c), fmt(b, 0)]
                for o in others:
                    v = med(per(o, "wrk", mode, str(c), "rps"))
                    row += [fmt(v, 0), f"{100 * (b / v - 1):+.1f} %" if b and v else "–"]
                out.append("| " + " | ".join(row) + " |")
        for title, key in (("gw CPU µs/req, non-stream", "nonstream"), ("gw CPU µs/stream", "stream")):
            c = c_hi
            b = med(per(base, "wrk", key, c, "gw_cpu_us_per_req"))
            row = [f"{title} at {c}", "", fmt(b, 0)]
            for o in others:
                v = med(per(o, "wrk", key, c, "gw_cpu_us_per_req"))
                row += [fmt(v, 0), f"{100 * (b / v - 1):+.1f} %" if b and v else "–"]
            out.append("| " + " | ".join(row) + " |")
        out.append("")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------- main
def parse_src(spec: str) -> tuple[str, Path]:
    label, sep, path = spec.partition("=")
    if not sep:
        path, label = spec, ""
    src = Path(path).resolve()
    if not (src / "gateway" / "__init__.py").is_file():
        sys.exit(f"--gateway-src {spec}: no gateway/__init__.py in {src}")
    return label or src.name, src


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    venv_py = REPO / ".venv" / "bin" / "python"
    ap.add_argument(
        "--python",
        default=str(venv_py) if venv_py.exists() else sys.executable,
        help="interpreter (venv) for the simulator and the gateway (default: this repo's .venv)",
    )
    ap.add_argument(
        "--gateway-src",
        action="append",
        default=[],
        metavar="[LABEL=]DIR",
        help="checkout whose gateway/ package to run (PYTHONPATH=DIR); repeatable for before/after; "
        "default $GATEWAY_SRC or this repo",
    )
    ap.add_argument("--duration", type=int, default=6, help="seconds per wrk cell (default 6)")
    ap.add_argument("--ttfb-duration", type=float, default=None, help="seconds of the TTFB run (default --duration)")
    ap.add_argument(
        "--warmup", type=int, default=1, help="seconds of wrk warm-up per body and path, 0 = none (default 1)"
    )
    ap.add_argument("--conc", default="1,16,64", help="wrk connection counts (default 1,16,64)")
    ap.add_argument("--repeats", type=int, default=1, help="repetitions; path order alternates (default 1)")
    ap.add_argument("--cold-starts", type=int, default=3, help="gateway spawns timed per repetition (default 3)")
    ap.add_argument("--profile", default="instant", help="simulator profile (default instant)")
    ap.add_argument("--client-cpu", type=int, default=0)
    ap.add_argument("--gateway-cpu", type=int, default=1)
    ap.add_argument("--sim-port", type=int, default=19201)
    ap.add_argument("--gateway-port", type=int, default=19204)
    ap.add_argument("--bodies", type=Path, default=HERE / "bodies", help="nonstream.json and stream.json")
    ap.add_argument("--out", type=Path, default=None, help="result dir (default bench/results/<stamp>)")
    ap.add_argument("--states", default="memory", help="state backends to run each gateway with: memory,redis")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="Redis for --states redis")
    ap.add_argument("--journal", default="on", help="run each gateway with the ledger journal on, off, or both: off,on")
    ap.add_argument("--access-log", default="off", help="run each gateway with the access log off, on, or both: off,on")
    args = ap.parse_args()
    args.conc = [int(c) for c in args.conc.split(",")]
    if 1 not in args.conc:
        sys.exit("--conc must include 1 (added latency at 1 connection)")
    args.ttfb_duration = args.ttfb_duration or args.duration
    specs = args.gateway_src or ([os.environ["GATEWAY_SRC"]] if os.environ.get("GATEWAY_SRC") else [f"current={REPO}"])
    states = [s.strip() for s in args.states.split(",") if s.strip()]
    if not states or set(states) - {"memory", "redis"}:
        sys.exit("--states takes memory and/or redis")
    state_lines = {
        "memory": "",
        "redis": f"state: {{backend: redis, url: '{args.redis_url}', namespace: bench-{os.getpid()}}}\n",
    }
    limits = states != ["memory"]
    logs = [s.strip() for s in args.access_log.split(",") if s.strip()]
    if not logs or set(logs) - {"off", "on"}:
        sys.exit("--access-log takes off and/or on")

    journals = [s.strip() for s in args.journal.split(",") if s.strip()]
    if not journals or set(journals) - {"off", "on"}:
        sys.exit("--journal takes off and/or on")

    def label_of(label: str, state: str, access: str, journal: str) -> str:
        return (
            label
            + (f"/{state}" if len(states) > 1 else "")
            + (f"/log-{access}" if len(logs) > 1 else "")
            + (f"/journal-{journal}" if len(journals) > 1 else "")
        )

    gateways = [
        Gateway(label_of(label, state, a, j), src, args.python, state_lines[state], limits, a == "on", j == "on")
        for label, src in map(parse_src, specs)
        for state in states
        for a in logs
        for j in journals
    ]
    if len({g.label for g in gateways}) != len(gateways) or "direct" in {g.label for g in gateways}:
        sys.exit("gateway labels must be distinct and not 'direct' (use LABEL=DIR)")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or HERE / "results" / stamp
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="kgw-overhead-"))
    busy = [p for p in (args.sim_port, args.gateway_port) if port_in_use(p)]
    if busy:
        sys.exit(f"port(s) in use: {busy}; pick others with --sim-port / --gateway-port")
    # this process and every child it does not taskset elsewhere: the client CPU
    os.sched_setaffinity(0, {args.client_cpu})
    log(f"work dir {work}, results {out}")

    for g in gateways:
        g.module_file = g.probe(work)
        log(f"gateway {g.label}: {g.src} ({g.rev}), metering {'on' if g.metering else 'off'}, imports {g.module_file}")
        if not str(g.module_file).startswith(str(g.src)):
            sys.exit(f"gateway {g.label}: the interpreter imports {g.module_file}, not code under {g.src}")
    result: dict = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "argv": sys.argv,
        "python": args.python,
        "cpus": os.cpu_count(),
        "kernel": os.uname().release,
        "gateways": [
            {
                "label": g.label,
                "src": str(g.src),
                "rev": g.rev,
                "metering": g.metering,
                "module_file": g.module_file,
                "cmd": g.cmd,
            }
            for g in gateways
        ],
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "repeats": [],
    }
    body = (args.bodies / "nonstream.json").read_bytes()
    sim_env = clean_env(PYTHONPATH=str(REPO))  # the simulator of this checkout, whatever gateway runs
    started: list[Proc] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        sim = Proc(
            "simulator",
            taskset(
                args.client_cpu,
                [args.python, "-m", "simulator", "--port", str(args.sim_port), "--profile", args.profile],
            ),
            work / "simulator.log",
            sim_env,
            work,
        )
        started.append(sim)
        if wait_ready(sim, args.sim_port, body, 60) is None:
            raise SystemExit(f"simulator did not start; see {work / 'simulator.log'}")
        for rep in range(args.repeats):
            r: dict = {}
            result["repeats"].append(r)
            log(f"=== repetition {rep + 1}/{args.repeats}: direct path")
            r["direct"] = bench_path(args, args.sim_port, None, sim)
            order = gateways[rep % len(gateways) :] + gateways[: rep % len(gateways)]
            for g in order:
                colds = []
                gw = None
                for i in range(max(1, args.cold_starts)):
                    d = work / f"{g.label.replace('/', '-')}-rep{rep + 1}-spawn{i + 1}"
                    d.mkdir()
                    gw = g.spawn(args, d, args.gateway_port)
                    started.append(gw)
                    cold = wait_ready(gw, args.gateway_port, body, 60)
                    if cold is None:
                        raise SystemExit(f"gateway {g.label} did not answer; see {d / 'gateway.log'}")
                    colds.append(cold)
                    log(f"{g.label}: cold start {cold:.3f} s")
                    if i < max(1, args.cold_starts) - 1:
                        gw.stop()
                        started.remove(gw)
                assert gw is not None
                res = {"cold_starts_s": colds, "check": check(args.gateway_port)}
                res.update(bench_path(args, args.gateway_port, gw, sim))
                pids = gw.pids()
                res["peak_rss_mb"] = status_kb(pids, "VmHWM") / 1024
                res["rss_end_mb"] = status_kb(pids, "VmRSS") / 1024
                res["processes"] = len(pids)
                res["requests_counted"] = sum(x["requests"] for m in res["wrk"].values() for x in m.values() if x) + (
                    res["ttfb"]["stream"] or {}
                ).get("requests", 0)
                gw.stop()
                started.remove(gw)
                res["ledger_rows"] = ledger_rows(Path(gw.log_path).parent)
                r[g.label] = res
    finally:
        for p in reversed(started):
            p.stop()
        result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        (out / "run.json").write_text(json.dumps(result, indent=1))
    md = tables(result, args)
    (out / "summary.md").write_text(md + "\n")
    print(md)
    log(f"wrote {out / 'summary.md'} and run.json; logs and configs in {work}")


if __name__ == "__main__":
    main()
