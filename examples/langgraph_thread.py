"""A checkpointed LangGraph thread that a person approves step by step, under one budget.

A support agent's graph stops before every tool call for a human to approve it
(``interrupt_before=["tools"]``); each approval resumes the thread — here, as after a restart,
in a brand-new ``Guard`` that knows nothing but the SQLite checkpoint. With
``budget="thread"`` the policy's limits hold for the thread in total: each resumed run starts
from everything the thread already spent (money, tokens, calls, steps, read back from the
``BudgetState`` keys), so the thread ends at its step cap with a final answer exactly as one
uninterrupted run would. The steps are counted by the agent node's wrapper: the graph keeps
the plain edges of an unguarded ReAct graph.

Run: ``.venv/bin/python examples/langgraph_thread.py``
"""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path
from typing import Any

from langchain_core.tools import tool
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import tools_condition

import agentguard as ag
from agentguard_langchain.testing import ScriptedChatModel
from agentguard_langgraph import BudgetState, GraphGuard


@tool
def refund_status(order: str) -> str:
    """Look up the refund of an order."""
    return f"{order}: refund of the shipping fee approved, paid in 3-5 days."


class State(MessagesState, BudgetState):
    """The conversation plus what the thread spent."""


def build(gg: GraphGuard, model: ScriptedChatModel, checkpointer: Any) -> Any:
    llm = gg.chat_model(model).bind_tools([refund_status])

    def agent(state: State) -> dict[str, Any]:
        return {"messages": [llm.invoke(state["messages"])]}

    graph = StateGraph(State)
    graph.add_node("agent", gg.node(agent, step=True))  # one agent step per call
    graph.add_node("tools", gg.tool_node([refund_status]))
    graph.add_edge(START, "agent")
    graph.add_conditional_edges("agent", tools_condition)
    graph.add_edge("tools", "agent")
    return graph.compile(checkpointer=checkpointer, interrupt_before=["tools"])


def session(db: Path, payload: Any, config: Any) -> tuple[Any, ag.Task, Any]:
    """One run of the thread, as a fresh process would make it: a new guard, model and graph."""
    guard = ag.Guard(ag.Policy(max_cost_usd="0.05", max_steps=4, on_limit="finish"), traces=False)
    gg = GraphGuard(guard, budget="thread", tags={"feature": "refunds"})
    model = ScriptedChatModel(model_name="gpt-4o", tool_args={"order": "order 1182"})
    with sqlite3.connect(db, check_same_thread=False) as conn:
        graph = gg.bind(build(gg, model, SqliteSaver(conn)))
        graph.invoke(payload, config)
        snapshot = graph.get_state(config)
    assert graph.last_task is not None
    return snapshot, graph.last_task, model


def main() -> dict[str, Any]:
    db = Path(tempfile.mkdtemp(prefix="agentguard-thread-")) / "threads.sqlite"
    config: Any = {"configurable": {"thread_id": "ticket-1182"}}
    payload: Any = {"messages": [{"role": "user", "content": "Where is my refund for 1182?"}]}
    runs: list[ag.Task] = []
    for _ in range(10):
        snapshot, task, _model = session(db, payload, config)
        runs.append(task)
        spent = snapshot.values["agentguard"]
        print(
            f"run {len(runs)}: {task.status:8} thread so far: ${spent['cost_usd']}, "
            f"{spent['steps']} steps, {spent['model_calls']} model calls"
        )
        if not snapshot.next:
            break
        print("  a person approves the tool call; the thread resumes")
        payload = None  # resume where it stopped
    final = snapshot.values["messages"][-1]
    print(f"final answer ({final.response_metadata['agentguard_final']}): {final.text[:70]}...")
    return {"runs": runs, "state": snapshot.values, "final": final}


if __name__ == "__main__":
    main()
