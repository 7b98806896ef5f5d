"""PriceBook / ModelRates: exact agreement with genai-prices, overrides, aliases, lookups."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import genai_prices
import pytest
from genai_prices import data_snapshot
from hypothesis import given, settings
from hypothesis import strategies as st

from agentguard import _pricing
from agentguard._errors import PolicyError, UnknownModelError
from agentguard._pricing import ModelRates, PriceBook, PriceOverride
from agentguard._usage import MAX_TOKENS_PER_CALL, Usage

# (model ref, provider id) across providers; tiered, per-request, reasoning-rate, time-of-day.
MODELS: list[tuple[str, str | None]] = [
    ("gpt-4o", None),
    ("gpt-4o-mini", None),
    ("o3", None),
    ("o4-mini", None),
    ("gpt-4.1", None),
    ("gpt-5", None),
    ("gpt-5.4", None),  # tier at 272k
    ("claude-sonnet-4-5", None),  # tier at 200k
    ("claude-3-5-haiku", None),
    ("claude-opus-4-1", None),
    ("gemini-2.5-pro", None),  # tier at 200k
    ("gemini-2.5-flash", None),
    ("gemini-1.5-pro", None),  # tier at 128k
    ("anthropic.claude-3-5-sonnet-20240620-v1:0", "aws"),
    ("us.anthropic.claude-3-7-sonnet-20250219-v1:0", "aws"),
    ("global.anthropic.claude-sonnet-4-5-20250929-v1:0", "aws"),
    ("amazon.nova-pro-v1:0", "aws"),
    ("meta.llama3-70b-instruct-v1:0", "aws"),
    ("mistral-large-latest", None),
    ("codestral-latest", None),
    ("deepseek-chat", None),  # time-of-day prices
    ("deepseek-reasoner", None),
    ("llama-3.3-70b-versatile", "groq"),
    ("grok-3", None),
    ("command-r-plus", None),
    ("kimi-k2", None),
    ("gpt-4o", "azure"),
    ("sonar-pro", "perplexity"),  # per-request fee
    ("sonar-deep-research", "perplexity"),  # separate reasoning-token rate
    ("qwen/qwen3-coder-flash", "openrouter"),  # two tiers
]

BOOK = PriceBook()


def _genai_price(model: str, provider: str | None, u: Usage) -> Decimal:
    """What genai-prices itself charges, via its public calc_price."""
    _, info = data_snapshot.get_snapshot().find_provider_model(model, None, provider, None)
    has_reasoning_rate = info.get_prices(datetime.now(UTC)).output_reasoning_mtok is not None
    kwargs = {
        "input_tokens": u.input_tokens,
        "cache_read_tokens": u.cache_read_tokens,
        "cache_write_tokens": u.cache_write_tokens,
        "output_tokens": u.output_tokens,
    }
    if has_reasoning_rate:
        kwargs["output_reasoning_tokens"] = u.reasoning_tokens
    usage = genai_prices.Usage(**kwargs)
    total: Decimal = genai_prices.calc_price(usage, model, provider_id=provider).total_price
    return total


@st.composite
def usages(draw: Any) -> Usage:
    i = draw(
        st.one_of(
            st.integers(0, 1_500_000),
            st.sampled_from([0, 1, 128_000, 128_001, 200_000, 200_001, 272_000, 272_001]),
        )
    )
    cr = draw(st.integers(0, i))
    cw = draw(st.integers(0, i - cr))
    o = draw(st.integers(0, 200_000))
    r = draw(st.integers(0, o))
    return Usage(i, o, cr, cw, r)


# -- exactness --------------------------------------------------------------------------------


@pytest.mark.parametrize(("model", "provider"), MODELS)
def test_every_listed_model_is_priced(model: str, provider: str | None) -> None:
    rates = BOOK.rates(model, provider)
    assert rates is not None
    assert rates.source == f"genai-prices {genai_prices.__version__}"
    assert rates.exact_price is None  # the fast path applies


@settings(max_examples=600, deadline=None)
@given(model=st.sampled_from(MODELS), u=usages())
def test_cost_equals_genai_prices_exactly(model: tuple[str, str | None], u: Usage) -> None:
    ref, provider = model
    rates = BOOK.require(ref, provider)
    assert rates.cost(u) == _genai_price(ref, provider, u)
    assert isinstance(rates.cost(u), Decimal)


@settings(max_examples=400, deadline=None)
@given(model=st.sampled_from(MODELS), u=usages())
def test_worst_case_bounds_every_split(model: tuple[str, str | None], u: Usage) -> None:
    rates = BOOK.require(*model)
    worst = rates.worst_case_cost(u.input_tokens, u.output_tokens)
    assert worst >= rates.cost(u)
    for other in rates.peak:  # a price that may apply later today
        assert worst >= other.cost(u)


def test_fast_path_matches_genai_for_every_model_in_the_snapshot() -> None:
    """Not just the list above: every token-priced model genai-prices ships."""
    snap = data_snapshot.get_snapshot()
    now = datetime.now(UTC)
    rnd = random.Random(7)
    checked = unpriced = 0
    for provider in snap.providers:
        for info in provider.models:
            price = info.get_prices(now)
            try:
                rates = _pricing._rates_from_price(price, info.id, info.id, provider.id, "t")
            except _pricing._Unpriced:
                assert price.input_mtok is None  # only models without a token input price
                unpriced += 1
                continue
            assert _pricing._checked(rates, price) is rates  # no model needs the slow path
            reasoning = price.output_reasoning_mtok is not None
            for _ in range(3):
                i = rnd.choice([0, 1000, 200_001, 272_001, rnd.randint(0, 1_500_000)])
                cr = rnd.randint(0, i)
                cw = rnd.randint(0, i - cr)
                o = rnd.randint(0, 50_000)
                u = Usage(i, o, cr, cw, rnd.randint(0, o))
                assert rates.cost(u) == _pricing._genai_total(price, u, reasoning=reasoning)
            checked += 1
    assert checked > 1500
    assert unpriced < checked


def test_cache_reads_without_a_cache_price_are_billed_as_input() -> None:
    rates = BOOK.require("llama-3.3-70b-versatile", "groq")
    assert rates.cache_read is None
    assert rates.cache_write is None
    cached = Usage(input_tokens=1000, cache_read_tokens=600, cache_write_tokens=100)
    plain = Usage(input_tokens=1000)
    assert rates.cost(cached) == rates.cost(plain) == Decimal("0.00059")
    assert rates.cost(cached) == _genai_price("llama-3.3-70b-versatile", "groq", cached)
    # gpt-4o has a cache-read price but no cache-write price: writes are billed as input
    gpt = BOOK.require("gpt-4o")
    assert gpt.cost(Usage(1000, cache_write_tokens=600)) == gpt.cost(Usage(1000))


def test_tiers_are_a_cliff_on_total_input() -> None:
    rates = BOOK.require("claude-sonnet-4-5")
    (tier,) = rates.tiers
    assert tier.start == 200_000
    assert tier.input > rates.input
    assert tier.output > rates.output
    below = rates.cost(Usage(200_000, 1000))
    above = rates.cost(Usage(200_001, 1000))
    assert above == 200_001 * tier.input + 1000 * tier.output
    assert below == 200_000 * rates.input + 1000 * rates.output
    # cache tokens count toward the threshold
    assert rates.cost(Usage(200_001, 0, cache_read_tokens=200_000)) == (
        1 * tier.input + 200_000 * (tier.cache_read or tier.input)
    )
    assert rates.worst_case_cost(200_001, 0) == 200_001 * max(
        tier.input, tier.cache_write or tier.input
    )


def test_per_request_fee_and_reasoning_rate() -> None:
    sonar = BOOK.require("sonar-pro", "perplexity")
    assert sonar.per_request is not None
    assert sonar.per_request > 0
    assert sonar.cost(Usage()) == sonar.per_request
    deep = BOOK.require("sonar-deep-research", "perplexity")
    assert deep.reasoning is not None
    u = Usage(input_tokens=100, output_tokens=1000, reasoning_tokens=400)
    assert deep.cost(u) == 100 * deep.input + 600 * deep.output + 400 * deep.reasoning
    assert "reasoning" in deep.per_million


def test_worst_case_prices_cache_writes_above_input() -> None:
    rates = BOOK.require("claude-3-5-haiku")
    assert rates.cache_write is not None
    assert rates.cache_write > rates.input
    assert rates.worst_case_cost(1000, 0) == 1000 * rates.cache_write
    assert rates.worst_case_cost(1000, 0) == rates.cost(Usage(1000, 0, cache_write_tokens=1000))


def test_time_of_day_prices_are_covered_by_the_worst_case() -> None:
    rates = BOOK.require("deepseek-chat")
    assert rates.peak, "deepseek prices change during the day"
    for other in rates.peak:
        assert rates.worst_case_cost(5000, 500) >= other.worst_case_cost(5000, 500)
        assert rates.max_output_tokens_for(Decimal("0.01"), 5000) <= other.max_output_tokens_for(
            Decimal("0.01"), 5000
        )


def test_rates_are_re_resolved_when_the_price_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    book = PriceBook()
    first = book.require("deepseek-chat")
    assert book.require("deepseek-chat") is first
    entry = book._cache[("deepseek-chat", None)]
    assert entry.expires < float("inf")
    later = SimpleNamespace(time=lambda: entry.expires + 1)
    monkeypatch.setattr(_pricing, "time", later)
    assert book.require("deepseek-chat") is not first  # looked up again
    static = book._cache[("deepseek-chat", None)]
    assert static is not entry
    assert book._cache.get(("gpt-4o", None)) is None
    book.require("gpt-4o")
    assert book._cache[("gpt-4o", None)].expires == float("inf")


# -- max_output_tokens_for ----------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    model=st.sampled_from(MODELS),
    usd=st.decimals(min_value=0, max_value=50, places=6),
    i=st.integers(0, 1_500_000),
)
def test_max_output_tokens_is_the_largest_affordable(
    model: tuple[str, str | None], usd: Decimal, i: int
) -> None:
    rates = BOOK.require(*model)
    n = rates.max_output_tokens_for(usd, i)
    assert 0 <= n <= MAX_TOKENS_PER_CALL
    if n > 0:
        assert rates.worst_case_cost(i, n) <= usd
    if n < MAX_TOKENS_PER_CALL:
        assert rates.worst_case_cost(i, n + 1) > usd


def test_max_output_tokens_edge_cases() -> None:
    gpt = BOOK.require("gpt-4o")
    assert gpt.max_output_tokens_for(Decimal("0.01"), 1000) == 750
    assert gpt.max_output_tokens_for(Decimal("0.001"), 1000) == 0  # input alone costs 0.0025
    assert gpt.max_output_tokens_for(Decimal(-1), 0) == 0
    free = PriceBook({"local": {"input_per_mtok": 0, "output_per_mtok": 0}}).require("local")
    assert free.max_output_tokens_for(Decimal(0), 10_000) == MAX_TOKENS_PER_CALL


# -- overrides ----------------------------------------------------------------------------------


def test_explicit_override_and_self_hosted_zero() -> None:
    book = PriceBook(
        {
            "llama-local": {"input_per_mtok": 0, "output_per_mtok": 0},
            "My-Model": PriceOverride(
                input_per_mtok=Decimal("1"), output_per_mtok="4", cache_read_per_mtok="0.1"
            ),
        }
    )
    local = book.require("llama-local")
    assert local.source == "override"
    assert local.provider is None
    assert book.cost("llama-local", Usage(10**6, 10**6)) == 0
    mine = book.require("my-model")  # case-insensitive
    assert mine.per_million == {
        "input": Decimal(1),
        "output": Decimal(4),
        "cache_read": Decimal("0.1"),
        "cache_write": None,
    }
    u = Usage(input_tokens=1_000_000, cache_read_tokens=500_000, cache_write_tokens=100_000)
    assert mine.cost(u) == Decimal("0.4") + Decimal("0.05") + Decimal("0.1")
    assert book.require("MY-MODEL").model == "MY-MODEL"  # the id that was asked for


def test_discount_override_scales_genai_prices() -> None:
    book = PriceBook({"gpt-4o": {"discount": "0.8"}, "claude-sonnet-4-5": {"discount": 0.5}})
    base = BOOK.require("gpt-4o")
    disc = book.require("gpt-4o")
    assert disc.source == f"override(discount=0.8) of genai-prices {genai_prices.__version__}"
    assert disc.discount == Decimal("0.8")
    assert disc.input == base.input * Decimal("0.8")
    u = Usage(5000, 700, cache_read_tokens=1000)
    assert disc.cost(u) == base.cost(u) * Decimal("0.8")
    tiered = book.require("claude-sonnet-4-5")
    big = Usage(300_000, 1000)
    assert tiered.cost(big) == BOOK.require("claude-sonnet-4-5").cost(big) / 2
    assert tiered.tiers[0].input == BOOK.require("claude-sonnet-4-5").tiers[0].input / 2


def test_aliases_map_custom_ids() -> None:
    book = PriceBook(
        {
            "gpt-4o-prod": {"discount": "0.9"},
            "in-house": {"input_per_mtok": 1, "output_per_mtok": 2},
        },
        aliases={
            "my-proxy/gpt4o-prod": "gpt-4o",
            "gpt-4o-prod": "openai/gpt-4o",
            "house-v2": "in-house",
            "chain-a": "chain-b",
            "chain-b": "claude-3-5-haiku",
        },
    )
    proxied = book.require("My-Proxy/GPT4o-Prod")
    assert proxied.resolved == "gpt-4o"
    assert proxied.provider == "openai"
    assert proxied.model == "My-Proxy/GPT4o-Prod"
    assert proxied.input == BOOK.require("gpt-4o").input
    discounted = book.require("gpt-4o-prod")
    assert discounted.input == BOOK.require("gpt-4o").input * Decimal("0.9")
    assert book.require("house-v2").source == "override"
    assert book.require("house-v2").input == Decimal("0.000001")
    assert book.require("chain-a").resolved == "claude-3-5-haiku-latest"


def test_alias_cycles_are_rejected() -> None:
    with pytest.raises(PolicyError, match=r"alias cycle: a -> b -> a"):
        PriceBook(aliases={"a": "b", "b": "a"})


def test_discount_without_a_base_price_is_unknown() -> None:
    book = PriceBook({"my-custom": {"discount": "0.5"}})
    assert book.rates("my-custom") is None
    with pytest.raises(UnknownModelError, match="needs a genai-prices price to discount"):
        book.require("my-custom")


@pytest.mark.parametrize(
    ("raw", "field", "value"),
    [
        ({"input_per_mtok": -1, "output_per_mtok": 1}, "input_per_mtok", "-1"),
        ({"input_per_mtok": 1, "output_per_mtok": "-0.5"}, "output_per_mtok", "'-0.5'"),
        (
            {"input_per_mtok": 1, "output_per_mtok": 1, "cache_read_per_mtok": "nan"},
            "cache_read",
            "",
        ),
        ({"discount": "1.5"}, "discount", "'1.5'"),
        ({"discount": 0}, "discount", "0"),
        ({"discount": "0.8", "input_per_mtok": 1}, "discount", "Decimal('0.8')"),
        ({"input_per_mtok": 1}, "output_per_mtok", "None"),
        ({}, "input_per_mtok", "None"),
        ({"input_per_mtok": "abc", "output_per_mtok": 1}, "input_per_mtok", "'abc'"),
        ({"input_per_mtok": 1, "output_per_mtok": 1, "typo": 1}, "typo", "1"),
    ],
)
def test_invalid_overrides_name_field_and_value(
    raw: dict[str, Any], field: str, value: str
) -> None:
    with pytest.raises(PolicyError) as info:
        PriceBook({"m": raw})
    message = str(info.value)
    assert message.startswith("overrides['m'].")
    assert field in info.value.field
    assert value in message
    with pytest.raises(PolicyError) as direct:
        PriceOverride(**raw)
    assert field in direct.value.field
    assert value in str(direct.value)


def test_both_discount_and_rates_message() -> None:
    with pytest.raises(PolicyError, match=r"either a discount or explicit rates, not both"):
        PriceOverride(discount="0.8", input_per_mtok=1, output_per_mtok=1)


def test_bad_book_configuration() -> None:
    with pytest.raises(PolicyError, match="unknown_model="):
        PriceBook(unknown_model="ignore")  # type: ignore[arg-type]
    with pytest.raises(PolicyError, match="needs fallback rates"):
        PriceBook(unknown_model="fallback")
    with pytest.raises(PolicyError, match=r"fallback\.discount="):
        PriceBook(unknown_model="fallback", fallback={"discount": "0.5"})
    with pytest.raises(PolicyError, match="only used with unknown_model='fallback'"):
        PriceBook(fallback={"input_per_mtok": 1, "output_per_mtok": 1})
    with pytest.raises(PolicyError, match="duplicate"):
        PriceBook({"A": {"discount": 1}, "a": {"discount": 1}})
    with pytest.raises(PolicyError, match=r"overrides\['m'\]=3"):
        PriceBook({"m": 3})  # type: ignore[dict-item]


# -- lookups ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "provider", "expected_provider"),
    [
        ("openai/gpt-4o", None, "openai"),
        ("openai:gpt-4o", None, "openai"),
        ("azure/gpt-4o", None, "azure"),
        ("GPT-4O", None, "openai"),
        ("groq/llama-3.3-70b-versatile", None, "groq"),
        ("vertex_ai/gemini-2.5-pro", None, "google"),
        ("gemini-2.5-pro", "google_genai", "google"),
        ("openrouter/anthropic/claude-3.5-sonnet", None, "openrouter"),
        ("gpt-4o", "not-a-provider", "openai"),
    ],
)
def test_provider_prefixes(model: str, provider: str | None, expected_provider: str) -> None:
    rates = BOOK.require(model, provider)
    assert rates.provider == expected_provider
    assert rates.model == model


@pytest.mark.parametrize(
    "model",
    [
        "anthropic.claude-3-5-sonnet-20240620-v1:0",
        "us.anthropic.claude-3-5-sonnet-20240620-v1:0",
        "eu.anthropic.claude-3-7-sonnet-20250219-v1:0",
        "global.anthropic.claude-sonnet-4-5-20250929-v1:0",
        "bedrock/anthropic.claude-3-5-sonnet-20240620-v1:0",
        "arn:aws:bedrock:us-east-1:123456789012:inference-profile/"
        "us.anthropic.claude-3-5-sonnet-20240620-v1:0",
        "us.meta.llama3-3-70b-instruct-v1:0",
        "amazon.nova-lite-v1:0",
    ],
)
def test_bedrock_ids_resolve_under_aws(model: str) -> None:
    rates = BOOK.require(model)
    assert rates.provider == "aws"


def test_default_provider_of_the_book() -> None:
    book = PriceBook(provider="azure")
    assert book.require("gpt-4o").provider == "azure"
    assert book.require("gpt-4o", "openai").provider == "openai"


def test_unknown_model() -> None:
    book = PriceBook()
    assert book.rates("acme-llm-9000") is None
    assert book.cost("acme-llm-9000", Usage(10, 10)) is None
    with pytest.raises(UnknownModelError, match=r"model='acme-llm-9000'") as info:
        book.require("acme-llm-9000")
    assert info.value.model == "acme-llm-9000"
    assert book.rates("") is None


def test_models_genai_lists_without_token_prices_are_unknown() -> None:
    with pytest.raises(UnknownModelError, match="no per-token input price"):
        PriceBook().require("whisper-large-v3", "groq")


def test_fallback_rates_are_labelled() -> None:
    book = PriceBook(
        unknown_model="fallback", fallback={"input_per_mtok": "5", "output_per_mtok": "15"}
    )
    rates = book.require("acme-llm-9000")
    assert rates.source == "fallback"
    assert rates.model == "acme-llm-9000"
    assert rates.cost(Usage(1_000_000, 0)) == Decimal(5)
    assert book.require("gpt-4o").source.startswith("genai-prices")  # known models unaffected


def test_lookups_are_cached() -> None:
    book = PriceBook()
    first = book.rates("gpt-4o")
    assert book.rates("gpt-4o") is first
    assert book.rates("acme") is None
    assert ("acme", None) in book._cache
    book.clear_cache()
    assert book.rates("gpt-4o") is not first
    assert book.rates("gpt-4o") == first


def test_concurrent_lookups_get_one_object() -> None:
    book = PriceBook()
    barrier = threading.Barrier(16)
    seen: list[ModelRates | None] = []

    def look() -> None:
        barrier.wait()
        seen.append(book.rates("claude-sonnet-4-5"))

    threads = [threading.Thread(target=look) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(r) for r in seen}) == 1


def test_slow_path_when_the_fast_path_would_disagree() -> None:
    price = data_snapshot.get_snapshot().find_provider_model("gpt-4o", None, None, None)[1]
    model_price = price.get_prices(datetime.now(UTC))
    good = BOOK.require("gpt-4o")
    wrong = replace(good, input=good.input * 2)
    checked = _pricing._checked(wrong, model_price)
    assert checked.exact_price is model_price
    u = Usage(1234, 56, cache_read_tokens=200)
    assert checked.cost(u) == good.cost(u)
    assert checked.scaled(Decimal("0.5"), "x").cost(u) == good.cost(u) / 2


def test_per_million_display() -> None:
    assert BOOK.require("gpt-4o").per_million == {
        "input": Decimal("2.5"),
        "output": Decimal("10"),
        "cache_read": Decimal("1.25"),
        "cache_write": None,
    }


def test_importing_pricing_does_not_load_genai_prices() -> None:
    code = (
        "import sys, agentguard._pricing, agentguard._tokens; "
        "assert 'genai_prices' not in sys.modules; assert 'tiktoken' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
