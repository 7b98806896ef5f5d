"""Shared timing for the agent-loop benchmarks (middleware, LangGraph): variants take turns
run by run, so drift in the machine's load hits them all alike; each run's time is divided by
the model calls it made.

``clock`` picks what is timed: wall time (``time.perf_counter``, the default) or the process's
CPU time (``time.process_time``, all threads), which leaves out the time other processes on a
shared machine hold the cores — with a zero-latency scripted model a run is all CPU, so on a
quiet machine the two agree."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

from agentguard_langchain.testing import ScriptedChatModel

Variant = tuple[Callable[[], None], ScriptedChatModel]


def timed(
    invoke: Callable[[], None],
    model: ScriptedChatModel,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """One run: its time divided by the model calls it made (µs)."""
    model._calls = 0  # the script (tool calls for the first N answers) restarts per run
    t = clock()
    invoke()
    dt = clock() - t
    n = model.calls
    model.seen.clear()
    return dt / n * 1e6


def interleaved_samples(
    variants: Mapping[str, Variant],
    runs: int,
    warmup: int = 5,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """µs per model call of each variant in each of ``runs`` timed rounds (after warm-up)."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(runs + warmup):
        for name, (invoke, model) in variants.items():
            us = timed(invoke, model, clock)
            if i >= warmup:
                samples[name].append(us)
    return samples


def interleaved_medians(
    variants: Mapping[str, Variant],
    runs: int,
    warmup: int = 5,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median µs per model call of each variant over ``runs`` timed rounds (after warm-up)."""
    samples = interleaved_samples(variants, runs, warmup, clock)
    return {name: statistics.median(v) for name, v in samples.items()}


def print_ratios(results: Mapping[str, float], baseline: str, width: int) -> None:
    """Per mode (sync / async), each variant's median and its ratio to the mode's baseline."""
    for mode in ("sync", "async"):
        base = results[f"{mode}: {baseline}"]
        for name, us in results.items():
            if not name.startswith(mode):
                continue
            extra = "" if us == base else f"  x{us / base:.2f}  (+{us - base:,.0f} µs)"
            print(f"  {name:<{width}} {us:>9,.0f} µs{extra}")


def print_spread(repeats: Sequence[Mapping[str, float]], baseline: str, width: int) -> None:
    """Per variant, its ratio to the mode's baseline in each of several repeated measurements:
    the median ratio and the lowest and highest (a loaded host moves single measurements by a
    few percent; the spread says how far to trust one)."""
    for mode in ("sync", "async"):
        key = f"{mode}: {baseline}"
        bases = [r[key] for r in repeats]
        for name in repeats[0]:
            if not name.startswith(mode) or name == key:
                continue
            ratios = sorted(r[name] / r[key] for r in repeats)
            print(
                f"  {name:<{width}} x{statistics.median(ratios):.3f}  "
                f"(x{ratios[0]:.3f}–x{ratios[-1]:.3f}; bare {min(bases):,.0f}–"
                f"{max(bases):,.0f} µs)"
            )


def paired_ratios(
    samples: Mapping[str, Sequence[float]], baseline: str, resamples: int = 2000
) -> dict[str, tuple[float, float, float]]:
    """Per variant, the median of its run-by-run ratios to the baseline run of the same round
    (variants take turns, so drift in the host's load cancels within a round), with a 95%
    bootstrap interval of that median: ``{name: (median, low, high)}``. Each mode (sync /
    async) is paired with its own baseline. The interval says how well these rounds pin the
    median down, not how far another process would land: a fresh process (another memory
    layout, another phase of the host's load) moves the median by about as much again."""
    rng = random.Random(1)  # the same interval for the same samples
    out = {}
    for mode in ("sync", "async"):
        base = samples.get(f"{mode}: {baseline}")
        if base is None:
            continue
        for name, runs in samples.items():
            if not name.startswith(mode) or name == f"{mode}: {baseline}":
                continue
            ratios = [x / b for x, b in zip(runs, base, strict=True)]
            meds = sorted(
                statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples)
            )
            out[name] = (
                statistics.median(ratios),
                meds[int(0.025 * resamples)],
                meds[int(0.975 * resamples) - 1],
            )
    return out


def print_paired(samples: Mapping[str, Sequence[float]], baseline: str, width: int) -> None:
    """:func:`paired_ratios`, one line per variant."""
    for name, (med, low, high) in paired_ratios(samples, baseline).items():
        print(f"  {name:<{width}} x{med:.3f}  (95% interval x{low:.3f}–x{high:.3f})")
