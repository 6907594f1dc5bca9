"""Load and cross-check everything a gateway needs before it may start.

Config, policies and prices are each validated on their own; this module checks them against each
other (a routable candidate without a price in force refuses the start) and is the one loader the
server, ``config check`` and tests share.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from gateway.config import LoadedConfig
from gateway.metering.prices import PriceBook, load_prices
from gateway.policy.store import PolicySet, load_policies
from gateway.upstreams.factory import load_checked_config
from gateway.yamlfile import ConfigError


@dataclass(frozen=True)
class Loaded:
    config: LoadedConfig
    policies: PolicySet
    prices: PriceBook


def price_problems(policies: PolicySet, prices: PriceBook, now: float) -> list[str]:
    problems = []
    for tenant in policies.tenants.values():
        for route in tenant.routes.values():
            for i, candidate in enumerate(route.candidates):
                if prices.at(candidate.label, now) is None:
                    problems.append(
                        f"{tenant.source}: models.{route.name}.candidates[{i}]: {candidate.label} has no price "
                        "in force (add it to the prices file; the gateway never serves what it cannot bill)"
                    )
    return problems


def load_all(path: str | os.PathLike[str], env: dict[str, str] | None = None, now: float | None = None) -> Loaded:
    config = load_checked_config(Path(path), env=env)
    policies = load_policies(config)
    prices = load_prices(config.prices_path)
    problems = price_problems(policies, prices, time.time() if now is None else now)
    if problems:
        raise ConfigError(problems)
    return Loaded(config, policies, prices)
