"""agentguard for LangChain.

Names are imported lazily, so importing the package does not import LangChain's agent
machinery until it is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {}

__all__ = ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'agentguard_langchain' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"agentguard_langchain.{module}"), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # pragma: no cover
    pass
