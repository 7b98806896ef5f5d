"""Pure context trimming: fit ranked retrieval chunks into a token budget.

This module is framework-free. The LangChain document compressor and the LlamaIndex node
postprocessor wrap :func:`trim_chunks`; it only needs a token counter with ``count``,
``encode`` and ``decode`` (see :class:`_Counter`).

What :func:`trim_chunks` does, in order:

1. ranks the chunks by score, best first (stable; unscored chunks after the scored ones, in
   input order);
2. walks the ranking, dropping empty chunks, exact duplicates and near-duplicates of chunks
   already kept, and keeping every chunk that still fits the budget;
3. at the first chunk that does not fit, cuts it at a sentence boundary to the tokens left (or
   drops it) and stops: every chunk ranked after it is dropped without being tokenised. A
   chunk that looks too big (by the tokens per character seen so far) is not tokenised whole:
   only the candidate cuts and the sentences between them are counted.

The kept chunks are therefore always a best-first prefix of the ranking (minus the duplicates),
with at most one truncated chunk at its end, and their tokens plus separators never exceed the
budget.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_right
from collections.abc import Callable, Hashable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from typing import Literal, Protocol, TypeVar

from agentguard._errors import PolicyError

__all__ = ["Chunk", "DropReason", "TrimResult", "trim_chunks"]

DropReason = Literal["duplicate", "near_duplicate", "over_budget", "empty"]
_T = TypeVar("_T", bound=Hashable)

#: Below this many clauses, a pair of chunks is compared by word 3-grams instead of clauses.
_MIN_CLAUSES = 4

#: Slack for float rounding when comparing an overlap with the threshold.
_EPSILON = 1e-9

#: Tokens per shingle in the word / character n-gram comparison.
_SHINGLE = 3

#: Chars-per-token fallback when no chunk was tokenised: ASCII text runs about 4 characters per
#: token in the common BPE vocabularies, other scripts about one character per token.
_ASCII_CHARS_PER_TOKEN = 4.0

#: Extra tokens a sum of per-sentence counts may be off by at a seam between two sentences
#: (a terminator can merge with the whitespace after it). A cut whose estimate exceeds the room
#: by no more than this is counted exactly before it is ruled out.
_SEAM_SLACK = 2

#: A cut may stop short of the longest that fits by up to 1/_CUT_SPARE of the room (a sentence
#: or two) when getting closer would take another exact count of most of the chunk.
_CUT_SPARE = 25

#: The cut search first looks for sentence ends past this share of the aimed length only.
_CUT_WINDOW = 0.85

#: At most this many exact counts of candidate cuts per chunk; past it, the best fit found wins.
_MAX_CUT_COUNTS = 6

# Every character str.isspace() accepts, but " " itself, mapped to " ".
_WHITESPACE = str.maketrans(
    dict.fromkeys(
        "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005"
        "\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000",
        " ",
    )
)

# Clause punctuation (Latin, CJK full-width, ideographic, Arabic, Devanagari) mapped to a NUL.
_CLAUSE_BREAKS = str.maketrans(
    dict.fromkeys(
        ".,;:!?\u2026\u3002\u3001\uff0c\uff0e\uff1b\uff1a\uff01\uff1f\u060c\u061b\u061f\u0964",
        "\x00",
    )
)

# Both at once: what clauses are cut from (the maps share no character, so the order of the
# two translations, and of collapsing spaces, does not matter).
_CLAUSE_KEY = {**_WHITESPACE, **_CLAUSE_BREAKS}
# The same for ASCII text as bytes (for ASCII, case folding is lowering).
_ASCII_CLAUSE_KEY = bytes.maketrans(
    bytes(range(128)), "".join(_CLAUSE_KEY.get(c, chr(c)) for c in range(128)).encode("ascii")
)

# Scripts written without spaces between words: each character is a shingle token on its own.
_UNSPACED = (
    "\u0e00-\u0eff"  # Thai, Lao
    "\u1000-\u109f"  # Myanmar
    "\u1780-\u17ff"  # Khmer
    "\u2e80-\u2fdf"  # CJK radicals, Kangxi radicals
    "\u3040-\u312f"  # Hiragana, Katakana, Bopomofo
    "\u31a0-\u31ff"  # Bopomofo extended, Katakana phonetic extensions
    "\u3400-\u4dbf"  # CJK extension A
    "\u4e00-\u9fff"  # CJK unified ideographs
    "\uf900-\ufaff"  # CJK compatibility ideographs
    "\uff66-\uff9f"  # half-width Katakana
    "\U00020000-\U0003134f"  # CJK extensions B-G
)
_SHINGLE_TOKEN = re.compile(f"[{_UNSPACED}]|[^\\W{_UNSPACED}]+")

# Sentence terminators, and what makes one a sentence end: ASCII ones need whitespace (or the
# end of the text) after them and any closing quotes/brackets; CJK ones and newlines do not.
_TERMINATORS = ".!?\n\u3002\uff01\uff1f"
_SENTENCE_END = re.compile(
    "[.!?]+[\"'\u201d\u2019)\\]]*(?=\\s|\\Z)"
    "|[\u3002\uff01\uff1f]+[\u300d\u300f\u201d\u2019\uff09\"')\\]]*"
    "|\n"
)


class _Counter(Protocol):
    """The slice of agentguard's ``TokenCounter`` that trimming needs."""

    def count(self, text: str, /) -> int:
        """Return the number of tokens ``text`` costs."""
        ...

    def encode(self, text: str, /) -> list[int]:
        """Return the token ids of ``text``."""
        ...

    def decode(self, tokens: list[int], /) -> str:
        """Return the text of ``tokens``."""
        ...


