"""Token counts when an upstream reports none: tiktoken, fully offline.

Kimi's tokenizer is not published in a form tiktoken loads, so estimates use ``cl100k_base`` (a
100k-vocabulary BPE of similar granularity on English and code; it is lighter than o200k_base: about
40 MB at peak instead of 85); rows priced from these counts are marked ``estimated``. The encoding
file ships inside the package (``gateway/data``): nothing is downloaded at run time, and the file's
SHA-256 is checked on load. Loading takes ~0.15 s, so callers on the event loop run counts in a
thread (``Meter`` does).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import tiktoken
from tiktoken.load import load_tiktoken_bpe

DATA = Path(__file__).resolve().parent.parent / "data"
CL100K_FILE = DATA / "cl100k_base.tiktoken"
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
# per-message framing of chat templates (role markers, separators); a small, conservative constant
TOKENS_PER_MESSAGE = 4
# cl100k_base's pattern (tiktoken_ext.openai_public.cl100k_base)
_CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|"""
    r"""\s+(?!\S)|\s"""
)


@functools.cache
def encoding() -> tiktoken.Encoding:
    ranks = load_tiktoken_bpe(str(CL100K_FILE), expected_hash=CL100K_SHA256)
    enc = tiktoken.Encoding(
        name="cl100k_base",
        pat_str=_CL100K_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 100257, "<|endofprompt|>": 100276},
    )
    # the Rust core holds its own copy of the ranks; counting never needs the Python one (~25 MB)
    enc._mergeable_ranks = {}
    return enc


def count_text(text: str) -> int:
    if not text:
        return 0
    return len(encoding().encode_ordinary(text))


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def count_prompt(body: dict[str, Any]) -> int:
    """Prompt tokens of a chat/completions body: message texts, tool calls, tool schemas."""
    import orjson

    parts: list[str] = []
    messages = body.get("messages") or []
    for message in messages:
        if not isinstance(message, dict):
            continue
        parts.append(_content_text(message.get("content")))
        for key in ("reasoning_content", "reasoning"):
            if isinstance(message.get(key), str):
                parts.append(message[key])
        if message.get("tool_calls"):
            parts.append(orjson.dumps(message["tool_calls"]).decode())
    if body.get("tools"):
        parts.append(orjson.dumps(body["tools"]).decode())
    return count_text("\n".join(parts)) + TOKENS_PER_MESSAGE * len(messages)


def upper_bound_tokens(raw_body: bytes) -> int:
    """A cheap bound on prompt tokens with no tokenizer: no BPE token is shorter than half a byte
    of UTF-8 on average for real text, so bytes/2 over-counts English ~2x and CJK only slightly."""
    return len(raw_body) // 2 + 16


def requested_max_tokens(body: dict[str, Any]) -> int | None:
    """The output bound a chat/completions request asked for (``max_completion_tokens`` first), or None."""
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None
