"""The Redis address of ``state.url``, parsed once: by config validation (``file:line`` messages) and by
the state backends (which client to build). Two parsers that disagreed would validate one place and
connect to another.

The forms:

* ``redis://[user@]host[:port][/db]``, ``rediss://...`` (TLS), ``unix:///path.sock[?db=N]``: one
  server, or a proxy in front of several;
* ``redis+cluster://[user@]host:port[,host:port...]``, ``rediss+cluster://...``: a Redis Cluster; the
  nodes listed are where discovery starts (one is enough, a few survive one being down). A cluster
  has only database 0, so no ``/db``. ``cluster: true`` with a ``redis://`` URL means the same;
* ``sentinel://[user@]host:port[,host:port...]/MASTER[/db]``, ``sentinels://...`` (TLS to the
  sentinels and to the master): Redis Sentinel; the client asks the sentinels where master MASTER
  is and follows it through failovers. The ``sentinels:`` list with ``master:`` says the same in YAML.

A password never sits in the URL (``password_env`` names the variable that holds it), so a
``user:password@`` part is refused; the user name alone (an ACL user) may be given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote

Topology = Literal["single", "cluster", "sentinel"]
DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """Where state lives. ``url`` is what redis-py's ``from_url`` takes for one server (TLS implied by
    ``rediss://``); ``nodes`` are a cluster's start-up nodes or the sentinels."""

    topology: Topology
    tls: bool
    url: str | None = None
    nodes: tuple[tuple[str, int], ...] = ()
    master: str | None = None
    db: int = 0
    username: str | None = None


def _userinfo(rest: str, label: str) -> tuple[str | None, str]:
    if "@" not in rest.split("/", 1)[0]:
        return None, rest
    userinfo, rest = rest.split("@", 1)
    if ":" in userinfo:
        raise ValueError(
            f"{label} holds a password, and secrets never go in YAML: name the environment variable "
            "that holds it with password_env"
        )
    return (unquote(userinfo) or None), rest


def parse_hostports(text: str, default_port: int, label: str) -> tuple[tuple[str, int], ...]:
    """``host:port,host:port`` (or a list's items) as pairs; ValueError naming the bad one."""
    out: list[tuple[str, int]] = []
    for item in text.split(","):
        item = item.strip()
        host, sep, port = item.rpartition(":") if not item.endswith("]") else (item, "", "")
        if not sep:
            host, port = item, str(default_port)
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{label}: expected host:port, got {item!r}")
        out.append((host, int(port)))
    return tuple(out)


def _db(text: str, label: str) -> int:
    if not text.isdigit() or int(text) > 15:
        raise ValueError(f"{label}: the database must be a number from 0 to 15, got {text!r}")
    return int(text)


def parse_redis_url(url: str, *, cluster: bool = False, label: str = "url") -> RedisTarget:
    """``url`` parsed (``cluster`` from the config's ``cluster: true``), or ValueError saying what is
    wrong with it."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in (
        "redis",
        "rediss",
        "unix",
        "redis+cluster",
        "rediss+cluster",
        "sentinel",
        "sentinels",
    ):
        raise ValueError(
            f"{label}: expected redis://HOST:PORT/DB, rediss://... (TLS), unix://PATH, "
            f"redis+cluster://HOST:PORT,... or sentinel://HOST:PORT,.../MASTER, got {url!r}"
        )
    username, rest = _userinfo(rest, label) if scheme != "unix" else (None, rest)
    tls = scheme in ("rediss", "rediss+cluster", "sentinels")
    if scheme == "unix":
        if cluster:
            raise ValueError(f"{label}: cluster: true needs redis:// or rediss:// start-up nodes, not a socket")
        return RedisTarget("single", False, url=url)
    if scheme.startswith("sentinel"):
        if cluster:
            raise ValueError(f"{label}: cluster: true and a sentinel:// URL exclude each other")
        hosts, _, path = rest.partition("/")
        parts = [p for p in path.split("/") if p]
        if not parts or len(parts) > 2:
            raise ValueError(f"{label}: expected sentinel://HOST:PORT,.../MASTER[/DB], got {url!r}")
        nodes = parse_hostports(hosts, DEFAULT_SENTINEL_PORT, label)
        db = _db(parts[1], label) if len(parts) == 2 else 0
        return RedisTarget("sentinel", tls, nodes=nodes, master=unquote(parts[0]), db=db, username=username)
    hosts, _, path = rest.partition("/")
    path = path.split("?", 1)[0]
    if scheme.endswith("+cluster") or cluster:
        if path.strip("/") not in ("", "0"):
            raise ValueError(f"{label}: a Redis Cluster has only database 0, got {url!r}")
        nodes = parse_hostports(hosts, DEFAULT_PORT, label)
        return RedisTarget("cluster", tls, nodes=nodes, username=username)
    if "," in hosts:
        raise ValueError(f"{label}: several hosts need redis+cluster:// or sentinel://, got {url!r}")
    parse_hostports(hosts, DEFAULT_PORT, label)
    db = _db(path.strip("/"), label) if path.strip("/") else 0
    return RedisTarget("single", tls, url=url, db=db, username=username)
