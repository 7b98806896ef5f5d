"""AgentGuardCallbackHandler on real LangChain runnables (no mocks of LangChain).

The model is ``ScriptedChatModel``, a real ``BaseChatModel`` that reports usage consistent
with what it was sent; tools, retrievers, prompts, parsers, parallel maps and retries are
LangChain's own classes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import pytest
from genai_prices import Usage as PriceUsage
from genai_prices import calc_price
from langchain_core.callbacks import CallbackManagerForLLMRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.language_models import BaseLLM
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.outputs import Generation, LLMResult
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import (
    Runnable,
    RunnableConfig,
    RunnableLambda,
    RunnableParallel,
    RunnablePassthrough,
)
from langchain_core.tools import tool
from tenacity import RetryCallState, Retrying, stop_after_attempt

import agentguard as ag
from agentguard import MemorySink
from agentguard_langchain._callbacks import (
    AgentGuardCallbackHandler,
    AsyncAgentGuardCallbackHandler,
)
from agentguard_langchain._common import metered_here
from agentguard_langchain.testing import ScriptedChatModel, count_input_tokens

MODEL = "gpt-4o-mini"
PROMPT = ChatPromptTemplate.from_messages(
    [("system", "You are a support agent for an online shop."), ("user", "{q}")]
)

# -- helpers ---------------------------------------------------------------------------------------


def make_guard(**policy: Any) -> ag.Guard:
    return ag.Guard(ag.Policy(**policy), traces="memory")


def sink_of(guard: ag.Guard) -> MemorySink:
    assert isinstance(guard.sink, MemorySink)
    return guard.sink


def price(usage: Any, model: str = MODEL) -> Decimal:
    """genai-prices' own price of a LangChain ``usage_metadata``."""
    cached = (usage.get("input_token_details") or {}).get("cache_read", 0)
    u = PriceUsage(
        input_tokens=usage["input_tokens"],
        cache_read_tokens=cached,
        output_tokens=usage["output_tokens"],
    )
    return Decimal(calc_price(u, model).total_price)


def assert_idle(handler: AgentGuardCallbackHandler | AsyncAgentGuardCallbackHandler) -> None:
    """No run, call, tool or task is left registered (nothing leaks between runs)."""
    st = handler._runs
    assert (st.runs, st.calls, st.tools, st.retrievers, st.named) == ({}, {}, {}, {}, {})


def merge(chunks: Sequence[BaseMessage]) -> AIMessage | AIMessageChunk:
    total: Any = chunks[0]
    for c in chunks[1:]:
        total = total + c
    assert isinstance(total, AIMessage | AIMessageChunk)
    return total


async def run(
    mode: str, r: Runnable[Any, Any], inputs: list[Any], config: RunnableConfig
) -> list[Any]:
    """Run ``r`` on each input the way ``mode`` says; streams are merged into one message."""
    if mode == "invoke":
        return [r.invoke(i, config) for i in inputs]
    if mode == "ainvoke":
        return [await r.ainvoke(i, config) for i in inputs]
    if mode == "batch":
        return r.batch(inputs, config)
    if mode == "abatch":
        return await r.abatch(inputs, config)
    if mode == "stream":
        return [merge(list(r.stream(i, config))) for i in inputs]
    assert mode == "astream"
    return [merge([c async for c in r.astream(i, config)]) for i in inputs]


MODES = ["invoke", "ainvoke", "batch", "abatch", "stream", "astream"]


# -- every way of running a model charges each call exactly ----------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_every_run_mode_charges_the_reported_usage_exactly(mode: str) -> None:
    g = make_guard(max_cost_usd="1")
    handler = AgentGuardCallbackHandler(g)
    model = ScriptedChatModel(reply_tokens=40, max_tokens=60, cached_fraction=0.25)
    inputs = ["Where is my parcel?", "Can I get a refund for order 1182?", "Thanks!"]
    with g.task("ticket-1") as task:
        msgs = await run(mode, model, inputs, {"callbacks": [handler]})
    assert len(msgs) == 3
    assert all(m.usage_metadata for m in msgs)
    assert task.model_calls == model.calls == 3
    assert task.usage.input_tokens == sum(m.usage_metadata["input_tokens"] for m in msgs)
    assert task.usage.output_tokens == sum(m.usage_metadata["output_tokens"] for m in msgs)
    assert task.usage.cache_read_tokens == sum(
        m.usage_metadata["input_token_details"]["cache_read"] for m in msgs
    )
    assert task.usage.cache_read_tokens > 0
    assert not task.usage.estimated
    assert task.cost_usd == sum(price(m.usage_metadata) for m in msgs)
    assert [t.task_id for t in sink_of(g).tasks] == ["ticket-1"]  # no task of its own
    assert_idle(handler)


