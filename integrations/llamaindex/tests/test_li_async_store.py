"""The LlamaIndex adapter's async paths await every budget-store operation they make: on a
networked store (Redis) a sync operation would block the event loop for a round trip. Checked
with ``LoopCheckingStore`` (which notes sync operations made while a loop runs on their thread)
on ``BudgetedLLM``'s async methods, ``GuardedTool.acall`` and a guarded ``FunctionAgent`` —
and the async paths must decide and charge exactly as the sync ones.

The instrumentation's handlers are synchronous callbacks of LlamaIndex's dispatcher: what they
charge themselves (a workflow agent's steps) cannot be awaited, and is named below."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from li_support import clean_llamaindex_state, in_fresh_loop
from llama_index.core.agent.workflow import FunctionAgent
from llama_index.core.base.llms.types import ChatMessage, ChatResponse
from llama_index.core.tools import FunctionTool

import agentguard as ag
from agentguard.testing import LoopCheckingStore
from agentguard_llamaindex import BudgetedLLM, GuardedTool, guard_agent
from agentguard_llamaindex.testing import ScriptedLLM

pytestmark = [
    # llama-index workflows inspect pydantic models with deprecated attributes
    pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecationWarning"),
]


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    yield from clean_llamaindex_state()


MSG = [ChatMessage(role="user", content="Where is my parcel? It is order 1182.")]


def guard_on(store: LoopCheckingStore, **policy: Any) -> ag.Guard:
    return ag.Guard(ag.Policy(**policy), store=store, traces="memory")


def lookup(order: str) -> str:
    """Look an order up."""
    return "shipped"


TOOL = FunctionTool.from_defaults(lookup)


def outcome(g: ag.Guard, *llms: ScriptedLLM) -> list[Any]:
    sink: Any = g.sink
    spans = [
        (s.kind, s.name, s.status, s.model, s.cost_usd, s.usage, s.attrs.get("decision"))
        for s in sink.spans
    ]
    records = [
        (r.task_id, r.status, r.limit_hit, r.cost_usd, r.model_calls, r.tool_calls)
        for r in sink.tasks
    ]
    return [spans, records, [llm.seen for llm in llms]]


async def calls(llm: BudgetedLLM, mode: str, rounds: int = 4) -> list[str]:
    """Every kind of call the wrapper takes — chat with tools, complete, both streams — made
    with the sync methods or awaited with the async ones, round after round; a stop ends it."""
    out: list[str] = []
    try:
        for _ in range(rounds):
            if mode == "sync":
                r = llm.chat_with_tools([TOOL], user_msg="Where?")
                out.append(str([c.tool_name for c in llm.get_tool_calls_from_response(r, False)]))
                out.append(llm.complete("Summarise the ticket.").text)
                out.append(list(llm.stream_chat(MSG))[-1].message.content or "")
                out.append(list(llm.stream_complete("hi"))[-1].text)
                out.append(llm.chat(MSG).message.content or "")
            else:
                r = await llm.achat_with_tools([TOOL], user_msg="Where?")
                out.append(str([c.tool_name for c in llm.get_tool_calls_from_response(r, False)]))
                out.append((await llm.acomplete("Summarise the ticket.")).text)
                chunks = [c async for c in await llm.astream_chat(MSG)]
                out.append(chunks[-1].message.content or "")
                out.append([c async for c in await llm.astream_complete("hi")][-1].text)
                out.append((await llm.achat(MSG)).message.content or "")
    except ag.BudgetExceeded as exc:
        out.append(f"stopped: {exc.limit}")
    return out


POLICIES = pytest.mark.parametrize(
    "policy",
    [
        # the last call kept for the final answer (no tools, the finish cap), then a stop
        {"max_model_calls": 4, "on_limit": "finish", "finish_output_tokens": 5},
        # a money ceiling: the ladder's cheaper rung takes the calls, then a finish
        {
            "max_cost_usd": "0.0003",
            "max_output_tokens": 40,
            "downgrade": [ag.Downgrade(at=0.3, to="gpt-4o-mini")],
            "on_limit": "finish",
        },
    ],
    ids=["model-calls", "money"],
)


def budgeted(g: ag.Guard) -> tuple[BudgetedLLM, ScriptedLLM, ScriptedLLM]:
    reply = ["It shipped on Monday as planned, with the refund on its way today."]
    big = ScriptedLLM(model="gpt-4o", tool_rounds=1, tool_args={"order": "1182"}, replies=reply)
    mini = ScriptedLLM(
        model="gpt-4o-mini", tool_rounds=1, tool_args={"order": "1182"}, replies=reply
    )
    return BudgetedLLM(guard=g, llm=big, llms={"gpt-4o-mini": mini}), big, mini


@POLICIES
async def test_budgeted_llm_async_calls_never_block_the_loop(policy: dict[str, Any]) -> None:
    sync_g = guard_on(LoopCheckingStore(), **policy)
    llm, big, mini = budgeted(sync_g)
    with sync_g.task("t"):
        sync_out = await calls(llm, "sync")
    sync = outcome(sync_g, big, mini)

    store = LoopCheckingStore()
    g = guard_on(store, **policy)
    llm, big, mini = budgeted(g)
    async with g.task("t") as task:
        async_out = await calls(llm, "async")

    assert store.blocking == []
    assert store.ops["areserve"] == store.ops["acommit"] == task.model_calls > 0
    assert async_out == sync_out
    assert outcome(g, big, mini) == sync
    assert task.finished


async def test_a_call_outside_any_task_opens_and_closes_its_own_with_the_async_api() -> None:
    store = LoopCheckingStore()
    g = guard_on(store, max_cost_usd="0.05")
    llm = BudgetedLLM(guard=g, llm=ScriptedLLM(replies=["ok"]), task_id="faq")
    await llm.achat(MSG)
    chunks = [c async for c in await llm.astream_complete("hi")]
    assert chunks[-1].text == "ok"
    assert store.blocking == []
    assert store.ops["asnapshot"] >= 2  # each call's own task, opened with aopen_task
    sink: Any = g.sink
    assert [(r.task_id, r.status, r.model_calls) for r in sink.tasks] == [("faq", "ok", 1)] * 2


class FailingLLM(ScriptedLLM):
    async def achat(self, messages: Any, **kwargs: Any) -> ChatResponse:
        raise ConnectionError("provider unreachable")


async def test_a_failing_call_releases_through_the_async_api() -> None:
    store = LoopCheckingStore()
    g = guard_on(store, max_cost_usd="0.05")
    llm = BudgetedLLM(guard=g, llm=FailingLLM(), task_id="failing")
    with pytest.raises(ConnectionError):
        await llm.achat(MSG)
    assert store.blocking == []
    assert store.ops["arelease"] == 1
    sink: Any = g.sink
    (record,) = sink.tasks
    assert (record.status, record.model_calls, record.cost_usd) == ("error", 0, 0)

    # a stop before anything is sent, in the call's own task: closed as stopped, awaited
    store = LoopCheckingStore()
    g = guard_on(store, max_cost_usd="0.0000001")
    llm = BudgetedLLM(guard=g, llm=ScriptedLLM(model="gpt-4o"), task_id="tiny")
    with pytest.raises(ag.BudgetExceeded):
        await llm.acomplete("hi")
    assert store.blocking == []
    sink = g.sink
    assert [(r.task_id, r.status) for r in sink.tasks] == [("tiny", "stopped")]


@pytest.mark.parametrize("on_limit", ["finish", "raise"])
async def test_guarded_tool_acall_counts_with_the_async_api(on_limit: str) -> None:
    results = []
    store = LoopCheckingStore()
    for mode in ("sync", "async"):
        g = guard_on(
            LoopCheckingStore() if mode == "sync" else store, max_tool_calls=2, on_limit=on_limit
        )
        tool = GuardedTool(TOOL, g)
        out: list[Any] = []
        async with g.task("t"):
            for _ in range(3):
                try:
                    r = tool.call(order="1182") if mode == "sync" else await tool.acall(order="1")
                    out.append((r.content, r.is_error))
                except ag.BudgetExceeded as exc:
                    out.append(exc.limit)
        results.append((out, outcome(g)))
    assert store.blocking == []
    assert store.ops["acharge"] >= 2
    (sync_out, sync), (async_out, asyn) = results
    assert async_out == sync_out
    assert asyn == sync


@in_fresh_loop
async def test_a_guarded_agent_awaits_all_but_the_instrumentations_own_charges() -> None:
    store = LoopCheckingStore()
    g = guard_on(store, max_tool_calls=3, max_steps=10, on_limit="finish")
    llm = ScriptedLLM(tool_rounds=-1, tool_args={"order": "1182"}, replies=["Done."])
    agent = guard_agent(FunctionAgent(tools=[TOOL], llm=llm), g)
    async with g.task("t") as task:
        result = await agent.run("Where is my parcel? Order 1182.")
    assert str(result) == "Done."
    assert (task.tool_calls, task.status) == (3, "finished")
    assert store.ops["areserve"] == task.model_calls > 3  # every model call awaited
    # the workflow agent's steps are counted by the instrumentation's span handler, a sync
    # callback of LlamaIndex's dispatcher: those charges (and only those) are not awaited
    assert store.blocking == ["charge"] * task.steps
