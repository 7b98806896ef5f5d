"""Micro-benchmarks of the per-call pricing and token-counting paths.

Run: ``.venv/bin/python benchmarks/bench_pricing.py [--json]``. Prints the median of
``timeit.repeat`` runs (each of many loops) per operation, in microseconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import genai_prices

from agentguard._pricing import PriceBook
from agentguard._tokens import counter_for
from agentguard._usage import Usage

TEXT = (
    "Agents call models in loops: plan, call a tool, read the result, call the model again. "
    "Every step re-sends the growing conversation, so costs compound quickly. "
) * 14  # ~500 tokens


def median_us(fn: Callable[[], Any], *, loops: int, repeat: int = 7) -> float:
    """Median over ``repeat`` runs of the per-call time of ``fn`` in microseconds."""
    fn()  # warm up (first-use loading is not what this measures)
    runs = timeit.repeat(fn, number=loops, repeat=repeat)
    return statistics.median(runs) / loops * 1e6


def run() -> dict[str, Any]:
    book = PriceBook()
    rates = book.require("gpt-4o")
    tiered = book.require("claude-sonnet-4-5")
    usage = Usage(input_tokens=12_000, cache_read_tokens=8_000, output_tokens=600)
    big = Usage(input_tokens=250_000, cache_read_tokens=100_000, output_tokens=2_000)
    g_usage = genai_prices.Usage(input_tokens=12_000, cache_read_tokens=8_000, output_tokens=600)
    counter = counter_for("gpt-4o")
    tokens = counter.count(TEXT)

    results: dict[str, Any] = {
        "rates_lookup_us": median_us(lambda: book.rates("gpt-4o"), loops=200_000),
        "cost_us": median_us(lambda: rates.cost(usage), loops=200_000),
        "cost_tiered_us": median_us(lambda: tiered.cost(big), loops=200_000),
        "worst_case_cost_us": median_us(lambda: rates.worst_case_cost(12_000, 600), loops=200_000),
        "genai_calc_price_us": median_us(
            lambda: genai_prices.calc_price(g_usage, "gpt-4o"), loops=2_000
        ),
        "count_500_tokens_us": median_us(lambda: counter.count(TEXT), loops=5_000),
    }
    results["calc_price_over_cost"] = results["genai_calc_price_us"] / results["cost_us"]
    results["counter"] = counter.name
    results["text_tokens"] = tokens
    results["python"] = sys.version.split()[0]
    results["genai_prices"] = genai_prices.__version__
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    r = run()
    if args.json:
        print(json.dumps(r, indent=2))
        return
    rows = [
        ("PriceBook.rates('gpt-4o') (cached)", r["rates_lookup_us"]),
        ("ModelRates.cost(usage)", r["cost_us"]),
        ("ModelRates.cost(usage) above a tier", r["cost_tiered_us"]),
        ("ModelRates.worst_case_cost(i, o)", r["worst_case_cost_us"]),
        ("genai_prices.calc_price(usage, 'gpt-4o')", r["genai_calc_price_us"]),
        (f"count ~{r['text_tokens']} tokens ({r['counter']})", r["count_500_tokens_us"]),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"{'operation':<{width}}  median µs")
    print(f"{'-' * width}  ---------")
    for name, us in rows:
        print(f"{name:<{width}}  {us:9.2f}")
    print(f"\ncalc_price / ModelRates.cost: {r['calc_price_over_cost']:.0f}x")
    print(f"python {r['python']}, genai-prices {r['genai_prices']}")


if __name__ == "__main__":
    main()
