"""The LlamaIndex agent example is a real use case: run it and check what it claims."""

from __future__ import annotations

import runpy
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from li_support import clean_llamaindex_state

from agentguard import MemorySink


@pytest.fixture(autouse=True)
def _detach_instrumentation() -> Iterator[None]:
    yield from clean_llamaindex_state()


EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def run(name: str) -> dict[str, Any]:
    module = runpy.run_path(str(EXAMPLES / name))
    result: dict[str, Any] = module["main"]()
    return result


def test_agent_example_downgrades_then_finishes_at_the_step_cap(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = run("llamaindex_agent.py")
    task, model, mini = out["task"], out["model"], out["mini"]
    # the step cap of 8 ended the runaway loop with one last answer
    assert task.status == "finished"
    assert task.steps == 8
    assert task.tool_calls == 8
    assert task.model_calls == 9
    assert str(out["result"]).startswith("Order 1182 was delayed")
    final = mini.seen[-1]
    assert final["tools"] == []
    assert final["max_tokens"] <= 120
    # under the $0.02 budget, downgraded once to the cheaper model, never back up
    assert task.cost_usd is not None and task.cost_usd <= Decimal("0.02")
    assert [d.action for d in task.decisions] == ["downgrade", "finish"]
    assert len(model.seen) + len(mini.seen) == 9
    assert model.seen and mini.seen
    sink = task.guard.sink
    assert isinstance(sink, MemorySink)
    models = [s.model for s in sink.spans if s.kind == "model"]
    first_mini = models.index("gpt-4o-mini")
    assert set(models[first_mini:]) == {"gpt-4o-mini"}
    assert all(c["max_tokens"] <= 400 for c in model.seen + mini.seen)
    printed = capsys.readouterr().out
    assert "8 of 8 steps used" in printed
    assert "finished" in printed
