"""Per-call overhead of ``AgentGuardCallbackHandler`` on a LangChain chat model call.

Run: ``.venv/bin/python benchmarks/bench_langchain_handler.py`` (``--json`` for machine
output, ``--quick`` for a short run).

The model is ``ScriptedChatModel`` (a real ``BaseChatModel``: it counts its input with a
tokenizer and reports usage, ~200-300 µs a call). Each variant's calls are timed one by one,
in rounds that interleave the variants (so drift on the machine hits them alike); the table
shows the median µs per call and its ratio to the bare call and to the call with
langchain-core's own ``UsageMetadataCallbackHandler`` (what attaching *any* handler costs in
LangChain's callback machinery).

Variants, for ``invoke`` and for ``ainvoke``:

* bare — no callbacks;
* usage-metadata — langchain-core's ``UsageMetadataCallbackHandler``;
* guard, task per run — the handler opens and closes a task for each root run (no
  ``guard.task``), memory traces; the same with the default SQLite traces in a temp dir;
* guard, in a task — calls inside ``with guard.task(...)``, memory traces;
* async: the sync handler (``run_inline``), ``AsyncAgentGuardCallbackHandler``, and the sync
  handler with ``run_inline=False`` (what a plain sync handler costs in an async run: a
  thread-pool hop per event).
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import json
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from langchain_core.callbacks import (
    BaseCallbackHandler,
    UsageMetadataCallbackHandler,
)

import agentguard as ag
from agentguard_langchain._callbacks import (
    AgentGuardCallbackHandler,
    AsyncAgentGuardCallbackHandler,
)
from agentguard_langchain.testing import ScriptedChatModel

PROMPT = "My parcel for order 1182 is late; what can you do?"
REPLY = (
    "I am sorry about the delay. The parcel left the warehouse late; I refunded the shipping fee."
)
INVOKE_GOAL = 1.25
AINVOKE_GOAL = 1.12


class _Empty(BaseCallbackHandler):
    """A handler that does nothing, inline: what LangChain's callback machinery costs."""

    run_inline = True


class _Threaded(AgentGuardCallbackHandler):
    """The handler as a plain sync handler would be: LangChain moves its events to a thread
    pool in async runs."""

    run_inline = False


def _model() -> ScriptedChatModel:
    return ScriptedChatModel(model_name="gpt-4o-mini", replies=[REPLY], max_tokens=200)


def _policy() -> ag.Policy:
    return ag.Policy(max_cost_usd="5", max_model_calls=1_000_000)


def _sync_variants(tmp: Path) -> dict[str, Callable[[], Any]]:
    model = _model()
    mem = ag.Guard(_policy(), traces="memory")
    sql = ag.Guard(_policy(), traces=tmp / "agentguard.db")
    in_task = ag.Guard(_policy(), traces="memory")
    in_task_sql = ag.Guard(_policy(), traces=tmp / "in-task.db")
    h_mem = AgentGuardCallbackHandler(mem)
    h_sql = AgentGuardCallbackHandler(sql)
    usage = UsageMetadataCallbackHandler()
    empty = _Empty()

    def in_a_task(guard: ag.Guard) -> Callable[[], Any]:
        """Calls inside one long ``with guard.task(...)``, entered once (outside the timing)
        in a context of its own."""
        ctx = contextvars.copy_context()
        ctx.run(guard.task("bench").__enter__)
        handler = AgentGuardCallbackHandler(guard)
        config: Any = {"callbacks": [handler]}
        return lambda: ctx.run(model.invoke, PROMPT, config)

    return {
        "bare": lambda: model.invoke(PROMPT),
        "usage-metadata handler": lambda: model.invoke(PROMPT, {"callbacks": [usage]}),
        "empty inline handler": lambda: model.invoke(PROMPT, {"callbacks": [empty]}),
        "guard, task per run (memory)": lambda: model.invoke(PROMPT, {"callbacks": [h_mem]}),
        "guard, task per run (sqlite)": lambda: model.invoke(PROMPT, {"callbacks": [h_sql]}),
        "guard, in a task (memory)": in_a_task(in_task),
        "guard, in a task (sqlite)": in_a_task(in_task_sql),
    }


def _async_variants() -> dict[str, Callable[[], Awaitable[Any]]]:
    model = _model()
    mem = ag.Guard(_policy(), traces="memory")
    usage = UsageMetadataCallbackHandler()
    handlers: dict[str, BaseCallbackHandler] = {
        "usage-metadata handler": usage,
        "empty inline handler": _Empty(),
        "guard, task per run (memory)": AgentGuardCallbackHandler(mem),
        "guard async handler, task per run": AsyncAgentGuardCallbackHandler(mem),
        "guard sync, run_inline=False": _Threaded(mem),
    }

    def call_with(h: BaseCallbackHandler) -> Callable[[], Awaitable[Any]]:
        config: Any = {"callbacks": [h]}
        return lambda: model.ainvoke(PROMPT, config)

    out: dict[str, Callable[[], Awaitable[Any]]] = {"bare": lambda: model.ainvoke(PROMPT)}
    out.update({name: call_with(h) for name, h in handlers.items()})
    return out


def _run_sync(variants: dict[str, Callable[[], Any]], n: int, rounds: int) -> dict[str, float]:
    clock = time.perf_counter
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm up: imports, tokenizer, price cache, first task
        for _ in range(200):
            fn()
    for _ in range(rounds):
        for name, fn in variants.items():
            s = samples[name]
            for _ in range(n):
                t = clock()
                fn()
                s.append(clock() - t)
    return {k: statistics.median(v) * 1e6 for k, v in samples.items()}


async def _run_async(
    variants: dict[str, Callable[[], Awaitable[Any]]], n: int, rounds: int
) -> dict[str, float]:
    clock = time.perf_counter
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():
        for _ in range(200):
            await fn()
    for _ in range(rounds):
        for name, fn in variants.items():
            s = samples[name]
            for _ in range(n):
                t = clock()
                await fn()
                s.append(clock() - t)
    return {k: statistics.median(v) * 1e6 for k, v in samples.items()}


def _table(title: str, res: dict[str, float]) -> None:
    bare = res["bare"]
    empty = res["empty inline handler"]
    print(f"{title}: median µs per call, ratio to bare, µs over the empty inline handler")
    for name, us in res.items():
        print(f"  {name:<38} {us:9.1f} µs   {us / bare:5.2f}x   {us - empty:+8.1f} µs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--quick", action="store_true", help="fewer calls")
    args = parser.parse_args()
    n, rounds = (100, 3) if args.quick else (400, 8)
    with tempfile.TemporaryDirectory() as tmp:
        sync_res = _run_sync(_sync_variants(Path(tmp)), n, rounds)
    async_res = asyncio.run(_run_async(_async_variants(), n, rounds))
    if args.json:
        print(json.dumps({"invoke": sync_res, "ainvoke": async_res}, indent=2))
        return
    _table(f"invoke, {n * rounds} calls each", sync_res)
    print()
    _table(f"ainvoke, {n * rounds} calls each", async_res)
    inv = sync_res["guard, task per run (memory)"] / sync_res["bare"]
    ainv = async_res["guard, task per run (memory)"] / async_res["bare"]
    print()
    print(f"goal: invoke with the handler <= {INVOKE_GOAL}x bare -> {inv:.2f}x")
    print(f"goal: ainvoke with the handler <= {AINVOKE_GOAL}x bare -> {ainv:.2f}x")


if __name__ == "__main__":
    main()
