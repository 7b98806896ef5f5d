"""Usage normalisation: one shape from every provider's, and bad records refused clearly."""

from __future__ import annotations

from types import MappingProxyType, SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentguard import InvalidUsage, Usage


def test_langchain_usage_metadata() -> None:
    u = Usage.from_langchain(
        {
            "input_tokens": 1200,
            "output_tokens": 300,
            "total_tokens": 1500,
            "input_token_details": {"cache_read": 1000, "cache_creation": 100},
            "output_token_details": {"reasoning": 200},
        }
    )
    assert (u.input_tokens, u.cache_read_tokens, u.cache_write_tokens) == (1200, 1000, 100)
    assert (u.output_tokens, u.reasoning_tokens, u.uncached_input_tokens) == (300, 200, 100)


_COUNT = st.one_of(
    st.none(),
    st.integers(-5, 2000),
    st.sampled_from([True, 1.0, 2.5, "7"]),
)


@given(
    st.fixed_dictionaries(
        {},
        optional={
            "input_tokens": _COUNT,
            "output_tokens": _COUNT,
            "input_token_details": st.one_of(
                st.none(),
                st.fixed_dictionaries(
                    {}, optional={"cache_read": _COUNT, "cache_creation": _COUNT}
                ),
            ),
            "output_token_details": st.one_of(
                st.none(), st.fixed_dictionaries({}, optional={"reasoning": _COUNT})
            ),
        },
    )
)
def test_langchain_dicts_read_as_any_mapping_is(data: dict[str, Any]) -> None:
    """Plain dicts take a shortcut; the result (or the error) is the general reading's."""

    def general(d: Any) -> Any:
        if isinstance(d, dict):
            return MappingProxyType({k: general(v) for k, v in d.items()})
        return d

    def outcome(raw: Any) -> Any:
        try:
            u = Usage.from_langchain(raw)
        except InvalidUsage as exc:
            return ("error", exc.field, str(exc))
        return (u.as_dict(), type(u.input_tokens), type(u.reasoning_tokens))

    assert outcome(data) == outcome(general(data))


def test_openai_chat_and_responses_and_sdk_objects() -> None:
    chat = {
        "prompt_tokens": 2006,
        "completion_tokens": 300,
        "total_tokens": 2306,
        "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 64},
    }
    assert Usage.from_openai(chat) == Usage(2006, 300, cache_read_tokens=1920, reasoning_tokens=64)
    responses = {
        "input_tokens": 500,
        "output_tokens": 20,
        "input_tokens_details": {"cached_tokens": 128},
        "output_tokens_details": {"reasoning_tokens": 0},
    }
    assert Usage.from_openai(responses) == Usage(500, 20, cache_read_tokens=128)
    sdk = SimpleNamespace(
        prompt_tokens=10,
        completion_tokens=5,
        prompt_tokens_details=SimpleNamespace(cached_tokens=None),
        completion_tokens_details=None,
    )
    assert Usage.from_openai(sdk) == Usage(10, 5)
    assert Usage.parse(chat) == Usage.from_openai(chat)


def test_anthropic_cache_tokens_are_added_to_input() -> None:
    raw = {
        "input_tokens": 21,
        "cache_creation_input_tokens": 188,
        "cache_read_input_tokens": 2000,
        "output_tokens": 393,
    }
    u = Usage.from_anthropic(raw)
    assert u == Usage(2209, 393, cache_read_tokens=2000, cache_write_tokens=188)
    assert Usage.parse(raw) == u


def test_bedrock_converse() -> None:
    raw = {
        "inputTokens": 30,
        "outputTokens": 10,
        "totalTokens": 1040,
        "cacheReadInputTokens": 1000,
        "cacheWriteInputTokens": 0,
    }
    assert Usage.from_bedrock(raw) == Usage(1030, 10, cache_read_tokens=1000)
    folded = {
        "inputTokens": 1030,
        "outputTokens": 10,
        "totalTokens": 1040,
        "cacheReadInputTokens": 1000,
    }
    assert Usage.from_bedrock(folded) == Usage(1030, 10, cache_read_tokens=1000)
    assert Usage.parse(raw) == Usage.from_bedrock(raw)


@pytest.mark.parametrize(
    ("kwargs", "field", "fragment"),
    [
        ({"input_tokens": -1}, "input_tokens", "negative"),
        ({"output_tokens": 2.5}, "output_tokens", "integer"),
        ({"output_tokens": "12"}, "output_tokens", "integer"),
        ({"input_tokens": True}, "input_tokens", "bool"),
        ({"input_tokens": 10**9}, "input_tokens", "not plausible"),
        ({"input_tokens": 5, "cache_read_tokens": 6}, "cache_read_tokens", "exceed"),
        ({"output_tokens": 5, "reasoning_tokens": 6}, "reasoning_tokens", "exceed"),
    ],
)
def test_bad_records_are_refused_with_field_and_value(
    kwargs: dict[str, object], field: str, fragment: str
) -> None:
    with pytest.raises(InvalidUsage, match=fragment) as info:
        Usage(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
    assert field in str(info.value)
    assert repr(kwargs[field]) in str(info.value)


def test_unrecognised_shape() -> None:
    with pytest.raises(InvalidUsage, match="unrecognised"):
        Usage.parse({"tokens": 5})


def test_integral_floats_accepted_and_immutable() -> None:
    u = Usage(10.0, 2)  # type: ignore[arg-type]
    assert u.input_tokens == 10
    with pytest.raises(AttributeError):
        u.input_tokens = 3  # type: ignore[misc]


counts = st.integers(min_value=0, max_value=10**6)


@given(counts, counts, counts, counts)
def test_sum_is_fieldwise_and_round_trips(a: int, b: int, c: int, d: int) -> None:
    u1 = Usage(a + b, c, cache_read_tokens=b)
    u2 = Usage(d, c, reasoning_tokens=c, estimated=True)
    s = u1 + u2
    assert s.input_tokens == a + b + d
    assert s.total_tokens == u1.total_tokens + u2.total_tokens
    assert s.estimated
    assert sum([u1, u2]) == s
    assert Usage.from_dict(s.as_dict()) == s
