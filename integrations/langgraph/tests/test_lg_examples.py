"""The LangGraph example is a real use case: run it and check what it claims."""

from __future__ import annotations

import runpy
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def run(name: str) -> dict[str, Any]:
    module = runpy.run_path(str(EXAMPLES / name))
    result: dict[str, Any] = module["main"]()
    return result


def test_react_example_downgrades_then_finishes_at_the_step_cap(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = run("langgraph_react.py")
    task, final, state = out["task"], out["final"], out["state"]
    # the step cap of 12 agent steps ended the loop, in the finishing node
    assert task.status == "finished"
    assert task.steps == 12
    assert task.model_calls == 12
    assert task.tool_calls == 11
    assert final.tool_calls == []
    assert final.response_metadata["agentguard"]["reason"] == "12 of 12 steps used"
    assert "budget ended the run" in final.text
    # under the $0.02 budget, downgraded once to the cheaper model, never back up
    assert task.cost_usd <= Decimal("0.02")
    assert [d.action for d in task.decisions if d.action != "allow"] == ["downgrade", "finish"]
    models = [s.model for s in task.guard.sink.spans if s.kind == "model"]
    first_mini = models.index("gpt-4o-mini")
    assert set(models[first_mini:]) == {"gpt-4o-mini"}
    assert out["mini_calls"] == len(models) - first_mini
    # what the run spent is in the graph state, exactly
    assert state["agentguard"]["cost_usd"] == task.cost_usd
    assert state["agentguard"]["steps"] == 12
    assert state["agentguard"]["decisions"] == ["model:downgrade", "step:finish"]
    assert "12 of 12 steps used" in capsys.readouterr().out


def test_thread_example_resumes_in_fresh_guards_and_finishes_at_the_step_cap(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = run("langgraph_thread.py")
    runs, state, final = out["runs"], out["state"], out["final"]
    # one step per run (interrupted before each tool call), the fourth is the cap's last step:
    # its call is the final answer, although no run's own task took more than one step
    assert [t.status for t in runs] == ["ok", "ok", "ok", "finished"]
    assert all(t.steps == 1 and t.model_calls == 1 for t in runs)
    assert [t.spent.steps for t in runs] == [1, 2, 3, 4]
    assert final.tool_calls == []
    assert final.response_metadata["agentguard_final"] is True
    assert [f"{d.kind}:{d.action}" for d in runs[-1].decisions] == ["model:finish"]
    # the thread's spend, in the checkpoint: every run's share added up
    assert state["agentguard"]["steps"] == 4
    assert state["agentguard"]["model_calls"] == 4
    assert state["agentguard"]["tool_calls"] == 3
    assert state["agentguard"]["tool_calls_by_name"] == {"refund_status": 3}
    assert state["agentguard"]["decisions"] == ["model:finish"]
    assert state["agentguard"]["cost_usd"] == sum(t.cost_usd for t in runs)
    assert runs[-1].spent.cost_usd == state["agentguard"]["cost_usd"]
    assert "a person approves the tool call" in capsys.readouterr().out
