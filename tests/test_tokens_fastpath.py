"""The fast path of ``count_messages`` for new LangChain messages (fields read by subscript from
``__dict__``, a tool call's dict of string args joined without a JSON encoder, text counts read
from the counter's text cache) counts exactly what the general path counts: the same messages as
read-only mappings, read by ``get`` calls, with tool calls read by ``_get`` and every value
encoded by the plain JSON encoder, by a counter whose ``count`` is overridden (so it never reads
the text cache itself)."""

from __future__ import annotations

import json
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

import agentguard._tokens as tokens_module
from agentguard import counter_for
from agentguard._tokens import CharEstimateCounter, TiktokenCounter


class _Reference(TiktokenCounter):
    """A counter that reads nothing from its text cache behind ``count``'s back."""

    __slots__ = ()

    def count(self, text: str) -> int:
        return TiktokenCounter.count(self, text)


def _reference_counter() -> _Reference:
    return _Reference(
        counter_for("gpt-4o").encoding,  # type: ignore[attr-defined]
        exact=True,
        margin=0.0,
        source="test",
    )


#: tool-call argument keys: their values are encoded as JSON, not read
_ENCODED = frozenset({"args", "arguments", "input", "tool_kwargs"})


def _read_only(value: Any) -> Any:
    """Dicts (a message, its tool calls, its kwargs) as read-only mappings, read by ``get``;
    tool-call arguments stay as they are (they are encoded, not read)."""
    if isinstance(value, list):
        return [_read_only(v) for v in value]
    if isinstance(value, dict):
        return MappingProxyType(
            {k: v if k in _ENCODED else _read_only(v) for k, v in value.items()}
        )
    return value


def _as_mapping(message: Any) -> Any:
    """What the counter reads from ``message``, as a read-only mapping (a pydantic extra under
    the fields, as attribute access resolves it)."""
    if isinstance(message, BaseMessage):
        fields = {**(message.__pydantic_extra__ or {}), **message.__dict__}
    else:
        fields = dict(message)
    return _read_only(fields)


def reference(messages: list[Any], tools: Any = None) -> int:
    """The general path's count, with the plain JSON encoder for every value."""
    mp = pytest.MonkeyPatch()
    mp.setattr(tokens_module, "_dumps", tokens_module._ENCODE)
    try:
        return _reference_counter().count_messages([_as_mapping(m) for m in messages], tools)
    finally:
        mp.undo()


_TEXT = st.text(
    alphabet=st.one_of(
        st.sampled_from('ab \n\t"\\/é€ü漢字🙂\x00\x1f'), st.characters(codec="utf-8")
    ),
    max_size=12,
)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=6,
)
_ARGS = st.one_of(
    st.dictionaries(_TEXT, _TEXT, max_size=3),  # the common shape: a dict of strings
    st.dictionaries(_TEXT, _JSON, max_size=3),  # nested values, numbers, booleans, null
)
_CALL = st.fixed_dictionaries(
    {"name": _TEXT, "args": _ARGS, "id": st.one_of(st.none(), _TEXT)},
)
_RAW_CALL = st.builds(  # OpenAI's wire shape, as LangChain keeps it in additional_kwargs
    lambda call_id, name, args: {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(args)},
    },
    _TEXT,
    _TEXT,
    _ARGS,
)


class _Label(str):
    """A ``str`` subclass: counted as text, like a ``str``, never as JSON."""


_OTHER_CALL = st.fixed_dictionaries(  # LlamaIndex-like keys, and "arguments" / "input" ones
    {},
    optional={
        "name": st.one_of(st.just(""), _TEXT),
        "tool_name": _TEXT,
        "arguments": st.one_of(st.none(), _TEXT, _ARGS),
        "args": st.one_of(st.none(), _TEXT, _ARGS, st.builds(_Label, _TEXT)),
        "input": _ARGS,
        "tool_kwargs": _ARGS,
        "id": st.one_of(st.none(), st.just(""), _TEXT, st.integers()),
        "tool_id": _TEXT,
    },
)
_ODD = st.one_of(st.none(), st.just(""), _TEXT, st.integers(), st.builds(_Label, _TEXT))
_LC_LIKE_CALL = st.fixed_dictionaries(  # LangChain's keys, with values of other types too
    {"name": _ODD, "args": st.one_of(_ODD, _ARGS), "id": _ODD},
    optional={"type": st.just("tool_call"), "tool_name": _TEXT, "tool_id": _TEXT, "input": _ARGS},
)
_BLOCKS = st.lists(
    st.one_of(
        st.fixed_dictionaries({"type": st.just("text"), "text": _TEXT}),
        st.just({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}),
        st.fixed_dictionaries(
            {"type": st.just("tool_use"), "name": _TEXT, "input": _ARGS, "id": _TEXT}
        ),
        _TEXT,
    ),
    max_size=3,
)
_CONTENT = st.one_of(_TEXT, _BLOCKS)
_NAME = st.one_of(st.none(), _TEXT)


