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
    "TokenBudgetPostprocessor": "_postprocess",
}

__all__ = [
    "TokenBudgetPostprocessor",
    "__version__",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'agentguard_llamaindex' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"agentguard_llamaindex.{module}"), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # pragma: no cover
    from agentguard_llamaindex._postprocess import TokenBudgetPostprocessor