@dataclass(frozen=True, slots=True)
class Chunk:
    """One piece of retrieved context.

    Attributes:
        text: the content.
        score: relevance, higher is better; ``None`` (or NaN) means unknown, ranked after every
            scored chunk, in input order.
        id: the caller's id (document id, node id) so adapters can map results back.
        index: position in the input; :func:`trim_chunks` sets it when it is ``-1``.
        truncated: ``True`` when :func:`trim_chunks` cut this chunk's text.
    """

    text: str
    score: float | None = None
    id: str | None = None
    index: int = -1
    truncated: bool = False


@dataclass(frozen=True, slots=True)
class TrimResult:
    """What :func:`trim_chunks` kept and dropped, and the token accounting.

    Attributes:
        kept: the chunks kept, in rank order (best first), or in input order with
            ``keep_order=True``. At most one is ``truncated``.
        dropped: each dropped chunk with its reason (``"duplicate"``, ``"near_duplicate"``,
            ``"over_budget"`` or ``"empty"``), in the same order as ``kept``.
        budget_tokens: the budget asked for.
        tokens_in: tokens of every input chunk (for a truncated chunk, its full text).
        tokens_kept: tokens of the kept texts, separators not included.
        tokens_in_estimated: ``True`` when some chunks were never tokenised whole (dropped
            ones, or the one cut) and their share of ``tokens_in`` was estimated from the
            observed characters per token.
    """

    kept: list[Chunk]
    dropped: list[tuple[Chunk, DropReason]]
    budget_tokens: int
    tokens_in: int
    tokens_kept: int
    tokens_in_estimated: bool

    @property
    def tokens_saved(self) -> int:
        """Input tokens the kept context does not carry: ``tokens_in - tokens_kept``."""
        return self.tokens_in - self.tokens_kept


