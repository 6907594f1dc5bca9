"""Prices, usage dialects, the stream tap and budget reservations, each alone."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.metering import stream as stream_module
from gateway.metering.budget import Budgets, lines_for, windows
from gateway.metering.money import to_nanos
from gateway.metering.prices import Price, PriceBook, PriceEntry, _decimal_cost, cost_of, load_prices
from gateway.metering.stream import StreamTap
from gateway.policy.model import Budget
from gateway.upstreams.usage import parse_usage, usage_of_response
from gateway.yamlfile import ConfigError
from tests.unit.conftest import Backend

ROOT = Path(__file__).resolve().parents[2]
M = Decimal(1_000_000)


def book() -> PriceBook:
    return PriceBook(
        [
            PriceEntry(
                target="ms/k2",
                effective_from="2025-11-06",
                input_miss="0.60",
                input_hit="0.15",
                output="2.50",
                tool_fees={"$web_search": "0.005"},
            ),
            PriceEntry(target="ms/k2", effective_from="2026-06-01", input_miss="0.50", input_hit="0.10", output="2.00"),
        ]
    )


def test_cost_is_exact_decimal_by_hand() -> None:
    price = book().at("ms/k2", 1_763_000_000)  # 2025-11-13
    assert price is not None and price.version == "ms/k2@2025-11-06"
    cost = cost_of(price, prompt_tokens=1210, cached_tokens=1024, completion_tokens=184, tool_calls={"$web_search": 2})
    by_hand = (Decimal(186) * Decimal("0.60") + Decimal(1024) * Decimal("0.15") + Decimal(184) * Decimal("2.50")) / M
    assert cost.usd == (by_hand + Decimal("0.010")).quantize(Decimal("1e-9"))
    assert cost.cache_savings == (Decimal(1024) * Decimal("0.45") / M).quantize(Decimal("1e-9"))


# a list price per 1M tokens with up to nine decimals (whole femtodollars per token), or a long fraction
per_million = st.integers(0, 10**11).map(lambda n: Decimal(n).scaleb(-9)) | st.decimals(
    min_value=0, max_value=100, places=12, allow_nan=False
)


@given(
    per_million,
    per_million,
    per_million,
    st.integers(-5, 10**7),
    st.integers(-5, 10**7),
    st.integers(-5, 10**6),
    st.dictionaries(st.sampled_from(["$web_search", "$other"]), st.integers(0, 50), max_size=2),
)
def test_integer_cost_equals_decimal_cost(
    miss: Decimal, hit: Decimal, out: Decimal, prompt: int, cached: int, completion: int, calls: dict[str, int]
) -> None:
    """Prices that are whole femtodollars per token are added as integers; the result must be the
    Decimal computation's to the nanodollar, and the nanodollar fields must say the same amounts."""
    price = Price("u/m", 0.0, "u/m@v", miss / M, hit / M, out / M, {"$web_search": Decimal("0.005")})
    cost = cost_of(price, prompt, cached, completion, calls)
    clamp = max(prompt, 0)
    reference = _decimal_cost(price, clamp, min(max(cached, 0), clamp), max(completion, 0), calls)
    assert (cost.usd, cost.cache_savings) == (reference.usd, reference.cache_savings)
    assert str(cost.usd) == str(reference.usd)  # the same exponent too: x-gateway-cost-usd prints it
    assert (cost.nanos, cost.savings_nanos) == (to_nanos(cost.usd), to_nanos(cost.cache_savings))


def test_an_amortized_gpu_price_is_costed_in_decimal() -> None:
    entry = PriceEntry(target="vllm/k2", effective_from="2025-01-01", gpu={"usd_per_hour": "2.50", "tokens_per_s": 900})
    price = PriceBook([entry]).at("vllm/k2", 1_763_000_000)
    assert price is not None and price.femto is None  # 2.50 / 3,240,000 per token is no whole femtodollar
    cost = cost_of(price, 1000, 0, 1000)
    assert cost.usd == ((Decimal("2.50") / (Decimal(900) * 3600)) * 2000).quantize(Decimal("1e-9"))
    assert cost.nanos == to_nanos(cost.usd)


def test_price_history_prices_by_request_time() -> None:
    b = book()
    assert b.at("ms/k2", 1_700_000_000) is None  # before the first entry
    assert b.at("ms/k2", 1_790_000_000).version == "ms/k2@2026-06-01"  # type: ignore[union-attr]


