"""Run every benchmark in this folder and print their tables.

Usage: ``.venv/bin/python benchmarks/run.py [--json]``. Benchmarks are not tests: they report
medians and ratios measured in one run on this machine, they assert nothing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = [
    "bench_guard.py",
    "bench_pricing.py",
    "bench_trim.py",
    "bench_llamaindex_postprocess.py",
    "bench_llamaindex_handler.py",
    "bench_trace.py",
]


def main() -> int:
    extra = sys.argv[1:]
    scripts = [HERE / name for name in ORDER if (HERE / name).exists()]
    scripts += sorted(p for p in HERE.glob("bench_*.py") if p.name not in ORDER)
    status = 0
    for script in scripts:
        print(f"\n=== {script.name}", flush=True)
        status |= subprocess.run([sys.executable, str(script), *extra], check=False).returncode
    return status


if __name__ == "__main__":
    raise SystemExit(main())
