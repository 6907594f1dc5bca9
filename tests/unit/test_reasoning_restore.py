"""Reasoning restored into tool-call turns for every mode: the lookup keys and their fallback, which
source wins, what each upstream gets when nothing is kept, and the reject 400 (``gateway/reasoning/
restore.py``, ``fallback.py``, ``store.py``). The end-to-end side, with the real frameworks, is
tests/e2e/test_agent_frameworks.py."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from gateway.config import UpstreamConfig
from gateway.errors import GatewayError
from gateway.observability import REASONING_RESTORED
from gateway.policy.model import CapturePolicy, ReasoningPolicy
from gateway.reasoning.fallback import PLACEHOLDER, missing_reasoning, requires_reasoning
from gateway.reasoning.inbound import prepare_reasoning
from gateway.reasoning.modes import Turn
from gateway.reasoning.record import TurnRecorder
from gateway.reasoning.restore import restore_history
from gateway.reasoning.store import (
    ReasoningStore,
    calls_key,
    conversation_digests,
    prefix_digests,
    turn_key,
    writes_done,
)
from gateway.state.memory import MemoryKeyValueState
from gateway.transforms.chain import apply_whole

CALLS = [
    {"id": "get_weather:0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
]
SYSTEM = {"role": "system", "content": "You are helpful."}
USER = {"role": "user", "content": "Weather in Oslo?"}


def assistant(**extra: Any) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": "",
        "tool_calls": [dict(c, function=dict(c["function"])) for c in CALLS],
        **extra,
    }


def loop(*, system: dict[str, Any] = SYSTEM, **extra: Any) -> list[dict[str, Any]]:
    return [
        dict(system),
        dict(USER),
        assistant(**extra),
        {"role": "tool", "tool_call_id": "get_weather:0", "content": "rain"},
    ]


def counts(tenant: str) -> dict[str, float]:
    return {s: REASONING_RESTORED.labels(tenant, s)._value.get() for s in ("store", "client", "placeholder", "none")}


async def kept(kv: MemoryKeyValueState, tenant: str, history: list[dict[str, Any]], reasoning: str) -> None:
    """What the recorder writes when the answer to ``history`` was a tool-call turn with ``reasoning``."""
    turn = Turn()
    recorder = TurnRecorder(turn, collect_reasoning=True, store=ReasoningStore(kv), tenant=tenant, history=history,
                            ttl_s=60, max_bytes=1 << 20)  # fmt: skip
    message = {"role": "assistant", "content": "", "reasoning_content": reasoning, "tool_calls": CALLS}
    apply_whole(
        [recorder], orjson.dumps({"choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}]})
    )
    await writes_done()


def restore(kv: MemoryKeyValueState | None, tenant: str, mode: str, messages: list[Any], **kw: Any) -> Any:
    store = ReasoningStore(kv) if kv is not None else None
    options = {"required": True, "reject": False, **kw}
    return asyncio.run(restore_history(store, tenant, mode, messages, "reasoning_content", **options))


# -- keys


def test_fingerprints_ignore_what_frameworks_change_about_a_turn() -> None:
    """openai-agents sends content None, langchain re-serializes arguments with spaces and puts
    ``content`` first, the Anthropic front end serializes parsed input compactly."""
    ours = [SYSTEM, USER, {"role": "assistant", "content": "", "tool_calls": CALLS}]
    agents = [
        {"content": "You are helpful.", "role": "system"},
        USER,
        {"role": "assistant", "content": None, "tool_calls": CALLS},
    ]
    respaced = [dict(c, function={"name": "get_weather", "arguments": '{"city":"Oslo"}'}) for c in CALLS]
    langchain = [
        SYSTEM,
        {"content": "Weather in Oslo?", "role": "user"},
        {"content": None, "role": "assistant", "tool_calls": respaced},
    ]
    parts = [SYSTEM, {"role": "user", "content": [{"type": "text", "text": "Weather in Oslo?"}]}, ours[2]]
    assert prefix_digests(ours) == prefix_digests(agents) == prefix_digests(langchain) == prefix_digests(parts)


def test_the_fallback_key_survives_a_changed_system_prompt_and_inserted_system_messages() -> None:
    before = conversation_digests([SYSTEM, USER])
    other = [{"role": "system", "content": "Step 2; the date is today."}, {"role": "system", "content": "extra"}, USER]
    after = conversation_digests(other)
    assert turn_key("t", before[0][-1], CALLS) != turn_key("t", after[0][-1], CALLS)  # the exact key misses
    assert calls_key("t", before[1][-1], CALLS) == calls_key("t", after[1][-1], CALLS)  # the fallback finds it
    # but never across tenants, another user message or other tool calls
    assert calls_key("t", before[1][-1], CALLS) != calls_key("u", before[1][-1], CALLS)
    other_user = conversation_digests([SYSTEM, {"role": "user", "content": "Weather in Bergen?"}])
    assert calls_key("t", before[1][-1], CALLS) != calls_key("t", other_user[1][-1], CALLS)
    earlier_turn = conversation_digests([SYSTEM, USER, assistant()])
    assert calls_key("t", before[1][-1], CALLS) != calls_key("t", earlier_turn[1][-1], CALLS)
    moved = [dict(CALLS[0], function={"name": "get_weather", "arguments": '{"city": "Bergen"}'})]
    assert calls_key("t", before[1][-1], CALLS) != calls_key("t", before[1][-1], moved)


def test_the_skeleton_is_the_user_messages_and_tool_call_turns() -> None:
    second = {"role": "user", "content": "and tomorrow?"}
    result = {"role": "tool", "tool_call_id": "get_weather:0", "content": "x"}
    messages = [SYSTEM, USER, assistant(), result, second]
    prefixes, skeletons = conversation_digests(messages)
    assert len(prefixes) == len(skeletons) == len(messages) + 1
    assert skeletons[2] == conversation_digests([USER])[1][-1]  # the system prompt is not in it
    assert skeletons[4] == conversation_digests([USER, assistant()])[1][-1]  # nor the tool results
    cleared = [dict(SYSTEM, content="other"), USER, assistant(), dict(result, content="[cleared]"), second]
    assert conversation_digests(cleared)[1] == skeletons and conversation_digests(cleared)[0] != prefixes
    assert len(set(skeletons[2:])) == 3
    assert conversation_digests(messages, 3)[0] == prefixes[:4]


# -- the store and its fallback


def test_a_turn_is_found_by_its_exact_key_and_by_its_fallback() -> None:
    kv = MemoryKeyValueState()
    asyncio.run(kept(kv, "t1", [SYSTEM, USER], "K2's plan"))
    assert len(kv) == 2  # the reasoning once, and the fallback pointing at it
    exact = loop()
    assert restore(kv, "t1", "pass", exact).changed and exact[2]["reasoning_content"] == "K2's plan"
    rebuilt = loop(system={"role": "system", "content": "a prompt rebuilt this step"})
    before = counts("t1")
    restore(kv, "t1", "pass", rebuilt)
    assert rebuilt[2]["reasoning_content"] == "K2's plan"
    assert counts("t1")["store"] == before["store"] + 1
    other_tenant = loop()
    restore(kv, "t2", "pass", other_tenant)
    assert other_tenant[2]["reasoning_content"] == PLACEHOLDER


def test_a_fallback_whose_entry_expired_is_a_miss() -> None:
    kv = MemoryKeyValueState()
    asyncio.run(kept(kv, "t", [SYSTEM, USER], "plan"))
    exact = turn_key("t", prefix_digests([SYSTEM, USER])[-1], CALLS)
    asyncio.run(kv.delete(exact))
    rebuilt = loop(system={"role": "system", "content": "changed"})
    restore(kv, "t", "pass", rebuilt)
    assert rebuilt[2]["reasoning_content"] == PLACEHOLDER


def test_the_recorder_reuses_fingerprints_it_was_given() -> None:
    kv = MemoryKeyValueState()
    prefixes, skeletons = conversation_digests([SYSTEM, USER])

    async def go() -> None:
        recorder = TurnRecorder(Turn(), collect_reasoning=True, store=ReasoningStore(kv), tenant="t",
                                prefix=prefixes[-1], skeleton=skeletons[-1], ttl_s=60, max_bytes=1 << 20)  # fmt: skip
        message = {"role": "assistant", "reasoning_content": "r", "tool_calls": CALLS}
        apply_whole([recorder], orjson.dumps({"choices": [{"index": 0, "message": message}]}))
        await writes_done()

    asyncio.run(go())
    assert asyncio.run(ReasoningStore(kv).recall([turn_key("t", prefixes[-1], CALLS)])) == ["r"]


# -- which source wins


def test_pass_never_overrides_what_the_client_sent_back() -> None:
    kv = MemoryKeyValueState()
    asyncio.run(kept(kv, "p", [SYSTEM, USER], "the gateway's copy"))
    messages = loop(reasoning_content="the client's own")
    before = counts("p")
    result = restore(kv, "p", "pass", messages)
    assert messages[2]["reasoning_content"] == "the client's own" and not result.changed
    assert result.prefix is None  # nothing to look up: nothing hashed
    assert counts("p")["client"] == before["client"] + 1


@pytest.mark.parametrize("mode", ["strip", "redact"])
def test_strip_and_redact_prefer_the_kept_original_over_the_clients_copy(mode: str) -> None:
    kv = MemoryKeyValueState()
    asyncio.run(kept(kv, mode, [SYSTEM, USER], "mail bob@example.com"))
    messages = loop(reasoning_content="mail [REDACTED:email]")
    restore(kv, mode, mode, messages)
    assert messages[2]["reasoning_content"] == "mail bob@example.com"
    unseen = loop(system={"role": "system", "content": "x"}, reasoning_content="mail [REDACTED:email]")
    unseen[1] = {"role": "user", "content": "never served"}
    restore(kv, mode, mode, unseen)
    assert unseen[2]["reasoning_content"] == "mail [REDACTED:email]"  # the copy beats a placeholder


def test_an_empty_reasoning_counts_as_none() -> None:
    """Moonshot refuses ``""`` as it refuses a missing field (Claude Code sends thinking blocks
    with ``display: omitted`` as empty text)."""
    kv = MemoryKeyValueState()
    asyncio.run(kept(kv, "e", [SYSTEM, USER], "kept"))
    messages = loop(reasoning_content="")
    restore(kv, "e", "pass", messages)
    assert messages[2]["reasoning_content"] == "kept"


def test_restored_reasoning_goes_in_the_upstreams_field_keeping_key_order() -> None:
    kv = MemoryKeyValueState()
    asyncio.run(kept(kv, "f", [SYSTEM, USER], "kept"))
    messages = loop()
    asyncio.run(restore_history(ReasoningStore(kv), "f", "pass", messages, "reasoning", required=False, reject=False))
    assert messages[2]["reasoning"] == "kept" and "reasoning_content" not in messages[2]


# -- nothing kept: per upstream


def upstream(**config: Any) -> Any:
    base: dict[str, Any] = {"kind": "openai", "base_url": "http://x/v1", "models": ["m"]}
    return SimpleNamespace(config=UpstreamConfig.model_validate({**base, **config}))


@pytest.mark.parametrize(
    ("config", "required"),
    [
        ({}, True),  # Moonshot, an aggregator: K2's rule
        ({"reasoning_field": "reasoning"}, False),  # vLLM >= 0.16
        ({"think_in_content": True}, False),
        ({"tool_call_markers": True}, False),
        ({"vllm_metrics": True}, False),
        ({"reasoning_field": "reasoning", "tool_reasoning": "required"}, True),  # said outright
        ({"tool_reasoning": "optional"}, False),
        ({"kind": "simulated", "base_url": None, "profile": "vllm"}, False),
        ({"kind": "simulated", "base_url": None, "profile": "instant"}, True),
        ({"kind": "simulated", "base_url": None}, True),
    ],
)
def test_which_upstreams_require_reasoning(config: dict[str, Any], required: bool) -> None:
    assert requires_reasoning(upstream(**config)) is required


def test_an_adapter_without_config_is_assumed_strict() -> None:
    assert requires_reasoning(SimpleNamespace()) is True


def test_nothing_kept_gives_the_placeholder_where_required_and_nothing_elsewhere() -> None:
    before = counts("n")
    moonshot = loop()
    restore(MemoryKeyValueState(), "n", "pass", moonshot)
    assert moonshot[2]["reasoning_content"] == " "
    vllm = loop()
    result = restore(MemoryKeyValueState(), "n", "pass", vllm, required=False)
    assert "reasoning_content" not in vllm[2] and "reasoning" not in vllm[2] and not result.changed
    after = counts("n")
    assert (after["placeholder"] - before["placeholder"], after["none"] - before["none"]) == (1, 1)


def test_reject_names_the_first_message_and_changes_nothing() -> None:
    messages = [*loop(), assistant(), {"role": "tool", "tool_call_id": "get_weather:0", "content": "x"}]
    result = restore(None, "r", "pass", messages, reject=True)
    assert result.missing == 2 and "reasoning_content" not in messages[2]
    # an upstream that does not need it is never a reason to reject
    assert restore(None, "r", "pass", loop(), reject=True, required=False).missing is None


def test_the_reject_error_says_which_message_why_and_how_to_fix_it() -> None:
    error = missing_reasoning(3, "kimi-k2-thinking", "moonshot/kimi-k2-thinking", "reasoning")
    body = error.payload()["error"]
    assert error.status == 400 and body["type"] == "invalid_request_error" and body["code"] == "reasoning_missing"
    assert body["param"] == "messages[3].reasoning"
    assert "messages[3]" in body["message"] and "moonshot/kimi-k2-thinking" in body["message"]
    assert "Send the message back with the 'reasoning'" in body["message"]
    stripped = missing_reasoning(1, "m", "u/m", None).payload()["error"]
    assert stripped["param"] == "messages[1].reasoning_content" and "not shown reasoning" in stripped["message"]


# -- the request step


def exchange(reasoning: dict[str, Any], messages: list[Any], tools: bool = True) -> Any:
    tenant = SimpleNamespace(name="x", reasoning=ReasoningPolicy.model_validate(reasoning), capture=CapturePolicy())  # type: ignore[call-arg]
    body: dict[str, Any] = {"model": "k2", "messages": messages}
    transforms: list[Any] = []
    if tools:
        body["tools"] = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
        transforms.append(SimpleNamespace(stage=20))  # the tool step's repair transform
    return SimpleNamespace(
        candidate=SimpleNamespace(upstream="u", label="u/k2"), tenant=tenant, body=body, raw=orjson.dumps(body),
        transforms=transforms, dirty=False, model="k2",
    )  # fmt: skip


def runtime(kv: MemoryKeyValueState, **config: Any) -> Any:
    up = upstream(**config)
    up.reasoning_field = up.config.reasoning_field
    return SimpleNamespace(upstreams={"u": up}, kv=kv)


def test_a_pass_tenant_with_tools_records_and_restores_the_next_turn() -> None:
    kv = MemoryKeyValueState()

    async def go() -> None:
        first = exchange({}, [dict(SYSTEM), dict(USER)])
        await prepare_reasoning(runtime(kv), first)
        recorder = next(t for t in first.transforms if isinstance(t, TurnRecorder))
        assert recorder.store is not None and recorder.collect_reasoning
        answer = {"role": "assistant", "content": "", "reasoning_content": "plan", "tool_calls": CALLS}
        out = apply_whole(first.transforms[1:], orjson.dumps({"choices": [{"index": 0, "message": answer}]}))
        assert orjson.loads(out)["choices"][0]["message"]["reasoning_content"] == "plan"  # pass shows it
        await writes_done()
        second = exchange({}, loop())
        await prepare_reasoning(runtime(kv), second)
        assert second.body["messages"][2]["reasoning_content"] == "plan"
        # encoded once: the reservation bounds the restored prompt, and these bytes go upstream
        assert second.raw == orjson.dumps(second.body) and not second.dirty

    asyncio.run(go())


def test_a_pass_tenant_without_tools_gets_no_transform() -> None:
    ex = exchange({}, [dict(SYSTEM), dict(USER)], tools=False)
    asyncio.run(prepare_reasoning(runtime(MemoryKeyValueState()), ex))
    assert ex.transforms == [] and not ex.dirty


def test_keep_for_tool_loops_false_keeps_nothing_in_any_mode() -> None:
    kv = MemoryKeyValueState()

    async def go() -> None:
        ex = exchange({"keep_for_tool_loops": False}, [dict(SYSTEM), dict(USER)])
        await prepare_reasoning(runtime(kv), ex)
        assert not any(isinstance(t, TurnRecorder) for t in ex.transforms)
        later = exchange({"keep_for_tool_loops": False}, loop())
        await prepare_reasoning(runtime(kv), later)
        assert later.body["messages"][2]["reasoning_content"] == PLACEHOLDER and len(kv) == 0

    asyncio.run(go())


def test_a_reject_tenant_gets_the_400_from_the_request_step() -> None:
    ex = exchange({"when_missing": "reject"}, loop())
    with pytest.raises(GatewayError) as info:
        asyncio.run(prepare_reasoning(runtime(MemoryKeyValueState()), ex))
    assert info.value.code == "reasoning_missing" and info.value.param == "messages[2].reasoning_content"
    vllm = exchange({"when_missing": "reject"}, loop())
    asyncio.run(prepare_reasoning(runtime(MemoryKeyValueState(), reasoning_field="reasoning"), vllm))
    assert "reasoning" not in vllm.body["messages"][2]


def test_when_missing_is_validated() -> None:
    with pytest.raises(ValueError, match="when_missing"):
        ReasoningPolicy.model_validate({"when_missing": "drop"})
    with pytest.raises(ValueError, match="tool_reasoning"):
        UpstreamConfig.model_validate(
            {"kind": "openai", "base_url": "http://x", "models": ["m"], "tool_reasoning": "maybe"}
        )


@pytest.mark.parametrize(("reasoning", "refused"), [(None, True), ("", True), (" ", False), ("plan", False)])
def test_the_moonshot_simulator_wants_non_empty_reasoning(reasoning: str | None, refused: bool) -> None:
    from simulator.errors import RequestError
    from simulator.request import _check_moonshot_history

    extra = {} if reasoning is None else {"reasoning_content": reasoning}
    messages = loop(**extra)
    if refused:
        with pytest.raises(
            RequestError, match="reasoning_content is missing in assistant tool call message at index 2"
        ):
            _check_moonshot_history(messages, thinking=True)
    else:
        _check_moonshot_history(messages, thinking=True)
    _check_moonshot_history(loop(), thinking=False)  # a model that does not think: no rule
