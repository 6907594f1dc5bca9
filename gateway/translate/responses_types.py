"""What the Responses front end (``gateway/api/responses.py``) hands the answer translation
(``gateway/translate/responses_response.py``) for one ``POST /v1/responses`` request.

A leaf module: the request side builds a :class:`ResponseContext`, the answer side renders the
pipeline's chat/completions answer (one JSON body, or its SSE chunks) into the Responses object or
event sequence with it. Neither side imports the other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def default_echo() -> dict[str, Any]:
    """The request fields a response object repeats, with the API's values for a request that sets
    none of them, in the API's order (fresh: objects get stored). A translated request's echo
    (``translate/responses_request.py``) has the same keys in the same order."""
    return {
        "background": False,
        "instructions": None,
        "max_output_tokens": None,
        "max_tool_calls": None,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "prompt_cache_key": None,
        "reasoning": {"effort": None, "summary": None},
        "safety_identifier": None,
        "service_tier": "default",
        "store": True,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_logprobs": 0,
        "top_p": 1.0,
        "truncation": "disabled",
        "user": None,
        "metadata": {},
    }


@dataclass(slots=True)
class ToolName:
    """How a function name sent upstream maps back to what the client declared: a ``namespace``
    tool's member ``ns.fn`` goes upstream flattened (its own name, or an alias when two namespaces
    share a member name) and comes back as ``{"name": fn, "namespace": ns}``."""

    name: str
    namespace: str | None = None


@dataclass(slots=True)
class ResponseContext:
    # ``resp_...``: the id of this response (and of its stored copy, when ``store`` is true)
    response_id: str
    # the model name the client sent (the virtual model), never the upstream's id
    model: str
    # Unix seconds, as the API's ``created_at``
    created_at: int
    # the request fields the Responses object echoes back (instructions, tools in the client's form,
    # tool_choice, parallel_tool_calls, temperature, top_p, max_output_tokens, metadata, text,
    # reasoning, store, previous_response_id, user, truncation, prompt_cache_key, ...): every key of
    # :func:`default_echo`, in its order; the answer side puts them into every response object it
    # emits (response.created, .completed, GET) as they are
    echo: dict[str, Any] = field(default_factory=default_echo)
    # upstream function name -> the client's name (and namespace); names absent here map to themselves
    names: dict[str, ToolName] = field(default_factory=dict)
    # the reasoning text as the client may see it arrives in the chat answer already (the tenant's
    # mode ran before); ``seal`` turns the reasoning of this turn into ``encrypted_content`` when the
    # request asked for ``include: ["reasoning.encrypted_content"]`` (None otherwise)
    seal: Callable[[str], str] | None = None
    # the original (unredacted) reasoning of this turn, when the tenant's mode hides or changes it
    # from the client: what ``seal`` should seal, so the next stateless turn gets K2 its own text
    original_reasoning: Callable[[], str | None] | None = None
    # called once with the final response object (status completed / incomplete / failed), before
    # the last byte goes out: stores it for ``previous_response_id`` and ``GET /v1/responses/{id}``
    on_done: Callable[[dict[str, Any]], None] | None = None
