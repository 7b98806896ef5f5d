"""Per-iteration overhead of ``GraphGuard`` in a hand-written LangGraph ReAct graph.

Run: ``.venv/bin/python benchmarks/bench_langgraph.py`` (``--json`` for machine output).

A ReAct iteration is one model call and the tool call it asks for. The model is
:class:`ScriptedChatModel` (no latency: it answers as fast as LangGraph can call it) and the
tool returns at once, so the figures are LangGraph's own cost per iteration plus agentguard's —
the worst case for the ratio; with a real provider (hundreds of milliseconds per call) the
added microseconds vanish. Each run makes ``--steps`` tool-calling answers and a final text
answer; the reported figure is the median over runs of (run time / model calls).

Variants, each against the same graph without the guard (``bare``: plain model, plain
``ToolNode``, plain edges ``START -> agent``, ``tools -> agent``, ``MessagesState`` without
``BudgetState`` — its state key is part of what the guard costs):

* ``integration floor (no guard logic)``: the guarded graph's integration points and nothing
  else — a chat model wrapper that only forwards, the ``BudgetState`` key, a constant spend
  written by the agent node and by the tool node (through a pass-through tool wrapper): what
  any guard of this shape costs before it decides anything;
* ``guarded, steps in the node``: the bare graph's shape; ``gg.node(agent, step=True)`` counts
  the steps and records the spend, ``gg.chat_model`` gates the model, ``gg.tool_node`` the
  tools; ``gg.bind(graph)`` opens and closes a task per run — traces off;
* ``integration floor, route edges``: the integration floor with the route variant's edges —
  conditional edges (``START`` and ``tools`` to ``agent``) that always answer ``"continue"``,
  built as ``gg.route`` is: what LangGraph's conditional edges cost by themselves;
* ``guarded, steps in route edges``: ``gg.route`` conditional edges before every step, a
  finishing node;
* ``guarded, steps in the node + SQLite``: spans written to SQLite (batched writes on the
  sink's background thread; the sink is flushed at the end of each of these runs, so the
  writes are charged to this variant and not to the one timed after it);
* with ``--openai``, the bare graph and the guarded one (steps in the node) on LangChain's real
  ``ChatOpenAI`` client answered by the local OpenAI-wire server in the same process (its CPU
  time counts on both sides): what a provider client costs without the network;
* each under ``invoke`` and ``ainvoke``.

Issue 4's goal is ≤ 1.05× per ReAct iteration against the bare graph. Over four runs of ten
fresh processes (``--clock cpu -n 100 --processes 10``; a bare iteration of 2.1–3.4 ms sync),
steps in the node have a median paired ratio of 1.044–1.049× sync (upper quartiles
1.047–1.060×: a thin margin) and 1.035–1.040× async; the floor 1.00–1.01×, SQLite traces
1.08–1.11×. One process's figure moves by ±0.02 with its
memory layout and hash seed, more than its rounds do: judge a change over several processes
(``--processes``). ``docs/langgraph.md`` (Overhead) says where the time goes. Besides the
medians, the script prints each variant's mean over all runs and its paired ratio (each run
over the bare run of its round, with a 95% bootstrap interval).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from _agent_loop import (
    Variant,
    interleaved_samples,
    paired_ratios,
    print_paired,
    print_ratios,
    print_spread,
)
from bench_guard import react_policy as policy
from langchain_core.language_models import BaseChatModel
from langchain_core.runnables import RunnableConfig, RunnableLambda
from langchain_core.tools import tool
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition

import agentguard as ag
from agentguard.testing import OpenAIServer
from agentguard_langchain.testing import ScriptedChatModel
from agentguard_langgraph import BudgetState, GraphGuard
from agentguard_langgraph._gate import _Edge

ASK: Any = {"messages": [{"role": "user", "content": "Where is my parcel for order 1182?"}]}


@tool
def lookup(query: str) -> str:
    """Look an order up by its number."""
    return "order 1182: paid, shipped 3 days late"


class State(MessagesState, BudgetState):
    pass


def scripted(steps: int) -> ScriptedChatModel:
    return ScriptedChatModel(model_name="gpt-4o", tool_calls=steps, reply_tokens=20)


def bare(steps: int, model: Any = None) -> tuple[Any, Any]:
    """The graph without agentguard: plain model, plain ``ToolNode``, plain edges, and the
    state without ``BudgetState`` (its key is part of what the guard costs). ``model``: the
    chat model (default: the scripted one)."""
    model = model or scripted(steps)
    llm = model.bind_tools([lookup])

    def agent(state: MessagesState) -> dict[str, Any]:
        return {"messages": [llm.invoke(state["messages"])]}

    async def aagent(state: MessagesState) -> dict[str, Any]:
        return {"messages": [await llm.ainvoke(state["messages"])]}

    b = StateGraph(MessagesState)
    b.add_node("agent", RunnableLambda(agent, afunc=aagent))
    b.add_node("tools", ToolNode([lookup]))
    b.add_edge(START, "agent")
    b.add_conditional_edges("agent", tools_condition)
    b.add_edge("tools", "agent")
    return b.compile(), model


def guarded(
    steps: int, guard: ag.Guard, steps_in: str = "node", model: Any = None, mini: Any = None
) -> tuple[Any, Any]:
    """The guarded graph: with ``steps_in="node"`` the bare graph's shape (plain edges), the
    agent node's wrapper counting the steps; with ``"route"`` the ``gg.route`` conditional
    edges before every step and a finishing node. ``model`` / ``mini``: the chat models of
    gpt-4o and of the ladder's gpt-4o-mini (default: scripted ones)."""
    model = model or scripted(steps)
    mini = mini or ScriptedChatModel(model_name="gpt-4o-mini")
    gg = GraphGuard(guard, models={"gpt-4o-mini": mini})
    llm = gg.chat_model(model).bind_tools([lookup])

    def agent(state: State) -> dict[str, Any]:
        return {"messages": [llm.invoke(state["messages"])]}

    async def aagent(state: State) -> dict[str, Any]:
        return {"messages": [await llm.ainvoke(state["messages"])]}

    in_node = steps_in == "node"
    b = StateGraph(State)
    b.add_node(
        "agent", RunnableLambda(gg.node(agent, step=in_node), afunc=gg.node(aagent, step=in_node))
    )
    b.add_node("tools", gg.tool_node([lookup]))
    b.add_conditional_edges("agent", tools_condition)
    if in_node:
        b.add_edge(START, "agent")
        b.add_edge("tools", "agent")
    else:
        paths = gg.path_map(continue_to="agent", finish_to="finish")
        b.add_node("finish", gg.finish_node(model, tools=[lookup]))
        b.add_conditional_edges(START, gg.route, paths)
        b.add_conditional_edges("tools", gg.route, paths)
        b.add_edge("finish", END)
    return gg.bind(b.compile()), model


