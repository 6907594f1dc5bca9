"""Upstreams of ``kind: litellm``: any provider litellm supports (Anthropic, Bedrock, Gemini...).

litellm is imported only when such an upstream is configured (it is heavy, and the hot path for
OpenAI-compatible upstreams never touches it). The adapter keeps the :class:`Upstream` contract:
chat/completions bytes in, chat/completions bytes out. It calls ``litellm.acompletion`` and writes
the answer back as OpenAI JSON or SSE (reasoning as ``reasoning_content``, tool calls in OpenAI's
shape, usage in OpenAI's shape with cached tokens), so the same response transforms, metering and
front ends apply. Costs come from the gateway's own prices file, never litellm's table (which is
therefore loaded from the installed package, not fetched).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

import orjson

from gateway.config import UpstreamConfig
from gateway.upstreams.base import FailureKind, Upstream, UpstreamFailure, UpstreamReply
from gateway.upstreams.usage import parse_usage

# chat/completions fields forwarded to litellm; the rest (vendor extras meant for other upstreams)
# would otherwise reach the provider's request body
FORWARDED = (
    "messages",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stop",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "response_format",
    "seed",
    "user",
    "reasoning_effort",
    "thinking",
)
DONE = b"data: [DONE]\n\n"


def import_litellm() -> Any:
    """litellm, set up for a server: local price map (no fetch at import), no debug banners."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    litellm.suppress_debug_info = True
    return litellm


def _plain(obj: Any) -> Any:
    """litellm's response objects as plain dicts and lists."""
    if hasattr(obj, "model_dump"):
        return obj.model_dump()
    if isinstance(obj, dict):
        return obj
    return obj


def _calls(raw: Any, stream: bool) -> list[dict[str, Any]]:
    out = []
    for i, call in enumerate(raw or ()):
        call = _plain(call)
        if not isinstance(call, dict):
            continue
        function = _plain(call.get("function")) or {}
        entry: dict[str, Any] = {}
        if stream:
            entry["index"] = call.get("index", i) if isinstance(call.get("index"), int) else i
        if call.get("id"):
            entry["id"] = call["id"]
        if call.get("id") or not stream:
            entry["type"] = call.get("type") or "function"
        fn: dict[str, Any] = {}
        if function.get("name"):
            fn["name"] = function["name"]
        if function.get("arguments") is not None:
            fn["arguments"] = function["arguments"]
        entry["function"] = fn
        out.append(entry)
    return out


def _usage(raw: Any) -> dict[str, Any] | None:
    raw = _plain(raw)
    if not isinstance(raw, dict):
        return None
    details = raw.get("prompt_tokens_details") or {}
    merged = dict(raw)
    if isinstance(details, dict) and details.get("cached_tokens") is None:
        merged.pop("prompt_tokens_details", None)
    usage = parse_usage(merged)
    return usage.openai_shape() if usage is not None else None


