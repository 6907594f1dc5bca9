"""A faithful simulated upstream for kimi-gateway: Moonshot's API or a self-hosted vLLM serving Kimi K2
Thinking, minus the model.

It powers the demo (in-process upstreams), the tests (wire-format details, validation errors, injected
faults) and the benchmarks (the `instant` profile as a near-zero-cost upstream).  Its text is synthetic;
everything around the text (reasoning fields, tool-call ids and deltas, usage placement, cached tokens,
error shapes, timing) follows the real upstreams as documented in protocols.md.

    engine.Simulator   transport-free protocol logic: handle(body) -> SimReply
    planning           what the model says: reasoning, text or tool calls within the budget
    reply              SimReply, SimStats and the concurrency slots replies hold
    server             raw ASGI app (build_app); transport: its connection plumbing; metrics: /metrics
    serving            the app under uvicorn (serve, BackgroundServer)
    profiles           named timing/behaviour profiles (PROFILES, profile_from, profile_with)
    faults             injected errors, stalls, drops and cut streams
"""

from .engine import Simulator
from .faults import Fault
from .profiles import PROFILES, Profile, profile_from, profile_with
from .reply import SimReply, SimStats, SimulatedDisconnect
from .server import build_app
from .serving import BackgroundServer, serve

__all__ = [
    "PROFILES",
    "BackgroundServer",
    "Fault",
    "Profile",
    "SimReply",
    "SimStats",
    "SimulatedDisconnect",
    "Simulator",
    "build_app",
    "profile_from",
    "profile_with",
    "serve",
]
