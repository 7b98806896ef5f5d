"""``AsyncAgentGuardCallbackHandler`` awaits every budget-store operation: on a networked store
(Redis) a sync operation would block the event loop for a round trip. Checked with
``LoopCheckingStore`` (which notes sync operations made while a loop runs on their thread) on
real LangChain runnables — a retried step, a retriever, a tool-calling model and its tools —
and the async handler must decide and charge exactly as the sync one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from langchain_core.documents import Document
from langchain_core.messages import AIMessage
from langchain_core.outputs import ChatResult
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable, RunnableLambda, RunnablePassthrough
from langchain_core.tools import BaseTool, StructuredTool
from test_lc_callbacks import PROMPT, OrderDocs, flaky_step

import agentguard as ag
from agentguard.testing import LoopCheckingStore
from agentguard_langchain._callbacks import (
    AgentGuardCallbackHandler,
    AsyncAgentGuardCallbackHandler,
    _Meter,
)
from agentguard_langchain.testing import ScriptedChatModel


def guard_on(store: LoopCheckingStore, **policy: Any) -> ag.Guard:
    return ag.Guard(ag.Policy(**policy), store=store, traces="memory")


def _search(query: str) -> str:
    return f"{query}: shipped on Monday"


async def _asearch(query: str) -> str:
    return _search(query)


def _broken(query: str) -> str:
    raise RuntimeError("database down")


async def _abroken(query: str) -> str:
    return _broken(query)


# tools with a coroutine: under ``ainvoke`` their runs are async runs (a sync-only tool runs in
# a thread, where LangChain runs an async handler in a throwaway loop and swallows its errors)
search = StructuredTool.from_function(
    _search, coroutine=_asearch, name="search", description="Search the order database."
)
broken = StructuredTool.from_function(
    _broken, coroutine=_abroken, name="broken", description="A tool that fails."
)


def tool_chain(model: ScriptedChatModel, tools: list[BaseTool]) -> Runnable[Any, Any]:
    """A tool-calling model and its tools, run with ``invoke`` or awaited with ``ainvoke``
    (so under ``ainvoke`` the tools' runs are async runs too)."""
    by_name = {t.name: t for t in tools}

    def run_tools(msg: AIMessage) -> list[Any]:
        return [by_name[tc["name"]].invoke(tc) for tc in msg.tool_calls]

    async def arun_tools(msg: AIMessage) -> list[Any]:
        return [await by_name[tc["name"]].ainvoke(tc) for tc in msg.tool_calls]

    return PROMPT | model.bind_tools(tools) | RunnableLambda(run_tools, afunc=arun_tools)


def rag_with_tools(model: ScriptedChatModel) -> Runnable[Any, Any]:
    """A retried step, a retrieval, a tool-calling model call and its tool calls."""

    def join(docs: list[Document]) -> str:
        return "\n".join(d.page_content for d in docs)

    context = {"context": OrderDocs() | RunnableLambda(join), "q": RunnablePassthrough()}
    prompt = ChatPromptTemplate.from_messages([("user", "{context}\n\n{q}")])
    answer = RunnableLambda(lambda p: {"q": p.to_string()}) | tool_chain(model, [search])
    return flaky_step(1) | context | prompt | answer


def outcome(g: ag.Guard) -> list[Any]:
    sink: Any = g.sink
    spans = [(s.kind, s.name, s.status, s.model, s.cost_usd, s.usage) for s in sink.spans]
    records = [
        (r.task_id, r.status, r.limit_hit, r.cost_usd, r.model_calls, r.tool_calls, r.retries)
        for r in sink.tasks
    ]
    return [spans, records]


async def both(
    policy: dict[str, Any],
    make: Callable[[], tuple[Runnable[Any, Any], Any]],
    *,
    task_id: str | None = "run",
) -> tuple[list[Any], list[Any], LoopCheckingStore, BaseException | None]:
    """The same runnable run with the sync handler under ``invoke`` and with the async handler
    under ``ainvoke``: each outcome and error type, and the async run's store."""
    results: list[Any] = []
    store = LoopCheckingStore()
    for mode in ("sync", "async"):
        g = guard_on(LoopCheckingStore() if mode == "sync" else store, **policy)
        runnable, arg = make()
        handler: _Meter
        error: BaseException | None = None
        try:
            if mode == "sync":
                handler = AgentGuardCallbackHandler(g, task_id=task_id)
                runnable.invoke(arg, {"callbacks": [handler]})
            else:
                handler = AsyncAgentGuardCallbackHandler(g, task_id=task_id)
                await runnable.ainvoke(arg, {"callbacks": [handler]})
        except Exception as exc:
            error = exc
        st = handler._runs
        assert (st.runs, st.calls, st.tools, st.retrievers, st.named) == ({}, {}, {}, {}, {})
        results.append((outcome(g), type(error), error))
    (sync, sync_error, _), (asyn, async_error, error) = results
    assert async_error is sync_error
    return sync, asyn, store, error


async def test_a_chain_run_by_the_async_handler_never_blocks_its_loop() -> None:
    def make() -> tuple[Runnable[Any, Any], Any]:
        return rag_with_tools(ScriptedChatModel(parallel_tool_calls=2)), "Where is order 1182?"

    sync, asyn, store, error = await both({"max_cost_usd": "1"}, make)
    assert error is None
    assert store.blocking == []
    # the store was really used through its async methods: the handler's own task opened
    # (asnapshot), a retry and two tools charged, a call reserved and committed
    assert store.ops["asnapshot"] >= 1
    assert store.ops["areserve"] == store.ops["acommit"] == 1
    assert store.ops["acharge"] >= 3
    assert asyn == sync
    (record,) = asyn[1]
    assert record == ("run", "ok", None, record[3], 1, 2, 1)


def twice(model: ScriptedChatModel) -> Runnable[Any, Any]:
    """Two model calls in one run: the second reads the answer of the first."""
    return model | RunnableLambda(lambda m: m.text) | model


@pytest.mark.parametrize(
    ("policy", "make"),
    [
        (  # a tool cap: the third parallel tool call stops the chain
            {"tool_limits": {"search": 2}},
            lambda: (tool_chain(ScriptedChatModel(parallel_tool_calls=3), [search]), {"q": "x"}),
        ),
        (  # a retry past max_retries
            {"max_retries": 1},
            lambda: (flaky_step(3) | ScriptedChatModel(), "x"),
        ),
        (  # a money ceiling: the call is refused before it reaches the model
            {"max_cost_usd": "0.0000001"},
            lambda: (ScriptedChatModel(), "hi"),
        ),
        (  # a downgrade a callback cannot make: the spend read back after the release
            {"max_cost_usd": "0.01", "downgrade": [ag.Downgrade(at=0.01, to="gpt-4o-mini")]},
            lambda: (twice(ScriptedChatModel(model_name="gpt-4o", max_tokens=200)), "hi"),
        ),
        (  # an output cap a callback cannot lower
            {"max_output_tokens": 20},
            lambda: (ScriptedChatModel(max_tokens=100), "hi"),
        ),
    ],
    ids=["tool-cap", "retries", "money", "downgrade", "output-cap"],
)
async def test_stops_are_awaited_and_match_the_sync_handler(
    policy: dict[str, Any], make: Callable[[], tuple[Runnable[Any, Any], Any]]
) -> None:
    sync, asyn, store, error = await both(policy, make)
    assert isinstance(error, ag.BudgetExceeded)
    assert store.blocking == []
    assert store.ops["aclose" if "aclose" in store.ops else "asnapshot"] >= 1
    assert asyn == sync
    (record,) = asyn[1]
    assert record[1] == "stopped"


async def test_the_downgrade_refusal_reads_the_spend_with_the_async_api() -> None:
    store = LoopCheckingStore()
    g = guard_on(store, max_cost_usd="0.01", downgrade=[ag.Downgrade(at=0.01, to="gpt-4o-mini")])
    handler = AsyncAgentGuardCallbackHandler(g)
    model = ScriptedChatModel(model_name="gpt-4o", max_tokens=200)
    async with g.task("t") as task:
        await model.ainvoke("one", {"callbacks": [handler]})  # 0% spent: gpt-4o is allowed
        reads = store.ops.get("asnapshot", 0)
        with pytest.raises(ag.BudgetExceeded, match="cannot switch the model") as info:
            await model.ainvoke("two", {"callbacks": [handler]})
    assert store.blocking == []
    assert store.ops["asnapshot"] > reads  # the spend behind the error's figure is awaited
    assert info.value.actual == task.cost_usd  # what the task had spent: nothing reserved


class FailingChatModel(ScriptedChatModel):
    async def _agenerate(self, *args: Any, **kwargs: Any) -> ChatResult:
        raise ConnectionError("provider unreachable")


async def test_failures_release_through_the_async_api() -> None:
    # a failing model call: its reservation released, the handler's task closed as failed
    store = LoopCheckingStore()
    g = guard_on(store, max_cost_usd="1")
    handler = AsyncAgentGuardCallbackHandler(g, task_id="failing")
    with pytest.raises(ConnectionError):
        await FailingChatModel().ainvoke("hi", {"callbacks": [handler]})
    assert store.blocking == []
    assert store.ops["arelease"] == 1
    sink: Any = g.sink
    (record,) = sink.tasks
    assert (record.task_id, record.status, record.cost_usd) == ("failing", "error", 0)

    # a failing tool: its span closed as failed through the async API
    store = LoopCheckingStore()
    g = guard_on(store)
    handler = AsyncAgentGuardCallbackHandler(g)
    async with g.task("t") as task:
        with pytest.raises(RuntimeError, match="database down"):
            await tool_chain(ScriptedChatModel(), [broken]).ainvoke(
                {"q": "x"}, {"callbacks": [handler]}
            )
    assert store.blocking == []
    assert (task.model_calls, task.tool_calls) == (1, 1)
    (span,) = [s for s in sink_of(g) if s.kind == "tool"]
    assert (span.name, span.status) == ("broken", "error")


def sink_of(g: ag.Guard) -> list[ag.Span]:
    sink: Any = g.sink
    return list(sink.spans)
