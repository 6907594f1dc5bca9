"""The schema of one tenant's policy file (``policies/<tenant>.yaml``).

A policy names a tenant, the keys that authenticate it (stored only as ``sha256:<hex>``) and its
virtual models: the model name an app sends, mapped to an ordered list of ``upstream/model``
candidates. Validation here is about one file; cross-file checks live in ``store.py``.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

KEY_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


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
    """Tenant caps, per-app caps (apps are named by the ``app`` tag), and what to do when a request
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


class TenantPolicy(_Strict):
    tenant: str
    description: str = ""
    keys: Annotated[list[str], Field(min_length=1)]
    models: Annotated[dict[str, VirtualModel], Field(min_length=1)]
    budget: Budget | None = None
    # K2 Thinking's reasoning counts against max_tokens and Moonshot recommends >= 16,000; a request
    # without max_tokens is reserved (and, with routing, sent) with this bound.
    default_max_tokens: Annotated[int, Field(ge=1, le=1_048_576)] | None = None
    # defaults for every virtual model of this tenant (each may override); unset: defaults.yaml's
    strategy: Strategy | None = None
    slo: Slo | None = None

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, v: str) -> str:
        if not TENANT_NAME.match(v):
            raise ValueError(f"tenant {v!r} must be 1-64 letters, digits, '_', '.' or '-'")
        return v

    @field_validator("keys")
    @classmethod
    def _keys(cls, v: list[str]) -> list[str]:
        for i, key in enumerate(v):
            if not KEY_HASH.match(key):
                shown = key if key.startswith("sha256:") else key[:4] + "..."
                raise ValueError(
                    f"keys[{i}] ({shown}) must be 'sha256:' followed by 64 lowercase hex digits; store the "
                    "hash of a key, never the key (kimi-gateway keys hash KEY prints it)"
                )
        if len(set(v)) != len(v):
            raise ValueError("a key hash is listed twice")
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
