"""The schema of one tenant's policy file (``policies/<tenant>.yaml``).

A policy names a tenant, the keys that authenticate it (stored only as ``sha256:<hex>``), its apps
(each a set of those keys) and its virtual models: the model name an app sends, mapped to an ordered
list of ``upstream/model`` candidates. Validation here is about one field at a time; checks across
fields (an app's keys against the tenant's, budget caps against the apps) and across files live in
``store.py``, where each problem gets the line it is about.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

KEY_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
APP_NAME = TENANT_NAME  # the ledger's app column and the budget counters' keys hold it as it is


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Strategy = Literal["cost", "latency", "balanced", "pinned"]


class Slo(_Strict):
    """What a request should meet: time to first token and total time, in milliseconds."""

    ttft_ms: Annotated[float, Field(gt=0)] | None = None
    total_ms: Annotated[float, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _possible(self) -> Slo:
        if self.ttft_ms is not None and self.total_ms is not None and self.ttft_ms > self.total_ms:
            raise ValueError(
                f"impossible SLO: ttft_ms ({self.ttft_ms:g}) is larger than total_ms ({self.total_ms:g}); "
                "the first token cannot come after the end"
            )
        return self


class VirtualModel(_Strict):
    candidates: Annotated[list[str], Field(min_length=1)]
    # unset: the tenant's strategy, then defaults.yaml's, then balanced
    strategy: Strategy | None = None
    slo: Slo | None = None

    @field_validator("candidates")
    @classmethod
    def _shape(cls, v: list[str]) -> list[str]:
        for item in v:
            upstream, sep, model = item.partition("/")
            if not sep or not upstream or not model:
                raise ValueError(f"candidate {item!r} must look like 'upstream/model'")
        if len(set(v)) != len(v):
            raise ValueError("candidates must not repeat")
        return v


class Caps(_Strict):
    """Hard spend caps in USD per UTC calendar window."""

    daily_usd: Annotated[Decimal, Field(gt=0)] | None = None
    monthly_usd: Annotated[Decimal, Field(gt=0)] | None = None


class BudgetStep(_Strict):
    """Below this fraction of the tightest remaining budget, route with (at least) this cheap a strategy."""

    remaining_below: Annotated[float, Field(gt=0, lt=1)]
    strategy: Literal["balanced", "cost"]


def _check_steps(steps: list[BudgetStep]) -> list[BudgetStep]:
    fractions = [step.remaining_below for step in steps]
    if fractions != sorted(fractions, reverse=True) or len(set(fractions)) != len(fractions):
        raise ValueError("steps must be listed from the highest remaining_below to the lowest, without repeats")
    return steps


class Budget(Caps):
    """Tenant caps, per-app caps (``apps`` names apps declared in the policy's ``apps``: a request is
    capped as the app its key belongs to, whatever headers it sends), and what to do when a request
    does not fit: ``reject`` answers 429 ``budget_exceeded``; ``downgrade`` lowers ``max_tokens`` to
    what fits (never below ``min_max_tokens``) and rejects only when even that does not fit."""

    when_exhausted: Literal["reject", "downgrade"] = "reject"
    min_max_tokens: Annotated[int, Field(ge=1)] = 1024
    apps: dict[str, Caps] = Field(default_factory=dict)
    # as remaining budget falls, prefer cheaper candidates (unset: defaults.yaml's budget_routing)
    routing: list[BudgetStep] | None = None

    @field_validator("routing")
    @classmethod
    def _descending(cls, v: list[BudgetStep] | None) -> list[BudgetStep] | None:
        return _check_steps(v) if v is not None else v


DetectorName = Literal["email", "phone", "api_key", "aws_key", "bearer_token", "card_number"]
DETECTORS: tuple[DetectorName, ...] = ("email", "phone", "api_key", "aws_key", "bearer_token", "card_number")
"""Built-in secret and personal-data detectors a redaction can use (``gateway/reasoning/redact.py``)."""
PATTERN_KIND = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
MAX_PATTERN_CHARS = 256  # longest text one pattern may match: streams hold back this much to redact across chunks


class RedactPattern(_Strict):
    """A tenant's own pattern: matches become ``[REDACTED:<kind>]``."""

    kind: str
    regex: str

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        if not PATTERN_KIND.match(v):
            raise ValueError(f"kind {v!r} must be 1-32 lowercase letters, digits or '_', starting with a letter")
        return v

    @field_validator("regex")
    @classmethod
    def _regex(cls, v: str) -> str:
        from re import _parser  # type: ignore[attr-defined]  # the widths the compiler itself computes

        try:
            re.compile(v)
            low, high = _parser.parse(v).getwidth()
        except re.error as exc:
            raise ValueError(f"regex {v!r} does not compile: {exc}") from None
        if low == 0:
            raise ValueError(f"regex {v!r} can match the empty string; it would redact between every character")
        if high > MAX_PATTERN_CHARS:
            raise ValueError(
                f"regex {v!r} can match more than {MAX_PATTERN_CHARS} characters (unbounded '+', '*' or '{{n,}}'); "
                f"bound its repetitions (e.g. \\d{{1,20}}) so streamed text can be redacted across chunk boundaries"
            )
        return v


