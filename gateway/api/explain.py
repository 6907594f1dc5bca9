"""``POST /v1/route/explain``: the ranked plan for a chat/completions body, without calling anything.

Same body, same auth and same routing code as a real request; the answer lists every candidate in
the order it would be tried, with its expected cost, latency and cached tokens and why it ranks
there, then the candidates left out (dead, breaker open).
"""

from __future__ import annotations

import time
from typing import Any

from gateway import errors
from gateway.api.openai import parse_chat_body, parse_tags
from gateway.api.route_headers import MAX_LATENCY_HEADER, parse_max_latency
from gateway.asgi import Receive, Scope, Send, check_json_content_type, header_map, read_body, send_error, send_json
from gateway.auth import authenticate, bearer_token
from gateway.errors import GatewayError
from gateway.exchange import Runtime
from gateway.metering.tokens import requested_max_tokens, upper_bound_tokens
from gateway.routing.expected import Option
from gateway.routing.keys import held_by_key
from gateway.routing.router import remaining_fraction, slo_text


def _usd(o: Option) -> str:
    return f"${o.cost:.6f}" if o.cost is not None else "unpriced"


def _option(o: Option, rank: int | None, reason: str) -> dict[str, Any]:
    return {
        "rank": rank,
        "candidate": o.label,
        "upstream": o.candidate.upstream,
        "upstream_model": o.candidate.upstream_model,
        "expected_cost_usd": f"{o.cost:.9f}" if o.cost is not None else None,
        "expected_ttft_ms": round(o.ttft_s * 1000, 1),
        "expected_latency_ms": round(o.total_s * 1000, 1),
        "expected_cached_tokens": o.cached_tokens,
        "expected_prompt_tokens": o.prompt_tokens,
        "expected_output_tokens": o.output_tokens,
        "held_prefix_tokens": o.held_tokens,
        "meets_slo": o.meets_slo,
        "reason": reason,
    }


def _why(strategy: str, o: Option, first: Option, kept: bool) -> str:
    if o is first:
        return ""
    if kept and o.held_tokens < first.held_tokens:
        return (
            f"{strategy}: holds less of this conversation's prefix ({o.held_tokens} tokens, expected "
            f"{_usd(o)} this turn); the loop stays on {first.label}, which holds {first.held_tokens}"
        )
    if strategy == "pinned":
        return f"pinned: position {o.index + 1} in the policy"
    if strategy == "cost":
        return "cost: more expensive than the candidates above"
    if strategy == "latency":
        return "latency: slower than the candidates above"
    if o.meets_slo:
        return "balanced: meets the SLO but costs more than the candidates above"
    return "balanced: not expected to meet the SLO; ranked by speed after those that do"


async def route_explain(rt: Runtime, limit: int, scope: Scope, receive: Receive, send: Send) -> None:
    headers = header_map(scope)
    try:
        entry = authenticate(rt.policies, bearer_token(headers.get(b"authorization")))
        check_json_content_type(headers)
        raw = await read_body(receive, headers, limit)
        body = parse_chat_body(raw)
        parse_tags(headers.get(b"x-gateway-tags"))  # refused as chat/completions would refuse it
        max_latency = parse_max_latency(headers.get(MAX_LATENCY_HEADER))
        route = entry.tenant.routes.get(body["model"])
        if route is None:
            raise errors.model_not_found(body["model"])
        fraction = await remaining_fraction(rt.meter.budgets, entry.tenant, entry.app, time.time())  # the key's app
        plan = await rt.router.plan(
            entry.tenant,
            route,
            body,
            len(raw),
            max_latency_ms=max_latency,
            budget_fraction=fraction,
            explain=True,
        )
    except GatewayError as error:
        await send_error(send, error)
        return
    ranked = [
        _option(o, i + 1, plan.reason if i == 0 else _why(plan.strategy, o, plan.options[0], plan.kept))
        for i, o in enumerate(plan.options)
    ]
    keys = rt.router.keys
    if keys is not None:  # upstreams with a key pool: the key each candidate would use, and why
        tokens = upper_bound_tokens(raw) + (requested_max_tokens(body) or entry.tenant.default_max_tokens)
        for item, o in zip(ranked, plan.options, strict=True):
            pool = keys.pool(o.candidate.upstream)
            if pool is not None:
                item["key_choice"] = await keys.preview(pool, held_by_key(plan.held, o.label), tokens)
    await send_json(
        send,
        200,
        {
            "object": "route.plan",
            "model": route.name,
            "strategy": plan.strategy,
            "configured_strategy": route.strategy,
            "slo": {
                "ttft_ms": plan.slo_ttft_ms,
                "total_ms": plan.slo_total_ms,
                "text": slo_text(plan.slo_ttft_ms, plan.slo_total_ms),
            },
            "budget_remaining_fraction": fraction,
            "reason": plan.reason if plan.options else "no candidate can be tried",
            "prefix_holder": plan.holder,
            "kept_on_prefix_holder": plan.kept,
            "plan": ranked,
            "excluded": [_option(o, None, o.excluded) for o in plan.excluded],
        },
    )
