"""The instrumentation handlers on real LlamaIndex objects: what is charged once and what is
skipped, embeddings and retrievals, tasks opened per root span, provider usage shapes,
concurrency (threads and asyncio, calls in flight together), and the edge cases where a
handler can only meter (the dispatcher swallows its exceptions)."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from li_support import clean_llamaindex_state, in_fresh_loop
from llama_index.core import Document, VectorStoreIndex
from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.llms import MockLLM

import agentguard as ag
from agentguard import MemorySink, counter_for
from agentguard_llamaindex import (
    AgentGuardEventHandler,
    AgentGuardSpanHandler,
    BudgetedLLM,
    instrument,
)
from agentguard_llamaindex.testing import ScriptedLLM

MSG = [ChatMessage(role="user", content="Where is my parcel? It is order 1182.")]


def make_guard(**policy: Any) -> ag.Guard:
    return ag.Guard(ag.Policy(**policy), traces="memory")


def sink(g: ag.Guard) -> MemorySink:
    assert isinstance(g.sink, MemorySink)
    return g.sink


def model_spans(g: ag.Guard, task_id: str) -> list[ag.Span]:
    return [s for s in sink(g).spans_of(task_id) if s.kind == "model"]


@pytest.fixture
def guard() -> Iterator[ag.Guard]:
    g = make_guard()
    inst = instrument(g)
    yield g
    inst.detach()


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    yield from clean_llamaindex_state()


def test_a_mock_llm_chat_is_charged_once(guard: ag.Guard) -> None:
    # MockLLM.chat runs MockLLM.complete inside it: two start events, one call
    with guard.task("t") as task:
        MockLLM(max_tokens=4).chat(MSG)
    assert task.model_calls == 1
    assert task.usage.output_tokens == 4
    assert task.usage.estimated  # MockLLM reports no usage
    (span,) = model_spans(guard, "t")
    assert span.model == "MockLLM"
    assert span.cost_usd is None  # unpriced, never $0


@pytest.mark.parametrize("shape", ["openai", "anthropic", "bedrock"])
def test_provider_usage_shapes_are_read(guard: ag.Guard, shape: Any) -> None:
    llm = ScriptedLLM(model="gpt-4o-mini", replies=["one two three"], usage_shape=shape)
    with guard.task("t") as task:
        llm.chat(MSG)
    expected = counter_for("gpt-4o-mini").count_messages(MSG)
    assert task.usage.input_tokens == expected
    assert task.usage.output_tokens == 3
    assert not task.usage.estimated
    rates = guard.prices.rates("gpt-4o-mini")
    assert rates is not None
    assert task.cost_usd == rates.cost(ag.Usage(expected, 3))


def test_instrument_is_idempotent_and_detaches() -> None:
    g = make_guard()
    d = get_dispatcher()
    before = (len(d.event_handlers), len(d.span_handlers))
    inst = instrument(g)
    assert instrument(g) is inst
    assert (
        sum(isinstance(h, AgentGuardEventHandler) for h in d.event_handlers)
        - sum(isinstance(h, AgentGuardEventHandler) for h in d.event_handlers[: before[0]])
        == 1
    )
    assert any(h is inst.span_handler for h in d.span_handlers)
    with g.task("on") as on:
        ScriptedLLM().complete("hi")
    inst.detach()
    inst.detach()
    assert (len(d.event_handlers), len(d.span_handlers)) == before
    assert not any(h is inst.span_handler for h in d.span_handlers)
    with g.task("off") as off:
        ScriptedLLM().complete("hi")
    assert on.model_calls == 1
    assert off.model_calls == 0
    assert isinstance(inst.span_handler, AgentGuardSpanHandler)


def test_two_guards_each_meter_a_call_once_into_their_own_tasks() -> None:
    a, b = make_guard(), make_guard()
    with instrument(a), instrument(b), a.task("a") as ta:
        ScriptedLLM().complete("hi")
    assert ta.model_calls == 1
    # b has no current task: the call's root span got a task of b's own
    assert [(r.task_id != "a", r.model_calls) for r in sink(b).tasks] == [(True, 1)]


def test_budgeted_llm_and_handler_charge_a_call_once(guard: ag.Guard) -> None:
    llm = BudgetedLLM(guard=guard, llm=ScriptedLLM(replies=["fine"]))
    with guard.task("t") as task:
        llm.chat(MSG)
        list(llm.stream_chat(MSG))
        asyncio.run(llm.acomplete("hello"))
    assert task.model_calls == 3
    assert len(model_spans(guard, "t")) == 3
    assert task.spent.model_calls == 3


def test_embeddings_are_metered_with_estimated_tokens(guard: ag.Guard) -> None:
    emb = MockEmbedding(embed_dim=8)
    texts = ["The parcel left the warehouse.", "Refunds take five working days."]
    with guard.task("t") as task:
        emb.get_text_embedding_batch(texts)
        emb.get_query_embedding("where is my parcel")
    spans = model_spans(guard, "t")
    assert [s.attrs.get("embedding") for s in spans] == [True, True]
    counter = counter_for("unknown")
    tokens = sum(counter.count(t) for t in texts) + counter.count("where is my parcel")
    assert task.usage.input_tokens == tokens
    assert task.usage.output_tokens == 0
    assert task.usage.estimated


def test_retrievals_record_nodes_and_tokens_but_no_text(guard: ag.Guard) -> None:
    docs = [
        Document(text=f"Order {i} shipped on day {i} from warehouse {i % 3}.") for i in range(8)
    ]
    index = VectorStoreIndex.from_documents(docs, embed_model=MockEmbedding(embed_dim=8))
    retriever = index.as_retriever(similarity_top_k=3)
    with guard.task("t"):
        nodes = retriever.retrieve("when did order 4 ship?")
    assert len(nodes) == 3
    (span,) = [s for s in sink(guard).spans_of("t") if s.kind == "retrieval"]
    counter = counter_for(None)
    assert span.attrs["documents"] == 3
    assert span.attrs["tokens"] == sum(counter.count(n.node.get_content()) for n in nodes)
    assert "shipped" not in repr(span.attrs)


def test_a_task_is_opened_per_root_span_outside_any_task() -> None:
    g = make_guard()
    llm = ScriptedLLM(replies=["alpha beta"])
    with instrument(g, task_id=None, tags={"feature": "faq"}):
        llm.complete("first")
        chunks = llm.stream_chat(MSG)  # the root span ends before the stream is read
        assert [c.delta for c in chunks] == ["alpha ", "beta"]
    records = [r for r in sink(g).tasks if r.model_calls]
    assert len(records) == 2
    assert all(r.status == "ok" and r.tags["feature"] == "faq" for r in records)
    assert all(r.usage is not None and r.usage.output_tokens == 2 for r in records)
    # the root spans' tasks had ids made up per run: the embedded store kept neither line
    assert list(g.store.live) == []  # type: ignore[attr-defined]


def test_a_stop_a_handler_cannot_enforce_is_recorded_and_the_call_still_charged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    g = make_guard(max_model_calls=1)
    llm = ScriptedLLM(replies=["ok"])
    with caplog.at_level(logging.WARNING, "agentguard"), instrument(g), g.task("t") as task:
        llm.complete("first")
        assert llm.complete("second").text == "ok"  # a handler cannot stop it...
    assert task.model_calls == 2  # ...so it is charged, without a reservation
    spans = model_spans(g, "t")
    assert [s.attrs.get("unreserved") for s in spans] == [None, True]
    assert [d.action for d in task.decisions] == ["stop"]
    assert any("agentguard.unenforced" in r.getMessage() for r in caplog.records)


def test_a_malformed_usage_record_never_breaks_the_call(guard: ag.Guard) -> None:
    class Broken(ScriptedLLM):
        def _shape(self, prompt: int, completion: int) -> dict[str, int]:
            return {"prompt_tokens": -5, "completion_tokens": completion}

    with guard.task("t") as task:
        assert Broken(replies=["fine"]).complete("hi").text == "fine"
    (span,) = model_spans(guard, "t")
    assert "invalid_usage" in span.attrs
    assert task.usage.estimated


def test_threads_with_calls_in_flight_together_are_all_charged_and_capped() -> None:
    g = make_guard(max_model_calls=5)
    llm = BudgetedLLM(guard=g, llm=ScriptedLLM(replies=["ok"], delay=0.05))
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def one() -> None:
        start.wait()
        try:
            llm.chat(MSG)
        except ag.BudgetExceeded as exc:
            errors.append(exc)

    with instrument(g), g.task("t") as task, ThreadPoolExecutor(8) as pool:
        ctx = contextvars.copy_context()
        futures = [pool.submit(ctx.copy().run, one) for _ in range(8)]
        for f in futures:
            f.result()
    assert task.model_calls == 5
    assert len(errors) == 3
    assert {e.limit for e in errors} == {"max_model_calls"}
    assert task.spent.model_calls == 5


async def test_asyncio_calls_in_flight_together_are_capped() -> None:
    g = make_guard(max_model_calls=5)
    llm = BudgetedLLM(guard=g, llm=ScriptedLLM(replies=["ok"], delay=0.05))
    with instrument(g):
        async with g.task("t") as task:
            results = await asyncio.gather(
                *(llm.achat(MSG) for _ in range(8)), return_exceptions=True
            )
    assert sum(isinstance(r, ag.BudgetExceeded) for r in results) == 3
    assert task.model_calls == 5
    assert task.spent.model_calls == 5


def test_handler_metering_from_threads_is_exact() -> None:
    g = make_guard()
    llm = ScriptedLLM(replies=["one two"], delay=0.02)
    with instrument(g), g.task("t") as task, ThreadPoolExecutor(8) as pool:
        ctx = contextvars.copy_context()
        list(pool.map(lambda _: ctx.copy().run(llm.complete, "hi"), range(16)))
    assert task.model_calls == 16
    assert task.usage.output_tokens == 32
    assert task.spent.cost_usd == task.cost_usd


@pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecationWarning")
@in_fresh_loop
async def test_an_unwrapped_agent_is_metered_from_its_spans(guard: ag.Guard) -> None:
    """Without guard_agent: tool calls come from FunctionTool.acall spans, steps from
    parse_agent_output spans, model calls from the LLM events."""
    from llama_index.core.agent.workflow import FunctionAgent
    from llama_index.core.tools import FunctionTool

    ran: list[str] = []

    def search(query: str) -> str:
        """Search the order system."""
        ran.append(query)
        return "nothing conclusive"

    llm = ScriptedLLM(tool_rounds=2, tool_args={"query": "order 1182"}, replies=["Monday."])
    agent = FunctionAgent(tools=[FunctionTool.from_defaults(search)], llm=llm)
    async with guard.task("t") as task:
        result = await agent.run("Where is my parcel?")
    assert str(result) == "Monday."
    assert len(ran) == 2
    assert task.tool_calls == 2
    assert task.tool_calls_by_name == {"search": 2}
    assert task.model_calls == 3
    assert task.steps == 3  # one per model output
    assert not task.usage.estimated
    tools = [s for s in sink(guard).spans_of("t") if s.kind == "tool"]
    assert [(s.name, s.status) for s in tools] == [("search", "ok")] * 2
