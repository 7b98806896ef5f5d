"""TokenBudgetPostprocessor charges each node its own metadata header, counted only when reached."""

from __future__ import annotations

from llama_index.core.schema import MetadataMode, NodeWithScore, TextNode
from rag_pipeline import MODEL, retrieve

import agentguard as ag
from agentguard_llamaindex import TokenBudgetPostprocessor

COUNTER = ag.counter_for(MODEL)


def llm_tokens(nodes: list[NodeWithScore]) -> int:
    """Tokens of the kept nodes as the LLM reads them."""
    return sum(COUNTER.count(n.node.get_content(MetadataMode.LLM)) for n in nodes)


class CountingValue(str):
    """A metadata value that counts how often LlamaIndex renders it into a header."""

    renders = 0

    def __str__(self) -> str:
        CountingValue.renders += 1
        return str.__str__(self)

    def __format__(self, spec: str) -> str:
        CountingValue.renders += 1
        return str.__format__(self, spec)


def test_each_node_is_charged_its_own_header_and_unreached_headers_are_not_counted() -> None:
    nodes = retrieve()
    budget = 700
    plain = TokenBudgetPostprocessor(budget_tokens=budget, model=MODEL).postprocess_nodes(nodes)
    # The last-ranked node gets a huge header: charged to every kept node (the largest header),
    # it would crowd the others out; charged to itself, it changes nothing, as that node is
    # never reached. Its header is not even rendered.
    huge = CountingValue(" ".join(["a long provenance note"] * 60))
    last = nodes[-1]
    heavy = TextNode(
        id_=last.node.node_id, text=last.node.text, metadata={**last.node.metadata, "note": huge}
    )
    assert COUNTER.count(heavy.get_metadata_str(MetadataMode.LLM)) > 200
    CountingValue.renders = 0
    varied = [*nodes[:-1], NodeWithScore(node=heavy, score=last.score)]
    kept = TokenBudgetPostprocessor(budget_tokens=budget, model=MODEL).postprocess_nodes(varied)
    assert [n.node.get_content() for n in kept] == [n.node.get_content() for n in plain]
    assert CountingValue.renders == 0
    assert llm_tokens(kept) <= budget
    # Ranked first, the same node is reached: its header is counted and charged to it alone.
    first = [NodeWithScore(node=heavy, score=100.0), *nodes[:-1]]
    kept = TokenBudgetPostprocessor(budget_tokens=budget, model=MODEL).postprocess_nodes(first)
    assert CountingValue.renders > 0
    assert kept[0].node is heavy
    assert llm_tokens(kept) <= budget
    assert len(kept) >= 2
