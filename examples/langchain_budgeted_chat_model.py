"""A plain LCEL RAG chain (no agent) with a budget-aware chat model and context trimming.

The retriever returns 20 chunks of ~600 tokens; ``trim_documents`` fits the best of them into
the policy's 3,000-token context budget (duplicates out, the last chunk cut at a sentence
end). ``BudgetedChatModel`` wraps the model: it binds the output cap on each call and switches
to the cheaper rung of the ladder once 60% of the budget is spent. Ten questions run in one
task; the trace shows tokens and dollars saved.

Run: ``.venv/bin/python examples/langchain_budgeted_chat_model.py``
"""

from __future__ import annotations

import random

from langchain_core.documents import Document
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda, RunnablePassthrough

import agentguard as ag
from agentguard_langchain import BudgetedChatModel, trim_documents
from agentguard_langchain.testing import ScriptedChatModel

WORDS = [
    "refund",
    "carrier",
    "parcel",
    "invoice",
    "warehouse",
    "delay",
    "voucher",
    "billing",
    "address",
    "return",
]


def corpus(seed: int = 3) -> list[Document]:
    rng = random.Random(seed)
    docs = []
    for i in range(20):
        sentences = [
            " ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + "." for _ in range(45)
        ]
        docs.append(Document(" ".join(sentences), metadata={"score": 1 - i / 20, "id": i}))
    return docs


def _joined(kept: list[Document]) -> str:
    """The kept documents' texts, as the prompt's context."""
    return "\n\n".join(d.page_content for d in kept)


def main() -> dict[str, object]:
    guard = ag.Guard(
        ag.Policy(
            max_cost_usd="0.08",
            max_output_tokens=200,
            context_budget_tokens=3000,
            downgrade=[ag.Downgrade(at=0.6, to="gpt-4o-mini")],
        ),
        traces="memory",
    )
    llm = BudgetedChatModel(
        guard=guard,
        model=ScriptedChatModel(model_name="gpt-4o", reply_tokens=200),
        models={"gpt-4o-mini": ScriptedChatModel(model_name="gpt-4o-mini", reply_tokens=200)},
    )
    docs = corpus()
    chain = (
        {
            "context": RunnableLambda(lambda _: docs)
            | trim_documents(guard, model="gpt-4o")
            | RunnableLambda(_joined),
            "question": RunnablePassthrough(),
        }
        | ChatPromptTemplate.from_messages(
            [("system", "Answer from the context.\n{context}"), ("user", "{question}")]
        )
        | llm
        | StrOutputParser()
    )
    with guard.task("faq-batch", feature="faq") as task:
        for i in range(10):
            chain.invoke(f"Question {i}: when is my refund paid?")
    models = [s.model for s in guard.sink.spans if s.kind == "model"]  # type: ignore[attr-defined]
    print(f"task {task.id}: ${task.cost_usd}, {task.model_calls} calls, models used: {models}")
    print(f"context trimmed by {task.tokens_saved} tokens; saved ${task.saved_usd}")
    return {"task": task, "models": models}


if __name__ == "__main__":
    main()
