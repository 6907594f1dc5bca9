"""Deterministic text, token counts and tool arguments for simulated replies.

Nothing here is random at request time: the same request against the same seed yields the same bytes,
which keeps tests exact and lets the hot path reuse precomputed pieces.

Token counts are an **approximation**: one token per 4 bytes of UTF-8 (rounded up), applied to the
canonical JSON of prompt elements and to generated text.  Real K2 tokenization differs, but the
numbers move the right way (longer prompt, more tokens) and are cheap to compute.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

REASONING_TEXT = (
    "The user wants a clear answer. Let me restate the question, recall the relevant facts, check "
    "the details that could change the answer, consider an edge case or two, and then decide on a "
    "short, well organised reply that addresses exactly what was asked. "
)
ANSWER_TEXT = (
    "This answer comes from the kimi-gateway simulator. No model runs behind it, but the reply "
    "follows the upstream's wire format closely, so gateways, tests and demos can rely on its shape, "
    "timing and usage numbers. "
)
AFTER_TOOLS_TEXT = (
    "Based on the tool results, here is the summary. The tools answered without errors and their "
    "output is consistent, so the simulated conclusion follows directly from what they returned. "
)

# placeholder strings for tool arguments; location-like properties get city names so the classic
# get_weather example reads naturally, and parallel calls get different cities
CITIES = ("Beijing", "Shanghai", "Shenzhen", "Hangzhou", "Chengdu", "Guangzhou")
_LOCATION_HINTS = ("city", "location", "place", "region", "country", "where", "address")
WORDS_PER_PIECE = 3


def approx_tokens(data: bytes) -> int:
    """Approximate token count of UTF-8 bytes: ceil(len / 4), at least 1 for non-empty input."""
    return (len(data) + 3) >> 2


def text_tokens(text: str) -> int:
    """Approximate token count of a string (see `approx_tokens`)."""
    return (len(text.encode()) + 3) >> 2


def split_pieces(text: str, words: int = WORDS_PER_PIECE) -> tuple[str, ...]:
    """Split text into stream deltas of `words` words each, keeping the spaces so joins are exact."""
    tokens = text.split(" ")
    out: list[str] = []
    for i in range(0, len(tokens), words):
        piece = " ".join(tokens[i : i + words])
        if i + words < len(tokens):
            piece += " "
        if piece:
            out.append(piece)
    return tuple(out)


class Pool:
    """A cyclic pool of text pieces with precomputed token counts.

    `take(n, offset)` returns n consecutive pieces starting at `offset` (wrapping), so any number of
    chunks can be produced from a fixed text without building strings per request.
    """

    __slots__ = ("pieces", "tokens")

    def __init__(self, text: str) -> None:
        self.pieces = split_pieces(text)
        self.tokens = tuple(text_tokens(p) for p in self.pieces)

    def take(self, n: int, offset: int) -> tuple[list[str], list[int]]:
        size = len(self.pieces)
        start = offset % size
        if start + n <= size:  # the common case: one slice, no modulo per piece
            return list(self.pieces[start : start + n]), list(self.tokens[start : start + n])
        idx = [(start + i) % size for i in range(n)]
        return [self.pieces[i] for i in idx], [self.tokens[i] for i in idx]


REASONING = Pool(REASONING_TEXT)
ANSWER = Pool(ANSWER_TEXT)
AFTER_TOOLS = Pool(AFTER_TOOLS_TEXT)


def truncate_to_tokens(text: str, tokens: int) -> str:
    """Cut `text` so that it counts as at most `tokens` tokens (used when max_tokens runs out)."""
    if tokens <= 0:
        return ""
    data = text.encode()[: tokens * 4]
    return data.decode(errors="ignore")


def _schema_type(schema: Mapping[str, Any]) -> str | None:
    kind = schema.get("type")
    if isinstance(kind, list):  # e.g. ["string", "null"]: use the first non-null type
        kind = next((k for k in kind if k != "null"), None)
    return kind if isinstance(kind, str) else None


def placeholder(name: str, schema: Any, call_index: int, depth: int = 0) -> Any:
    """A deterministic value that satisfies a (simple) JSON-schema property.

    Strings get "Beijing"-like placeholders, numbers 1, booleans true, arrays one item, objects their
    required properties.  Enums and consts win over types, so validated schemas stay valid.
    """
    if not isinstance(schema, Mapping):
        return "example"
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    kind = _schema_type(schema)
    if kind == "string" or kind is None:
        lowered = name.lower()
        if any(hint in lowered for hint in _LOCATION_HINTS):
            return CITIES[call_index % len(CITIES)]
        return "example"
    if kind in ("integer", "number"):
        return 1
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    if kind == "array":
        if depth >= 4:
            return []
        return [placeholder(name, schema.get("items"), call_index, depth + 1)]
    if kind == "object":
        return arguments_for(schema, call_index, depth + 1) if depth < 4 else {}
    return "example"


def arguments_for(parameters: Any, call_index: int, depth: int = 0) -> dict[str, Any]:
    """Arguments for one call: a value for each `required` property of the parameters schema."""
    if not isinstance(parameters, Mapping):
        return {}
    required = parameters.get("required")
    props = parameters.get("properties")
    if not isinstance(required, Sequence) or isinstance(required, str):
        return {}
    props = props if isinstance(props, Mapping) else {}
    return {key: placeholder(key, props.get(key), call_index, depth) for key in required if isinstance(key, str)}
