"""The public surface of agentguard_llamaindex is pinned: adding or removing a name is a
deliberate change."""

from __future__ import annotations

import subprocess
import sys

import pytest

import agentguard_llamaindex

EXPECTED = {
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
}

INSTRUMENTATION_API = {"attached", "detach", "dispatcher", "event_handler", "guard", "rate_limiter",
                       "span_handler"}  # fmt: skip


def test_all_is_pinned() -> None:
    assert set(agentguard_llamaindex.__all__) == EXPECTED


def test_every_name_resolves() -> None:
    for name in agentguard_llamaindex.__all__:
        assert getattr(agentguard_llamaindex, name) is not None


def test_instrumentation_public_members_are_pinned() -> None:
    from llama_index.core.instrumentation import get_dispatcher

    import agentguard as ag

    inst = agentguard_llamaindex.Instrumentation(
        ag.Guard(traces=False),
        get_dispatcher(),
        agentguard_llamaindex._handler._Meter(ag.Guard(traces=False), None, {}),
    )
    public = {n for n in (*vars(type(inst)), *vars(inst)) if not n.startswith("_")}
    assert public == INSTRUMENTATION_API


def test_budgeted_llm_is_a_function_calling_llm() -> None:
    from llama_index.core.llms.function_calling import FunctionCallingLLM

    assert issubclass(agentguard_llamaindex.BudgetedLLM, FunctionCallingLLM)


def test_unknown_attribute() -> None:
    with pytest.raises(AttributeError, match="NoSuchThing"):
        agentguard_llamaindex.NoSuchThing  # type: ignore[attr-defined]  # noqa: B018


def test_import_is_lazy() -> None:
    """`import agentguard_llamaindex` does not import LlamaIndex until a name is used."""
    code = (
        "import sys, agentguard_llamaindex\n"
        "print(','.join(m for m in ('llama_index', 'llama_index.core') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
