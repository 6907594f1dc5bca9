"""Response transforms run in the order of their stage, whichever request step adds them first."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.reasoning.modes import ReasoningTransform, Turn
from gateway.reasoning.record import TurnRecorder
from gateway.tools.aliases import ClientToolNames
from gateway.tools.calls import ToolCallRepair
from gateway.tools.k2_markers import K2MarkerTransform
from gateway.tools.legacy import LegacyFunctionCall
from gateway.transforms.order import add_transform

ORDER = [K2MarkerTransform, ToolCallRepair, ReasoningTransform, TurnRecorder, ClientToolNames, LegacyFunctionCall]


def _all() -> list[Any]:
    turn = Turn()
    return [
        LegacyFunctionCall(),
        TurnRecorder(turn),
        ClientToolNames({"LS": "LS_x"}),
        ReasoningTransform("strip", "reasoning_content", "reasoning_content", turn),
        ToolCallRepair(),
        K2MarkerTransform(),
    ]


@pytest.mark.parametrize("reverse", [False, True])
def test_transforms_take_their_stage_whatever_order_they_are_added_in(reverse: bool) -> None:
    transforms: list[Any] = []
    for t in reversed(_all()) if reverse else _all():
        add_transform(transforms, t)
    assert [type(t) for t in transforms] == ORDER


def test_recorder_sees_tool_calls_before_the_legacy_shape_removes_them() -> None:
    import orjson

    from gateway.transforms.chain import apply_whole

    transforms: list[Any] = []
    for t in _all():
        add_transform(transforms, t)
    recorder = next(t for t in transforms if isinstance(t, TurnRecorder))
    call = {"id": "LS_x:0", "type": "function", "function": {"name": "LS_x", "arguments": "{}"}}
    message = {"role": "assistant", "content": "", "reasoning_content": "why", "tool_calls": [call]}
    body = {"choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}]}
    out = orjson.loads(apply_whole(transforms, orjson.dumps(body)))
    assert out["choices"][0]["message"]["function_call"]["name"] == "LS"  # the client's shape and name
    assert recorder.turn.choice(0).calls()[0]["function"]["name"] == "LS_x"  # what the upstream saw
    assert recorder.turn.choice(0).reasoning == ["why"]


def test_a_transform_without_a_stage_is_refused() -> None:
    with pytest.raises(TypeError, match="no stage"):
        add_transform([], object())
