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
    assert state["agentguard_cost_usd"] == task.cost_usd
    assert state["agentguard_steps"] == 12
    assert state["agentguard_decisions"] == ["model:downgrade", "step:finish"]
    assert "12 of 12 steps used" in capsys.readouterr().out
