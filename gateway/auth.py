"""Bearer key → tenant.

Keys are stored only as SHA-256 hashes. The presented key is hashed once, the hash indexes the key
table, and the stored hash is compared in constant time, so neither the lookup nor the comparison
leaks how much of a guess was right. Keys never reach logs or upstreams.
"""

from __future__ import annotations

import hashlib
import hmac

from gateway.errors import GatewayError, authentication_error
from gateway.policy.store import KeyEntry, PolicySet

_MISSING = authentication_error(
    "Missing API key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>' on /v1/messages)."
)


def hash_key(key: str) -> str:
    """The ``sha256:<hex>`` form that policy files store."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def bearer_token(authorization: bytes | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.decode("latin-1").strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None


def authenticate(policies: PolicySet, key: str | None) -> KeyEntry:
    """The key's tenant entry, or a 401 :class:`GatewayError` in OpenAI's shape."""
    if not key:
        raise _MISSING
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()
    entry = policies.keys.get(digest)
    if entry is None or not hmac.compare_digest(entry.digest, digest):
        raise GatewayError(401, "Incorrect API key provided.", type="authentication_error", code="invalid_api_key")
    return entry
