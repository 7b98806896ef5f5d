"""The LangChain examples are real use cases: run them and check what they claim."""

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


def test_callback_handler_example_stops_at_the_team_budget(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = run("langchain_callback_handler.py")
    assert 0 < out["answered"] < 40  # the team budget ended the batch
    assert out["spent"] <= Decimal("0.002")
    assert "stopped at question" in capsys.readouterr().out


def test_agent_middleware_example_downgrades_then_finishes() -> None:
    out = run("langchain_agent_middleware.py")
    task = out["task"]
    assert task.status == "finished"
    assert task.cost_usd <= Decimal("0.03")
    actions = [d.action for d in task.decisions if d.action in ("downgrade", "finish")]
    assert actions == ["downgrade", "finish"]
    assert out["final"].tool_calls == []


def test_budgeted_chat_model_example_switches_rung_and_trims() -> None:
    out = run("langchain_budgeted_chat_model.py")
    task = out["task"]
    models = out["models"]
    assert models[0] == "gpt-4o"
    assert models[-1] == "gpt-4o-mini"
    assert models == sorted(models, key=lambda m: m == "gpt-4o-mini")  # never back up
    assert task.tokens_saved > 50_000
    assert task.cost_usd <= Decimal("0.08")
