"""The pure decision functions, over plain values (real rates from the price book)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

import agentguard as ag
from agentguard._decide import (
    MIN_USEFUL_OUTPUT_TOKENS,
    CallRequest,
    Headroom,
    Spent,
    crossed_soft_limits,
    decide_model_call,
    decide_retry,
    decide_step,
    decide_tool_call,
)

D = Decimal
BOOK = ag.PriceBook(
    overrides={
        "big": {"input_per_mtok": "10", "output_per_mtok": "30"},
        "mid": {"input_per_mtok": "2", "output_per_mtok": "8"},
        "small": {"input_per_mtok": "0.5", "output_per_mtok": "1"},
    }
)
RATES = {m: BOOK.rates(m) for m in ("big", "mid", "small")}
LADDER = (ag.Downgrade(at=0.5, to="mid"), ag.Downgrade(at=0.8, to="small"))


def policy(**kw: object) -> ag.Policy:
    return ag.Policy(**kw)  # type: ignore[arg-type]


def room(remaining: str | None, limit: str = "1", budget: str = "task:t") -> Headroom:
    if remaining is None:
        return Headroom()
    frac = float((D(limit) - D(remaining)) / D(limit))
    return Headroom(D(remaining), frac, D(limit), budget)


def test_allow_binds_the_smallest_cap() -> None:
    d = decide_model_call(
        policy(max_cost_usd="1", max_output_tokens=500),
        Spent(),
        room("1"),
        CallRequest("big", 1000, max_tokens=300),
        RATES,
    )
    assert (d.action, d.model, d.max_tokens) == ("allow", "big", 300)
    assert d.reserve_usd == D("0.01") + D("0.009")


def test_cap_derived_from_what_is_left() -> None:
    # $0.02 left; 1000 input tokens cost $0.01 at $10/M; $0.01 / ($30/M) = 333 tokens
    d = decide_model_call(
        policy(max_cost_usd="1"), Spent(), room("0.02"), CallRequest("big", 1000), RATES
    )
    assert (d.action, d.max_tokens) == ("allow", 333)
    assert d.reserve_usd is not None
    assert d.reserve_usd <= D("0.02")
    assert "capped at 333" in d.reason


@pytest.mark.parametrize(
    ("remaining", "expected"), [("0.9", "big"), ("0.45", "mid"), ("0.15", "small")]
)
def test_ladder_follows_the_fraction_spent(remaining: str, expected: str) -> None:
    d = decide_model_call(
        policy(max_cost_usd="1", max_output_tokens=100, downgrade=LADDER),
        Spent(),
        room(remaining),
        CallRequest("big", 100),
        RATES,
    )
    assert d.model == expected
    assert d.action == ("allow" if expected == "big" else "downgrade")


def test_ladder_never_goes_up_in_price() -> None:
    d = decide_model_call(
        policy(max_cost_usd="1", max_output_tokens=100, downgrade=LADDER),
        Spent(),
        room("0.4"),
        CallRequest("small", 100),
        RATES,
    )
    assert (d.action, d.model) == ("allow", "small")


def test_cheaper_rung_taken_when_requested_model_cannot_be_afforded() -> None:
    # $0.0011 of $0.002 left (45% spent, below the first rung): big cannot pay for 100 input
    # + 16 output tokens ($0.00148), a cheaper rung can
    d = decide_model_call(
        policy(max_cost_usd="1", downgrade=LADDER),
        Spent(),
        room("0.0011", limit="0.002"),
        CallRequest("big", 100),
        RATES,
    )
    assert d.action == "downgrade"
    assert d.model == "mid"
    assert "cannot pay for big" in d.reason


@pytest.mark.parametrize(("on_limit", "action"), [("raise", "stop"), ("finish", "finish")])
def test_nothing_fits(on_limit: str, action: str) -> None:
    d = decide_model_call(
        policy(max_cost_usd="1", on_limit=on_limit, finish_output_tokens=64),
        Spent(),
        room("0.00006"),  # 100 input tokens leave $0.00001: 10 output tokens, fewer than 16
        CallRequest("small", 100),
        RATES,
    )
    assert d.action == action
    assert d.limit == "max_cost_usd"
    assert d.limit_value == D("1")
    if action == "finish":
        assert d.max_tokens is not None
        assert d.max_tokens <= 64


def test_finish_keeps_budget_back_for_the_final_answer() -> None:
    p = policy(max_cost_usd="1", on_limit="finish", finish_output_tokens=200)
    left = D("0.004")  # small: 1000 in = $0.0005; finish reserve = 2000 in + 200 out = $0.0012
    normal = decide_model_call(p, Spent(), room(str(left)), CallRequest("small", 1000), RATES)
    assert normal.action == "allow"
    assert normal.max_tokens == 2300  # (0.004 - 0.0012 - 0.0005) / $1/M
    raise_mode = decide_model_call(
        policy(max_cost_usd="1"), Spent(), room(str(left)), CallRequest("small", 1000), RATES
    )
    assert raise_mode.max_tokens == 3500


def test_unpriced_model_without_money_limit() -> None:
    d = decide_model_call(
        policy(max_model_calls=3, max_output_tokens=50),
        Spent(model_calls=1),
        Headroom(),
        CallRequest("mystery", 10),
        {"mystery": None},
    )
    assert (d.action, d.max_tokens, d.reserve_usd) == ("allow", 50, None)


def test_token_budgets_cap_output() -> None:
    d = decide_model_call(
        policy(max_total_tokens=1000),
        Spent(input_tokens=500, output_tokens=100),
        Headroom(),
        CallRequest("small", 300),
        RATES,
    )
    assert d.max_tokens == 100
    stop = decide_model_call(
        policy(max_total_tokens=1000),
        Spent(input_tokens=900),
        Headroom(),
        CallRequest("small", 95),
        RATES,
    )
    assert (stop.action, stop.limit, stop.limit_value) == ("stop", "max_total_tokens", 1000)


def test_an_exhausted_output_token_total_is_named_as_such() -> None:
    stop = decide_model_call(
        policy(max_total_output_tokens=500),
        Spent(input_tokens=100, output_tokens=495),
        Headroom(),
        CallRequest("small", 10),
        RATES,
    )
    assert (stop.action, stop.limit, stop.limit_value) == ("stop", "max_total_output_tokens", 500)
    assert "5 output tokens left" in stop.reason
    assert "None" not in stop.reason


def test_finished_task_gets_no_more_calls() -> None:
    d = decide_model_call(
        policy(on_limit="finish"), Spent(finished=True), Headroom(), CallRequest("big", 1), RATES
    )
    assert (d.action, d.limit) == ("stop", "finished")


def test_count_caps() -> None:
    p = policy(max_model_calls=5, on_limit="finish")
    assert (
        decide_model_call(p, Spent(model_calls=3), Headroom(), CallRequest("big", 1), RATES).action
        == "allow"
    )
    assert (
        decide_model_call(p, Spent(model_calls=4), Headroom(), CallRequest("big", 1), RATES).action
        == "finish"
    )
    assert (
        decide_model_call(p, Spent(model_calls=5), Headroom(), CallRequest("big", 1), RATES).action
        == "stop"
    )
    steps = policy(max_steps=2, on_limit="finish")
    assert (
        decide_model_call(steps, Spent(steps=2), Headroom(), CallRequest("big", 1), RATES).action
        == "finish"
    )


def test_tool_retry_step_decisions() -> None:
    p = policy(max_tool_calls=2, tool_limits={"search": 1}, max_retries=1, max_steps=1)
    assert decide_tool_call(p, Spent(), "search").action == "allow"
    d = decide_tool_call(p, Spent(tool_calls=1, tool_calls_by_name={"search": 1}), "search")
    assert (d.action, d.limit, d.limit_value, d.actual) == ("stop", "tool_limits.search", 1, 2)
    assert decide_tool_call(p, Spent(tool_calls=2), "fetch").limit == "max_tool_calls"
    fin = policy(max_tool_calls=0, on_limit="finish")
    assert decide_tool_call(fin, Spent(), "x").action == "block"
    warn = policy(max_tool_calls=0, on_limit="warn")
    assert decide_tool_call(warn, Spent(), "x").action == "warn"
    assert decide_retry(p, Spent()).action == "allow"
    assert decide_retry(p, Spent(retries=1)).action == "stop"
    assert decide_retry(policy(max_retries=0, on_limit="finish"), Spent()).action == "stop"
    assert decide_step(p, Spent(steps=1)).action == "stop"
    assert decide_step(policy(max_steps=1, on_limit="finish"), Spent(steps=1)).action == "finish"


def test_soft_limit_crossings() -> None:
    assert crossed_soft_limits((0.5, 0.8), 0.0, 0.49) == []
    assert crossed_soft_limits((0.5, 0.8), 0.49, 0.5) == [0.5]
    assert crossed_soft_limits((0.5, 0.8), 0.5, 0.9) == [0.8]


@given(
    remaining=st.decimals(min_value=D(0), max_value=D("0.05"), places=7),
    n_in=st.integers(0, 50_000),
    cap=st.one_of(st.none(), st.integers(1, 4000)),
    model=st.sampled_from(["big", "mid", "small"]),
    on_limit=st.sampled_from(["raise", "finish"]),
)
def test_a_proceeding_decision_never_reserves_more_than_is_left(
    remaining: Decimal, n_in: int, cap: int | None, model: str, on_limit: str
) -> None:
    p = policy(max_cost_usd="0.05", downgrade=LADDER, on_limit=on_limit, max_output_tokens=cap)
    d = decide_model_call(p, Spent(), room(str(remaining), "0.05"), CallRequest(model, n_in), RATES)
    if d.action in ("allow", "downgrade", "finish"):
        assert d.reserve_usd is not None
        assert d.reserve_usd <= remaining
        assert d.max_tokens is not None
        if cap is not None:
            assert d.max_tokens <= cap
        if d.action != "finish":
            assert d.max_tokens >= min(MIN_USEFUL_OUTPUT_TOKENS, cap or MIN_USEFUL_OUTPUT_TOKENS)
        rates = RATES[d.model or ""]
        assert rates is not None
        assert d.reserve_usd == rates.worst_case_cost(n_in, d.max_tokens)
    else:
        assert d.action == "stop"
        assert d.limit == "max_cost_usd"


def test_a_refusal_reports_spend_plus_the_smallest_call_as_the_excess() -> None:
    d = decide_model_call(
        policy(max_cost_usd="1"), Spent(), room("0.00006"), CallRequest("small", 100), RATES
    )
    assert d.action == "stop"
    # spent $0.99994 + the smallest useful call (100 in at $0.5/M + 16 out at $1/M = $0.000066)
    assert d.actual == D("0.99994") + D("0.000066")
    assert d.actual > D("1")
