"""The per-message count cache of ``count_messages``: reused counts equal fresh ones, and a
message whose content, tool calls or extra kwargs were replaced is counted again."""

from __future__ import annotations

import gc
import threading
import weakref
from types import MappingProxyType
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from pydantic import BaseModel, ConfigDict

import agentguard._tokens as tokens_module
from agentguard import counter_for
from agentguard._tokens import CharEstimateCounter


class Msg:
    """A message object read by attribute, like LangChain's and LlamaIndex's."""

    def __init__(self, role: str, content: Any, **extra: Any) -> None:
        self.role = role
        self.content = content
        self.tool_calls = extra.get("tool_calls")
        self.additional_kwargs = extra.get("additional_kwargs") or {}
        self.tool_call_id = extra.get("tool_call_id")


def history() -> list[Msg]:
    call = {"name": "lookup", "args": {"query": "order 1182"}, "id": "call_1"}
    return [
        Msg("system", "You are a support agent."),
        Msg("user", "Where is my parcel for order 1182?"),
        Msg("assistant", "", tool_calls=[call]),
        Msg("tool", "order 1182: paid, shipped 3 days late", tool_call_id="call_1"),
    ]


def fresh_count(messages: list[Msg], tools: Any = None) -> int:
    """The count by a counter that has seen none of these objects."""
    return tokens_module.TiktokenCounter(
        counter_for("gpt-4o").encoding,  # type: ignore[attr-defined]
        exact=True,
        margin=0.0,
        source="test",
    ).count_messages(messages, tools)


def test_cached_counts_equal_fresh_counts_as_history_grows() -> None:
    c = counter_for("gpt-4o")
    msgs = history()
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    for n in range(1, len(msgs) + 1):
        first = c.count_messages(msgs[:n], tools)
        again = c.count_messages(msgs[:n], tools)
        assert first == again == fresh_count(msgs[:n], tools)


def test_replaced_content_tool_calls_or_kwargs_are_counted_again() -> None:
    c = counter_for("gpt-4o")
    msgs = history()
    before = c.count_messages(msgs)
    msgs[1].content = msgs[1].content + " It was due on Monday, and I need it for a wedding."
    grown = c.count_messages(msgs)
    assert grown > before
    assert grown == fresh_count(msgs)
    msgs[2].tool_calls = [
        {"name": "lookup", "args": {"query": "order 1182, carrier status, full detail"}, "id": "c"}
    ]
    assert c.count_messages(msgs) == fresh_count(msgs) > grown
    msgs[0].additional_kwargs = {"tool_calls": [{"name": "x", "args": {"a": 1}, "id": "c2"}]}
    assert c.count_messages(msgs) == fresh_count(msgs)


def test_a_name_or_tool_call_id_set_later_is_counted_again() -> None:
    from langchain_core.messages import HumanMessage, ToolMessage

    c = counter_for("gpt-4o")
    msgs = [HumanMessage("Where is 1182?"), ToolMessage("shipped late", tool_call_id="c1")]
    c.count_messages(msgs)
    c.count_messages(msgs)  # kept now (a message class is learnt on first sight)
    before = c.count_messages(msgs)
    msgs[0].name = "customer-of-the-month"
    assert c.count_messages(msgs) == fresh_count(msgs) > before
    msgs[1].tool_call_id = "call_Zx81bQ2vLm5tN7pR4sWj"
    assert c.count_messages(msgs) == fresh_count(msgs)


def test_plain_dicts_are_not_kept_and_counts_stay_exact() -> None:
    c = CharEstimateCounter()
    d = {"role": "user", "content": "hello world"}
    n = c.count_messages([d])
    d["content"] = "hello world, and a much longer question about the parcel"  # edited in place
    assert c.count_messages([d]) > n
    assert not c._msgs


def test_the_cache_is_bounded(monkeypatch: Any) -> None:
    monkeypatch.setattr(tokens_module, "_MESSAGE_CACHE_MAX", 8)
    c = CharEstimateCounter()
    msgs = [Msg("user", f"message number {i}") for i in range(50)]
    total = c.count_messages(msgs)
    assert len(c._msgs) <= 8
    assert c.count_messages(msgs) == total == CharEstimateCounter().count_messages(msgs)


class BlockMsg:
    """A message whose ``content`` is a property over its blocks (LlamaIndex's shape)."""

    def __init__(self, role: str, blocks: list[str]) -> None:
        self.role = role
        self.blocks = blocks

    @property
    def content(self) -> str:
        return " ".join(self.blocks)


def test_a_computed_content_is_read_every_time() -> None:
    c = counter_for("gpt-4o")
    m = BlockMsg("user", ["Where is my parcel?"])
    first = c.count_messages([m])
    assert c.count_messages([m]) == first
    m.blocks.append("It is for order 1182 and it was due three days ago.")  # edited in place
    assert c.count_messages([m]) > first


