"""Context trimming for LangChain: AgentGuardCompressor and trim_documents in a RAG chain."""

from __future__ import annotations

import random
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler, CallbackManagerForRetrieverRun
from langchain_core.documents import BaseDocumentCompressor, Document
from langchain_core.messages import BaseMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import RunnablePassthrough

import agentguard as ag
from agentguard_langchain._chat_model import BudgetedChatModel
from agentguard_langchain._compress import TRUNCATED_KEY, AgentGuardCompressor, trim_documents
from agentguard_langchain.testing import ScriptedChatModel, count_input_tokens

MODEL = "gpt-4o-mini"
COUNTER = ag.counter_for(MODEL)

_WHO = ["The carrier", "Our Lyon warehouse", "The returns desk", "A courier", "The customs office",
        "The night shift", "Billing", "The Porto depot", "Support", "The supplier"]  # fmt: skip
_DID = ["scanned", "rerouted", "held", "refunded", "weighed", "relabelled", "inspected",
        "delayed", "insured", "photographed"]  # fmt: skip
_WHAT = ["parcel", "pallet", "invoice", "crate", "envelope", "return label", "claim",
         "shipment", "order", "manifest"]  # fmt: skip
_WHEN = ["before noon", "on Tuesday", "after the audit", "overnight", "at the border",
         "during the storm", "at dawn", "within two days", "last week", "on arrival"]  # fmt: skip


def prose(seed: int, tokens: int = 600) -> str:
    """Deterministic, distinct prose of about ``tokens`` tokens (each sentence is numbered)."""
    rng = random.Random(seed)
    sentences: list[str] = []
    n = 0
    while True:
        n += 1
        sentences.append(
            f"{rng.choice(_WHO)} {rng.choice(_DID)} {rng.choice(_WHAT)} {seed}-{n} "
            f"{rng.choice(_WHEN)}, and logged it in ledger {rng.randrange(1000, 9999)}."
        )
        if COUNTER.count(" ".join(sentences)) >= tokens:
            return " ".join(sentences)


def corpus(*, scores: bool = True) -> list[Document]:
    """20 documents of ~600 tokens; #1 repeats #0 (case, spacing), #3 repeats #2 exactly.
    Scores fall with the position, but #4 and #6 are scored down and #7 up to the top."""
    texts = [prose(i) for i in range(20)]
    texts[1] = "  " + texts[0].upper().replace(" ", "  ")
    texts[3] = texts[2]
    docs = []
    for i, text in enumerate(texts):
        meta: dict[str, Any] = {"source": f"kb/{i}"}
        if scores:
            score = 0.995 if i == 7 else 0.99 - 0.01 * i - (0.3 if i in (4, 6) else 0)
            meta["relevance_score"] = round(score, 3)
        docs.append(Document(page_content=text, metadata=meta, id=f"doc-{i}"))
    return docs


class KnowledgeBase(BaseRetriever):
    """A real retriever returning the same 20 documents for every query."""

    docs: list[Document]

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        return list(self.docs)


class PromptRecorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.prompts: list[list[BaseMessage]] = []

    def on_chat_model_start(self, serialized: Any, messages: Any, **kwargs: Any) -> None:
        self.prompts.append(list(messages[0]))


def format_docs(docs: Sequence[Document]) -> str:
    return "\n\n".join(d.page_content for d in docs)


PROMPT = ChatPromptTemplate.from_messages(
    [("system", "Answer from this context only.\n\n{context}"), ("human", "{question}")]
)
QUESTION = "Which parcels were delayed at the border?"


def rag_chain(guard: ag.Guard, llm: Any, **trim: Any) -> Any:
    retriever = KnowledgeBase(docs=corpus())
    context = retriever | trim_documents(guard, model=MODEL, separator_tokens=1, **trim)
    return (
        {"context": context | format_docs, "question": RunnablePassthrough()}
        | PROMPT
        | llm
        | StrOutputParser()
    )


def trim_spans(g: ag.Guard) -> list[ag.Span]:
    return [s for s in g.sink.spans if s.kind == "trim"]  # type: ignore[attr-defined]


def test_a_rag_chain_sends_the_model_a_context_within_budget() -> None:
    g = ag.Guard(ag.Policy(max_cost_usd="1", context_budget_tokens=3000), traces="memory")
    model = ScriptedChatModel(model_name=MODEL, replies=["Parcels 4-2 and 9-7."])
    recorder = PromptRecorder()
    chain = rag_chain(g, BudgetedChatModel(guard=g, model=model))
    with g.task("rag") as task:
        answer = chain.invoke(QUESTION, config={"callbacks": [recorder]})
    assert answer == "Parcels 4-2 and 9-7."

    (prompt,) = recorder.prompts
    system = str(prompt[0].content)
    context = system.split("\n\n", 1)[1]
    assert COUNTER.count(context) <= 3000
    overhead = count_input_tokens(
        MODEL, PROMPT.invoke({"context": "", "question": QUESTION}).to_messages()
    )
    sent = count_input_tokens(MODEL, prompt)
    assert sent <= overhead + 3000
    assert task.usage.input_tokens == sent  # the model was charged what it read
    untrimmed = COUNTER.count(format_docs(corpus()))
    assert untrimmed > 11_000
    assert sent < untrimmed / 3

    (span,) = trim_spans(g)
    saved = span.attrs["tokens_saved"]
    assert saved > 8000
    assert span.attrs["chunks_in"] == 20
    assert span.attrs["saved_usd"] == saved * Decimal("0.15") / 1_000_000
    assert task.saved_usd == span.attrs["saved_usd"]
    assert task.tokens_saved == saved
    assert [d.action for d in task.decisions] == ["trim"]


