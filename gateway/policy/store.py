"""Load every policy file of a folder, check them against the config, index them for requests.

The result is an immutable :class:`PolicySet`; the server swaps the whole set at once, so requests
in flight keep the set they started with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gateway.config import LoadedConfig
from gateway.policy.model import Budget, RateLimits, TenantPolicy
from gateway.yamlfile import ConfigError, YamlDoc, load_model


@dataclass(frozen=True, slots=True)
class Candidate:
    """One place a virtual model can be served: ``upstream/model`` and the id sent on the wire."""

    upstream: str
    model: str
    upstream_model: str

    @property
    def label(self) -> str:
        return f"{self.upstream}/{self.model}"


@dataclass(frozen=True, slots=True)
class Route:
    """A tenant's virtual model, ready for the request path."""

    name: str
    candidates: tuple[Candidate, ...]
    strategy: str


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    routes: dict[str, Route]
    source: Path
    budget: Budget | None = None
    default_max_tokens: int = 32768
    rate_limits: RateLimits | None = None


@dataclass(frozen=True, slots=True)
class KeyEntry:
    tenant: Tenant
    digest: str  # sha256 hex of the key
    key_id: str  # first 12 hex digits of the hash: safe to log and to store in the ledger


class PolicySet:
    """All tenants and an index from key hash (hex) to tenant."""

    def __init__(self, tenants: dict[str, Tenant], keys: dict[str, KeyEntry]) -> None:
        self.tenants = tenants
        self.keys = keys


def policy_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


def _check_candidates(doc: YamlDoc, policy: TenantPolicy, config: LoadedConfig) -> list[str]:
    problems = []
    upstreams = config.settings.upstreams
    for vname, vmodel in policy.models.items():
        for i, label in enumerate(vmodel.candidates):
            upstream, _, model = label.partition("/")
            where = ("models", vname, "candidates", i)
            if upstream not in upstreams:
                problems.append(
                    doc.problem(
                        where,
                        f"unknown upstream {upstream!r} in {label!r} (configured: {', '.join(sorted(upstreams))})",
                    )
                )
            elif model not in upstreams[upstream].models:
                known = ", ".join(sorted(upstreams[upstream].models))
                problems.append(
                    doc.problem(where, f"upstream {upstream!r} has no model {model!r} (its models: {known})")
                )
    return problems


def load_policies(config: LoadedConfig, folder: Path | None = None) -> PolicySet:
    """Read and validate every ``*.yaml`` in the policy folder; raises ConfigError listing all problems."""

    folder = folder or config.policies_dir
    names = config.settings.policy_files
    files = [folder / name for name in names] if names and folder == config.policies_dir else policy_files(folder)
    problems: list[str] = []
    if not files:
        raise ConfigError([f"{folder}: no policy files (*.yaml): no tenant could call the gateway"])
    tenants: dict[str, Tenant] = {}
    keys: dict[str, KeyEntry] = {}
    key_owner: dict[str, str] = {}
    for file in files:
        try:
            doc, policy = load_model(file, TenantPolicy)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        file_problems = _check_candidates(doc, policy, config)
        if policy.tenant in tenants:
            file_problems.append(
                doc.problem(
                    ("tenant",), f"tenant {policy.tenant!r} is already defined in {tenants[policy.tenant].source}"
                )
            )
        for i, key in enumerate(policy.keys):
            digest = key.removeprefix("sha256:")
            if digest in key_owner and key_owner[digest] != str(file):
                file_problems.append(doc.problem(("keys", i), f"this key hash is also listed in {key_owner[digest]}"))
        if file_problems:
            problems.extend(file_problems)
            continue
        upstreams = config.settings.upstreams
        routes = {
            name: Route(
                name=name,
                strategy=vm.strategy,
                candidates=tuple(
                    Candidate(up, model, upstreams[up].models[model])
                    for up, _, model in (c.partition("/") for c in vm.candidates)
                ),
            )
            for name, vm in policy.models.items()
        }
        tenant = Tenant(policy.tenant, routes, file, policy.budget, policy.default_max_tokens, policy.rate_limits)
        tenants[policy.tenant] = tenant
        for key in policy.keys:
            digest = key.removeprefix("sha256:")
            key_owner[digest] = str(file)
            keys[digest] = KeyEntry(tenant, digest, digest[:12])
    if problems:
        raise ConfigError(problems)
    return PolicySet(tenants, keys)