def test_the_cache_is_bounded_by_the_characters_it_keeps(monkeypatch: Any) -> None:
    monkeypatch.setattr(tokens_module, "_CACHE_MAX_CHARS", 2_000)
    c = CharEstimateCounter()
    msgs = [Msg("tool", f"result {i} " + "x" * 500) for i in range(20)]
    total = c.count_messages(msgs)  # first sight: the class is learnt, nothing kept
    assert c.count_messages(msgs) == total
    assert 0 < len(c._msgs) <= 4
    assert c._msg_chars <= 2_000


class PydanticMsg(BaseModel):
    """A pydantic message that keeps unknown attributes as extras (LangChain's shape)."""

    model_config = ConfigDict(extra="allow")

    role: str
    content: Any
    tool_calls: list[dict[str, Any]] | None = None
    additional_kwargs: dict[str, Any] = {}


def test_pydantic_messages_reuse_counts_until_an_extra_appears() -> None:
    c = counter_for("gpt-4o")
    call = {"name": "lookup", "args": {"query": "order 1182"}, "id": "call_1"}
    msgs = [
        PydanticMsg(role="user", content="Where is my parcel for order 1182?"),
        PydanticMsg(role="assistant", content="", tool_calls=[call]),
    ]
    first = c.count_messages(msgs)
    assert first == fresh_count(msgs)  # type: ignore[arg-type]
    assert c.count_messages(msgs) == first
    assert all(id(m) in c._msgs for m in msgs)  # type: ignore[attr-defined]  # kept
    msgs[0].name = "Maria Lopez"  # an extra the count reads: the kept count is stale
    named = c.count_messages(msgs)
    assert named == fresh_count(msgs) > first  # type: ignore[arg-type]
    msgs[1].tool_calls = None  # a field replaced
    assert c.count_messages(msgs) == fresh_count(msgs) < named  # type: ignore[arg-type]


def test_roles_strings_tuples_and_dicts_mixed_with_kept_messages() -> None:
    c = CharEstimateCounter()
    msgs: list[Any] = [
        "a bare string",
        ("system", "be brief"),
        {"role": "user", "content": "hello"},
        Msg("ai", "hi there"),
        Msg("human", "and again"),
    ]
    first = c.count_messages(msgs)
    assert c.count_messages(msgs) == first == CharEstimateCounter().count_messages(msgs)
    # the roles are mapped as OpenAI counts them (ai -> assistant, human -> user)
    assert c.count_messages([Msg("ai", "x")]) == c.count_messages([Msg("assistant", "x")])


_TEXT = st.text(alphabet="abc xyz.,{}é", max_size=12)
_CALL = st.fixed_dictionaries(
    {"name": _TEXT, "id": _TEXT},
    optional={"args": st.dictionaries(_TEXT, st.integers(0, 9), max_size=2), "type": _TEXT},
)
_MESSAGE = st.fixed_dictionaries(
    {},
    optional={
        "role": st.sampled_from(["user", "assistant", "ai", "human", "tool", "", "system"]),
        "type": st.sampled_from(["ai", "human", "tool"]),
        "content": st.one_of(_TEXT, st.lists(st.fixed_dictionaries({"text": _TEXT}), max_size=2)),
        "name": st.one_of(st.none(), _TEXT),
        "tool_calls": st.one_of(st.none(), st.lists(_CALL, max_size=2)),
        "additional_kwargs": st.one_of(
            st.just({}), st.fixed_dictionaries({"tool_calls": st.lists(_CALL, max_size=1)})
        ),
        "function_call": st.one_of(st.none(), _CALL),
        "tool_call_id": st.one_of(st.none(), _TEXT),
    },
)


def _read_only(message: dict[str, Any]) -> Any:
    """``message`` and its tool calls as read-only mappings, read by ``get`` calls."""

    def calls(value: Any) -> Any:
        return [MappingProxyType(c) for c in value] if isinstance(value, list) else value

    out = dict(message)
    out["tool_calls"] = calls(message.get("tool_calls"))
    if message.get("function_call") is not None:
        out["function_call"] = MappingProxyType(message["function_call"])
    if message.get("additional_kwargs"):
        out["additional_kwargs"] = {"tool_calls": calls(message["additional_kwargs"]["tool_calls"])}
    return MappingProxyType(out)


class Obj:
    """A message object with exactly the given attributes (read from its ``__dict__``)."""

    def __init__(self, fields: dict[str, Any]) -> None:
        self.__dict__.update(fields)


@settings(max_examples=200, deadline=None)
@given(st.lists(_MESSAGE, max_size=5))
def test_dicts_objects_and_any_mapping_count_alike(messages: list[dict[str, Any]]) -> None:
    """Plain dicts and plain objects take shortcuts (their fields merged over absent ones,
    read by subscript); a read-only mapping is read by ``get`` calls: the counts agree, and a
    kept object counts the same again."""
    c = CharEstimateCounter()
    c.count_messages([Obj({"content": "warm"})])  # (the first sight of a class is not kept)
    as_dicts = c.count_messages(messages)
    as_mappings = c.count_messages([_read_only(m) for m in messages])
    objects = [Obj(m) for m in messages]
    as_objects = c.count_messages(objects)
    assert as_dicts == as_mappings == as_objects == c.count_messages(objects)