@pytest.mark.parametrize("mode", ["ainvoke", "astream", "abatch"])
async def test_the_async_handler_charges_async_runs(mode: str) -> None:
    g = make_guard()
    handler = AsyncAgentGuardCallbackHandler(g)
    model = ScriptedChatModel(reply_tokens=20)
    async with g.task("t") as task:
        msgs = await run(mode, model, ["a", "b"], {"callbacks": [handler]})
    assert task.model_calls == 2
    assert task.cost_usd == sum(price(m.usage_metadata) for m in msgs)
    assert_idle(handler)


async def test_handler_on_the_model_constructor() -> None:
    g = make_guard()
    handler = AgentGuardCallbackHandler(g)
    model = ScriptedChatModel(reply_tokens=20, callbacks=[handler])
    with g.task("t") as task:
        a = model.invoke("hello")
        b = await model.ainvoke("hello again")
        chain = PROMPT | model | StrOutputParser()  # the model's own callbacks, inside a chain
        chain.invoke({"q": "where is it?"})
    assert task.model_calls == 3
    assert task.cost_usd is not None
    assert task.cost_usd > price(a.usage_metadata) + price(b.usage_metadata)
    assert_idle(handler)


async def test_inherited_through_nested_lcel_one_root_task_per_invoke() -> None:
    g = make_guard()
    handler = AgentGuardCallbackHandler(g, tags={"team": "cx", "feature": "faq"})
    model = ScriptedChatModel(replies=["It ships tomorrow."])
    inner = PROMPT | model | StrOutputParser()

    def second_opinion(d: dict[str, Any]) -> str:
        # a runnable calling another without passing config: callbacks follow the context
        return str(d["answer"]) + " / " + inner.invoke({"q": "and the refund?"})

    outer = (
        RunnableParallel(answer=inner, q=RunnablePassthrough())
        | RunnableLambda(second_opinion)
        | RunnableLambda(str.upper)
    )
    out = outer.invoke({"q": "when?"}, config={"callbacks": [handler]})
    assert out == "IT SHIPS TOMORROW. / IT SHIPS TOMORROW."
    out = await outer.ainvoke({"q": "when?"}, config={"callbacks": [handler]})
    tasks = sink_of(g).tasks
    assert len(tasks) == 2  # one task per root run, opened and closed by the handler
    assert [t.model_calls for t in tasks] == [2, 2]
    assert all(t.status == "ok" and t.tags == {"team": "cx", "feature": "faq"} for t in tasks)
    assert tasks[0].task_id != tasks[1].task_id
    spans = sink_of(g).spans_of(tasks[0].task_id)
    assert sorted(s.kind for s in spans) == ["model", "model", "task"]
    assert ag.current_task() is None
    assert_idle(handler)
    # the root tasks' ids were made up per run: the embedded store kept neither line
    assert list(g.store.live) == []  # type: ignore[attr-defined]


async def test_a_bare_model_call_is_its_own_root_task() -> None:
    g = make_guard()
    handler = AgentGuardCallbackHandler(g, task_id="faq-bot")
    model = ScriptedChatModel(reply_tokens=20)
    msg = model.invoke("hi", config={"callbacks": [handler]})
    (rec,) = sink_of(g).tasks
    assert (rec.task_id, rec.status, rec.model_calls) == ("faq-bot", "ok", 1)
    assert rec.cost_usd == price(msg.usage_metadata)
    assert_idle(handler)


async def test_a_chain_that_calls_no_model_opens_no_task() -> None:
    g = make_guard()
    handler = AgentGuardCallbackHandler(g)
    assert (RunnableLambda(str.upper) | StrOutputParser()).invoke("x", {"callbacks": [handler]})
    assert sink_of(g).tasks == []
    assert_idle(handler)


