"""The real ``ChatOpenAI`` (langchain-openai) against a local OpenAI-compatible server.

The server (``agentguard.testing.OpenAIServer``) reports usage the way OpenAI does, cache reads
and reasoning tokens included; each test checks that the guard recorded exactly genai-prices'
price of the tokens the server reported — for plain calls and for streams — and that a stream
sent without usage is estimated and marked.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from genai_prices import Usage as PriceUsage
from genai_prices import calc_price
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.runnables import RunnableLambda
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

import agentguard as ag
from agentguard import MemorySink
from agentguard.testing import OpenAIServer
from agentguard_langchain._callbacks import AgentGuardCallbackHandler

MODEL = "gpt-4o-mini"
REPORTED = "gpt-4o-mini-2024-07-18"  # what OpenAI answers with: a dated snapshot name


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[OpenAIServer]:
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    with OpenAIServer(model=REPORTED, cached_fraction=0.5, reasoning_tokens=7) as s:
        yield s


def chat(server: OpenAIServer, **kwargs: Any) -> ChatOpenAI:
    kwargs.setdefault("stream_usage", True)
    return ChatOpenAI(
        base_url=server.base_url, api_key="test", model=MODEL, max_retries=0, **kwargs
    )


def make_guard(**policy: Any) -> ag.Guard:
    return ag.Guard(ag.Policy(**policy), traces="memory")


def spans(guard: ag.Guard, task_id: str, kind: str) -> list[ag.Span]:
    assert isinstance(guard.sink, MemorySink)
    return [s for s in guard.sink.spans_of(task_id) if s.kind == kind]


def price_of(reported: dict[str, Any] | None) -> Decimal:
    """genai-prices' price of exactly the tokens an OpenAI ``usage`` object reports."""
    assert reported is not None
    u = PriceUsage(
        input_tokens=reported["prompt_tokens"],
        cache_read_tokens=reported["prompt_tokens_details"]["cached_tokens"],
        output_tokens=reported["completion_tokens"],
    )
    return Decimal(calc_price(u, MODEL).total_price)


async def call(mode: str, model: Any, text: str, handler: AgentGuardCallbackHandler) -> Any:
    config: Any = {"callbacks": [handler]}
    if mode == "invoke":
        return model.invoke(text, config)
    if mode == "ainvoke":
        return await model.ainvoke(text, config)
    if mode == "stream":
        chunks = list(model.stream(text, config))
    else:
        chunks = [c async for c in model.astream(text, config)]
    total = chunks[0]
    for c in chunks[1:]:
        total = total + c
    return total


@pytest.mark.parametrize("mode", ["invoke", "ainvoke", "stream", "astream"])
async def test_recorded_cost_is_the_price_of_the_reported_tokens(
    server: OpenAIServer, mode: str
) -> None:
    g = make_guard(max_cost_usd="0.50")
    handler = AgentGuardCallbackHandler(g)
    model = chat(server, max_tokens=400)
    with g.task("t") as task:
        await call(mode, model, "Where is my parcel? It is order 1182.", handler)
        await call(mode, model, "And when is the refund due?", handler)
    assert len(server.usages) == 2
    assert all(server.usages)
    if mode in ("stream", "astream"):
        assert all(r["stream_options"] == {"include_usage": True} for r in server.requests)
    assert task.cost_usd == sum(price_of(u) for u in server.usages)
    reported = server.usages
    assert task.usage.input_tokens == sum(u["prompt_tokens"] for u in reported)  # type: ignore[index]
    assert task.usage.cache_read_tokens == sum(
        u["prompt_tokens_details"]["cached_tokens"]  # type: ignore[index]
        for u in reported
    )
    assert task.usage.cache_read_tokens > 0
    assert task.usage.output_tokens == sum(u["completion_tokens"] for u in reported)  # type: ignore[index]
    assert task.usage.reasoning_tokens == 14
    assert not task.usage.estimated
    calls = spans(g, "t", "model")
    assert [s.attrs.get("reported_model") for s in calls] == [REPORTED] * 2
    assert [s.attrs["max_tokens"] for s in calls] == [400] * 2  # the call's own cap, reserved
    assert [r["max_completion_tokens"] for r in server.requests] == [400] * 2


@pytest.mark.parametrize("mode", ["stream", "astream"])
async def test_a_stream_without_usage_is_estimated_and_marked(
    server: OpenAIServer, mode: str
) -> None:
    g = make_guard()
    handler = AgentGuardCallbackHandler(g)
    model = chat(server, stream_usage=False)
    with g.task("t") as task:
        msg = await call(mode, model, "Where is my parcel?", handler)
    assert server.usages == [None]
    assert "stream_options" not in server.requests[0]
    assert msg.usage_metadata is None
    (span,) = spans(g, "t", "model")
    assert span.attrs["estimated"] is True
    assert task.usage.estimated
    assert span.usage is not None
    assert span.usage.output_tokens == ag.counter_for(MODEL).count(msg.content)
    assert span.usage.input_tokens > 0
    assert task.cost_usd is not None
    assert task.cost_usd > 0


async def test_the_output_cap_is_honoured_and_charged(server: OpenAIServer) -> None:
    g = make_guard(max_cost_usd="0.50")
    handler = AgentGuardCallbackHandler(g)
    with g.task("t") as task:
        msg = chat(server, max_tokens=5).invoke("Tell me everything.", {"callbacks": [handler]})
    assert msg.response_metadata["finish_reason"] == "length"
    assert task.usage.output_tokens == 5 + 7  # five words and the reasoning tokens
    assert task.cost_usd == price_of(server.usages[0])


async def test_a_budget_stop_never_reaches_the_server(server: OpenAIServer) -> None:
    limit = Decimal("0.0001")
    g = make_guard(max_cost_usd=limit)
    handler = AgentGuardCallbackHandler(g)
    model = chat(server, max_tokens=40)
    with g.task("t") as task, pytest.raises(ag.BudgetExceeded):
        for _ in range(100):
            model.invoke("Summarise order 1182.", {"callbacks": [handler]})
    assert 2 <= len(server.requests) == task.model_calls < 100
    assert task.cost_usd == sum(price_of(u) for u in server.usages)
    assert task.cost_usd is not None
    assert task.cost_usd <= limit


@tool
def lookup(query: str) -> str:
    """Look an order up."""
    return f"{query}: shipped"


async def test_tool_calls_through_chat_openai(server: OpenAIServer) -> None:
    server.tool_calls = 1
    g = make_guard(max_cost_usd="0.50", tool_limits={"lookup": 5})
    handler = AgentGuardCallbackHandler(g)
    model = chat(server, max_tokens=200).bind_tools([lookup])

    def run_tools(msg: AIMessage) -> list[Any]:
        return [lookup.invoke(tc) for tc in msg.tool_calls]

    with g.task("t") as task:
        out = (model | RunnableLambda(run_tools)).invoke("order 1182?", {"callbacks": [handler]})
    assert [type(m) for m in out] == [ToolMessage]
    assert server.requests[0]["tools"][0]["function"]["name"] == "lookup"
    assert task.tool_calls_by_name == {"lookup": 1}
    assert task.cost_usd == price_of(server.usages[0])
    (call_span,) = spans(g, "t", "model")
    assert call_span.attrs["input_estimate"] > ag.counter_for(MODEL).count_messages(
        [{"role": "user", "content": "order 1182?"}]
    )  # the tool schema is part of the reservation
