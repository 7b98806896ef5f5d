"""Context trimming the LlamaIndex way: a node postprocessor.

:class:`TokenBudgetPostprocessor` fits retrieved :class:`~llama_index.core.schema.NodeWithScore`
lists into a token budget with the core trimmer (rank by score, drop duplicates and
near-duplicates, keep the best that fit, cut the last one at a sentence boundary). It sits in
any ``node_postprocessors=[...]`` list, before or after LlamaIndex's own postprocessors.

What is counted is what the LLM reads: each node's text, plus the metadata header LlamaIndex
puts in front of it (``node.get_content(metadata_mode)``, ``MetadataMode.LLM`` by default, as
the response synthesizers use). Duplicates are judged on the text alone, so the same passage
filed under two paths is still a duplicate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llama_index.core.bridge.pydantic import Field
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import (
    DEFAULT_TEXT_NODE_TMPL,
    BaseNode,
    MetadataMode,
    NodeWithScore,
    QueryBundle,
    TextNode,
)

from agentguard import (
    Chunk,
    Guard,
    Policy,
    PolicyError,
    TokenCounter,
    TrimResult,
    counter_for,
    current_task,
)
from agentguard import trim_chunks as _trim_chunks

__all__ = ["TRUNCATED_KEY", "TokenBudgetPostprocessor"]

#: Metadata key set to ``True`` on a node whose text the trimmer cut. It is excluded from the
#: LLM's and the embedding's view of the node, so marking a node does not change what it costs.
TRUNCATED_KEY = "agentguard_truncated"

# Stands for the node's text when a template is rendered to measure the metadata around it.
_SLOT = "\x00agentguard-content\x00"


class TokenBudgetPostprocessor(BaseNodePostprocessor):
    """Trims retrieved nodes to the task's context budget.

    Nodes are ranked by score (higher is better; nodes without a score come after the scored
    ones, in retriever order). Exact and near-duplicates of a kept node are dropped; the best
    nodes that fit are kept; the first one that does not fit is cut at a sentence boundary
    (returned as a copy with ``metadata["agentguard_truncated"] = True`` and everything else
    kept: id, metadata, relationships, score) or dropped. Kept nodes come back best first, or
    in retriever order with ``keep_order=True``; uncut ones are the very objects passed in.

    The budget is ``budget_tokens`` if set, else the current task's policy
    ``context_budget_tokens``, else ``guard``'s. It covers every kept node as the LLM reads it
    (``node.get_content(metadata_mode)``) plus ``separator_tokens`` per node: each kept node's
    text is counted exactly and its own metadata header is charged to it (plus one token for
    the seam), so the kept context never exceeds the budget. Headers are counted only for the
    nodes the trimmer reaches (not for duplicates, nor for nodes ranked after the budget is
    full).

    Inside a task of ``guard`` (or, with no ``guard``, of any guard) the trim is recorded on
    that task: a ``trim`` span with the tokens and dollars saved (dollars need ``model``, the
    model that will read the context), and a ``trim`` decision. With ``guard`` set and none of
    its tasks current, the trim is recorded on a task of its own on ``guard``. With neither,
    the nodes are trimmed to ``budget_tokens`` and nothing is recorded. No text is recorded.

    Args:
        guard: the guard whose tasks record the trim (``None``: whichever task is current).
        budget_tokens: the context budget in tokens, overriding the policy's.
        model: the model that reads the context: its tokenizer counts, its input price values
            the tokens saved.
        keep_order: return kept nodes in retriever order instead of best first.
        dedupe: drop exact and near-duplicate nodes.
        near_duplicate_threshold: similarity, in (0, 1], from which a node is a near-duplicate.
        cut_last: cut the first node that does not fit instead of dropping it.
        min_cut_tokens: the fewest tokens a cut node may keep.
        separator_tokens: tokens the prompt spends joining two nodes.
        metadata_mode: which metadata the LLM sees (``MetadataMode.LLM``); ``NONE`` counts
            the text alone.

    Example:
        >>> import agentguard as ag
        >>> from llama_index.core.schema import NodeWithScore, TextNode
        >>> from agentguard_llamaindex import TokenBudgetPostprocessor
        >>> guard = ag.Guard(ag.Policy(context_budget_tokens=13), traces=False)
        >>> nodes = [
        ...     NodeWithScore(node=TextNode(id_="a", text="Refunds take five days."), score=0.9),
        ...     NodeWithScore(node=TextNode(id_="b", text="REFUNDS take five days."), score=0.8),
        ...     NodeWithScore(node=TextNode(id_="c", text="Parcels ship from Lyon. By road."),
        ...                   score=0.7),
        ... ]
        >>> with guard.task("rag-1") as task:
        ...     kept = TokenBudgetPostprocessor(min_cut_tokens=2).postprocess_nodes(
        ...         nodes, query_str="how long do refunds take?")
        >>> [(n.node_id, n.text, n.metadata) for n in kept]
        [('a', 'Refunds take five days.', {}), ('c', 'Parcels ship from Lyon.', {'agentguard_truncated': True})]
        >>> task.tokens_saved
        9
    """  # noqa: E501 - the doctest output is one line

    guard: Guard | None = Field(default=None, exclude=True)
    budget_tokens: int | None = Field(default=None, ge=0, strict=True)
    model: str | None = None
    keep_order: bool = Field(default=False, strict=True)
    dedupe: bool = Field(default=True, strict=True)
    near_duplicate_threshold: float = Field(default=0.85, gt=0.0, le=1.0, strict=True)
    cut_last: bool = Field(default=True, strict=True)
    min_cut_tokens: int = Field(default=16, ge=0, strict=True)
    separator_tokens: int = Field(default=0, ge=0, strict=True)
    metadata_mode: MetadataMode = MetadataMode.LLM

    @classmethod
    def class_name(cls) -> str:
        return "TokenBudgetPostprocessor"

    def _postprocess_nodes(
        self,
        nodes: list[NodeWithScore],
        query_bundle: QueryBundle | None = None,
    ) -> list[NodeWithScore]:
        """Trim ``nodes`` (see the class docstring); the query plays no part."""
        return self.trim(nodes)

    async def _apostprocess_nodes(
        self,
        nodes: list[NodeWithScore],
        query_bundle: QueryBundle | None = None,
    ) -> list[NodeWithScore]:
        """Like :meth:`_postprocess_nodes`, on the caller's task (no thread hop: the trim is
        CPU-bound and short, and the current task travels in the caller's context)."""
        return self.trim(nodes)

    def trim(self, nodes: Sequence[NodeWithScore]) -> list[NodeWithScore]:
        """Trim ``nodes`` to the budget and record the trim (see the class docstring).

        Raises:
            PolicyError: when no budget is known (no ``budget_tokens``, and no policy of the
                current task or of ``guard`` sets ``context_budget_tokens``).
            TypeError: when an item is not a ``NodeWithScore``.
        """
        if not nodes:
            return []
        counter = counter_for(self.model)
        chunks: list[Chunk] = []
        for i, item in enumerate(nodes):
            if not isinstance(item, NodeWithScore):
                raise TypeError(f"nodes[{i}] must be a NodeWithScore, got {type(item)!r}")
            node = item.node
            # TextNode.get_content(NONE) is its text; other node types render it themselves
            text = node.text if isinstance(node, TextNode) else node.get_content(MetadataMode.NONE)
            chunks.append(Chunk(text, item.score, node.node_id, i))
        options: dict[str, Any] = {
            "keep_order": self.keep_order,
            "dedupe": self.dedupe,
            "near_duplicate_threshold": self.near_duplicate_threshold,
            "cut_last": self.cut_last,
            "min_cut_tokens": self.min_cut_tokens,
            "separator_tokens": self.separator_tokens,
        }
        if self.metadata_mode != MetadataMode.NONE:
            # Each node's header is counted only if the trimmer reaches the node (not for
            # duplicates, nor for nodes ranked after the budget is full).
            def header_tokens(chunk: Chunk) -> int:
                return self._header_tokens(nodes[chunk.index].node, chunk.text, counter)

            options["extra_tokens"] = header_tokens
        task = current_task()
        result: TrimResult
        if task is not None and (self.guard is None or task.guard is self.guard):
            budget = self._budget(task.policy)
            result = task.trim(chunks, budget, model=self.model, **options)
        elif self.guard is not None:
            budget = self._budget(self.guard.policy)
            with self.guard.task(parent=False) as own:
                result = own.trim(chunks, budget, model=self.model, **options)
        else:
            result = _trim_chunks(chunks, self._budget(None), counter, **options)
        out: list[NodeWithScore] = []
        for chunk in result.kept:
            item = nodes[chunk.index]
            out.append(_cut(item, chunk.text) if chunk.truncated else item)
        return out

    def _budget(self, policy: Policy | None) -> int:
        if self.budget_tokens is not None:
            return self.budget_tokens
        budget = policy.context_budget_tokens if policy is not None else None
        if budget is None:
            where = "the current task's policy" if policy is not None else "no task is current"
            raise PolicyError(
                "context_budget_tokens",
                None,
                f"{where}: give TokenBudgetPostprocessor a budget_tokens=, or a guard or task "
                "whose policy sets context_budget_tokens",
            )
        return budget

    def _header_tokens(self, node: BaseNode, text: str, counter: TokenCounter) -> int:
        """Tokens the LLM reads around the node's own text (its metadata header), plus one
        for the seam should the text merge differently with its header; 0 with no header.
        Not called under ``MetadataMode.NONE``."""
        metadata = node.get_metadata_str(self.metadata_mode).strip()
        if not metadata:
            return 0
        template = getattr(node, "text_template", None)
        if template == DEFAULT_TEXT_NODE_TMPL:  # "{metadata_str}\n\n{content}"
            return counter.count(metadata + "\n\n") + 1
        if isinstance(template, str):
            rendered = template.format(content=_SLOT, metadata_str=metadata).strip()
            before, slot, after = rendered.partition(_SLOT)
            if slot:
                return counter.count(before) + counter.count(after) + 1
        # A node type without a text template: what it shows beyond its text is its header.
        content = node.get_content(self.metadata_mode)
        return max(0, counter.count(content) - counter.count(text)) + 1


def _cut(item: NodeWithScore, text: str) -> NodeWithScore:
    """A copy of ``item`` whose node text is ``text``, marked as truncated."""
    node = item.node
    update: dict[str, Any] = {
        "metadata": {**node.metadata, TRUNCATED_KEY: True},
        "excluded_llm_metadata_keys": _with_key(node.excluded_llm_metadata_keys),
        "excluded_embed_metadata_keys": _with_key(node.excluded_embed_metadata_keys),
    }
    copy: BaseNode
    if isinstance(node, TextNode):
        update["text"] = text
        if node.start_char_idx is not None and node.text.startswith(text):
            update["end_char_idx"] = node.start_char_idx + len(text)
        copy = node.model_copy(update=update)
    else:
        copy = node.model_copy(update=update)
        copy.set_content(text)
    return NodeWithScore(node=copy, score=item.score)


def _with_key(keys: list[str]) -> list[str]:
    return list(keys) if TRUNCATED_KEY in keys else [*keys, TRUNCATED_KEY]
