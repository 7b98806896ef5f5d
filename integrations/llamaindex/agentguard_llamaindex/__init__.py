"""agentguard for LlamaIndex: metering through the instrumentation module, a token-budget node
postprocessor, a budget-aware LLM, and step caps with a graceful finish for workflow agents.

Names are imported lazily, so importing the package does not import LlamaIndex until a name is
used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "AgentGuardEventHandler": "_handler",
    "AgentGuardSpanHandler": "_handler",
    "BudgetRateLimiter": "_handler",
    "Instrumentation": "_handler",
    "instrument": "_handler",
    "BudgetedLLM": "_llm",
    "GuardedFunctionTool": "_agent",
    "GuardedTool": "_agent",
    "guard_agent": "_agent",
    "TokenBudgetPostprocessor": "_postprocess",
}

__all__ = [
    "AgentGuardEventHandler",
    "AgentGuardSpanHandler",
    "BudgetRateLimiter",
    "BudgetedLLM",
    "GuardedFunctionTool",
    "GuardedTool",
    "Instrumentation",
    "TokenBudgetPostprocessor",
    "__version__",
    "guard_agent",
    "instrument",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'agentguard_llamaindex' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"agentguard_llamaindex.{module}"), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # pragma: no cover
    from agentguard_llamaindex._agent import GuardedFunctionTool, GuardedTool, guard_agent
    from agentguard_llamaindex._handler import (
        AgentGuardEventHandler,
        AgentGuardSpanHandler,
        BudgetRateLimiter,
        Instrumentation,
        instrument,
    )
    from agentguard_llamaindex._llm import BudgetedLLM
    from agentguard_llamaindex._postprocess import TokenBudgetPostprocessor
