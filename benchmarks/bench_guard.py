"""Guard overhead per model call, and import time.

Run: ``.venv/bin/python benchmarks/bench_guard.py`` (``--json`` for machine output).

* per model call: ``start_model_call`` (decide + reserve) + ``end`` (price + commit + trace),
  with the memory store and a memory / SQLite trace sink; reported as the median over repeats
  of the mean per call (which includes the SQLite sink's batched writes, done on its
  background thread) and as the median of individually timed calls; ``input_tokens`` given
  (the adapter knows them) and, separately, counted from a short chat with the tokenizer, and
  from an agent's 11-message history of message objects with a bound tool (what an agent loop
  re-sends on every call: the counter reads each message once);
* a tool call and a step, for reference;
* a ReAct iteration as an agent graph drives the core (the events of ``bench_langgraph``'s
  guarded graph): a model call over a history that grows by an assistant message with a tool
  call and a tool result per call (with the bound tool), its end with the reported usage, a tool
  call and its end, and a step — with ``traces=False`` and with the SQLite sink; the events'
  time only (messages are built and tasks opened and closed outside the clock), median over
  repeats of the mean per iteration;
* ``import agentguard`` over a bare interpreter, and the first ``Guard`` built (which loads
  pydantic, genai-prices and structlog) — medians of fresh processes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Literal

import agentguard as ag

MESSAGES = [
    {"role": "system", "content": "You are a helpful support agent for an online shop."},
    {"role": "user", "content": "My parcel for order 1182 is late; what can you do?"},
    {"role": "assistant", "content": "Let me look the order up in the carrier's system."},
]


class Message:
    """A chat message object read by attribute (as LangChain's and LlamaIndex's are)."""

    def __init__(self, role: str, content: str, **extra: object) -> None:
        self.role = role
        self.content = content
        self.tool_calls = extra.get("tool_calls")
        self.tool_call_id = extra.get("tool_call_id")
        self.additional_kwargs: dict[str, object] = {}


def agent_history(steps: int) -> list[Message]:
    """An agent's history after ``steps`` tool-calling steps: what it re-sends on each call."""
    out = [Message("user", "Where is my parcel for order 1182?")]
    for i in range(steps):
        call = {"name": "lookup", "args": {"query": f"order 1182, try {i}"}, "id": f"call_{i}"}
        out.append(Message("assistant", "", tool_calls=[call]))
        out.append(
            Message("tool", "order 1182: paid, shipped 3 days late", tool_call_id=f"call_{i}")
        )
    return out


HISTORY = agent_history(5)
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]


