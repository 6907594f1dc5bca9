"""``kimi-gateway``: serve, simulate, check configuration, hash keys."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

if TYPE_CHECKING:
    from gateway.policy.store import PolicySet
    from gateway.yamlfile import ConfigError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="OpenAI-compatible gateway for Kimi K2 Thinking.")
keys_app = typer.Typer(no_args_is_help=True, help="Tenant API keys.")
spend_app = typer.Typer(no_args_is_help=True, help="Spend reports from the ledger.")
app.add_typer(spend_app, name="spend")
config_app = typer.Typer(no_args_is_help=True, help="Configuration files.")
app.add_typer(keys_app, name="keys")
app.add_typer(config_app, name="config")
capture_app = typer.Typer(no_args_is_help=True, help="Diagnostic captures (tenants with capture turned on).")
app.add_typer(capture_app, name="capture")
policy_app = typer.Typer(no_args_is_help=True, help="Tenant policy files.")
app.add_typer(policy_app, name="policy")


def _exit_with_problems(title: str, error: ConfigError) -> NoReturn:
    """Every problem on stderr, one a line under ``title``, and exit status 2."""
    typer.echo(title, err=True)
    for problem in error.problems:
        typer.echo(f"  {problem}", err=True)
    raise typer.Exit(2) from None


def _load_or_exit(config: Path):  # type: ignore[no-untyped-def]
    """Config, policies and prices, or every problem on stderr and exit status 2."""
    from gateway.wiring import load_all
    from gateway.yamlfile import ConfigError

    try:
        return load_all(config)
    except ConfigError as exc:
        _exit_with_problems(f"kimi-gateway: configuration is invalid ({len(exc.problems)} problem(s)):", exc)


@app.command()
def serve(
    config: Annotated[Path, typer.Option("--config", "-c", help="Gateway config YAML.")] = Path("config/demo.yaml"),
    host: Annotated[str | None, typer.Option(help="Listen address (default: config listen.host).")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port (default: config listen.port).")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes (default: config workers).")] = None,
) -> None:
    """Run the gateway (uvicorn with uvloop and httptools)."""
    import uvicorn

    from gateway.observability import setup_logging

    loaded = _load_or_exit(config)
    settings = loaded.config.settings
    setup_logging(settings.log_level)
    n = workers or settings.workers
    if n > 1 and settings.state.backend == "memory":
        typer.echo(memory_workers_refusal(n, loaded.policies), err=True)
        raise typer.Exit(2)
    common = {
        "host": host or settings.listen.host,
        "port": port or settings.listen.port,
        "loop": "uvloop",
        "http": "httptools",
        "lifespan": "on",
        "access_log": False,
        "log_level": settings.log_level,
        "timeout_keep_alive": 75,
        # SIGTERM: requests in flight get this long once the drain is over (None: as long as they take)
        "timeout_graceful_shutdown": settings.shutdown.grace_s,
        "server_header": False,
        # X-Forwarded-* rewriting costs every request and the gateway logs no client addresses
        "proxy_headers": False,
    }
    if n == 1:
        from gateway.app import GatewayApp

        uvicorn.run(GatewayApp(loaded), **common)  # type: ignore[arg-type]
    else:
        from gateway.app import CONFIG_ENV, WORKERS_ENV

        os.environ[CONFIG_ENV] = str(config.resolve())
        os.environ[WORKERS_ENV] = str(n)
        prepare_multiprocess_metrics()
        uvicorn.run("gateway.app:create_app", factory=True, workers=n, **common)  # type: ignore[arg-type]


def memory_workers_refusal(n: int, policies: PolicySet) -> str:
    """Why ``n`` workers cannot share in-memory state, naming what would break for these policies.

    Each worker process would hold its own copy: budgets and rate limits enforced per worker (spend
    and traffic reaching ``n`` times the limits), the reasoning a tool loop needs back stored in one
    worker while the next turn lands on another (K2 then gets a blank), and prefix-cache affinity
    split ``n`` ways. Redis is the state every worker shares."""
    limited = sorted(t.name for t in policies.tenants.values() if t.budget is not None or t.rate_limits is not None)
    budgets = (
        f" the budgets and rate limits of {', '.join(limited)} would each be enforced per worker, letting spend "
        f"and traffic reach {n}x the limits;"
        if limited
        else ""
    )
    return (
        f"kimi-gateway: --workers {n} needs state every worker shares, and state.backend is memory (one copy "
        f"per process):{budgets} a tool loop's stored reasoning and prefix-cache affinity would be split "
        f'{n} ways. Set state.backend: redis (README "Running several replicas"), or run one worker.'
    )


def prepare_multiprocess_metrics() -> None:
    """Prometheus multiprocess mode for workers: each writes its metrics to files in one folder and
    ``/metrics`` adds them up. Set before the workers start (they read it when importing
    prometheus_client); emptied first, so counts from an earlier run do not come back. Without
    ``PROMETHEUS_MULTIPROC_DIR`` a temporary folder is used and removed on exit."""
    import atexit
    import shutil
    import tempfile

    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        folder = Path(given)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.db"):
            stale.unlink()
    else:
        folder = Path(tempfile.mkdtemp(prefix="kimi-gateway-metrics-"))
        atexit.register(shutil.rmtree, folder, True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)


@app.command()
def simulate(
    port: Annotated[int, typer.Option(help="Listen port.")] = 9000,
    host: Annotated[str, typer.Option(help="Listen address.")] = "127.0.0.1",
    profile: Annotated[str, typer.Option(help="Simulator profile.")] = "moonshot-standard",
    ttft_ms: Annotated[float | None, typer.Option(help="Override time to first token (ms).")] = None,
    tokens_per_s: Annotated[float | None, typer.Option(help="Override generation speed (0 = instant).")] = None,
    tool_rounds: Annotated[
        int | None, typer.Option(help="Tool-call rounds the model makes before answering in text.")
    ] = None,
) -> None:
    """Run the upstream simulator as a real HTTP server (Moonshot or vLLM wire format)."""
    from gateway.upstreams.simulated import profile_with, serve_http

    try:
        chosen = profile_with(profile, ttft_ms=ttft_ms, tokens_per_s=tokens_per_s, tool_rounds=tool_rounds)
    except ValueError as exc:
        typer.echo(f"kimi-gateway simulate: {exc}", err=True)
        raise typer.Exit(2) from None
    serve_http(host, port, chosen)


@config_app.command("check")
def config_check(
    config: Annotated[Path, typer.Argument(help="Gateway config YAML.")] = Path("config/demo.yaml"),
) -> None:
    """Validate a config and the policy files it points at; exit 2 on any problem."""
    loaded = _load_or_exit(config)
    typer.echo(
        f"{config}: ok ({len(loaded.config.settings.upstreams)} upstreams, {len(loaded.policies.tenants)} tenants "
        f"from {loaded.config.policies_dir}, {len(loaded.prices.targets())} priced targets)"
    )


@policy_app.command("check")
def policy_check(
    folder: Annotated[Path | None, typer.Argument(help="Policy folder (default: the config's policies_dir).")] = None,
    config: Annotated[Path, typer.Option("--config", "-c", help="Gateway config YAML.")] = Path("config/demo.yaml"),
) -> None:
    """Validate policy files against a config and its prices; exit 2 listing every problem."""
    import time

    from gateway.metering.prices import load_prices
    from gateway.policy.store import load_policies
    from gateway.upstreams.factory import load_checked_config
    from gateway.wiring import price_problems
    from gateway.yamlfile import ConfigError

    try:
        loaded = load_checked_config(config, resolve_keys=False)
        target = folder.resolve() if folder is not None else loaded.policies_dir
        if not target.is_dir():
            raise ConfigError([f"{target}: not a folder of policy files"])
        policies = load_policies(loaded, target)
        problems = price_problems(policies, load_prices(loaded.prices_path), time.time())
        if problems:
            raise ConfigError(problems)
    except ConfigError as exc:
        _exit_with_problems(f"kimi-gateway policy check: {len(exc.problems)} problem(s):", exc)
    routes = sum(len(t.routes) for t in policies.tenants.values())
    typer.echo(f"{target}: ok ({len(policies.tenants)} tenants, {routes} virtual models, {len(policies.files)} files)")


@keys_app.command("hash")
def keys_hash(key: Annotated[str | None, typer.Argument(help="The key; read from stdin when omitted.")] = None) -> None:
    """Print the sha256:<hex> form of a key, for a policy file's keys list."""
    from gateway.auth import hash_key

    value = key if key is not None else sys.stdin.readline().strip()
    if not value:
        typer.echo("kimi-gateway keys hash: empty key", err=True)
        raise typer.Exit(2)
    typer.echo(hash_key(value))