def test_duplicates_are_dropped_and_the_best_documents_kept_best_first() -> None:
    g = ag.Guard(ag.Policy(context_budget_tokens=3000), traces="memory")
    docs = corpus()
    with g.task("dedupe"):
        kept = AgentGuardCompressor(guard=g, model=MODEL).compress_documents(docs, QUESTION)
    ids = [d.id for d in kept]
    assert "doc-1" not in ids
    assert "doc-3" not in ids
    # ranked by relevance_score: 7, 0, 2, 5, ... (4 and 6 were scored down), the last one cut
    assert ids == ["doc-7", "doc-0", "doc-2", "doc-5", "doc-8"]
    # uncut documents are the very objects the retriever returned
    assert all(d is docs[int((d.id or "")[4:])] for d in kept[:-1])
    last = kept[-1]
    assert last.metadata == {**docs[8].metadata, TRUNCATED_KEY: True}
    assert docs[8].page_content.startswith(last.page_content)
    assert last.page_content.endswith(".")
    assert TRUNCATED_KEY not in docs[8].metadata
    assert sum(COUNTER.count(d.page_content) for d in kept) <= 3000


def test_keep_order_returns_the_retrievers_order() -> None:
    docs = corpus()
    best = AgentGuardCompressor(budget_tokens=3000, model=MODEL).compress_documents(docs, "q")
    ordered = AgentGuardCompressor(
        budget_tokens=3000, model=MODEL, keep_order=True
    ).compress_documents(docs, "q")
    assert [d.id for d in best] != [d.id for d in ordered]
    assert sorted(d.id or "" for d in best) == sorted(d.id or "" for d in ordered)
    assert [d.id for d in ordered] == sorted(
        (d.id or "" for d in ordered), key=lambda i: int(i[4:])
    )


def test_without_scores_the_retrievers_order_is_the_ranking() -> None:
    docs = corpus(scores=False)
    kept = AgentGuardCompressor(budget_tokens=2000, model=MODEL).compress_documents(docs, "q")
    assert [d.id for d in kept] == ["doc-0", "doc-2", "doc-4", "doc-5"]
    assert kept[-1].metadata.get(TRUNCATED_KEY) is True


def test_outside_a_task_documents_are_trimmed_and_nothing_is_recorded() -> None:
    g = ag.Guard(ag.Policy(context_budget_tokens=1000), traces="memory")
    kept = AgentGuardCompressor(guard=g, model=MODEL).compress_documents(corpus(), "q")
    assert 0 < sum(COUNTER.count(d.page_content) for d in kept) <= 1000
    assert g.sink.spans == []  # type: ignore[attr-defined]
    assert g.sink.tasks == []  # type: ignore[attr-defined]
    with pytest.raises(ag.PolicyError, match="context_budget_tokens"):
        AgentGuardCompressor().compress_documents(corpus(), "q")


def test_a_task_of_another_guard_is_not_charged_with_the_trim() -> None:
    mine = ag.Guard(ag.Policy(context_budget_tokens=1000), traces="memory")
    theirs = ag.Guard(ag.Policy(context_budget_tokens=50), traces="memory")
    with theirs.task("theirs") as other:
        kept = AgentGuardCompressor(guard=mine).compress_documents(corpus(), "q")
        anyone = AgentGuardCompressor().compress_documents(corpus(), "q")
    assert sum(COUNTER.count(d.page_content) for d in kept) > 900  # mine's budget
    assert sum(COUNTER.count(d.page_content) for d in anyone) <= 50  # the current task's
    assert other.tokens_saved > 0
    assert len(trim_spans(theirs)) == 1
    assert trim_spans(mine) == []


def test_an_explicit_budget_overrides_the_policy() -> None:
    g = ag.Guard(ag.Policy(context_budget_tokens=3000), traces="memory")
    with g.task("explicit"):
        kept = trim_documents(g, budget_tokens=700, model=MODEL).invoke(corpus())
    assert sum(COUNTER.count(d.page_content) for d in kept) <= 700
    (span,) = trim_spans(g)
    assert span.attrs["budget_tokens"] == 700


async def test_async_chain_and_compressor_record_on_the_callers_task() -> None:
    g = ag.Guard(ag.Policy(max_cost_usd="1", context_budget_tokens=3000), traces="memory")
    model = ScriptedChatModel(model_name=MODEL, replies=["Done."])
    chain = rag_chain(g, BudgetedChatModel(guard=g, model=model), keep_order=True)
    compressor = AgentGuardCompressor(guard=g, model=MODEL)
    async with g.task("rag-async") as task:
        assert await chain.ainvoke(QUESTION) == "Done."
        kept = await compressor.acompress_documents(corpus(), QUESTION)
    assert kept
    assert task.model_calls == 1
    assert len(trim_spans(g)) == 2
    assert task.tokens_saved > 16_000


def test_it_is_a_langchain_document_compressor() -> None:
    compressor = AgentGuardCompressor(budget_tokens=100)
    assert isinstance(compressor, BaseDocumentCompressor)
    assert compressor.compress_documents([], "q") == []
    step = trim_documents(budget_tokens=100)
    assert step.name == "agentguard_trim_documents"
