"""BudgetedChatModel: the guard's decisions applied to plain LangChain chains."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Generator
from decimal import Decimal
from typing import Any, cast

import httpx
import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.outputs import ChatResult
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

import agentguard as ag
from agentguard.testing import LoopCheckingStore
from agentguard_langchain._chat_model import METERED_METADATA_KEY, BudgetedChatModel
from agentguard_langchain._common import metered_here
from agentguard_langchain.testing import ScriptedChatModel, count_input_tokens

D = Decimal


def guard(**policy: Any) -> ag.Guard:
    return ag.Guard(ag.Policy(**policy), traces="memory")


def spans(g: ag.Guard, kind: str = "model") -> list[ag.Span]:
    return [s for s in g.sink.spans if s.kind == kind]  # type: ignore[attr-defined]


def records(g: ag.Guard) -> list[ag.TaskRecord]:
    return list(g.sink.tasks)  # type: ignore[attr-defined]


def until_stopped(call: Callable[[], object], limit: int = 200) -> ag.BudgetExceeded:
    """Make ``call`` until the guard stops it; the stop."""
    for _ in range(limit):
        try:
            call()
        except ag.BudgetExceeded as exc:
            return exc
    raise AssertionError(f"not stopped after {limit} calls")


class Lookup(BaseModel):
    """Look an order up."""

    query: str


@tool
def lookup(query: str) -> str:
    """Look an order up."""
    return f"order {query}: shipped"


class FailingChatModel(ScriptedChatModel):
    """A provider that accepts the request, then fails (a 500, a dropped connection)."""

    def _generate(self, *args: Any, **kwargs: Any) -> ChatResult:
        raise ConnectionError("provider unavailable")

    async def _agenerate(self, *args: Any, **kwargs: Any) -> ChatResult:
        raise ConnectionError("provider unavailable")


BOUND: list[list[str]] = []  # tools formatted by OtherFormatChatModel.bind_tools


class OtherFormatChatModel(ScriptedChatModel):
    """A chat model of another class whose ``bind_tools`` must be the one that formats."""

    def bind_tools(
        self, tools: Any, *, tool_choice: str | None = None, **kwargs: Any
    ) -> Runnable[LanguageModelInput, AIMessage]:
        BOUND.append([getattr(t, "name", str(t)) for t in tools])
        return super().bind_tools(tools, tool_choice=tool_choice, **kwargs)


# -- the ladder -----------------------------------------------------------------------------------


def test_after_60_percent_spent_calls_go_to_the_cheap_model() -> None:
    g = guard(max_cost_usd="0.02", downgrade=[ag.Downgrade(at=0.6, to="gpt-4o-mini")])
    big = ScriptedChatModel(model_name="gpt-4o")
    cheap = ScriptedChatModel(model_name="gpt-4o-mini")
    llm = BudgetedChatModel(guard=g, model=big, models={"gpt-4o-mini": cheap})
    used: list[tuple[float, str]] = []

    def call() -> None:
        fraction = float((task.cost_usd or D(0)) / D("0.02"))
        before = (big.calls, cheap.calls)
        answer = llm.invoke("Where is order 1182?")
        assert (big.calls, cheap.calls) != before
        used.append((fraction, "gpt-4o" if big.calls > before[0] else "gpt-4o-mini"))
        assert answer.response_metadata["model_name"] == used[-1][1]

    with g.task("ladder") as task:
        until_stopped(call)
    assert [m for f, m in used if f < 0.6] == ["gpt-4o"] * len([f for f, _ in used if f < 0.6])
    assert {m for f, m in used if f >= 0.6} == {"gpt-4o-mini"}
    assert big.calls >= 3
    assert cheap.calls >= 3
    assert task.cost_usd is not None
    assert task.cost_usd <= D("0.02")
    assert [d.action for d in task.decisions if d.kind == "model"][:1] == ["downgrade"]
    assert task.saved_usd > 0
    assert {s.model for s in spans(g) if s.usage} == {"gpt-4o", "gpt-4o-mini"}


def test_a_rung_without_its_own_model_is_asked_for_by_name() -> None:
    g = guard(max_cost_usd="0.01", downgrade=[ag.Downgrade(at=0.5, to="gpt-4o-mini")])
    model = ScriptedChatModel(model_name="gpt-4o")
    llm = BudgetedChatModel(guard=g, model=model)
    with g.task("one-client"):
        until_stopped(lambda: llm.invoke("hi"))
    asked = [s["model"] for s in model.seen]
    assert asked[0] == "gpt-4o"
    assert "gpt-4o-mini" in asked
    assert asked == sorted(asked, key=lambda m: m == "gpt-4o-mini")  # never back up


def test_a_rung_of_another_class_formats_the_tools_itself() -> None:
    g = guard(max_cost_usd="1", downgrade=[ag.Downgrade(at=0.0001, to="gpt-4o-mini")])
    BOUND.clear()
    other = OtherFormatChatModel(model_name="gpt-4o-mini")
    llm = BudgetedChatModel(
        guard=g, model=ScriptedChatModel(model_name="gpt-4o"), models={"gpt-4o-mini": other}
    )
    with g.task("tools"):
        first = llm.bind_tools([lookup], tool_choice="lookup").invoke("find 1182")
        second = llm.bind_tools([lookup], tool_choice="lookup").invoke("find 1183")
    assert first.response_metadata["model_name"] == "gpt-4o"
    assert second.response_metadata["model_name"] == "gpt-4o-mini"
    assert BOUND == [["lookup"]]  # formatted by the rung, once
    assert other.seen[-1]["tools"] == 1
    assert other.seen[-1]["tool_choice"] == "lookup"
    assert second.tool_calls[0]["name"] == "lookup"


# -- output caps ----------------------------------------------------------------------------------


def test_the_cap_the_guard_allows_is_bound_on_every_call() -> None:
    g = guard(max_cost_usd="0.004", max_output_tokens=120)
    model = ScriptedChatModel(model_name="gpt-4o", reply_tokens=400)
    llm = BudgetedChatModel(guard=g, model=model)
    with g.task("caps"):
        until_stopped(lambda: llm.invoke("Write the report."), 50)
    calls = [s for s in spans(g) if s.usage is not None]
    assert len(calls) == len(model.seen) >= 3
    bound = [s["max_tokens"] for s in model.seen]
    assert bound == [s.attrs["max_tokens"] for s in calls]
    assert bound[0] == 120
    assert min(bound) < 120  # the remaining budget capped the last calls
    assert all(
        s.usage is not None and s.usage.output_tokens <= s.attrs["max_tokens"] for s in calls
    )


def test_the_callers_cap_is_kept_under_the_key_the_caller_used() -> None:
    g = guard(max_cost_usd="1", max_output_tokens=120)
    model = ScriptedChatModel(model_name="gpt-4o-mini")
    llm = BudgetedChatModel(guard=g, model=model)
    with g.task("caller-caps"):
        llm.invoke("a", max_tokens=80)
        llm.invoke("b", max_completion_tokens=70)
        BudgetedChatModel(guard=g, model=model, max_tokens=50).invoke("c")
        BudgetedChatModel(
            guard=g, model=ScriptedChatModel(model_name="gpt-4o-mini", max_tokens=30)
        ).invoke("d")
    assert [s["max_tokens"] for s in model.seen] == [80, 70, 50]
    assert [s.attrs["max_tokens"] for s in spans(g)] == [80, 70, 50, 30]


def test_a_cap_below_one_is_read_as_no_cap() -> None:
    # -1 is "as many as the model may" for some LangChain models: the guard's cap is bound
    g = guard(max_cost_usd="1", max_output_tokens=120)
    model = ScriptedChatModel(model_name="gpt-4o-mini")
    llm = BudgetedChatModel(guard=g, model=model)
    with g.task("below-one"):
        llm.invoke("a", max_tokens=-1)
        llm.invoke("b", max_completion_tokens=0)
        BudgetedChatModel(
            guard=g, model=ScriptedChatModel(model_name="gpt-4o-mini", max_tokens=-1)
        ).invoke("c")
        llm.invoke("d", max_tokens=-1)  # the model's second call: on the guard's fast lane
    assert [s["max_tokens"] for s in model.seen] == [120, 120, 120]
    assert [s.attrs["max_tokens"] for s in spans(g)] == [120, 120, 120, 120]


def _openai_transport(seen: list[dict[str, Any]], *, stream: bool = False) -> httpx.MockTransport:
    """An OpenAI-compatible endpoint, offline: records each request body, answers with usage."""

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        usage = {"prompt_tokens": 2000, "completion_tokens": 250, "total_tokens": 2250}
        base = {"id": "chatcmpl-1", "created": 0, "model": body["model"] + "-2024-07-18"}
        if not stream:
            return httpx.Response(
                200,
                json={
                    **base,
                    "object": "chat.completion",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "Refund approved."},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage,
                },
            )
        events: list[dict[str, Any]] = [
            {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Refund "}}]},
            {"choices": [{"index": 0, "delta": {"content": "approved."}}]},
            {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
            {"choices": [], "usage": usage},
        ]
        text = "".join(
            f"data: {json.dumps({**base, 'object': 'chat.completion.chunk', **e})}\n\n"
            for e in events
        )
        return httpx.Response(
            200,
            content=(text + "data: [DONE]\n\n").encode(),
            headers={"content-type": "text/event-stream"},
        )

    return httpx.MockTransport(handle)


def test_chat_openai_gets_the_cap_and_the_rung_in_its_request() -> None:
    g = guard(
        max_cost_usd="0.02",
        max_output_tokens=300,
        downgrade=[ag.Downgrade(at=0.3, to="gpt-4o-mini")],
    )
    seen: list[dict[str, Any]] = []
    openai = ChatOpenAI(
        model="gpt-4o",
        api_key="sk-test",
        http_client=httpx.Client(transport=_openai_transport(seen)),
        max_retries=0,
    )
    llm = BudgetedChatModel(guard=g, model=openai)
    with g.task("openai") as task:
        for _ in range(6):
            assert llm.invoke("Refund?").content == "Refund approved."
    assert seen[0]["model"] == "gpt-4o"
    assert seen[0]["max_completion_tokens"] == 300
    assert "max_tokens" not in seen[0]
    assert [b["model"] for b in seen] == ["gpt-4o"] + ["gpt-4o-mini"] * 5  # same client
    assert task.usage.input_tokens == 2000 * 6
    assert task.usage.output_tokens == 250 * 6
    assert not task.usage.estimated
    # priced by the snapshot the provider reported, exactly as genai-prices would
    assert task.cost_usd == D("0.0075") + 5 * D("0.00045")


def test_chat_openai_stream_is_charged_from_its_usage_chunk() -> None:
    g = guard(max_cost_usd="1", max_output_tokens=64)
    seen: list[dict[str, Any]] = []
    openai = ChatOpenAI(
        model="gpt-4o-mini",
        api_key="sk-test",
        http_client=httpx.Client(transport=_openai_transport(seen, stream=True)),
        max_retries=0,
        stream_usage=True,
    )
    llm = BudgetedChatModel(guard=g, model=openai)
    with g.task("openai-stream") as task:
        text = "".join(c.text for c in llm.stream("Refund?"))
    assert text == "Refund approved."
    assert seen[0]["stream"] is True
    assert seen[0]["max_completion_tokens"] == 64
    assert (task.usage.input_tokens, task.usage.output_tokens) == (2000, 250)
    assert not task.usage.estimated


# -- finish and stop ------------------------------------------------------------------------------


def test_finish_makes_a_text_only_final_call_with_the_finish_cap() -> None:
    g = guard(max_cost_usd="1", max_model_calls=3, on_limit="finish", finish_output_tokens=40)
    model = ScriptedChatModel(model_name="gpt-4o-mini")
    agentish = BudgetedChatModel(guard=g, model=model).bind_tools([lookup])
    with g.task("finish") as task:
        first = agentish.invoke("Where is 1182?")
        second = agentish.invoke("And 1183?")
        final = agentish.invoke("And 1184?")
        assert first.tool_calls
        assert second.tool_calls
        assert not final.tool_calls
        assert final.content
        assert final.response_metadata["agentguard_final"] is True
        assert "agentguard_final" not in second.response_metadata
        with pytest.raises(ag.BudgetExceeded) as stopped:
            agentish.invoke("And 1185?")
    assert stopped.value.limit == "finished"
    assert model.seen[-1]["tool_choice"] == "none"
    assert model.seen[-1]["tools"] == 1
    assert model.seen[-1]["max_tokens"] <= 40
    assert model.seen[0]["tool_choice"] is None
    assert task.status == "finished"
    assert task.model_calls == 3


def test_stop_raises_releases_and_closes_the_call_task() -> None:
    g = guard(max_cost_usd="0.0001")
    model = ScriptedChatModel(model_name="gpt-4o")
    llm = BudgetedChatModel(guard=g, model=model, task_id="tiny", task_tags={"team": "cx"})
    with pytest.raises(ag.BudgetExceeded) as stopped:
        llm.invoke("x " * 200)
    assert stopped.value.limit == "max_cost_usd"
    assert model.calls == 0  # refused before the provider was called
    (record,) = records(g)
    assert (record.task_id, record.status, record.tags) == ("tiny", "stopped", {"team": "cx"})


def test_a_failing_provider_releases_the_reservation() -> None:
    g = guard(max_cost_usd="0.01")
    llm = BudgetedChatModel(guard=g, model=FailingChatModel(model_name="gpt-4o"))
    with g.task("fails") as task:
        with pytest.raises(ConnectionError):
            llm.invoke("hi")
        assert task.spent.cost_usd == 0
    (span,) = spans(g)
    assert span.status == "error"
    assert span.attrs["error"] == "ConnectionError"


# -- tasks ----------------------------------------------------------------------------------------


def test_outside_a_task_each_call_is_its_own_task_and_a_task_id_shares_its_budget() -> None:
    g = guard(max_cost_usd="0.005", max_output_tokens=200)
    llm = BudgetedChatModel(guard=g, model=ScriptedChatModel(model_name="gpt-4o"))
    llm.invoke("one")
    llm.invoke("two")
    assert [r.model_calls for r in records(g)] == [1, 1]
    assert len({r.task_id for r in records(g)}) == 2
    session = BudgetedChatModel(
        guard=g, model=ScriptedChatModel(model_name="gpt-4o"), task_id="session-9"
    )
    until_stopped(lambda: session.invoke("again"), 10)
    session_records = [r for r in records(g) if r.task_id == "session-9"]
    spent = sum((r.cost_usd or D(0) for r in session_records), D(0))
    assert 2 <= len(session_records) < 10
    assert spent <= D("0.005")


def test_a_task_of_another_guard_is_not_charged() -> None:
    mine, theirs = guard(max_cost_usd="1"), guard(max_cost_usd="1")
    llm = BudgetedChatModel(guard=mine, model=ScriptedChatModel(model_name="gpt-4o-mini"))
    with theirs.task("theirs") as other:
        llm.invoke("hi")
    assert other.model_calls == 0
    assert [r.model_calls for r in records(mine)] == [1]


# -- streaming ------------------------------------------------------------------------------------


def test_a_stream_is_charged_from_the_usage_on_its_last_chunk() -> None:
    g = guard(max_cost_usd="1", max_output_tokens=100)
    model = ScriptedChatModel(model_name="gpt-4o-mini")
    llm = BudgetedChatModel(guard=g, model=model)
    with g.task("stream") as task:
        chunks = list(llm.stream("Tell me about the parcel."))
    full: Any = None
    for c in chunks:
        full = c if full is None else full + c
    assert isinstance(full, AIMessageChunk)
    assert full.usage_metadata is not None
    assert sum(1 for c in chunks if c.usage_metadata) == 1
    assert task.usage.output_tokens == full.usage_metadata["output_tokens"] == 100
    assert task.usage.input_tokens == full.usage_metadata["input_tokens"]
    assert not task.usage.estimated
    assert model.seen[-1]["max_tokens"] == 100


def test_a_stream_without_usage_is_charged_an_estimate() -> None:
    g = guard(max_cost_usd="1", max_output_tokens=100)
    model = ScriptedChatModel(model_name="gpt-4o-mini", report_usage=False)
    llm = BudgetedChatModel(guard=g, model=model)
    with g.task("estimated") as task:
        text = "".join(c.text for c in llm.stream("Tell me about the parcel."))
    counter = ag.counter_for("gpt-4o-mini")
    assert task.usage.estimated
    assert task.usage.output_tokens == counter.count(text) > 90
    sent = count_input_tokens("gpt-4o-mini", [ag_msg("Tell me about the parcel.")])
    assert task.usage.input_tokens == sent
    (span,) = spans(g)
    assert span.attrs["estimated"] is True


def ag_msg(text: str) -> BaseMessage:
    from langchain_core.messages import HumanMessage

    return HumanMessage(text)


def test_an_abandoned_stream_is_charged_for_what_was_streamed() -> None:
    g = guard(max_cost_usd="1", max_output_tokens=100)
    llm = BudgetedChatModel(
        guard=g, model=ScriptedChatModel(model_name="gpt-4o-mini", report_usage=False)
    )
    with g.task("abandoned") as task:
        stream = cast("Generator[AIMessageChunk]", llm.stream("Tell me about the parcel."))
        first = next(stream)
        stream.close()
        assert task.spent.cost_usd == task.cost_usd  # nothing left reserved
    assert first.text
    assert task.model_calls == 1
    assert task.usage.estimated
    assert 0 < task.usage.output_tokens < 10


# -- async ----------------------------------------------------------------------------------------


async def test_async_invoke_stream_and_batch_are_metered() -> None:
    g = guard(max_cost_usd="1", max_output_tokens=60)
    model = ScriptedChatModel(model_name="gpt-4o-mini", latency=0.01)
    llm = BudgetedChatModel(guard=g, model=model)
    async with g.task("async") as task:
        answer = await llm.ainvoke("hi")
        chunks = [c async for c in llm.astream("hi")]
        batch = await llm.abatch(["a", "b", "c"])
        both = await asyncio.gather(llm.ainvoke("x"), llm.ainvoke("y"))
    assert answer.content
    assert chunks
    assert len(batch) == 3
    assert len(both) == 2
    assert task.model_calls == model.calls == 7
    assert all(s["max_tokens"] == 60 for s in model.seen)
    assert task.usage.output_tokens == 60 * 7
    assert not task.usage.estimated


async def test_async_stop_and_finish() -> None:
    g = guard(max_cost_usd="1", max_model_calls=2, on_limit="finish", finish_output_tokens=20)
    model = ScriptedChatModel(model_name="gpt-4o-mini")
    llm = BudgetedChatModel(guard=g, model=model).bind_tools([lookup])
    async with g.task("async-finish") as task:
        await llm.ainvoke("find")
        final = [c async for c in llm.astream("find")]
        with pytest.raises(ag.BudgetExceeded):
            await llm.ainvoke("find")
    assert final[0].response_metadata["agentguard_final"] is True
    assert model.seen[-1]["tool_choice"] == "none"
    assert model.seen[-1]["max_tokens"] <= 20
    assert task.status == "finished"


async def test_async_calls_await_the_budget_store() -> None:
    # on a networked store (Redis) a sync store operation would block the event loop
    store = LoopCheckingStore()
    g = ag.Guard(
        ag.Policy(max_cost_usd="1", max_model_calls=2, on_limit="finish"), store=store, traces=False
    )
    model = ScriptedChatModel(model_name="gpt-4o-mini")
    llm = BudgetedChatModel(guard=g, model=model, task_id="own").bind_tools([lookup])
    await llm.ainvoke("find")  # outside any task: opens and closes its own, awaited
    async with g.task("async-store") as task:
        await llm.ainvoke("find")
        [c async for c in llm.astream("find")]  # the last call allowed: the final answer
        with pytest.raises(ag.BudgetExceeded):
            await llm.ainvoke("find")
    assert store.blocking == []
    assert store.ops["areserve"] == 3  # one per call made, in both tasks
    assert store.ops["acommit"] == 3
    assert task.model_calls == 2 and task.status == "finished"
    # a call the provider fails releases its reservation through the async API too
    broken = BudgetedChatModel(guard=g, model=FailingChatModel(model_name="gpt-4o-mini"))
    async with g.task("async-fail"):
        with pytest.raises(ConnectionError):
            await broken.ainvoke("find")
    assert store.blocking == []
    assert store.ops["arelease"] == 1


# -- charged once ---------------------------------------------------------------------------------


class _Recorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.metadata: list[dict[str, Any]] = []

    def on_chat_model_start(self, serialized: Any, messages: Any, **kwargs: Any) -> None:
        self.metadata.append(dict(kwargs.get("metadata") or {}))


def test_runs_carry_the_metered_flag_and_ls_params() -> None:
    g = guard(max_cost_usd="1")
    llm = BudgetedChatModel(
        guard=g, model=ScriptedChatModel(model_name="gpt-4o-mini"), max_tokens=42
    )
    recorder = _Recorder()
    chain = ChatPromptTemplate.from_messages([("human", "{q}")]) | llm | StrOutputParser()
    chain.invoke({"q": "hi"}, config={"callbacks": [recorder]})
    list(llm.stream("hi", config={"callbacks": [recorder]}))
    assert len(recorder.metadata) == 2
    for meta in recorder.metadata:
        assert meta[METERED_METADATA_KEY] is True
        assert meta["ls_model_name"] == "gpt-4o-mini"
        assert meta["ls_max_tokens"] == 42


def test_inside_the_middleware_the_wrapper_only_forwards() -> None:
    g = guard(max_cost_usd="1")
    model = ScriptedChatModel(model_name="gpt-4o-mini")
    llm = BudgetedChatModel(guard=g, model=model, models={"gpt-4.1-nano": model})
    with g.task("outer") as task, metered_here():  # what the agent middleware does
        llm.invoke("hi", max_tokens=33)
        list(llm.stream("hi", model="gpt-4.1-nano"))
    assert task.model_calls == 0
    assert [r.task_id for r in records(g)] == ["outer"]
    assert [(s["model"], s["max_tokens"]) for s in model.seen] == [
        ("gpt-4o-mini", 33),
        ("gpt-4o-mini", None),  # a models entry is called as it is
    ]


def test_with_the_callback_handler_attached_a_call_is_charged_once() -> None:
    from agentguard_langchain import AgentGuardCallbackHandler

    g = guard(max_cost_usd="1")
    handler = AgentGuardCallbackHandler(g)
    model = ScriptedChatModel(model_name="gpt-4o-mini", max_tokens=50)
    llm = BudgetedChatModel(guard=g, model=model)
    chain = ChatPromptTemplate.from_messages([("human", "{q}")]) | llm
    with g.task("both") as task:
        chain.invoke({"q": "hi"}, config={"callbacks": [handler]})
        list(chain.stream({"q": "hi"}, config={"callbacks": [handler]}))
    assert model.calls == 2
    assert task.model_calls == 2
    assert len([s for s in spans(g) if s.usage is not None]) == 2


def test_structured_output_through_the_wrapper_is_metered() -> None:
    g = guard(max_cost_usd="1")
    model = ScriptedChatModel(model_name="gpt-4o-mini", tool_args={"query": "1182"})
    structured = BudgetedChatModel(guard=g, model=model).with_structured_output(Lookup)
    with g.task("structured") as task:
        assert structured.invoke("find it") == Lookup(query="1182")
    assert task.model_calls == 1
    assert model.seen[-1]["tool_choice"] == "any"


def test_a_chat_model_is_what_it_wraps_for_langchain() -> None:
    g = guard()
    inner = ScriptedChatModel(model_name="gpt-4o-mini")
    llm = BudgetedChatModel(guard=g, model=inner, models={"gpt-4.1-nano": inner})
    assert isinstance(llm, BaseChatModel)
    assert llm.model_name == "gpt-4o-mini"
    assert llm._identifying_params["ladder"] == ["gpt-4.1-nano"]
    assert llm._get_ls_params(model="gpt-4o")["ls_model_name"] == "gpt-4o"
    assert llm._get_ls_params()["ls_provider"] == "scripted"
