"""A LangChain v1 agent that would loop forever, kept inside its budget.

``create_agent`` with a model that calls a tool on every turn — the runaway loop. With
``AgentGuardMiddleware`` the agent downgrades to a cheaper model at 60% of its $0.03 budget,
every call's output is capped, tool calls are capped per tool, and at the ceiling the agent
makes one last, capped call without tools and ends with an answer instead of an exception.

Run: ``.venv/bin/python examples/langchain_agent_middleware.py``
"""

from __future__ import annotations

from langchain.agents import create_agent
from langchain_core.tools import tool

import agentguard as ag
from agentguard_langchain import AgentGuardMiddleware
from agentguard_langchain.testing import ScriptedChatModel


@tool
def lookup_order(query: str) -> str:
    """Look an order up in the order system."""
    return "order 1182: two charges on 2026-11-20, the second pending reversal. " * 8


def main() -> dict[str, object]:
    guard = ag.Guard(
        ag.Policy(
            max_cost_usd="0.03",
            max_output_tokens=600,
            tool_limits={"lookup_order": 25},
            downgrade=[ag.Downgrade(at=0.6, to="gpt-4o-mini")],
            on_limit="finish",
        ),
        traces="memory",
    )
    agent = create_agent(
        model=ScriptedChatModel(model_name="gpt-4o", reply_tokens=500),
        tools=[lookup_order],
        middleware=[
            AgentGuardMiddleware(
                guard, models={"gpt-4o-mini": ScriptedChatModel(model_name="gpt-4o-mini")}
            )
        ],
    )
    with guard.task("ticket-1182", feature="support", team="cx") as task:
        out = agent.invoke({"messages": [{"role": "user", "content": "Why two charges?"}]})
    final = out["messages"][-1]
    print(f"task {task.id}: {task.status}, ${task.cost_usd} for {task.model_calls} model calls")
    for d in task.decisions:
        if d.action in ("downgrade", "finish"):
            print(f"  {d.action}: {d.reason}")
    print(f"final answer: ...{final.text[-90:]}")
    return {"task": task, "final": final}


if __name__ == "__main__":
    main()
