"""Per-call overhead of agentguard's LlamaIndex instrumentation on a ``MockLLM`` call.

Run: ``.venv/bin/python benchmarks/bench_llamaindex_handler.py`` (``--json`` for machine
output, ``--quick`` for a short run).

The model is LlamaIndex's ``MockLLM`` (``max_tokens=20``; ``complete`` runs the real
``llm_completion_callback`` machinery: a dispatcher span, start and end events, the legacy
callback manager). It is priced through a ``PriceBook`` override, so every guarded call is
decided and *reserved* against a money budget, then committed. Each variant's calls are timed
one by one, in rounds that interleave the variants (so drift on the machine hits them alike);
the handlers are attached to the root dispatcher only while their variant runs (outside the
timing). The table shows the median µs per call, the ratio to the bare call and the µs added.

Variants:

* bare — no handler;
* legacy TokenCountingHandler — LlamaIndex's own token counter on the callback manager;
* guard handler, in a task — ``instrument(guard)``, calls inside ``with guard.task(...)``,
  memory traces (decide, reserve, commit, span per call);
* guard handler, in a task, no traces — the same with ``traces=False`` (what writing the
  trace costs: memory traces keep every span, which the garbage collector then walks);
* guard handler, task per root span — no ``guard.task``: a task is opened and closed for each
  call's root span;
* BudgetedLLM, in a task — the wrapper over the same ``MockLLM`` (it decides, reserves and
  binds the cap; the handler, attached too, skips the call).

Goal (issue 5): the handler adds at most 30 µs per call including the reservation.
"""

from __future__ import annotations

import argparse
import contextvars
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from llama_index.core.callbacks import CallbackManager, TokenCountingHandler
from llama_index.core.llms import MockLLM

import agentguard as ag
from agentguard_llamaindex import BudgetedLLM, Instrumentation, instrument

PROMPT = "My parcel for order 1182 is late; what can you do about the shipping fee?"
GOAL_US = 30.0


def _guard(traces: Any = "memory") -> ag.Guard:
    prices = ag.PriceBook(
        overrides={"MockLLM": {"input_per_mtok": "0.15", "output_per_mtok": "0.6"}}
    )
    return ag.Guard(
        ag.Policy(max_cost_usd="1000", max_model_calls=10**9), traces=traces, prices=prices
    )


class _Variant:
    def __init__(
        self, fn: Callable[[], Any], attach: Callable[[], Instrumentation] | None = None
    ) -> None:
        self.fn = fn
        self.attach = attach
        self.inst: Instrumentation | None = None

    def __enter__(self) -> _Variant:
        if self.attach is not None:
            self.inst = self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.inst is not None:
            self.inst.detach()
            self.inst = None


def _in_task(guard: ag.Guard, fn: Callable[[], Any]) -> Callable[[], Any]:
    """Calls inside one long ``with guard.task(...)``, entered once (outside the timing) in a
    context of its own."""
    ctx = contextvars.copy_context()
    ctx.run(guard.task("bench").__enter__)
    return lambda: ctx.run(fn)


def _variants() -> dict[str, _Variant]:
    bare = MockLLM(max_tokens=20)
    counted = MockLLM(max_tokens=20, callback_manager=CallbackManager([TokenCountingHandler()]))
    g_task, g_root, g_wrap, g_quiet = _guard(), _guard(), _guard(), _guard(traces=False)
    wrapped = BudgetedLLM(guard=g_wrap, llm=MockLLM(max_tokens=20))
    return {
        "bare": _Variant(lambda: bare.complete(PROMPT)),
        "legacy TokenCountingHandler": _Variant(lambda: counted.complete(PROMPT)),
        "guard handler, in a task": _Variant(
            _in_task(g_task, lambda: bare.complete(PROMPT)), lambda: instrument(g_task)
        ),
        "guard handler, in a task, no traces": _Variant(
            _in_task(g_quiet, lambda: bare.complete(PROMPT)), lambda: instrument(g_quiet)
        ),
        "guard handler, task per root span": _Variant(
            lambda: bare.complete(PROMPT), lambda: instrument(g_root)
        ),
        "BudgetedLLM, in a task": _Variant(
            _in_task(g_wrap, lambda: wrapped.complete(PROMPT)), lambda: instrument(g_wrap)
        ),
    }


def _run(variants: dict[str, _Variant], n: int, rounds: int) -> dict[str, float]:
    clock = time.perf_counter
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for v in variants.values():  # warm up: imports, tokenizer, price cache, first task
        with v:
            for _ in range(200):
                v.fn()
    for _ in range(rounds):
        for name, v in variants.items():
            s = samples[name]
            fn = v.fn
            with v:
                for _ in range(n):
                    t = clock()
                    fn()
                    s.append(clock() - t)
    return {k: statistics.median(v) * 1e6 for k, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--quick", action="store_true", help="fewer calls")
    args = parser.parse_args()
    n, rounds = (100, 3) if args.quick else (300, 8)
    res = _run(_variants(), n, rounds)
    if args.json:
        print(json.dumps({"complete": res}, indent=2))
        return
    bare = res["bare"]
    legacy = res["legacy TokenCountingHandler"]
    print(f"MockLLM.complete, {n * rounds} calls each: median µs, ratio to bare, µs added")
    for name, us in res.items():
        print(f"  {name:<36} {us:9.1f} µs   {us / bare:5.2f}x   {us - bare:+8.1f} µs")
    added = res["guard handler, in a task"] - bare
    print()
    print(
        f"guard handler vs legacy TokenCountingHandler: "
        f"{res['guard handler, in a task'] / legacy:.2f}x"
    )
    print(f"goal: handler adds <= {GOAL_US:.0f} µs per call incl. reservation -> {added:+.1f} µs")


if __name__ == "__main__":
    main()