def _check_int(field: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PolicyError(field, value, "must be an integer")
    if value < 0:
        raise PolicyError(field, value, "must be >= 0")
    return value


def _rank_key(chunk: Chunk, position: int) -> tuple[int, float, int]:
    score = chunk.score
    if score is None or math.isnan(score):
        return (1, 0.0, position)
    return (0, -score, position)


def _normalise(text: str) -> str:
    """Return the exact-duplicate key of ``text``: case-folded, whitespace runs made one space.

    Equal to ``" ".join(text.casefold().split())``, without building the list of words.
    """
    key = text.casefold().translate(_WHITESPACE)
    while "  " in key:
        key = key.replace("  ", " ")
    return key.strip(" ")


def _clause_key(text: str) -> str:
    """Return ``_normalise(text)`` with clause punctuation made NUL, in one translation."""
    return "\x00".join(_clause_parts(text))


def _clause_parts(text: str) -> list[str]:
    """Return ``_clause_key(text).split("\\x00")``, without building the key."""
    if text.isascii():  # bytes methods run several times faster than their str twins
        key = text.encode("ascii").lower().translate(_ASCII_CLAUSE_KEY).decode("ascii")
    else:
        key = text.casefold().translate(_CLAUSE_KEY)
    parts = key.split("\x00")
    if "  " in key:
        # Runs of spaces never span a NUL: collapse them clause by clause, only in the clauses
        # that have one (str.replace over the whole text costs several times more).
        parts = [_collapse(part) if "  " in part else part for part in parts]
    # what stripping the whole key would strip
    parts[0] = parts[0].lstrip(" ")
    parts[-1] = parts[-1].rstrip(" ")
    return parts


def _collapse(text: str) -> str:
    while "  " in text:
        text = text.replace("  ", " ")
    return text


def _word_shingles(key: str) -> frozenset[tuple[str, ...]]:
    """Return the token 3-grams of a normalised text.

    Text with spaces is split into words; characters of scripts written without spaces (CJK,
    Thai, ...) are tokens on their own; text without any space uses character 3-grams.
    """
    tokens: Sequence[str]
    if " " not in key:
        tokens = key
    elif key.isascii():
        tokens = key.split(" ")
    else:
        tokens = _SHINGLE_TOKEN.findall(key) or key.replace(" ", "")
    if len(tokens) < _SHINGLE:
        return frozenset((tuple(tokens),))
    return frozenset(zip(tokens, tokens[1:], tokens[2:], strict=False))


class _Signature:
    """What near-duplicate detection compares: the exact key, the clauses, the word 3-grams.

    Clauses (the text between clause punctuation: ``. , ; : ! ?``, their CJK and other
    full-width forms) are cheap to get from a long chunk: a few dozen strings, against hundreds
    of word 3-grams. Both are built on first use: a chunk compared with no kept chunk (the
    first one walked) only needs its key.
    """

    __slots__ = (
        "_clauses",
        "_key",
        "_parts",
        "_shingles",
        "_text",
        "clause_key",
        "tokens_per_char",
    )

    def __init__(self, text: str, parts: list[str] | None = None) -> None:
        self._text = text
        self._parts = _clause_parts(text) if parts is None else parts
        #: The clauses of the key in order (clause punctuation removed): equal for exact
        #: duplicates, and what the clause set is made of (one translation of the text).
        self.clause_key = tuple(self._parts)
        self._key: str | None = None
        self._clauses: AbstractSet[str] | None = None
        self._shingles: frozenset[tuple[str, ...]] | None = None
        self.tokens_per_char = 0.0

    @property
    def key(self) -> str:
        """The exact-duplicate key (see :func:`_normalise`), built on first use."""
        if self._key is None:
            self._key = _normalise(self._text)
        return self._key

    def prefix(self, text: str, length: int) -> _Signature:
        """Return the signature of ``text[:length]``, ``text`` being this signature's text.

        ``text[:length]`` must end in a character that is not whitespace: its clause key is then
        a prefix of this one (case folding, character mapping and space collapsing all work
        character by character), and only the rest of the text is normalised to find its end.
        """
        full = "\x00".join(self._parts)
        rest = _clause_key(text[length:])
        size = len(full) - len(rest)
        if rest and text[length].isspace():
            size -= 1  # the space that joins the two parts in the key
        return _Signature(text[:length], full[:size].split("\x00"))

    def clauses(self) -> AbstractSet[str]:
        """The set of clauses, built on first use."""
        if self._clauses is None:
            parts = self._parts
            clauses = set(parts[1:])
            # The leading space makes the first clause look like every other one: " text".
            clauses.add(f" {parts[0]}")
            clauses.discard("")
            clauses.discard(" ")
            self._clauses = clauses
        return self._clauses

    def shingles(self) -> frozenset[tuple[str, ...]]:
        if self._shingles is None:
            self._shingles = _word_shingles(self.key)
        return self._shingles

    def near(self, other: _Signature, threshold: float, *, contained: bool) -> bool:
        """Return whether this text is a near-duplicate of ``other``.

        With ``contained``, whether at least ``threshold`` of this text's clauses (3-grams)
        appear in ``other`` (a cut chunk is compared this way: the part kept must add something
        the kept chunk lacks); otherwise whether the Jaccard similarity is at least
        ``threshold``. Clauses are compared when both texts have at least ``_MIN_CLAUSES`` of
        them, word 3-grams otherwise.
        """
        mine, theirs = self.clauses(), other.clauses()
        if len(mine) >= _MIN_CLAUSES and len(theirs) >= _MIN_CLAUSES:
            return _overlap_at_least(mine, theirs, threshold, contained=contained)
        return _overlap_at_least(self.shingles(), other.shingles(), threshold, contained=contained)


def _overlap_at_least(
    a: AbstractSet[_T], b: AbstractSet[_T], threshold: float, *, contained: bool
) -> bool:
    """Return whether ``|a & b| / |a| >= threshold`` (contained) or Jaccard ``>= threshold``.

    Jaccard >= t  <=>  common >= t * (|a| + |b|) / (1 + t), so the smaller set may miss at most
    that many of its elements in the larger one; containment needs common >= t * |a|. The scan
    stops at the first miss too many, after a handful of lookups for unrelated texts. Ties at
    the threshold count as similar in both forms (the epsilon absorbs float rounding), so a
    text contained less than the threshold is never Jaccard-similar either.
    """
    if contained:
        small, large = a, b
        need = threshold * len(a)
    else:
        small, large = (a, b) if len(a) <= len(b) else (b, a)
        if len(small) < threshold * len(large) - _EPSILON:  # Jaccard <= |small| / |large|
            return False
        need = threshold * (len(small) + len(large)) / (1.0 + threshold)
    allowed = len(small) - math.ceil(need - _EPSILON)
    if allowed < 0:
        return False
    if allowed < len(small) and small.isdisjoint(large):  # unrelated texts, decided in C
        return False
    misses = 0
    for element in small:
        if element not in large:
            misses += 1
            if misses > allowed:
                return False
    return True


def _heuristic_tokens(text: str) -> int:
    """Estimate tokens without a tokeniser: ~4 ASCII chars per token, ~1 token per other char."""
    extra_bytes = len(text.encode("utf-8")) - len(text)
    non_ascii = min(len(text), (extra_bytes + 1) // 2)
    return max(1, round((len(text) - non_ascii) / _ASCII_CHARS_PER_TOKEN + non_ascii))


def _sentence_cuts(text: str, start: int = 0) -> list[int]:
    """Return the lengths of the sentence-end prefixes of ``text``, ascending, without repeats.

    A prefix ends after a sentence terminator (see ``_SENTENCE_END``) found at ``start`` or
    later, trailing whitespace removed; empty prefixes and the whole text are left out.
    """
    starts: list[int] = []
    for terminator in _TERMINATORS:  # str.find runs far faster than a regex scan
        position = text.find(terminator, start)
        while position >= 0:
            starts.append(position)
            position = text.find(terminator, position + 1)
    starts.sort()
    cuts: list[int] = []
    last = 0
    match = _SENTENCE_END.match
    for start in starts:
        found = match(text, start)
        if found is None:
            continue
        end = found.end()
        if text[end - 1] == "\n":  # a newline ends the sentence before it
            end = len(text[:end].rstrip())
        if last < end < len(text):
            cuts.append(end)
            last = end
    return cuts


def _fit(
    text: str,
    room: int,
    tokens_per_char: float,
    count: Callable[[str], int],
    least: int,
    whole: int | None,
) -> tuple[str | None, int | None, int, bool]:
    """Find the longest sentence-end prefix of ``text`` that costs at most ``room`` tokens.

    The candidates are the sentence-end prefixes and the whole text. The first one tried is the
    longest that ``tokens_per_char`` (seen on other chunks, or ``text``'s own) says fits; it is
    counted exactly. From there, the counts of the sentences in between (short texts, cheap to
    count) estimate the neighbours' counts: the search moves to the longest candidate estimated
    to fit, counts it exactly, and stops when the next longer one is known (or estimated, by
    more than ``_SEAM_SLACK``) not to fit. Only exactly counted texts are ever returned.

    ``whole`` is ``text``'s exact count when known. Returns ``(kept, its count, tokens of the
    whole text, whether that count is exact)``: ``kept`` is ``text`` itself when it fits whole,
    a proper prefix when a cut of at least ``least`` tokens fits, else ``None``.
    """
    exact: dict[int, int] = {}  # exact counts of the candidates tried, by length
    if whole is not None:
        exact[len(text)] = whole
    spare = room // _CUT_SPARE
    # Aim a little short: a first try that fits by a few tokens is kept as it is, one that
    # does not fit costs a second count.
    aim = (room - spare // 2) / tokens_per_char if tokens_per_char > 0 else len(text)
    # Sentence ends well below the aim are rarely needed: look for them only if the search
    # reaches down there.
    window = int(aim * _CUT_WINDOW)
    fits = -1
    if window > 0:
        cuts = _sentence_cuts(text, window)
        fits = _search(text, cuts, aim, room, count, least, spare, exact, windowed=True)
    if fits == -1:
        cuts = _sentence_cuts(text)
        fits = _search(text, cuts, aim, room, count, least, spare, exact, windowed=False)
    last = len(text)
    if last in exact:
        total, known = exact[last], True
    else:
        longest = max(exact)
        total = exact[longest] + round((last - longest) * exact[longest] / longest)
        total, known = max(total, exact[longest] + 1), False
    if fits < 0 or (exact[fits] < least and fits != last):
        return None, None, total, known
    return text[:fits], exact[fits], total, known


def _search(
    text: str,
    cuts: list[int],
    aim: float,
    room: int,
    count: Callable[[str], int],
    least: int,
    spare: int,
    exact: dict[int, int],
    windowed: bool,
) -> int:
    """The search of :func:`_fit` over candidate lengths ``cuts`` (ascending; the whole text is
    added): the length of the cut found, or -2 when none fits. With ``windowed`` (``cuts``
    misses the shortest candidates), -1 when no candidate in ``cuts`` fits: search again with
    them all."""
    cuts = [*cuts, len(text)]
    last = len(cuts) - 1
    segments: dict[int, int] = {}

    def segment(i: int) -> int:  # tokens of the text between candidate i - 1 and candidate i
        n = segments.get(i)
        if n is None:
            n = segments[i] = count(text[cuts[i - 1] : cuts[i]])
        return n

    fits = -1  # the longest candidate known to fit
    over = len(cuts)  # the shortest candidate known not to fit
    nothing = -1 if windowed else -2
    at = bisect_right(cuts, aim) - 1
    if at < 0:
        if windowed:
            return -1
        at = 0
    if at == last and last - 1 >= 0 and len(text) in exact:
        at = last - 1
    for _ in range(_MAX_CUT_COUNTS):
        length = cuts[at]
        n = exact.get(length)
        if n is None:
            n = exact[length] = count(text[:length])
        if n <= room:
            fits = at
            if at == last:
                break
            # Walk up while the sentences added keep the estimate inside the room.
            reach, up = n, at
            while up + 1 < over:
                step = segment(up + 1)
                if reach + step > room:
                    break
                reach += step
                up += 1
            if up == last:
                at = up  # the whole text may fit: count it
                continue
            clear = up + 1 == over or reach + segment(up + 1) > room + _SEAM_SLACK
            if up > at:
                if clear and reach - n <= spare:
                    break  # a longer cut gains a few tokens only: not worth another count
                at = up  # count the longest estimated to fit
                continue
            if clear:
                break  # the next candidate is known, or clearly estimated, not to fit
            at = up + 1  # too close to call: count it
            continue
        over = at
        if at == 0 or at <= fits + 1:
            break
        # Walk down until the sentences removed bring the estimate inside the room.
        estimate, down = n, at
        while down - 1 > fits:
            estimate -= segment(down)
            down -= 1
            if estimate <= room:
                break
        if down <= fits or estimate > room + _SEAM_SLACK or estimate < least:
            break  # nothing longer than the best fit can fit; or nothing can reach ``least``
        at = down
    return cuts[fits] if fits >= 0 else nothing


def trim_chunks(
    chunks: Sequence[Chunk | str],
    budget_tokens: int,
    counter: _Counter,
    *,
    dedupe: bool = True,
    near_duplicate_threshold: float = 0.85,
    keep_order: bool = False,
    cut_last: bool = True,
    min_cut_tokens: int = 16,
    separator_tokens: int = 0,
    extra_tokens: Callable[[Chunk], int] | None = None,
) -> TrimResult:
    """Keep the best chunks that fit ``budget_tokens``, dropping duplicates on the way.

    Chunks are ranked by score, best first (stable; chunks with a ``None`` or NaN score come
    after the scored ones, in input order). Walking that ranking, the function drops empty and
    whitespace-only chunks (``"empty"``), exact duplicates of a kept chunk after case folding and
    whitespace collapsing (``"duplicate"``), and near-duplicates of a kept chunk
    (``"near_duplicate"``): chunks whose Jaccard similarity to it is at least
    ``near_duplicate_threshold``, computed over their sets of clauses (the text between
    ``. , ; : ! ?`` and their CJK forms) when both have at least four, else over their word
    3-grams (character 3-grams for scripts written without spaces, such as CJK). Clauses keep
    deduplication far cheaper than tokenising. Every other chunk is kept while it fits: each
    kept chunk costs ``counter.count(text) + extra_tokens(chunk) + separator_tokens``.

    At the first chunk that does not fit, the budget is full. With ``cut_last`` that chunk is
    cut at a sentence end (``.``, ``!``, ``?``, ``。``, ``！``, ``？`` or a newline) to fit the
    tokens left, and kept with ``truncated=True``; when the cut would be shorter than
    ``min_cut_tokens`` or has no sentence end it is dropped instead, and when at least
    ``near_duplicate_threshold`` of the cut's clauses (3-grams) already appear in a kept chunk it
    is dropped as a (near-)duplicate. The cut is found by exact counts of candidate prefixes:
    the first is aimed by the tokens per character seen so far, the sentences next to it are
    counted one by one to move towards the longest that fits; it may stop up to 1/25 of the
    room short of that longest cut (a sentence or two) rather than count most of the chunk
    again. A chunk that the tokens per character seen so far say is too big is never counted
    whole unless the search finds it may fit after all (then it is counted and, if it fits,
    kept whole); its share of ``tokens_in`` is then estimated. Either way the walk stops there:
    every chunk ranked after it is dropped as ``"over_budget"`` without being tokenised, and
    its share of ``tokens_in`` is estimated from the characters per token seen so far. No text
    is counted twice (counts are cached by text for the call).

    Guarantees: the kept tokens (each counted exactly, by ``counter.count``) plus
    ``extra_tokens`` and ``separator_tokens`` per kept chunk never exceed ``budget_tokens``;
    every input chunk appears exactly once in ``kept`` or ``dropped``; kept chunks rank before
    every chunk dropped as ``"over_budget"``; trimming the kept chunks again with the same
    arguments keeps the same texts.

    Args:
        chunks: the candidates, as :class:`Chunk` or plain strings (score ``None``).
        budget_tokens: the most tokens the kept chunks may cost; 0 drops everything.
        counter: counts, encodes and decodes tokens for the target model.
        dedupe: drop exact and near-duplicates of kept chunks.
        near_duplicate_threshold: the Jaccard similarity, in (0, 1], from which a chunk is a
            near-duplicate.
        keep_order: return ``kept`` and ``dropped`` in input order instead of rank order.
        cut_last: cut the first chunk that does not fit instead of dropping it.
        min_cut_tokens: the fewest tokens a cut chunk may keep.
        separator_tokens: tokens added per kept chunk for the separator that joins them.
        extra_tokens: tokens a chunk costs beyond its text (a metadata header the reader sees
            with it), charged to it when kept; called once per chunk the walk reaches (not for
            empty chunks, duplicates, nor chunks after the budget is full).

    Returns:
        The kept and dropped chunks (each with ``index`` set to its input position when it was
        ``-1``) and the token accounting.

    Raises:
        PolicyError: (a ``ValueError``) when ``budget_tokens``, ``min_cut_tokens``,
            ``separator_tokens`` or a value ``extra_tokens`` returns is negative or not an
            integer, or ``near_duplicate_threshold`` is outside (0, 1].
        TypeError: when a chunk is neither a :class:`Chunk` nor a ``str``.

    Example:
        >>> class Chars:  # one token per character; in practice, agentguard's token counter
        ...     def count(self, text): return len(text)
        ...     def encode(self, text): return [ord(c) for c in text]
        ...     def decode(self, tokens): return "".join(map(chr, tokens))
        >>> result = trim_chunks(
        ...     [Chunk("Low. Relevance here.", score=0.1, id="c"),
        ...      Chunk("Best match. Details follow.", score=0.9, id="a"),
        ...      Chunk("BEST  match. Details follow.", score=0.5, id="b")],
        ...     budget_tokens=36, counter=Chars(), min_cut_tokens=4,
        ... )
        >>> [(c.id, c.text, c.truncated) for c in result.kept]
        [('a', 'Best match. Details follow.', False), ('c', 'Low.', True)]
        >>> [(c.id, reason) for c, reason in result.dropped]
        [('b', 'duplicate')]
        >>> result.tokens_kept, result.tokens_in, result.tokens_saved
        (31, 75, 44)
    """
    budget = _check_int("budget_tokens", budget_tokens)
    min_cut = _check_int("min_cut_tokens", min_cut_tokens)
    separator = _check_int("separator_tokens", separator_tokens)
    threshold = near_duplicate_threshold
    if isinstance(threshold, bool) or not isinstance(threshold, int | float):
        raise PolicyError("near_duplicate_threshold", threshold, "must be a number in (0, 1]")
    if not 0.0 < threshold <= 1.0:
        raise PolicyError("near_duplicate_threshold", threshold, "must be in (0, 1]")

    items: list[Chunk] = []
    for position, chunk in enumerate(chunks):
        if isinstance(chunk, str):
            items.append(Chunk(chunk, index=position))
        elif isinstance(chunk, Chunk):
            if chunk.index == -1:  # (dataclasses.replace is ~10x slower than this)
                chunk = Chunk(chunk.text, chunk.score, chunk.id, position, chunk.truncated)
            items.append(chunk)
        else:
            raise TypeError(f"chunks[{position}] must be a Chunk or a str, got {type(chunk)!r}")
    ranks = [_rank_key(chunk, position) for position, chunk in enumerate(items)]
    order = sorted(range(len(items)), key=ranks.__getitem__)

    counts: dict[str, int] = {}

    def count(text: str) -> int:
        n = counts.get(text)
        if n is None:
            n = counts[text] = counter.count(text)
        return n

    kept: list[tuple[int, Chunk, int]] = []  # (input position, chunk, tokens)
    dropped: list[tuple[int, Chunk, DropReason]] = []
    kept_signatures: list[_Signature] = []
    kept_by_key: dict[tuple[str, ...], list[_Signature]] = {}  # by clause key
    tokens_in = 0
    seen_tokens = seen_chars = 0  # over the chunks tokenised, for the chars-per-token estimate
    unseen: list[str] = []  # texts dropped over budget without being tokenised
    estimated = False
    remaining = budget
    full = remaining - separator < 1

    def duplicate_of(
        signature: _Signature, *, contained: bool = False
    ) -> tuple[DropReason, _Signature] | None:
        for twin in kept_by_key.get(signature.clause_key, ()):
            if twin.key == signature.key:
                return "duplicate", twin
        for other in kept_signatures:
            if signature.near(other, threshold, contained=contained):
                return "near_duplicate", other
        return None

    for position in order:
        chunk = items[position]
        text = chunk.text
        if not text or text.isspace():
            tokens_in += count(text) if text else 0
            dropped.append((position, chunk, "empty"))
            continue
        if full:
            unseen.append(text)
            dropped.append((position, chunk, "over_budget"))
            continue
        signature = None
        if dedupe:
            signature = _Signature(text)
            match = duplicate_of(signature)
            if match is not None:
                reason, twin = match
                known = counts.get(text)
                if known is None:
                    estimated = True
                    known = max(1, round(len(text) * twin.tokens_per_char))
                tokens_in += known
                dropped.append((position, chunk, reason))
                continue
        room = remaining - separator
        if extra_tokens is not None:
            extra = extra_tokens(chunk)
            if type(extra) is not int or extra < 0:
                _check_int(f"extra_tokens(chunks[{position}])", extra)
            room -= extra
        else:
            extra = 0
        least = max(min_cut, 1)
        can_cut = cut_last and room >= least
        n = counts.get(text)
        fitted: tuple[str | None, int | None, int, bool] | None = None
        if n is None and can_cut and seen_chars and len(text) * seen_tokens > room * seen_chars:
            # Probably too big, by the tokens per character seen so far: look for the cut
            # first, and count the whole text only if the search gets that far.
            fitted = _fit(text, room, seen_tokens / seen_chars, count, least, None)
            if fitted[0] == text:
                n = fitted[2]
        if n is not None or fitted is None:
            if n is None:
                n = count(text)
            tokens_in += n
            seen_tokens += n
            seen_chars += len(text)
            if n <= room:
                kept.append((position, chunk, n))
                remaining -= n + separator + extra
                full = remaining - separator < 1
                if signature is not None:
                    signature.tokens_per_char = n / len(text)
                    kept_signatures.append(signature)
                    kept_by_key.setdefault(signature.clause_key, []).append(signature)
                continue
            if can_cut:
                fitted = _fit(text, room, n / len(text), count, least, n)
        else:
            tokens_in += fitted[2]
            estimated = estimated or not fitted[3]
        # The first chunk that does not fit: cut it or drop it, and stop.
        full = True
        if fitted is None or fitted[0] is None or fitted[1] is None:
            dropped.append((position, chunk, "over_budget"))
            continue
        cut_text, cut_tokens = fitted[0], fitted[1]
        if signature is not None:  # (dedupe is on)
            match = duplicate_of(signature.prefix(text, len(cut_text)), contained=True)
            if match is not None:
                dropped.append((position, chunk, match[0]))
                continue
        kept.append((position, replace(chunk, text=cut_text, truncated=True), cut_tokens))
        remaining -= cut_tokens + separator + extra

    if unseen:
        estimated = True
        for text in unseen:
            if seen_chars:
                tokens_in += max(1, round(len(text) * seen_tokens / seen_chars))
            else:
                tokens_in += _heuristic_tokens(text)

    if keep_order:
        kept.sort(key=lambda entry: entry[0])
        dropped.sort(key=lambda entry: entry[0])
    return TrimResult(
        kept=[chunk for _, chunk, _ in kept],
        dropped=[(chunk, reason) for _, chunk, reason in dropped],
        budget_tokens=budget,
        tokens_in=tokens_in,
        tokens_kept=sum(n for _, _, n in kept),
        tokens_in_estimated=estimated,
    )
