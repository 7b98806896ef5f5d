"""BudgetedLLM in LlamaIndex's own pipelines — a query engine over a real index, a chat engine —
and its decisions: the stop reaches the caller before anything is sent, the ladder moves calls
to the rung's LLM (tools formatted by it), the output cap is bound even over a larger
constructor cap, and the graceful final call goes out without tools and ends the task."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from li_support import clean_llamaindex_state
from llama_index.core import Document, VectorStoreIndex
from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.chat_engine import SimpleChatEngine
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.memory import ChatMemoryBuffer
from llama_index.core.tools import FunctionTool

import agentguard as ag
from agentguard_llamaindex import BudgetedLLM
from agentguard_llamaindex._llm import FINAL_KEY, MODEL_KEY
from agentguard_llamaindex.testing import ScriptedLLM


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    # LlamaIndex's query engine runs private event loops it leaves to the garbage collector
    yield from clean_llamaindex_state()


MSG = [ChatMessage(role="user", content="Where is my parcel? It is order 1182.")]


def make_guard(**policy: Any) -> ag.Guard:
    return ag.Guard(ag.Policy(**policy), traces="memory")


def index() -> VectorStoreIndex:
    docs = [
        Document(text=f"Order {i} shipped on day {i}; refunds take five working days.")
        for i in range(12)
    ]
    return VectorStoreIndex.from_documents(docs, embed_model=MockEmbedding(embed_dim=8))


def test_a_query_engine_stops_with_budget_exceeded_before_the_llm_is_called() -> None:
    g = make_guard(max_cost_usd="0.00001")
    scripted = ScriptedLLM(model="gpt-4o", replies=["Day 4."])
    engine = index().as_query_engine(llm=BudgetedLLM(guard=g, llm=scripted), similarity_top_k=4)
    with pytest.raises(ag.BudgetExceeded) as info, g.task("t") as task:
        engine.query("When did order 4 ship?")
    assert info.value.limit == "max_cost_usd"
    assert scripted.seen == []  # nothing was sent
    assert task.status == "stopped"
    assert task.spent.cost_usd == 0


def test_a_query_engine_runs_within_budget_and_is_charged() -> None:
    g = make_guard(max_cost_usd="0.05", max_output_tokens=64)
    scripted = ScriptedLLM(model="gpt-4o-mini", replies=["Order 4 shipped on day 4."])
    engine = index().as_query_engine(llm=BudgetedLLM(guard=g, llm=scripted), similarity_top_k=4)
    with g.task("t") as task:
        answer = engine.query("When did order 4 ship?")
    assert str(answer) == "Order 4 shipped on day 4."
    assert task.model_calls == len(scripted.seen) >= 1
    assert all(c["max_tokens"] == 64 for c in scripted.seen)
    assert task.cost_usd is not None and task.cost_usd > 0
    assert not task.usage.estimated


def test_a_chat_engine_streams_through_the_wrapper() -> None:
    g = make_guard(max_cost_usd="0.05")
    scripted = ScriptedLLM(replies=["Your parcel ships on Monday."])
    # an in-process memory: the default one (an aiosqlite store driven by private event loops)
    # leaves its loop and connection to the garbage collector
    engine = SimpleChatEngine.from_defaults(
        llm=BudgetedLLM(guard=g, llm=scripted), memory=ChatMemoryBuffer.from_defaults()
    )
    with g.task("t") as task:
        assert str(engine.chat("Where is my parcel?")) == "Your parcel ships on Monday."
        streamed = engine.stream_chat("And the refund?")
        text = "".join(streamed.response_gen)
    assert text == "Your parcel ships on Monday."
    assert task.model_calls == 2
    assert task.usage.output_tokens == 10


def test_the_ladder_moves_calls_to_the_rungs_llm_with_its_own_tool_format() -> None:
    # $0.0001 cannot pay for a useful gpt-4o call: the cheaper rung takes it
    g = make_guard(max_cost_usd="0.0001", downgrade=[ag.Downgrade(at=0.5, to="gpt-4o-mini")])

    def lookup(order: str) -> str:
        """Look an order up."""
        return "shipped"

    big = ScriptedLLM(model="gpt-4o", tool_rounds=1, tool_args={"order": "1182"})
    mini = ScriptedLLM(model="gpt-4o-mini", tool_rounds=1, tool_args={"order": "1182"})
    llm = BudgetedLLM(guard=g, llm=big, llms={"gpt-4o-mini": mini})
    with g.task("t") as task:
        response = llm.chat_with_tools([FunctionTool.from_defaults(lookup)], user_msg="Where?")
        calls = llm.get_tool_calls_from_response(response)
    assert big.seen == []
    assert mini.seen[0]["tools"] == ["lookup"]
    assert response.additional_kwargs[MODEL_KEY] == "gpt-4o-mini"
    assert [c.tool_name for c in calls] == ["lookup"]
    assert [d.action for d in task.decisions] == ["downgrade"]
    assert task.saved_usd > 0


def test_the_cap_is_bound_over_a_larger_constructor_cap() -> None:
    g = make_guard(max_output_tokens=3)
    scripted = ScriptedLLM(max_tokens=500, replies=["one two three four five six"])
    llm = BudgetedLLM(guard=g, llm=scripted)
    with g.task("t") as task:
        text = llm.chat(MSG).message.content
    assert text == "one two three"
    assert scripted.max_tokens == 500  # the user's LLM is not changed
    assert task.usage.output_tokens == 3


def test_the_final_call_has_no_tools_and_ends_the_task() -> None:
    g = make_guard(max_model_calls=2, on_limit="finish", finish_output_tokens=5)

    def lookup(order: str) -> str:
        """Look an order up."""
        return "shipped"

    tool = FunctionTool.from_defaults(lookup)
    scripted = ScriptedLLM(tool_rounds=-1, replies=["It shipped on Monday as planned today."])
    llm = BudgetedLLM(guard=g, llm=scripted)
    with g.task("t") as task:
        first = llm.chat_with_tools([tool], user_msg="Where?")
        final = llm.chat_with_tools([tool], chat_history=[*MSG, first.message])
        with pytest.raises(ag.BudgetExceeded) as info:
            llm.chat(MSG)
    assert llm.get_tool_calls_from_response(first)[0].tool_name == "lookup"
    assert final.message.content == "It shipped on Monday as"
    assert final.additional_kwargs[FINAL_KEY] is True
    assert scripted.seen[1]["tools"] == []
    assert scripted.seen[1]["max_tokens"] == 5
    assert scripted.seen[1]["messages"] == 3  # the history plus the finish note
    assert info.value.limit == "finished"
    assert task.finished


async def test_async_streams_through_the_wrapper_are_charged() -> None:
    g = make_guard(max_cost_usd="0.05")
    scripted = ScriptedLLM(replies=["alpha beta gamma"])
    llm = BudgetedLLM(guard=g, llm=scripted)
    async with g.task("t") as task:
        chunks = [c async for c in await llm.astream_chat(MSG)]
        completion = [c async for c in await llm.astream_complete("hi")]
    assert chunks[-1].message.content == "alpha beta gamma"
    assert completion[-1].text == "alpha beta gamma"
    assert task.model_calls == 2
    assert task.usage.output_tokens == 6
    assert not task.usage.estimated


def test_a_call_outside_any_task_opens_and_closes_its_own() -> None:
    g = make_guard(max_cost_usd="0.05")
    llm = BudgetedLLM(
        guard=g, llm=ScriptedLLM(replies=["ok"]), task_id="faq", task_tags={"team": "cx"}
    )
    llm.chat(MSG)
    assert isinstance(g.sink, ag.MemorySink)
    (record,) = g.sink.tasks
    assert (record.task_id, record.tags["team"], record.model_calls) == ("faq", "cx", 1)


def test_reserved_tag_names_are_refused() -> None:
    with pytest.raises(ValueError, match="task_tags\\['policy'\\]"):
        BudgetedLLM(guard=make_guard(), llm=ScriptedLLM(), task_tags={"policy": "x"})
