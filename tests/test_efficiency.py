"""Efficiency metrics over real SQLite traces: hand-built ones with known answers, and one
recorded by a real guard."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

import agentguard as ag
from agentguard._cli import main
from agentguard._efficiency import efficiency, task_tokens
from agentguard._pricing import PriceBook
from agentguard._sinks import SQLiteSink, SQLiteTraceReader
from agentguard._trace import Span, TaskRecord
from agentguard._usage import Usage
from agentguard.testing import ScriptedModel

D = Decimal
T0 = 1_767_312_000.0


def _model(
    sid: str, task: str, at: float, model: str, usage: Usage, cost: str | None, **attrs: object
) -> Span:
    return Span(
        sid,
        task,
        "model",
        model,
        T0 + at,
        f"{task}-root",
        T0 + at + 0.5,
        model=model,
        usage=usage,
        cost_usd=None if cost is None else D(cost),
        attrs=dict(attrs),
    )


def build(path: Path) -> Path:
    """support: a 3-call agent task with a retry, a downgrade and a cache hit, a trimmed one,
    one that failed and one a cap ended; faq: two plain tasks."""
    spans = [
        # s1: call 1 (cache hit), call 2 retried, call 3 downgraded
        _model("a1", "s1", 1, "gpt-4o", Usage(1200, 80, 1024), "0.00252"),
        _model("a2", "s1", 2, "gpt-4o", Usage(1500, 40), "0.00415"),
        Span("ar", "s1", "retry", "rate_limited", T0 + 2.6, "s1-root", T0 + 2.6),
        _model(
            "a3",
            "s1",
            3,
            "gpt-4o-mini",
            Usage(1500, 100),
            "0.000285",
            requested_model="gpt-4o",
            saved_usd=D("0.004465"),
        ),
        # s2: a trimmed RAG answer
        Span(
            "bt",
            "s2",
            "trim",
            "trim",
            T0 + 10,
            "s2-root",
            T0 + 10.1,
            decision="trim",
            attrs={"tokens_saved": 3000, "saved_usd": D("0.00045")},
        ),
        _model("b1", "s2", 11, "gpt-4o-mini", Usage(2000, 200), "0.00042"),
        # s3: failed after one call
        _model("c1", "s3", 20, "gpt-4o-mini", Usage(500, 50), "0.000105"),
        # s4: capped (finished by max_model_calls) after one cheap call
        _model("d1", "s4", 30, "gpt-4o-mini", Usage(100, 10), "0.000021"),
        # faq
        _model("f1", "f1", 40, "gpt-4o-mini", Usage(300, 30), "0.000063"),
        _model("f2", "f2", 50, "gpt-4o-mini", Usage(300, 30), "0.000063"),
    ]
    records = [
        TaskRecord(
            "s1",
            None,
            T0 + 1,
            T0 + 4,
            "ok",
            {"feature": "support"},
            Usage(4200, 220, 1024),
            D("0.006955"),
            model_calls=3,
            retries=1,
        ),
        TaskRecord(
            "s2",
            None,
            T0 + 10,
            T0 + 12,
            "ok",
            {"feature": "support"},
            Usage(2000, 200),
            D("0.00042"),
            model_calls=1,
        ),
        TaskRecord(
            "s3",
            None,
            T0 + 20,
            T0 + 21,
            "error",
            {"feature": "support"},
            Usage(500, 50),
            D("0.000105"),
            model_calls=1,
        ),
        TaskRecord(
            "s4",
            None,
            T0 + 30,
            T0 + 31,
            "finished",
            {"feature": "support"},
            Usage(100, 10),
            D("0.000021"),
            model_calls=1,
            limit_hit="max_model_calls",
        ),
        TaskRecord(
            "f1",
            None,
            T0 + 40,
            T0 + 41,
            "ok",
            {"feature": "faq"},
            Usage(300, 30),
            D("0.000063"),
            model_calls=1,
        ),
        TaskRecord(
            "f2",
            None,
            T0 + 50,
            T0 + 51,
            "ok",
            {"feature": "faq"},
            Usage(300, 30),
            D("0.000063"),
            model_calls=1,
        ),
    ]
    with SQLiteSink(path) as sink:
        sink.write_spans(spans)
        for r in records:
            sink.write_task(r)
    return path


def test_buckets_cost_per_completed_and_levers(tmp_path: Path) -> None:
    with SQLiteTraceReader(build(tmp_path / "t.db")) as reader:
        rows = efficiency(reader.tasks(), reader.spans, prices=PriceBook())
    by = {e.key: e for e in rows}
    assert [e.key for e in rows] == ["support", "faq", None]
    s = by["support"]
    # s1: a1 useful 1280; a2 retried 1540; a3 carries min(1500, 1280) = 1280, useful 220 + 100
    # s2: 2200 useful; s3 failed: 550 overhead; s4: 110 useful
    assert (s.tokens.useful, s.tokens.context, s.tokens.retry, s.tokens.overhead) == (
        1280 + 320 + 2200 + 110,
        1280,
        1540,
        550,
    )
    assert s.tokens.waste_ratio == pytest.approx((1280 + 1540 + 550) / s.tokens.total)
    assert s.tasks == 4 and s.completed == 3 and s.failed == 1
    assert s.cost_usd == D("0.007501")
    assert s.cost_per_completed_usd == D("0.007501") / 3
    assert s.savings["downgrade"] == D("0.004465")
    assert s.savings["trim"] == D("0.00045")
    # 1024 cached tokens of gpt-4o billed at $1.25 instead of $2.50 per million
    assert s.savings["cache"] == D("0.00128")
    # s4 capped at $0.000021; its feature's uncapped completed tasks: s1, s2 -> median
    assert s.savings["cap"] == (D("0.006955") + D("0.00042")) / 2 - D("0.000021")
    assert s.ended_by_limit == 1
    f = by["faq"]
    assert f.tokens.waste_ratio == 0.0 and f.savings == dict.fromkeys(f.savings, D(0))
    total = by[None]
    assert total.tokens.total == s.tokens.total + f.tokens.total
    assert total.cost_usd == s.cost_usd + D("0.000126")
    assert total.savings["cap"] == s.savings["cap"]


def test_unknowns_stay_unknown(tmp_path: Path) -> None:
    rec = TaskRecord(
        "u",
        None,
        T0,
        T0 + 1,
        "finished",
        {"feature": "x"},
        Usage(10, 1),
        None,
        limit_hit="max_steps",
    )
    spans = [_model("u1", "u", 0, "my-llm", Usage(10, 1, 8), None)]
    (e, _total) = efficiency([rec], lambda t: spans, prices=PriceBook())
    assert e.cost_usd is None and e.cost_per_completed_usd is None
    assert e.savings["cap"] is None  # no reference task: not estimable, not $0
    assert e.savings["cache"] == D(0)  # an unpriced call has no recorded cost to compare
    without_prices = efficiency(
        [rec.__class__("p", None, T0, T0 + 1, "ok", {}, Usage(1200, 80, 1024), D("0.00252"))],
        lambda t: [_model("p1", "p", 0, "gpt-4o", Usage(1200, 80, 1024), "0.00252")],
        by=None,
    )
    assert without_prices[0].savings["cache"] is None


def test_on_a_trace_recorded_by_a_real_guard(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    guard = ag.Guard(ag.Policy(max_cost_usd="1", max_model_calls=3, on_limit="finish"), traces=db)
    model = ScriptedModel("gpt-4o-mini", reply_tokens=40)
    for i in range(3):
        with guard.task(f"t{i}", feature="agent") as task:
            messages = [{"role": "user", "content": "Plan the refund for order 42."}]
            for _ in range(5):
                reply = model.invoke(task, messages)
                if reply.finished:
                    break
                messages.append({"role": "assistant", "content": reply.text})
    guard.close()
    with SQLiteTraceReader(db) as reader:
        records = reader.tasks()
        (e, _total) = efficiency(records, reader.spans, prices=PriceBook())
        spans = [s for r in records for s in reader.spans(r.task_id) if s.kind == "model"]
    assert e.tokens.total == sum(s.usage.total_tokens for s in spans if s.usage)
    assert e.tokens.context > 0  # the loop re-sent its history
    assert e.completed == 3 and e.cost_usd == sum((r.cost_usd or D(0)) for r in records)
    for r in records:
        t = task_tokens(r, reader_spans := [s for s in spans if s.task_id == r.task_id])
        assert t.total == sum(s.usage.total_tokens for s in reader_spans if s.usage)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = build(tmp_path / "t.db")
    assert main(["efficiency", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "support" in out and "TOTAL" in out and "$0.00128" in out and "$0.004465" in out
    assert main(["efficiency", "--db", str(db), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)["efficiency"]
    support = data[0]
    assert support["key"] == "support"
    assert support["tokens"] == {
        "useful": 3910,
        "context": 1280,
        "retry": 1540,
        "overhead": 550,
        "total": 7280,
    }
    assert support["savings_usd"]["downgrade"] == "0.004465"
    assert main(["efficiency", "--db", str(db), "--by", "none"]) == 0
    assert "all" in capsys.readouterr().out
    assert main(["efficiency", "--db", str(db), "--since", "2099-01-01"]) == 2
    assert "no tasks recorded since then" in capsys.readouterr().err
