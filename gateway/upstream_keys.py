"""An upstream's key pool in the config: ``api_keys``, several provider keys behind one upstream.

Teams at volume hold several provider keys (separate projects or accounts, each with its own tier
limits). Declaring one upstream per key loses the routing that treats them as one provider, so an
upstream may list them instead::

    api_keys:
      - MOONSHOT_KEY_A                      # an environment variable, every limit unknown
      - {env: MOONSHOT_KEY_B, label: b, rpm: 200, tpm: 2000000, max_concurrency: 50}
      - {file: keys/moonshot-c, label: c, weight: 2}

Secrets never sit in YAML; an entry names where its key is. A key's ``label`` (default: the
variable's name, or the file's name) is what metrics, logs, the ledger and route reasons show: the
key itself never leaves the process except in the Authorization header.

This module is config (the foundation layer): shapes, and resolving each entry to its secret with
``file:line`` problems; choosing a key per request is ``gateway/routing/keys.py``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.yamlfile import YamlDoc

_LABEL = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
KeySelection = Literal["cache_aware", "round_robin", "least_loaded"]


class PoolKey(BaseModel):
    """One key of a pool: where its secret is and the provider's limits for it (None: unknown)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    env: str | None = None
    file: str | None = None
    label: str | None = None
    rpm: Annotated[int, Field(ge=1)] | None = None  # requests per minute
    tpm: Annotated[int, Field(ge=1)] | None = None  # prompt + max_tokens per minute (Moonshot's count)
    max_concurrency: Annotated[int, Field(ge=1)] | None = None
    weight: Annotated[float, Field(gt=0, le=1000)] = 1.0

    @model_validator(mode="before")
    @classmethod
    def _plain_name(cls, data: Any) -> Any:
        """A bare string is the name of the environment variable holding the key."""
        if isinstance(data, str):
            return {"env": data}
        if isinstance(data, dict):
            for secret in ("key", "api_key", "value", "secret", "token"):
                if secret in data:
                    raise ValueError(
                        f"'{secret}' holds a secret, and secrets never go in YAML: name the environment "
                        "variable that holds it with env (or a file with file)"
                    )
        return data

    @model_validator(mode="after")
    def _one_source(self) -> PoolKey:
        if bool(self.env) == bool(self.file):
            raise ValueError("each key names exactly one of env (an environment variable) or file")
        if self.label is not None and not _LABEL.match(self.label):
            raise ValueError(f"label {self.label!r} must be 1-64 of letters, digits and _.:-")
        return self

    @property
    def name(self) -> str:
        """The label metrics and logs show."""
        if self.label:
            return self.label
        if self.env:
            return self.env
        return PurePath(self.file or "").name or "key"


@dataclass(frozen=True, slots=True)
class ResolvedKey:
    """A pool key with its secret read; ``fingerprint`` tells shared state one secret from another
    (a rotated key starts with fresh quotas and no revocation) without ever holding the secret."""

    label: str
    secret: str
    rpm: int | None
    tpm: int | None
    max_concurrency: int | None
    weight: float

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.secret.encode()).hexdigest()[:12]

    def __repr__(self) -> str:  # never the secret, even in a traceback's locals
        return f"ResolvedKey(label={self.label!r})"


def check_pool(keys: Sequence[PoolKey], single_key: bool) -> None:
    """Shape rules of a pool that pydantic alone cannot say (raised as the upstream's own error)."""
    if single_key:
        raise ValueError("give api_keys (a pool) or api_key_env/api_key_file (one key), not both")
    seen: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key.name in seen:
            raise ValueError(f"api_keys[{i}] and api_keys[{seen[key.name]}] have the same label {key.name!r}")
        seen[key.name] = i
        source = key.env or key.file
        for j, other in enumerate(keys[:i]):
            if (other.env or other.file) == source and bool(other.env) == bool(key.env):
                raise ValueError(f"api_keys[{i}] names the same {'variable' if key.env else 'file'} as api_keys[{j}]")


def resolve_pool(
    doc: YamlDoc, upstream: str, keys: Sequence[PoolKey], env: Mapping[str, str]
) -> tuple[list[ResolvedKey], list[str]]:
    """Every key's secret, or ``file:line`` problems naming the entry (a missing variable, an
    unreadable file, the same secret twice: two entries that are one key would double its quota)."""
    out: list[ResolvedKey] = []
    problems: list[str] = []
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        where: tuple[str | int, ...] = ("upstreams", upstream, "api_keys", i)
        if key.env:
            value = (env.get(key.env) or "").strip()
            if not value:
                problems.append(
                    doc.problem(where, f"environment variable {key.env} is not set (it must hold key {key.name!r})")
                )
                continue
        else:
            path = (doc.path.parent / (key.file or "")).resolve()
            try:
                value = path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                problems.append(doc.problem(where, f"cannot read {path}: {exc.strerror or exc}"))
                continue
            if not value:
                problems.append(doc.problem(where, f"{path} is empty"))
                continue
        if value in first:
            problems.append(
                doc.problem(
                    where,
                    f"key {key.name!r} is the same secret as api_keys[{first[value]}]; one key listed twice "
                    "would be sent twice its quota",
                )
            )
            continue
        first[value] = i
        out.append(ResolvedKey(key.name, value, key.rpm, key.tpm, key.max_concurrency, key.weight))
    return out, problems


def resolve_single(
    doc: YamlDoc, upstream: str, key_env: str | None, key_file: str | None, env: Mapping[str, str]
) -> tuple[str | None, str | None]:
    """An upstream's one key (``api_key_env`` or ``api_key_file``), or a problem line naming it."""
    if key_env:
        value = env.get(key_env)
        if not value:
            return None, doc.problem(
                ("upstreams", upstream, "api_key_env"),
                f"environment variable {key_env} is not set (it must hold this upstream's API key)",
            )
        return value.strip(), None
    if key_file:
        key_path = (doc.path.parent / key_file).resolve()
        try:
            value = key_path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            return None, doc.problem(
                ("upstreams", upstream, "api_key_file"), f"cannot read {key_path}: {exc.strerror or exc}"
            )
        if not value:
            return None, doc.problem(("upstreams", upstream, "api_key_file"), f"{key_path} is empty")
        return value, None
    return None, None
