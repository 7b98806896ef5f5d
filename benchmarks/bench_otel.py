"""Cost of the OpenTelemetry export: one agent task (a step, 10 model calls, 5 tool calls)
under a guard tracing to memory, with and without an ``OTelSink`` (SDK providers: a
``SimpleSpanProcessor`` into an in-memory exporter, an in-memory metric reader).

Rounds of the two variants are interleaved; the medians and their ratio are reported. The ratio
is the figure: absolute times move with the machine's load.

Run:
    .venv/bin/python benchmarks/bench_otel.py
    .venv/bin/python benchmarks/bench_otel.py --json --tasks 300 --rounds 9
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import agentguard as ag

USAGE = {"prompt_tokens": 1800, "completion_tokens": 240}


def run_tasks(guard: ag.Guard, n: int) -> float:
    """Microseconds per task, the sink flushed at the end (the background thread's work is
    inside the figure: on two cores it competes for the GIL with the caller)."""
    t0 = time.perf_counter()
    for i in range(n):
        with guard.task(f"t{i}", feature="support", team="cx") as task:
            task.step("agent")
            for j in range(10):
                task.start_model_call("gpt-4o-mini", input_tokens=1800).end(USAGE)
                if j % 2:
                    task.start_tool_call("search").end()
    guard.sink.flush()
    return (time.perf_counter() - t0) / n * 1e6


def _otel_guard(policy: ag.Policy, memory: ag.MemorySink, background: bool) -> ag.Guard:
    exporter = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    mp = MeterProvider(metric_readers=[InMemoryMetricReader()])
    sink = ag.OTelSink(tracer_provider=tp, meter_provider=mp, background=background)
    guard = ag.Guard(policy, traces=ag.MultiSink(memory, sink))
    guard.exporter = exporter  # type: ignore[attr-defined]
    return guard


def run(tasks: int, rounds: int) -> dict[str, Any]:
    policy = ag.Policy(max_cost_usd="100")
    memory = ag.MemorySink()
    guards = {
        "memory sink": ag.Guard(policy, traces=memory),
        "+ OTelSink (background)": _otel_guard(policy, memory, True),
        "+ OTelSink (in place)": _otel_guard(policy, memory, False),
    }
    for guard in guards.values():
        run_tasks(guard, 20)  # warm-up: price lookups, imports
    samples: dict[str, list[float]] = {k: [] for k in guards}
    for _ in range(rounds):
        for name, guard in guards.items():
            memory.clear()
            exporter = getattr(guard, "exporter", None)
            if exporter is not None:
                exporter.clear()
            samples[name].append(run_tasks(guard, tasks))
    medians = {k: statistics.median(v) for k, v in samples.items()}
    base = medians["memory sink"]
    spans_per_task = 1 + 1 + 10 + 5
    return {
        "tasks_per_round": tasks,
        "rounds": rounds,
        "python": sys.version.split()[0],
        "unit": "µs per task (17 spans, 10 model calls)",
        "results": {
            k: {
                "median_us": round(m, 1),
                "min_us": round(min(samples[k]), 1),
                "max_us": round(max(samples[k]), 1),
                "ratio": round(m / base, 3),
                "us_per_span": round((m - base) / spans_per_task, 1),
            }
            for k, m in medians.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tasks", type=int, default=200, help="tasks per round")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per variant")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    res = run(args.tasks, args.rounds)
    if args.json:
        print(json.dumps(res, indent=2, ensure_ascii=False))
        return 0
    print(f"{res['unit']}, {res['tasks_per_round']} tasks x {res['rounds']} interleaved rounds")
    for name, r in res["results"].items():
        print(
            f"  {name:<24} median {r['median_us']:>9,.1f}  (min {r['min_us']:,.1f}, "
            f"max {r['max_us']:,.1f})  ratio {r['ratio']}x  +{r['us_per_span']} µs/span"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
