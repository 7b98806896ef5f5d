"""The graph-state key that carries a run's spend through checkpoints."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Annotated, Any, Final

from typing_extensions import TypedDict  # the one LangGraph's MessagesState uses

__all__ = [
    "SPEND_KEY",
    "BudgetState",
    "GraphSpend",
    "add_counts",
    "add_spend",
    "empty_spend",
]

#: The state key :class:`BudgetState` declares.
SPEND_KEY: Final = "agentguard"


class GraphSpend(TypedDict, total=False):
    """What a thread has spent, as kept in the graph state under ``"agentguard"``.

    Read it as ``state["agentguard"]["cost_usd"]``: once anything is recorded every field is
    present (zeros, an empty dict and list where nothing was spent).
    """

    cost_usd: Decimal
    tokens: int
    input_tokens: int
    output_tokens: int
    model_calls: int
    tool_calls: int
    tool_calls_by_name: dict[str, int]
    retries: int
    steps: int
    # non-trivial decisions, "<kind>:<action>" (e.g. "model:downgrade", "step:finish")
    decisions: list[str]


def empty_spend() -> GraphSpend:
    """A :class:`GraphSpend` of nothing spent (every field present)."""
    return {
        "cost_usd": Decimal(0),
        "tokens": 0,
        "input_tokens": 0,
        "output_tokens": 0,
        "model_calls": 0,
        "tool_calls": 0,
        "tool_calls_by_name": {},
        "retries": 0,
        "steps": 0,
        "decisions": [],
    }


def add_counts(left: Mapping[str, int], right: Mapping[str, int]) -> dict[str, int]:
    """Per-name counts added up: counts of the same name add.

    Example:
        >>> add_counts({"search": 2}, {"search": 1, "refund": 1})
        {'search': 3, 'refund': 1}
    """
    out = dict(left)
    for name, n in right.items():
        out[name] = out.get(name, 0) + n
    return out


def add_spend(left: Mapping[str, Any] | None, right: Mapping[str, Any] | None) -> GraphSpend:
    """The reducer of the ``"agentguard"`` key: each field of ``right`` adds to ``left``'s
    (money and counts add, per-tool counts add per tool, decisions append), so parallel nodes
    and ``Send`` branches each add their own share. The result has every field.

    Example:
        >>> from decimal import Decimal
        >>> s = add_spend({}, {"cost_usd": Decimal("0.002"), "tool_calls_by_name": {"search": 1}})
        >>> s = add_spend(s, {"cost_usd": Decimal("0.001"), "tool_calls_by_name": {"search": 2}})
        >>> s["cost_usd"], s["tool_calls_by_name"], s["steps"]
        (Decimal('0.003'), {'search': 3}, 0)
    """
    out: dict[str, Any] = dict(left) if left else {}
    if not _FIELDS.issubset(out):  # the first record (or a partial value): every field present
        out = {**empty_spend(), **out}
    if right:
        # LangGraph calls this for every write of the key (and again for each fresh read of
        # the state in an edge): the per-tool counts are added inline, as add_counts does
        for name, value in right.items():
            if name == "tool_calls_by_name":
                counts = dict(out[name])
                for tool, n in value.items():
                    counts[tool] = counts.get(tool, 0) + n
                out[name] = counts
            elif name in out:
                out[name] = out[name] + value
            else:  # a field this version does not know: kept as given
                out[name] = value
    return out  # type: ignore[return-value]


_FIELDS: Final = frozenset(GraphSpend.__annotations__)


class BudgetState(TypedDict, total=False):
    """The state key holding what a thread has spent; mix it into your graph's state.

    ``"agentguard"`` is a :class:`GraphSpend` with an adding reducer (:func:`add_spend`), so
    parallel nodes and ``Send`` branches each add their own share, and the totals survive
    ``InMemorySaver`` / ``SqliteSaver`` checkpoints (``Decimal`` round-trips exactly). A
    :class:`~agentguard_langgraph.GraphGuard` with ``budget="thread"`` reads it back when a
    thread resumes, so the thread continues against everything it already spent: money,
    tokens (total, input, output), model calls, tool calls (in total and per tool), retries
    and agent steps. One key, not one per counter: LangGraph keeps a channel per state key,
    and copies and writes each one per step.

    Example:
        >>> from langgraph.graph import MessagesState
        >>> from agentguard_langgraph import BudgetState
        >>> class State(MessagesState, BudgetState):
        ...     pass
        >>> sorted(State.__annotations__)
        ['agentguard', 'messages']
    """

    agentguard: Annotated[GraphSpend, add_spend]
