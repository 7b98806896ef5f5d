"""One worker process of the concurrency proof: 16 threads run tasks against a shared team
budget on Redis. Prints JSON: the spans of the model calls that ran and their total cost.

Usage: python redis_worker.py URL NAMESPACE WORKER_NO LIMIT_USD [cluster]
"""

from __future__ import annotations

import json
import sys
import threading
import time
from decimal import Decimal

import agentguard as ag
from agentguard._redis_store import RedisStore


def main() -> None:
    url, ns, worker, limit = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    cluster = len(sys.argv) > 5 and sys.argv[5] == "cluster"
    store = (
        RedisStore.from_cluster(url, namespace=ns)
        if cluster
        else RedisStore.from_url(url, namespace=ns)
    )
    sink = ag.MemorySink()
    policy = ag.Policy(
        on_limit="raise",
        budgets=[ag.Budget(scope="team", max_cost_usd=Decimal(limit))],
    )
    guard = ag.Guard(policy, store=store, traces=sink)
    barrier = threading.Barrier(16)
    ran: list[str] = []
    lock = threading.Lock()

    def thread(n: int) -> None:
        barrier.wait()
        for i in range(40):
            try:
                with guard.task(f"w{worker}-{n}-{i}", team="cx") as task:
                    call = task.start_model_call("gpt-4o-mini", input_tokens=2000, max_tokens=400)
                    time.sleep(0.005)  # the call is in flight while the others reserve
                    # a provider honours the bound output cap, as the guard may lower it
                    out = min(100 + (i * 37) % 300, call.max_tokens or 400)
                    call.end({"prompt_tokens": 2000, "completion_tokens": out})
                    with lock:
                        ran.append(task.id)
            except ag.BudgetExceeded:
                pass

    threads = [threading.Thread(target=thread, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spans = [s for s in sink.spans if s.kind == "model" and s.status == "ok"]
    print(
        json.dumps(
            {
                "ran": ran,
                "span_tasks": [s.task_id for s in spans],
                "cost": str(sum((s.cost_usd or Decimal(0) for s in spans), Decimal(0))),
            }
        )
    )


if __name__ == "__main__":
    main()
