"""TokenBudgetPostprocessor on nodes from a real LlamaIndex retriever (see rag_pipeline.py)."""

from __future__ import annotations

import doctest
import sqlite3
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import (
    MediaResource,
    MetadataMode,
    Node,
    NodeRelationship,
    NodeWithScore,
    QueryBundle,
    RelatedNodeInfo,
    TextNode,
)
from pydantic import ValidationError
from rag_pipeline import MODEL, QUESTION, retrieve, sources

import agentguard as ag
from agentguard_llamaindex import TokenBudgetPostprocessor, _postprocess
from agentguard_llamaindex._postprocess import TRUNCATED_KEY

COUNTER = ag.counter_for(MODEL)
TOP = ["kb/coffee_roasting.txt", "kb/coffee_brewing.txt", "kb/espresso.txt", "kb/decaf.txt"]


def llm_tokens(nodes: list[NodeWithScore], mode: MetadataMode = MetadataMode.LLM) -> int:
    """Tokens of the kept nodes as the LLM reads them."""
    return sum(COUNTER.count(n.node.get_content(mode)) for n in nodes)


def trim_spans(g: ag.Guard) -> list[ag.Span]:
    return [s for s in g.sink.spans if s.kind == "trim"]  # type: ignore[attr-defined]


def test_the_docstring_example_runs() -> None:
    # the package is not in the root doctest paths
    result = doctest.testmod(_postprocess)
    assert result.attempted > 0
    assert result.failed == 0


def test_it_is_a_llamaindex_node_postprocessor() -> None:
    post = TokenBudgetPostprocessor(budget_tokens=100)
    assert isinstance(post, BaseNodePostprocessor)
    assert post.class_name() == "TokenBudgetPostprocessor"
    assert post.postprocess_nodes([]) == []
    assert post.to_dict()["budget_tokens"] == 100


def test_trims_to_the_task_budget_dropping_duplicates_and_cutting_the_last_node() -> None:
    g = ag.Guard(ag.Policy(context_budget_tokens=500), traces="memory")
    nodes = retrieve()
    before = [(n.node.text, dict(n.node.metadata)) for n in nodes]
    with g.task("trim") as task:
        kept = TokenBudgetPostprocessor(guard=g, model=MODEL).postprocess_nodes(
            nodes, query_str=QUESTION
        )
    # best first; the exact copy (filed under another source) and the revision are dropped
    assert sources(kept) == TOP
    assert llm_tokens(kept) <= 500
    assert llm_tokens(kept) > 400  # the budget is used, not wasted
    # uncut nodes are the very objects the retriever returned
    assert kept[0] is nodes[0]
    assert kept[1] is nodes[3]
    assert kept[2] is nodes[4]
    cut = kept[3]
    original = nodes[5]
    assert cut is not original
    assert cut.score == original.score
    assert cut.node.node_id == original.node.node_id
    assert cut.node.metadata == {**original.node.metadata, TRUNCATED_KEY: True}
    assert cut.node.relationships == original.node.relationships
    assert original.node.text.startswith(cut.node.text)
    assert cut.node.text.endswith(".")
    assert len(cut.node.text) < len(original.node.text)
    # the marker is not shown to the LLM nor embedded
    assert TRUNCATED_KEY not in cut.node.get_content(MetadataMode.LLM)
    assert TRUNCATED_KEY not in cut.node.get_content(MetadataMode.EMBED)
    assert cut.node.get_content(MetadataMode.LLM).startswith("source: kb/decaf.txt\n\n")
    # nothing the retriever returned was changed
    assert [(n.node.text, dict(n.node.metadata)) for n in nodes] == before

    (span,) = trim_spans(g)
    assert span.attrs["chunks_in"] == 20
    assert span.attrs["chunks_kept"] == 4
    assert span.attrs["budget_tokens"] == 500
    saved = span.attrs["tokens_saved"]
    assert span.attrs["tokens_kept"] == sum(COUNTER.count(n.node.text) for n in kept)
    assert saved == span.attrs["tokens_in"] - span.attrs["tokens_kept"]
    # nodes past the budget are not tokenised: their share of tokens_in is estimated
    assert span.attrs["estimated"] is True
    text_tokens = sum(COUNTER.count(n.node.text) for n in nodes)
    assert abs(span.attrs["tokens_in"] - text_tokens) < text_tokens * 0.05
    assert span.attrs["saved_usd"] == saved * Decimal("0.15") / 1_000_000
    assert task.tokens_saved == saved
    assert task.saved_usd == span.attrs["saved_usd"]
    assert [(d.kind, d.action) for d in task.decisions] == [("trim", "trim")]


