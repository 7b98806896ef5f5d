"""What-if replay over traces recorded by a real guard into a real SQLite file."""

from __future__ import annotations

import json
import logging
from decimal import Decimal
from pathlib import Path

import pytest

import agentguard as ag
from agentguard._cli import main
from agentguard._pricing import PriceBook
from agentguard._replay import ReplayReport, replay
from agentguard._sinks import SQLiteTraceReader
from agentguard._usage import Usage
from agentguard.testing import ScriptedModel

D = Decimal
LOOSE = ag.Policy(max_cost_usd="1", on_limit="finish")


def record(path: Path, policy: ag.Policy = LOOSE, tasks: int = 3, turns: int = 6) -> Path:
    """Agent runs: each turn a step, a model call, a tool call; run-0's first tool call is a
    sub-agent."""
    guard = ag.Guard(policy, traces=path)
    model = ScriptedModel("gpt-4o", reply_tokens=120, tool_calls={"name": "search", "args": {}})
    helper = ScriptedModel("gpt-4o-mini", reply_tokens=60)
    for i in range(tasks):
        with guard.task(f"run-{i}", feature="agent", team="cx") as task:
            messages = [{"role": "user", "content": f"Investigate incident {i}. " * 20}]
            for turn in range(turns):
                task.step("agent")
                reply = model.invoke(task, messages, max_tokens=400)
                messages.append({"role": "assistant", "content": reply.text})
                if reply.finished:
                    break
                tool = task.start_tool_call("search")
                if not tool.allowed:
                    continue
                if i == 0 and turn == 0:
                    with guard.task("run-0.sub") as sub:
                        helper.invoke(sub, [{"role": "user", "content": "Summarise. " * 30}])
                tool.end()
                messages.append({"role": "tool", "content": "Three matching log lines. " * 10})
    guard.close()
    return path


def _replay(db: Path, policy: ag.Policy) -> ReplayReport:
    with SQLiteTraceReader(db) as reader:
        return replay(reader.tasks(), reader.spans, policy)


def test_same_policy_reproduces_the_recorded_costs(tmp_path: Path) -> None:
    db = record(tmp_path / "t.db")
    report = _replay(db, LOOSE)
    assert [t.task_id for t in report.tasks] == ["run-0", "run-1", "run-2"]
    with SQLiteTraceReader(db) as reader:
        for t in report.tasks:
            recorded = reader.task(t.task_id)
            assert recorded is not None
            assert t.cost_usd == t.recorded_cost_usd
            assert t.model_calls == t.recorded_model_calls
            assert t.status == recorded.status == "ok"
            assert t.delta_usd == 0
    # the sub-agent's spend is part of its root's
    with SQLiteTraceReader(db) as reader:
        sub, root = reader.task("run-0.sub"), reader.task("run-0")
    assert sub is not None and root is not None and sub.cost_usd and root.cost_usd
    assert report.tasks[0].cost_usd == root.cost_usd + sub.cost_usd
    assert report.tasks[0].recorded_model_calls == root.model_calls + 1
    assert report.cost_usd == report.recorded_cost_usd


def test_a_tighter_ceiling_finishes_or_stops(tmp_path: Path) -> None:
    db = record(tmp_path / "t.db")
    recorded = _replay(db, LOOSE)
    ceiling = D("0.01")
    assert all(
        t.recorded_cost_usd is not None and t.recorded_cost_usd > ceiling for t in recorded.tasks
    )

    finish = _replay(db, ag.Policy(max_cost_usd=ceiling, on_limit="finish"))
    for t in finish.tasks:
        assert t.cost_usd is not None and t.cost_usd <= ceiling
        assert t.status == "finished" and t.limit_hit == "max_cost_usd"
        assert "finish (max_cost_usd)" in t.fired
        assert t.model_calls < t.recorded_model_calls
        assert t.skipped_spans > 0

    stop = _replay(db, ag.Policy(max_cost_usd=ceiling, on_limit="raise"))
    for t in stop.tasks:
        assert t.cost_usd is not None and t.cost_usd <= ceiling
        assert t.status == "stopped" and t.limit_hit == "max_cost_usd"
        assert "stop (max_cost_usd)" in t.fired


def test_a_team_budget_fires_across_tasks(tmp_path: Path) -> None:
    db = record(tmp_path / "t.db")
    one = _replay(db, LOOSE).tasks[1].cost_usd
    assert one is not None
    team = ag.Policy(
        on_limit="finish", budgets=[ag.Budget(scope="team", max_cost_usd=one * D("1.5"))]
    )
    report = _replay(db, team)
    first, second, third = report.tasks
    assert first.status == "ok" and first.fired == []  # one run and a sub-agent: it fits
    assert second.status == "finished" and "finish (max_cost_usd)" in second.fired
    assert third.status in ("finished", "stopped") and third.limit_hit == "max_cost_usd"
    assert report.cost_usd is not None and report.cost_usd <= one * D("1.5")


