"""BudgetedChatModel and the chat model it calls: what reaches the delegate on each call.

The wrapper calls the delegate's ``_generate`` / ``_agenerate`` / ``_stream`` / ``_astream``
itself, with the call's own kwargs dict (the cap and ``run_manager`` are set in it, not on a
copy): these pin that nothing leaks into the binding or from one call into the next, that
``run_manager`` goes only to a delegate that takes it, and that the delegate's rate limiter
is honoured on every path.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler, CallbackManagerForLLMRun
from langchain_core.messages import BaseMessage
from langchain_core.outputs import ChatResult
from langchain_core.rate_limiters import BaseRateLimiter
from langchain_core.tools import tool

import agentguard as ag
from agentguard_langchain import BudgetedChatModel
from agentguard_langchain.testing import ScriptedChatModel


@tool
def lookup(query: str) -> str:
    """Look an order up."""
    return f"order {query}: shipped"


def scripted(**kwargs: Any) -> ScriptedChatModel:
    return ScriptedChatModel(model_name="gpt-4o", reply_tokens=20, **kwargs)


class NoRunManagerChatModel(ScriptedChatModel):
    """A provider whose ``_generate`` / ``_agenerate`` take no ``run_manager``."""

    got: ClassVar[list[set[str]]] = []

    def _generate(  # type: ignore[override]
        self, messages: list[BaseMessage], stop: list[str] | None = None, **kwargs: Any
    ) -> ChatResult:
        self.got.append(set(kwargs))
        return super()._generate(messages, stop, None, **kwargs)

    async def _agenerate(  # type: ignore[override]
        self, messages: list[BaseMessage], stop: list[str] | None = None, **kwargs: Any
    ) -> ChatResult:
        self.got.append(set(kwargs))
        return await super()._agenerate(messages, stop, None, **kwargs)


class RunManagerChatModel(ScriptedChatModel):
    """A provider that takes ``run_manager`` and records the one it gets."""

    managers: ClassVar[list[Any]] = []

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        self.managers.append(run_manager)
        return super()._generate(messages, stop, run_manager, **kwargs)


class RunIds(BaseCallbackHandler):
    def __init__(self) -> None:
        self.run_ids: list[UUID] = []

    def on_chat_model_start(self, *args: Any, run_id: UUID, **kwargs: Any) -> None:
        self.run_ids.append(run_id)


class CountingLimiter(BaseRateLimiter):
    """A rate limiter that always grants, counting the grants."""

    def __init__(self) -> None:
        self.sync = 0
        self.async_ = 0

    def acquire(self, *, blocking: bool = True) -> bool:
        self.sync += 1
        return True

    async def aacquire(self, *, blocking: bool = True) -> bool:
        self.async_ += 1
        return True


def test_the_binding_is_untouched_and_each_call_gets_its_own_cap() -> None:
    g = ag.Guard(ag.Policy(max_cost_usd="1", max_output_tokens=300), traces=False)
    model = scripted(tool_calls=10**9)
    bound = BudgetedChatModel(guard=g, model=model).bind_tools([lookup])
    before = dict(bound.kwargs)  # type: ignore[attr-defined]
    with g.task("t"):
        bound.invoke("order 1", max_tokens=40)
        bound.invoke("order 2")
        bound.invoke("order 3", max_completion_tokens=30)
        bound.invoke("order 4")
    assert bound.kwargs == before  # type: ignore[attr-defined]
    assert [s["max_tokens"] for s in model.seen] == [40, 300, 30, 300]
    assert [s["tools"] for s in model.seen] == [1, 1, 1, 1]


def test_run_manager_goes_only_to_a_delegate_that_takes_it() -> None:
    g = ag.Guard(ag.Policy(max_cost_usd="1"), traces=False)
    NoRunManagerChatModel.got = []
    plain = BudgetedChatModel(guard=g, model=NoRunManagerChatModel(model_name="gpt-4o"))
    RunManagerChatModel.managers = []
    taking = BudgetedChatModel(guard=g, model=RunManagerChatModel(model_name="gpt-4o"))
    runs = RunIds()
    with g.task("t") as task:
        plain.invoke("hi")
        asyncio.run(plain.ainvoke("hi"))
        taking.invoke("hi", config={"callbacks": [runs]})
    assert NoRunManagerChatModel.got == [{"max_tokens"}, {"max_tokens"}]
    [manager] = RunManagerChatModel.managers
    assert isinstance(manager, CallbackManagerForLLMRun)
    assert [manager.run_id] == runs.run_ids  # the wrapper's own run
    assert task.model_calls == 3


def test_the_delegates_rate_limiter_is_honoured_on_every_path() -> None:
    g = ag.Guard(ag.Policy(max_cost_usd="1"), traces=False)
    limiter = CountingLimiter()
    llm = BudgetedChatModel(guard=g, model=scripted(rate_limiter=limiter))

    async def async_calls() -> None:
        await llm.ainvoke("hi")
        async for _ in llm.astream("hi"):
            pass

    with g.task("t") as task:
        llm.invoke("hi")
        for _ in llm.stream("hi"):
            pass
        asyncio.run(async_calls())
    assert (limiter.sync, limiter.async_) == (2, 2)
    assert task.model_calls == 4