def _ai(content: Any, calls: list[Any], raw: list[Any], name: Any) -> AIMessage:
    return AIMessage(
        content=content,
        tool_calls=calls,
        additional_kwargs={"tool_calls": raw} if raw else {},
        name=name,
    )


_LC_MESSAGE = st.one_of(
    st.builds(
        _ai,
        _CONTENT,
        st.lists(_CALL, max_size=3),
        st.lists(_RAW_CALL, max_size=2),
        _NAME,
    ),
    st.builds(
        lambda c, i, n: ToolMessage(content=c, tool_call_id=i, name=n), _CONTENT, _TEXT, _NAME
    ),
    st.builds(lambda c, n: HumanMessage(content=c, name=n), _CONTENT, _NAME),
    st.builds(lambda c: SystemMessage(content=c), _CONTENT),
    st.builds(
        lambda r, c: ChatMessage(role=r, content=c), st.sampled_from(["user", "critic", ""]), _TEXT
    ),
    # a pydantic extra (read under the fields) and a raw-shape-only assistant dict
    st.builds(lambda c: HumanMessage(content=c, role="system", flavour=1), _TEXT),
    st.builds(
        lambda c, raw: {"role": "assistant", "content": c, "tool_calls": raw},
        _TEXT,
        st.lists(_RAW_CALL, min_size=1, max_size=2),
    ),
    st.builds(
        lambda calls: {"role": "assistant", "content": "", "tool_calls": calls},
        st.lists(st.one_of(_OTHER_CALL, _LC_LIKE_CALL), min_size=1, max_size=3),
    ),
)
_TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]


@settings(max_examples=300, deadline=None)
@given(st.lists(_LC_MESSAGE, max_size=4), st.booleans())
def test_new_and_kept_langchain_messages_count_as_the_general_path(
    messages: list[Any], with_tools: bool
) -> None:
    tools = _TOOLS if with_tools else None
    want = reference(messages, tools)
    c = counter_for("gpt-4o")
    assert c.count_messages(messages, tools) == want  # new objects
    assert c.count_messages(messages, tools) == want  # kept
    fresh = _reference_counter()  # a counter with an empty text cache
    assert TiktokenCounter.count_messages(fresh, messages, tools) == want
    estimate = CharEstimateCounter()
    as_estimated = estimate.count_messages([_as_mapping(m) for m in messages], tools)
    assert estimate.count_messages(messages, tools) == as_estimated


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(_LC_LIKE_CALL, _OTHER_CALL), min_size=1, max_size=4))
@example([{"name": "lookup", "args": _Label("order 1182"), "id": "call_1"}])
@example([{"name": _Label("lookup"), "args": {"q": "1"}, "id": 7}])
def test_tool_call_dicts_of_every_shape_count_as_the_general_path(calls: list[Any]) -> None:
    """The inline LangChain tool-call path and ``_call``'s dict path against ``_call``'s
    general one (read-only mappings), for names, args and ids of other types too."""
    message = {"role": "assistant", "content": "", "tool_calls": calls}
    assert counter_for("gpt-4o").count_messages([message]) == reference([message])


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.one_of(_TEXT, st.integers(), st.booleans()),
        st.one_of(_TEXT, st.integers(), st.none(), st.lists(_TEXT, max_size=2)),
        max_size=4,
    )
)
def test_dumps_writes_what_the_json_encoder_writes(value: dict[Any, Any]) -> None:
    plain = json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
    assert tokens_module._dumps(value) == plain


def test_dumps_of_string_subclasses_and_other_mappings_matches_the_encoder() -> None:
    for value in (
        {_Label("k"): _Label("v\n")},
        {"k": _Label("é")},
        {},
        [],
        "s",
        MappingProxyType({}),
    ):
        plain = json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
        assert tokens_module._dumps(value) == plain


