"""K2's reasoning sealed into a reasoning item's ``encrypted_content`` for stateless loops.

Clients that keep no server-side state (Codex CLI: ``store: false`` with
``include: ["reasoning.encrypted_content"]``) carry each turn's reasoning to the next request
themselves. K2 needs the original text back on its tool-call turns, but a strip/redact tenant's
clients may not read it, and nobody may hand the gateway reasoning it did not produce. So the text
is sealed with AES-256-GCM: the tenant's name is the associated data, so a blob opens only for the
tenant it was sealed for, and any change to it fails the tag check (the request is then a 400
before any upstream call).

Blob: ``kgw1.`` + base64url(12-byte random nonce || ciphertext || tag).

The key, the same on every replica and across restarts:
* ``responses.seal_key_env`` (gateway config, default ``KIMI_GATEWAY_SEAL_KEY``): when that
  variable is set, the key is derived from it (HKDF-SHA256); set it in production;
* otherwise a random key is created once in the shared state (``state``: memory or Redis) with
  set-if-absent, so every process on that state agrees on it. The state keeps entries for at
  most 7 days, so the key is renewed while it is used; a key that expired (or a Redis that was
  flushed) makes older blobs unopenable, and such a request gets the 400. With the memory state
  each process has its own key: several workers or replicas need Redis or the variable.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import time
from typing import Any

from gateway.errors import service_unavailable
from gateway.state.base import KeyValueState

log = logging.getLogger("gateway.responses")

PREFIX = "kgw1."
KEY_ENTRY = "responses:seal-key"
KEY_TTL_S = 7 * 86400.0
RENEW_EVERY_S = 3600.0
_AAD = b"kimi-gateway/responses/reasoning/v1\x00"


class Sealer:
    """Seals and opens reasoning with one key."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # imported on first use

        self._aead: Any = AESGCM(key)

    def seal(self, tenant: str, text: str) -> str:
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, text.encode("utf-8"), _AAD + tenant.encode())
        return PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")

    def unseal(self, tenant: str, blob: str) -> str | None:
        """The text, or None when the blob is not one this key sealed for ``tenant``, unchanged."""
        from cryptography.exceptions import InvalidTag

        if not blob.startswith(PREFIX):
            return None
        data = blob[len(PREFIX) :]
        try:
            raw = base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))
        except (binascii.Error, ValueError):
            return None
        if len(raw) < 12 + 16:
            return None
        try:
            plain = self._aead.decrypt(raw[:12], raw[12:], _AAD + tenant.encode())
        except InvalidTag:
            return None
        try:
            return str(plain.decode("utf-8"))
        except UnicodeDecodeError:
            return None


def derive_key(secret: str) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"kimi-gateway responses seal v1")
    return bytes(hkdf.derive(secret.encode("utf-8")))


class SealKeys:
    """The process's sealer, from the configured secret or the shared state (module docstring)."""

    def __init__(self, kv: KeyValueState, secret: str | None) -> None:
        self.kv = kv
        self._sealer: Sealer | None = Sealer(derive_key(secret)) if secret else None
        self._from_secret = bool(secret)
        self._key: bytes | None = None
        self._checked_at = 0.0

    @property
    def source(self) -> str:
        return "configured secret" if self._from_secret else "shared state"

    async def sealer(self) -> Sealer:
        """The sealer; 503 when the key lives in a shared state that does not answer."""
        if self._sealer is not None and (self._from_secret or time.monotonic() - self._checked_at < RENEW_EVERY_S):
            return self._sealer
        candidate = self._key or os.urandom(32)
        current = await self.kv.put_if_absent(KEY_ENTRY, candidate, KEY_TTL_S)
        if current is not None and len(current) != 32:  # not a key this gateway wrote: replace it
            log.warning("the shared state held an invalid reasoning sealing key; a new one replaces it")
            await self.kv.put(KEY_ENTRY, candidate, KEY_TTL_S)
            current = await self.kv.get(KEY_ENTRY)
        if current is None or len(current) != 32:
            if self._sealer is not None:  # renewal failed: keep the key this process already agreed on
                return self._sealer
            raise service_unavailable(
                "The gateway's shared state did not answer, and it holds the key that seals reasoning "
                "(encrypted_content); try again, or set the sealing secret (responses.seal_key_env).",
                code="state_unavailable",
            )
        if current == self._key:
            await self.kv.put(KEY_ENTRY, current, KEY_TTL_S)  # renew while in use
        elif self._key is not None:
            log.warning(
                "the shared reasoning sealing key changed (expired or state flushed); older blobs no longer open"
            )
        self._key = current
        self._sealer = Sealer(current)
        self._checked_at = time.monotonic()
        return self._sealer
