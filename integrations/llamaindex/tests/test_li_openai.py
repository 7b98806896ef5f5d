"""LlamaIndex's real ``OpenAI`` LLM (llama-index-llms-openai, the real ``openai`` client over
HTTP) against a local server speaking the OpenAI wire format: what the guard records is
exactly what the server reported, priced as genai-prices prices those tokens — plain answers
and streams (``stream_options.include_usage``), cached and reasoning tokens included."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from genai_prices import Usage as PriceUsage
from genai_prices import calc_price
from llama_index.core.base.llms.types import ChatMessage
from llama_index.llms.openai import OpenAI

import agentguard as ag
from agentguard import MemorySink
from agentguard.testing import OpenAIServer
from agentguard_llamaindex import BudgetedLLM, instrument

MODEL = "gpt-4o-mini"
REPORTED = "gpt-4o-mini-2024-07-18"
QUESTIONS = ["Where is my parcel? It is order 1182.", "And when is the refund due?"]


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[OpenAIServer]:
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    with OpenAIServer(model=REPORTED, cached_fraction=0.5, reasoning_tokens=7) as s:
        yield s


def openai(server: OpenAIServer, *, include_usage: bool = True, **kwargs: Any) -> OpenAI:
    extra = {"stream_options": {"include_usage": True}} if include_usage else {}
    return OpenAI(
        model=MODEL,
        api_key="test",
        api_base=server.base_url,
        max_retries=0,
        additional_kwargs=extra,
        **kwargs,
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


async def ask(mode: str, llm: Any, text: str) -> str:
    messages = [ChatMessage(role="user", content=text)]
    if mode == "chat":
        return str(llm.chat(messages).message.content)
    if mode == "achat":
        return str((await llm.achat(messages)).message.content)
    if mode == "stream":
        return str(list(llm.stream_chat(messages))[-1].message.content)
    if mode == "astream":
        return str([r async for r in await llm.astream_chat(messages)][-1].message.content)
    if mode == "complete":
        return llm.complete(text).text  # type: ignore[no-any-return]
    return str(list(llm.stream_complete(text))[-1].text)


MODES = ["chat", "achat", "stream", "astream", "complete", "stream_complete"]


def assert_exact(task: ag.Task, server: OpenAIServer) -> None:
    reported = server.usages
    assert len(reported) == 2
    assert all(reported)
    assert task.cost_usd == sum(price_of(u) for u in reported)
    assert task.usage.input_tokens == sum(u["prompt_tokens"] for u in reported)  # type: ignore[index]
    assert task.usage.cache_read_tokens == sum(
        u["prompt_tokens_details"]["cached_tokens"]  # type: ignore[index]
        for u in reported
    )
    assert task.usage.cache_read_tokens > 0
    assert task.usage.output_tokens == sum(u["completion_tokens"] for u in reported)  # type: ignore[index]
    assert task.usage.reasoning_tokens == 14
    assert not task.usage.estimated
    assert task.model_calls == 2


@pytest.mark.parametrize("mode", MODES)
async def test_handler_records_the_price_of_the_reported_tokens(
    server: OpenAIServer, mode: str
) -> None:
    g = make_guard(max_cost_usd="0.50")
    llm = openai(server, max_tokens=400)
    with instrument(g), g.task("t") as task:
        for q in QUESTIONS:
            assert await ask(mode, llm, q)
    if "stream" in mode:
        assert all(r["stream_options"] == {"include_usage": True} for r in server.requests)
    assert_exact(task, server)
    calls = spans(g, "t", "model")
    assert [s.attrs.get("reported_model") for s in calls] == [REPORTED] * 2
    assert [s.attrs["max_tokens"] for s in calls] == [400] * 2  # the call's own cap, reserved
    assert task.spent.cost_usd == task.cost_usd  # every reservation settled


@pytest.mark.parametrize("mode", MODES)
async def test_budgeted_llm_binds_the_cap_and_records_exactly(
    server: OpenAIServer, mode: str
) -> None:
    g = make_guard(max_cost_usd="0.50", max_output_tokens=300)
    llm = BudgetedLLM(guard=g, llm=openai(server))
    with instrument(g), g.task("t") as task:  # the handler attached too: charged once
        for q in QUESTIONS:
            assert await ask(mode, llm, q)
    assert [r["max_tokens"] for r in server.requests] == [300, 300]
    assert_exact(task, server)
    assert task.spent.cost_usd == task.cost_usd


@pytest.mark.parametrize("mode", ["stream", "astream", "stream_complete"])
async def test_a_stream_without_usage_is_estimated_and_marked(
    server: OpenAIServer, mode: str
) -> None:
    g = make_guard(max_cost_usd="0.50")
    llm = openai(server, include_usage=False)
    with instrument(g), g.task("t") as task:
        await ask(mode, llm, QUESTIONS[0])
    assert server.usages == [None]
    assert task.usage.estimated
    assert task.usage.output_tokens > 0
    assert task.cost_usd is not None and task.cost_usd > 0
    (span,) = spans(g, "t", "model")
    assert span.attrs["estimated"] is True


@pytest.mark.parametrize("wrapped", [False, True])
def test_an_abandoned_stream_is_charged_and_frees_its_reservation(
    server: OpenAIServer, wrapped: bool
) -> None:
    g = make_guard(max_cost_usd="0.50")
    llm: Any = openai(server, include_usage=False)
    if wrapped:
        llm = BudgetedLLM(guard=g, llm=llm)
    with instrument(g), g.task("t") as task:
        stream = llm.stream_chat([ChatMessage(role="user", content=QUESTIONS[0])])
        next(stream)  # the role chunk
        assert next(stream).delta
        stream.close()  # the consumer walks away after the first words
        assert task.model_calls == 1
        assert task.usage.estimated
        assert task.usage.output_tokens >= 1
        spent = task.spent
        assert spent.cost_usd == task.cost_usd  # nothing left reserved
        assert spent.model_calls == 1


def test_a_budget_stop_from_the_wrapper_never_reaches_the_server(server: OpenAIServer) -> None:
    g = make_guard(max_cost_usd="0.000001")
    llm = BudgetedLLM(guard=g, llm=openai(server))
    with g.task("t") as task, pytest.raises(ag.BudgetExceeded) as info:
        llm.chat([ChatMessage(role="user", content=QUESTIONS[0] * 20)])
    assert info.value.limit == "max_cost_usd"
    assert server.requests == []
    assert task.model_calls == 0
    assert task.spent.cost_usd == 0


def test_the_rate_limiter_hook_stops_the_users_own_llm(server: OpenAIServer) -> None:
    g = make_guard(max_model_calls=1)
    inst = instrument(g)
    try:
        llm = openai(server)
        llm.rate_limiter = inst.rate_limiter()
        with g.task("t") as task:
            assert llm.chat([ChatMessage(role="user", content=QUESTIONS[0])]).message.content
            with pytest.raises(ag.BudgetExceeded) as info:
                llm.chat([ChatMessage(role="user", content=QUESTIONS[1])])
    finally:
        inst.detach()
    assert info.value.limit == "max_model_calls"
    assert len(server.requests) == 1  # the refused call never went out
    assert task.model_calls == 1
    assert task.spent.model_calls == 1  # the refused call's slot is not held


def test_tool_calls_through_openai_and_budgeted_llm(server: OpenAIServer) -> None:
    from llama_index.core.tools import FunctionTool

    def lookup(order: str) -> str:
        """Look an order up."""
        return f"order {order}: shipped"

    tool = FunctionTool.from_defaults(lookup)
    server.tool_calls = 1
    g = make_guard(max_cost_usd="0.50", max_output_tokens=200)
    llm = BudgetedLLM(guard=g, llm=openai(server))
    with g.task("t") as task:
        response = llm.chat_with_tools([tool], user_msg="Where is order 1182?")
        calls = llm.get_tool_calls_from_response(response, error_on_no_tool_call=True)
    assert [c.tool_name for c in calls] == ["lookup"]
    assert server.requests[0]["tools"][0]["function"]["name"] == "lookup"
    assert "_agentguard_tools" not in server.requests[0]
    assert task.cost_usd == price_of(server.usages[0])
