"""Workflow agents under a guard: a scripted tool-calling LLM that would loop forever ends at
the step, tool-call or money cap — with one last output-capped answer without tools under
``on_limit="finish"``, with ``BudgetExceeded`` out of ``await agent.run(...)`` under
``"raise"`` — for ``FunctionAgent``, ``ReActAgent`` and ``AgentWorkflow``, awaited, streamed
and run from synchronous code."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from li_support import clean_llamaindex_state, in_fresh_loop
from llama_index.core.agent.workflow import AgentWorkflow, FunctionAgent, ReActAgent
from llama_index.core.tools import FunctionTool
from llama_index.core.workflow import Context

import agentguard as ag
from agentguard import MemorySink
from agentguard_llamaindex import GuardedFunctionTool, GuardedTool, guard_agent, instrument
from agentguard_llamaindex._llm import DEFAULT_FINISH_PROMPT
from agentguard_llamaindex.testing import ScriptedLLM

pytestmark = [
    # llama-index workflows inspect pydantic models with deprecated attributes, and its
    # ReActAgent calls a deprecated Context.is_running from inside a step
    pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecationWarning"),
    pytest.mark.filterwarnings("ignore:is_running called from within a step:DeprecationWarning"),
]


@pytest.fixture(autouse=True)
def _detach_instrumentation() -> Iterator[None]:
    yield from clean_llamaindex_state()


FINAL = "From what I found: the parcel ships on Monday."
STOP_WHEN = DEFAULT_FINISH_PROMPT.split(".")[1].strip()  # "Do not call any tool"


class Searches:
    """A real tool that counts how often it really ran."""

    def __init__(self) -> None:
        self.ran = 0

    def tool(self) -> FunctionTool:
        def search(query: str) -> str:
            """Search the order system."""
            self.ran += 1
            return f"result {self.ran} for {query}: nothing conclusive"

        return FunctionTool.from_defaults(search)


def runaway(**kwargs: Any) -> ScriptedLLM:
    return ScriptedLLM(tool_rounds=-1, tool_args={"query": "order 1182"}, replies=[FINAL], **kwargs)


def make_guard(**policy: Any) -> ag.Guard:
    return ag.Guard(ag.Policy(**policy), traces="memory")


async def run(agent: Any, how: str = "await") -> Any:
    handler = agent.run("Where is my parcel? Order 1182.")
    if how == "stream":
        async for _ev in handler.stream_events():
            pass
    return await handler


@pytest.mark.parametrize("how", ["await", "stream"])
@in_fresh_loop
async def test_function_agent_ends_at_the_step_cap_with_a_final_answer(how: str) -> None:
    g = make_guard(max_steps=4, on_limit="finish", max_output_tokens=500, finish_output_tokens=60)
    s = Searches()
    llm = runaway()
    agent = guard_agent(FunctionAgent(tools=[s.tool()], llm=llm), g)
    async with g.task("t") as task:
        result = await run(agent, how)
    assert str(result) == FINAL
    assert s.ran == 4  # four full iterations, then the final answer
    assert task.steps == 4
    assert task.model_calls == 5
    assert task.status == "finished"
    assert task.limit_hit == "max_steps"
    final = llm.seen[-1]
    assert final["tools"] == []  # the final call had no tools
    assert final["max_tokens"] == 60  # and the finish cap
    assert [c["max_tokens"] for c in llm.seen[:-1]] == [500] * 4
    assert [d.action for d in task.decisions if d.kind == "model"] == ["finish"]


def test_a_runaway_agent_ends_when_run_from_synchronous_code() -> None:
    g = make_guard(max_tool_calls=2, on_limit="finish")
    s = Searches()
    agent = guard_agent(FunctionAgent(tools=[s.tool()], llm=runaway()), g)

    async def main() -> tuple[str, ag.Task]:
        async with g.task("sync") as task:
            return str(await agent.run("Where is my parcel?")), task

    text, task = asyncio.run(main())
    assert text == FINAL
    assert s.ran == 2
    assert task.tool_calls == 2
    assert task.status == "finished"


@in_fresh_loop
async def test_a_tool_over_its_cap_is_not_run_and_the_next_call_is_the_final_one() -> None:
    g = make_guard(tool_limits={"search": 2}, on_limit="finish")
    s = Searches()
    llm = runaway()
    agent = guard_agent(FunctionAgent(tools=[s.tool()], llm=llm), g)
    async with g.task("t") as task:
        result = await run(agent)
    assert str(result) == FINAL
    assert s.ran == 2  # the third call was blocked, not made
    blocked = [d for d in task.decisions if d.action == "block"]
    assert len(blocked) == 1
    assert blocked[0].limit == "tool_limits.search"
    assert llm.seen[-1]["tools"] == []
    tool_results = [t.tool_output for t in result.tool_calls]
    assert tool_results[-1].is_error
    assert "not made" in tool_results[-1].content


@pytest.mark.parametrize("cap", ["max_tool_calls", "max_steps"])
@in_fresh_loop
async def test_under_raise_the_stop_comes_out_of_agent_run(cap: str) -> None:
    g = make_guard(**{cap: 2}, on_limit="raise")
    s = Searches()
    agent = guard_agent(FunctionAgent(tools=[s.tool()], llm=runaway()), g)
    with pytest.raises(ag.BudgetExceeded) as info:
        async with g.task("t") as task:
            await run(agent)
    assert info.value.limit == cap
    assert s.ran == 2
    assert task.status == "stopped"


@in_fresh_loop
async def test_the_money_ceiling_ends_the_run_within_budget() -> None:
    limit = Decimal("0.01")
    g = make_guard(
        max_cost_usd=str(limit), on_limit="finish", max_output_tokens=200, finish_output_tokens=40
    )
    s = Searches()
    llm = runaway(model="gpt-4o")
    agent = guard_agent(FunctionAgent(tools=[s.tool()], llm=llm), g)
    async with g.task("t") as task:
        result = await run(agent)
    assert str(result) == FINAL
    assert task.status == "finished"
    assert task.limit_hit == "max_cost_usd"
    assert task.cost_usd is not None and task.cost_usd <= limit
    assert s.ran >= 1
    assert llm.seen[-1]["tools"] == []


@in_fresh_loop
async def test_react_agent_ends_at_the_step_cap() -> None:
    g = make_guard(max_steps=3, on_limit="finish")
    s = Searches()
    llm = ScriptedLLM(
        react=True,
        tool_rounds=-1,
        tool_name="search",
        tool_args={"query": "order 1182"},
        replies=[FINAL],
        stop_when=STOP_WHEN,
    )
    agent = guard_agent(ReActAgent(tools=[s.tool()], llm=llm), g)
    async with g.task("t") as task:
        result = await run(agent)
    assert FINAL in str(result)
    assert s.ran == 3
    assert task.steps == 3
    assert task.status == "finished"


@in_fresh_loop
async def test_agent_workflow_ends_at_the_tool_cap() -> None:
    g = make_guard(max_tool_calls=3, on_limit="finish")
    s = Searches()
    llm = runaway()
    worker = FunctionAgent(
        name="support", description="Answers order questions.", tools=[s.tool()], llm=llm
    )
    workflow = guard_agent(AgentWorkflow(agents=[worker]), g)
    assert worker.tools is not None
    assert isinstance(worker.tools[0], GuardedTool)
    async with g.task("t") as task:
        result = await run(workflow)
    assert str(result) == FINAL
    assert s.ran == 3
    assert task.status == "finished"


@in_fresh_loop
async def test_a_run_outside_any_task_gets_a_task_of_its_own() -> None:
    g = make_guard(max_steps=3, on_limit="finish")
    s = Searches()
    agent = guard_agent(FunctionAgent(tools=[s.tool()], llm=runaway()), g)
    try:
        first = await run(agent)
        second = await run(agent)
    finally:
        instrument(g).detach()
    assert str(first) == str(second) == FINAL
    assert isinstance(g.sink, MemorySink)
    records = [r for r in g.sink.tasks if r.model_calls]
    assert len(records) == 2  # one task per run, each with its own step budget
    assert all(r.steps == 3 and r.status == "finished" for r in records)
    assert all(r.cost_usd is not None and r.cost_usd > 0 for r in records)
    assert s.ran == 6


@in_fresh_loop
async def test_guarding_twice_changes_nothing() -> None:
    g = make_guard(max_steps=2, on_limit="finish")
    s = Searches()
    agent = FunctionAgent(tools=[s.tool()], llm=runaway())
    guard_agent(agent, g)
    llm, tools = agent.llm, list(agent.tools or [])
    guard_agent(agent, g)
    assert agent.llm is llm
    assert agent.tools == tools
    async with g.task("t") as task:
        await run(agent)
    assert task.steps == 2
    assert task.model_calls == 3


@pytest.mark.parametrize("how", ["await", "stream"])
@in_fresh_loop
async def test_a_tool_taking_the_workflow_context_is_capped_and_gets_its_context(
    how: str,
) -> None:
    """A FunctionTool whose function takes the workflow ``Context``: the agent still injects
    the context (the guarded tool is still a FunctionTool requiring one), and the cap blocks
    the call over it — the function does not run."""
    g = make_guard(tool_limits={"search": 2}, on_limit="finish")
    contexts: list[Any] = []

    async def search(ctx: Context, query: str) -> str:
        """Search the order system."""
        contexts.append(ctx)
        await ctx.store.set("searches", len(contexts))
        return f"result {len(contexts)} for {query}: nothing conclusive"

    # LlamaIndex finds the context parameter by its annotation object; this module's
    # annotations are strings (``from __future__ import annotations``)
    search.__annotations__ = {"ctx": Context, "query": str, "return": str}
    llm = runaway()
    agent = guard_agent(FunctionAgent(tools=[FunctionTool.from_defaults(search)], llm=llm), g)
    assert isinstance(agent.tools[0], GuardedFunctionTool)
    async with g.task("t") as task:
        result = await run(agent, how)
    assert str(result) == FINAL
    assert len(contexts) == 2  # the third call was blocked, not made
    assert all(isinstance(c, Context) for c in contexts)
    assert task.tool_calls == 2
    assert [d.limit for d in task.decisions if d.action == "block"] == ["tool_limits.search"]
    assert llm.seen[-1]["tools"] == []
    last = [t.tool_output for t in result.tool_calls][-1]
    assert last.is_error and "not made" in last.content
    assert set(last.raw_input) == {"query"}  # the Context is not part of the input
    # the tool spans are the guard's own, one per call made, not the instrumentation's too
    spans = [s for s in g.sink.spans if s.kind == "tool" and s.task_id == "t"]
    assert len([s for s in spans if s.decision == "allow"]) == 2
