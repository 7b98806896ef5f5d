"""BudgetedChatModel's per-call shortcuts give what the general path gives.

Each call reads ``usage_metadata`` straight into a ``Usage``, builds its invocation params
with the delegate's ``_llm_type`` held per wrapped model, reads a cap field from the model's
``__dict__``, reuses the tools another rung formatted for the same binding, and LangChain
reads the wrapper's ``_generate`` signature from the one the function holds. These pin each
shortcut against the general reading, and each held value against the change that must
replace it.
"""

from __future__ import annotations

import inspect
import types
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from langchain_core.language_models import LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.runnables import Runnable
from langchain_core.tools import tool

import agentguard as ag
from agentguard_langchain import BudgetedChatModel
from agentguard_langchain._chat_model import _usage_or_raw
from agentguard_langchain._common import usage_of
from agentguard_langchain.testing import ScriptedChatModel


@tool
def lookup(query: str) -> str:
    """Look an order up."""
    return f"order {query}: shipped"


def guard(**policy: Any) -> ag.Guard:
    return ag.Guard(ag.Policy(**policy), traces=False)


# -- usage ----------------------------------------------------------------------------------------


def general_reading(message: BaseMessage) -> Any:
    """What the wrapper committed before the shortcut: ``Usage.from_langchain`` on any
    ``usage_metadata``, provider shapes otherwise, a malformed record raw."""
    um = getattr(message, "usage_metadata", None)
    try:
        return ag.Usage.from_langchain(um) if um else usage_of(message)
    except ag.InvalidUsage:
        meta = message.response_metadata
        return um or meta.get("token_usage", meta.get("usage"))


counts = st.one_of(
    st.none(),
    st.integers(-3, 300),
    st.integers(10**8 - 2, 10**8 + 2),
    st.booleans(),
    st.sampled_from([2.0, 2.5, "7"]),
)


def maybe(keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from(keys), counts, max_size=len(keys))


details = st.one_of(
    st.none(),
    maybe(["cache_read", "cache_creation", "audio"]),
    st.builds(lambda d: types.MappingProxyType(d), maybe(["cache_read", "cache_creation"])),
)
out_details = st.one_of(st.none(), maybe(["reasoning", "audio"]))


@st.composite
def usage_metadata(draw: st.DrawFn) -> Any:
    um: dict[str, Any] = draw(maybe(["input_tokens", "output_tokens", "total_tokens"]))
    for key, shape in (("input_token_details", details), ("output_token_details", out_details)):
        if draw(st.booleans()):
            um[key] = draw(shape)
    return draw(st.sampled_from([um, um, None, {}, types.MappingProxyType(um)]))


@settings(max_examples=400, deadline=None)
@given(
    um=usage_metadata(),
    provider=st.sampled_from(
        [{}, {"token_usage": {"prompt_tokens": 9, "completion_tokens": 2}}, {"usage": {"x": 1}}]
    ),
    as_ai=st.booleans(),
)
def test_usage_metadata_reads_as_the_general_reading(um: Any, provider: Any, as_ai: bool) -> None:
    message: Any = AIMessage(content="", response_metadata=dict(provider))
    message.usage_metadata = um  # unvalidated, as a provider object may leave it
    if not as_ai:  # another message class: the attribute read through getattr
        message = types.SimpleNamespace(
            usage_metadata=um, response_metadata=message.response_metadata
        )
    got, want = _usage_or_raw(message), general_reading(message)
    if isinstance(want, ag.Usage):
        assert type(got) is ag.Usage
        assert got.as_dict() == want.as_dict()
    else:
        assert got is want


def test_the_usual_usage_metadata_is_committed_with_every_count() -> None:
    g = guard(max_cost_usd="1")
    model = ScriptedChatModel(model_name="gpt-4o", reply_tokens=30, cached_fraction=0.5)
    llm = BudgetedChatModel(guard=g, model=model)
    with g.task("usage") as task:
        answer = llm.invoke("Summarise the ticket, please.")
    assert answer.usage_metadata is not None
    details = answer.usage_metadata.get("input_token_details") or {}
    assert details.get("cache_read", 0) > 0
    assert task.usage.as_dict() == {
        "input_tokens": answer.usage_metadata["input_tokens"],
        "output_tokens": answer.usage_metadata["output_tokens"],
        "cache_read_tokens": details["cache_read"],
        "cache_write_tokens": 0,
        "reasoning_tokens": 0,
        "estimated": False,
    }


# -- invocation params ---------------------------------------------------------------------------


class OtherTypeChatModel(ScriptedChatModel):
    @property
    def _llm_type(self) -> str:
        return "agentguard-scripted-other"


