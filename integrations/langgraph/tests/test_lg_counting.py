"""The guard counts a graph's message objects exactly as it counts the same messages given as
mappings: the fast read of a pydantic message's fields (no ``AttributeError`` per absent
attribute) must not change a count, whatever the message carries."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from lg_support import Scripted, react_graph, user

import agentguard as ag
from agentguard import counter_for
from agentguard_langgraph import GraphGuard


def as_mapping(m: BaseMessage) -> dict[str, Any]:
    """Every attribute the counter reads, read with plain ``getattr``."""
    keys = ("role", "type", "content", "name", "tool_calls", "additional_kwargs")
    out = {k: getattr(m, k, None) for k in keys}
    out["function_call"] = getattr(m, "function_call", None)
    out["tool_call_id"] = getattr(m, "tool_call_id", None)
    if not out["role"]:
        out["role"] = out["type"]
    return out


class Critique(HumanMessage):
    """A message class with a property among the attributes the counter reads."""

    @property
    def tool_call_id(self) -> str:
        return "call-critic-77"


def conversation() -> list[BaseMessage]:
    return [
        SystemMessage("Answer briefly.", name="policy"),
        HumanMessage(
            [
                {"type": "text", "text": "Where is order 1182?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}},
            ]
        ),
        AIMessage("", tool_calls=[{"name": "search", "args": {"query": "1182"}, "id": "c1"}]),
        ToolMessage("order 1182: shipped late", tool_call_id="c1", name="search"),
        ChatMessage(role="critic", content="Check the refund policy too."),
        FunctionMessage(name="lookup", content="refund: 4.99"),
        AIMessage("", additional_kwargs={"function_call": {"name": "f", "arguments": "{}"}}),
        HumanMessage("an extra field rides along", function_call={"name": "g", "arguments": "1"}),
        Critique("a property named tool_call_id"),
    ]


def test_message_objects_count_as_their_mappings() -> None:
    counter = counter_for("gpt-4o")
    messages = conversation()
    for m in messages:
        assert counter.count_messages([m]) == counter.count_messages([as_mapping(m)]), m
    assert counter.count_messages(messages) == counter.count_messages(
        [as_mapping(m) for m in messages]
    )
    # the extra field and the property were read (not skipped by the fast path)
    extra, prop = messages[-2], messages[-1]
    assert counter.count_messages([extra]) > counter.count_messages(
        [HumanMessage("an extra field rides along")]
    )
    assert counter.count_messages([prop]) > counter.count_messages(
        [HumanMessage("a property named tool_call_id")]
    )


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_finished_run_leaves_no_message_alive_in_the_count_cache(mode: str) -> None:
    """The guard counts each run's history once per call and reuses the counts within the run;
    once the run's state is let go, none of its messages is kept alive by the counter (a
    strong cache kept every run's messages until it filled, and the garbage collector paid for
    them)."""
    guard = ag.Guard(ag.Policy(max_cost_usd="1", max_steps=6, on_limit="finish"), traces=False)
    gg = GraphGuard(guard)
    graph = gg.bind(react_graph(gg, Scripted(model_name="gpt-4o", tool_calls=3), steps_in="node"))
    if mode == "sync":
        out = graph.invoke(user())
    else:
        out = await graph.ainvoke(user())
    task = graph.last_task
    assert task is not None and task.model_calls == 4 and task.tool_calls == 3
    kept = counter_for("gpt-4o")._msgs  # type: ignore[attr-defined]
    messages = out["messages"]
    # the messages the later calls re-sent are kept while they live: AI and tool messages
    assert sum(id(m) in kept and kept[id(m)]() is m for m in messages) >= 6
    refs = [weakref.ref(m) for m in messages]
    del out, messages
    gc.collect()
    assert [r for r in refs if r() is not None] == []
