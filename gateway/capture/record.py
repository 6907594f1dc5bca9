"""A capture row from a finished exchange, redacted before it leaves the request.

``metadata`` keeps who asked what of which upstream and how it went (status, tokens, cost, finish
reasons, tool names). ``full`` adds the messages and the answer as the upstream gave it: content,
the original reasoning, tool calls. Every string of the request and answer goes through the
tenant's redaction rules, plus the key detectors whatever the tenant chose (api keys, AWS keys,
bearer tokens), so a capture never holds a credential; request headers are never captured.
"""

from __future__ import annotations

from typing import Any

from gateway.capture.store import DAY_S, CaptureRow
from gateway.exchange import Exchange, Runtime
from gateway.observability import log
from gateway.policy.model import Redaction
from gateway.reasoning.inbound import recorder_of
from gateway.reasoning.redact import Redactor, redactor_for
from gateway.storage.text import clean_text

KEY_DETECTORS = ("api_key", "aws_key", "bearer_token")
PLAIN_KEYS = frozenset(("role", "type", "id", "tool_call_id", "name", "model", "finish_reason"))
PARAMS = ("temperature", "top_p", "max_tokens", "max_completion_tokens", "n", "tool_choice", "stream", "stop")


def capture_redactor(rules: Redaction) -> Redactor:
    """The tenant's rules with the key detectors always on."""
    missing = [d for d in KEY_DETECTORS if d not in rules.detectors]
    if missing:
        rules = _with_keys(rules, tuple(missing))
    return redactor_for(rules)


_WITH_KEYS: dict[int, tuple[Redaction, Redaction]] = {}


def _with_keys(rules: Redaction, missing: tuple[str, ...]) -> Redaction:
    hit = _WITH_KEYS.get(id(rules))
    if hit is None or hit[0] is not rules:
        if len(_WITH_KEYS) > 1024:
            _WITH_KEYS.clear()
        hit = _WITH_KEYS[id(rules)] = (rules, rules.model_copy(update={"detectors": [*rules.detectors, *missing]}))
    return hit[1]


def redacted(value: Any, redactor: Redactor, key: str = "") -> Any:
    """A JSON value with every free-text string redacted (ids, roles and names kept)."""
    if isinstance(value, str):
        return clean_text(value) if key in PLAIN_KEYS else clean_text(redactor.redact(value))
    if isinstance(value, dict):
        return {k: redacted(v, redactor, k) for k, v in value.items()}
    if isinstance(value, list):
        return [redacted(v, redactor, key) for v in value]
    return value


def build_row(ex: Exchange, now: float) -> CaptureRow:
    tenant = ex.tenant
    policy = tenant.capture
    m = ex.metered
    redactor = capture_redactor(tenant.reasoning.redact)
    body = ex.body
    tools = body.get("tools")
    if not isinstance(tools, list):
        tools = []
    usage = m.usage
    record: dict[str, Any] = {
        "request_id": ex.request_id,
        "tenant": tenant.name,
        "key_id": ex.key_id,
        "app": m.app,
        "virtual_model": ex.model,
        "upstream": m.upstream,
        "upstream_model": m.upstream_model,
        "stream": ex.stream,
        "status": m.status,
        "outcome": m.outcome,
        "latency_ms": round(m.latency_ms, 3),
        "ttft_ms": None if m.ttft_ms is None else round(m.ttft_ms, 3),
        "route_reason": m.route_reason,
        "estimate_reason": m.estimate_reason,
        "usage": None
        if usage is None
        else {
            "prompt_tokens": usage.prompt_tokens,
            "cached_tokens": usage.cached_tokens,
            "completion_tokens": usage.completion_tokens,
            "reasoning_tokens": usage.reasoning_tokens,
        },
        "cost_usd": None if m.cost is None else str(m.cost.usd),
        "messages": len(body.get("messages") or ()),
        "tools": [
            (t.get("function") or {}).get("name") if isinstance(t.get("function"), dict) else t.get("name")
            for t in tools
            if isinstance(t, dict)
        ],
        "reasoning_mode": tenant.reasoning.mode,
    }
    recorder = recorder_of(ex)
    if recorder is not None:
        record["finish_reasons"] = [c.finish_reason for _, c in sorted(recorder.turn.choices.items())]
    if policy.mode == "full":
        record["request"] = redacted(
            {"messages": body.get("messages"), **{k: body[k] for k in PARAMS if k in body}, "user": body.get("user")},
            redactor,
        )
        if recorder is not None:
            record["response"] = redacted(
                [
                    {
                        "index": index,
                        "finish_reason": c.finish_reason,
                        "content": "".join(c.content),
                        "reasoning": "".join(c.reasoning),
                        "tool_calls": c.calls(),
                    }
                    for index, c in sorted(recorder.turn.choices.items())
                ],
                redactor,
            )
    return CaptureRow(ex.request_id, now, now + policy.retention_days * DAY_S, tenant.name, policy.mode, record)


def capture_exchange(rt: Runtime, ex: Exchange) -> None:
    """Queue the exchange's capture row when its tenant asks for one; never raises."""
    if ex.tenant.capture.mode == "off" or rt.capture is None:
        return
    try:
        rt.capture.record(build_row(ex, ex.metered.ts))
    except Exception:  # a diagnostic aid must never fail the request it describes
        log.exception("request %s: could not build its capture row", ex.request_id)