class Redaction(_Strict):
    patterns: list[RedactPattern] = Field(default_factory=list)
    # built-in detectors in force; all of them unless the tenant lists fewer
    detectors: list[DetectorName] = Field(default_factory=lambda: list(DETECTORS))

    @model_validator(mode="after")
    def _unique(self) -> Redaction:
        if len(set(self.detectors)) != len(self.detectors):
            raise ValueError("detectors must not repeat")
        return self


class ReasoningPolicy(_Strict):
    """What the tenant's clients see of the model's reasoning.

    ``pass`` relays it; ``strip`` removes it (fields and ``<think>`` text in content); ``redact``
    replaces secrets and personal data in it. ``field`` is the name the clients read it under. In
    every mode the original reasoning of tool-call turns is kept server-side for ``store_ttl_s`` and
    put back into a tool-call message that comes back without it, before the next turn goes upstream
    (K2 needs it, protocols.md §2.1). ``when_missing`` says what happens when the gateway has none
    for an upstream that needs it: a placeholder, or a 400 before any upstream call.
    """

    mode: Literal["pass", "strip", "redact"] = "pass"
    field: Literal["reasoning_content", "reasoning"] = "reasoning_content"
    redact: Redaction = Field(default_factory=Redaction)
    # false: nothing is kept server-side; tool loops then fall back to when_missing (and lose continuity)
    keep_for_tool_loops: bool = True
    when_missing: Literal["placeholder", "reject"] = "placeholder"
    store_ttl_s: Annotated[int, Field(ge=60, le=30 * 86400)] = 86400
    # reasoning longer than this (UTF-8 bytes) is not kept; the next turn falls back to a placeholder
    store_max_bytes: Annotated[int, Field(ge=1024, le=16 * 1024 * 1024)] = 1024 * 1024


class CapturePolicy(_Strict):
    """Diagnostic capture of requests and answers, redacted with the tenant's redaction rules.

    ``metadata``: who, which model and upstream, status, tokens, finish reasons, tool names.
    ``full``: also the messages and the answer (content, reasoning, tool calls). Rows are deleted
    ``retention_days`` after the request.
    """

    mode: Literal["off", "metadata", "full"] = "off"
    retention_days: Annotated[int, Field(ge=1, le=3650)] = 7


class Rates(_Strict):
    """Requests and tokens per minute. Tokens are admitted on the prompt (an upper bound) plus
    ``max_tokens``, and corrected to the reported usage when the request ends."""

    rpm: Annotated[int, Field(ge=1)] | None = None
    tpm: Annotated[int, Field(ge=1)] | None = None


class RateLimits(Rates):
    """Tenant-wide limits, and per key: ``keys`` maps a key hash of this policy (``sha256:...``) or
    ``"*"`` (every key on its own) to its limits. Every limit that applies must admit a request."""

    keys: dict[str, Rates] = Field(default_factory=dict)


class ResponsesPolicy(_Strict):
    """The Responses API (``POST /v1/responses``) for this tenant.

    ``hosted_tools``: hosted tools no upstream can run (web_search, file_search, computer use, code
    interpreter, MCP, shells, custom tools...) are left out of the upstream request and named in
    ``x-gateway-omitted-tools`` (``omit``, so clients such as Codex CLI work unchanged), or refused
    with a 400 naming the tool (``reject``). ``store_ttl_s``: how long ``store: true`` responses are
    kept for ``previous_response_id`` and ``GET /v1/responses/{id}`` (the shared state keeps
    entries for at most 7 days).
    """

    hosted_tools: Literal["omit", "reject"] = "omit"
    store_ttl_s: Annotated[int, Field(ge=60, le=7 * 86400)] = 86400


