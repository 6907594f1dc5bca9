"""Applying response transforms to the bytes the pipeline relays."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from gateway.metering.stream import _data, _events
from gateway.transforms.base import Chunk, ResponseTransform


def apply_whole(transforms: Sequence[ResponseTransform], payload: bytes) -> bytes:
    """A non-stream body after every transform; bodies that are not JSON objects pass unchanged."""
    try:
        parsed = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return payload
    if not isinstance(parsed, dict):
        return payload
    return apply_parsed(transforms, parsed)


def apply_parsed(transforms: Sequence[ResponseTransform], parsed: dict[str, Any]) -> bytes:
    """A non-stream body the caller parsed already (to check it) after every transform, as bytes."""
    for transform in transforms:
        transform.whole(parsed)
    return orjson.dumps(parsed)


def _encode(chunks: list[Chunk]) -> bytes:
    return b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks)


class StreamChain:
    """Runs SSE blocks (whole events) through the transforms in order.

    Events that are not JSON objects (``[DONE]``, comments) and error events pass as they are; before
    ``[DONE]`` or an error event every transform flushes what it held back.
    """

    __slots__ = ("_finished", "_transforms")

    def __init__(self, transforms: Sequence[ResponseTransform]) -> None:
        self._transforms = list(transforms)
        self._finished = False

    def _run(self, chunks: list[Chunk], start: int = 0) -> list[Chunk]:
        for transform in self._transforms[start:]:
            out: list[Chunk] = []
            for c in chunks:
                out.extend(transform.chunk(c))
            chunks = out
        return chunks

    def _flush(self) -> list[Chunk]:
        if self._finished:
            return []
        self._finished = True
        held: list[Chunk] = []
        for i, transform in enumerate(self._transforms):
            # what an earlier transform flushes still passes through the later ones
            held = self._run(held, i) if held and i else held
            held.extend(transform.finish())
        return held

    def feed(self, block: bytes) -> bytes:
        out: list[bytes] = []
        for event in _events(block):
            data = _data(event)
            if data == b"[DONE]":
                out.append(_encode(self._flush()))
                out.append(event)
                continue
            parsed: Any = None
            if data[:1] == b"{":
                try:
                    parsed = orjson.loads(data)
                except orjson.JSONDecodeError:
                    parsed = None
            if not isinstance(parsed, dict):
                out.append(event)
                continue
            if "error" in parsed:  # the stream ends here: what was held goes out before the error
                out.append(_encode(self._flush()))
                out.append(event)
                continue
            out.append(_encode(self._run([parsed])))
        return b"".join(out)

    def finish(self) -> bytes:
        """What is still held when a stream ends without ``[DONE]`` (cut or errored)."""
        return _encode(self._flush())