def test_a_freed_message_leaves_the_cache_and_nothing_keeps_it_alive() -> None:
    c = CharEstimateCounter()
    c.count_messages([AIMessage("a first object of the class: its kind is learnt")])
    call = {"name": "lookup", "args": {"query": "order 1182"}, "id": "call_9"}
    msgs: list[Any] = [
        HumanMessage("Where is my parcel for order 1182?"),
        AIMessage("", tool_calls=[call]),
        ToolMessage("order 1182: paid, shipped 3 days late", tool_call_id="call_9"),
    ]
    total = c.count_messages(msgs)
    assert all(c._msgs[id(m)]() is m for m in msgs)  # kept, and reused
    assert c.count_messages(msgs) == total == CharEstimateCounter().count_messages(msgs)
    refs = [weakref.ref(m) for m in msgs]
    del msgs
    gc.collect()
    assert [r() for r in refs] == [None, None, None]  # the cache held none of them
    assert not c._msgs
    assert c._msg_chars == 0


class SlotsMsg:
    """A message object with a ``__dict__`` but no weak references (``__slots__``)."""

    __slots__ = ("__dict__",)

    def __init__(self, role: str, content: str) -> None:
        self.role = role
        self.content = content


def test_a_message_that_cannot_be_weakly_referenced_is_counted_every_time() -> None:
    c = counter_for("gpt-4o")
    m = SlotsMsg("user", "Where is my parcel?")
    c.count_messages([SlotsMsg("user", "a first object of the class: its kind is learnt")])
    first = c.count_messages([m])
    assert first == fresh_count([m])  # type: ignore[list-item]
    assert id(m) not in c._msgs
    m.content = "Where is my parcel for order 1182? It was due three days ago."
    assert c.count_messages([m]) == fresh_count([m]) > first  # type: ignore[list-item]


def schema(name: str) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {"name": name, "parameters": {"type": "object", "properties": {}}},
    }


def test_fresh_tool_dicts_per_call_are_held_in_a_bounded_cache(monkeypatch: Any) -> None:
    """An agent that builds its tool schemas afresh for every call (``create_agent``,
    LlamaIndex's agents) is counted exactly, and the counter keeps at most
    ``_HELD_TOOLS_MAX`` of those dicts alive; a dict passed again is not turned into JSON
    again."""
    monkeypatch.setattr(tokens_module, "_HELD_TOOLS_MAX", 16)
    built: list[Any] = []
    real = tokens_module._tool_json
    monkeypatch.setattr(tokens_module, "_tool_json", lambda t: built.append(t) or real(t))
    c = CharEstimateCounter()
    msgs = [{"role": "user", "content": "Where is my parcel?"}]
    expected = CharEstimateCounter().count_messages(msgs, [schema("lookup"), schema("refund")])
    for _ in range(100):
        assert c.count_messages(msgs, [schema("lookup"), schema("refund")]) == expected
        assert len(c._held_tools) <= 16
    assert len(built) == 200 + 2  # every fresh dict once (and the reference counter's two)
    bound = [schema("lookup"), schema("refund")]  # a model bound once: the same dicts
    built.clear()
    for _ in range(5):
        assert c.count_messages(msgs, bound) == expected
    assert built == bound  # each turned into JSON once


def test_a_freed_tool_object_leaves_the_cache() -> None:
    from langchain_core.tools import tool

    @tool
    def lookup(query: str) -> str:
        """Look an order up."""
        return query

    c = CharEstimateCounter()
    msgs = [{"role": "user", "content": "Where is my parcel?"}]
    n = c.count_messages(msgs, [lookup])
    assert c._tools[id(lookup)]() is lookup
    assert c.count_messages(msgs, [lookup]) == n
    ref = weakref.ref(lookup)
    del lookup
    gc.collect()
    assert ref() is None  # the cache did not keep it alive
    assert not c._tools


def test_threads_count_while_their_messages_are_freed_and_the_cache_is_dropped(
    monkeypatch: Any,
) -> None:
    """Eight agents on one counter, each re-sending a growing history and then letting it go,
    with a cache small enough to be dropped while other threads' entries are being forgotten:
    every count equals a fresh counter's, no callback fails, and nothing is left behind."""
    monkeypatch.setattr(tokens_module, "_MESSAGE_CACHE_MAX", 24)
    c = CharEstimateCounter()
    errors: list[BaseException] = []

    def agent(worker: int) -> None:
        try:
            for run in range(40):
                history: list[Any] = [HumanMessage(f"worker {worker}, run {run}: where is 1182?")]
                for i in range(5):
                    assert c.count_messages(history) == CharEstimateCounter().count_messages(
                        history
                    )
                    cid = f"call_{worker}_{run}_{i}"
                    call = {"name": "lookup", "args": {"query": f"1182 try {i}"}, "id": cid}
                    history.append(AIMessage("", tool_calls=[call]))
                    history.append(ToolMessage(f"result {i} " * (i + 1), tool_call_id=cid))
                del history
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=agent, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    gc.collect()
    assert not c._msgs  # every entry forgotten