@keys_app.command("new")
def keys_new(prefix: Annotated[str, typer.Option(help="Key prefix.")] = "sk-kg-") -> None:
    """Make a random key and print it with its hash (store only the hash)."""
    import secrets

    from gateway.auth import hash_key

    key = prefix + secrets.token_urlsafe(32)
    typer.echo(f"key:  {key}\nhash: {hash_key(key)}")


@spend_app.command("report")
def spend_report(
    config: Annotated[Path, typer.Option("--config", "-c", help="Gateway config YAML.")] = Path("config/demo.yaml"),
    from_: Annotated[str | None, typer.Option("--from", help="Start: date, ISO time or unix seconds.")] = None,
    to: Annotated[str | None, typer.Option("--to", help="End (exclusive): date, ISO time or unix seconds.")] = None,
    group_by: Annotated[
        str, typer.Option("--group-by", "--by", help="tenant,app,key,user,model,upstream,endpoint,day,month")
    ] = "tenant,model",
    tenant: Annotated[str | None, typer.Option(help="Only this tenant.")] = None,
    output: Annotated[str, typer.Option("--format", help="table, csv or json.")] = "table",
) -> None:
    """Spend by the chosen groups, with what cache hits saved against the miss price."""
    import asyncio

    import orjson

    from gateway.metering import report
    from gateway.metering.ledger_factory import open_ledger
    from gateway.upstreams.factory import load_checked_config
    from gateway.yamlfile import ConfigError

    if output not in ("table", "csv", "json"):
        typer.echo(f"kimi-gateway spend report: --format must be table, csv or json, got {output!r}", err=True)
        raise typer.Exit(2)
    try:
        groups = report.parse_group_by(group_by)
        since = report.parse_time(from_) if from_ else None
        until = report.parse_time(to) if to else None
        loaded = load_checked_config(config, resolve_keys=False)
    except ValueError as exc:
        typer.echo(f"kimi-gateway spend report: {exc}", err=True)
        raise typer.Exit(2) from None
    except ConfigError as exc:
        typer.echo("kimi-gateway spend report: " + "; ".join(exc.problems), err=True)
        raise typer.Exit(2) from None

    async def run() -> list[dict[str, object]]:
        ledger = await open_ledger(loaded.ledger_url)
        try:
            return await ledger.spend(group_by=groups, since=since, until=until, tenant=tenant)
        finally:
            await ledger.close()

    rows = asyncio.run(run())
    if output == "csv":
        typer.echo(report.to_csv(rows, groups), nl=False)
    elif output == "json":
        typer.echo(orjson.dumps(report.to_json(rows, groups), option=orjson.OPT_INDENT_2).decode())
    else:
        from rich.console import Console

        console = Console()
        console.print(report.render_report(rows, groups, console=console, title="kimi-gateway spend"))


