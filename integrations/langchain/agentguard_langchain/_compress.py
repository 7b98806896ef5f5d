"""Context trimming the LangChain way: a document compressor and an LCEL step.

Both fit retrieved :class:`~langchain_core.documents.Document` s into a token budget with the
core trimmer (rank by score, drop duplicates and near-duplicates, keep the best that fit, cut
the last one at a sentence boundary). Inside a task the trim goes through ``task.trim(...)``,
so the task's trace gets a ``trim`` span with the tokens and dollars saved; outside a task
the documents are trimmed the same way and nothing is recorded (no task is opened: trimming
alone spends nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.callbacks import Callbacks
from langchain_core.documents import BaseDocumentCompressor, Document
from langchain_core.runnables import RunnableLambda
from pydantic import ConfigDict, Field

from agentguard import Chunk, Guard, PolicyError, Task, TrimResult, counter_for, current_task
from agentguard import trim_chunks as _trim_chunks

__all__ = ["TRUNCATED_KEY", "AgentGuardCompressor", "trim_documents"]

#: Metadata key set to ``True`` on a document whose text the trimmer cut.
TRUNCATED_KEY = "agentguard_truncated"


class AgentGuardCompressor(BaseDocumentCompressor):
    """Trims retrieved documents to the task's context budget.

    Usable wherever LangChain takes a document compressor (``ContextualCompressionRetriever``
    from ``langchain_classic``, a pipeline of compressors) and directly through
    :meth:`compress_documents`. For LCEL chains see :func:`trim_documents`.

    Documents are ranked by ``metadata["relevance_score"]`` or ``metadata["score"]`` when
    present (higher is better), else kept in retriever order. Duplicates and near-duplicates
    of a kept document are dropped; the best documents that fit are kept; the first one that
    does not fit is cut at a sentence boundary (returned as a new ``Document`` with
    ``metadata["agentguard_truncated"] = True``) or dropped. Kept documents come back best
    first, or in retriever order with ``keep_order=True``; uncut ones are the very objects
    passed in.

    The budget is ``budget_tokens`` if set, else the current task's policy
    ``context_budget_tokens``, else ``guard``'s. Inside a task of ``guard`` (or, with no
    ``guard``, of any guard) the trim is recorded on the task: a ``trim`` span with tokens and
    dollars saved (dollars need ``model``, the model that will read the context). Outside a
    task nothing is recorded.

    Args:
        guard: the guard whose tasks record the trim (``None``: whichever task is current).
        budget_tokens: the context budget in tokens, overriding the policy's.
        model: the model that reads the context: its tokenizer counts, its input price
            values the tokens saved.
        keep_order: return kept documents in retriever order instead of best first.
        dedupe: drop exact and near-duplicate documents.
        near_duplicate_threshold: similarity from which a document is a near-duplicate.
        cut_last: cut the first document that does not fit instead of dropping it.
        min_cut_tokens: the fewest tokens a cut document may keep.
        separator_tokens: tokens the prompt spends joining two documents.

    Example:
        >>> import agentguard as ag
        >>> from langchain_core.documents import Document
        >>> from agentguard_langchain import AgentGuardCompressor
        >>> guard = ag.Guard(ag.Policy(context_budget_tokens=13), traces=False)
        >>> docs = [Document("Refunds take five days."), Document("REFUNDS take five days."),
        ...         Document("Parcels ship from Lyon. They travel by road.")]
        >>> with guard.task("rag-1") as task:
        ...     kept = AgentGuardCompressor(guard=guard, min_cut_tokens=2).compress_documents(
        ...         docs, "how long do refunds take?")
        >>> for d in kept:
        ...     print(d.page_content, d.metadata)
        Refunds take five days. {}
        Parcels ship from Lyon. {'agentguard_truncated': True}
        >>> task.tokens_saved > 0
        True
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    guard: Guard | None = None
    budget_tokens: int | None = Field(default=None, ge=0)
    model: str | None = None
    keep_order: bool = False
    dedupe: bool = True
    near_duplicate_threshold: float = 0.85
    cut_last: bool = True
    min_cut_tokens: int = 16
    separator_tokens: int = 0

    def _task(self) -> Task | None:
        task = current_task()
        if task is None or (self.guard is not None and task.guard is not self.guard):
            return None
        return task

    def _options(self) -> dict[str, Any]:
        return {
            "dedupe": self.dedupe,
            "near_duplicate_threshold": self.near_duplicate_threshold,
            "cut_last": self.cut_last,
            "min_cut_tokens": self.min_cut_tokens,
            "separator_tokens": self.separator_tokens,
        }

    def trim(self, documents: Sequence[Document]) -> list[Document]:
        """Trim ``documents`` (see the class docstring); the query plays no part."""
        if not documents:
            return []
        chunks = [Chunk(d.page_content, _score(d), str(i), i) for i, d in enumerate(documents)]
        task = self._task()
        result: TrimResult
        if task is not None:
            result = task.trim(
                chunks,
                self.budget_tokens,
                model=self.model,
                keep_order=self.keep_order,
                **self._options(),
            )
        else:
            budget = self.budget_tokens
            if budget is None and self.guard is not None:
                budget = self.guard.policy.context_budget_tokens
            if budget is None:
                raise PolicyError(
                    "context_budget_tokens",
                    None,
                    "outside a task, give AgentGuardCompressor a budget_tokens= or a guard "
                    "whose policy sets it",
                )
            result = _trim_chunks(
                chunks,
                budget,
                counter_for(self.model),
                keep_order=self.keep_order,
                **self._options(),
            )
        out: list[Document] = []
        for chunk in result.kept:
            doc = documents[chunk.index]
            if chunk.truncated:
                doc = Document(
                    page_content=chunk.text,
                    metadata={**doc.metadata, TRUNCATED_KEY: True},
                    id=doc.id,
                )
            out.append(doc)
        return out

    def compress_documents(
        self,
        documents: Sequence[Document],
        query: str,
        callbacks: Callbacks | None = None,
    ) -> Sequence[Document]:
        """Trim ``documents`` to the budget (``query`` and ``callbacks`` are not used)."""
        return self.trim(documents)

    async def acompress_documents(
        self,
        documents: Sequence[Document],
        query: str,
        callbacks: Callbacks | None = None,
    ) -> Sequence[Document]:
        """Like :meth:`compress_documents`, on the caller's task (no thread hop: the trim is
        CPU-bound and short, and the current task travels in the caller's context)."""
        return self.trim(documents)


