"""Forecast over real SQLite traces: a hand-built one with known answers, and one recorded by a
real guard whose spend the forecast must reproduce when the window is one period."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest
from test_efficiency import T0, build

import agentguard as ag
from agentguard._cli import main
from agentguard._forecast import forecast
from agentguard._pricing import PriceBook
from agentguard._sinks import SQLiteTraceReader
from agentguard.testing import ScriptedModel

D = Decimal
DAY = 86400


def test_run_rate_by_feature_with_growth_and_levers(tmp_path: Path) -> None:
    with SQLiteTraceReader(build(tmp_path / "t.db")) as reader:
        rows = forecast(
            reader.tasks(),
            reader.spans,
            period="day",
            growth_pct=20,
            since=T0,
            until=T0 + DAY / 4,  # the records cover a quarter of a day: x4 per day
            prices=PriceBook(),
        )
    by = {f.key: f for f in rows}
    assert [f.key for f in rows] == ["support", "faq", None]
    faq = by["faq"]
    assert faq.requests == 2 and faq.requests_per_period == D("8.00")
    assert faq.input_tokens_per_request == D("300.0")
    assert faq.output_tokens_per_request == D("30.0")
    # one model (gpt-4o-mini): the blended rates are its rates
    assert faq.input_rate_usd == D("0.15") / 1_000_000
    assert faq.output_rate_usd == D("0.6") / 1_000_000
    assert faq.input_usd == D("0.00036")  # 8 x 300 x $0.15/M
    assert faq.output_usd == D("0.000144")  # 8 x 30 x $0.60/M
    assert faq.contingency_usd == D("0.000072")  # 20% of the input run-rate
    assert faq.optimised_usd == D("0.000576")
    assert faq.unoptimised_usd == faq.optimised_usd and faq.unestimated == []

    s = by["support"]
    assert s.requests == 4 and s.requests_per_period == D("16.00")
    # input-side cost of each call (cache reads at their rate), over all input tokens
    in_cost = (
        D("0.00172") + D("0.00375") + D("0.000225") + D("0.0003") + D("0.000075") + D("0.000015")
    )
    in_tok = 1200 + 1500 + 1500 + 2000 + 500 + 100
    assert s.input_rate_usd == in_cost / in_tok
    out_cost = D("0.007501") - in_cost
    assert s.output_rate_usd == out_cost / (80 + 40 + 100 + 200 + 50 + 10)
    # with one period = 4x the window, the optimised run-rate without growth is 4x the spend
    assert s.input_usd is not None and s.output_usd is not None
    assert s.input_usd + s.output_usd == pytest.approx(4 * D("0.007501"), abs=D("1e-7"))
    assert s.savings_usd["downgrade"] == 4 * D("0.004465")
    assert s.savings_usd["trim"] == 4 * D("0.00045")
    assert s.savings_usd["cap"] == (
        4 * ((D("0.006955") + D("0.00042")) / 2 - D("0.000021"))
    ).quantize(D("1e-8"))
    assert s.optimised_usd is not None and s.unoptimised_usd is not None
    assert s.unoptimised_usd - s.optimised_usd == sum(s.savings_usd.values())

    total = by[None]
    assert total.requests == 6
    assert total.optimised_usd == pytest.approx(s.optimised_usd + faq.optimised_usd, abs=D("1e-7"))


def test_reproduces_a_real_guards_spend_over_one_period(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    guard = ag.Guard(ag.Policy(max_cost_usd="1"), traces=db)
    big = ScriptedModel("gpt-4o", reply_tokens=60, cached_fraction=0.5)
    small = ScriptedModel("gpt-4o-mini", reply_tokens=200)
    for i in range(4):
        with guard.task(f"t{i}", feature="agent" if i % 2 else "rag") as task:
            messages = [{"role": "user", "content": "Summarise the ticket history " * (i + 1)}]
            for model in (big, small):
                reply = model.invoke(task, messages)
                messages.append({"role": "assistant", "content": reply.text})
    guard.close()
    with SQLiteTraceReader(db) as reader:
        records = reader.tasks()
        start = min(r.start for r in records)
        rows = forecast(records, reader.spans, period="hour", growth_pct=0, since=start,
                        until=start + 3600)  # fmt: skip
    for f in rows:
        members = [r for r in records if f.key is None or r.tags["feature"] == f.key]
        spent = sum((r.cost_usd for r in members if r.cost_usd is not None), D(0))
        assert f.optimised_usd == pytest.approx(spent, abs=D("1e-7")), f.key
        assert f.unoptimised_usd == f.optimised_usd  # no decisions were taken
        assert f.requests_per_period == D(len(members))


def test_bad_input_names_the_field() -> None:
    with pytest.raises(ValueError, match="period='year'"):
        forecast([], lambda t: [], period="year")
    with pytest.raises(ValueError, match="growth_pct='-5'"):
        forecast([], lambda t: [], growth_pct="-5")


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = build(tmp_path / "t.db")
    assert main(["forecast", "--db", str(db), "--period", "day", "--growth", "15"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Forecast per day from 6 requests over 50.0 s of traces")
    assert "contingency 15%" in out
    for word in ("support", "faq", "TOTAL", "OPTIMISED", "UNOPTIMISED", "downgrade"):
        assert word in out
    assert "note: the traces cover 50.0 s, less than a day: the run-rate is extrapolated" in out
    assert main(["forecast", "--db", str(db), "--json", "--period", "week"]) == 0
    data = json.loads(capsys.readouterr().out)["forecasts"]
    assert [f["key"] for f in data] == ["support", "faq", None]
    assert data[1]["input_usd_per_mtok"] == "0.15000000"
    assert D(data[1]["requests_per_period"]) == (D(2) * 7 * DAY / D(50)).quantize(D("0.01"))
    assert main(["forecast", "--db", str(db), "--growth", "x"]) == 2
    assert "--growth 'x'" in capsys.readouterr().err
    assert main(["forecast", "--db", str(db), "--growth", "-1"]) == 2
    assert "growth_pct" in capsys.readouterr().err
    assert main(["forecast", "--db", str(tmp_path / "missing.db")]) == 2
