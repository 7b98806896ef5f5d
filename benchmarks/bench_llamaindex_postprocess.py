"""Benchmark: TokenBudgetPostprocessor against one tiktoken pass over the same nodes.

Builds 20 ``NodeWithScore`` (``TextNode`` s with a ``source`` metadata line, as a retriever
returns them) of ~600 tokens of deterministic English-like prose each (the texts of
``bench_trim.py``), then measures, interleaved (median of ``--repeat`` runs of ``--number``
calls each):

* ``post``: ``TokenBudgetPostprocessor(budget_tokens=3000, model="gpt-4o-mini")
  .postprocess_nodes(nodes)`` outside a task, with the counter's count cache emptied before
  each call (a first sight of these nodes: nothing is known);
* ``post_task``: the same inside a task of a guard (open for the whole run, no trace sink), so
  ``Task.trim`` records the trim (span, decision, tokens and dollars saved), cache emptied;
* ``post_warm``: the same outside a task with the cache kept (the same nodes retrieved again);
* ``joined``: one ``encode`` of the 20 node texts joined by newlines (the goal's yardstick);
* ``each``: 20 ``encode`` calls, one per node;
* ``core``: the core ``trim_chunks`` alone on the same texts, each node reached charged its
  header (``extra_tokens``), cache emptied: the part of ``post`` that is not the adapter nor
  LlamaIndex's dispatcher span.

Both sides use the model's encoding (o200k_base for gpt-4o-mini). The goal is
``post / joined <= 0.5``: the postprocessor tokenises only what it keeps, and LlamaIndex's
dispatcher span around ``postprocess_nodes`` is part of what is timed.

Usage::

    .venv/bin/python benchmarks/bench_llamaindex_postprocess.py [--json] [--repeat N] [--number N]
        [--clock cpu]
"""

from __future__ import annotations

import argparse
import contextvars
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_trim import CLOCKS, _measure, make_chunks  # noqa: E402 - after the path set-up
from llama_index.core.schema import NodeWithScore, TextNode  # noqa: E402

import agentguard as ag  # noqa: E402
from agentguard._tokens import TiktokenCounter  # noqa: E402
from agentguard_llamaindex import TokenBudgetPostprocessor  # noqa: E402

