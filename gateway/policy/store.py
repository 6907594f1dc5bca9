"""Load every policy file of a folder, check them against the config, index them for requests.

The result is an immutable :class:`PolicySet`; the server swaps the whole set at once, so requests
in flight keep the set they started with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gateway.config import LoadedConfig
from gateway.policy.model import (
    Budget,
    BudgetStep,
    CapturePolicy,
    PolicyDefaults,
    RateLimits,
    ReasoningPolicy,
    ResponsesPolicy,
    Slo,
    TenantPolicy,
)
from gateway.upstreams.priors import prior_of
from gateway.yamlfile import ConfigError, YamlDoc, load_model

DEFAULTS_FILE = "defaults.yaml"


@dataclass(frozen=True, slots=True)
class Candidate:
    """One place a virtual model can be served: ``upstream/model`` and the id sent on the wire."""

    upstream: str
    model: str
    upstream_model: str
    # ``upstream/model``: read several times per request (metrics, prices, stats), so made once
    label: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "label", f"{self.upstream}/{self.model}")


@dataclass(frozen=True, slots=True)
class Route:
    """A tenant's virtual model, ready for the request path."""

    name: str
    candidates: tuple[Candidate, ...]
    strategy: str
    slo_ttft_ms: float | None = None
    slo_total_ms: float | None = None


DEFAULT_REASONING = ReasoningPolicy()
DEFAULT_CAPTURE = CapturePolicy()
DEFAULT_RESPONSES = ResponsesPolicy()


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    routes: dict[str, Route]
    source: Path
    budget: Budget | None = None
    default_max_tokens: int = 32768
    # as the remaining budget falls below each fraction, route at least this cheaply
    budget_steps: tuple[BudgetStep, ...] = ()
    reasoning: ReasoningPolicy = DEFAULT_REASONING
    capture: CapturePolicy = DEFAULT_CAPTURE
    rate_limits: RateLimits | None = None
    responses: ResponsesPolicy = DEFAULT_RESPONSES
    envelope: str = "normalized"  # the client-facing envelope: normalized | raw


@dataclass(frozen=True, slots=True)
class KeyEntry:
    tenant: Tenant
    digest: str  # sha256 hex of the key
    key_id: str  # first 12 hex digits of the hash: safe to log and to store in the ledger
    # the app that owns the key (the policy's ``apps``): its budget caps and the ledger's app column
    app: str | None = None


class PolicySet:
    """All tenants and an index from key hash (hex) to tenant."""

    def __init__(self, tenants: dict[str, Tenant], keys: dict[str, KeyEntry], files: tuple[Path, ...] = ()) -> None:
        self.tenants = tenants
        self.keys = keys
        self.files = files  # every file this set was read from (defaults.yaml included): the reload watch list


def policy_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file() and p.name != DEFAULTS_FILE
    )


def files_to_load(config: LoadedConfig, folder: Path | None = None) -> tuple[list[Path], Path | None]:
    """The tenant files and the defaults file (None when absent) a load reads."""
    folder = folder or config.policies_dir
    names = config.settings.policy_files
    if names and folder == config.policies_dir:
        files = [folder / name for name in names if name != DEFAULTS_FILE]
    else:
        files = policy_files(folder)
    defaults = folder / DEFAULTS_FILE
    return files, defaults if defaults.is_file() else None


def _merge_slo(*levels: Slo | None) -> tuple[float | None, float | None]:
    """Field by field, the most specific level that sets it wins."""
    ttft = next((s.ttft_ms for s in levels if s is not None and s.ttft_ms is not None), None)
    total = next((s.total_ms for s in levels if s is not None and s.total_ms is not None), None)
    return ttft, total