@settings(max_examples=40, deadline=None)
@given(
    budget=st.integers(min_value=0, max_value=2600),
    separator=st.integers(min_value=0, max_value=3),
    keep_order=st.booleans(),
)
def test_the_kept_nodes_as_the_llm_reads_them_never_exceed_the_budget(
    budget: int, separator: int, keep_order: bool
) -> None:
    nodes = retrieve()
    kept = TokenBudgetPostprocessor(
        budget_tokens=budget, model=MODEL, separator_tokens=separator, keep_order=keep_order
    ).postprocess_nodes(nodes)
    assert llm_tokens(kept) + separator * len(kept) <= budget
    assert len({n.node.text for n in kept}) == len(kept)
    assert sum(bool(n.node.metadata.get(TRUNCATED_KEY)) for n in kept) <= 1
    assert "kb/coffee_roasting_copy.txt" not in sources(kept)


def test_keep_order_returns_the_retrievers_order() -> None:
    nodes = retrieve()
    shuffled = [nodes[i] for i in (7, 0, 5, 3, 1, 4, 2, 6, *range(8, 20))]
    best = TokenBudgetPostprocessor(budget_tokens=500, model=MODEL).postprocess_nodes(shuffled)
    ordered = TokenBudgetPostprocessor(
        budget_tokens=500, model=MODEL, keep_order=True
    ).postprocess_nodes(shuffled)
    assert sources(best) == TOP
    # input order: printing_press, roasting, decaf, brewing, copy, espresso, ...
    assert sources(ordered) == [
        "kb/coffee_roasting.txt",
        "kb/decaf.txt",
        "kb/coffee_brewing.txt",
        "kb/espresso.txt",
    ]
    assert [n.node.node_id for n in ordered] != [n.node.node_id for n in best]


def test_without_scores_the_retrievers_order_is_the_ranking() -> None:
    nodes = [NodeWithScore(node=n.node) for n in reversed(retrieve())]
    kept = TokenBudgetPostprocessor(budget_tokens=300, model=MODEL).postprocess_nodes(nodes)
    assert sources(kept)[:2] == ["kb/roman_aqueducts.txt", "kb/sleep_hygiene.txt"]
    assert llm_tokens(kept) <= 300


def test_query_bundle_query_string_or_none_give_the_same_nodes() -> None:
    nodes = retrieve()
    post = TokenBudgetPostprocessor(budget_tokens=400, model=MODEL)
    plain = post.postprocess_nodes(nodes)
    assert sources(post.postprocess_nodes(nodes, query_str=QUESTION)) == sources(plain)
    bundle = QueryBundle(QUESTION)
    assert sources(post.postprocess_nodes(nodes, query_bundle=bundle)) == sources(plain)
    assert [n.node.text for n in post.postprocess_nodes(nodes, bundle)] == [
        n.node.text for n in plain
    ]


def test_metadata_mode_none_counts_the_text_alone() -> None:
    nodes = retrieve()
    with_meta = TokenBudgetPostprocessor(budget_tokens=500, model=MODEL).postprocess_nodes(nodes)
    text_only = TokenBudgetPostprocessor(
        budget_tokens=500, model=MODEL, metadata_mode=MetadataMode.NONE
    ).postprocess_nodes(nodes)
    assert llm_tokens(text_only, MetadataMode.NONE) <= 500
    assert llm_tokens(text_only, MetadataMode.NONE) > llm_tokens(with_meta, MetadataMode.NONE)