# -- concurrency -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
@pytest.mark.parametrize("user_task", [True, False])
async def test_parallel_branches_charge_one_task_concurrently(mode: str, user_task: bool) -> None:
    g = make_guard(max_cost_usd="1")
    handler = AgentGuardCallbackHandler(g)
    model = ScriptedChatModel(reply_tokens=30, max_tokens=50, latency=0.15)
    branches = RunnableParallel({f"b{i}": PROMPT | model for i in range(4)})
    config: RunnableConfig = {"callbacks": [handler]}
    start = time.perf_counter()
    if user_task:
        with g.task("parallel") as task:
            out = (await run(mode, branches, [{"q": "status?"}], config))[0]
    else:
        out = (await run(mode, branches, [{"q": "status?"}], config))[0]
    elapsed = time.perf_counter() - start
    assert elapsed < 4 * 0.15  # the four calls were in flight together
    msgs = list(out.values())
    (rec,) = sink_of(g).tasks
    assert rec.model_calls == 4
    assert model.calls == 4
    assert rec.cost_usd == sum(price(m.usage_metadata) for m in msgs)
    if user_task:
        assert rec.task_id == "parallel"
        assert task.cost_usd == rec.cost_usd
    assert_idle(handler)


async def test_batch_of_root_runs_with_one_task_id_share_one_task() -> None:
    g = make_guard()
    handler = AgentGuardCallbackHandler(g, task_id="nightly")
    model = ScriptedChatModel(reply_tokens=10, latency=0.1)
    msgs = model.batch(["a", "b", "c", "d"], {"callbacks": [handler]})
    recs = sink_of(g).tasks
    assert [r.task_id for r in recs] == ["nightly"]  # runs in flight together: one task
    assert recs[0].model_calls == 4
    assert recs[0].cost_usd == sum(price(m.usage_metadata) for m in msgs)
    assert_idle(handler)


# -- stops -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["invoke", "ainvoke", "stream", "astream"])
async def test_a_stop_propagates_unchanged_and_spend_stays_within_the_limit(mode: str) -> None:
    limit = Decimal("0.0001")
    g = make_guard(max_cost_usd=limit)
    handler = AgentGuardCallbackHandler(g)
    model = ScriptedChatModel(max_tokens=50)  # each answer is cut at 50 tokens
    chain = PROMPT | model
    with g.task("capped") as task, pytest.raises(ag.BudgetExceeded) as info:
        for _ in range(50):
            await run(
                mode, chain, [{"q": "Summarise the order history."}], {"callbacks": [handler]}
            )
    assert info.value.limit == "max_cost_usd"
    assert info.value.task_id == "capped"
    assert 2 <= task.model_calls == model.calls < 50  # the refused call never reached the model
    assert task.cost_usd is not None
    assert task.cost_usd <= limit
    assert task.spent.cost_usd <= limit  # nothing left reserved
    assert_idle(handler)


async def test_a_refused_root_call_closes_its_task_as_stopped() -> None:
    g = make_guard(max_cost_usd="0.0000001")
    handler = AgentGuardCallbackHandler(g, task_id="tiny")
    with pytest.raises(ag.BudgetExceeded):
        ScriptedChatModel().invoke("hi", {"callbacks": [handler]})
    (rec,) = sink_of(g).tasks
    assert (rec.task_id, rec.status, rec.model_calls, rec.limit_hit) == (
        "tiny",
        "stopped",
        0,
        "max_cost_usd",
    )
    assert_idle(handler)


async def test_a_budget_shared_by_invocations_with_one_task_id() -> None:
    limit = Decimal("0.0001")
    g = make_guard(max_cost_usd=limit)
    handler = AgentGuardCallbackHandler(g, task_id="ticket-9")
    model = ScriptedChatModel(max_tokens=50)
    with pytest.raises(ag.BudgetExceeded):
        for _ in range(50):
            model.invoke("Summarise the order history.", {"callbacks": [handler]})
    recs = sink_of(g).tasks
    assert 3 <= len(recs) < 50
    assert {r.task_id for r in recs} == {"ticket-9"}
    assert sum(r.cost_usd or 0 for r in recs) <= limit
    assert recs[-1].status == "stopped"
    # a named task's line stays in the store: the next run with the id continues from it
    assert g.store.live["task:ticket-9"].committed["cost_usd"] == sum(  # type: ignore[attr-defined]
        r.cost_usd or 0 for r in recs
    )


