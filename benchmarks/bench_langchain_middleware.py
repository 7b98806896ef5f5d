"""Per-step overhead of ``AgentGuardMiddleware`` in a ``create_agent`` run.

Run: ``.venv/bin/python benchmarks/bench_langchain_middleware.py`` (``--json`` for machine
output).

An agent step is one model call and the tool call it asks for. The model is
:class:`ScriptedChatModel` (no latency: it answers as fast as LangChain can call it) and the
tool returns at once, so the figures are LangChain's own cost per step plus agentguard's —
the worst case for the ratio; with a real provider (hundreds of milliseconds per call) the
added microseconds vanish. Each run makes ``--steps`` tool-calling answers and a final text
answer; the reported figure is the median over runs of (run time / model calls).

Variants, each against the same agent without middleware:

* ``middleware``: the middleware opens and closes a task per run (``before_agent`` /
  ``after_agent`` add two graph nodes per run) — traces off;
* ``middleware, caller's task``: the caller opened ``with guard.task(...)`` — traces off;
* ``middleware + SQLite traces``: per-run tasks, spans written to SQLite (batched writes on the
  sink's background thread);
* the same three under ``ainvoke``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _agent_loop import Variant, interleaved_medians, print_ratios
from langchain.agents import create_agent
from langchain.agents.middleware import AgentMiddleware
from langchain_core.tools import tool

import agentguard as ag
from agentguard_langchain import AgentGuardMiddleware
from agentguard_langchain._middleware import AgentGuardState
from agentguard_langchain.testing import ScriptedChatModel

ASK: Any = {"messages": [{"role": "user", "content": "Where is my parcel for order 1182?"}]}


@tool
def lookup(query: str) -> str:
    """Look an order up by its number."""
    return "order 1182: paid, shipped 3 days late"


class NoOpMiddleware(AgentMiddleware[AgentGuardState, Any, Any]):
    """The same hooks and state as AgentGuardMiddleware, doing nothing: LangGraph's share."""

    state_schema = AgentGuardState

    def before_agent(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        return {"agentguard_run": "x"}

    async def abefore_agent(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        return {"agentguard_run": "x"}

    def after_agent(self, state: Any, runtime: Any) -> None:
        return None

    async def aafter_agent(self, state: Any, runtime: Any) -> None:
        return None

    def wrap_model_call(self, request: Any, handler: Callable[[Any], Any]) -> Any:
        return handler(request)

    async def awrap_model_call(self, request: Any, handler: Callable[[Any], Any]) -> Any:
        return await handler(request)

    def wrap_tool_call(self, request: Any, handler: Callable[[Any], Any]) -> Any:
        return handler(request)

    async def awrap_tool_call(self, request: Any, handler: Callable[[Any], Any]) -> Any:
        return await handler(request)


def policy() -> ag.Policy:
    return ag.Policy(
        max_cost_usd="1000",
        max_output_tokens=400,
        downgrade=[ag.Downgrade(at=0.6, to="gpt-4o-mini")],
        on_limit="finish",
    )


def agent(steps: int, middleware: list[Any]) -> tuple[Any, ScriptedChatModel]:
    model = ScriptedChatModel(model_name="gpt-4o", tool_calls=steps, reply_tokens=20)
    mini = ScriptedChatModel(model_name="gpt-4o-mini")
    for m in middleware:
        if isinstance(m, AgentGuardMiddleware):
            m.models["gpt-4o-mini"] = mini
    return create_agent(model=model, tools=[lookup], middleware=middleware), model


def bench(
    steps: int, runs: int, clock: Callable[[], float] = time.perf_counter
) -> dict[str, float]:
    """Median µs per model call of each variant; variants take turns, run by run, so drift in
    the machine's load hits them all alike."""
    tmp = Path(tempfile.mkdtemp(prefix="agentguard-bench-"))
    base, base_model = agent(steps, [])
    noop, noop_model = agent(steps, [NoOpMiddleware()])
    g_off = ag.Guard(policy(), traces=False)
    per_run, per_run_model = agent(steps, [AgentGuardMiddleware(g_off)])
    g_task = ag.Guard(policy(), traces=False)
    in_task, in_task_model = agent(steps, [AgentGuardMiddleware(g_task)])
    g_sql = ag.Guard(policy(), traces=tmp / "bench.db")
    sql, sql_model = agent(steps, [AgentGuardMiddleware(g_sql)])
    loop = asyncio.new_event_loop()

    def with_task() -> None:
        with g_task.task():
            in_task.invoke(ASK)

    async def a_with_task() -> None:
        async with g_task.task():
            await in_task.ainvoke(ASK)

    def arun(make: Callable[[], Any]) -> Callable[[], None]:
        return lambda: loop.run_until_complete(make())

    def flushed(run: Callable[[], Any]) -> Callable[[], None]:
        # the SQLite variant's span writes are charged to it: left to the sink's writer
        # thread they land in the next variant's run (``--clock cpu`` counts every thread)
        def go() -> None:
            run()
            g_sql.sink.flush()

        return go

    variants: dict[str, Variant] = {
        "sync: no middleware": (lambda: base.invoke(ASK), base_model),
        "sync: no-op middleware, same hooks": (lambda: noop.invoke(ASK), noop_model),
        "sync: middleware": (lambda: per_run.invoke(ASK), per_run_model),
        "sync: middleware, caller's task": (with_task, in_task_model),
        "sync: middleware + SQLite traces": (flushed(lambda: sql.invoke(ASK)), sql_model),
        "async: no middleware": (arun(lambda: base.ainvoke(ASK)), base_model),
        "async: no-op middleware, same hooks": (arun(lambda: noop.ainvoke(ASK)), noop_model),
        "async: middleware": (arun(lambda: per_run.ainvoke(ASK)), per_run_model),
        "async: middleware, caller's task": (arun(a_with_task), in_task_model),
        "async: middleware + SQLite traces": (
            flushed(arun(lambda: sql.ainvoke(ASK))),
            sql_model,
        ),
    }
    medians = interleaved_medians(variants, runs, clock=clock)
    loop.close()
    g_sql.close()
    shutil.rmtree(tmp, ignore_errors=True)  # the SQLite variant's traces
    return medians


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--steps", type=int, default=5, help="tool-calling steps per run")
    parser.add_argument("-n", "--runs", type=int, default=100, help="timed runs per variant")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="time runs by wall clock or by the process's CPU time (steadier on a busy machine)",
    )
    args = parser.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    results = bench(args.steps, args.runs, clock)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(
        f"agent step with / without AgentGuardMiddleware (median of {args.runs} runs, "
        f"{args.steps} tool-calling steps + a final answer each; µs of {args.clock} time per "
        "model call)"
    )
    print_ratios(results, "no middleware", 38)


if __name__ == "__main__":
    main()