def per_call(fn: Callable[[], None], n: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean µs per call of ``n`` calls."""
    results = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        results.append((time.perf_counter() - t) / n * 1e6)
    return statistics.median(results)


def per_call_median(fn: Callable[[], None], n: int) -> float:
    """Median µs of ``n`` individually timed calls (batched sink writes fall outside it)."""
    clock = time.perf_counter
    samples = []
    for _ in range(n):
        t = clock()
        fn()
        samples.append(clock() - t)
    return statistics.median(samples) * 1e6


def bench_calls(n: int, repeats: int) -> dict[str, float]:
    out: dict[str, float] = {}
    usage = ag.Usage(1200, 180, cache_read_tokens=1024)
    policy = ag.Policy(
        max_cost_usd="1000000",
        max_model_calls=10**9,
        max_output_tokens=800,
        downgrade=[ag.Downgrade(at=0.6, to="gpt-4o-mini")],
        on_limit="finish",
        budgets=[ag.Budget(scope="team", max_cost_usd="10000000", window="day")],
    )
    with tempfile.TemporaryDirectory() as tmp:
        for label, traces in (("memory sink", "memory"), ("sqlite sink", f"{tmp}/b.db")):
            guard = ag.Guard(policy, traces=traces)
            with guard.task("bench", team="cx") as task:

                def call(task: ag.Task = task) -> None:
                    c = task.start_model_call("gpt-4o", input_tokens=1200)
                    c.end(usage)

                def counted(task: ag.Task = task) -> None:
                    c = task.start_model_call("gpt-4o", messages=MESSAGES)
                    c.end(usage)

                def history(task: ag.Task = task) -> None:
                    c = task.start_model_call("gpt-4o", messages=HISTORY, tools=TOOLS)
                    c.end(usage)

                def tool(task: ag.Task = task) -> None:
                    task.start_tool_call("search").end()

                for fn in (call, counted, history, tool):  # warm caches (prices, encodings)
                    fn()
                out[f"model call, input_tokens given ({label})"] = per_call(call, n, repeats)
                out[f"model call, input_tokens given ({label}), per-call median"] = per_call_median(
                    call, n * repeats
                )
                out[f"model call, messages counted ({label})"] = per_call(counted, n, repeats)
                out[f"model call, 11-message agent history + tool ({label})"] = per_call(
                    history, n, repeats
                )
                out[f"tool call ({label})"] = per_call(tool, n, repeats)
                if label == "memory sink":
                    guard.sink.clear()  # type: ignore[attr-defined]
            guard.close()
    return out


def react_policy() -> ag.Policy:
    """``bench_langgraph``'s policy."""
    return ag.Policy(
        max_cost_usd="1000",
        max_steps=1000,
        max_output_tokens=400,
        downgrade=[ag.Downgrade(at=0.6, to="gpt-4o-mini")],
        on_limit="finish",
    )


def react_iterations(guard: ag.Guard, tasks: int, per_task: int = 6) -> float:
    """Mean µs of the guard's events per ReAct iteration over ``tasks`` tasks of
    ``per_task`` iterations each."""
    clock = time.perf_counter
    spent = 0.0
    for _ in range(tasks):
        history = [Message("user", "Where is my parcel for order 1182?")]
        with guard.task() as task:  # a fresh task (and budget key) per run
            for i in range(per_task):
                usage = ag.Usage(60 + 40 * i, 20)
                t = clock()
                call = task.start_model_call(
                    "gpt-4o", messages=history, tools=TOOLS, max_tokens=None
                )
                call.end(usage, output_text=None, model="gpt-4o")
                task.start_tool_call("lookup").end()
                task.step("agent")
                spent += clock() - t
                call_ = {"name": "lookup", "args": {"query": f"order 1182, try {i}"}, "id": f"c{i}"}
                history.append(Message("assistant", "", tool_calls=[call_]))
                history.append(
                    Message("tool", "order 1182: paid, shipped late", tool_call_id=f"c{i}")
                )
    return spent / (tasks * per_task) * 1e6


def bench_react(n: int, repeats: int) -> dict[str, float]:
    out: dict[str, float] = {}
    tasks = max(1, n // 12)
    with tempfile.TemporaryDirectory() as tmp:
        cases: tuple[tuple[str, Literal[False] | str], ...] = (
            ("traces off", False),
            ("sqlite sink", f"{tmp}/r.db"),
        )
        for label, traces in cases:
            guard = ag.Guard(react_policy(), traces=traces)
            react_iterations(guard, 5)  # warm caches (prices, encodings)
            results = []
            for _ in range(repeats):
                results.append(react_iterations(guard, tasks))
                guard.sink.flush()
            out[f"ReAct iteration: model call+end, tool+end, step ({label})"] = statistics.median(
                results
            )
            guard.close()
    return out


def bench_import(repeats: int) -> dict[str, float]:
    def run(code: str) -> float:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True)
            times.append((time.perf_counter() - t) * 1000)
        return statistics.median(times)

    bare = run("pass")
    imp = run("import agentguard")
    first_guard = run("import agentguard as ag; ag.Guard(traces=False)")
    return {
        "bare interpreter (ms)": bare,
        "import agentguard (ms)": imp,
        "import agentguard over bare (ms)": imp - bare,
        "first Guard built, over bare (ms)": first_guard - bare,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    parser.add_argument("-n", type=int, default=2000, help="calls per repeat")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    results = {
        **bench_calls(args.n, args.repeats),
        **bench_react(args.n, args.repeats),
        **bench_import(args.repeats),
    }
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"guard overhead (median of {args.repeats} repeats x {args.n} calls)")
    for k, v in results.items():
        unit = "" if "(ms)" in k else " µs"
        print(f"  {k:<64} {v:>9.2f}{unit}")
    goal = results["model call, input_tokens given (sqlite sink), per-call median"]
    mean = results["model call, input_tokens given (sqlite sink)"]
    print(
        f"\ngoal: guard work per model call <= 50 µs median -> {goal:.1f} µs per-call median "
        f"({mean:.1f} µs mean, batched trace writes included)"
    )
    print(
        f"goal: import agentguard <= 100 ms over bare -> "
        f"{results['import agentguard over bare (ms)']:.1f} ms"
    )


if __name__ == "__main__":
    main()
