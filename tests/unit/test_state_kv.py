"""The key-value state contract, run against memory and against a real Redis."""

from __future__ import annotations

import asyncio

import pytest

from gateway.state.memory import MemoryKeyValueState
from tests.unit.conftest import Backend


async def test_put_get_and_expiry(backend: Backend) -> None:
    kv = backend.kv()
    await kv.put("a", b"1", ttl_s=0.15)
    assert await kv.get("a") == b"1"
    await asyncio.sleep(0.3)
    assert await kv.get("a") is None


async def test_put_replaces_value_and_lifetime(backend: Backend) -> None:
    kv = backend.kv()
    await kv.put("a", b"old", ttl_s=0.15)
    await kv.put("a", b"new", ttl_s=60)
    await asyncio.sleep(0.3)
    assert await kv.get("a") == b"new"


async def test_get_many_keeps_order_and_reports_misses(backend: Backend) -> None:
    kv = backend.kv()
    await kv.put("affinity:t:1", b"\x00binary\xff", 60)
    await kv.put("affinity:t:3", b"3", 60)
    assert await kv.get_many(["affinity:t:1", "affinity:t:2", "affinity:t:3"]) == [b"\x00binary\xff", None, b"3"]
    assert await kv.get_many([]) == []


@pytest.mark.parametrize("key", ["missing", ""])
async def test_delete_is_idempotent(backend: Backend, key: str) -> None:
    kv = backend.kv()
    await kv.put("x", b"v", 60)
    await kv.delete(key)
    await kv.delete("x")
    assert await kv.get("x") is None


async def test_cap_evicts_least_recently_used() -> None:
    """Memory holds at most max_entries; Redis bounds entries by their TTL (see the TTL test)."""
    kv = MemoryKeyValueState(max_entries=2)
    await kv.put("a", b"1", 60)
    await kv.put("b", b"2", 60)
    assert await kv.get("a") == b"1"  # a is now the most recently used
    await kv.put("c", b"3", 60)
    assert await kv.get_many(["a", "b", "c"]) == [b"1", None, b"3"]
    assert len(kv) == 2


async def test_byte_cap_evicts_least_recently_used_values() -> None:
    """Kept reasoning can be large: the memory backend bounds the total size, not only the count."""
    kv = MemoryKeyValueState(max_bytes=10)
    await kv.put("a", b"1234", 60)
    await kv.put("b", b"5678", 60)
    await kv.put("a", b"12", 60)  # replacing a value counts only the new one
    await kv.put("c", b"abcdef", 60)  # 2 + 4 + 6 > 10: b, the least recently used, goes
    assert await kv.get_many(["a", "b", "c"]) == [b"12", None, b"abcdef"]
    await kv.delete("c")
    await kv.put("d", b"12345678", 60)
    assert await kv.get_many(["a", "d"]) == [b"12", b"12345678"]