def _check_slos(doc: YamlDoc, policy: TenantPolicy, defaults: PolicyDefaults, config: LoadedConfig) -> list[str]:
    """An SLO no candidate can be expected to meet, or one whose parts contradict after merging."""
    problems = []
    upstreams = config.settings.upstreams
    for vname, vm in policy.models.items():
        ttft, total = _merge_slo(vm.slo, policy.slo, defaults.slo)
        where = ("models", vname, "slo") if vm.slo is not None else ("slo",) if policy.slo else ("models", vname)
        if ttft is not None and total is not None and ttft > total:
            problems.append(
                doc.problem(
                    where, f"impossible SLO: ttft_ms {ttft:g} (merged with defaults) exceeds total_ms {total:g}"
                )
            )
            continue
        if ttft is None:
            continue
        priors = []
        for label in vm.candidates:
            up, _, model = label.partition("/")
            if up in upstreams and model in upstreams[up].models:
                priors.append((label, prior_of(upstreams[up]).ttft_s * 1000))
        if priors and all(p > ttft for _, p in priors):
            shown = ", ".join(f"{label} ~{p:g} ms" for label, p in priors)
            problems.append(
                doc.problem(
                    where,
                    f"impossible SLO: ttft_ms {ttft:g} is below every candidate's expected time to first token "
                    f"({shown}); raise it, or set a faster upstream's prior if you measured one",
                )
            )
    return problems


def load_defaults(path: Path | None) -> PolicyDefaults:
    if path is None:
        return PolicyDefaults()
    return load_model(path, PolicyDefaults)[1]


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


def _check_apps(doc: YamlDoc, policy: TenantPolicy) -> list[str]:
    """Every app key is one of the tenant's keys and in one app only; every capped app is declared.

    Caps follow the key that authenticated a request, so an app's caps mean only what its key list
    says: a hash outside the tenant's keys would cap nobody, one in two apps would be charged twice."""
    problems = []
    tenant_keys = set(policy.keys)
    owner: dict[str, str] = {}
    for name, app in policy.apps.items():
        for i, key in enumerate(app.keys):
            where = ("apps", name, "keys", i)
            if key not in tenant_keys:
                message = f"{key[:20]}... is not one of this tenant's keys (an app owns keys listed in 'keys')"
                problems.append(doc.problem(where, message))
            elif key in owner:
                problems.append(
                    doc.problem(where, f"{key[:20]}... already belongs to app {owner[key]!r}; a key belongs to one app")
                )
            else:
                owner[key] = name
    for name in policy.budget.apps if policy.budget is not None else ():
        if name not in policy.apps:
            declared = ", ".join(sorted(policy.apps)) or "none"
            problems.append(
                doc.problem(
                    ("budget", "apps", name),
                    f"no app {name!r} under 'apps' (declared: {declared}); an app's caps apply to the keys it "
                    f"owns: declare it as apps: {{{name}: {{keys: [sha256:...]}}}}",
                )
            )
    return problems


def load_policies(config: LoadedConfig, folder: Path | None = None) -> PolicySet:
    """Read and validate every ``*.yaml`` in the policy folder; raises ConfigError listing all problems."""

    folder = folder or config.policies_dir
    files, defaults_path = files_to_load(config, folder)
    problems: list[str] = []
    if not files:
        raise ConfigError([f"{folder}: no policy files (*.yaml): no tenant could call the gateway"])
    try:
        defaults = load_defaults(defaults_path)
    except ConfigError as exc:
        problems.extend(exc.problems)
        defaults = PolicyDefaults()
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
        file_problems += _check_slos(doc, policy, defaults, config)
        file_problems += _check_apps(doc, policy)
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
                name,
                tuple(
                    Candidate(up, model, upstreams[up].models[model])
                    for up, _, model in (c.partition("/") for c in vm.candidates)
                ),
                vm.strategy or policy.strategy or defaults.strategy,
                *_merge_slo(vm.slo, policy.slo, defaults.slo),
            )
            for name, vm in policy.models.items()
        }
        steps = policy.budget.routing if policy.budget and policy.budget.routing is not None else None
        tenant = Tenant(
            policy.tenant,
            routes,
            file,
            policy.budget,
            policy.default_max_tokens or defaults.default_max_tokens,
            tuple(defaults.budget_routing if steps is None else steps) if policy.budget else (),
            policy.reasoning,
            policy.capture,
            policy.rate_limits,
            responses=policy.responses,
            envelope=policy.envelope,
        )
        tenants[policy.tenant] = tenant
        app_of = {key: name for name, app in policy.apps.items() for key in app.keys}
        for key in policy.keys:
            digest = key.removeprefix("sha256:")
            key_owner[digest] = str(file)
            keys[digest] = KeyEntry(tenant, digest, digest[:12], app_of.get(key))
    if problems:
        raise ConfigError(problems)
    return PolicySet(tenants, keys, (*files, *([defaults_path] if defaults_path else [])))
