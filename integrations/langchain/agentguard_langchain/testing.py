"""A scripted LangChain chat model that behaves like a provider, offline.

``ScriptedChatModel`` is a real :class:`~langchain_core.language_models.BaseChatModel`:

* it reports ``usage_metadata`` consistent with what it was sent — input tokens counted with
  the model's tokenizer (agentguard's, the one the guard estimates with), tool schemas
  included; cache reads as a configurable share of the input;
* it honours ``max_tokens`` (a bound cap cuts the answer, ``finish_reason="length"``) and
  ``tool_choice`` (``"none"`` forces text, a tool name or ``"any"``/``"required"`` forces a
  call);
* with tools bound it can call them forever — the runaway agent loop — or follow a script;
* it streams, with the usage on the last chunk (or not at all, ``report_usage=False``);
* it can take real time to answer (``latency``), so concurrency tests have calls in flight.

Example:
    >>> from agentguard_langchain.testing import ScriptedChatModel
    >>> m = ScriptedChatModel(model_name="gpt-4o-mini", replies=["Hi there."])
    >>> msg = m.invoke("hello")
    >>> msg.content, msg.usage_metadata["output_tokens"]
    ('Hi there.', 3)
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict, Field, PrivateAttr

from agentguard import counter_for

__all__ = ["ScriptedChatModel", "count_input_tokens"]

_INSTANCES = itertools.count(1)

_DEFAULT_REPLY = (
    "I looked at the order history, the carrier's tracking events and the refund policy. "
    "The parcel left the warehouse late; a refund of the shipping fee is due. "
)


def _as_dict(m: BaseMessage) -> dict[str, Any]:
    d: dict[str, Any] = {"role": m.type, "content": m.content}
    tool_calls = getattr(m, "tool_calls", None)
    if tool_calls:
        d["tool_calls"] = [
            {"function": {"name": tc["name"], "arguments": json.dumps(tc["args"])}}
            for tc in tool_calls
        ]
    name = getattr(m, "name", None)
    if name:
        d["name"] = name
    return d


def count_input_tokens(
    model_name: str, messages: Sequence[BaseMessage], tools: Sequence[Any] | None = None
) -> int:
    """What a provider would bill as input for ``messages`` and ``tools`` (agentguard's count
    without the reservation margin)."""
    return counter_for(model_name).count_messages([_as_dict(m) for m in messages], tools)


class ScriptedChatModel(BaseChatModel):
    """A provider-like chat model driven by a script (see the module docstring).

    Args:
        model_name: the model id it reports (``ls_model_name``, ``response_metadata``).
        replies: texts to answer with, cycled; default: a long planning paragraph repeated
            ``reply_tokens`` long.
        reply_tokens: length of the default reply, in tokens, before any ``max_tokens`` cut.
        tool_calls: ``"always"`` — with tools bound, every answer calls the first tool (the
            runaway loop); ``"never"``; or an int N — call tools for the first N answers.
        parallel_tool_calls: how many tool calls one answer makes.
        tool_args: the arguments of each tool call, or a function of the called tool's schema
            (OpenAI format) and the messages that returns them (a scripted "reading" of the
            prompt, for suites that check the arguments).
        cached_fraction: share of input tokens reported as cache reads.
        latency: seconds each call takes.
        report_usage: ``False`` omits ``usage_metadata`` (as some streams do).
        max_tokens: a default output cap, like a provider's constructor argument.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    model_name: str = "gpt-4o-mini"
    replies: list[str] | None = None
    reply_tokens: int = 300
    tool_calls: str | int = "always"
    parallel_tool_calls: int = 1
    tool_args: dict[str, Any] | Callable[[dict[str, Any], list[BaseMessage]], dict[str, Any]] = (
        Field(default_factory=lambda: {"query": "order 1182"})
    )
    cached_fraction: float = 0.0
    latency: float = 0.0
    report_usage: bool = True
    max_tokens: int | None = None

    _calls: int = PrivateAttr(default=0)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _reply_iter: Any = PrivateAttr(default=None)
    # ids unique across instances (a downgraded agent talks to several models) and of a fixed
    # shape, so a tool call's token count (and so every reservation) is deterministic
    _uid: str = PrivateAttr(default_factory=lambda: f"{next(_INSTANCES) % 1_000_000:06d}")
    seen: list[dict[str, Any]] = Field(default_factory=list, exclude=True)

    @property
    def _llm_type(self) -> str:
        return "agentguard-scripted"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "scripted"
        params["ls_model_name"] = kwargs.get("model", self.model_name)
        cap = kwargs.get("max_tokens", self.max_tokens)
        if cap is not None:
            params["ls_max_tokens"] = cap
        return params

    @property
    def calls(self) -> int:
        """How many answers the model has given."""
        return self._calls

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        formatted = [convert_to_openai_tool(t) for t in tools]
        if tool_choice is not None:
            kwargs["tool_choice"] = tool_choice
        return self.bind(tools=formatted, **kwargs)

    # -- the script ----------------------------------------------------------------------------

    def _next_reply(self) -> str:
        if self.replies is None:
            return _DEFAULT_REPLY * (self.reply_tokens // 30 + 1)
        with self._lock:
            if self._reply_iter is None:
                self._reply_iter = itertools.cycle(self.replies)
            return str(next(self._reply_iter))

    def _wants_tool(self, tools: Sequence[Any] | None, tool_choice: Any, n: int) -> bool:
        if not tools or tool_choice == "none":
            return False
        if tool_choice in ("any", "required") or isinstance(tool_choice, dict):
            return True
        if isinstance(tool_choice, str) and tool_choice not in ("auto",):
            return True
        if self.tool_calls == "always":
            return True
        if self.tool_calls == "never":
            return False
        return n < int(self.tool_calls)

    def _args(self, tool: dict[str, Any], messages: list[BaseMessage]) -> dict[str, Any]:
        if callable(self.tool_args):
            return dict(self.tool_args(tool, messages))
        return dict(self.tool_args)

    def _answer(self, messages: list[BaseMessage], kwargs: dict[str, Any]) -> AIMessage:
        tools = kwargs.get("tools")
        tool_choice = kwargs.get("tool_choice")
        cap = kwargs.get("max_tokens", kwargs.get("max_completion_tokens", self.max_tokens))
        model = str(kwargs.get("model", self.model_name))
        with self._lock:
            n = self._calls
            self._calls += 1
        self.seen.append(
            {
                "model": model,
                "max_tokens": cap,
                "tools": len(tools or ()),
                "tool_choice": tool_choice,
            }
        )
        counter = counter_for(model)
        sent = count_input_tokens(model, messages, tools)
        finish = "stop"
        tool_calls: list[dict[str, Any]] = []
        content = ""
        if self._wants_tool(tools, tool_choice, n):
            by_name = {t["function"]["name"]: t for t in tools or ()}
            names = [t["function"]["name"] for t in tools or ()]
            if isinstance(tool_choice, str) and tool_choice in names:
                names = [tool_choice]
            tool_calls = [
                {
                    "name": names[i % len(names)],
                    "args": self._args(by_name[names[i % len(names)]], messages),
                    "id": f"call_{self._uid}_{n}_{i}",
                    "type": "tool_call",
                }
                for i in range(self.parallel_tool_calls)
            ]
            out = sum(counter.count(tc["name"] + json.dumps(tc["args"])) + 3 for tc in tool_calls)
            finish = "tool_calls"
            if cap is not None and out > cap:  # a provider cuts the call off
                tool_calls, out, finish = [], cap, "length"
        else:
            text = self._next_reply()
            ids = counter.encode(text)
            if cap is not None and len(ids) > cap:
                ids = ids[:cap]
                text = counter.decode(ids)
                finish = "length"
            content, out = text, len(ids)
        usage = UsageMetadata(
            input_tokens=sent,
            output_tokens=out,
            total_tokens=sent + out,
            input_token_details={"cache_read": int(sent * self.cached_fraction)},
        )
        return AIMessage(
            content=content,
            tool_calls=tool_calls,
            usage_metadata=usage if self.report_usage else None,
            response_metadata={"model_name": model, "finish_reason": finish},
            id=f"scripted-{self._uid}-{n}",
        )

    # -- BaseChatModel -------------------------------------------------------------------------

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.latency:
            time.sleep(self.latency)
        msg = self._answer(messages, kwargs)
        return ChatResult(generations=[ChatGeneration(message=msg)])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.latency:
            await asyncio.sleep(self.latency)
        msg = self._answer(messages, kwargs)
        return ChatResult(generations=[ChatGeneration(message=msg)])

    def _chunks(self, msg: AIMessage) -> Iterator[ChatGenerationChunk]:
        text = str(msg.content)
        pieces = [text[i : i + 12] for i in range(0, len(text), 12)] or [""]
        for piece in pieces:
            yield ChatGenerationChunk(message=AIMessageChunk(content=piece, id=msg.id))
        last = AIMessageChunk(
            content="",
            id=msg.id,
            tool_call_chunks=[
                {"name": tc["name"], "args": json.dumps(tc["args"]), "id": tc["id"], "index": i}
                for i, tc in enumerate(msg.tool_calls)
            ],
            usage_metadata=msg.usage_metadata,
            response_metadata=msg.response_metadata,
            chunk_position="last",
        )
        yield ChatGenerationChunk(message=last)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        if self.latency:
            time.sleep(self.latency)
        for chunk in self._chunks(self._answer(messages, kwargs)):
            if run_manager is not None:
                run_manager.on_llm_new_token(str(chunk.message.content), chunk=chunk)
            yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        if self.latency:
            await asyncio.sleep(self.latency)
        for chunk in self._chunks(self._answer(messages, kwargs)):
            if run_manager is not None:
                await run_manager.on_llm_new_token(str(chunk.message.content), chunk=chunk)
            yield chunk