def general_params(llm: BudgetedChatModel, stop: Any, **kwargs: Any) -> dict[str, Any]:
    """``BaseChatModel._get_invocation_params``'s shape over ``_identifying_params``."""
    kwargs.pop("agentguard_tools", None)
    return {**llm._identifying_params, "_type": "agentguard-budgeted", "stop": stop, **kwargs}


def test_invocation_params_follow_the_wrapped_model_and_the_ladder() -> None:
    first = ScriptedChatModel(model_name="gpt-4o")
    llm = BudgetedChatModel(guard=guard(), model=first)
    kwargs = {"tools": [{"type": "function"}], "agentguard_tools": object(), "temperature": 0}
    got = llm._get_invocation_params(stop=["END"], **kwargs)
    assert got == general_params(llm, ["END"], **kwargs)
    assert got["delegate"] == "agentguard-scripted"
    assert "agentguard_tools" not in got
    # the held delegate type is the wrapped model's: a new model is read again
    llm.model = OtherTypeChatModel(model_name="gpt-4o")
    got = llm._get_invocation_params(stop=None, **kwargs)
    assert got["delegate"] == "agentguard-scripted-other"
    assert got == general_params(llm, None, **kwargs)
    # the ladder is read on each call, a fresh list each time
    llm.models["gpt-4o-mini"] = first
    got = llm._get_invocation_params()
    assert got["ladder"] == ["gpt-4o-mini"]
    got["ladder"].append("mutated")
    assert llm._get_invocation_params()["ladder"] == ["gpt-4o-mini"]


class OwnParamsModel(BudgetedChatModel):
    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"own": True}


def test_a_subclass_with_its_own_identifying_params_reports_them() -> None:
    llm = OwnParamsModel(guard=guard(), model=ScriptedChatModel(model_name="gpt-4o"))
    got = llm._get_invocation_params(stop=None, temperature=0.5)
    assert got == {"own": True, "_type": "agentguard-budgeted", "stop": None, "temperature": 0.5}


# -- the signature LangChain reads on every call -------------------------------------------------


def test_the_held_signatures_are_the_methods_own() -> None:
    for name in ("_generate", "_agenerate"):
        method = getattr(BudgetedChatModel, name)
        bare = types.FunctionType(
            method.__code__, method.__globals__, name, method.__defaults__, method.__closure__
        )
        bare.__kwdefaults__ = method.__kwdefaults__
        bare.__annotations__ = method.__annotations__
        assert "__signature__" in vars(method)
        assert inspect.signature(method) == inspect.signature(bare)
        bound = getattr(BudgetedChatModel(guard=guard(), model=ScriptedChatModel()), name)
        assert list(inspect.signature(bound).parameters) == [
            "messages",
            "stop",
            "run_manager",
            "kwargs",
        ]


# -- output caps read from the model -------------------------------------------------------------


class PropertyCapChatModel(ScriptedChatModel):
    """A chat model whose output cap is a property, not a field (read through getattr)."""

    @property
    def max_output_tokens(self) -> int:
        return 7


def test_a_cap_field_and_a_cap_property_are_both_respected() -> None:
    g = guard(max_cost_usd="1", max_output_tokens=300)
    field_capped = ScriptedChatModel(model_name="gpt-4o", max_tokens=11)
    with g.task("field"):
        BudgetedChatModel(guard=g, model=field_capped).invoke("hi")
    assert field_capped.seen[-1]["max_tokens"] == 11
    field_capped.max_tokens = 5  # changed after the first call: read again
    with g.task("field-changed"):
        BudgetedChatModel(guard=g, model=field_capped).invoke("hi")
    assert field_capped.seen[-1]["max_tokens"] == 5
    prop_capped = PropertyCapChatModel(model_name="gpt-4o")
    llm = BudgetedChatModel(guard=g, model=prop_capped)
    with g.task("property"):
        llm.invoke("hi")
    assert prop_capped.seen[-1]["max_tokens"] == 7
    assert llm._get_ls_params()["ls_max_tokens"] == 7


