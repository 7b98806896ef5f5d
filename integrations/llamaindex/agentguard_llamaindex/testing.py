"""Test helpers: a provider-like scripted LLM and a deterministic local embedding for LlamaIndex.

:class:`ScriptedLLM` is a real ``FunctionCallingLLM`` (it emits LlamaIndex's LLM events and
spans like any provider LLM) that answers from a script, and behaves like a provider where it
matters to a budget:

* it reports OpenAI-shaped ``usage`` in ``raw`` — prompt tokens counted from what it was sent
  (messages and tool schemas, with agentguard's tokenizer for its model), completion tokens =
  words written — on every answer, and on the last chunk of a stream;
* it honours ``max_tokens`` (the answer is cut, like ``finish_reason="length"``);
* with tools (and ``tool_choice`` not ``"none"``) it calls a tool for the first
  ``tool_rounds`` answers — ``-1``: forever, the runaway agent a cap must end;
* in ReAct mode (``react=True``) it writes ``Thought / Action / Action Input`` text for the
  first ``tool_rounds`` answers instead; a message containing ``stop_when`` makes it answer.

Example:
    >>> llm = ScriptedLLM(replies=["It is sunny today."])
    >>> r = llm.complete("Weather?", max_tokens=2)
    >>> r.text, r.raw["usage"]["completion_tokens"], llm.seen[-1]["max_tokens"]
    ('It is', 2, 2)

:class:`HashingEmbedding` is a deterministic local embedding for indexes in tests and demos.
It maps a text to a fixed-size vector without a model: it lower-cases the text, drops a few
dozen stop words, cuts each word to its first five letters (a crude stemmer: "roasting" and
"roasted" share "roast"), takes those stems and their bigrams, hashes every feature with BLAKE2b
(stable across processes and machines, unlike Python's salted ``hash()``) into one of ``dim``
buckets with a sign taken from the same digest, adds ``1 + log(count)`` per feature, and
L2-normalises the result. Texts sharing words and phrases get a high cosine similarity,
unrelated texts a low one: lexical retrieval, good enough to rank a small corpus, fast, with
nothing to download.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import math
import re
import threading
import time
from collections import Counter
from collections.abc import AsyncGenerator, Generator, Sequence
from typing import TYPE_CHECKING, Any, Literal

from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
    ToolCallBlock,
)
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection
from pydantic import Field, PrivateAttr

from agentguard import counter_for

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

__all__ = ["HashingEmbedding", "ScriptedLLM"]

_IDS = itertools.count(1)
_WORDS = re.compile(r"\S+\s*")


class ScriptedLLM(FunctionCallingLLM):
    """A scripted, provider-like function-calling LLM (see the module docstring).

    Args:
        model: the model id it reports (and is priced as).
        replies: text answers, used in turn; the last one repeats.
        tool_rounds: how many answers call a tool when tools are offered (``-1``: forever).
        tool_name: the tool to call (default: the first one offered).
        tool_args: the arguments of each tool call.
        react: write ReAct ``Action`` text instead of structured tool calls.
        stop_when: a text that, found in the last message, makes it answer instead.
        delay: seconds each call takes (to keep concurrent calls in flight together; async
            calls sleep on the event loop).
        usage_shape: how usage is reported: ``"openai"`` (``prompt_tokens``...),
            ``"anthropic"`` (``input_tokens``...) or ``"bedrock"`` (``inputTokens``...).
        max_tokens: a constructor output cap.

    Attributes:
        seen: per call, ``{"messages": n, "tools": [names], "max_tokens": cap,
            "tool_choice": ..., "model": ...}``.
    """

    model: str = "gpt-4o-mini"
    replies: list[str] = Field(default_factory=lambda: ["Done."])
    tool_rounds: int = 0
    tool_name: str | None = None
    tool_args: dict[str, Any] = Field(default_factory=dict)
    react: bool = False
    stop_when: str | None = None
    delay: float = 0.0
    usage_shape: Literal["openai", "anthropic", "bedrock"] = "openai"
    max_tokens: int | None = None

    _seen: list[dict[str, Any]] = PrivateAttr(default_factory=list)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _answers: int = PrivateAttr(default=0)
    _tool_answers: int = PrivateAttr(default=0)

    @classmethod
    def class_name(cls) -> str:
        return "ScriptedLLM"

    @property
    def seen(self) -> list[dict[str, Any]]:
        return self._seen

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            model_name=self.model,
            is_chat_model=True,
            is_function_calling_model=True,
            num_output=self.max_tokens or -1,
        )

    # -- the script -------------------------------------------------------------------------

    def _shape(self, prompt: int, completion: int) -> dict[str, int]:
        if self.usage_shape == "anthropic":
            return {
                "input_tokens": prompt,
                "output_tokens": completion,
                "cache_read_input_tokens": 0,
                "cache_creation_input_tokens": 0,
            }
        if self.usage_shape == "bedrock":
            return {
                "inputTokens": prompt,
                "outputTokens": completion,
                "totalTokens": prompt + completion,
            }
        return {"prompt_tokens": prompt, "completion_tokens": completion}

    def _answer(
        self, messages: Sequence[ChatMessage], kwargs: dict[str, Any], *, sleep: bool = True
    ) -> tuple[ChatMessage, dict[str, int]]:
        tools: list[dict[str, Any]] = kwargs.get("tools") or []
        choice = kwargs.get("tool_choice")
        cap = kwargs.get("max_tokens", self.max_tokens)
        if isinstance(self.max_tokens, int) and isinstance(cap, int):
            cap = min(cap, self.max_tokens)
        with self._lock:
            self._seen.append(
                {
                    "messages": len(messages),
                    "tools": [t["function"]["name"] for t in tools],
                    "max_tokens": cap,
                    "tool_choice": choice,
                    "model": kwargs.get("model", self.model),
                }
            )
            last = messages[-1].content or "" if messages else ""
            stop = self.stop_when is not None and self.stop_when in last
            rounds_left = self.tool_rounds < 0 or self._tool_answers < self.tool_rounds
            use_tool = not stop and rounds_left and choice != "none"
            structured = use_tool and bool(tools) and not self.react
            react = use_tool and self.react
            if structured or react:
                self._tool_answers += 1
            reply = self.replies[min(self._answers, len(self.replies) - 1)]
            if not (structured or react):
                self._answers += 1
        if self.delay and sleep:
            time.sleep(self.delay)
        prompt = counter_for(self.model).count_messages(messages, tools or None)
        name = self.tool_name or (tools[0]["function"]["name"] if tools else "search")
        args = json.dumps(self.tool_args)
        if structured:
            call_id = f"call_{next(_IDS):06d}"
            message = ChatMessage(
                role=MessageRole.ASSISTANT,
                blocks=[ToolCallBlock(tool_call_id=call_id, tool_name=name, tool_kwargs=args)],
            )
            return message, self._shape(prompt, 3 + len(args.split()))
        if react:
            reply = f"Thought: I need to use a tool.\nAction: {name}\nAction Input: {args}"
        words = _WORDS.findall(reply)  # a word and the whitespace after it: one token
        if isinstance(cap, int) and len(words) > cap:
            words = words[:cap]
        text = "".join(words).rstrip()
        return ChatMessage(role=MessageRole.ASSISTANT, content=text), self._shape(
            prompt, len(words)
        )

    def _response(
        self, messages: Sequence[ChatMessage], kwargs: dict[str, Any], *, sleep: bool = True
    ) -> ChatResponse:
        message, usage = self._answer(messages, kwargs, sleep=sleep)
        return ChatResponse(
            message=message,
            raw={"model": kwargs.get("model", self.model), "usage": usage},
        )

    def _chunks(
        self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]
    ) -> list[ChatResponse]:
        message, usage = self._answer(messages, kwargs)
        if message.content is None or not message.content:
            return [ChatResponse(message=message, raw={"usage": usage})]
        out: list[ChatResponse] = []
        text = ""
        words = _WORDS.findall(message.content)
        for i, delta in enumerate(words):
            text += delta
            last = i == len(words) - 1
            out.append(
                ChatResponse(
                    message=ChatMessage(role=MessageRole.ASSISTANT, content=text),
                    delta=delta,
                    raw={"usage": usage} if last else {},
                )
            )
        return out

    # -- chat -------------------------------------------------------------------------------

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._response(messages, kwargs)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        if self.delay:
            await asyncio.sleep(self.delay)
        return self._response(messages, kwargs, sleep=False)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        chunks = self._chunks(messages, kwargs)

        def gen() -> Generator[ChatResponse, None, None]:
            yield from chunks

        return gen()

    @llm_chat_callback()
    async def astream_chat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> ChatResponseAsyncGen:
        chunks = self._chunks(messages, kwargs)

        async def gen() -> AsyncGenerator[ChatResponse, None]:
            for c in chunks:
                yield c

        return gen()

    # -- completion ---------------------------------------------------------------------------

    def _completion(self, prompt: str, kwargs: dict[str, Any]) -> CompletionResponse:
        r = self._response([ChatMessage(role=MessageRole.USER, content=prompt)], kwargs)
        return CompletionResponse(text=r.message.content or "", raw=r.raw)

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return self._completion(prompt, kwargs)

    @llm_completion_callback()
    async def acomplete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponse:
        return self._completion(prompt, kwargs)

    def _completion_chunks(self, prompt: str, kwargs: dict[str, Any]) -> list[CompletionResponse]:
        chunks = self._chunks([ChatMessage(role=MessageRole.USER, content=prompt)], kwargs)
        return [
            CompletionResponse(text=c.message.content or "", delta=c.delta, raw=c.raw)
            for c in chunks
        ]

    @llm_completion_callback()
    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        chunks = self._completion_chunks(prompt, kwargs)

        def gen() -> Generator[CompletionResponse, None, None]:
            yield from chunks

        return gen()

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        chunks = self._completion_chunks(prompt, kwargs)

        async def gen() -> AsyncGenerator[CompletionResponse, None]:
            for c in chunks:
                yield c

        return gen()

    # -- tools --------------------------------------------------------------------------------

    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        messages = list(chat_history or [])
        if user_msg:
            messages.append(
                ChatMessage(role=MessageRole.USER, content=user_msg)
                if isinstance(user_msg, str)
                else user_msg
            )
        return {
            "messages": messages,
            "tools": [t.metadata.to_openai_tool() for t in tools],
            "tool_choice": kwargs.pop("tool_choice", "required" if tool_required else "auto"),
            **kwargs,
        }

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        calls = [b for b in response.message.blocks if isinstance(b, ToolCallBlock)]
        if not calls and error_on_no_tool_call:
            raise ValueError("the answer has no tool call")
        return [
            ToolSelection(
                tool_id=c.tool_call_id or "",
                tool_name=c.tool_name,
                tool_kwargs=json.loads(c.tool_kwargs)
                if isinstance(c.tool_kwargs, str)
                else dict(c.tool_kwargs),
            )
            for c in calls
        ]


# -- a deterministic local embedding -----------------------------------------------------------

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