class _Passthrough(BaseChatModel):
    """A chat model wrapper that only forwards (``floor``): what wrapping a model costs."""

    model: BaseChatModel

    @property
    def _llm_type(self) -> str:
        return "passthrough"

    def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
        return self.bind(**self.model.bind_tools(tools, **kwargs).kwargs)  # type: ignore[attr-defined]

    def _generate(self, messages: Any, stop: Any = None, run_manager: Any = None, **kw: Any) -> Any:
        return self.model._generate(messages, stop=stop, **kw)

    async def _agenerate(
        self, messages: Any, stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> Any:
        return await self.model._agenerate(messages, stop=stop, **kw)


_MODEL_SPEND = {
    "cost_usd": Decimal("0.0014"),
    "tokens": 84,
    "input_tokens": 64,
    "output_tokens": 20,
    "model_calls": 1,
    "steps": 1,
}
_TOOL_SPEND = {"tool_calls": 1, "tool_calls_by_name": {"lookup": 1}}


class _WritingToolNode(ToolNode):
    """``ToolNode`` with a pass-through tool wrapper whose update carries a constant spend."""

    def _func(self, input: Any, config: RunnableConfig, runtime: Any) -> Any:
        return {**super()._func(input, config, runtime), "agentguard": _TOOL_SPEND}

    async def _afunc(self, input: Any, config: RunnableConfig, runtime: Any) -> Any:
        return {**await super()._afunc(input, config, runtime), "agentguard": _TOOL_SPEND}


async def _acontinue(state: Any) -> str:
    return "continue"


#: A conditional edge that always answers ``"continue"``, built as ``gg.route`` is (the same
#: ``Runnable``, reading no channel): what LangGraph's conditional edges cost by themselves.
_CONTINUE = _Edge(lambda state: "continue", _acontinue, "continue")


def floor(steps: int, edges: str = "plain") -> tuple[Any, ScriptedChatModel]:
    """What any guard of this shape costs before it decides anything: the guarded graph's
    integration points with no guard logic — a chat model wrapper that only forwards, the
    ``BudgetState`` key, a constant spend written by the agent node and by the tool node (through
    a pass-through tool wrapper). ``edges="route"``: with conditional edges that always answer
    ``"continue"`` where the route variant has ``gg.route``."""
    model = scripted(steps)
    llm = _Passthrough(model=model).bind_tools([lookup])

    def agent(state: State) -> dict[str, Any]:
        return {"messages": [llm.invoke(state["messages"])], "agentguard": _MODEL_SPEND}

    async def aagent(state: State) -> dict[str, Any]:
        return {"messages": [await llm.ainvoke(state["messages"])], "agentguard": _MODEL_SPEND}

    def passing(request: Any, handler: Any) -> Any:
        return handler(request)

    async def apassing(request: Any, handler: Any) -> Any:
        return await handler(request)

    b = StateGraph(State)
    b.add_node("agent", RunnableLambda(agent, afunc=aagent))
    b.add_node(
        "tools", _WritingToolNode([lookup], wrap_tool_call=passing, awrap_tool_call=apassing)
    )
    b.add_conditional_edges("agent", tools_condition)
    if edges == "route":
        paths: dict[Hashable, str] = {
            "continue": "agent",
            "downgrade": "agent",
            "finish": END,
            "stop": END,
        }
        b.add_conditional_edges(START, _CONTINUE, paths)
        b.add_conditional_edges("tools", _CONTINUE, paths)
    else:
        b.add_edge(START, "agent")
        b.add_edge("tools", "agent")
    return b.compile(), model


class _Served:
    """A :class:`OpenAIServer` seen as ``_agent_loop`` sees a scripted model: setting
    ``_calls`` restarts its script (``steps`` tool-calling answers, then text), ``calls`` is
    the requests it answered since, ``seen`` their bodies."""

    def __init__(self, server: OpenAIServer, steps: int) -> None:
        self.server = server
        self.steps = steps

    @property
    def _calls(self) -> int:
        return len(self.server.requests)

    @_calls.setter
    def _calls(self, value: int) -> None:
        self.server.tool_calls = self.steps
        self.server.requests.clear()

    @property
    def calls(self) -> int:
        return len(self.server.requests)

    @property
    def seen(self) -> list[dict[str, Any]]:
        return self.server.requests


def openai_graphs(steps: int, guard: ag.Guard, server: OpenAIServer) -> tuple[Any, Any]:
    """The bare and the guarded graph (steps in the node) on LangChain's real ``ChatOpenAI``
    client, answered by the local OpenAI-wire server: what a provider call costs the process
    without the network."""

    from langchain_openai import ChatOpenAI  # the LangChain package's test extra

    def client(model: str) -> Any:
        return ChatOpenAI(base_url=server.base_url, api_key="test", model=model, max_retries=0)

    bare_graph, _ = bare(steps, client("gpt-4o"))
    guarded_graph, _ = guarded(steps, guard, "node", client("gpt-4o"), client("gpt-4o-mini"))
    return bare_graph, guarded_graph


def _invoke(graph: Any) -> Callable[[], Any]:
    """One run of ``graph`` on the question (sync)."""
    return lambda: graph.invoke(ASK)


def _ainvoke(graph: Any) -> Callable[[], Awaitable[Any]]:
    """One run of ``graph`` on the question (its coroutine)."""
    return lambda: graph.ainvoke(ASK)


def bench(
    steps: int,
    runs: int,
    clock: Callable[[], float] = time.perf_counter,
    openai: bool = False,
    only: Sequence[str] = (),
) -> dict[str, list[float]]:
    """µs per ReAct iteration of each variant in each timed run; variants take turns, run by
    run, so drift in the machine's load hits them all alike. ``only``: the variants whose
    names contain one of these (the bare graph always runs)."""
    tmp = Path(tempfile.mkdtemp(prefix="agentguard-bench-"))
    base, base_model = bare(steps)
    low, low_model = floor(steps)
    low_route, low_route_model = floor(steps, "route")
    g_off = ag.Guard(policy(), traces=False)
    node, node_model = guarded(steps, g_off, "node")
    edge, edge_model = guarded(steps, g_off, "route")
    g_sql = ag.Guard(policy(), traces=tmp / "bench.db")
    sql, sql_model = guarded(steps, g_sql, "node")
    loop = asyncio.new_event_loop()

    def arun(make: Callable[[], Any]) -> Callable[[], None]:
        return lambda: loop.run_until_complete(make())

    def flushed(run: Callable[[], Any]) -> Callable[[], None]:
        # the SQLite variant's writes happen within its own timed run: left to the sink's
        # writer thread, they land in whichever variant runs next (under --clock cpu, which
        # counts every thread, that inflated the sync bare graph and flattered sync ratios)
        def go() -> None:
            run()
            g_sql.sink.flush()

        return go

    variants: dict[str, Variant] = {}
    for name, graph, model in (
        ("bare graph", base, base_model),
        ("integration floor (no guard logic)", low, low_model),
        ("guarded, steps in the node", node, node_model),
        ("integration floor, route edges", low_route, low_route_model),
        ("guarded, steps in route edges", edge, edge_model),
        ("guarded, steps in the node + SQLite", sql, sql_model),
    ):
        if only and graph is not base and not any(o in name for o in only):
            continue
        sync_run, async_run = _invoke(graph), arun(_ainvoke(graph))
        if graph is sql:
            sync_run, async_run = flushed(sync_run), flushed(async_run)
        variants[f"sync: {name}"] = (sync_run, model)
        variants[f"async: {name}"] = (async_run, model)
    if only and all(k.endswith("bare graph") for k in variants):
        raise SystemExit(f"--only {list(only)!r}: no variant's name contains it")
    server = None
    if openai:
        server = OpenAIServer(tool_calls=steps).start()
        served: Any = _Served(server, steps)
        o_bare, o_guarded = openai_graphs(steps, g_off, server)
        for name, graph in (("ChatOpenAI, bare graph", o_bare), ("ChatOpenAI, guarded", o_guarded)):
            variants[f"sync: {name}"] = (_invoke(graph), served)
            variants[f"async: {name}"] = (arun(_ainvoke(graph)), served)
    samples = interleaved_samples(variants, runs, clock=clock)
    loop.close()
    g_sql.close()
    shutil.rmtree(tmp, ignore_errors=True)  # the SQLite variant's traces
    if server is not None:
        server.close()
    return samples


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
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="measure this many times in a row and also print each variant's median ratio "
        "and its range over the repeats",
    )
    parser.add_argument(
        "--openai",
        action="store_true",
        help="also time both graphs on the real ChatOpenAI client against a local "
        "OpenAI-wire server (context: a provider client's own cost, without the network)",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="TEXT",
        help="time only the variants whose names contain TEXT (repeatable; the bare graph "
        "always runs), e.g. --only 'steps in the node'",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="measure in this many fresh processes, one after another, and print each "
        "variant's paired ratio over them (median, quartiles, range): each process has its "
        "own memory layout and hash seed, which move the ratio more than its rounds do",
    )
    parser.add_argument("--emit-paired", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.processes > 1:
        _across_processes(args)
        return
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    sampled = [
        bench(args.steps, args.runs, clock, args.openai, args.only) for _ in range(args.repeat)
    ]
    if args.emit_paired:  # one process of --processes: its paired medians, as JSON
        # (as the paired lines below: the ChatOpenAI variants have a bare graph of their own)
        names = [k for k in sampled[0] if "ChatOpenAI" not in k]
        merged = {k: [x for r in sampled for x in r[k]] for k in names}
        ratios = {k: v[0] for k, v in paired_ratios(merged, "bare graph").items()}
        bare_us = {k: statistics.median(v) for k, v in merged.items() if k.endswith("bare graph")}
        print(json.dumps({"paired": ratios, "bare": bare_us}))
        return
    repeats = [{k: statistics.median(v) for k, v in r.items()} for r in sampled]
    # each variant's median over the repeats' medians, and its mean over all runs (the median
    # leaves out the runs a pause lands in — a garbage collection, say — and the mean does not)
    results = {k: statistics.median(r[k] for r in repeats) for k in repeats[0]}
    means = {k: statistics.fmean(x for r in sampled for x in r[k]) for k in sampled[0]}
    if args.json:
        print(json.dumps(results if args.repeat == 1 else repeats, indent=2))
        return
    print(
        f"ReAct iteration with / without GraphGuard (median of {args.runs} runs"
        + (f", median of {args.repeat} repeats" if args.repeat > 1 else "")
        + ", "
        f"{args.steps} tool-calling iterations + a final answer each; µs of {args.clock} "
        "time per model call)"
    )
    scripted = {k: v for k, v in results.items() if "ChatOpenAI" not in k}
    print_ratios(scripted, "bare graph", 44)
    served = {k: v for k, v in results.items() if "ChatOpenAI" in k}
    if served:
        print("On the real ChatOpenAI client, answered by a local OpenAI-wire server:")
        print_ratios(served, "ChatOpenAI, bare graph", 44)
    print("Means over all runs (what throughput pays: pauses such as garbage collections too):")
    print_ratios({k: v for k, v in means.items() if "ChatOpenAI" not in k}, "bare graph", 44)
    # each run against the bare run of its own round, over every round of every repeat
    paired = {k: [x for r in sampled for x in r[k]] for k in sampled[0] if "ChatOpenAI" not in k}
    print(
        f"Paired: each run / the bare run of its round ({len(paired['sync: bare graph'])} "
        "rounds), median with its 95% bootstrap interval:"
    )
    print_paired(paired, "bare graph", 44)
    if args.repeat > 1:
        print(f"Ratios over {args.repeat} repeats: median (lowest–highest; the bare iteration):")
        print_spread(
            [{k: v for k, v in r.items() if "ChatOpenAI" not in k} for r in repeats],
            "bare graph",
            44,
        )


def _across_processes(args: argparse.Namespace) -> None:
    """``--processes K``: the measurement in K fresh processes, one after another (so they
    never compete for the cores), and each variant's paired ratio over them."""
    cmd = [sys.executable, __file__, "--emit-paired", "--clock", args.clock]
    cmd += ["--steps", str(args.steps), "-n", str(args.runs), "--repeat", str(args.repeat)]
    cmd += ["--openai"] if args.openai else []
    for text in args.only:
        cmd += ["--only", text]
    per: dict[str, list[float]] = {}
    bare_us: dict[str, list[float]] = {}
    for _ in range(args.processes):
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        got = json.loads(out.strip().splitlines()[-1])
        for name, ratio in got["paired"].items():
            per.setdefault(name, []).append(ratio)
        for name, us in got["bare"].items():
            bare_us.setdefault(name, []).append(us)
    if args.json:
        print(json.dumps({"paired": per, "bare_us": bare_us}, indent=2))
        return
    print(
        f"Paired ratios of {args.processes} processes ({args.runs} rounds x {args.repeat} "
        f"each, {args.clock} time): median over the processes (quartiles; lowest–highest)"
    )
    for name, us in bare_us.items():
        print(f"  {name:<44} {min(us):,.0f}–{max(us):,.0f} µs per model call (the medians)")
    for name, ratios in per.items():
        q = ratios * 3 if len(ratios) == 1 else statistics.quantiles(ratios, method="inclusive")
        print(
            f"  {name:<44} x{statistics.median(ratios):.3f}  (x{q[0]:.3f}–x{q[2]:.3f}; "
            f"x{min(ratios):.3f}–x{max(ratios):.3f})"
        )


if __name__ == "__main__":
    main()