@capture_app.command("show")
def capture_show(
    request_id: Annotated[str, typer.Argument(help="The request id (the x-request-id response header).")],
    config: Annotated[Path, typer.Option("--config", "-c", help="Gateway config YAML.")] = Path("config/demo.yaml"),
) -> None:
    """Print one request's capture as JSON (already redacted when it was stored)."""
    import asyncio

    import orjson

    from gateway.capture.factory import capture_store_from_url
    from gateway.capture.store import CaptureRow
    from gateway.upstreams.factory import load_checked_config
    from gateway.yamlfile import ConfigError

    try:
        loaded = load_checked_config(config, resolve_keys=False)
    except ConfigError as exc:
        typer.echo("kimi-gateway capture show: " + "; ".join(exc.problems), err=True)
        raise typer.Exit(2) from None

    async def run() -> CaptureRow | None:
        store = capture_store_from_url(loaded.ledger_url)
        await store.open()
        try:
            return await store.get(request_id)
        finally:
            await store.close()

    row = asyncio.run(run())
    if row is None:
        typer.echo(
            f"kimi-gateway capture show: no capture for request {request_id!r} (capture is off for its tenant, "
            "or the row is past its retention)",
            err=True,
        )
        raise typer.Exit(1)
    doc = {"request_id": row.request_id, "tenant": row.tenant, "mode": row.mode, "ts": row.ts,
           "expires_at": row.expires_at, "record": row.record}  # fmt: skip
    typer.echo(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())


def main() -> None:
    app()


if __name__ == "__main__":
    main()
