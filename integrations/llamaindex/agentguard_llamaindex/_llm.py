"""A budget-aware LLM: the guard's decisions applied where exceptions reach the caller.

:class:`BudgetedLLM` is a ``FunctionCallingLLM`` delegating to the user's LLM (and, optionally,
to the LLMs of a downgrade ladder). Each call goes through the guard's event API:

1. find the task — the current one (``with guard.task(...)``), else the one the
   instrumentation attributes the run to, else one opened for this call alone;
2. raise a stop kept from a place LlamaIndex swallows exceptions (a handler, a tool);
3. ``task.start_model_call(...)`` with the messages, the tools and the caller's output cap:
   the guard decides and reserves, and answers with the model and the cap to bind — or
   ``finish`` (one last call without tools, with a note asking for the answer now), or raises
   :class:`~agentguard.BudgetExceeded`;
4. call the chosen LLM inside :func:`metered_here` (the instrumentation skips it), then commit
   the usage it reported (a stream's last usage, or an estimate from the text, labelled) or
   release the reservation if it failed.

The wrapper's own methods carry no ``llm_chat_callback``: the delegate emits the LLM events
once. No budget arithmetic happens here.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import AsyncGenerator, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
)
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import LLM, ToolSelection
from pydantic import ConfigDict, Field, PrivateAttr, model_validator

from agentguard import Guard, ModelCall, Task, current_task
from agentguard.adapter import NO_KW, Steps, adrive, drive
from agentguard_llamaindex._common import (
    metered_here,
    model_of_llm,
    output_text,
    parsed_or_raw,
    pop_deferred_stop,
    usage_of,
)

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

__all__ = ["DEFAULT_FINISH_PROMPT", "FINAL_KEY", "MODEL_KEY", "BudgetedLLM", "expect_final_call"]

#: The note appended to the graceful final call's messages (``{reason}`` is filled in).
DEFAULT_FINISH_PROMPT = (
    "The budget for this task is used up ({reason}). Do not call any tool. Answer the user's "
    "request now, as well as you can, from the information you already have."
)
#: ``ChatResponse.additional_kwargs`` key set to ``True`` on the graceful final answer.
FINAL_KEY = "agentguard_final"
#: ``ChatResponse.additional_kwargs`` key naming the model that answered.
MODEL_KEY = "agentguard_model"

# The chat kwarg carrying the tools as given to ``_prepare_chat_with_tools``, so a rung served
# by another LLM class formats them its own way, and a final call drops them. Never reaches a
# provider.
_RAW_TOOLS = "_agentguard_tools"

_FINAL_PENDING: weakref.WeakSet[Task] = weakref.WeakSet()
_FINAL_LOCK = threading.Lock()


def expect_final_call(task: Task) -> None:
    """Mark ``task``'s next call through a budget-aware LLM as its graceful final call (a step
    decided ``finish``)."""
    with _FINAL_LOCK:
        _FINAL_PENDING.add(task)


def _take_final(task: Task) -> bool:
    with _FINAL_LOCK:
        if task in _FINAL_PENDING:
            _FINAL_PENDING.discard(task)
            return True
    return False


@dataclass(frozen=True, slots=True)
class _Tools:
    """Tools as given to ``_prepare_chat_with_tools``, and the kwargs the default LLM made."""

    tools: tuple[Any, ...]
    options: Mapping[str, Any]
    keys: frozenset[str]


@dataclass(slots=True)
class _Plan:
    task: Task
    owned: bool
    call: ModelCall
    llm: LLM
    kwargs: dict[str, Any]
    final: bool


class _Tally:
    __slots__ = ("last", "usage")

    def __init__(self) -> None:
        self.usage: Any = None
        self.last: Any = None

    def add(self, response: Any) -> None:
        self.last = response
        u = usage_of(response)
        if u:
            self.usage = u


class BudgetedLLM(FunctionCallingLLM):
    """An LLM that keeps every call inside the current task's budget.

    Use it wherever LlamaIndex takes an LLM — a query engine, a chat engine,
    ``FunctionAgent`` / ``ReActAgent`` / ``AgentWorkflow`` — wrapping the LLM you would have
    used. Each call is decided and reserved by the guard before it is made, runs on the model
    the guard picked with the output cap it allows, and is charged with the usage the provider
    reported (streams included; a stream without usage is charged an estimate, labelled).

    * **Task**: the current task (``with guard.task(...)``); else, with :func:`instrument`
      attached, the task of the run's root span; else a task opened for the call alone.
    * **Ladder**: a cheaper rung is called on ``llms[rung]``; a rung without an entry is called
      on ``llm`` with a per-call ``model=`` kwarg (which OpenAI-style LLMs honour). A rung's
      LLM must be able to call tools when the request has tools.
    * **Output cap**: bound as the ``max_tokens_param`` kwarg (``max_tokens``); when the
      delegate has a larger constructor ``max_tokens`` (which would override the kwarg), a
      copy of it with the smaller cap is called instead. The caller's own caps are respected.
    * **Finish** (``on_limit="finish"``): one last call without tools on the model and cap the
      guard reserved, with ``finish_prompt`` appended; the answer's
      ``additional_kwargs["agentguard_final"]`` is ``True``. An agent sees an answer without
      tool calls and ends its run.
    * **Stop**: :class:`~agentguard.BudgetExceeded` propagates to the caller (out of
      ``query``, ``chat``, ``await agent.run(...)``).

    Args:
        guard: the guard whose tasks are charged.
        llm: the LLM to call (its model id is what a call asks for).
        llms: LLMs for ladder rungs, by model id.
        max_tokens: an output cap for every call, below whatever the guard allows.
        max_tokens_param: the kwarg the delegates take their output cap under.
        finish_prompt: the note appended to the final call (``None``: none).
        task_id: id of the task opened for a call made outside any task.
        task_tags: attribution tags of such a task.

    Example:
        >>> import agentguard as ag
        >>> from agentguard_llamaindex import BudgetedLLM
        >>> from agentguard_llamaindex.testing import ScriptedLLM
        >>> guard = ag.Guard(ag.Policy(max_cost_usd="0.01", max_output_tokens=50), traces=False)
        >>> llm = BudgetedLLM(guard=guard, llm=ScriptedLLM(model="gpt-4o", replies=["Done."]))
        >>> with guard.task("ticket-7") as task:
        ...     answer = llm.complete("Summarise the ticket.")
        >>> answer.text, task.model_calls, llm.llm.seen[-1]["max_tokens"]
        ('Done.', 1, 50)
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    guard: Guard = Field(exclude=True)
    llm: LLM = Field(exclude=True)
    llms: dict[str, LLM] = Field(default_factory=dict, exclude=True)
    max_tokens: int | None = Field(default=None, gt=0)
    max_tokens_param: str = "max_tokens"
    finish_prompt: str | None = DEFAULT_FINISH_PROMPT
    task_id: str | None = None
    task_tags: dict[str, str] = Field(default_factory=dict)

    _default_id: str = PrivateAttr(default="")

    @model_validator(mode="after")
    def _read_default_id(self) -> BudgetedLLM:
        for reserved in ("policy", "parent"):
            if reserved in self.task_tags:
                raise ValueError(f"task_tags[{reserved!r}]: {reserved!r} cannot be a tag name")
        self._default_id = model_of_llm(self.llm)
        return self

    @classmethod
    def class_name(cls) -> str:
        return "BudgetedLLM"

    @property
    def model_name(self) -> str:
        """The id of the default model."""
        return self._default_id

    @property
    def metadata(self) -> LLMMetadata:
        """The delegate's metadata (context window, function calling...)."""
        return self.llm.metadata

    # -- planning a call ------------------------------------------------------------------------

    def _resolve(self, model_id: str) -> tuple[LLM, dict[str, Any]]:
        chosen = self.llms.get(model_id)
        if chosen is not None:
            return chosen, {}
        if model_id == self._default_id:
            return self.llm, {}
        return self.llm, {"model": model_id}

    def _caller_cap(self, llm: LLM, kwargs: Mapping[str, Any]) -> int | None:
        caps = [
            self.max_tokens,
            kwargs.get(self.max_tokens_param),
            getattr(llm, "max_tokens", None),
        ]
        ints = [c for c in caps if isinstance(c, int) and not isinstance(c, bool) and c > 0]
        return min(ints) if ints else None

    def _found_task(self) -> Task | None:
        """The current task, else the instrumentation's task of the run (``None``: the call
        opens and closes its own)."""
        task = current_task()
        if task is not None and task.guard is self.guard:
            return task
        from agentguard_llamaindex._handler import task_for_active_span

        return task_for_active_span(self.guard)

    def _begin(self, messages: Sequence[Any], kwargs: Mapping[str, Any]) -> Steps[_Plan]:
        """Decide and reserve the call (one body for the sync and the async methods)."""
        kw = dict(kwargs)
        spec: _Tools | None = kw.pop(_RAW_TOOLS, None)
        asked = kw.pop("model", None)
        requested = asked if isinstance(asked, str) else self._default_id
        task = self._found_task()
        owned = task is None
        if task is None:
            task = yield (self.guard, "open_task", (self.task_id,), self.task_tags)
        try:
            pending = pop_deferred_stop(task)
            if pending is not None:
                raise pending
            first, _ = self._resolve(requested)
            cap = self._caller_cap(first, kw)
            tools = kw.get("tools")
            final = _take_final(task)
            ask = {"messages": messages, "tools": tools, "max_tokens": cap, "finish": final}
            call = yield (task, "start_model_call", (requested,), ask)
            if call.decision.action == "finish":
                final = True
                ask = {"messages": messages, "max_tokens": call.max_tokens, "finish": True}
                call = yield (task, "start_model_call", (call.model,), ask)
        except BaseException as exc:
            if owned:
                yield (task, "close", (exc,), NO_KW)
            raise
        llm, select = self._resolve(call.model)
        plan = _Plan(task, owned, call, llm, kw, final)
        try:
            plan.kwargs = self._kwargs_for(plan, spec, messages, select)
        except BaseException as exc:
            yield from self._abort(plan, exc)
            raise
        return plan

    def _kwargs_for(
        self,
        plan: _Plan,
        spec: _Tools | None,
        messages: Sequence[ChatMessage],
        select: Mapping[str, Any],
    ) -> dict[str, Any]:
        kw = dict(plan.kwargs)
        if spec is not None and (plan.final or plan.llm is not self.llm):
            for key in spec.keys:
                kw.pop(key, None)
            if not plan.final:
                if not isinstance(plan.llm, FunctionCallingLLM):
                    raise TypeError(
                        f"llms[{plan.call.model!r}] is a {type(plan.llm).__name__}, not a "
                        "FunctionCallingLLM: it cannot serve a request with tools"
                    )
                made = plan.llm._prepare_chat_with_tools_compat(
                    list(spec.tools), chat_history=list(messages), **spec.options
                )
                made.pop("messages", None)
                kw.update(made)
        elif plan.final:
            for key in ("tools", "tool_choice", "parallel_tool_calls", "functions"):
                kw.pop(key, None)
        kw.update(select)
        cap = plan.call.max_tokens
        if cap is not None:
            own = getattr(plan.llm, "max_tokens", None)
            if isinstance(own, int) and own > cap:
                # a constructor cap overrides per-call kwargs in most LLMs: call a copy
                plan.llm = plan.llm.model_copy(update={"max_tokens": cap})
            kw[self.max_tokens_param] = cap
        return kw

    def _messages(self, plan: _Plan, messages: Sequence[ChatMessage]) -> list[ChatMessage]:
        if not plan.final or self.finish_prompt is None:
            return list(messages)
        note = self.finish_prompt.format(reason=plan.call.decision.reason or "limit reached")
        return [*messages, ChatMessage(role="user", content=note)]

    def _prompt(self, plan: _Plan, prompt: str) -> str:
        if not plan.final or self.finish_prompt is None:
            return prompt
        note = self.finish_prompt.format(reason=plan.call.decision.reason or "limit reached")
        return f"{prompt}\n\n{note}"

    # -- ending a call --------------------------------------------------------------------------

    def _abort(self, plan: _Plan, exc: BaseException) -> Steps[None]:
        yield (plan.call, "fail", (exc,), NO_KW)
        if plan.owned:
            yield (plan.task, "close", (exc,), NO_KW)

    # Ending a call is one event (and the close of the call's own task): no generator on this
    # hot path, but the pure part (``_end_args``) and a sync and an async shell.

    @staticmethod
    def _end_args(usage: Any, response: Any) -> tuple[Any, dict[str, Any]]:
        reported = getattr(getattr(response, "raw", None), "model", None)
        return parsed_or_raw(usage), {
            "output_text": output_text(response) if usage is None and response else None,
            "model": reported if isinstance(reported, str) and reported else None,
        }

    def _commit(self, plan: _Plan, usage: Any, response: Any) -> None:
        try:
            u, kw = self._end_args(usage, response)
            plan.call.end(u, **kw)
        finally:
            if plan.owned:
                plan.task.close()

    async def _acommit(self, plan: _Plan, usage: Any, response: Any) -> None:
        try:
            u, kw = self._end_args(usage, response)
            await plan.call.aend(u, **kw)
        finally:
            if plan.owned:
                await plan.task.aclose()

    def _mark(self, plan: _Plan, response: Any) -> None:
        extra = getattr(response, "additional_kwargs", None)
        if isinstance(extra, dict):
            extra[MODEL_KEY] = plan.call.model
            if plan.final:
                extra[FINAL_KEY] = True

    def _done(self, plan: _Plan, response: Any) -> None:
        self._mark(plan, response)
        self._commit(plan, usage_of(response), response)

    async def _adone(self, plan: _Plan, response: Any) -> None:
        self._mark(plan, response)
        await self._acommit(plan, usage_of(response), response)

    # -- LLM ------------------------------------------------------------------------------------

    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        plan = drive(self._begin(messages, kwargs))
        try:
            with metered_here():
                response = plan.llm.chat(self._messages(plan, messages), **plan.kwargs)
        except BaseException as exc:
            drive(self._abort(plan, exc))
            raise
        self._done(plan, response)
        return response

    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        plan = await adrive(self._begin(messages, kwargs))
        try:
            with metered_here():
                response = await plan.llm.achat(self._messages(plan, messages), **plan.kwargs)
        except BaseException as exc:
            await adrive(self._abort(plan, exc))
            raise
        await self._adone(plan, response)
        return response

    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        plan = drive(self._begin([prompt], kwargs))
        try:
            with metered_here():
                response = plan.llm.complete(
                    self._prompt(plan, prompt), formatted=formatted, **plan.kwargs
                )
        except BaseException as exc:
            drive(self._abort(plan, exc))
            raise
        self._done(plan, response)
        return response

    async def acomplete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponse:
        plan = await adrive(self._begin([prompt], kwargs))
        try:
            with metered_here():
                response = await plan.llm.acomplete(
                    self._prompt(plan, prompt), formatted=formatted, **plan.kwargs
                )
        except BaseException as exc:
            await adrive(self._abort(plan, exc))
            raise
        await self._adone(plan, response)
        return response

    def _relay(self, plan: _Plan, chunks: Generator[Any, None, None]) -> Generator[Any, None, None]:
        tally = _Tally()
        try:
            for r in chunks:
                self._mark(plan, r)
                tally.add(r)
                yield r
        except GeneratorExit:
            # the consumer stopped reading: the prompt was read and the streamed part written,
            # so the call is charged (estimated when no usage arrived)
            chunks.close()
            self._commit(plan, tally.usage, tally.last)
            raise
        except BaseException as exc:
            drive(self._abort(plan, exc))
            raise
        self._commit(plan, tally.usage, tally.last)

    async def _arelay(
        self, plan: _Plan, chunks: AsyncGenerator[Any, None]
    ) -> AsyncGenerator[Any, None]:
        tally = _Tally()
        try:
            async for r in chunks:
                self._mark(plan, r)
                tally.add(r)
                yield r
        except BaseException as exc:
            if isinstance(exc, GeneratorExit) or type(exc).__name__ == "CancelledError":
                await chunks.aclose()
                await self._acommit(plan, tally.usage, tally.last)
            else:
                await adrive(self._abort(plan, exc))
            raise
        await self._acommit(plan, tally.usage, tally.last)

    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        plan = drive(self._begin(messages, kwargs))
        try:
            with metered_here():
                chunks = plan.llm.stream_chat(self._messages(plan, messages), **plan.kwargs)
        except BaseException as exc:
            drive(self._abort(plan, exc))
            raise
        return self._relay(plan, chunks)

    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        plan = drive(self._begin([prompt], kwargs))
        try:
            with metered_here():
                chunks = plan.llm.stream_complete(
                    self._prompt(plan, prompt), formatted=formatted, **plan.kwargs
                )
        except BaseException as exc:
            drive(self._abort(plan, exc))
            raise
        return self._relay(plan, chunks)

    async def astream_chat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> ChatResponseAsyncGen:
        plan = await adrive(self._begin(messages, kwargs))
        try:
            with metered_here():
                chunks = await plan.llm.astream_chat(self._messages(plan, messages), **plan.kwargs)
        except BaseException as exc:
            await adrive(self._abort(plan, exc))
            raise
        return self._arelay(plan, chunks)

    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        plan = await adrive(self._begin([prompt], kwargs))
        try:
            with metered_here():
                chunks = await plan.llm.astream_complete(
                    self._prompt(plan, prompt), formatted=formatted, **plan.kwargs
                )
        except BaseException as exc:
            await adrive(self._abort(plan, exc))
            raise
        return self._arelay(plan, chunks)

    # -- FunctionCallingLLM ----------------------------------------------------------------------

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
        if not isinstance(self.llm, FunctionCallingLLM):
            raise TypeError(
                f"llm is a {type(self.llm).__name__}, not a FunctionCallingLLM: "
                "BudgetedLLM cannot call tools with it"
            )
        options = {
            "allow_parallel_tool_calls": allow_parallel_tool_calls,
            "tool_required": tool_required,
            **kwargs,
        }
        made = self.llm._prepare_chat_with_tools_compat(
            tools, user_msg=user_msg, chat_history=chat_history, verbose=verbose, **options
        )
        keys = frozenset(k for k in made if k != "messages")
        made[_RAW_TOOLS] = _Tools(tuple(tools), options, keys)
        return made

    def _validate_chat_with_tools_response(
        self,
        response: ChatResponse,
        tools: Sequence[BaseTool],
        allow_parallel_tool_calls: bool = False,
        **kwargs: Any,
    ) -> ChatResponse:
        llm = self._answered_by(response)
        if isinstance(llm, FunctionCallingLLM):
            return llm._validate_chat_with_tools_response(
                response, tools, allow_parallel_tool_calls=allow_parallel_tool_calls, **kwargs
            )
        return response

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        llm = self._answered_by(response)
        if not isinstance(llm, FunctionCallingLLM):
            raise TypeError(f"{type(llm).__name__} is not a FunctionCallingLLM")
        return llm.get_tool_calls_from_response(
            response, error_on_no_tool_call=error_on_no_tool_call, **kwargs
        )

    def _answered_by(self, response: ChatResponse) -> LLM:
        model = response.additional_kwargs.get(MODEL_KEY)
        if isinstance(model, str):
            return self._resolve(model)[0]
        return self.llm


# LlamaIndex's DispatcherSpanMixin wraps every LLM method a subclass implements in a dispatcher
# span (an ``inspect.signature`` bind, a uuid, every span handler called: tens of µs). The
# wrapper's delegate opens its own span and emits the LLM events; a second span around it adds
# cost and nothing else, so the wrapper's methods are restored undecorated.
for _name in (
    "chat",
    "achat",
    "stream_chat",
    "astream_chat",
    "complete",
    "acomplete",
    "stream_complete",
    "astream_complete",
    "_prepare_chat_with_tools",
    "get_tool_calls_from_response",
    "_validate_chat_with_tools_response",
):
    _fn = BudgetedLLM.__dict__.get(_name)
    if _fn is not None and hasattr(_fn, "__wrapped__"):
        setattr(BudgetedLLM, _name, _fn.__wrapped__)