def test_shipped_prices_load_with_published_moonshot_figures() -> None:
    b = load_prices(ROOT / "config" / "prices.yaml")
    price = b.at("moonshot/kimi-k2-thinking", 1_780_000_000)
    assert price is not None and (price.miss * M, price.hit * M, price.out * M) == (
        Decimal("0.60"),
        Decimal("0.15"),
        Decimal("2.50"),
    )
    turbo = b.at("moonshot/kimi-k2-thinking-turbo", 1_780_000_000)
    assert turbo is not None and (turbo.miss * M, turbo.out * M) == (Decimal("1.15"), Decimal("8.00"))
    vllm = b.at("vllm/kimi-k2-thinking", 1_780_000_000)
    assert vllm is not None and vllm.estimate and vllm.out == Decimal("16.00") / (Decimal(2500) * 3600)


def test_price_file_errors_name_the_entry(tmp_path: Path) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text("prices:\n  - {target: a/b, effective_from: 2025-01-01, input_miss: '1'}\n")
    with pytest.raises(ConfigError, match=r"prices\[0\].*needs input_miss, input_hit and output"):
        load_prices(path)
    path.write_text(
        "prices:\n  - {target: a/b, effective_from: 2025-01-01, input_miss: '1', input_hit: '1', output: '1'}\n"
        "  - {target: a/b, effective_from: 2025-01-01, input_miss: '2', input_hit: '1', output: '1'}\n"
    )
    with pytest.raises(ConfigError, match=r"prices\[1\].*already has a price"):
        load_prices(path)


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        ({"prompt_tokens": 100, "completion_tokens": 9, "cached_tokens": 64}, (100, 9, 64, 0)),  # Moonshot
        (
            {"prompt_tokens": 100, "completion_tokens": 9, "prompt_tokens_details": {"cached_tokens": 32}},
            (100, 9, 32, 0),
        ),
        ({"prompt_tokens": 100, "completion_tokens": 9, "prompt_cache_hit_tokens": 16}, (100, 9, 16, 0)),  # DeepSeek
        (
            {"prompt_tokens": 10, "completion_tokens": 9, "completion_tokens_details": {"reasoning_tokens": 7}},
            (10, 9, 0, 7),
        ),
    ],
)
def test_usage_dialects(usage: dict, expected: tuple[int, int, int, int]) -> None:
    u = parse_usage(usage)
    assert u is not None and (u.prompt_tokens, u.completion_tokens, u.cached_tokens, u.reasoning_tokens) == expected


def test_usage_inside_choices_is_found() -> None:
    chunk = {
        "choices": [
            {
                "index": 0,
                "delta": {},
                "finish_reason": "stop",
                "usage": {"prompt_tokens": 19, "completion_tokens": 13, "cached_tokens": 8},
            }
        ]
    }
    u = usage_of_response(chunk)
    assert u is not None and (u.prompt_tokens, u.cached_tokens) == (19, 8)


