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


class VirtualModel(_Strict):
    candidates: Annotated[list[str], Field(min_length=1)]
    strategy: Literal["pinned"] = "pinned"

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


class Budget(Caps):
    """Tenant caps, per-app caps (apps are named by the ``app`` tag), and what to do when a request
    does not fit: ``reject`` answers 429 ``budget_exceeded``; ``downgrade`` lowers ``max_tokens`` to
    what fits (never below ``min_max_tokens``) and rejects only when even that does not fit."""

    when_exhausted: Literal["reject", "downgrade"] = "reject"
    min_max_tokens: Annotated[int, Field(ge=1)] = 1024
    apps: dict[str, Caps] = Field(default_factory=dict)


class Rates(_Strict):
    """Requests and tokens per minute. Tokens are admitted on the prompt (an upper bound) plus
    ``max_tokens``, and corrected to the reported usage when the request ends."""

    rpm: Annotated[int, Field(ge=1)] | None = None
    tpm: Annotated[int, Field(ge=1)] | None = None


class RateLimits(Rates):
    """Tenant-wide limits, and per key: ``keys`` maps a key hash of this policy (``sha256:...``) or
    ``"*"`` (every key on its own) to its limits. Every limit that applies must admit a request."""

    keys: dict[str, Rates] = Field(default_factory=dict)


class TenantPolicy(_Strict):
    tenant: str
    description: str = ""
    keys: Annotated[list[str], Field(min_length=1)]
    models: Annotated[dict[str, VirtualModel], Field(min_length=1)]
    budget: Budget | None = None
    # K2 Thinking's reasoning counts against max_tokens and Moonshot recommends >= 16,000; a request
    # without max_tokens is reserved (and, with routing, sent) with this bound.
    default_max_tokens: Annotated[int, Field(ge=1, le=1_048_576)] = 32768
    rate_limits: RateLimits | None = None

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
