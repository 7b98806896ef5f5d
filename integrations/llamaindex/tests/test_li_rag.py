"""A real RAG pipeline under a guard: VectorStoreIndex -> 20 nodes -> SimilarityPostprocessor
-> TokenBudgetPostprocessor -> LLMRerank -> a scripted LLM answering (see rag_pipeline.py).

The LLM (rag_llm.py) charges the current task for exactly the tokens it was sent and wrote, so
the task's spend shows what trimming saved.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

from llama_index.core.postprocessor import LLMRerank, SimilarityPostprocessor
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.schema import MetadataMode
from rag_llm import ScriptedRagLLM
from rag_pipeline import MODEL, QUESTION, build_index, sources

import agentguard as ag
from agentguard_llamaindex import TokenBudgetPostprocessor
from agentguard_llamaindex._postprocess import TRUNCATED_KEY
from agentguard_llamaindex.testing import HashingEmbedding

COUNTER = ag.counter_for(MODEL)
INPUT_USD = Decimal("0.15") / 1_000_000  # gpt-4o-mini, per token
OUTPUT_USD = Decimal("0.60") / 1_000_000
CUTOFF = 0.04  # keeps the 11 best of the 20 retrieved nodes
ANSWER = "Roasting turns green coffee beans into the brown beans that can be brewed."
TRIMMED = ["kb/coffee_roasting.txt", "kb/coffee_brewing.txt", "kb/espresso.txt", "kb/decaf.txt"]
FINAL = TRIMMED[:3]


def pipeline(llm: ScriptedRagLLM, *trim: TokenBudgetPostprocessor) -> list[Any]:
    return [SimilarityPostprocessor(similarity_cutoff=CUTOFF), *trim, LLMRerank(llm=llm, top_n=3)]


def engine(llm: ScriptedRagLLM, *trim: TokenBudgetPostprocessor) -> Any:
    return build_index().as_query_engine(
        llm=llm, similarity_top_k=20, node_postprocessors=pipeline(llm, *trim)
    )


def documents_in(prompt: str) -> list[str]:
    """The sources of the documents a prompt shows, in order."""
    return re.findall(r"^source: (\S+)$", prompt, flags=re.MULTILINE)


def spend(llm: ScriptedRagLLM) -> Decimal:
    """What the calls cost at gpt-4o-mini's prices, from the usage the LLM reported."""
    return sum(
        (
            u["prompt_tokens"] * INPUT_USD + u["completion_tokens"] * OUTPUT_USD
            for *_, u in llm.calls
        ),
        Decimal(0),
    )


def trim_spans(g: ag.Guard) -> list[ag.Span]:
    return [s for s in g.sink.spans if s.kind == "trim"]  # type: ignore[attr-defined]


def test_the_query_engine_reads_only_the_trimmed_context_and_the_spend_shows_it() -> None:
    g = ag.Guard(ag.Policy(max_cost_usd="0.05", context_budget_tokens=500), traces="memory")
    llm = ScriptedRagLLM()
    with g.task("rag") as task:
        response = engine(llm, TokenBudgetPostprocessor(guard=g, model=MODEL)).query(QUESTION)

    assert str(response) == ANSWER
    assert sources(response.source_nodes) == FINAL
    assert [n.score for n in response.source_nodes] == [10.0, 10.0, 8.0]

    rerank_prompt, answer_prompt = llm.prompts
    # the reranker saw the 4 nodes that fit 500 tokens: the exact copy and the revision of
    # coffee_roasting were dropped, decaf was cut at a sentence end
    assert documents_in(rerank_prompt) == TRIMMED
    assert "coffee_roasting_copy" not in rerank_prompt
    assert "Swiss Water process soaks beans" in rerank_prompt
    assert "Other methods use ethyl acetate" in rerank_prompt  # (each header charged to its node)
    assert "Decaf must lose about 97 percent" not in rerank_prompt
    assert documents_in(answer_prompt) == FINAL
    context = rerank_prompt.rsplit("Let's try this now: \n\n", 1)[1].rsplit("\nQuestion:", 1)[0]
    shown = re.split(r"(?:^|\n\n)Document \d+:\n", context)[1:]
    assert len(shown) == 4
    assert sum(COUNTER.count(doc) for doc in shown) <= 500

    # spend: exactly the tokens the LLM was sent and wrote
    assert task.model_calls == 2
    assert task.usage.input_tokens == sum(COUNTER.count(p) for p in llm.prompts)
    assert task.cost_usd == spend(llm)

    (span,) = trim_spans(g)
    assert span.task_id == task.id
    assert span.attrs["chunks_in"] == 11
    assert span.attrs["chunks_kept"] == 4
    assert span.attrs["saved_usd"] == span.attrs["tokens_saved"] * INPUT_USD
    assert task.saved_usd == span.attrs["saved_usd"] > 0
    assert [(d.kind, d.action) for d in task.decisions] == [("trim", "trim")]

    # the same pipeline without the trimmer: the reranker reads all 11 nodes in two batches
    untrimmed_guard = ag.Guard(ag.Policy(max_cost_usd="0.05"), traces="memory")
    untrimmed = ScriptedRagLLM()
    with untrimmed_guard.task("rag-untrimmed") as full:
        engine(untrimmed).query(QUESTION)
    assert full.model_calls == 3
    assert len(documents_in(untrimmed.prompts[0])) + len(documents_in(untrimmed.prompts[1])) == 11
    assert full.cost_usd is not None and task.cost_usd is not None
    assert task.cost_usd < full.cost_usd * Decimal("0.6")
    assert full.usage.input_tokens - task.usage.input_tokens > span.attrs["tokens_saved"] // 2


