"""agentguard for LangGraph: budget gates, routing edges, step caps, graceful finish, cost in
graph state and child budgets for subgraphs and ``Send`` fan-out.

Names are imported lazily, so importing the package does not import LangGraph until a name is
used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "GraphGuard": "_gate",
    "Route": "_gate",
    "GuardedGraph": "_run",
    "BudgetState": "_state",
    "GraphSpend": "_state",
    "add_spend": "_state",
}

__all__ = [
    "BudgetState",
    "GraphGuard",
    "GraphSpend",
    "GuardedGraph",
    "Route",
    "__version__",
    "add_spend",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'agentguard_langgraph' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"agentguard_langgraph.{module}"), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # pragma: no cover
    from agentguard_langgraph._gate import GraphGuard, Route
    from agentguard_langgraph._run import GuardedGraph
    from agentguard_langgraph._state import BudgetState, GraphSpend, add_spend
