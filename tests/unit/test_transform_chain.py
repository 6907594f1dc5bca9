"""The response-transform seam: order, hold-back across chunks, flush before [DONE] and errors."""

from __future__ import annotations

from typing import Any

import orjson

from gateway.transforms.chain import StreamChain, apply_whole


class Upper:
    def whole(self, response: dict[str, Any]) -> None:
        response["choices"][0]["message"]["content"] = response["choices"][0]["message"]["content"].upper()

    def chunk(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        chunk["choices"][0]["delta"]["content"] = chunk["choices"][0]["delta"]["content"].upper()
        return [chunk]

    def finish(self) -> list[dict[str, Any]]:
        return []


class HoldOne:
    """Holds each chunk until the next one (like a transform waiting for a split marker)."""

    def __init__(self) -> None:
        self.held: list[dict[str, Any]] = []

    def whole(self, response: dict[str, Any]) -> None:
        response["held"] = True

    def chunk(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        out, self.held = self.held, [chunk]
        return out

    def finish(self) -> list[dict[str, Any]]:
        out, self.held = self.held, []
        return out


def ev(text: str) -> bytes:
    return b"data: " + orjson.dumps({"choices": [{"delta": {"content": text}}]}) + b"\n\n"


def texts(block: bytes) -> list[str]:
    out = []
    for part in block.split(b"\n\n"):
        if part.startswith(b"data: {"):
            data = orjson.loads(part[6:])
            out.append(data["choices"][0]["delta"]["content"] if "choices" in data else "ERROR")
        elif part:
            out.append(part.decode())
    return out


def test_whole_body_runs_every_transform_in_order() -> None:
    body = orjson.dumps({"id": "x", "choices": [{"message": {"content": "hi"}}]})
    out = orjson.loads(apply_whole([Upper(), HoldOne()], body))
    assert out["choices"][0]["message"]["content"] == "HI"
    assert out["held"] is True
    assert list(out)[:2] == ["id", "choices"]  # key order kept


def test_whole_body_that_is_not_json_passes_unchanged() -> None:
    assert apply_whole([Upper()], b"not json") == b"not json"


def test_held_chunks_flush_before_done_and_pass_later_transforms() -> None:
    chain = StreamChain([HoldOne(), Upper()])
    assert texts(chain.feed(ev("a"))) == []
    assert texts(chain.feed(ev("b") + ev("c"))) == ["A", "B"]
    assert texts(chain.feed(b"data: [DONE]\n\n")) == ["C", "data: [DONE]"]
    assert chain.finish() == b""


def test_held_chunks_flush_before_an_error_event() -> None:
    chain = StreamChain([HoldOne()])
    chain.feed(ev("a"))
    error = b'data: {"error":{"message":"cut","type":"upstream_error"}}\n\n'
    assert texts(chain.feed(error)) == ["a", "ERROR"]


def test_cut_stream_flushes_on_finish() -> None:
    chain = StreamChain([HoldOne()])
    chain.feed(ev("a"))
    assert texts(chain.finish()) == ["a"]
    assert chain.finish() == b""