def test_a_cut_node_keeps_ids_relationships_and_char_offsets() -> None:
    source = RelatedNodeInfo(node_id="doc-1")
    long_text = " ".join(f"Sentence number {i} says something new." for i in range(60))
    node = TextNode(
        id_="n-1",
        text=long_text,
        metadata={"source": "kb/long.txt", "page": 3},
        excluded_llm_metadata_keys=["page"],
        relationships={NodeRelationship.SOURCE: source},
        start_char_idx=1000,
        end_char_idx=1000 + len(long_text),
    )
    (cut,) = TokenBudgetPostprocessor(budget_tokens=60).postprocess_nodes(
        [NodeWithScore(node=node, score=0.5)]
    )
    assert isinstance(cut.node, TextNode)
    assert cut.node.node_id == "n-1"
    assert cut.node.ref_doc_id == "doc-1"
    assert cut.node.metadata == {"source": "kb/long.txt", "page": 3, TRUNCATED_KEY: True}
    assert cut.node.excluded_llm_metadata_keys == ["page", TRUNCATED_KEY]
    assert node.excluded_llm_metadata_keys == ["page"]
    assert cut.node.start_char_idx == 1000
    assert cut.node.end_char_idx == 1000 + len(cut.node.text)
    assert COUNTER.count(cut.node.get_content(MetadataMode.LLM)) <= 60
    assert cut.node.text.endswith("new.")


def test_a_multimodal_node_is_cut_through_its_text_resource() -> None:
    text = " ".join(f"Point {i} of the manual explains a setting." for i in range(50))
    node = Node(id_="m-1", text_resource=MediaResource(text=text), metadata={"source": "m"})
    (cut,) = TokenBudgetPostprocessor(budget_tokens=50).postprocess_nodes(
        [NodeWithScore(node=node, score=1.0)]
    )
    assert isinstance(cut.node, Node)
    content = cut.node.get_content(MetadataMode.NONE)
    assert text.startswith(content)
    assert 0 < COUNTER.count(cut.node.get_content(MetadataMode.LLM)) <= 50
    assert node.get_content(MetadataMode.NONE) == text


def test_outside_a_task_it_trims_by_its_own_budget_and_records_nothing() -> None:
    kept = TokenBudgetPostprocessor(budget_tokens=300, model=MODEL).postprocess_nodes(retrieve())
    assert 0 < llm_tokens(kept) <= 300
    with pytest.raises(ag.PolicyError, match="context_budget_tokens") as info:
        TokenBudgetPostprocessor().postprocess_nodes(retrieve())
    assert "TokenBudgetPostprocessor" in str(info.value)


def test_with_a_guard_and_no_current_task_the_trim_is_reported_on_a_task_of_its_own() -> None:
    g = ag.Guard(ag.Policy(context_budget_tokens=300), traces="memory")
    kept = TokenBudgetPostprocessor(guard=g, model=MODEL).postprocess_nodes(retrieve())
    assert 0 < llm_tokens(kept) <= 300
    (span,) = trim_spans(g)
    (record,) = g.sink.tasks  # type: ignore[attr-defined]
    assert span.task_id == record.task_id
    assert span.attrs["tokens_saved"] > 1500
    assert record.status == "ok"


def test_a_task_of_another_guard_is_not_charged_with_the_trim() -> None:
    mine = ag.Guard(ag.Policy(context_budget_tokens=1000), traces="memory")
    theirs = ag.Guard(ag.Policy(context_budget_tokens=200), traces="memory")
    with theirs.task("theirs") as other:
        kept = TokenBudgetPostprocessor(guard=mine, model=MODEL).postprocess_nodes(retrieve())
        anyone = TokenBudgetPostprocessor(model=MODEL).postprocess_nodes(retrieve())
    assert llm_tokens(kept) > 800  # mine's budget
    assert llm_tokens(anyone) <= 200  # the current task's
    assert other.tokens_saved > 0
    assert len(trim_spans(theirs)) == 1
    assert len(trim_spans(mine)) == 1  # on a task of mine's own, not on theirs