def test_a_message_edited_after_it_was_counted_counts_as_the_general_path() -> None:
    c = counter_for("gpt-4o")
    ai = AIMessage("", tool_calls=[{"name": "lookup", "args": {"q": "order 1182"}, "id": "c1"}])
    tool = ToolMessage("paid, shipped", tool_call_id="c1")
    history = [HumanMessage("Where is order 1182?"), ai, tool]
    before = c.count_messages(history)
    assert before == reference(history)
    edits = [
        lambda: setattr(ai, "tool_calls", [*ai.tool_calls, {**ai.tool_calls[0], "id": "c2"}]),
        lambda: setattr(ai, "content", "Looking it up: ünïcode"),
        lambda: setattr(ai, "name", "planner"),
        lambda: setattr(ai, "tool_calls", []),
        lambda: setattr(
            ai,
            "additional_kwargs",
            {"tool_calls": [{"id": "r", "function": {"name": "f", "arguments": "{}"}}]},
        ),
        lambda: setattr(tool, "tool_call_id", "call_0000000000000000000001"),
        lambda: setattr(tool, "name", "lookup"),
        lambda: setattr(tool, "content", [{"type": "text", "text": "a block"}]),
    ]
    for edit in edits:
        edit()
        now = c.count_messages(history)
        assert now == reference(history)
        assert now != before  # every edit changes the count, and it was seen
        before = now


def test_tool_call_counts_add_up_by_hand() -> None:
    """The fast tool-call path against the published rule, computed by hand: 6 + name + id +
    compact JSON of the arguments."""
    c = counter_for("gpt-4o")
    args = {"query": "order 1182", "note": 'say "hi"\n'}
    ai = AIMessage("", tool_calls=[{"name": "lookup", "args": args, "id": "call_9"}])
    text = '{"query":"order 1182","note":"say \\"hi\\"\\n"}'
    call = 6 + c.count("lookup") + c.count("call_9") + c.count(text)
    assert c.count_messages([ai]) == 3 + 3 + c.count("assistant") + call


def test_a_named_tool_message_counts_by_hand() -> None:
    c = counter_for("gpt-4o")
    tool = ToolMessage("order 1182: paid", tool_call_id="call_9", name="lookup")
    by_hand = 3 + 3 + c.count("tool") + c.count("order 1182: paid")
    by_hand += c.count("lookup") + 1 + c.count("call_9")
    assert c.count_messages([tool]) == c.count_messages([tool]) == by_hand


class _Plain:
    """A message object that is not a pydantic model: its attributes may come and go."""

    def __init__(self, role: str, content: Any) -> None:
        self.role = role
        self.content = content


class _NoTruth:
    """A value whose ``==`` answers with something that has no truth value (as arrays do)."""

    def __eq__(self, other: object) -> Any:
        return self

    def __bool__(self) -> bool:
        raise ValueError("the truth value is ambiguous")

    __hash__ = None  # type: ignore[assignment]

    def __str__(self) -> str:
        return "no truth"


def test_a_kept_message_is_counted_again_when_a_counted_field_appears_or_cannot_compare() -> None:
    c = counter_for("gpt-4o")
    plain = _Plain("user", "Where is order 1182?")
    history = [plain]
    c.count_messages([_Plain("user", "a first object of the class: its kind is learnt")])
    before = c.count_messages(history)
    assert c._msgs[id(plain)]() is plain  # kept
    assert before == reference([{"role": "user", "content": "Where is order 1182?"}])
    plain.name = "alice"  # type: ignore[attr-defined]  # a field the first count did not see
    named = c.count_messages(history)
    assert named == reference([{"role": "user", "content": plain.content, "name": "alice"}])
    assert named != before
    # an equal value in place of the counted one counts the same: still the kept count
    ai = AIMessage("", tool_calls=[{"name": "lookup", "args": {"q": "1182"}, "id": "c1"}])
    kept = c.count_messages([ai])
    ai.additional_kwargs = dict(ai.additional_kwargs)
    assert c.count_messages([ai]) == kept == reference([ai])
    # a field whose == has no answer is read again, not trusted
    odd = HumanMessage("hello")
    c.count_messages([odd])
    assert c._msgs[id(odd)]() is odd  # kept
    odd.additional_kwargs = {"x": _NoTruth()}
    assert c.count_messages([odd]) == reference([odd])
