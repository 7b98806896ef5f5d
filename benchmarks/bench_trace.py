"""Cost of recording one span: ``write_spans([span])`` per sink, amortised over batches.

Each round writes ``--spans`` spans one call at a time and closes the sink (so every span is
on disk for the file sinks, flushes included); the figure is the round's wall time divided by the
number of spans. The median over ``--rounds`` rounds is reported, with the minimum and maximum.

Run:
    .venv/bin/python benchmarks/bench_trace.py
    .venv/bin/python benchmarks/bench_trace.py --json --spans 50000 --rounds 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

from agentguard._sinks import JSONLSink, MemorySink, NullSink, SQLiteSink
from agentguard._trace import Span, TraceSink, new_span_id
from agentguard._usage import Usage


def make_spans(n: int) -> list[Span]:
    """Realistic model-call spans (usage, cost, decision, a few attrs), built ahead of time."""
    now = time.time()
    return [
        Span(
            span_id=new_span_id(),
            task_id=f"task-{i // 20}",
            kind="model",
            name="gpt-4o-mini",
            start=now + i,
            parent_id="step-1",
            end=now + i + 0.8,
            model="gpt-4o-mini",
            usage=Usage(input_tokens=1800, output_tokens=240, cache_read_tokens=1024),
            cost_usd=Decimal("0.0003126"),
            decision="allow",
            attrs={"reserved_usd": Decimal("0.00061"), "estimated": False},
        )
        for i in range(n)
    ]


def one_round(make_sink: Callable[[Path], TraceSink], spans: list[Span], tmp: Path) -> float:
    """Microseconds per span for one round (sink opened before, closed inside the timing)."""
    sink = make_sink(tmp)
    t0 = time.perf_counter()
    for span in spans:
        sink.write_spans([span])
    sink.close()
    return (time.perf_counter() - t0) / len(spans) * 1e6


def call_latencies(make_sink: Callable[[Path], TraceSink], spans: list[Span]) -> list[float]:
    """Microseconds of each ``write_spans([span])`` call (most buffer, a few write a batch)."""
    with tempfile.TemporaryDirectory() as d:
        sink = make_sink(Path(d))
        clock = time.perf_counter_ns
        out = []
        for span in spans:
            t0 = clock()
            sink.write_spans([span])
            out.append((clock() - t0) / 1000)
        sink.close()
    return sorted(out)


def bench_span_creation(n: int) -> float:
    """Microseconds to build one model span (the guard does this on every call)."""
    usage = Usage(input_tokens=1800, output_tokens=240)
    cost = Decimal("0.0003126")
    t0 = time.perf_counter()
    for i in range(n):
        Span(new_span_id(), "task", "model", "gpt-4o-mini", float(i), "step", usage=usage,
             cost_usd=cost, model="gpt-4o-mini")  # fmt: skip
    return (time.perf_counter() - t0) / n * 1e6


SINKS: dict[str, Callable[[Path], TraceSink]] = {
    "sqlite (batch 256)": lambda d: SQLiteSink(d / "bench.db"),
    "sqlite (batch 1)": lambda d: SQLiteSink(d / "bench1.db", batch_size=1),
    "jsonl": lambda d: JSONLSink(d / "bench.jsonl"),
    "memory": lambda d: MemorySink(),
    "null": lambda d: NullSink(),
}


def run(spans_per_round: int, rounds: int) -> dict[str, Any]:
    spans = make_spans(spans_per_round)
    results: dict[str, Any] = {
        "spans_per_round": spans_per_round,
        "rounds": rounds,
        "python": sys.version.split()[0],
        "unit": "µs per span",
        "results": {},
    }
    for name, make in SINKS.items():
        n = spans_per_round if "batch 1)" not in name else max(1, spans_per_round // 20)
        samples = []
        for _ in range(rounds):
            with tempfile.TemporaryDirectory() as d:
                samples.append(one_round(make, spans[:n], Path(d)))
        results["results"][name] = {
            "median_us": round(statistics.median(samples), 3),
            "min_us": round(min(samples), 3),
            "max_us": round(max(samples), 3),
            "spans": n,
        }
    for name in ("sqlite (batch 256)", "jsonl"):
        lat = call_latencies(SINKS[name], spans)
        results["results"][name].update(
            p50_call_us=round(lat[len(lat) // 2], 3),
            p99_call_us=round(lat[int(len(lat) * 0.99)], 3),
            max_call_us=round(lat[-1], 3),
        )
    creation = [bench_span_creation(spans_per_round) for _ in range(rounds)]
    results["results"]["Span() creation"] = {
        "median_us": round(statistics.median(creation), 3),
        "min_us": round(min(creation), 3),
        "max_us": round(max(creation), 3),
        "spans": spans_per_round,
    }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--spans", type=int, default=20_000, help="spans per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per sink")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    res = run(args.spans, args.rounds)
    if args.json:
        print(json.dumps(res, indent=2, ensure_ascii=False))
        return 0
    print(
        f"write_spans([span]), {res['spans_per_round']:,} spans x {res['rounds']} rounds, "
        f"Python {res['python']}"
    )
    width = max(len(k) for k in res["results"])
    cols = ("median_us", "min_us", "max_us", "p50_call_us", "p99_call_us", "max_call_us")
    print(f"{'':<{width}}  {'amortised µs per span':^28}  {'one call, µs':^28}")
    heads = ("median", "min", "max", "p50", "p99", "max")
    print(f"{'sink':<{width}}" + "".join(f"  {h:>8}" for h in heads))
    for name, r in res["results"].items():
        cells = "".join(f"  {r[k]:>8.3f}" if k in r else f"  {'':>8}" for k in cols)
        print(f"{name:<{width}}{cells}".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
