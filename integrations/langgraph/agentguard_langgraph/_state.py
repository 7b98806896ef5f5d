"""The graph-state keys that carry a run's spend through checkpoints."""

from __future__ import annotations

import operator
from collections.abc import Mapping
from decimal import Decimal
from typing import Annotated, Final

from typing_extensions import TypedDict  # the one LangGraph's MessagesState uses

__all__ = [
    "COST_KEY",
    "DECISIONS_KEY",
    "INPUT_TOKENS_KEY",
    "MODEL_CALLS_KEY",
    "OUTPUT_TOKENS_KEY",
    "RETRIES_KEY",
    "STEPS_KEY",
    "TOKENS_KEY",
    "TOOL_CALLS_BY_NAME_KEY",
    "TOOL_CALLS_KEY",
    "BudgetState",
    "add_counts",
]

COST_KEY: Final = "agentguard_cost_usd"
TOKENS_KEY: Final = "agentguard_tokens"
INPUT_TOKENS_KEY: Final = "agentguard_input_tokens"
OUTPUT_TOKENS_KEY: Final = "agentguard_output_tokens"
MODEL_CALLS_KEY: Final = "agentguard_model_calls"
TOOL_CALLS_KEY: Final = "agentguard_tool_calls"
TOOL_CALLS_BY_NAME_KEY: Final = "agentguard_tool_calls_by_name"
RETRIES_KEY: Final = "agentguard_retries"
STEPS_KEY: Final = "agentguard_steps"
DECISIONS_KEY: Final = "agentguard_decisions"


def add_counts(left: Mapping[str, int], right: Mapping[str, int]) -> dict[str, int]:
    """The reducer of per-name counts: counts of the same name add up.

    Example:
        >>> add_counts({"search": 2}, {"search": 1, "refund": 1})
        {'search': 3, 'refund': 1}
    """
    out = dict(left)
    for name, n in right.items():
        out[name] = out.get(name, 0) + n
    return out


class BudgetState(TypedDict, total=False):
    """State keys holding what a thread has spent; mix them into your graph's state.

    Every key has an adding reducer, so parallel nodes and ``Send`` branches each add their
    own share, and the totals survive ``InMemorySaver`` / ``SqliteSaver`` checkpoints
    (``Decimal`` round-trips exactly). A :class:`~agentguard_langgraph.GraphGuard` with
    ``budget="thread"`` reads them back when a thread resumes, so the thread continues
    against everything it already spent: money, tokens (total, input, output), model calls,
    tool calls (in total and per tool), retries and agent steps.

    Example:
        >>> from langgraph.graph import MessagesState
        >>> from agentguard_langgraph import BudgetState
        >>> class State(MessagesState, BudgetState):
        ...     pass
        >>> sorted(k for k in State.__annotations__ if k.startswith("agentguard_"))[:2]
        ['agentguard_cost_usd', 'agentguard_decisions']
    """

    agentguard_cost_usd: Annotated[Decimal, operator.add]
    agentguard_tokens: Annotated[int, operator.add]
    agentguard_input_tokens: Annotated[int, operator.add]
    agentguard_output_tokens: Annotated[int, operator.add]
    agentguard_model_calls: Annotated[int, operator.add]
    agentguard_tool_calls: Annotated[int, operator.add]
    agentguard_tool_calls_by_name: Annotated[dict[str, int], add_counts]
    agentguard_retries: Annotated[int, operator.add]
    agentguard_steps: Annotated[int, operator.add]
    # non-trivial decisions, "<kind>:<action>" (e.g. "model:downgrade", "step:finish")
    agentguard_decisions: Annotated[list[str], operator.add]
