"""What a tool-call message gets when neither its client nor the gateway's store has its reasoning.

That happens when the entry expired (``store_ttl_s``) or was evicted, when the history was written
elsewhere (another gateway, another provider, a framework that rebuilt it), or when a tenant keeps
nothing (``keep_for_tool_loops: false``). What the request needs then depends on the upstream
chosen for it:

* **required** (Moonshot's K2 Thinking, and what speaks for it: aggregators, LiteLLM): every
  assistant tool-call message needs non-empty reasoning, or the API answers 400 *"thinking is
  enabled but reasoning_content is missing in assistant tool call message at index N"*; an empty
  string is refused as well. The message gets the placeholder ``" "`` (the minimum Moonshot
  accepts, protocols.md §2.1), or, for a tenant with ``when_missing: reject``, the request gets a
  400 that names the message before anything is sent or reserved.
* **optional** (vLLM serving the open weights): its chat template renders a missing reasoning as an
  empty think block and drops the reasoning of completed turns anyway, so the message goes as the
  client sent it; a placeholder would only change the rendered prompt and its prefix cache.

An upstream's ``tool_reasoning`` config key says which; unset, an upstream is optional when it looks
like vLLM (``reasoning_field: reasoning``, ``think_in_content``, ``tool_call_markers``,
``vllm_metrics``, or a simulated upstream with a vLLM profile) and required otherwise.
"""

from __future__ import annotations

from typing import Any

from gateway.errors import GatewayError

PLACEHOLDER = " "  # the minimum Moonshot accepts (protocols.md §2.1); "" is refused


def _vllm_shaped(config: Any) -> bool:
    if config.kind == "simulated":
        from gateway.upstreams.simulated import dialect_of  # the simulator is loaded only when configured

        dialect = dialect_of(config)
        if dialect is not None:
            return dialect == "vllm"
    if config.reasoning_field == "reasoning":  # vLLM >= 0.16's name; Moonshot reads reasoning_content
        return True
    return bool(config.think_in_content or config.tool_call_markers or config.vllm_metrics)


def requires_reasoning(upstream: Any) -> bool:
    """Whether ``upstream`` refuses an assistant tool-call message without reasoning."""
    config = getattr(upstream, "config", None)
    if config is None:
        return True  # an adapter without a config: assume the strictest upstream
    said = getattr(config, "tool_reasoning", None)
    if said is not None:
        return bool(said == "required")
    return not _vllm_shaped(config)


def missing_reasoning(index: int, model: str, upstream: str, field: str | None) -> GatewayError:
    """The 400 of a ``when_missing: reject`` tenant: which message, why, and how to fix it.
    ``field`` is the name the tenant's clients read reasoning under (None: they are shown none)."""
    fix = (
        f"Send the message back with the '{field}' its answer carried, or start the tool loop again from the "
        "user's message"
        if field is not None
        else "This tenant's clients are not shown reasoning, so start the tool loop again from the user's message"
    )
    return GatewayError(
        400,
        f"messages[{index}] is an assistant message with tool_calls but without its reasoning, and this "
        "gateway has none kept for it (expired, or the conversation was not served by this gateway). "
        f"The upstream chosen for model '{model}' ({upstream}) refuses such a message. {fix}; the tenant's "
        "reasoning policy can send a placeholder instead (when_missing: placeholder).",
        type="invalid_request_error",
        param=f"messages[{index}].{field or 'reasoning_content'}",
        code="reasoning_missing",
    )
