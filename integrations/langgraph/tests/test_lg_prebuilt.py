"""``langgraph.prebuilt.create_react_agent`` with a scripted model that calls a tool forever:
built from ``gg.chat_model(model)`` and ``gg.tool_node(tools)`` and run through ``gg.bind``, it
ends at the money ceiling with a final answer (no ``GraphRecursionError``), its tool calls are
capped, and a hard stop raises — sync and async."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from langchain.agents import AgentState as LcAgentState
from langchain.agents import create_agent
from langgraph.prebuilt import create_react_agent
from langgraph.prebuilt.chat_agent_executor import AgentState as PrebuiltAgentState
from lg_support import Scripted, search, user

import agentguard as ag
from agentguard_langchain import AgentGuardMiddleware
from agentguard_langgraph import BudgetState, GraphGuard

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


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_prebuilt_agent_tool_cap_blocks_then_the_next_call_is_final(mode: str) -> None:
    guard = ag.Guard(
        ag.Policy(max_cost_usd="1", tool_limits={"search": 3}, on_limit="finish"), traces=False
    )
    gg = GraphGuard(guard)
    model = Scripted(model_name="gpt-4o")
    graph = gg.bind(create_react_agent(gg.chat_model(model), gg.tool_node([search])))
    out = graph.invoke(user()) if mode == "sync" else await graph.ainvoke(user())
    task = graph.last_task
    assert task is not None
    assert task.tool_calls == 3
    blocked = [m for m in out["messages"] if m.type == "tool" and m.status == "error"]
    assert len(blocked) == 1
    assert "blocked by the budget" in blocked[0].text
    assert out["messages"][-1].tool_calls == []
    assert kinds(task) == ["tool:block", "model:finish"]
    assert task.status == "finished"


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_prebuilt_agent_hard_stop_raises_out_of_invoke(mode: str) -> None:
    guard = ag.Guard(ag.Policy(max_cost_usd="0.003"), traces=False)  # on_limit="raise"
    gg = GraphGuard(guard)
    graph = gg.bind(
        create_react_agent(
            gg.chat_model(Scripted(model_name="gpt-4o", reply_tokens=300)),
            gg.tool_node([search]),
        )
    )
    with pytest.raises(ag.BudgetExceeded, match="max_cost_usd"):
        if mode == "sync":
            graph.invoke(user())
        else:
            await graph.ainvoke(user())
    task = graph.last_task
    assert task is not None
    assert task.status == "stopped"
    assert task.spent.cost_usd <= Decimal("0.003")
    assert kinds(task)[-1] == "model:stop"


class ReactState(PrebuiltAgentState, BudgetState):
    """create_react_agent's state with the spend keys."""


class AgentState(LcAgentState[Any], BudgetState):
    """create_agent's state with the spend keys."""


def prebuilt(kind: str, gg: GraphGuard, model: Scripted, **compile_kw: Any) -> Any:
    if kind == "create_react_agent":
        return create_react_agent(
            gg.chat_model(model), gg.tool_node([search]), state_schema=ReactState, **compile_kw
        )
    if kind == "create_agent":  # the model gate alone: bind counts the steps
        return create_agent(gg.chat_model(model), [search], state_schema=AgentState, **compile_kw)
    # the LangChain agent middleware gates model and tools and counts the steps itself
    return create_agent(
        model,
        [search],
        middleware=[AgentGuardMiddleware(gg.guard)],
        state_schema=AgentState,
        **compile_kw,
    )


KINDS = ["create_react_agent", "create_agent", "create_agent+middleware"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_prebuilt_agents_count_steps_and_write_the_spend_into_the_state(
    kind: str, mode: str
) -> None:
    sink = ag.MemorySink()
    guard = ag.Guard(ag.Policy(max_steps=4, on_limit="finish"), traces=sink)
    gg = GraphGuard(guard)
    model = Scripted(model_name="gpt-4o")  # calls the tool forever
    graph = gg.bind(prebuilt(kind, gg, model))
    out = graph.invoke(user()) if mode == "sync" else await graph.ainvoke(user())
    task = graph.last_task
    assert task is not None
    # max_steps ended the loop: 3 tool-calling steps, the 4th step's call is the final answer
    assert task.steps == 4
    assert task.model_calls == 4
    final = out["messages"][-1]
    assert final.type == "ai"
    assert final.tool_calls == []
    assert model.seen[-1]["tool_choice"] == "none"
    assert len(model.seen) == 4
    assert kinds(task) == ["model:finish"]
    assert task.decisions[-1].limit == "max_steps"
    assert task.status == "finished"
    assert len([m for m in out["messages"] if m.type == "tool"]) == 3
    # the spend is in the user's state, exactly (tool calls only where a gate counts them)
    gated_tools = 0 if kind == "create_agent" else 3
    assert task.tool_calls == gated_tools
    assert out["agentguard"]["cost_usd"] == task.cost_usd
    assert out["agentguard"]["tokens"] == task.usage.total_tokens
    assert out["agentguard"]["input_tokens"] == task.usage.input_tokens
    assert out["agentguard"]["model_calls"] == 4
    assert out["agentguard"]["tool_calls"] == gated_tools
    assert out["agentguard"]["steps"] == 4
    assert out["agentguard"]["decisions"] == ["model:finish"]
    # the trace
    spans = [s for s in sink.spans if s.task_id == task.id]
    assert [s.decision for s in spans if s.kind == "step"] == ["allow"] * 4
    assert sum(s.kind == "model" for s in spans) == 4
    assert sum(s.kind == "tool" for s in spans) == gated_tools


def test_bind_leaves_the_callers_prebuilt_graph_as_it_was() -> None:
    guard = ag.Guard(ag.Policy(max_steps=2, on_limit="finish"), traces=False)
    gg = GraphGuard(guard)
    model = Scripted(model_name="gpt-4o", tool_calls=1)
    agent = prebuilt("create_react_agent", gg, model)
    gg.bind(agent)
    with guard.task("plain") as task:  # the unbound graph: no step counting, no records
        out = agent.invoke(user())
    assert task.steps == 0
    assert task.model_calls == 2
    assert out.get("agentguard", {}).get("steps", 0) == 0
