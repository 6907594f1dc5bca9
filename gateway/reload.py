"""Hot reload of policy files: poll modification times, validate everything, swap the set whole.

Polling (about once a second) needs no file-watching dependency and works on every filesystem.
A changed file is re-read with the same loader the server started with, off the event loop; when
anything is wrong the running policy stays and one log line says why. Requests in flight keep the
:class:`PolicySet` object they started with; only new requests see the new one.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from gateway.config import LoadedConfig
from gateway.metering.prices import PriceBook
from gateway.metering.reload_seed import ReloadSeeding
from gateway.observability import log
from gateway.policy.store import DEFAULTS_FILE, PolicySet, load_policies
from gateway.yamlfile import ConfigError

Signature = tuple[tuple[str, int, int, int], ...]


def signature(config: LoadedConfig) -> Signature:
    """Name, inode, mtime and size of every file a load would read (new and removed files count too).

    ``stat`` follows symlinks, so a Kubernetes ConfigMap volume's swap (a new folder behind the
    ``..data`` symlink) shows as a new inode even where timestamps are coarse and the size is the same."""
    folder = config.policies_dir
    names = config.settings.policy_files
    if names:
        paths = [folder / n for n in (*names, DEFAULTS_FILE)]
    else:
        try:
            paths = [p for p in folder.iterdir() if p.suffix in (".yaml", ".yml")]
        except OSError:
            return ()
    out = []
    for path in sorted(paths):
        try:
            st = path.stat()
        except OSError:
            continue
        out.append((path.name, st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


def load_checked(config: LoadedConfig, prices: PriceBook) -> PolicySet:
    """Policies as the server would start with them, prices included; raises ConfigError."""
    from gateway.wiring import price_problems

    policies = load_policies(config)
    problems = price_problems(policies, prices, time.time())
    if problems:
        raise ConfigError(problems)
    return policies


class PolicyWatcher:
    def __init__(self, config: LoadedConfig, runtime: object, prices: PriceBook, interval_s: float) -> None:
        self.config = config
        self.runtime = runtime  # a gateway.pipeline.Runtime (typed loosely: policy sits below the pipeline)
        self.prices = prices
        self.interval_s = interval_s
        self.seen: Signature = signature(config)
        meter = runtime.meter  # type: ignore[attr-defined]
        self.seeding = ReloadSeeding(meter.budgets, meter.ledger, runtime.policies, time.time())  # type: ignore[attr-defined]

    async def check_once(self) -> bool:
        """Reload when a file changed; returns True when a new set was installed."""
        current = await asyncio.to_thread(signature, self.config)
        if current == self.seen:
            return False
        self.seen = current
        try:
            policies = await asyncio.to_thread(load_checked, self.config, self.prices)
        except ConfigError as exc:
            log.error(
                "policy reload rejected, keeping the last good policy (%d problem(s)): %s",
                len(exc.problems),
                " | ".join(exc.problems),
            )
            return False
        try:  # new budget counters start from the ledger, before any request can reserve on them
            await self.seeding.before_install(self.runtime.policies, policies, time.time())  # type: ignore[attr-defined]
        except Exception:
            log.exception("policy reload: seeding new budget counters from the ledger failed; they start at zero")
        self.runtime.policies = policies  # type: ignore[attr-defined]
        log.info(
            "policies reloaded from %s: %d tenants (%s)",
            self.config.policies_dir,
            len(policies.tenants),
            ", ".join(sorted(Path(p).name for p in policies.files)),
        )
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check_once()
            except Exception:  # the watcher must outlive any surprise
                log.exception("policy reload failed unexpectedly; keeping the last good policy")
