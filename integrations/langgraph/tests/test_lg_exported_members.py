"""The public surface of agentguard_langgraph is pinned: adding or removing a name is a
deliberate change."""

from __future__ import annotations

import subprocess
import sys

import pytest

import agentguard_langgraph

EXPECTED = {
    "BudgetState",
    "GraphGuard",
    "GraphSpend",
    "GuardedGraph",
    "Route",
    "__version__",
    "add_spend",
}

GRAPH_GUARD_API = {
    "bind", "branch", "chat_model", "finish_node", "node", "path_map", "route", "tool_node",
}  # fmt: skip


def test_all_is_pinned() -> None:
    assert set(agentguard_langgraph.__all__) == EXPECTED


def test_every_name_resolves() -> None:
    for name in agentguard_langgraph.__all__:
        assert getattr(agentguard_langgraph, name) is not None


def test_graph_guard_public_methods_are_pinned() -> None:
    public = {n for n in vars(agentguard_langgraph.GraphGuard) if not n.startswith("_")}
    assert public == GRAPH_GUARD_API


def test_budget_state_keys_are_pinned() -> None:
    assert set(agentguard_langgraph.BudgetState.__annotations__) == {"agentguard"}
    assert set(agentguard_langgraph.GraphSpend.__annotations__) == {
        "cost_usd",
        "tokens",
        "input_tokens",
        "output_tokens",
        "model_calls",
        "tool_calls",
        "tool_calls_by_name",
        "retries",
        "steps",
        "decisions",
    }


def test_unknown_attribute() -> None:
    with pytest.raises(AttributeError, match="NoSuchThing"):
        agentguard_langgraph.NoSuchThing  # type: ignore[attr-defined]  # noqa: B018


def test_import_is_lazy() -> None:
    """`import agentguard_langgraph` does not import LangGraph until a name is used."""
    code = (
        "import sys, agentguard_langgraph\n"
        "print(','.join(m for m in ('langgraph', 'langchain_core') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
