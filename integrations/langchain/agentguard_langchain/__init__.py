"""agentguard for LangChain.

Names are imported lazily, so importing the package does not import LangChain's agent
machinery until it is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "AgentGuardCallbackHandler": "_callbacks",
    "AsyncAgentGuardCallbackHandler": "_callbacks",
    "AgentGuardMiddleware": "_middleware",
    "BudgetedChatModel": "_chat_model",
    "AgentGuardCompressor": "_compress",
    "trim_documents": "_compress",
}

__all__ = [
    "AgentGuardCallbackHandler",
    "AgentGuardCompressor",
    "AgentGuardMiddleware",
    "AsyncAgentGuardCallbackHandler",
    "BudgetedChatModel",
    "__version__",
    "trim_documents",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'agentguard_langchain' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"agentguard_langchain.{module}"), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # pragma: no cover
    from agentguard_langchain._callbacks import (
        AgentGuardCallbackHandler,
        AsyncAgentGuardCallbackHandler,
    )
    from agentguard_langchain._chat_model import BudgetedChatModel
    from agentguard_langchain._compress import AgentGuardCompressor, trim_documents
    from agentguard_langchain._middleware import AgentGuardMiddleware
