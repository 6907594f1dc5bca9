"""Token counts when an upstream reports none: tiktoken, fully offline.

Kimi's tokenizer is not published in a form tiktoken loads, so estimates use ``o200k_base`` (a
modern 200k-vocabulary BPE of similar granularity); rows priced from these counts are marked
``estimated``. The encoding file ships inside the package (``gateway/data``): nothing is downloaded
at run time, and the file's SHA-256 is checked on load.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import tiktoken
from tiktoken.load import load_tiktoken_bpe

DATA = Path(__file__).resolve().parent.parent / "data"
O200K_FILE = DATA / "o200k_base.tiktoken"
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
# per-message framing of chat templates (role markers, separators); a small, conservative constant
TOKENS_PER_MESSAGE = 4
# o200k_base's pattern (tiktoken_ext.openai_public.o200k_base)
_O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)


@functools.cache
def encoding() -> tiktoken.Encoding:
    ranks = load_tiktoken_bpe(str(O200K_FILE), expected_hash=O200K_SHA256)
    return tiktoken.Encoding(
        name="o200k_base",
        pat_str=_O200K_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
    )


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