_MODEL = "gpt-4o-mini"
_BUDGET = 3000


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the medians (or JSON with ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--repeat", type=int, default=15, help="repeats (median taken, >= 7)")
    parser.add_argument("--number", type=int, default=20, help="calls per repeat")
    parser.add_argument(
        "--clock",
        choices=tuple(CLOCKS),
        default="wall",
        help="time by wall clock or by the process's CPU time (steadier on a busy machine)",
    )
    args = parser.parse_args(argv)
    if args.repeat < 7:
        parser.error(f"--repeat must be >= 7, got {args.repeat}")

    counter = ag.counter_for(_MODEL)
    if not isinstance(counter, TiktokenCounter):
        parser.error(f"no offline tiktoken encoding for {_MODEL}: {counter!r}")
    encoding = counter.encoding
    texts = make_chunks(encoding)
    sizes = [len(encoding.encode(t, disallowed_special=())) for t in texts]
    nodes = [
        NodeWithScore(
            node=TextNode(id_=f"node-{i}", text=t, metadata={"source": f"kb/doc-{i:02d}.txt"}),
            score=1.0 - i / 100,
        )
        for i, t in enumerate(texts)
    ]
    joined = "\n".join(texts)
    post = TokenBudgetPostprocessor(budget_tokens=_BUDGET, model=_MODEL)
    guard = ag.Guard(ag.Policy(context_budget_tokens=_BUDGET), traces=False)
    # One task, open for the whole run, current only inside ``in_task`` (a task is opened once
    # per request, not per trim).
    in_task = contextvars.copy_context()
    scope = guard.task("bench")
    in_task.run(scope.__enter__)

    def cold() -> None:  # forget every count: these nodes are seen for the first time
        counter._cache.clear()
        counter._cached_chars = 0

    def run_post() -> None:
        cold()
        post.postprocess_nodes(nodes)

    def run_post_task() -> None:
        cold()
        in_task.run(post.postprocess_nodes, nodes)

    def run_post_warm() -> None:
        post.postprocess_nodes(nodes)

    # The core trimmer alone on the same texts, charging each node reached its own header as
    # the postprocessor does: what the adapter (and LlamaIndex's dispatcher span) adds is the
    # rest.
    chunks = [ag.Chunk(t, n.score) for t, n in zip(texts, nodes, strict=True)]
    headers = [f"source: {n.node.metadata['source']}\n\n" for n in nodes]

    def header_tokens(chunk: ag.Chunk) -> int:
        return counter.count(headers[chunk.index]) + 1

    def run_core() -> None:
        cold()
        ag.trim_chunks(chunks, _BUDGET, counter, extra_tokens=header_tokens)

    def run_joined() -> None:
        encoding.encode(joined, disallowed_special=())

    def run_each() -> None:
        for text in texts:
            encoding.encode(text, disallowed_special=())

    cold()
    kept = post.postprocess_nodes(nodes)
    runs = _measure(
        {
            "post": run_post,
            "joined": run_joined,
            "post_task": run_post_task,
            "each": run_each,
            "post_warm": run_post_warm,
            "core": run_core,
        },
        args.repeat,
        args.number,
        CLOCKS[args.clock],
    )
    in_task.run(scope.__exit__, None, None, None)
    med = {name: statistics.median(values) for name, values in runs.items()}
    paired = statistics.median(p / j for p, j in zip(runs["post"], runs["joined"], strict=True))
    kept_tokens = sum(counter.count(n.node.get_content()) for n in kept)
    report = {
        "nodes": len(nodes),
        "tokens_per_node_min": min(sizes),
        "tokens_per_node_max": max(sizes),
        "tokens_total": sum(sizes),
        "budget_tokens": _BUDGET,
        "kept": len(kept),
        "truncated": sum(bool(n.node.metadata.get("agentguard_truncated")) for n in kept),
        "tokens_kept_text": kept_tokens,
        "repeat": args.repeat,
        "number": args.number,
        **{f"{name}_ms": round(value, 4) for name, value in med.items()},
        "ratio_post_vs_joined": round(med["post"] / med["joined"], 4),
        "ratio_post_vs_joined_paired_median": round(paired, 4),
        "ratio_post_task_vs_joined": round(med["post_task"] / med["joined"], 4),
        "ratio_post_warm_vs_joined": round(med["post_warm"] / med["joined"], 4),
        "ratio_post_vs_each": round(med["post"] / med["each"], 4),
        "ratio_core_vs_joined": round(med["core"] / med["joined"], 4),
        "clock": args.clock,
        "goal": 0.5,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"{len(nodes)} nodes of {min(sizes)}-{max(sizes)} tokens ({sum(sizes)} in all), "
            f"budget {_BUDGET}: kept {report['kept']} ({report['truncated']} truncated)"
        )
        print(f"postprocess_nodes (cold)        median {med['post']:8.3f} ms")
        print(f"postprocess_nodes in a task     median {med['post_task']:8.3f} ms")
        print(f"postprocess_nodes (warm cache)  median {med['post_warm']:8.3f} ms")
        print(f"encode (joined)                 median {med['joined']:8.3f} ms")
        print(f"encode (each node)              median {med['each']:8.3f} ms")
        print(f"ratio post / joined        {report['ratio_post_vs_joined']:.3f}  (goal <= 0.5)")
        print(f"ratio post / joined, median of the per-repeat ratios {paired:.3f}")
        print(f"ratio post in a task / joined  {report['ratio_post_task_vs_joined']:.3f}")
        print(f"ratio post warm / joined   {report['ratio_post_warm_vs_joined']:.3f}")
        print(
            f"core trim_chunks alone     median {med['core']:8.3f} ms, "
            f"ratio / joined {report['ratio_core_vs_joined']:.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