def sse(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


DELTA = sse({"id": "c1", "created": 5, "model": "k2", "choices": [{"index": 0, "delta": {"content": "hi"}}]})
FINISH_MOONSHOT = sse(
    {
        "id": "c1",
        "created": 5,
        "model": "k2",
        "choices": [
            {
                "index": 0,
                "delta": {},
                "finish_reason": "stop",
                "usage": {"prompt_tokens": 19, "completion_tokens": 13, "total_tokens": 32, "cached_tokens": 8},
            }
        ],
    }
)
USAGE_CHUNK = sse(
    {"id": "c1", "choices": [], "usage": {"prompt_tokens": 19, "completion_tokens": 13, "cached_tokens": 8}}
)
DONE = b"data: [DONE]\n\n"


def test_tap_drops_the_usage_chunk_for_a_client_that_did_not_ask() -> None:
    tap = StreamTap(client_wants_usage=False)
    out = tap.process(DELTA) + tap.process(FINISH_MOONSHOT + USAGE_CHUNK) + tap.process(DONE)
    assert out == DELTA + FINISH_MOONSHOT + DONE
    assert tap.usage is not None and tap.usage.cached_tokens == 8


def test_tap_keeps_the_upstreams_usage_chunk_as_sent() -> None:
    tap = StreamTap(client_wants_usage=True)
    out = tap.process(DELTA + FINISH_MOONSHOT + USAGE_CHUNK + DONE)
    assert out == DELTA + FINISH_MOONSHOT + USAGE_CHUNK + DONE


def test_tap_synthesizes_openais_usage_chunk_from_moonshots_choice_usage() -> None:
    tap = StreamTap(client_wants_usage=True)
    out = tap.process(DELTA + FINISH_MOONSHOT) + tap.process(DONE)
    events = out.split(b"\n\n")
    chunk = orjson.loads(events[-3][6:])
    assert chunk["choices"] == [] and chunk["id"] == "c1" and chunk["model"] == "k2"
    assert chunk["usage"]["prompt_tokens_details"] == {"cached_tokens": 8} and chunk["usage"]["cached_tokens"] == 8
    assert out.endswith(DONE)


@pytest.mark.parametrize("done", [DONE, b"data:[DONE]\r\n\r\n"])
def test_tap_synthesizes_the_usage_chunk_before_done_in_a_stream_read_in_one_block(done: bytes) -> None:
    """The whole stream in one read (as from an upstream that writes it at once), with a delta that
    mentions [DONE] in its text: the chunk goes just before the stream's own [DONE], bytes unchanged."""
    mention = sse({"id": "c1", "choices": [{"index": 0, "delta": {"content": "say [DONE] when done"}}]})
    tap = StreamTap(client_wants_usage=True)
    out = tap.process(DELTA + mention + FINISH_MOONSHOT + done)
    assert out.startswith(DELTA + mention + FINISH_MOONSHOT)
    assert out.endswith(done)
    chunk = orjson.loads(out[len(DELTA + mention + FINISH_MOONSHOT) : -len(done)].removeprefix(b"data: "))
    assert chunk["choices"] == [] and chunk["usage"]["cached_tokens"] == 8


def test_tap_passes_usage_null_chunks_untouched() -> None:
    tap = StreamTap(client_wants_usage=False)
    block = sse({"choices": [{"index": 0, "delta": {"content": "x"}}], "usage": None})
    assert tap.process(block) == block and tap.usage is None


def test_tap_estimate_counts_generated_text() -> None:
    tap = StreamTap(client_wants_usage=False)
    tap.process(sse({"choices": [{"index": 0, "delta": {"reasoning_content": "thinking hard about it"}}]}))
    tap.process(sse({"choices": [{"index": 0, "delta": {"content": " the answer"}}]}))
    assert tap.generated_text() == "thinking hard about it the answer"
    assert 4 <= tap.estimate_completion_tokens() <= 10


def test_budget_windows_and_keys() -> None:
    now = 1_795_940_000  # 2026-11-29
    daily, monthly = windows(now)
    assert (daily.key, monthly.key) == ("d2026-11-29", "m2026-11")
    budget = Budget(daily_usd=Decimal(1), monthly_usd=Decimal(10), apps={"checkout": {"daily_usd": Decimal("0.5")}})
    keys = [line.limit.key for line in lines_for("acme", budget, "checkout", now)]
    assert keys == [
        "budget:acme:tenant:d2026-11-29",
        "budget:acme:tenant:m2026-11",
        "budget:acme:app=checkout:d2026-11-29",
    ]


async def test_concurrent_reservations_never_pass_the_cap(backend: Backend) -> None:
    price = book().at("ms/k2", 1_780_000_000)
    assert price is not None
    budgets = Budgets(backend.budgets())
    per = Decimal(100) * price.miss + Decimal(1000) * price.out
    budget = Budget(daily_usd=per * 10)

    async def one(i: int) -> bool:
        try:
            r = await budgets.reserve(
                request_id=f"r{i}",
                tenant="t",
                budget=budget,
                app=None,
                price=price,
                prompt_tokens=100,
                max_tokens=1000,
                now=1_780_000_000,
            )
        except Exception:
            return False
        await asyncio.sleep(0.01)
        await budgets.settle(r, per / 2)
        return True

    results = await asyncio.gather(*(one(i) for i in range(50)))
    assert sum(results) == 10
    assert await budgets.state.open_reservations() == 0
    used = await budgets.state.used("budget:t:tenant:" + windows(1_780_000_000)[0].key)
    assert Decimal(used) / Decimal(10**9) == (per / 2 * 10).quantize(Decimal("1e-9"))


def test_token_estimates_work_with_the_network_unreachable() -> None:
    """The tokenizer file ships in the package: loading it must not touch the network."""
    import subprocess
    import sys

    code = (
        "import socket\n"
        "def refuse(*a, **k):\n    raise OSError('network is unreachable (test)')\n"
        "socket.socket.connect = refuse\nsocket.create_connection = refuse\nsocket.getaddrinfo = refuse\n"
        "import os; os.environ.pop('TIKTOKEN_CACHE_DIR', None)\n"
        "from gateway.metering.tokens import count_text\n"
        "print(count_text('Why is the sky blue? Rayleigh scattering.'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert 5 <= int(out.stdout.strip()) <= 15


@given(st.lists(st.integers(min_value=0, max_value=2000), max_size=12), st.booleans())
def test_tap_output_does_not_depend_on_how_tcp_cut_the_stream(cuts: list[int], wants: bool) -> None:
    from gateway.upstreams.sse import SSERelay

    stream = DELTA * 3 + FINISH_MOONSHOT + USAGE_CHUNK + DONE
    expected = DELTA * 3 + FINISH_MOONSHOT + (USAGE_CHUNK if wants else b"") + DONE
    points = sorted({c % (len(stream) + 1) for c in cuts})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True) if b > a]
    relay, tap = SSERelay(), StreamTap(client_wants_usage=wants)
    out = b"".join(tap.process(relay.feed(p)) for p in pieces) + tap.process(relay.finish())
    assert out == expected
    assert tap.usage is not None and tap.usage.cached_tokens == 8