def _envelope(data: dict[str, Any], kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
    """An OpenAI answer or chunk around ``choices``, with usage when litellm reported it."""
    body: dict[str, Any] = {
        "id": data.get("id"),
        "object": kind,
        "created": data.get("created"),
        "model": data.get("model"),
        "choices": choices,
    }
    usage = _usage(data.get("usage"))
    if usage is not None:
        body["usage"] = usage
    return body


def completion_dict(response: Any) -> dict[str, Any]:
    """A litellm ``ModelResponse`` → a chat.completion dict."""
    data = _plain(response)
    choices = []
    for i, choice in enumerate(data.get("choices") or ()):
        message = _plain(choice.get("message")) or {}
        out: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
        if message.get("reasoning_content"):
            out["reasoning_content"] = message["reasoning_content"]
        calls = _calls(message.get("tool_calls"), stream=False)
        if calls:
            out["tool_calls"] = calls
        choices.append({"index": choice.get("index", i), "message": out, "finish_reason": choice.get("finish_reason")})
    return _envelope(data, "chat.completion", choices)


def chunk_dict(chunk: Any) -> dict[str, Any]:
    """A litellm stream chunk → a chat.completion.chunk dict."""
    data = _plain(chunk)
    choices = []
    for i, choice in enumerate(data.get("choices") or ()):
        delta = _plain(choice.get("delta")) or {}
        out: dict[str, Any] = {}
        if delta.get("role"):
            out["role"] = delta["role"]
        if delta.get("reasoning_content"):
            out["reasoning_content"] = delta["reasoning_content"]
        if delta.get("content"):
            out["content"] = delta["content"]
        calls = _calls(delta.get("tool_calls"), stream=True)
        if calls:
            out["tool_calls"] = calls
        choices.append({"index": choice.get("index", i), "delta": out, "finish_reason": choice.get("finish_reason")})
    return _envelope(data, "chat.completion.chunk", choices)


def sse(chunk: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


class _Reply(UpstreamReply):
    def __init__(
        self,
        status: int,
        body: bytes = b"",
        events: AsyncIterator[Any] | None = None,
        first: bytes = b"",
        idle_s: float = 0.0,
        retry_after: str | None = None,
    ) -> None:
        self.status = status
        self.retry_after = retry_after
        self.content_type = "text/event-stream" if events is not None else "application/json"
        self._body = body
        self._events = events
        self._first = first
        self._idle_s = idle_s

    async def read(self) -> bytes:
        if self._events is None:
            return self._body
        return b"".join([c async for c in self.chunks()])

    async def chunks(self) -> AsyncIterator[bytes]:
        if self._events is None:
            yield self._body
            return
        if self._first:
            yield self._first
            self._first = b""
        events = self._events
        while True:
            try:
                async with asyncio.timeout(self._idle_s):
                    chunk = await anext(events)
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise UpstreamFailure(
                    "idle_timeout", f"upstream sent nothing for {self._idle_s:g} s in the middle of a stream"
                ) from None
            except Exception as exc:
                raise UpstreamFailure("cut", f"upstream stream broke: {_message(exc)}") from None
            yield sse(chunk_dict(chunk))
        self._events = None
        yield DONE

    async def aclose(self, *, abort: bool = False) -> None:
        events, self._events = self._events, None
        close = getattr(events, "aclose", None)
        if close is not None:
            with contextlib.suppress(Exception):  # closing a provider stream must never fail the request
                await close()


def _message(exc: BaseException) -> str:
    return str(getattr(exc, "message", None) or exc)[:500]


class LiteLLMUpstream(Upstream):
    """chat/completions through ``litellm.acompletion``."""

    def __init__(self, name: str, config: UpstreamConfig, api_key: str | None) -> None:
        self.name = name
        self.config = config
        self.reasoning_field = config.reasoning_field
        self.tool_call_markers = config.tool_call_markers
        self._api_key = api_key
        self._litellm: Any = None

    async def start(self) -> None:
        if self._litellm is None:
            self._litellm = import_litellm()

    def _kwargs(self, request: dict[str, Any], stream: bool) -> dict[str, Any]:
        kwargs: dict[str, Any] = {k: request[k] for k in FORWARDED if request.get(k) is not None}
        kwargs["model"] = request.get("model")
        kwargs["stream"] = stream
        kwargs["timeout"] = self.config.timeouts.total_s
        kwargs["drop_params"] = True  # params a provider lacks are dropped, not a 400 from litellm
        kwargs["num_retries"] = 0
        if stream:
            kwargs["stream_options"] = {"include_usage": True}
        if self._api_key:
            kwargs["api_key"] = self._api_key
        if self.config.base_url:
            kwargs["api_base"] = self.config.base_url
        if self.config.headers:
            kwargs["extra_headers"] = dict(self.config.headers)
        return kwargs

    def _failure(self, exc: Exception, stream: bool) -> UpstreamReply:
        litellm = self._litellm
        if isinstance(exc, litellm.Timeout):
            kind: FailureKind = "first_byte_timeout" if stream else "total_timeout"
            raise UpstreamFailure(kind, f"upstream '{self.name}' did not answer in time") from None
        if isinstance(exc, litellm.APIConnectionError):
            raise UpstreamFailure("connect", f"upstream '{self.name}' could not be reached: {_message(exc)}") from None
        status = getattr(exc, "status_code", None)
        if not isinstance(status, int) or status < 400:
            raise UpstreamFailure("protocol", f"upstream '{self.name}' failed: {_message(exc)}") from None
        body = {"error": {"message": _message(exc), "type": type(exc).__name__, "code": None}}
        response = getattr(exc, "response", None)
        headers = getattr(response, "headers", None)
        retry_after = headers.get("retry-after") if headers is not None else None
        return _Reply(status, orjson.dumps(body), retry_after=retry_after)

    async def send(self, body: bytes, *, stream: bool, key: str | None = None) -> UpstreamReply:
        await self.start()
        try:
            request = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise UpstreamFailure("protocol", f"request body is not JSON: {exc}") from None
        t = self.config.timeouts
        kwargs = self._kwargs(request, stream)
        try:
            if not stream:
                async with asyncio.timeout(t.total_s):
                    response = await self._litellm.acompletion(**kwargs)
                return _Reply(200, orjson.dumps(completion_dict(response)))
            async with asyncio.timeout(t.first_byte_s):
                response = await self._litellm.acompletion(**kwargs)
                events = response.__aiter__()
                try:
                    first = sse(chunk_dict(await anext(events)))
                except StopAsyncIteration:
                    return _Reply(200, events=_empty(), first=DONE, idle_s=t.idle_s)
            return _Reply(200, events=events, first=first, idle_s=t.idle_s)
        except TimeoutError:
            kind: FailureKind = "first_byte_timeout" if stream else "total_timeout"
            raise UpstreamFailure(kind, f"upstream '{self.name}' did not answer in time") from None
        except UpstreamFailure:
            raise
        except Exception as exc:
            return self._failure(exc, stream)


async def _empty() -> AsyncIterator[Any]:
    return
    yield
