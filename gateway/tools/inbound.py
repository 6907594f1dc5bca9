"""The one request-side step for tools: normalize the schemas, choose the response transforms.

Called once per request after the candidate is known and before the budget reservation, so an
invalid tool costs nothing. A request without ``tools``/``functions`` on an upstream without raw
markers is left exactly as it came (no transforms: the byte relay stays); one whose tool names the
upstream accepts gets no alias mapping. Transforms are placed at their stage
(``gateway/transforms/order.py``), whatever step adds them.
"""

from __future__ import annotations

from gateway.exchange import Exchange
from gateway.tools.aliases import ClientToolNames
from gateway.tools.calls import ToolCallRepair
from gateway.tools.k2_markers import K2MarkerTransform
from gateway.tools.legacy import LegacyFunctionCall
from gateway.tools.schemas import normalize_tools
from gateway.transforms.order import add_transform
from gateway.upstreams.base import Upstream


def prepare_tools(ex: Exchange, upstream: Upstream) -> None:
    """Normalize ``ex.body``'s tools in place (``ex.dirty`` only when changed) and add the
    response transforms the request needs; raises a 400 GatewayError for a bad tool."""
    body = ex.body
    if "tools" not in body and "functions" not in body:
        return
    info = normalize_tools(body)
    if info.changed:
        ex.dirty = True
    if not info.has_tools:
        return
    if upstream.tool_call_markers:
        # a vLLM without --tool-call-parser drops the markers unless told to keep special tokens
        if "skip_special_tokens" not in body:
            body["skip_special_tokens"] = False
            ex.dirty = True
        add_transform(ex.transforms, K2MarkerTransform())
    add_transform(ex.transforms, ToolCallRepair())
    if info.aliases:
        add_transform(ex.transforms, ClientToolNames(info.aliases))
    if info.legacy:
        add_transform(ex.transforms, LegacyFunctionCall())
