"""Token usage from every place upstreams put it.

* top-level ``usage`` (OpenAI, vLLM, the ``choices: []`` chunk of ``stream_options.include_usage``);
* ``choices[i].usage`` (Moonshot puts stream usage inside the last chunk's choice);
* cached prompt tokens from ``usage.cached_tokens`` (Moonshot), ``prompt_tokens_details.cached_tokens``
  (OpenAI, vLLM) or ``prompt_cache_hit_tokens`` (DeepSeek-style);
* ``completion_tokens_details.reasoning_tokens`` where given.

Peer gateways lose Moonshot's top-level ``cached_tokens`` in streams and bill cache hits at the miss
price; reading every location is what keeps the bill right.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

# a usage object (not "usage": null) somewhere in an SSE event
USAGE_RE = re.compile(rb'"usage"\s*:\s*\{')


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def openai_shape(self) -> dict[str, Any]:
        """OpenAI's usage object, with Moonshot's top-level ``cached_tokens`` kept for Kimi clients."""
        out: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "cached_tokens": self.cached_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }
        if self.reasoning_tokens:
            out["completion_tokens_details"] = {"reasoning_tokens": self.reasoning_tokens}
        return out


def _int(value: Any) -> int:
    # type() rather than isinstance(): a bool is an int to isinstance, and never a token count
    return value if type(value) is int and value > 0 else 0


def parse_usage(obj: Any) -> Usage | None:
    """A :class:`Usage` from one usage object in any provider's dialect, or None."""
    if not isinstance(obj, dict):
        return None
    get = obj.get
    prompt = _int(get("prompt_tokens") or get("input_tokens"))
    completion = _int(get("completion_tokens") or get("output_tokens"))
    if not (prompt or completion):
        return None
    cached = _int(get("cached_tokens"))
    if not cached:
        details = get("prompt_tokens_details")
        if isinstance(details, dict):
            cached = _int(details.get("cached_tokens"))
        if not cached:
            cached = _int(get("prompt_cache_hit_tokens")) or _int(get("cache_read_input_tokens"))
    cdetails = get("completion_tokens_details")
    reasoning = _int(cdetails.get("reasoning_tokens")) if isinstance(cdetails, dict) else 0
    return Usage(prompt, completion, min(cached, prompt) if prompt else cached, reasoning)


def usage_of_response(body: dict[str, Any]) -> Usage | None:
    """Usage of a whole (non-stream) response or one stream chunk.

    Top level wins; otherwise the choices' own usage (Moonshot, several choices with ``n > 1``:
    prompt counted once, completions added).
    """
    top = parse_usage(body.get("usage"))
    if top is not None:
        return top
    total: Usage | None = None
    choices = body.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if isinstance(choice, dict):
                found = parse_usage(choice.get("usage"))
                if found is None:
                    continue
                if total is None:
                    total = found
                else:
                    total.completion_tokens += found.completion_tokens
                    total.reasoning_tokens += found.reasoning_tokens
    return total


_LAST_USAGE = re.compile(rb'"usage"\s*:\s*')


def usage_of_body(raw: bytes) -> Usage | None:
    """Usage of a whole response body, parsing only the usage object when it comes last (it does in
    every provider's answers); the whole body only when that fails."""
    key = raw.rfind(b'"usage"')
    match = _LAST_USAGE.match(raw, key) if key >= 0 else None
    if match is not None:
        # when usage is the last key, it spans from here to the body's closing brace
        try:
            found = parse_usage(orjson.loads(raw[match.end() : raw.rfind(b"}")]))
        except orjson.JSONDecodeError:
            found = None
        if found is not None:
            return found
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return usage_of_response(body) if isinstance(body, dict) else None