def _score(doc: Document) -> float | None:
    for key in ("relevance_score", "score"):
        value = doc.metadata.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def trim_documents(
    guard: Guard | None = None,
    budget_tokens: int | None = None,
    model: str | None = None,
    **options: Any,
) -> RunnableLambda[Sequence[Document], list[Document]]:
    """An LCEL step that trims a list of documents to the context budget.

    ``retriever | trim_documents(guard, model="gpt-4o-mini") | format_docs``. Same behaviour
    and options as :class:`AgentGuardCompressor` (``keep_order``, ``dedupe``, ``cut_last``,
    ``min_cut_tokens``, ``separator_tokens``, ``near_duplicate_threshold``).

    Args:
        guard: the guard whose tasks record the trim (``None``: whichever task is current).
        budget_tokens: the context budget in tokens (default: the policy's
            ``context_budget_tokens``).
        model: the model that reads the context (tokenizer, price of the tokens saved).
        **options: further :class:`AgentGuardCompressor` fields.

    Example:
        >>> from langchain_core.documents import Document
        >>> from agentguard_langchain import trim_documents
        >>> step = trim_documents(budget_tokens=6)
        >>> [d.page_content for d in step.invoke([Document("One fact."), Document("One fact.")])]
        ['One fact.']
    """
    compressor = AgentGuardCompressor(
        guard=guard, budget_tokens=budget_tokens, model=model, **options
    )

    def _trim(documents: Sequence[Document]) -> list[Document]:
        return compressor.trim(documents)

    async def _atrim(documents: Sequence[Document]) -> list[Document]:
        return compressor.trim(documents)

    return RunnableLambda(_trim, afunc=_atrim, name="agentguard_trim_documents")
