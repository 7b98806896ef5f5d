"""``langgraph.prebuilt.create_react_agent`` with a scripted model that calls a tool forever:
built from ``gg.chat_model(model)`` and ``gg.tool_node(tools)`` and run through ``gg.bind``, it
ends at the money ceiling with a final answer (no ``GraphRecursionError``), its tool calls are
capped, and a hard stop raises — sync and async."""

from __future__ import annotations

from decimal import Decimal

import pytest
from langgraph.prebuilt import create_react_agent
from lg_support import Scripted, search, user

import agentguard as ag
from agentguard_langgraph import GraphGuard

# create_react_agent is deprecated since LangGraph 1.0 (moved to langchain.agents.create_agent)
# and warns with LangGraphDeprecatedSinceV10, a DeprecationWarning; the project turns warnings
# into errors, and this test is about the prebuilt agent people still run.
pytestmark = pytest.mark.filterwarnings(
    "ignore:create_react_agent has been moved:DeprecationWarning"
)


def kinds(task: ag.Task) -> list[str]:
    return [f"{d.kind}:{d.action}" for d in task.decisions if d.kind != "soft_limit"]


def test_the_bare_prebuilt_agent_loops_until_the_recursion_limit() -> None:
    """Without the guard only ``recursion_limit`` ends the loop: the prebuilt agent gives up
    with a canned apology (no answer), having spent whatever the supersteps cost."""
    model = Scripted(model_name="gpt-4o")
    agent = create_react_agent(model, [search])
    out = agent.invoke(user(), {"recursion_limit": 12})
    assert "need more steps" in out["messages"][-1].text
    assert len(model.seen) == 6  # every other superstep is a model call


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_prebuilt_agent_ends_at_the_money_ceiling_with_a_final_answer(mode: str) -> None:
    sink = ag.MemorySink()
    guard = ag.Guard(ag.Policy(max_cost_usd="0.01", on_limit="finish"), traces=sink)
    gg = GraphGuard(guard)
    model = Scripted(model_name="gpt-4o", reply_tokens=300)
    graph = gg.bind(create_react_agent(gg.chat_model(model), gg.tool_node([search])))
    out = graph.invoke(user()) if mode == "sync" else await graph.ainvoke(user())
    task = graph.last_task
    assert task is not None
    # the money ceiling turned the last model call into the final answer: no tool calls,
    # output capped, tools withheld, so the prebuilt loop ends by itself
    final = out["messages"][-1]
    assert final.type == "ai"
    assert final.tool_calls == []
    assert final.response_metadata["agentguard_final"] is True
    assert model.seen[-1]["tool_choice"] == "none"
    assert task.status == "finished"
    assert kinds(task) == ["model:finish"]
    assert task.cost_usd is not None
    assert Decimal("0.005") < task.cost_usd <= Decimal("0.01")
    assert task.tool_calls == task.model_calls - 1
    assert len(model.seen) == task.model_calls
    tool_msgs = [m for m in out["messages"] if m.type == "tool"]
    assert len(tool_msgs) == task.tool_calls
    # the trace: every model call and tool call of the run under its task
    spans = [s for s in sink.spans if s.task_id == task.id]
    assert sum(s.kind == "model" for s in spans) == task.model_calls
    assert sum(s.kind == "tool" for s in spans) == task.tool_calls
    assert sink.tasks[-1].status == "finished"
    assert sink.tasks[-1].cost_usd == task.cost_usd


def test_prebuilt_agent_tool_cap_blocks_then_the_next_call_is_final() -> None:
    guard = ag.Guard(
        ag.Policy(max_cost_usd="1", tool_limits={"search": 3}, on_limit="finish"), traces=False
    )
    gg = GraphGuard(guard)
    model = Scripted(model_name="gpt-4o")
    graph = gg.bind(create_react_agent(gg.chat_model(model), gg.tool_node([search])))
    out = graph.invoke(user())
    task = graph.last_task
    assert task is not None
    assert task.tool_calls == 3
    blocked = [m for m in out["messages"] if m.type == "tool" and m.status == "error"]
    assert len(blocked) == 1
    assert "blocked by the budget" in blocked[0].text
    assert out["messages"][-1].tool_calls == []
    assert kinds(task) == ["tool:block", "model:finish"]
    assert task.status == "finished"


def test_prebuilt_agent_hard_stop_raises_out_of_invoke() -> None:
    guard = ag.Guard(ag.Policy(max_cost_usd="0.003"), traces=False)  # on_limit="raise"
    gg = GraphGuard(guard)
    graph = gg.bind(
        create_react_agent(
            gg.chat_model(Scripted(model_name="gpt-4o", reply_tokens=300)),
            gg.tool_node([search]),
        )
    )
    with pytest.raises(ag.BudgetExceeded, match="max_cost_usd"):
        graph.invoke(user())
    task = graph.last_task
    assert task is not None
    assert task.status == "stopped"
    assert task.spent.cost_usd <= Decimal("0.003")
    assert kinds(task)[-1] == "model:stop"