def _check_key_hashes(v: list[str], where: str) -> list[str]:
    for i, key in enumerate(v):
        if not KEY_HASH.match(key):
            shown = key if key.startswith("sha256:") else key[:4] + "..."
            raise ValueError(
                f"{where}[{i}] ({shown}) must be 'sha256:' followed by 64 lowercase hex digits; store the "
                "hash of a key, never the key (kimi-gateway keys hash KEY prints it)"
            )
    if len(set(v)) != len(v):
        raise ValueError("a key hash is listed twice")
    return v


class App(_Strict):
    """One app of the tenant: the keys it calls with (hashes from the tenant's ``keys``).

    A request belongs to the app of the key that authenticated it: that is what its budget caps and
    the ledger's ``app`` column follow. ``x-gateway-tags`` is any client's to set, so it stays a
    reporting label and can never move spend under another app's cap."""

    keys: Annotated[list[str], Field(min_length=1)]
    description: str = ""

    @field_validator("keys")
    @classmethod
    def _keys(cls, v: list[str]) -> list[str]:
        return _check_key_hashes(v, "keys")


class TenantPolicy(_Strict):
    tenant: str
    description: str = ""
    keys: Annotated[list[str], Field(min_length=1)]
    # app name -> the keys it owns; a key is in at most one app (checked in store.py, with lines)
    apps: dict[str, App] = Field(default_factory=dict)
    models: Annotated[dict[str, VirtualModel], Field(min_length=1)]
    budget: Budget | None = None
    # K2 Thinking's reasoning counts against max_tokens and Moonshot recommends >= 16,000; a request
    # without max_tokens is reserved (and, with routing, sent) with this bound.
    default_max_tokens: Annotated[int, Field(ge=1, le=1_048_576)] | None = None
    # defaults for every virtual model of this tenant (each may override); unset: defaults.yaml's
    strategy: Strategy | None = None
    slo: Slo | None = None
    reasoning: ReasoningPolicy = Field(default_factory=ReasoningPolicy)
    capture: CapturePolicy = Field(default_factory=CapturePolicy)
    rate_limits: RateLimits | None = None
    responses: ResponsesPolicy = Field(default_factory=ResponsesPolicy)
    # normalized: every answer says the virtual model name, OpenAI's usage shape, no empty placeholders
    # (gateway/transforms/envelope.py); raw: the upstream's bytes, for clients that want them
    envelope: Literal["normalized", "raw"] = "normalized"

    @model_validator(mode="after")
    def _rate_limit_keys(self) -> TenantPolicy:
        for key in self.rate_limits.keys if self.rate_limits else ():
            if key != "*" and key not in self.keys:
                raise ValueError(
                    f"rate_limits.keys: {key[:20]}... is not one of this policy's keys (use a hash from "
                    "'keys', or '*' for every key)"
                )
        return self

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, v: str) -> str:
        if not TENANT_NAME.match(v):
            raise ValueError(f"tenant {v!r} must be 1-64 letters, digits, '_', '.' or '-'")
        return v

    @field_validator("keys")
    @classmethod
    def _keys(cls, v: list[str]) -> list[str]:
        return _check_key_hashes(v, "keys")

    @field_validator("apps")
    @classmethod
    def _app_names(cls, v: dict[str, App]) -> dict[str, App]:
        for name in v:
            if not APP_NAME.match(name):
                raise ValueError(f"app name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
        return v


class PolicyDefaults(_Strict):
    """``policies/defaults.yaml``: what every tenant gets unless its own file says otherwise."""

    strategy: Strategy = "balanced"
    slo: Slo = Field(default_factory=Slo)
    default_max_tokens: Annotated[int, Field(ge=1, le=1_048_576)] = 32768
    # budget steps for tenants whose budget names none
    budget_routing: list[BudgetStep] = Field(default_factory=list)

    @field_validator("budget_routing")
    @classmethod
    def _descending(cls, v: list[BudgetStep]) -> list[BudgetStep]:
        return _check_steps(v)
