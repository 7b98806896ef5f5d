"""A hand-written LangGraph ReAct graph that would loop forever, kept inside its budget.

The scripted model calls a tool on every turn — the runaway loop. ``GraphGuard`` gates the
agent node and the tools, and its routing edge decides before every agent step: the run
downgrades to a cheaper model at 40% of its $0.02 budget, and the step cap of 12 agent steps
(not LangGraph's ``recursion_limit``) sends it to a finishing node that makes one last, capped,
tool-less call. What the run spent is in the graph state, next to the messages.

Run: ``.venv/bin/python examples/langgraph_react.py``
"""

from __future__ import annotations

from typing import Any

from langchain_core.runnables import RunnableLambda
from langchain_core.tools import tool
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import tools_condition

import agentguard as ag
from agentguard_langchain.testing import ScriptedChatModel
from agentguard_langgraph import BudgetState, GraphGuard


@tool
def lookup_order(query: str) -> str:
    """Look an order up in the order system."""
    return "order 1182: shipped late; the carrier lost the parcel for two days."


class State(MessagesState, BudgetState):
    """The conversation plus what the run spent (cost, tokens, calls, steps, decisions)."""


def build(gg: GraphGuard, model: ScriptedChatModel) -> Any:
    llm = gg.chat_model(model).bind_tools([lookup_order])

    def agent(state: State) -> dict[str, Any]:
        return {"messages": [llm.invoke(state["messages"])]}

    async def aagent(state: State) -> dict[str, Any]:
        return {"messages": [await llm.ainvoke(state["messages"])]}

    paths = gg.path_map(continue_to="agent", finish_to="finish")
    graph = StateGraph(State)
    graph.add_node("agent", RunnableLambda(gg.node(agent), afunc=gg.node(aagent)))
    graph.add_node("tools", gg.tool_node([lookup_order]))
    graph.add_node("finish", gg.finish_node(model, tools=[lookup_order]))
    graph.add_conditional_edges(START, gg.route, paths)  # decide before the first step
    graph.add_conditional_edges("agent", tools_condition)  # tools, or END on an answer
    graph.add_conditional_edges("tools", gg.route, paths)  # decide before every next step
    graph.add_edge("finish", END)
    return graph.compile()


def main() -> dict[str, object]:
    guard = ag.Guard(
        ag.Policy(
            max_cost_usd="0.02",
            max_steps=12,
            max_output_tokens=400,
            downgrade=[ag.Downgrade(at=0.4, to="gpt-4o-mini")],
            on_limit="finish",
        ),
        traces="memory",
    )
    mini = ScriptedChatModel(model_name="gpt-4o-mini")
    gg = GraphGuard(guard, models={"gpt-4o-mini": mini}, tags={"feature": "support"})
    model = ScriptedChatModel(model_name="gpt-4o", reply_tokens=400)
    graph = gg.bind(build(gg, model))
    out = graph.invoke({"messages": [{"role": "user", "content": "Where is order 1182?"}]})
    task = graph.last_task
    assert task is not None
    final = out["messages"][-1]
    print(
        f"task {task.id}: {task.status}, ${task.cost_usd} for {task.model_calls} model calls, "
        f"{task.tool_calls} tool calls, {task.steps} steps"
    )
    print(
        f"  in the graph state: ${out['agentguard']['cost_usd']}, {out['agentguard']['decisions']}"
    )
    print(f"  ended by: {final.response_metadata['agentguard']['reason']}")
    print(f"final answer: ...{final.text[-90:]}")
    return {"task": task, "final": final, "state": out, "mini_calls": len(mini.seen)}


if __name__ == "__main__":
    main()
