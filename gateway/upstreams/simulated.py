"""An in-process simulated upstream (``kind: simulated``): the simulator without a network hop.

It answers with the same bytes the simulator's HTTP server would send and honours the same
timeouts as a real upstream, so the demo and the tests exercise the gateway's real relay path.

This module is the gateway's one door to the top-level ``simulator`` package: whatever else in the
gateway needs to know about a simulated upstream (is its profile name valid, which dialect does it
speak, how fast is it, serve it over HTTP for ``kimi-gateway simulate``) asks here, so the simulator
can change behind one adapter and the layers above never import it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from gateway.config import UpstreamConfig
from gateway.upstreams.base import FailureKind, Upstream, UpstreamFailure, UpstreamReply
from gateway.yamlfile import YamlDoc
from simulator import PROFILES, Profile, SimReply, SimulatedDisconnect, Simulator, profile_with
from simulator import serve as serve_http

__all__ = [
    "DEFAULT_PROFILE",
    "SimulatedUpstream",
    "config_problems",
    "dialect_of",
    "profile_of",
    "profile_with",
    "serve_http",
]

DEFAULT_PROFILE = "moonshot-standard"  # what a simulated upstream without ``profile`` runs


def config_problems(doc: YamlDoc, name: str, up: UpstreamConfig) -> list[str]:
    """What is wrong with a ``kind: simulated`` upstream's own keys, as ``file:line`` problems.

    ``gateway.config`` checks the shape of every upstream but cannot see the simulator (it sits in
    the foundation layer); the upstream factory hands this check to the config loader, so the
    message still names the file and line of ``profile``.
    """
    profile = up.profile or DEFAULT_PROFILE
    if profile in PROFILES:
        return []
    return [
        doc.problem(
            ("upstreams", name, "profile"),
            f"unknown simulator profile {profile!r} (known: {', '.join(sorted(PROFILES))})",
        )
    ]


def profile_of(config: UpstreamConfig) -> Profile:
    """The profile a simulated upstream runs: its ``profile`` with the config's speed overrides."""
    return profile_with(
        config.profile or DEFAULT_PROFILE,
        ttft_ms=config.ttft_ms,
        tokens_per_s=config.tokens_per_s,
        tool_rounds=config.tool_rounds,
    )


def dialect_of(config: UpstreamConfig) -> str | None:
    """``moonshot`` or ``vllm``: the wire format a simulated upstream speaks; None for an unknown profile."""
    profile = PROFILES.get(config.profile or DEFAULT_PROFILE)
    return None if profile is None else profile.dialect


def _header(reply: SimReply, name: str) -> str | None:
    for key, value in reply.headers:
        if key.lower() == name:
            return value
    return None


class _SimReply(UpstreamReply):
    def __init__(self, reply: SimReply, first: bytes, events: AsyncIterator[bytes] | None, idle_s: float) -> None:
        self._reply = reply
        self._first = first
        self._events = events
        self._idle_s = idle_s
        self.status = reply.status
        self.retry_after = _header(reply, "retry-after")
        self.content_type = _header(reply, "content-type") or ""

    async def read(self) -> bytes:
        if self._events is None:
            return self._reply.body or b""
        return b"".join([c async for c in self.chunks()])

    async def chunks(self) -> AsyncIterator[bytes]:
        if self._events is None:
            yield self._reply.body or b""
            return
        if self._first:
            yield self._first
            self._first = b""
        while True:
            try:
                async with asyncio.timeout(self._idle_s):
                    event = await anext(self._events)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise UpstreamFailure(
                    "idle_timeout", f"upstream sent nothing for {self._idle_s:g} s in the middle of a stream"
                ) from None
            except SimulatedDisconnect:
                raise UpstreamFailure("cut", "upstream stream was cut (simulated)") from None
            yield event

    async def aclose(self, *, abort: bool = False) -> None:
        events, self._events = self._events, None
        if events is not None and hasattr(events, "aclose"):
            await events.aclose()


class SimulatedUpstream(Upstream):
    def __init__(self, name: str, config: UpstreamConfig) -> None:
        self.name = name
        self.config = config
        self.reasoning_field = config.reasoning_field
        self.tool_call_markers = config.tool_call_markers
        self.simulator = Simulator(profile_of(config))

    async def send(self, body: bytes, *, stream: bool, key: str | None = None) -> UpstreamReply:
        t = self.config.timeouts
        reply = self.simulator.handle(body)
        if reply.drop:
            raise UpstreamFailure("connect", f"upstream '{self.name}' closed the connection without answering")
        if reply.events is None:
            try:
                async with asyncio.timeout(t.first_byte_s if stream else t.total_s):
                    await reply.wait()
            except TimeoutError:
                kind: FailureKind = "first_byte_timeout" if stream else "total_timeout"
                raise UpstreamFailure(kind, f"upstream '{self.name}' did not answer in time") from None
            return _SimReply(reply, b"", None, t.idle_s)
        events = reply.events
        try:
            async with asyncio.timeout(t.first_byte_s):
                first = await anext(events)
        except TimeoutError:
            await events.aclose()  # type: ignore[attr-defined]
            raise UpstreamFailure(
                "first_byte_timeout", f"upstream '{self.name}' sent no first byte within {t.first_byte_s:g} s"
            ) from None
        except StopAsyncIteration:
            first = b""
        except SimulatedDisconnect:
            raise UpstreamFailure("cut", f"upstream '{self.name}' cut the stream (simulated)") from None
        return _SimReply(reply, first, events, t.idle_s)
