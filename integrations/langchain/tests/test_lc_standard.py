"""LangChain's standard chat-model suites, run against :class:`BudgetedChatModel`.

The wrapper is backed by :class:`ScriptedChatModel` (offline, provider-like: usage on every
answer and on the last stream chunk, cache reads, tool calls, ``tool_choice``, ``max_tokens``)
whose tool-call arguments are read from the prompt by a small script, as a model would. The
properties below say what the wrapper over that backing model can do; what neither can
(images, audio, PDF, JSON mode) is switched off through the suites' documented properties.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

import agentguard as ag
from agentguard_langchain._chat_model import BudgetedChatModel
from agentguard_langchain.testing import ScriptedChatModel

# stream_events(version="v3") is a beta LangChain API; the suite exercises it on purpose.
pytestmark = pytest.mark.filterwarnings(
    "ignore::langchain_core._api.beta_decorator.LangChainBetaWarning"
)


def read_args(tool: dict[str, Any], messages: list[BaseMessage]) -> dict[str, Any]:
    """Arguments for ``tool`` read from the last human message: numbers for integer
    parameters, quoted text for strings (else a phrase naming the parameter)."""
    prompt = next((m.text for m in reversed(messages) if isinstance(m, HumanMessage)), "")
    numbers = [int(n) for n in re.findall(r"-?\d+", prompt)]
    quoted = re.findall(r"'([^']+)'", prompt)
    args: dict[str, Any] = {}
    properties = tool["function"].get("parameters", {}).get("properties", {})
    for name, schema in properties.items():
        kind = schema.get("type") or next(
            (s.get("type") for s in schema.get("anyOf", ()) if s.get("type") != "null"),
            "string",
        )
        if kind == "integer":
            args[name] = numbers.pop(0) if numbers else 1
        elif kind == "number":
            args[name] = float(numbers.pop(0)) if numbers else 1.0
        elif kind == "boolean":
            args[name] = True
        else:
            args[name] = quoted.pop(0) if quoted else f"the {name.replace('_', ' ')}"
    return args


def backing_model(**kw: Any) -> ScriptedChatModel:
    return ScriptedChatModel(
        model_name="gpt-4o-mini", tool_args=read_args, cached_fraction=0.25, **kw
    )


def params() -> dict[str, Any]:
    guard = ag.Guard(ag.Policy(max_cost_usd="5", max_output_tokens=400), traces="memory")
    return {
        "guard": guard,
        "model": backing_model(),
        "models": {"gpt-4.1-nano": backing_model()},
        "task_tags": {"suite": "langchain-tests"},
    }


class TestBudgetedChatModelUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return BudgetedChatModel

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return params()

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def has_structured_output(self) -> bool:
        return True  # through tool calling

    @property
    def supports_json_mode(self) -> bool:
        return False

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def model_override_value(self) -> str:
        return "gpt-4o"


class TestBudgetedChatModelIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return BudgetedChatModel

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return params()

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def has_structured_output(self) -> bool:
        return True  # through tool calling

    @property
    def supports_json_mode(self) -> bool:
        return False

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supported_usage_metadata_details(self) -> dict[Any, list[Any]]:
        return {"invoke": ["cache_read_input"], "stream": ["cache_read_input"]}

    @property
    def supports_model_override(self) -> bool:
        return True

    @property
    def model_override_value(self) -> str:
        return "gpt-4o"

    def invoke_with_cache_read_input(self, *, stream: bool = False) -> AIMessage:
        model = BudgetedChatModel(**params())
        prompt = "Summarise the refund policy for a late parcel."
        if not stream:
            return model.invoke(prompt)
        full: Any = None
        for chunk in model.stream(prompt):
            full = chunk if full is None else full + chunk
        assert isinstance(full, AIMessage)
        return full