def test_an_explicit_budget_overrides_the_policy() -> None:
    g = ag.Guard(ag.Policy(context_budget_tokens=3000), traces="memory")
    with g.task("explicit"):
        kept = TokenBudgetPostprocessor(budget_tokens=250, model=MODEL).postprocess_nodes(
            retrieve()
        )
    assert llm_tokens(kept) <= 250
    (span,) = trim_spans(g)
    assert span.attrs["budget_tokens"] == 250


async def test_async_postprocessing_records_on_the_callers_task() -> None:
    g = ag.Guard(ag.Policy(context_budget_tokens=500), traces="memory")
    post = TokenBudgetPostprocessor(guard=g, model=MODEL)
    async with g.task("async") as task:
        kept = await post.apostprocess_nodes(retrieve(), query_str=QUESTION)
        again = await post.apostprocess_nodes(retrieve())
    assert sources(kept) == sources(again) == TOP
    assert len(trim_spans(g)) == 2
    assert {s.task_id for s in trim_spans(g)} == {task.id}
    assert task.tokens_saved == 2 * trim_spans(g)[0].attrs["tokens_saved"]


def test_the_trace_stores_no_text(tmp_path: Path) -> None:
    db = tmp_path / "trace.db"
    g = ag.Guard(ag.Policy(context_budget_tokens=300), traces=str(db))
    nodes = retrieve()
    with g.task("private"):
        TokenBudgetPostprocessor(model=MODEL).postprocess_nodes(nodes)
    g.close()
    with sqlite3.connect(db) as conn:
        tables = [r[0] for r in conn.execute("select name from sqlite_master where type='table'")]
        dump = "\n".join(str(row) for t in tables for row in conn.execute(f"select * from {t}"))
    assert "tokens_saved" in dump
    for n in nodes:
        for sentence in n.node.text.split(". ")[:2]:
            assert sentence[:40] not in dump
    assert "kb/" not in dump


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("budget_tokens", -1),
        ("budget_tokens", True),
        ("budget_tokens", 12.5),
        ("near_duplicate_threshold", 0),
        ("near_duplicate_threshold", 1.5),
        ("min_cut_tokens", -3),
        ("separator_tokens", "1"),
        ("keep_order", "yes"),
        ("metadata_mode", "headers"),
        ("guard", "my-guard"),
    ],
)
def test_bad_arguments_name_the_field_and_the_value(field: str, value: Any) -> None:
    with pytest.raises(ValidationError) as info:
        TokenBudgetPostprocessor(**{field: value})
    message = str(info.value)
    assert field in message
    assert repr(value) in message or str(value) in message


def test_items_that_are_not_nodes_with_scores_are_refused() -> None:
    node = TextNode(text="A fact.")
    with pytest.raises(TypeError, match=r"nodes\[0\]"):
        TokenBudgetPostprocessor(budget_tokens=10).trim([node])  # type: ignore[list-item]


def test_a_custom_text_template_with_a_tail_is_counted_around_the_text() -> None:
    template = "<document>\n{metadata_str}\n---\n{content}\n</document>"
    nodes = [
        NodeWithScore(
            node=TextNode(text=n.node.text, metadata=dict(n.node.metadata), text_template=template),
            score=n.score,
        )
        for n in retrieve()
    ]
    cut_seen = False
    for budget in range(40, 1200, 37):
        kept = TokenBudgetPostprocessor(budget_tokens=budget, model=MODEL).postprocess_nodes(nodes)
        assert llm_tokens(kept) <= budget
        for n in kept:
            assert n.node.get_content(MetadataMode.LLM).endswith("</document>")
        cut_seen = cut_seen or any(n.node.metadata.get(TRUNCATED_KEY) for n in kept)
    assert cut_seen
