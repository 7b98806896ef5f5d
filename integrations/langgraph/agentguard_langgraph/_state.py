"""The graph-state keys that carry a run's spend through checkpoints."""

from __future__ import annotations

import operator
from decimal import Decimal
from typing import Annotated, Final

from typing_extensions import TypedDict  # the one LangGraph's MessagesState uses

__all__ = [
    "COST_KEY",
    "DECISIONS_KEY",
    "MODEL_CALLS_KEY",
    "STEPS_KEY",
    "TOKENS_KEY",
    "TOOL_CALLS_KEY",
    "BudgetState",
]

COST_KEY: Final = "agentguard_cost_usd"
TOKENS_KEY: Final = "agentguard_tokens"
MODEL_CALLS_KEY: Final = "agentguard_model_calls"
TOOL_CALLS_KEY: Final = "agentguard_tool_calls"
STEPS_KEY: Final = "agentguard_steps"
DECISIONS_KEY: Final = "agentguard_decisions"


class BudgetState(TypedDict, total=False):
    """State keys holding what a thread has spent; mix them into your graph's state.

    Every key has an adding reducer, so parallel nodes and ``Send`` branches each add their
    own share, and the totals survive ``InMemorySaver`` / ``SqliteSaver`` checkpoints
    (``Decimal`` round-trips exactly). A :class:`~agentguard_langgraph.GraphGuard` with
    ``budget="thread"`` reads them back when a thread resumes, so the thread continues
    against what it already spent.

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
    agentguard_model_calls: Annotated[int, operator.add]
    agentguard_tool_calls: Annotated[int, operator.add]
    agentguard_steps: Annotated[int, operator.add]
    # non-trivial decisions, "<kind>:<action>" (e.g. "model:downgrade", "step:finish")
    agentguard_decisions: Annotated[list[str], operator.add]