async def test_async_query_gives_the_same_nodes_and_spend() -> None:
    g = ag.Guard(ag.Policy(max_cost_usd="0.05", context_budget_tokens=500), traces="memory")
    sync_llm, async_llm = ScriptedRagLLM(), ScriptedRagLLM()
    with g.task("sync") as sync_task:
        sync_response = engine(sync_llm, TokenBudgetPostprocessor(guard=g, model=MODEL)).query(
            QUESTION
        )
    async with g.task("async") as async_task:
        async_response = await engine(
            async_llm, TokenBudgetPostprocessor(guard=g, model=MODEL)
        ).aquery(QUESTION)
    assert str(async_response) == str(sync_response) == ANSWER
    assert sources(async_response.source_nodes) == FINAL
    assert async_llm.prompts == sync_llm.prompts
    assert async_task.cost_usd == sync_task.cost_usd == spend(async_llm)
    assert [s.task_id for s in trim_spans(g)] == [sync_task.id, async_task.id]


def test_a_retriever_query_engine_with_keep_order_and_a_tighter_budget() -> None:
    g = ag.Guard(ag.Policy(context_budget_tokens=3000), traces="memory")
    llm = ScriptedRagLLM()
    retriever = build_index().as_retriever(similarity_top_k=20)
    trim = TokenBudgetPostprocessor(guard=g, budget_tokens=300, model=MODEL, keep_order=True)
    query_engine = RetrieverQueryEngine.from_args(
        retriever, llm=llm, node_postprocessors=pipeline(llm, trim)
    )
    with g.task("tight") as task:
        response = query_engine.query(QUESTION)
    (rerank_prompt, _) = llm.prompts
    assert documents_in(rerank_prompt) == ["kb/coffee_roasting.txt", "kb/coffee_brewing.txt"]
    assert sources(response.source_nodes) == ["kb/coffee_roasting.txt", "kb/coffee_brewing.txt"]
    assert not any(n.node.metadata.get(TRUNCATED_KEY) for n in response.source_nodes)
    kept = sum(COUNTER.count(n.node.get_content(MetadataMode.LLM)) for n in response.source_nodes)
    assert kept <= 300
    (span,) = trim_spans(g)
    assert span.attrs["budget_tokens"] == 300
    assert task.cost_usd == spend(llm)


def _dump(db: Path) -> str:
    with sqlite3.connect(db) as conn:
        tables = [r[0] for r in conn.execute("select name from sqlite_master where type='table'")]
        return "\n".join(str(row) for t in tables for row in conn.execute(f"select * from {t}"))


def test_the_sqlite_trace_holds_no_text_unless_capture_content(tmp_path: Path) -> None:
    for capture in (False, True):
        db = tmp_path / f"trace-{capture}.db"
        g = ag.Guard(
            ag.Policy(max_cost_usd="0.05", context_budget_tokens=500),
            traces=str(db),
            capture_content=capture,
        )
        llm = ScriptedRagLLM()
        with g.task("rag"):
            engine(llm, TokenBudgetPostprocessor(guard=g, model=MODEL)).query(QUESTION)
        g.close()
        dump = _dump(db)
        assert "tokens_saved" in dump
        assert "'trim'" in dump
        assert ("Swiss Water process" in dump) is capture
        assert (ANSWER in dump) is capture


def test_the_embedding_is_the_same_in_another_process_with_another_hash_seed() -> None:
    here = Path(__file__).resolve().parent
    script = (
        "import json, sys; sys.path.insert(0, sys.argv[1]);"
        "from agentguard_llamaindex.testing import HashingEmbedding;"
        "print(json.dumps(HashingEmbedding().get_text_embedding(sys.argv[2])))"
    )
    text = "Roasting turns green coffee beans into brown beans."
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", script, str(here), text],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout
    assert json.loads(out) == HashingEmbedding().get_text_embedding(text)
