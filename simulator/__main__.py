"""``python -m simulator --port 9000 --profile moonshot-standard``: run the simulator over HTTP."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .profiles import PROFILES, profile_with
from .serving import serve


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulator",
        description="Simulated Kimi K2 Thinking upstream (Moonshot or vLLM wire format); a simulator, not a model.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9000, help="listen port (default 9000)")
    parser.add_argument("--profile", default="moonshot-standard", help=f"one of: {', '.join(sorted(PROFILES))}")
    parser.add_argument("--ttft-ms", type=float, default=None, help="override the time to first token (ms)")
    parser.add_argument("--tokens-per-s", type=float, default=None, help="override generation speed (0 = instant)")
    parser.add_argument("--max-concurrency", type=int, default=None, help="override the concurrency limit (0 = none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the deterministic text")
    parser.add_argument("--log-level", default="warning", help="uvicorn log level (default warning)")
    parser.add_argument(
        "--request-log",
        default=None,
        metavar="PATH",
        help="append one JSON line per answer to PATH (user, stream, usage): the upstream's own account",
    )
    args = parser.parse_args(argv)
    try:
        profile = profile_with(
            args.profile, ttft_ms=args.ttft_ms, tokens_per_s=args.tokens_per_s, max_concurrency=args.max_concurrency
        )
    except ValueError as exc:
        parser.error(str(exc))
    print(
        f"simulator: profile {profile.name} ({profile.dialect}, ttft {profile.ttft_s * 1000:g} ms, "
        f"{profile.tokens_per_s:g} tok/s) on http://{args.host}:{args.port}/v1",
        file=sys.stderr,
        flush=True,
    )
    serve(args.host, args.port, profile, seed=args.seed, log_level=args.log_level, request_log=args.request_log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
