"""agentguard demo: three runaway workloads under one guard, on the embedded defaults.

* ``ticket-42`` — a planner that never stops calling tools and hits rate limits (retries);
  the guard downgrades it to a cheaper model at 60% of its budget and makes it finish
  gracefully at the ceiling instead of crashing.
* ``rag-7`` — a RAG query whose retriever returns 20 chunks of ~600 tokens; the guard trims
  them to a 3,000-token context budget and reports what that saved.
* ``digest-*`` — an always-on agent that loops on steps, capped per run, sharing a daily team
  budget with its siblings.

Everything is offline: memory budgets, a SQLite trace file, a scripted model (no API key, no
server). Run it with ``bash scripts/demo.sh``; it ends with the ``agentguard report`` table.
"""

from __future__ import annotations

import argparse
import random
from decimal import Decimal
from pathlib import Path

import agentguard as ag
from agentguard._cli import main as cli
from agentguard.testing import ScriptedModel

WORDS = [
    "invoice",
    "refund",
    "policy",
    "customer",
    "account",
    "shipping",
    "delay",
    "warehouse",
    "carrier",
    "tracking",
    "premium",
    "plan",
    "upgrade",
    "billing",
    "cycle",
    "discount",
    "voucher",
    "support",
    "escalation",
    "region",
    "tax",
    "receipt",
    "order",
    "status",
    "return",
    "window",
    "damaged",
    "item",
    "replacement",
    "priority",
    "queue",
    "agent",
]


def _chunk(rng: random.Random, n_sentences: int) -> str:
    sentences = []
    for _ in range(n_sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(8, 16))]
        sentences.append(" ".join(words).capitalize() + ".")
    return " ".join(sentences)


def runaway_planner(guard: ag.Guard) -> ag.Task:
    model = ScriptedModel("gpt-4o", reply_tokens=700, tool_calls={"name": "search", "args": {}})
    history: list[dict[str, str]] = [
        {"role": "system", "content": "You are a support agent. Use tools until sure."},
        {"role": "user", "content": "Why was I charged twice for order 1182?"},
    ]
    with guard.task("ticket-42", feature="support", team="cx") as task:
        for turn in range(1, 200):
            task.step("plan")
            if turn % 4 == 0:  # the provider rate-limits us now and then
                task.record_retry("429 rate limited")
            reply = model.invoke(task, history)
            history.append({"role": "assistant", "content": reply.text})
            if reply.finished:
                break
            for tc in reply.tool_calls:
                tool = task.start_tool_call(tc["name"])
                if tool.allowed:
                    history.append({"role": "tool", "content": "order log " * 60})
                    tool.end()
                else:
                    history.append({"role": "tool", "content": tool.decision.reason})
    return task


def bloated_rag(guard: ag.Guard) -> ag.Task:
    rng = random.Random(7)
    chunks = [ag.Chunk(_chunk(rng, 40), score=rng.random(), id=f"doc-{i}") for i in range(20)]
    chunks.append(ag.Chunk(chunks[3].text, score=0.99, id="doc-3-copy"))  # a duplicate
    model = ScriptedModel("gpt-4o", replies=["Refunds are issued within 5 business days."])
    with guard.task("rag-7", feature="faq", team="search") as task:
        task.record_retrieval("kb", documents=len(chunks), texts=[c.text for c in chunks])
        trimmed = task.trim(chunks, model="gpt-4o")
        context = "\n\n".join(c.text for c in trimmed.kept)
        model.invoke(
            task,
            [
                {"role": "system", "content": f"Answer from this context:\n{context}"},
                {"role": "user", "content": "How long do refunds take?"},
            ],
        )
    return task


def always_on_digest(guard: ag.Guard, runs: int) -> list[ag.Task]:
    model = ScriptedModel("gpt-4o-mini", reply_tokens=300)
    tasks = []
    policy = guard.policy.model_copy(update={"max_steps": 6, "on_limit": "finish"})
    for n in range(runs):
        try:
            with guard.task(f"digest-{n}", policy=policy, feature="digest", team="ops") as task:
                history = [{"role": "user", "content": "Summarise today's tickets."}]
                for _ in range(50):
                    if task.step("summarise").action == "finish":
                        # the step cap: one last, capped call writes the digest
                        model.invoke(task, history, final=True)
                        break
                    reply = model.invoke(task, history)
                    history.append({"role": "assistant", "content": reply.text})
                    if reply.finished:  # the money ran out first
                        break
        except ag.BudgetExceeded as exc:
            print(f"  digest-{n}: stopped by the team's daily budget ({exc.budget})")
        tasks.append(task)
    return tasks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--db", default="agentguard-demo.db", help="SQLite trace file")
    args = parser.parse_args(argv)
    db = Path(args.db)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)

    policy = ag.Policy(
        max_cost_usd="0.05",
        max_model_calls=30,
        max_tool_calls=20,
        max_retries=8,
        max_output_tokens=800,
        context_budget_tokens=3000,
        soft_limits=(0.5, 0.8),
        downgrade=[ag.Downgrade(at=0.6, to="gpt-4o-mini")],
        on_limit="finish",
        budgets=[
            ag.Budget(scope="team", max_cost_usd="0.10", window="day"),
            ag.Budget(scope="team", match="ops", max_cost_usd="0.0055", window="day"),
        ],
    )
    import structlog

    structlog.configure(  # keep the demo's output to the summary; decisions are in the trace
        wrapper_class=structlog.make_filtering_bound_logger(40)
    )
    guard = ag.Guard(policy, traces=str(db))

    print("agentguard demo — scripted model, memory budgets, traces in", db)
    print()
    results = [runaway_planner(guard), bloated_rag(guard), *always_on_digest(guard, 4)]
    guard.close()

    for t in results:
        cost = f"${t.cost_usd}" if t.cost_usd is not None else "unknown"
        moves = ", ".join(
            f"{d.action}({d.model or d.limit or d.kind})"
            for d in t.decisions
            if d.action in ("downgrade", "finish", "block", "stop", "trim")
        )
        print(
            f"{t.id:>10}: {t.status:<8} {cost:<14} calls={t.model_calls:<3} "
            f"tools={t.tool_calls:<3} tokens={t.usage.total_tokens:<6} "
            f"trimmed={t.tokens_saved:<5} saved=${t.saved_usd.quantize(Decimal('0.000001'))}"
        )
        if moves:
            print(f"{'':>12}{moves}")
    print()
    return cli(["report", "--db", str(db)])


if __name__ == "__main__":
    raise SystemExit(main())
