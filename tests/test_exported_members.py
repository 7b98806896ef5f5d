"""The public surface is pinned: adding or removing a name is a deliberate change."""

from __future__ import annotations

import subprocess
import sys

import agentguard

EXPECTED = {
    "AgentGuardError", "Alert", "Alerts", "Balance", "Budget", "BudgetExceeded", "BudgetLine",
    "BudgetStore", "CallRequest", "Chunk", "Decision", "DecisionRecord", "Downgrade", "Efficiency",
    "Forecast", "Guard", "Headroom", "InvalidUsage", "JSONLSink", "MemorySink", "MemoryStore",
    "ModelCall", "ModelRates", "MultiSink", "NullSink", "OTelSink", "Policy", "PolicyError",
    "PriceBook", "PriceOverride", "RateRule", "RedisStore", "ReplayReport", "SQLiteSink", "Span",
    "Spent", "StoreError", "Task", "TaskRecord", "TokenCounter", "ToolCall", "TraceSink",
    "TrimResult", "UnknownModelError", "Usage", "Webhook", "__version__", "counter_for",
    "current_task", "decide_model_call", "decide_retry", "decide_step", "decide_tool_call",
    "efficiency", "forecast", "replay", "trim_chunks",
}  # fmt: skip


def test_all_is_pinned() -> None:
    assert set(agentguard.__all__) == EXPECTED


def test_every_name_resolves() -> None:
    for name in agentguard.__all__:
        assert getattr(agentguard, name) is not None


def test_unknown_attribute() -> None:
    try:
        agentguard.NoSuchThing  # type: ignore[attr-defined]  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("expected AttributeError")


def test_import_is_light() -> None:
    """`import agentguard` loads no framework and none of the heavy dependencies."""
    code = (
        "import sys, agentguard\n"
        "heavy = ['pydantic', 'structlog', 'genai_prices', 'tiktoken', 'sqlite3', 'langchain',"
        " 'langchain_core', 'langgraph', 'llama_index', 'redis', 'opentelemetry']\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_the_core_never_imports_a_framework() -> None:
    """Building a guard and running a task loads no framework either."""
    code = (
        "import sys, agentguard as ag\n"
        "g = ag.Guard(ag.Policy(max_cost_usd='1'), traces='memory')\n"
        "with g.task() as t:\n"
        "    t.start_model_call('gpt-4o', messages=[{'role': 'user', 'content': 'hi'}]).end(None)\n"
        "print(','.join(m for m in sys.modules if m.split('.')[0] in "
        "('langchain', 'langchain_core', 'langgraph', 'llama_index')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_all_matches_the_lazy_export_table() -> None:
    assert set(agentguard.__all__) == {*agentguard._EXPORTS, "__version__"}