def test_downgrade_prices_the_same_tokens_on_the_cheaper_model(tmp_path: Path) -> None:
    db = record(tmp_path / "t.db", tasks=1)
    policy = ag.Policy(
        max_cost_usd="1", on_limit="finish", downgrade=[ag.Downgrade(at=0.001, to="gpt-4o-mini")]
    )
    (t,) = _replay(db, policy).tasks
    assert "downgrade -> gpt-4o-mini" in t.fired
    prices = PriceBook()
    big, mini = prices.require("gpt-4o"), prices.require("gpt-4o-mini")
    with SQLiteTraceReader(db) as reader:
        calls = [s for s in reader.spans("run-0") if s.kind == "model"]
        sub = [s for s in reader.spans("run-0.sub") if s.kind == "model"]
    assert all(s.usage is not None for s in calls + sub)
    # the first call leaves 0.1% spent behind it: every later gpt-4o call runs on gpt-4o-mini
    expected = (
        big.cost(calls[0].usage)
        + sum(  # type: ignore[arg-type]
            (mini.cost(s.usage) for s in calls[1:]),
            D(0),  # type: ignore[arg-type]
        )
    )
    expected += sum((mini.cost(s.usage) for s in sub), D(0))  # type: ignore[arg-type]
    assert t.cost_usd == expected


def test_a_lower_output_cap_cuts_the_recorded_output(tmp_path: Path) -> None:
    db = record(tmp_path / "t.db", tasks=1)
    (t,) = _replay(db, ag.Policy(max_output_tokens=50)).tasks
    prices = PriceBook()
    with SQLiteTraceReader(db) as reader:
        spans = [s for tid in ("run-0", "run-0.sub") for s in reader.spans(tid)]
    expected = D(0)
    for s in spans:
        if s.kind == "model" and s.usage is not None:
            u = s.usage
            capped = Usage(u.input_tokens, min(u.output_tokens, 50), u.cache_read_tokens)
            expected += prices.require(s.model or s.name).cost(capped)
    assert t.cost_usd == expected < (t.recorded_cost_usd or 0)


def test_a_tool_cap_makes_the_next_call_the_final_one(tmp_path: Path) -> None:
    db = record(tmp_path / "t.db", tasks=1)
    (t,) = _replay(db, ag.Policy(max_tool_calls=2, on_limit="finish")).tasks
    assert t.fired == ["finish (max_tool_calls)"]
    assert t.status == "finished" and t.limit_hit == "max_tool_calls"
    assert t.model_calls == 4  # two turns with a tool (one ran the sub-agent), the final answer


def test_replay_logs_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = record(tmp_path / "t.db", tasks=1)
    caplog.set_level(logging.DEBUG, logger="agentguard")
    _replay(db, ag.Policy(max_cost_usd="0.005", on_limit="finish", soft_limits=(0.5,)))
    assert [r for r in caplog.records if r.name == "agentguard"] == []
    assert logging.getLogger("agentguard").disabled is False


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = record(tmp_path / "t.db")
    policy = tmp_path / "tight.toml"
    policy.write_text('max_cost_usd = "0.01"\non_limit = "finish"\n')
    assert main(["replay", "--db", str(db), "--policy", str(policy)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"Replay under {policy} (3 tasks)")
    assert "ok->finished (max_cost_usd)" in out
    assert "finish (max_cost_usd)" in out and "fired in: finish 3 tasks" in out
    assert main(["replay", "--db", str(db), "--policy", str(policy), "--json", "--limit", "1"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [t["task_id"] for t in data["tasks"]] == ["run-2"]
    assert D(data["tasks"][0]["cost_usd"]) <= D("0.01")
    assert data["fired"] == {"finish": 1}

    bad = tmp_path / "bad.toml"
    bad.write_text('max_cost_usd = "-1"\n')
    assert main(["replay", "--db", str(db), "--policy", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "max_cost_usd" in err and "-1" in err
    assert main(["replay", "--db", str(db), "--policy", str(tmp_path / "none.toml")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["replay", "--db", str(db)]) == 2  # --policy is required
    assert main(["replay", "--db", str(db), "--policy", str(policy), "--limit", "0"]) == 2
    assert "expected a positive integer, got '0'" in capsys.readouterr().err


def test_replay_matches_a_real_run_under_the_new_policy(tmp_path: Path) -> None:
    """Recorded under a loose policy and replayed under a tight one, the figures equal those of
    the same workload really run under the tight one (a deterministic scripted model)."""
    tight = ag.Policy(max_cost_usd="0.012", on_limit="finish")
    loose_db = record(tmp_path / "loose.db", tasks=2)
    real_db = record(tmp_path / "real.db", policy=tight, tasks=2)
    replayed = _replay(loose_db, tight)
    with SQLiteTraceReader(real_db) as reader:
        real = {r.task_id: r for r in reader.tasks()}
    assert [t.task_id for t in replayed.tasks] == ["run-0", "run-1"]
    for t in replayed.tasks:
        r = real[t.task_id]
        family = [r, *(c for c in real.values() if c.parent_id == t.task_id)]
        assert len(family) == (2 if t.task_id == "run-0" else 1)
        assert (t.status, t.limit_hit) == (r.status, r.limit_hit) == ("finished", "max_cost_usd")
        assert t.model_calls == sum(f.model_calls for f in family)
        assert t.cost_usd == sum((f.cost_usd or D(0)) for f in family)
