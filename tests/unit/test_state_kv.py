"""The key-value state contract (memory backend; the Redis backend runs the same tests)."""

from __future__ import annotations

import pytest

from gateway.state.memory import MemoryKeyValueState


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_put_get_and_expiry() -> None:
    clock = Clock()
    kv = MemoryKeyValueState(clock=clock)
    await kv.put("a", b"1", ttl_s=10)
    assert await kv.get("a") == b"1"
    clock.now += 11
    assert await kv.get("a") is None


async def test_cap_evicts_least_recently_used() -> None:
    kv = MemoryKeyValueState(max_entries=2)
    await kv.put("a", b"1", 60)
    await kv.put("b", b"2", 60)
    assert await kv.get("a") == b"1"  # a is now the most recently used
    await kv.put("c", b"3", 60)
    assert await kv.get_many(["a", "b", "c"]) == [b"1", None, b"3"]
    assert len(kv) == 2


@pytest.mark.parametrize("key", ["missing", ""])
async def test_delete_is_idempotent(key: str) -> None:
    kv = MemoryKeyValueState()
    await kv.put("x", b"v", 60)
    await kv.delete(key)
    await kv.delete("x")
    assert await kv.get("x") is None


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