@pytest.mark.parametrize("wrapper_cap", [None, 50])
@pytest.mark.parametrize("model_cap", [None, 30, 80])
@pytest.mark.parametrize("guard_cap", [40, 400])
@pytest.mark.parametrize(
    "call_kwargs",
    [{}, {"max_tokens": 20}, {"max_completion_tokens": 60}, {"model": "gpt-4o"}],
)
@pytest.mark.parametrize("param", [None, "max_completion_tokens"])
def test_the_usual_calls_cap_is_the_general_reading(
    wrapper_cap: int | None,
    model_cap: int | None,
    guard_cap: int,
    call_kwargs: dict[str, Any],
    param: str | None,
) -> None:
    """The usual call (one cap field, no cap kwarg, no ``max_tokens_param``) reads the
    model's cap once for ``_ask`` and ``_route``: same caps as the general reading."""
    g = guard(max_cost_usd="1", max_output_tokens=guard_cap)
    model = ScriptedChatModel(model_name="gpt-4o", max_tokens=model_cap, reply_tokens=500)
    llm = BudgetedChatModel(guard=g, model=model, max_tokens=wrapper_cap, max_tokens_param=param)
    plan = llm._ask(None, dict(call_kwargs))
    kwargs = {k: v for k, v in call_kwargs.items() if k != "model"}
    assert plan.cap == llm._caller_cap(model, plan.facts, kwargs)
    assert (plan.bind is not None) == (param is None and not kwargs)
    with g.task("caps"):
        answer = llm.invoke("Write the report.", **call_kwargs)
    caps = [c for c in (wrapper_cap, model_cap, guard_cap, *kwargs.values()) if c is not None]
    sent = model.seen[-1]["max_tokens"]
    assert sent == min(caps)
    assert answer.usage_metadata is not None
    assert answer.usage_metadata["output_tokens"] == min(caps)
    callers = [c for c in (wrapper_cap, model_cap, *kwargs.values()) if c is not None]
    assert llm._get_ls_params(**call_kwargs).get("ls_max_tokens") == min(callers, default=None)


def test_a_routed_cap_never_raises_the_models_own() -> None:
    model = ScriptedChatModel(model_name="gpt-4o", max_tokens=30)
    llm = BudgetedChatModel(guard=guard(), model=model)
    for kwargs in ({}, {"max_tokens": 60}):  # the usual call, and the general reading
        plan = llm._ask(None, dict(kwargs))
        llm._route(plan, plan.requested, 10**6)  # a cap above the model's own
        assert plan.kwargs["max_tokens"] == 30


# -- a downgraded binding's tools ----------------------------------------------------------------


class CountingFormatChatModel(ScriptedChatModel):
    """A rung of another class that counts its ``bind_tools`` calls."""

    formatted: int = 0

    def bind_tools(
        self, tools: Any, *, tool_choice: str | None = None, **kwargs: Any
    ) -> Runnable[LanguageModelInput, AIMessage]:
        self.formatted += 1
        return super().bind_tools(tools, tool_choice=tool_choice, **kwargs)


def test_a_downgraded_binding_formats_its_tools_once_per_rung_model() -> None:
    g = guard(
        max_cost_usd="0.05",
        downgrade=[ag.Downgrade(at=0.0001, to="gpt-4o-mini")],
        on_limit="finish",
    )
    cheap = CountingFormatChatModel(model_name="gpt-4o-mini", tool_calls=10**6)
    llm = BudgetedChatModel(
        guard=g, model=ScriptedChatModel(model_name="gpt-4o"), models={"gpt-4o-mini": cheap}
    )
    bound = llm.bind_tools([lookup], tool_choice="lookup")
    with g.task("rungs") as task:
        bound.invoke("find 1182")  # the default model; then the ladder's rung
        for _ in range(4):
            assert bound.invoke("find 1182").tool_calls[0]["name"] == "lookup"
        assert cheap.calls == 4
        assert cheap.formatted == 1
        assert {s["tools"] for s in cheap.seen} == {1}
        assert {s["tool_choice"] for s in cheap.seen} == {"lookup"}
        # another chat model for the rung: its own formatting, not the held one
        other = CountingFormatChatModel(model_name="gpt-4o-mini", tool_calls=10**6)
        llm.models["gpt-4o-mini"] = other
        bound.invoke("find 1183")
        bound.invoke("find 1184")
        assert (other.calls, other.formatted, cheap.calls) == (2, 1, 4)
        # the graceful final answer: formatted again, with tool_choice="none"
        while not task.finished:
            answer = bound.invoke("find 1185")
    assert answer.response_metadata.get("agentguard_final") is True
    assert other.seen[-1]["tool_choice"] == "none"
    assert other.formatted == 2
    assert [s["tool_choice"] for s in other.seen[:-1]] == ["lookup"] * (other.calls - 1)


def test_a_rung_asked_for_by_name_formats_the_bound_tools_itself() -> None:
    g = guard(max_cost_usd="1")
    cheap = CountingFormatChatModel(model_name="gpt-4o-mini", max_tokens=70)
    llm = BudgetedChatModel(
        guard=g, model=ScriptedChatModel(model_name="gpt-4o"), models={"gpt-4o-mini": cheap}
    )
    with g.task("by-name"):
        answer = llm.bind_tools([lookup]).invoke("find 1182", model="gpt-4o-mini")
    assert answer.response_metadata["model_name"] == "gpt-4o-mini"
    assert cheap.formatted == 1
    assert cheap.seen[-1]["tools"] == 1
    assert cheap.seen[-1]["max_tokens"] == 70