@pytest.mark.parametrize(
    "body",
    [
        {
            "id": "x",
            "choices": [{"message": {"content": 'says "usage": {"prompt_tokens": 1}'}}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 9, "cached_tokens": 64},
        },
        {"usage": {"prompt_tokens": 100, "completion_tokens": 9, "cached_tokens": 64}, "id": "x", "choices": []},
        {
            "id": "x",
            "choices": [{"message": {}, "usage": {"prompt_tokens": 100, "completion_tokens": 9, "cached_tokens": 64}}],
        },
    ],
)
def test_usage_of_body_finds_usage_wherever_it_is(body: dict) -> None:
    from gateway.upstreams.usage import usage_of_body

    for raw in (orjson.dumps(body), orjson.dumps(body, option=orjson.OPT_INDENT_2)):
        u = usage_of_body(raw)
        assert u is not None and (u.prompt_tokens, u.completion_tokens, u.cached_tokens) == (100, 9, 64)


def _data_by_the_spec(event: bytes) -> bytes:
    lines = [line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    return b"\n".join(lines)


@given(
    st.lists(
        st.sampled_from([b"data: ", b"data:", b"event: x", b": comment", b"id: 7", b"data:  [DONE]"]).flatmap(
            lambda head: st.binary(max_size=12).map(lambda rest: head + rest.replace(b"\n", b"").replace(b"\r", b""))
        ),
        min_size=1,
        max_size=4,
    ),
    st.sampled_from([b"\n", b"\r\n", b"\r"]),
    st.sampled_from([b"", b"\n", b"\n\n", b"\r\n\r\n", b"\n\r\n"]),
)
def test_the_one_line_shortcut_reads_an_event_as_the_spec_does(lines: list[bytes], sep: bytes, end: bytes) -> None:
    event = sep.join(lines) + end
    assert stream_module._data(event) == _data_by_the_spec(event)


NULL_USAGE = sse({"id": "c1", "choices": [{"index": 0, "delta": {"content": "x"}}], "usage": None})
BROKEN_USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":\n\n'


@given(
    st.lists(
        st.sampled_from([DELTA, NULL_USAGE, FINISH_MOONSHOT, USAGE_CHUNK, BROKEN_USAGE, DONE, b": keep-alive\n\n"]),
        max_size=8,
    ),
    st.lists(st.integers(min_value=0, max_value=4000), max_size=4),
    st.booleans(),
    st.booleans(),
)
# usage known from an earlier block and its chunk not sent: the chunk goes before the first [DONE]
@example(
    events=[DELTA, FINISH_MOONSHOT, DONE, USAGE_CHUNK], cuts=[len(DELTA + FINISH_MOONSHOT)], wants=True, crlf=False
)
@example(events=[FINISH_MOONSHOT, DONE, USAGE_CHUNK, DONE], cuts=[len(FINISH_MOONSHOT)], wants=True, crlf=False)
@example(events=[FINISH_MOONSHOT, DELTA, DONE, DONE], cuts=[len(FINISH_MOONSHOT)], wants=True, crlf=True)
@settings(max_examples=400)
def test_the_usage_chunk_shortcut_changes_nothing_the_client_or_the_ledger_sees(
    events: list[bytes], cuts: list[int], wants: bool, crlf: bool
) -> None:
    """The shortcuts (a block whose only usage is one OpenAI usage chunk finished without taking its
    tail apart; no search for [DONE] while no usage is known) change nothing: for any stream, cut
    anywhere, the client's bytes, the usage and the usage-chunk flag must be those of reading every
    block event by event."""
    from gateway.upstreams.sse import SSERelay

    stream = b"".join(events)
    if crlf:
        stream = stream.replace(b"\n", b"\r\n")
    points = sorted({c % (len(stream) + 1) for c in cuts})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True) if b > a]

    class General(StreamTap):
        def split(self, block: bytes) -> tuple[bytes, bytes]:
            return b"", block  # every event through finish_tail, one by one

    def run(shortcut: bool) -> tuple[bytes, object, bool]:
        relay, tap = SSERelay(), (StreamTap if shortcut else General)(client_wants_usage=wants)
        out = b"".join(tap.process(relay.feed(p)) for p in pieces) + tap.process(relay.finish())
        return out, tap.usage, tap.sent_usage_chunk

    assert run(shortcut=True) == run(shortcut=False)
