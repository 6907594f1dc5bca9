"""What the simulated model "says" for one request: reasoning, text or tool calls, within budget.

Split from the engine, which handles requests and their timing, because planning is the part that
imitates K2's choices (which tools it calls and when it stops calling them, how output is cut at
max_tokens, how much of the prompt the prefix cache already holds) and is tested on its own terms;
`render.py` then puts the plan into each dialect's bytes.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from .cache import PrefixCache, prefix_chain
from .profiles import Profile
from .render import ChoicePlan, Plan, ToolCall
from .request import ChatRequest, SimOptions, check_context
from .text import AFTER_TOOLS, ANSWER, REASONING, Pool, approx_tokens, arguments_for, truncate_to_tokens

DEFAULT_TOOL_CALLS = 2


def plan_reply(chat: ChatRequest, profile: Profile, cache: PrefixCache, *, number: int, seed: int) -> Plan:
    """Plan the reply to `chat`; `number` (the simulator's count of planned replies) makes its ids."""
    dumps = orjson.dumps
    sort = orjson.OPT_SORT_KEYS
    elements = [dumps(m, option=sort) for m in chat.messages]
    if chat.tools:
        elements.insert(0, dumps(chat.tools, option=sort))
    hashes, cumulative = prefix_chain(chat.model, elements)
    prompt_tokens = cumulative[-1]
    budget = check_context(profile, prompt_tokens, chat.max_tokens)
    cached = cache.lookup_and_store(hashes, cumulative)
    sim = chat.sim
    calls = tool_calls(chat, sim, profile, number)
    last_role = chat.messages[-1].get("role")
    reasoning_n = (
        (sim.reasoning_chunks if sim.reasoning_chunks is not None else profile.reasoning_chunks) if chat.thinking else 0
    )
    content_n = 0 if calls else (sim.content_chunks if sim.content_chunks is not None else profile.content_chunks)
    pool = AFTER_TOOLS if last_role == "tool" else ANSWER
    choices = [_choice(reasoning_n, content_n, pool, calls, budget, seed + 5 * j) for j in range(chat.n)]
    return Plan(
        id=f"chatcmpl-sim{number:010x}",
        created=int(time.time()),
        model=chat.model,
        choices=choices,
        prompt_tokens=prompt_tokens,
        cached_tokens=cached,
        include_usage=chat.include_usage,
        show_reasoning=chat.show_reasoning,
        skip_special_tokens=chat.skip_special_tokens,
    )


def tool_calls(chat: ChatRequest, sim: SimOptions, profile: Profile, number: int) -> list[ToolCall]:
    """Which tools the simulated model calls.

    With tools and a user message last, the model calls the first min(2, len(tools)) tools (two
    tools: parallel calls); after tool results it answers in text.  ``sim.tool_calls`` overrides
    the count; tool_choice "none" prevents calls, "required"/named force at least one.
    """
    tools = chat.tools
    if not tools:
        return []
    if sim.tool_calls is not None:
        count = sim.tool_calls
    elif chat.forced_tool is not None:  # "required" or a named tool: at least one call
        count = 1 if chat.forced_tool else min(DEFAULT_TOOL_CALLS, len(tools))
    elif chat.tool_choice == "none" or not wants_tools(chat.messages, profile.tool_rounds):
        count = 0
    else:
        count = min(DEFAULT_TOOL_CALLS, len(tools))
    chosen = [t for t in tools if t["function"].get("name") == chat.forced_tool] if chat.forced_tool else tools
    prefix = "functions." if profile.dialect == "vllm" else ""
    # K2 numbers its calls across the conversation (functions.NAME:IDX), so ids stay unique per loop
    start = sum(len(m.get("tool_calls") or ()) for m in chat.messages if m.get("role") == "assistant")
    calls = []
    for i in range(count):
        tool = chosen[i % len(chosen)]
        function = tool["function"]
        name = str(function.get("name"))
        kind = tool.get("type", "function")
        if kind == "builtin_function":
            args: dict[str, Any] = {
                "search_result": {"search_id": f"sim-search-{number}-{i}"},
                "usage": {"total_tokens": 1024},
            }
        else:
            args = arguments_for(function.get("parameters"), i)
        arguments = orjson.dumps(args).decode()
        calls.append(
            ToolCall(
                id=f"{prefix}{name}:{start + i}",
                name=name,
                arguments=arguments,
                type=kind,
                tokens=approx_tokens(name.encode()) + approx_tokens(arguments.encode()) + 2,
            )
        )
    return calls


def wants_tools(messages: list[dict[str, Any]], tool_rounds: int) -> bool:
    """A user message last starts a round of tool calls; tool results last continue the loop
    while fewer than ``tool_rounds`` rounds came back since the last user message."""
    last = messages[-1].get("role")
    if last == "user":
        return True
    if last != "tool":
        return False
    rounds = 0
    for msg in reversed(messages):
        role = msg.get("role")
        if role == "user":
            break
        if role == "assistant" and msg.get("tool_calls"):
            rounds += 1
    return rounds < tool_rounds


def _fit(pieces: list[str], tokens: list[int], remaining: int) -> tuple[int, bool]:
    """Trim pieces in place to the output budget; return (remaining, was_cut)."""
    for i, count in enumerate(tokens):
        if count <= remaining:
            remaining -= count
            continue
        partial = truncate_to_tokens(pieces[i], remaining)
        del pieces[i:], tokens[i:]
        if partial:
            pieces.append(partial)
            tokens.append(remaining)
        return 0, True
    return remaining, False


def _choice(
    reasoning_n: int, content_n: int, pool: Pool, calls: list[ToolCall], budget: int, offset: int
) -> ChoicePlan:
    """Plan one choice within the output budget (reasoning counts against max_tokens, as on K2)."""
    reasoning, reasoning_tokens = REASONING.take(reasoning_n, offset) if reasoning_n else ([], [])
    remaining, cut = _fit(reasoning, reasoning_tokens, budget)
    choice = ChoicePlan(reasoning=reasoning, reasoning_tokens=reasoning_tokens)
    if cut:
        choice.finish_reason = "length"
    elif calls:
        need = sum(c.tokens for c in calls)
        if need > remaining:
            choice.finish_reason = "length"  # the calls did not fit: the turn ends without them
        else:
            choice.tool_calls = list(calls)
            choice.finish_reason = "tool_calls"
            remaining -= need
    else:
        content, content_tokens = pool.take(content_n, offset) if content_n else ([], [])
        remaining, cut = _fit(content, content_tokens, remaining)
        choice.content, choice.content_tokens = content, content_tokens
        choice.finish_reason = "length" if cut else "stop"
    choice.completion_tokens = budget - remaining
    return choice