async def test_a_finish_decision_stops_with_its_reason() -> None:
    g = make_guard(max_model_calls=2, on_limit="finish")
    handler = AgentGuardCallbackHandler(g)
    model = ScriptedChatModel(max_tokens=50)
    with g.task("t") as task:
        model.invoke("one", {"callbacks": [handler]})
        with pytest.raises(ag.BudgetExceeded, match="graceful finish cannot be made") as info:
            model.invoke("two", {"callbacks": [handler]})
    assert info.value.limit == "max_model_calls"
    assert model.calls == task.model_calls == 1
    assert_idle(handler)


async def test_a_downgrade_decision_stops_a_callback_run() -> None:
    g = make_guard(max_cost_usd="0.01", downgrade=[ag.Downgrade(at=0.01, to="gpt-4o-mini")])
    handler = AgentGuardCallbackHandler(g)
    model = ScriptedChatModel(model_name="gpt-4o", max_tokens=200)
    with g.task("t") as task:
        model.invoke("one", {"callbacks": [handler]})  # 0% spent: gpt-4o is allowed
        with pytest.raises(ag.BudgetExceeded, match="cannot switch the model"):
            model.invoke("two", {"callbacks": [handler]})
    assert model.calls == 1
    assert task.spent.cost_usd == task.cost_usd
    assert_idle(handler)


async def test_an_output_cap_below_the_calls_own_cap_stops() -> None:
    g = make_guard(max_output_tokens=20)
    handler = AgentGuardCallbackHandler(g)
    with g.task("t"), pytest.raises(ag.BudgetExceeded, match="set max_tokens <= 20") as info:
        ScriptedChatModel(max_tokens=100).invoke("hi", {"callbacks": [handler]})
    assert (info.value.limit, info.value.limit_value, info.value.actual) == (
        "max_output_tokens",
        20,
        100,
    )
    with g.task("t2") as task:  # a call capped within the policy goes ahead
        ScriptedChatModel(max_tokens=20).invoke("hi", {"callbacks": [handler]})
    assert task.model_calls == 1
    assert_idle(handler)


async def test_a_cap_below_one_is_read_as_no_cap() -> None:
    # -1 is "as many as the model may" for some LangChain models: an uncapped call, not an error
    g = make_guard(max_cost_usd="1")
    handler = AgentGuardCallbackHandler(g)
    with g.task("t") as task:
        ScriptedChatModel(max_tokens=-1).invoke("hi", {"callbacks": [handler]})
        ScriptedChatModel().invoke("hi", {"callbacks": [handler], "max_tokens": 0})
    assert task.model_calls == 2
    assert_idle(handler)


async def test_an_unpriced_model_under_a_cost_limit_is_refused() -> None:
    g = make_guard(max_cost_usd="1")
    handler = AgentGuardCallbackHandler(g)
    with pytest.raises(ag.UnknownModelError):
        ScriptedChatModel(model_name="my-local-llm").invoke("hi", {"callbacks": [handler]})
    assert_idle(handler)


# -- tools, retrievers, retries --------------------------------------------------------------------


@tool
def search(query: str) -> str:
    """Search the order database."""
    return f"{query}: shipped on Monday"


@tool
def broken(query: str) -> str:
    """A tool that fails."""
    raise RuntimeError("database down")


def tool_chain(model: ScriptedChatModel, tools: list[Any]) -> Runnable[Any, Any]:
    by_name = {t.name: t for t in tools}

    def run_tools(msg: AIMessage) -> list[Any]:
        return [by_name[tc["name"]].invoke(tc) for tc in msg.tool_calls]

    return PROMPT | model.bind_tools(tools) | RunnableLambda(run_tools)


async def test_tool_calls_are_counted_and_their_schemas_reserved() -> None:
    g = make_guard()
    handler = AgentGuardCallbackHandler(g)
    model = ScriptedChatModel(parallel_tool_calls=3)
    with g.task("t") as task:
        out = tool_chain(model, [search]).invoke({"q": "order 1182?"}, {"callbacks": [handler]})
    assert [type(m) for m in out] == [ToolMessage] * 3
    assert task.tool_calls == 3
    assert task.tool_calls_by_name == {"search": 3}
    spans = sink_of(g).spans_of("t")
    tools = [s for s in spans if s.kind == "tool"]
    assert [(s.name, s.status, s.end is not None) for s in tools] == [("search", "ok", True)] * 3
    (call,) = [s for s in spans if s.kind == "model"]
    sent = model.seen[0]
    assert sent["tools"] == 1
    without_tools = count_input_tokens(MODEL, PROMPT.invoke({"q": "order 1182?"}).to_messages())
    assert call.usage is not None
    assert call.usage.input_tokens > without_tools
    assert call.attrs["input_estimate"] >= call.usage.input_tokens  # and reserved
    assert_idle(handler)


