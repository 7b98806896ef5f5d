"""Send fan-out of 10 branches, each running a subgraph under a child budget of one parent
budget: calls truly in flight together, and the branches cannot jointly overspend."""

from __future__ import annotations

import operator
from decimal import Decimal
from typing import Annotated, Any

import pytest
from langgraph.graph import END, START, StateGraph
from langgraph.types import Send
from lg_support import Scripted, react_graph

import agentguard as ag
from agentguard_langgraph import BudgetState, GraphGuard


class Parent(BudgetState):
    topics: list[str]
    answers: Annotated[list[str], operator.add]


def build(gg: GraphGuard, model: Scripted) -> Any:
    research = react_graph(gg, model)  # the subgraph: a ReAct loop per topic

    def fan_out(state: Parent) -> list[Send]:
        return [Send("research", {"messages": [("user", t)]}) for t in state["topics"]]

    def collect(out: dict[str, Any]) -> dict[str, Any]:
        return {"answers": [out["messages"][-1].text[:20]]} if "messages" in out else {}

    sub = gg.branch(research, name="research")

    def research_node(state: dict[str, Any], config: Any) -> dict[str, Any]:
        return sub.invoke(state, config)  # type: ignore[attr-defined,no-any-return]

    async def aresearch_node(state: dict[str, Any], config: Any) -> dict[str, Any]:
        return await sub.ainvoke(state, config)  # type: ignore[attr-defined,no-any-return]

    from langchain_core.runnables import RunnableLambda

    def keep(out: dict[str, Any]) -> dict[str, Any]:
        answers = collect(out)
        return {**{k: v for k, v in out.items() if k == "agentguard"}, **answers}

    b = StateGraph(Parent)
    b.add_node(
        "research",
        RunnableLambda(research_node, afunc=aresearch_node) | RunnableLambda(keep),
    )
    b.add_conditional_edges(START, fan_out, ["research"])
    b.add_edge("research", END)
    return b.compile()


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_ten_branches_share_one_parent_budget(mode: str) -> None:
    limit = Decimal("0.03")
    sink = ag.MemorySink()
    guard = ag.Guard(
        ag.Policy(max_cost_usd=limit, max_output_tokens=300, on_limit="finish"), traces=sink
    )
    gg = GraphGuard(guard)
    model = Scripted(model_name="gpt-4o", latency=0.03, reply_tokens=200)
    graph = gg.bind(build(gg, model))
    topics = [f"order {i}" for i in range(10)]
    if mode == "sync":
        out = graph.invoke({"topics": topics})
    else:
        out = await graph.ainvoke({"topics": topics})
    run = graph.last_task
    assert run is not None
    assert model.max_in_flight >= 5  # the branches' calls overlapped
    spent = run.spent.cost_usd
    assert spent <= limit  # jointly, never above the parent's budget
    assert spent > limit / 2  # and the budget was really used
    children = [t for t in sink.tasks if t.parent_id == run.id]
    assert len(children) == 10
    assert sum(c.cost_usd or 0 for c in children) == spent
    assert out["agentguard"]["cost_usd"] == spent  # the state adds up every branch
    assert out["agentguard"]["model_calls"] == sum(c.model_calls for c in children)
    assert len(out["answers"]) + out["agentguard"]["decisions"].count("branch:stop") == 10
    # the run's task and its ten branches' children had ids made up for the run: the embedded
    # store kept none of their lines (the read-outs above come from the balances they kept)
    assert list(guard.store.live) == []  # type: ignore[attr-defined]
