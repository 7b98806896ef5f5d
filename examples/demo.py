"""agentguard demo: four runaway workloads under one guard, on the embedded defaults.

* ``ticket-42`` — a LangChain v1 agent (``create_agent``) whose model never stops calling
  tools; ``AgentGuardMiddleware`` downgrades it to a cheaper model at 60% of its budget and
  makes it finish gracefully at the ceiling instead of crashing.
* ``rag-7`` — an LCEL RAG chain whose retriever returns 21 chunks of ~600 tokens (one a
  duplicate); ``trim_documents`` fits them into a 3,000-token context budget and the
  callback handler meters the answer.
* ``kb-3`` — a LlamaIndex query engine over a ``VectorStoreIndex``: its retriever returns 20
  nodes of ~400 tokens; ``TokenBudgetPostprocessor`` trims them to the context budget and
  ``BudgetedLLM`` meters (and would downgrade or stop) the answering call.
* ``digest-*`` — an always-on agent that loops on steps, capped per run, sharing a daily team
  budget with its siblings.

Everything is offline: memory budgets, a SQLite trace file, a scripted model (no API key, no
server). Run it with ``bash scripts/demo.sh``; it ends with the ``agentguard report`` table and
writes the same report as a self-contained HTML page (``agentguard-demo.html``).
"""

from __future__ import annotations

import argparse
import random
from decimal import Decimal
from pathlib import Path

from langchain.agents import create_agent
from langchain_core.documents import Document
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda, RunnablePassthrough
from langchain_core.tools import tool
from llama_index.core import Document as LlamaDocument
from llama_index.core import VectorStoreIndex

import agentguard as ag
from agentguard._cli import main as cli
from agentguard.testing import ScriptedModel
from agentguard_langchain import AgentGuardCallbackHandler, AgentGuardMiddleware, trim_documents
from agentguard_langchain.testing import ScriptedChatModel
from agentguard_llamaindex import BudgetedLLM, TokenBudgetPostprocessor
from agentguard_llamaindex.testing import HashingEmbedding, ScriptedLLM


def handler(guard: ag.Guard) -> AgentGuardCallbackHandler:
    return AgentGuardCallbackHandler(guard)


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


def runaway_agent(guard: ag.Guard) -> ag.Task:
    """A LangChain v1 agent (``create_agent``) whose model calls a tool on every turn."""

    @tool
    def search_orders(query: str) -> str:
        """Search the order system."""
        return "order 1182: charged twice, second charge pending reversal. " * 12

    agent = create_agent(
        model=ScriptedChatModel(model_name="gpt-4o", reply_tokens=700),  # never stops by itself
        tools=[search_orders],
        system_prompt="You are a support agent. Use tools until you are sure.",
        middleware=[
            AgentGuardMiddleware(
                guard, models={"gpt-4o-mini": ScriptedChatModel(model_name="gpt-4o-mini")}
            )
        ],
    )
    with guard.task("ticket-42", feature="support", team="cx") as task:
        out = agent.invoke(
            {"messages": [{"role": "user", "content": "Why was I charged twice for order 1182?"}]}
        )
    final = out["messages"][-1]
    print(f"  ticket-42 final answer ends with: ...{final.text[-70:]!r}")
    return task


def _joined(kept: list[Document]) -> str:
    """The kept documents' texts, as the prompt's context."""
    return "\n\n".join(d.page_content for d in kept)


def bloated_rag(guard: ag.Guard) -> ag.Task:
    """An LCEL RAG chain: a retriever returning 21 chunks, trimmed to the context budget."""
    rng = random.Random(7)
    docs = [
        Document(_chunk(rng, 40), metadata={"score": rng.random(), "id": f"doc-{i}"})
        for i in range(20)
    ]
    docs.append(Document(docs[3].page_content, metadata={"score": 0.99}))  # a duplicate
    model = ScriptedChatModel(
        model_name="gpt-4o", replies=["Refunds are issued within 5 business days."]
    )
    prompt = ChatPromptTemplate.from_messages(
        [("system", "Answer from this context:\n{context}"), ("user", "{question}")]
    )
    chain = (
        {
            "context": RunnableLambda(lambda _: docs)
            | trim_documents(guard, model="gpt-4o")
            | RunnableLambda(_joined),
            "question": RunnablePassthrough(),
        }
        | prompt
        | model
        | StrOutputParser()
    )
    with guard.task("rag-7", feature="faq", team="search") as task:
        task.record_retrieval("kb", documents=len(docs), texts=[d.page_content for d in docs])
        chain.invoke("How long do refunds take?", config={"callbacks": [handler(guard)]})
    return task


def llamaindex_rag(guard: ag.Guard) -> ag.Task:
    """A LlamaIndex query engine: 20 retrieved nodes trimmed to the context budget."""
    rng = random.Random(11)
    docs = [
        LlamaDocument(text=_chunk(rng, 30), metadata={"source": f"kb/article-{i}"})
        for i in range(24)
    ]
    index = VectorStoreIndex.from_documents(docs, embed_model=HashingEmbedding())
    llm = BudgetedLLM(
        guard=guard,
        llm=ScriptedLLM(model="gpt-4o-mini", replies=["Damaged items are replaced at no cost."]),
    )
    engine = index.as_query_engine(
        llm=llm,
        similarity_top_k=20,
        node_postprocessors=[TokenBudgetPostprocessor(guard=guard, model="gpt-4o-mini")],
    )
    with guard.task("kb-3", feature="kb-search", team="search") as task:
        engine.query("Which carrier handles damaged items on priority orders?")
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
    parser.add_argument(
        "--db",
        default="agentguard-demo.db",
        help="SQLite trace file (the HTML report is written beside it, as .html)",
    )
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
    results = [
        runaway_agent(guard),
        bloated_rag(guard),
        llamaindex_rag(guard),
        *always_on_digest(guard, 4),
    ]
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
    code = cli(["report", "--db", str(db)])
    html = db.with_suffix(".html")
    if code == 0:
        code = cli(["report", "--db", str(db), "--html", str(html)])
    return code


if __name__ == "__main__":
    raise SystemExit(main())