async def test_a_tool_cap_stops_the_chain() -> None:
    g = make_guard(tool_limits={"search": 2})
    handler = AgentGuardCallbackHandler(g)
    model = ScriptedChatModel(parallel_tool_calls=3)
    with g.task("t") as task, pytest.raises(ag.BudgetExceeded) as info:
        await tool_chain(model, [search]).ainvoke({"q": "x"}, {"callbacks": [handler]})
    assert info.value.limit == "tool_limits.search"
    assert task.tool_calls == 2
    assert_idle(handler)


async def test_a_tool_block_cannot_be_carried_out_by_a_callback() -> None:
    g = make_guard(max_tool_calls=1, on_limit="finish")
    handler = AgentGuardCallbackHandler(g)
    model = ScriptedChatModel(parallel_tool_calls=2)
    with g.task("t"), pytest.raises(ag.BudgetExceeded, match="cannot skip a tool") as info:
        tool_chain(model, [search]).invoke({"q": "x"}, {"callbacks": [handler]})
    assert info.value.limit == "max_tool_calls"
    assert [s.status for s in sink_of(g).spans_of("t") if s.kind == "tool"] == ["ok", "blocked"]
    assert_idle(handler)


async def test_a_failing_tool_is_recorded_and_its_error_propagates() -> None:
    g = make_guard()
    handler = AgentGuardCallbackHandler(g)
    with g.task("t") as task, pytest.raises(RuntimeError, match="database down"):
        tool_chain(ScriptedChatModel(), [broken]).invoke({"q": "x"}, {"callbacks": [handler]})
    (span,) = [s for s in sink_of(g).spans_of("t") if s.kind == "tool"]
    assert (span.name, span.status, span.attrs["error"]) == ("broken", "error", "RuntimeError")
    assert task.model_calls == 1
    assert_idle(handler)


DOCS = [
    "Order 1182 left the warehouse on Monday.",
    "Refunds of shipping fees take five working days.",
    "Late parcels are refunded automatically.",
]


class OrderDocs(BaseRetriever):
    """A real retriever over three fixed documents."""

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        return [Document(page_content=t, metadata={"score": 1.0}) for t in DOCS]


async def test_retrievals_are_recorded_without_their_text() -> None:
    g = make_guard()
    handler = AgentGuardCallbackHandler(g)

    def join(docs: list[Document]) -> str:
        return "\n".join(d.page_content for d in docs)

    rag = (
        {"context": OrderDocs() | RunnableLambda(join), "q": RunnablePassthrough()}
        | ChatPromptTemplate.from_messages([("user", "{context}\n\n{q}")])
        | ScriptedChatModel()
    )
    with g.task("rag") as task:
        rag.invoke("Where is order 1182?", {"callbacks": [handler]})
        await rag.ainvoke("Where is order 1182?", {"callbacks": [handler]})
    spans = sink_of(g).spans_of("rag")
    found = [s for s in spans if s.kind == "retrieval"]
    counter = ag.counter_for(None)
    tokens = sum(counter.count(t) for t in DOCS)
    assert [(s.name, s.attrs["documents"], s.attrs["tokens"]) for s in found] == [
        ("OrderDocs", 3, tokens)
    ] * 2
    assert task.model_calls == 2
    assert not any(DOCS[0] in repr(s) for s in spans)  # no document or prompt text kept
    assert_idle(handler)


def flaky_step(failures: int) -> Runnable[Any, Any]:
    state = {"n": 0}

    def step(x: Any) -> Any:
        state["n"] += 1
        if state["n"] <= failures:
            raise ConnectionError(f"attempt {state['n']} failed")
        return x

    return RunnableLambda(step).with_retry(stop_after_attempt=5, wait_exponential_jitter=False)


