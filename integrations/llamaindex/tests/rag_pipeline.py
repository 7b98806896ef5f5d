"""The RAG pipeline the tests drive: a real ``VectorStoreIndex`` over ``rag_corpus/``.

32 short documents on distinct topics (coffee, volcanoes, bees, trams, ...), read with
``SimpleDirectoryReader``; each carries ``source`` metadata (``kb/<file name>``), which the LLM
sees in front of the text. Among them: ``coffee_roasting_copy.txt`` repeats
``coffee_roasting.txt`` exactly, and ``coffee_roasting_revised.txt`` is a near-duplicate of it
(two words changed). The index embeds with
:class:`agentguard_llamaindex.testing.HashingEmbedding`, so retrieval is deterministic everywhere.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from llama_index.core import SimpleDirectoryReader, VectorStoreIndex
from llama_index.core.schema import NodeWithScore

from agentguard_llamaindex.testing import HashingEmbedding

CORPUS = Path(__file__).resolve().parent / "rag_corpus"
QUESTION = "How does roasting change the flavour of coffee beans?"
MODEL = "gpt-4o-mini"


def load_documents() -> list[Any]:
    """The corpus as LlamaIndex documents, with ``source`` metadata only."""
    reader = SimpleDirectoryReader(
        str(CORPUS), file_metadata=lambda path: {"source": f"kb/{Path(path).name}"}
    )
    return reader.load_data()


@functools.cache
def build_index() -> VectorStoreIndex:
    """The index over the corpus (built once per process; queries do not change it)."""
    return VectorStoreIndex.from_documents(load_documents(), embed_model=HashingEmbedding())


def retrieve(question: str = QUESTION, top_k: int = 20) -> list[NodeWithScore]:
    """The retriever's ``top_k`` nodes for ``question``."""
    return build_index().as_retriever(similarity_top_k=top_k).retrieve(question)


def sources(nodes: list[NodeWithScore]) -> list[str]:
    """The ``source`` of each node, in order."""
    return [str(n.node.metadata["source"]) for n in nodes]
