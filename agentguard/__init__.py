"""agentguard: cost control for agentic and RAG workflows.

Meter every model call, tool call, retry and retrieval of a task; enforce per-task and
per-team ceilings atomically; trim retrieved context; cap loops; downgrade to a cheaper model
near the ceiling and finish gracefully at it; record per-task cost traces.

Example:
    >>> import agentguard as ag
    >>> guard = ag.Guard(ag.Policy(max_cost_usd="0.25", on_limit="finish"), traces=False)
    >>> with guard.task("ticket-42", feature="support", team="cx") as task:
    ...     call = task.start_model_call("gpt-4o-mini", input_tokens=900, max_tokens=300)
    ...     _ = call.end({"prompt_tokens": 900, "completion_tokens": 120})
    >>> task.cost_usd
    Decimal('0.000207000')

Names are imported lazily on first use, so ``import agentguard`` stays cheap: pydantic,
structlog, genai-prices and tiktoken load only when the first guard is built.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> private module that defines it
_EXPORTS: dict[str, str] = {
    "AgentGuardError": "_errors",
    "BudgetExceeded": "_errors",
    "InvalidUsage": "_errors",
    "PolicyError": "_errors",
    "StoreError": "_errors",
    "UnknownModelError": "_errors",
    "Usage": "_usage",
    "Policy": "_policy",
    "Downgrade": "_policy",
    "Budget": "_policy",
    "Decision": "_decide",
    "Spent": "_decide",
    "Headroom": "_decide",
    "CallRequest": "_decide",
    "decide_model_call": "_decide",
    "decide_tool_call": "_decide",
    "decide_retry": "_decide",
    "decide_step": "_decide",
    "BudgetStore": "_store",
    "BudgetLine": "_store",
    "Balance": "_store",
    "MemoryStore": "_store",
    "RedisStore": "_redis_store",
    "Guard": "_guard",
    "Task": "_guard",
    "ModelCall": "_guard",
    "ToolCall": "_guard",
    "DecisionRecord": "_guard",
    "current_task": "_guard",
    "PriceBook": "_pricing",
    "PriceOverride": "_pricing",
    "ModelRates": "_pricing",
    "TokenCounter": "_tokens",
    "counter_for": "_tokens",
    "Chunk": "_trim",
    "TrimResult": "_trim",
    "trim_chunks": "_trim",
    "Span": "_trace",
    "TaskRecord": "_trace",
    "TraceSink": "_trace",
    "SQLiteSink": "_sinks",
    "JSONLSink": "_sinks",
    "MemorySink": "_sinks",
    "MultiSink": "_sinks",
    "NullSink": "_sinks",
    "OTelSink": "_otel",
    "Alert": "_alerts",
    "Alerts": "_alerts",
    "RateRule": "_alerts",
    "Webhook": "_alerts",
    "Forecast": "_forecast",
    "forecast": "_forecast",
    "Efficiency": "_efficiency",
    "efficiency": "_efficiency",
    "ReplayReport": "_replay",
    "replay": "_replay",
}

__all__ = [
    "AgentGuardError",
    "Alert",
    "Alerts",
    "Balance",
    "Budget",
    "BudgetExceeded",
    "BudgetLine",
    "BudgetStore",
    "CallRequest",
    "Chunk",
    "Decision",
    "DecisionRecord",
    "Downgrade",
    "Efficiency",
    "Forecast",
    "Guard",
    "Headroom",
    "InvalidUsage",
    "JSONLSink",
    "MemorySink",
    "MemoryStore",
    "ModelCall",
    "ModelRates",
    "MultiSink",
    "NullSink",
    "OTelSink",
    "Policy",
    "PolicyError",
    "PriceBook",
    "PriceOverride",
    "RateRule",
    "RedisStore",
    "ReplayReport",
    "SQLiteSink",
    "Span",
    "Spent",
    "StoreError",
    "Task",
    "TaskRecord",
    "TokenCounter",
    "ToolCall",
    "TraceSink",
    "TrimResult",
    "UnknownModelError",
    "Usage",
    "Webhook",
    "__version__",
    "counter_for",
    "current_task",
    "decide_model_call",
    "decide_retry",
    "decide_step",
    "decide_tool_call",
    "efficiency",
    "forecast",
    "replay",
    "trim_chunks",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'agentguard' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"agentguard.{module}"), name)
    globals()[name] = value  # next access is a plain global lookup
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from agentguard._alerts import Alert, Alerts, RateRule, Webhook
    from agentguard._decide import (
        CallRequest,
        Decision,
        Headroom,
        Spent,
        decide_model_call,
        decide_retry,
        decide_step,
        decide_tool_call,
    )
    from agentguard._efficiency import Efficiency, efficiency
    from agentguard._errors import (
        AgentGuardError,
        BudgetExceeded,
        InvalidUsage,
        PolicyError,
        StoreError,
        UnknownModelError,
    )
    from agentguard._forecast import Forecast, forecast
    from agentguard._guard import DecisionRecord, Guard, ModelCall, Task, ToolCall, current_task
    from agentguard._otel import OTelSink
    from agentguard._policy import Budget, Downgrade, Policy
    from agentguard._pricing import ModelRates, PriceBook, PriceOverride
    from agentguard._redis_store import RedisStore
    from agentguard._replay import ReplayReport, replay
    from agentguard._sinks import JSONLSink, MemorySink, MultiSink, NullSink, SQLiteSink
    from agentguard._store import Balance, BudgetLine, BudgetStore, MemoryStore
    from agentguard._tokens import TokenCounter, counter_for
    from agentguard._trace import Span, TaskRecord, TraceSink
    from agentguard._trim import Chunk, TrimResult, trim_chunks
    from agentguard._usage import Usage