async def test_runnable_retries_are_counted() -> None:
    g = make_guard()
    handler = AgentGuardCallbackHandler(g)
    chain = flaky_step(2) | PROMPT | ScriptedChatModel()
    with g.task("t") as task:
        chain.invoke({"q": "x"}, {"callbacks": [handler]})
    assert task.retries == 2
    assert [s.name for s in sink_of(g).spans_of("t") if s.kind == "retry"] == [
        "attempt 2",
        "attempt 3",
    ]
    async_chain = flaky_step(1) | PROMPT | ScriptedChatModel()
    async with g.task("t2") as task2:
        await async_chain.ainvoke({"q": "x"}, {"callbacks": [handler]})
    assert task2.retries == 1
    assert_idle(handler)


async def test_retries_past_max_retries_stop_the_run() -> None:
    g = make_guard(max_retries=1)
    handler = AgentGuardCallbackHandler(g)
    model = ScriptedChatModel()
    chain = flaky_step(3) | PROMPT | model
    with g.task("t") as task, pytest.raises(ag.BudgetExceeded) as info:
        chain.invoke({"q": "x"}, {"callbacks": [handler]})
    assert info.value.limit == "max_retries"
    assert task.retries == 1
    assert model.calls == 0
    assert_idle(handler)


class FlakyLLM(BaseLLM):
    """A text-completion model whose provider call fails ``failures`` times; it retries the way
    LLM integrations do, reporting each retry through ``run_manager.on_retry``."""

    failures: int = 2

    @property
    def _llm_type(self) -> str:
        return "flaky"

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        calls = {"n": 0}

        def before_sleep(state: RetryCallState) -> None:
            if run_manager is not None:
                run_manager.on_retry(state)

        for attempt in Retrying(
            stop=stop_after_attempt(5), before_sleep=before_sleep, reraise=True
        ):
            with attempt:
                calls["n"] += 1
                if calls["n"] <= self.failures:
                    raise ConnectionError("provider busy")
        usage = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
        return LLMResult(
            generations=[[Generation(text="All good.")] for _ in prompts],
            llm_output={"token_usage": usage, "model_name": MODEL},
        )

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> Any:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_model_name"] = MODEL
        return params


async def test_on_retry_and_text_completion_models() -> None:
    g = make_guard(max_retries=5)
    handler = AgentGuardCallbackHandler(g)
    with g.task("t") as task:
        assert FlakyLLM().invoke("status?", {"callbacks": [handler]}) == "All good."
    assert task.retries == 2
    assert [s.name for s in sink_of(g).spans_of("t") if s.kind == "retry"] == [
        "retry after ConnectionError"
    ] * 2
    assert (task.usage.input_tokens, task.usage.output_tokens) == (12, 3)
    assert task.cost_usd == price({"input_tokens": 12, "output_tokens": 3})
    g2 = make_guard(max_retries=1)
    h2 = AgentGuardCallbackHandler(g2)
    with g2.task("t") as task, pytest.raises(ag.BudgetExceeded):
        FlakyLLM(failures=3).invoke("status?", {"callbacks": [h2]})
    assert task.retries == 1
    assert task.spent.cost_usd == 0
    assert_idle(handler)
    assert_idle(h2)


# -- missing usage, interrupted streams ------------------------------------------------------------


@pytest.mark.parametrize("mode", ["invoke", "stream", "astream"])
async def test_missing_usage_is_estimated_and_marked(mode: str) -> None:
    g = make_guard()
    handler = AgentGuardCallbackHandler(g)
    model = ScriptedChatModel(replies=["The parcel arrives on Friday."], report_usage=False)
    with g.task("t") as task:
        (msg,) = await run(mode, model, ["Where is my parcel?"], {"callbacks": [handler]})
    assert msg.usage_metadata is None
    assert task.usage.estimated
    (span,) = [s for s in sink_of(g).spans_of("t") if s.kind == "model"]
    assert span.attrs["estimated"] is True
    assert span.usage is not None
    assert span.usage.output_tokens == ag.counter_for(MODEL).count("The parcel arrives on Friday.")
    assert span.usage.input_tokens == count_input_tokens(MODEL, [_human("Where is my parcel?")])
    assert_idle(handler)


def _human(text: str) -> BaseMessage:
    from langchain_core.messages import HumanMessage

    return HumanMessage(text)


