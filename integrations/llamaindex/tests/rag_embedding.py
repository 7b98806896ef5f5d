"""A deterministic local embedding for tests: hashed word unigrams and bigrams.

``HashingEmbedding`` maps a text to a fixed-size vector without a model: it lower-cases the text,
drops a few dozen stop words, cuts each word to its first five letters (a crude stemmer:
"roasting" and "roasted" share "roast"), takes those stems and their bigrams, hashes every feature
with BLAKE2b (stable across processes and machines, unlike Python's salted ``hash()``) into one
of ``dim`` buckets with a sign taken from the same digest, adds ``1 + log(count)`` per feature,
and L2-normalises the result. Texts sharing words and phrases get a high cosine similarity,
unrelated texts a low one: lexical retrieval, good enough to rank a small corpus, fast, with
nothing to download.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from collections import Counter

from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.bridge.pydantic import Field

_WORD = re.compile(r"[a-z0-9]+")
#: Letters kept of each word.
_STEM = 5
#: Frequent words carry no topic: left out so that unrelated texts score near zero.
_STOP = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "by",
        "for",
        "from",
        "has",
        "have",
        "in",
        "into",
        "is",
        "it",
        "its",
        "of",
        "on",
        "or",
        "that",
        "the",
        "their",
        "then",
        "there",
        "these",
        "they",
        "this",
        "to",
        "was",
        "were",
        "which",
        "with",
        "without",
    ]
)


def features(text: str) -> Counter[str]:
    """Return the feature counts of ``text``: word stems and stem bigrams.

    Example:
        >>> sorted(features("The roasted beans, roasting."))
        ['b:beans roast', 'b:roast beans', 'w:beans', 'w:roast']
    """
    stems = [w[:_STEM] for w in _WORD.findall(text.lower()) if w not in _STOP]
    counts: Counter[str] = Counter(f"w:{w}" for w in stems)
    counts.update(f"b:{a} {b}" for a, b in itertools.pairwise(stems))
    return counts


class HashingEmbedding(BaseEmbedding):
    """Hashed n-gram features in ``dim`` dimensions, L2-normalised (see the module docstring).

    Example:
        >>> e = HashingEmbedding()
        >>> v = e.get_text_embedding("Roasting coffee beans")
        >>> len(v), round(sum(x * x for x in v), 6)
        (1024, 1.0)
        >>> v == HashingEmbedding().get_text_embedding("Roasting coffee beans")
        True
    """

    dim: int = Field(default=1024, gt=0)
    model_name: str = "hashing-ngrams-1024"

    @classmethod
    def class_name(cls) -> str:
        return "HashingEmbedding"

    def embed(self, text: str) -> list[float]:
        vector = [0.0] * self.dim
        for feature, count in features(text).items():
            digest = hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest()
            value = int.from_bytes(digest, "little")
            sign = 1.0 if value & 1 else -1.0
            vector[(value >> 1) % self.dim] += sign * (1.0 + math.log(count))
        norm = math.sqrt(sum(x * x for x in vector))
        return [x / norm for x in vector] if norm else vector

    def _get_query_embedding(self, query: str) -> list[float]:
        return self.embed(query)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self.embed(query)

    def _get_text_embedding(self, text: str) -> list[float]:
        return self.embed(text)
