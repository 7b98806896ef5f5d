"""A LlamaIndex FunctionAgent that would loop forever, kept inside its budget.

The scripted model asks for a tool on every turn — the runaway agent LlamaIndex's own
``max_iterations`` only stops with an error. ``guard_agent`` puts the agent under a guard: its
LLM becomes a ``BudgetedLLM`` (every call decided and reserved before it is made, the output
cap bound), its tools count against the tool caps, and each agent iteration counts one step.
The run moves to the cheaper ``gpt-4o-mini`` at 40% of its $0.02 budget and, at the step cap of
8, makes one last output-capped call without tools that answers from what the agent found.
The instrumentation records every call, tool and step in the task's trace.

Run: ``.venv/bin/python examples/llamaindex_agent.py``
"""

from __future__ import annotations

import asyncio
import warnings
from typing import Any

from llama_index.core.agent.workflow import FunctionAgent

import agentguard as ag
from agentguard_llamaindex import guard_agent
from agentguard_llamaindex.testing import ScriptedLLM

FINAL = "Order 1182 was delayed two days by the carrier; the shipping fee will be refunded."


def lookup_order(query: str) -> str:
    """Look an order up in the order system."""
    return "order 1182: shipped late; the carrier lost the parcel for two days. " * 8


async def run(agent: FunctionAgent, guard: ag.Guard) -> tuple[Any, ag.Task]:
    async with guard.task("ticket-1182", feature="support", team="cx") as task:
        result = await agent.run("Where is my parcel? Order 1182.")
    return result, task


def main() -> dict[str, Any]:
    guard = ag.Guard(
        ag.Policy(
            max_cost_usd="0.02",
            max_steps=8,
            max_output_tokens=400,
            finish_output_tokens=120,
            downgrade=[ag.Downgrade(at=0.4, to="gpt-4o-mini")],
            on_limit="finish",
        ),
        traces="memory",
    )
    search_forever = {"tool_rounds": -1, "tool_args": {"query": "order 1182"}, "replies": [FINAL]}
    model = ScriptedLLM(model="gpt-4o", **search_forever)
    mini = ScriptedLLM(model="gpt-4o-mini", **search_forever)
    with warnings.catch_warnings():  # llama-index workflows touch deprecated pydantic attributes
        warnings.simplefilter("ignore", DeprecationWarning)
        agent = FunctionAgent(tools=[lookup_order], llm=model, system_prompt="You help customers.")
        guard_agent(agent, guard, llms={"gpt-4o-mini": mini})
        result, task = asyncio.run(run(agent, guard))
    print(
        f"task {task.id}: {task.status}, ${task.cost_usd} for {task.model_calls} model calls, "
        f"{task.tool_calls} tool calls, {task.steps} steps"
    )
    for d in task.decisions:
        print(f"  {d.kind} {d.action}: {d.reason}")
    print(f"final answer: {result}")
    return {"task": task, "result": result, "model": model, "mini": mini}


if __name__ == "__main__":
    main()