async def test_an_abandoned_stream_charges_what_was_generated() -> None:
    g = make_guard()
    handler = AgentGuardCallbackHandler(g)
    model = ScriptedChatModel(reply_tokens=100)
    stream: Any = model.stream("Tell me everything.", {"callbacks": [handler]})
    first = next(stream)
    stream.close()  # the consumer stops reading
    (rec,) = sink_of(g).tasks
    (span,) = [s for s in sink_of(g).spans_of(rec.task_id) if s.kind == "model"]
    assert span.attrs["interrupted"] == "GeneratorExit"
    assert span.attrs["estimated"] is True
    assert span.usage is not None
    assert span.usage.output_tokens == ag.counter_for(MODEL).count(first.content)
    assert rec.status == "error"
    assert_idle(handler)

    astream: Any = model.astream("Tell me everything.", {"callbacks": [handler]})
    await astream.__anext__()
    await astream.aclose()
    assert len(sink_of(g).tasks) == 2
    assert_idle(handler)


# -- charged once ----------------------------------------------------------------------------------


async def test_attached_twice_or_by_two_handlers_charges_once() -> None:
    g = make_guard()
    h1, h2 = AgentGuardCallbackHandler(g), AgentGuardCallbackHandler(g)
    model = ScriptedChatModel(reply_tokens=20, callbacks=[h1])
    chain = PROMPT | model | StrOutputParser()
    with g.task("t") as task:
        chain.invoke({"q": "a"}, {"callbacks": [h1, h2]})
        await chain.ainvoke({"q": "b"}, {"callbacks": [h2, h1]})
        tool_chain(ScriptedChatModel(callbacks=[h2]), [search]).invoke(
            {"q": "c"}, {"callbacks": [h1]}
        )
        assert task.spent.model_calls == 3  # nothing reserved twice and left open
    assert task.model_calls == 3
    assert task.tool_calls == 1
    # no current task: the two handlers share one root task per run
    chain.invoke({"q": "d"}, {"callbacks": [h1, h2]})
    recs = sink_of(g).tasks
    assert len(recs) == 2
    assert recs[1].model_calls == 1
    assert_idle(h1)


async def test_calls_metered_elsewhere_are_not_charged_again() -> None:
    g = make_guard()
    handler = AgentGuardCallbackHandler(g)
    model = ScriptedChatModel(reply_tokens=20)
    with g.task("t") as task:
        with metered_here():  # what the middleware / wrapper does around the calls it meters
            model.invoke("hi", {"callbacks": [handler]})
            await model.ainvoke("hi", {"callbacks": [handler]})
            list(model.stream("hi", {"callbacks": [handler]}))
            tool_chain(ScriptedChatModel(), [search]).invoke({"q": "x"}, {"callbacks": [handler]})
        assert (task.model_calls, task.tool_calls) == (0, 0)
        model.invoke("hi", {"callbacks": [handler]})  # outside: charged
    assert task.model_calls == 1
    assert_idle(handler)


async def test_runs_whose_events_come_from_a_thread_without_the_context() -> None:
    """A plain thread does not copy the caller's context: the call still charges the task of
    the run it belongs to (found through its parent run), not a new one."""
    import threading

    g = make_guard()
    handler = AgentGuardCallbackHandler(g)
    model = ScriptedChatModel(reply_tokens=20)

    def in_plain_thread(x: str, config: RunnableConfig) -> Any:
        out: dict[str, Any] = {}

        def work() -> None:
            assert ag.current_task() is None
            out["msg"] = model.invoke(x, config)

        t = threading.Thread(target=work)
        t.start()
        t.join()
        return out["msg"]

    with g.task("t") as task:
        RunnableLambda(in_plain_thread).invoke("hi", {"callbacks": [handler]})
    assert task.model_calls == 1
    assert [r.task_id for r in sink_of(g).tasks] == ["t"]
    # and without a user task, the root run's task
    RunnableLambda(in_plain_thread).invoke("hi", {"callbacks": [handler]})
    assert [r.model_calls for r in sink_of(g).tasks] == [1, 1]
    assert_idle(handler)


async def test_a_budgeted_chat_model_run_is_left_to_the_wrapper() -> None:
    """The wrapper's own run starts before it enters ``metered_here()``; its metadata flag
    tells the handler the call is metered by the wrapper."""
    from agentguard_langchain._callbacks import _METERED_KEY
    from agentguard_langchain._chat_model import METERED_METADATA_KEY, BudgetedChatModel

    assert _METERED_KEY == METERED_METADATA_KEY
    g = make_guard(max_cost_usd="1")
    handler = AgentGuardCallbackHandler(g)
    model = ScriptedChatModel(max_tokens=50)
    llm = BudgetedChatModel(guard=g, model=model)
    with g.task("both") as task:
        (PROMPT | llm).invoke({"q": "hi"}, {"callbacks": [handler]})
        await (PROMPT | llm).ainvoke({"q": "hi"}, {"callbacks": [handler]})
        list(llm.stream("hi", {"callbacks": [handler]}))
        assert task.spent.model_calls == 3
    assert model.calls == task.model_calls == 3
    assert_idle(handler)


async def test_a_task_of_another_guard_is_not_charged() -> None:
    g, other = make_guard(), make_guard()
    handler = AgentGuardCallbackHandler(g)
    with other.task("theirs") as theirs:
        ScriptedChatModel().invoke("hi", {"callbacks": [handler]})
    assert theirs.model_calls == 0
    assert [r.model_calls for r in sink_of(g).tasks] == [1]


def _as_mapping(m: Any) -> Any:
    """A LangChain message as the plain mapping of the same message (role, content, name,
    tool calls, tool call id, extra kwargs); anything else as it is."""
    fields = getattr(m, "__dict__", None)
    if not fields or "type" not in fields or "content" not in fields:
        return m
    d = {"role": fields.get("role") or fields["type"], "content": fields["content"]}
    for key in ("name", "tool_calls", "tool_call_id", "additional_kwargs"):
        if fields.get(key):
            d[key] = fields[key]
    return d


def test_message_objects_count_as_the_same_messages_given_as_mappings() -> None:
    """The handler and the middleware hand the counter LangChain's message objects (their
    counts are kept across calls); each counts exactly as the same message as a mapping."""
    from langchain_core.messages import ChatMessage, HumanMessage, SystemMessage

    msgs: list[Any] = [
        SystemMessage("You help."),
        HumanMessage("hi", name="bob"),
        HumanMessage(
            [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "x"}}]
        ),
        HumanMessage([{"type": "text", "text": "and this photo"}, {"type": "image_url"}]),
        AIMessage("", tool_calls=[{"name": "search", "args": {"q": "x"}, "id": "c1"}]),
        ToolMessage("result", tool_call_id="c1"),
        ToolMessage("order 1182: shipped late", tool_call_id="c1", name="lookup"),
        AIMessage(
            "",
            additional_kwargs={
                "tool_calls": [
                    {"id": "c2", "type": "function", "function": {"name": "s", "arguments": "{}"}}
                ]
            },
        ),
        AIMessage("", additional_kwargs={"function_call": {"name": "x", "arguments": "{}"}}),
        ChatMessage(role="critic", content="meh"),
        AIMessageChunk(content="partial"),
        AIMessage("It ships on Friday."),
        "a bare prompt string",
    ]
    for model in ("gpt-4o", "gpt-4o-mini", "gpt-4", "gpt-3.5-turbo", "claude-3-5-haiku"):
        counter = ag.counter_for(model)
        for m in msgs:
            assert counter.count_messages([_as_mapping(m)]) == counter.count_messages([m]), m
        assert counter.count_messages([_as_mapping(m) for m in msgs]) == counter.count_messages(
            msgs
        )


def test_handler_flags_and_tag_names() -> None:
    g = make_guard()
    for cls in (AgentGuardCallbackHandler, AsyncAgentGuardCallbackHandler):
        h = cls(g)
        assert h.raise_error is True
        assert h.run_inline is True
    with pytest.raises(ValueError, match="'policy' cannot be a tag name"):
        AgentGuardCallbackHandler(g, tags={"policy": "x"})


async def test_inline_in_async_runs_no_thread_hop() -> None:
    """run_inline: in ``ainvoke`` the sync handler runs on the event loop's thread, in order."""
    import threading

    g = make_guard()
    seen: list[str] = []

    class Spy(AgentGuardCallbackHandler):
        def on_llm_end(self, response: LLMResult, *, run_id: Any, **kwargs: Any) -> None:
            seen.append(threading.current_thread().name)
            super().on_llm_end(response, run_id=run_id, **kwargs)

    await asyncio.gather(
        *(ScriptedChatModel().ainvoke("hi", {"callbacks": [Spy(g)]}) for _ in range(3))
    )
    assert seen == [threading.current_thread().name] * 3
