"""A budget-aware chat model: the guard's decisions applied to plain chains, no agent needed.

:class:`BudgetedChatModel` wraps a chat model (and, optionally, the chat models of a
downgrade ladder). Each call it receives goes through the guard's event API:

1. find the task — the current one (``with guard.task(...)``) or, outside any task, one
   opened for this call alone and closed after it;
2. ``task.start_model_call(...)`` with the messages, the bound tools and the caller's output
   cap: the guard decides, reserves the call's worst case and answers with the model to use
   and the cap to bind — or ``finish``, or raises :class:`~agentguard.BudgetExceeded`;
3. call the chosen chat model with that cap bound, inside :func:`metered_here` (so an
   :class:`AgentGuardCallbackHandler` on the same run does not charge the call again);
4. commit the usage the provider reported (a stream's usage from its chunks, or an estimate
   from the streamed text when the stream carries none), or release the reservation if the
   call failed.

No budget arithmetic happens here: the wrapper only translates.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from typing import Any, Self

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import (
    BaseChatModel,
    LangSmithParams,
    LanguageModelInput,
    ModelProfile,
)
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata, add_usage
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableBinding
from langchain_core.tools import BaseTool
from pydantic import Field, PrivateAttr, model_validator

from agentguard import Guard, InvalidUsage, ModelCall, Task, Usage, current_task
from agentguard_langchain._common import METERED, metered_here, output_cap, usage_of

__all__ = ["METERED_METADATA_KEY", "BudgetedChatModel"]

#: Key this wrapper adds to the metadata of its runs (through ``_get_ls_params``): a callback
#: handler seeing ``metadata[METERED_METADATA_KEY]`` in ``on_chat_model_start`` knows the call
#: is metered by the wrapper itself and must not be charged again.
METERED_METADATA_KEY = "agentguard_metered"

# The binding kwarg that carries the tools as they were given to ``bind_tools``, so that a
# ladder rung served by another chat model class formats them its own way. Never reaches a
# provider: popped before any delegate is called, hidden from invocation params.
_RAW_TOOLS = "agentguard_tools"

# Output-cap parameters LangChain chat models understand, in the order a cap is looked for.
_CAP_KEYS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "num_predict")
_CAP_FIELDS = ("max_tokens", "max_output_tokens", "num_predict", "max_new_tokens")
_CAP_KEY_SET = frozenset(_CAP_KEYS)

# Keys ``bind_tools`` may carry that are for tracing only (popped by BaseChatModel before
# ``_generate``): not part of how a delegate should format tools.
_TRACING_ONLY = frozenset({"ls_structured_output_format", "structured_output_format"})
_TOOL_KEYS = ("tools", "tool_choice", "parallel_tool_calls", "functions", "function_call")
# How many (chat model, final) formattings of one binding's tools are kept (see _BoundTools).
_FORMATTED_KEPT = 8


@dataclass(frozen=True, slots=True)
class _BoundTools:
    """Tools as given to :meth:`BudgetedChatModel.bind_tools`, to format them per delegate."""

    tools: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    keys: frozenset[str]  # the binding kwargs the default model's bind_tools produced
    # (chat model, final, the binding kwargs its bind_tools made of the tools): every call of
    # a downgraded binding goes to the same rung, formatted once (~30 µs per bind_tools)
    formatted: list[tuple[BaseChatModel, bool, dict[str, Any]]] = field(
        default_factory=list, compare=False, repr=False
    )

    def formatted_for(self, model: BaseChatModel, final: bool) -> dict[str, Any]:
        """The binding kwargs ``model.bind_tools`` makes of these tools (``tool_choice="none"``
        when ``final``), kept per chat model object; raises what ``bind_tools`` raises."""
        for held, held_final, produced in self.formatted:
            if held is model and held_final is final:
                return produced
        extra = dict(self.kwargs)
        if final:
            extra["tool_choice"] = "none"
        produced = _binding_kwargs(model.bind_tools(list(self.tools), **extra))
        if len(self.formatted) >= _FORMATTED_KEPT:  # models made per call: do not grow
            self.formatted.clear()
        self.formatted.append((model, final, produced))
        return produced


@dataclass(slots=True)
class _Plan:
    """One call: what it asks for (:meth:`BudgetedChatModel._ask`), then, routed
    (:meth:`BudgetedChatModel._route`), the chat model to call and its kwargs; a metered
    call also has its task and reservation."""

    requested: str  # the model id asked for
    model: BaseChatModel  # the chat model serving it; once routed, the one to call
    facts: _ClassFacts  # of ``model``'s class
    select: dict[str, Any] | None  # the kwargs that select it (``model=``), if any
    spec: _BoundTools | None  # the tools as bound, to format them for another rung
    cap: int | None  # the caller's own output cap
    stop: list[str] | None
    kwargs: dict[str, Any]  # the call's own ``**kwargs`` dict: the wrapper's keys popped
    bind: str | None = None  # the usual call: the cap kwarg to bind (see _ask)
    own: int | None = None  # with ``bind``: the model's own cap under it
    final: bool = False  # the task's graceful final answer
    owned: bool = False  # the task was opened for this call alone
    task: Task = field(init=False)  # set (with ``call``) on metered calls only
    call: ModelCall = field(init=False)


@dataclass(slots=True)
class _Tally:
    """What a stream has carried so far: usage, text, the model that answered."""

    usage: UsageMetadata | None = None
    other_usage: Any = None  # a provider shape in response_metadata (no usage_metadata)
    parts: list[str] = field(default_factory=list)
    model_name: str | None = None
    chunks: int = 0

    def add(self, chunk: ChatGenerationChunk) -> None:
        msg = chunk.message
        self.chunks += 1
        um = getattr(msg, "usage_metadata", None)
        if um:
            self.usage = um if self.usage is None else add_usage(self.usage, um)
        elif self.usage is None:
            meta = msg.response_metadata
            for key in ("token_usage", "usage"):
                if meta.get(key):
                    self.other_usage = meta[key]
        text = msg.text
        if text:
            self.parts.append(text)
        for tc in getattr(msg, "tool_call_chunks", None) or ():
            self.parts.append((tc.get("name") or "") + (tc.get("args") or ""))
        name = msg.response_metadata.get("model_name") or msg.response_metadata.get("model")
        if isinstance(name, str) and name:
            self.model_name = name

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def reported(self) -> Any:
        """The usage to commit: LangChain's summed ``usage_metadata``, else a provider shape."""
        return self.usage if self.usage is not None else self.other_usage


def _model_id(model: BaseChatModel) -> str:
    """The id a chat model calls its model by (``ls_model_name``, then the usual fields)."""
    try:
        name = model._get_ls_params().get("ls_model_name")
    except Exception:  # a provider's tracing params must not break the wrapper
        name = None
    if isinstance(name, str) and name:
        return name
    for attr in ("model_name", "model", "model_id", "deployment_name"):
        value = getattr(model, attr, None)
        if isinstance(value, str) and value:
            return value
    return model._llm_type


@dataclass(frozen=True, slots=True)
class _ClassFacts:
    """What the wrapper reads off a chat model class, found once per class (``_FACTS``):
    ``model_fields`` costs ~1 µs per read, ``inspect.signature`` ~20 µs."""

    # the output-cap attributes (``_CAP_FIELDS``) the class can have: its fields, class
    # attributes and properties (any, if it allows extras) — the others are not looked up,
    # since a pydantic model raises (~3 µs) for each name it lacks. A field's value is read
    # from the instance's ``__dict__`` (where pydantic keeps it), the rest with ``getattr``.
    cap_attrs: tuple[str, ...]
    cap_param: str  # the output-cap field it declares (``max_tokens`` if none)
    run_manager: frozenset[str]  # its methods (``_generate``...) that take ``run_manager``
    one_cap: bool  # its one cap attribute is the field ``cap_param`` (read from __dict__)


class _FactsByClass(dict[type, _ClassFacts]):
    """``_FACTS[cls]``: a class's facts, found on first use (``__missing__``), so a call site
    reads them with one subscript and no call."""

    def __missing__(self, cls: type[BaseChatModel]) -> _ClassFacts:
        fields = cls.model_fields
        loose = cls.model_config.get("extra") == "allow"
        cap_attrs = tuple(
            k for k in _CAP_FIELDS if loose or k in fields or any(k in vars(c) for c in cls.__mro__)
        )
        cap_param = next((k for k in _CAP_FIELDS if k in fields), "max_tokens")
        got = self[cls] = _ClassFacts(
            cap_attrs=cap_attrs,
            cap_param=cap_param,
            one_cap=cap_attrs == (cap_param,) and cap_param in fields and not loose,
            run_manager=frozenset(
                m
                for m in ("_generate", "_agenerate", "_stream", "_astream")
                if "run_manager" in inspect.signature(getattr(cls, m)).parameters
            ),
        )
        return got


_FACTS = _FactsByClass()


def _default_of(model: BudgetedChatModel) -> str:
    """``model._default_id``, read from pydantic's private dict: the attribute itself goes
    through ``BaseModel.__getattr__`` (~3 µs per read)."""
    private: dict[str, Any] = model.__pydantic_private__  # type: ignore[assignment]
    default: str = private["_default_id"]
    return default


def _binding_kwargs(bound: Runnable[Any, Any]) -> dict[str, Any]:
    if not isinstance(bound, RunnableBinding):
        raise TypeError(
            f"bind_tools of the wrapped model returned {type(bound).__name__}, "
            "not a RunnableBinding: BudgetedChatModel cannot read the tools it bound"
        )
    return {k: v for k, v in bound.kwargs.items() if k not in _TRACING_ONLY}


def _usage_or_raw(message: BaseMessage) -> Any:
    """The usage on ``message`` for :meth:`ModelCall.end`; a malformed record is handed over
    raw so the guard charges the call's bound and flags it instead of failing the run.

    LangChain's ``usage_metadata`` as chat models build it (a dict, its details dicts or
    absent) is read straight into a :class:`Usage` (which validates the counts, as
    :meth:`Usage.from_langchain` would after the same reading); any other shape goes through
    :func:`usage_of`.
    """
    um = (
        message.usage_metadata
        if type(message) is AIMessage
        else getattr(message, "usage_metadata", None)
    )
    try:
        if type(um) is dict and um:
            ind = um.get("input_token_details")
            outd = um.get("output_token_details")
            if (ind is None or type(ind) is dict) and (outd is None or type(outd) is dict):
                # a missing count is 0, as Usage.from_langchain reads it
                return Usage(
                    um.get("input_tokens", 0),
                    um.get("output_tokens", 0),
                    ind.get("cache_read", 0) if ind else 0,
                    ind.get("cache_creation", 0) if ind else 0,
                    outd.get("reasoning", 0) if outd else 0,
                )
        return usage_of(message)
    except InvalidUsage:
        return um or message.response_metadata.get(
            "token_usage", message.response_metadata.get("usage")
        )


def _output_text(message: BaseMessage) -> str:
    text = message.text
    for tc in getattr(message, "tool_calls", None) or ():
        text += tc["name"] + json.dumps(tc["args"])
    return text


def _as_chunk(message: BaseMessage) -> ChatGenerationChunk:
    """A whole answer as the single, last chunk of a stream."""
    tool_calls = getattr(message, "tool_calls", None) or []
    return ChatGenerationChunk(
        message=AIMessageChunk(
            content=message.content,
            additional_kwargs=message.additional_kwargs,
            response_metadata=message.response_metadata,
            id=message.id,
            tool_call_chunks=[
                {"name": tc["name"], "args": json.dumps(tc["args"]), "id": tc["id"], "index": i}
                for i, tc in enumerate(tool_calls)
            ],
            usage_metadata=getattr(message, "usage_metadata", None),
            chunk_position="last",
        )
    )


class BudgetedChatModel(BaseChatModel):
    """A chat model that keeps every call inside the current task's budget.

    Use it wherever a chat model goes — a plain LCEL chain, ``with_structured_output``,
    ``bind_tools`` — when there is no agent middleware to apply the guard's decisions. Each
    call is decided and reserved by the guard before it is made, runs on the model the guard
    picked with the output cap it allows, and is charged with the usage the provider
    reports (streams included; a stream without usage is charged an estimate, labelled as
    such).

    * **Task**: the current task (``with guard.task(...)``) of ``guard``; outside any task,
      each call opens a task of its own (``task_id``, ``task_tags``) and closes it after.
      Calls made under the same ``task_id`` charge that task's budget line together.
    * **Ladder**: when the guard picks a cheaper rung, the call goes to ``models[rung]``; a
      rung without an entry is called on ``model`` with the per-call ``model=`` override
      (which LangChain's partner models honour). A ``model=`` kwarg on a call asks for that
      model the same way, and the guard may still downgrade it.
    * **Output cap**: the cap the guard allows is bound on every call, under the parameter
      the caller used (``max_tokens``, ``max_completion_tokens``...) or, by default, the one
      the chat model declares (``max_tokens``, ``max_output_tokens``, ``num_predict``);
      ``max_tokens_param`` names it explicitly. The caller's own cap (a call kwarg, this
      model's ``max_tokens``, the wrapped model's constructor cap) is always respected.
    * **Finish** (``on_limit="finish"``): the call is made as the task's graceful final
      answer — on the model and with the cap the guard reserved for it, with the bound tools
      kept but ``tool_choice="none"`` so the model must answer in text (a tool-calling
      structured output then yields no parsed result). The answer's
      ``response_metadata["agentguard_final"]`` is ``True``; a later call in the task stops.
    * **Stop**: :class:`~agentguard.BudgetExceeded` propagates to the caller.
    * **Tools**: :meth:`bind_tools` binds the tools the way the wrapped model does, and
      re-formats them for a rung served by another chat model class;
      ``with_structured_output`` uses tool calling.
    * **Charged once**: inside agentguard's agent middleware (which meters the call itself),
      the wrapper only forwards; an :class:`AgentGuardCallbackHandler` attached to the run
      sees ``metadata["agentguard_metered"]`` and does not charge it again.

    Args:
        guard: the :class:`~agentguard.Guard` whose tasks are charged.
        model: the chat model to call (its id is the model asked for).
        models: chat models for ladder rungs, by model id (unbound chat models).
        max_tokens: an output cap for every call, below whatever the guard allows.
        stop: default stop sequences.
        max_tokens_param: the kwarg the wrapped models take their output cap under.
        task_id: id of the task opened for a call made outside any task.
        task_tags: attribution tags of such a task.

    Example:
        >>> import agentguard as ag
        >>> from agentguard_langchain import BudgetedChatModel
        >>> from agentguard_langchain.testing import ScriptedChatModel
        >>> guard = ag.Guard(ag.Policy(max_cost_usd="0.01", max_output_tokens=50), traces=False)
        >>> llm = BudgetedChatModel(
        ...     guard=guard, model=ScriptedChatModel(model_name="gpt-4o", replies=["Done."])
        ... )
        >>> with guard.task("ticket-7") as task:
        ...     answer = llm.invoke("Summarise the ticket.")
        >>> answer.content, task.model_calls, llm.model.seen[-1]["max_tokens"]
        ('Done.', 1, 50)
    """

    guard: Guard
    model: BaseChatModel
    models: dict[str, BaseChatModel] = Field(default_factory=dict)
    max_tokens: int | None = Field(default=None, gt=0)
    stop: list[str] | None = None
    max_tokens_param: str | None = None
    task_id: str | None = None
    task_tags: dict[str, str] = Field(default_factory=dict)

    _default_id: str = PrivateAttr(default="")
    # the wrapped model, its temperature, its tracing params as the wrapper reports them
    # (without a call's) and its class facts: see _get_ls_params
    _ls_base: tuple[BaseChatModel, Any, LangSmithParams, _ClassFacts] | None = PrivateAttr(
        default=None
    )
    # the wrapped model and its ``_llm_type``: see _get_invocation_params
    _delegate: tuple[BaseChatModel, str] | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _read_default_id(self) -> Self:
        for reserved in ("policy", "parent"):
            if reserved in self.task_tags:
                raise ValueError(f"task_tags[{reserved!r}]: {reserved!r} cannot be a tag name")
        self._default_id = _model_id(self.model)
        return self

    # -- identity --------------------------------------------------------------------------
    #
    # LangChain reads ``_get_invocation_params`` and ``_get_ls_params`` on every call, before
    # ``_generate``: what only changes with the wrapped model is held per model object.

    @property
    def model_name(self) -> str:
        """The id of the default model (what a call asks for unless told otherwise)."""
        return _default_of(self)

    @property
    def _llm_type(self) -> str:
        return "agentguard-budgeted"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        models = self.models
        return {
            "model_name": self.__pydantic_private__["_default_id"],  # type: ignore[index]
            "delegate": self.model._llm_type,
            "ladder": sorted(models) if models else [],
        }

    def _resolve_model_profile(self) -> ModelProfile | None:
        return self.model.profile

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        private: dict[str, Any] = self.__pydantic_private__  # type: ignore[assignment]
        model = self.model
        # The wrapped model's own tracing params (no call kwargs), kept while the model and
        # its ``temperature`` are the same: a provider's ``_get_ls_params`` probes attributes
        # (``hasattr`` on a pydantic model raises and catches for each one it lacks), ~8 µs
        # per call. The wrapper sets the model name, cap, stop and a call's temperature.
        temperature = model.__dict__.get("temperature")
        held = private["_ls_base"]
        if held is None or held[0] is not model or held[1] != temperature:
            try:
                base = model._get_ls_params()
            except Exception:  # pragma: no cover - a provider's tracing params are best effort
                base = LangSmithParams(ls_provider="agentguard")
            base.pop("ls_max_tokens", None)  # the caller's cap is the wrapper's to report
            base["ls_model_type"] = "chat"
            base[METERED_METADATA_KEY] = True  # type: ignore[literal-required]
            held = (model, temperature, base, _FACTS[type(model)])
            private["_ls_base"] = held
        params: LangSmithParams = held[2].copy()
        temperature = kwargs.get("temperature")
        if temperature is not None and isinstance(temperature, (int, float)):
            params["ls_temperature"] = temperature
        requested = kwargs.get("model")
        params["ls_model_name"] = (
            requested
            if requested is not None and isinstance(requested, str)
            else private["_default_id"]
        )
        cap = self._caller_cap(model, held[3], kwargs)
        if cap is not None:
            params["ls_max_tokens"] = cap
        stops = stop or self.stop
        if stops:
            params["ls_stop"] = stops
        return params

    def _get_invocation_params(
        self, stop: list[str] | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        kwargs.pop(_RAW_TOOLS, None)
        cls = type(self)
        if cls.dict is not BaseChatModel.dict:  # a subclass's own dict(): LangChain's way
            return super()._get_invocation_params(stop=stop, **kwargs)
        # what BaseChatModel builds (``dict()`` + stop + kwargs), without the warnings filter
        # it sets around ``dict()`` for deprecated overrides (~7 µs per call)
        if cls._identifying_params is not BudgetedChatModel._identifying_params:
            params = self._identifying_params  # a subclass's own
            params["_type"] = "agentguard-budgeted"
            params["stop"] = stop
            params.update(kwargs)
            return params
        # ``_identifying_params`` built in place, the delegate's ``_llm_type`` (a property)
        # read once per wrapped model
        private: dict[str, Any] = self.__pydantic_private__  # type: ignore[assignment]
        model = self.model
        delegate = private["_delegate"]
        if delegate is None or delegate[0] is not model:
            delegate = private["_delegate"] = (model, model._llm_type)
        models = self.models
        return {
            "model_name": private["_default_id"],
            "delegate": delegate[1],
            "ladder": sorted(models) if models else [],
            "_type": "agentguard-budgeted",
            "stop": stop,
            **kwargs,
        }

    # -- tools -------------------------------------------------------------------------------

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools the way the wrapped model does (its ``bind_tools``), keeping the tools
        as given so a ladder rung served by another chat model formats them its own way."""
        extra = dict(kwargs)
        if tool_choice is not None:
            extra["tool_choice"] = tool_choice
        produced = _binding_kwargs(self.model.bind_tools(tools, **extra))
        traced = {k: v for k, v in kwargs.items() if k in _TRACING_ONLY}
        spec = _BoundTools(
            tuple(tools),
            {k: v for k, v in extra.items() if k not in _TRACING_ONLY},
            frozenset(produced),
        )
        return self.bind(**produced, **traced, **{_RAW_TOOLS: spec})

    # -- planning a call ----------------------------------------------------------------------
    #
    # The common path — the wrapped model itself, no rung switch, no streaming — is
    # ``_generate`` -> ``_begin`` (``_ask``, ``_caller_cap``, the guard's decision, ``_route``)
    # -> ``_call_generate`` (the delegate's ``_generate``, ``_reported``, ``call.end``): inside
    # a running graph each Python call and each object touched costs several times what it
    # costs in a tight loop, so these keep their helpers few and their allocations to one
    # ``_Plan`` per call. The usual call (a model class with one cap field, no cap kwarg, no
    # ``max_tokens_param``) has its cap read once by ``_ask`` (``plan.bind`` / ``plan.own``)
    # and bound by ``_route`` without the general reading (``_caller_cap``, ``_kwargs_for``).

    def _resolve(
        self, model_id: str, default_id: str | None = None
    ) -> tuple[BaseChatModel, dict[str, Any] | None]:
        """The chat model serving ``model_id`` and the kwargs that select it (``None``: none)."""
        models = self.models
        if models:
            chosen = models.get(model_id)
            if chosen is not None:
                return chosen, None
        if model_id == (default_id if default_id is not None else _default_of(self)):
            return self.model, None
        return self.model, {"model": model_id}

    def _caller_cap(
        self, model: BaseChatModel, facts: _ClassFacts, kwargs: Mapping[str, Any]
    ) -> int | None:
        """The caller's own output cap: ``max_tokens``, a cap in the call's kwargs, the
        model's constructor cap (the least of them)."""
        cap = self.max_tokens
        if not _CAP_KEY_SET.isdisjoint(kwargs):
            for k in _CAP_KEYS:
                v = kwargs.get(k)
                if v is not None and (c := output_cap(v)) is not None and (cap is None or c < cap):
                    cap = c
        fields = model.__dict__  # a pydantic field's value, read without a getattr call
        for k in facts.cap_attrs:
            v = fields[k] if k in fields else getattr(model, k, None)
            if v is None:
                continue
            c = v if type(v) is int and v > 0 else output_cap(v)
            if c is not None and (cap is None or c < cap):
                cap = c
        return cap

    def _kwargs_for(
        self,
        model: BaseChatModel,
        spec: _BoundTools | None,
        kwargs: dict[str, Any],
        *,
        final: bool,
    ) -> dict[str, Any]:
        """The call kwargs for another rung's chat model or a final answer: tools formatted
        by ``model``, forced to text when final."""
        kw = dict(kwargs)
        if spec is not None and (model is not self.model or final):
            for key in spec.keys:
                kw.pop(key, None)
            try:
                kw.update(spec.formatted_for(model, final))
            except (NotImplementedError, ValueError, TypeError):
                if not final:
                    raise
                # the model cannot express tool_choice="none": answer without tools
        elif final and kw.get("tools"):
            kw["tool_choice"] = "none"
        return kw

    def _ask(self, stop: list[str] | None, kwargs: dict[str, Any]) -> _Plan:
        """What the call asks for, read from its kwargs (``kwargs`` is the call's own
        ``**kwargs`` dict, never the caller's: the wrapper's keys are popped from it)."""
        spec: _BoundTools | None = kwargs.pop(_RAW_TOOLS, None)
        asked = kwargs.pop("model", None)
        private: dict[str, Any] = self.__pydantic_private__  # type: ignore[assignment]
        default_id: str = private["_default_id"]
        requested = asked if asked is not None and isinstance(asked, str) else default_id
        if requested == default_id and default_id not in self.models:  # the wrapped model
            model, select = self.model, None
        else:
            model, select = self._resolve(requested, default_id)
        facts = _FACTS[type(model)]
        stops = stop or self.stop or None
        if facts.one_cap and self.max_tokens_param is None and _CAP_KEY_SET.isdisjoint(kwargs):
            # the usual call: one cap field, no cap kwarg — read once for _route too
            own = model.__dict__.get(facts.cap_param)
            if own is not None and (type(own) is not int or own < 1):
                own = output_cap(own)
            cap = self.max_tokens
            if own is not None and (cap is None or own < cap):
                cap = own
            return _Plan(
                requested, model, facts, select, spec, cap, stops, kwargs, facts.cap_param, own
            )
        cap = self._caller_cap(model, facts, kwargs)
        return _Plan(requested, model, facts, select, spec, cap, stops, kwargs)

    def _route(self, plan: _Plan, model_id: str, cap: int | None) -> None:
        """Point ``plan`` at the chat model serving ``model_id`` (raises on a bad rung), its
        kwargs at that model: tools formatted by it (forced to text for a final answer), the
        ``model=`` that selects it and the output cap ``cap``."""
        bind = plan.bind
        if (
            bind is not None
            and model_id == plan.requested
            and not plan.final
            and (plan.spec is None or plan.model is self.model)
        ):  # the usual call: no rung switch, no tools to format again
            if select := plan.select:
                plan.kwargs.update(select)
            if cap is not None:
                own = plan.own
                plan.kwargs[bind] = own if own is not None and own < cap else cap
            return
        if model_id != plan.requested:
            plan.model, plan.select = self._resolve(model_id)
            plan.facts = _FACTS[type(plan.model)]
        model = plan.model
        kw = plan.kwargs
        if plan.final or (plan.spec is not None and model is not self.model):
            kw = plan.kwargs = self._kwargs_for(model, plan.spec, kw, final=plan.final)
        if plan.select:
            kw.update(plan.select)
        if cap is None:
            return
        facts = plan.facts
        param = self.max_tokens_param or facts.cap_param
        if param in facts.cap_attrs or param not in _CAP_FIELDS:
            fields = model.__dict__
            own = fields[param] if param in fields else getattr(model, param, None)
            if own is not None and (type(own) is not int or own < 1):
                own = output_cap(own)
            if own is not None and own < cap:  # a rung's own constructor cap is never raised
                cap = own
        if _CAP_KEY_SET.isdisjoint(kw):
            kw[param] = cap
            return
        for key in _CAP_KEYS:
            if key in kw:
                kw[key] = cap

    def _begin(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> _Plan | None:
        """Decide and reserve the call, or ``None`` when an enclosing agentguard layer (the
        agent middleware) meters it already (:meth:`_forward` then routes it)."""
        if METERED.get():
            return None
        plan = self._ask(stop, kwargs)
        task = current_task()
        if task is None or task.guard is not self.guard:  # a task of its own for this call
            open_task: Callable[..., Task] = self.guard.open_task  # tags are plain **kwargs
            task = open_task(self.task_id, **self.task_tags)
            plan.owned = True
        plan.task = task
        try:
            tools = kwargs.get("tools")
            call = task.start_model_call(
                plan.requested, messages=messages, tools=tools, max_tokens=plan.cap
            )
            if call.decision.action == "finish":  # this call becomes the graceful final answer
                plan.final = True
                call = task.start_model_call(
                    call.model, messages=messages, tools=tools, max_tokens=call.max_tokens,
                    finish=True,
                )  # fmt: skip
        except BaseException as exc:
            if plan.owned:
                task.close(exc)
            raise
        plan.call = call
        decision = call.decision
        try:
            self._route(plan, decision.model or call.model, decision.max_tokens)
        except BaseException as exc:
            self._abort(plan, exc)
            raise
        return plan

    async def _abegin(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> _Plan | None:
        """Async :meth:`_begin`: the reservation awaits the budget store."""
        if METERED.get():
            return None
        plan = self._ask(stop, kwargs)
        task = current_task()
        if task is None or task.guard is not self.guard:
            open_task: Callable[..., Awaitable[Task]] = self.guard.aopen_task
            task = await open_task(self.task_id, **self.task_tags)
            plan.owned = True
        plan.task = task
        try:
            tools = kwargs.get("tools")
            if task.awaits_store:
                call = await task.astart_model_call(
                    plan.requested, messages=messages, tools=tools, max_tokens=plan.cap
                )
            else:  # the embedded store: the async event would only run this
                call = task.start_model_call(
                    plan.requested, messages=messages, tools=tools, max_tokens=plan.cap
                )
            if call.decision.action == "finish":
                plan.final = True
                call = await task.astart_model_call(
                    call.model, messages=messages, tools=tools, max_tokens=call.max_tokens,
                    finish=True,
                )  # fmt: skip
        except BaseException as exc:
            if plan.owned:
                await task.aclose(exc)
            raise
        plan.call = call
        decision = call.decision
        try:
            self._route(plan, decision.model or call.model, decision.max_tokens)
        except BaseException as exc:
            await self._aabort(plan, exc)
            raise
        return plan

    def _forward(self, stop: list[str] | None, kwargs: dict[str, Any]) -> _Plan:
        """The call as it goes out when agentguard meters it elsewhere (no task, no call)."""
        plan = self._ask(stop, kwargs)
        self._route(plan, plan.requested, plan.cap)
        return plan

    # -- ending a call -------------------------------------------------------------------------

    def _abort(self, plan: _Plan, exc: BaseException) -> None:
        plan.call.fail(exc)
        if plan.owned:
            plan.task.close(exc)

    async def _aabort(self, plan: _Plan, exc: BaseException) -> None:
        await plan.call.afail(exc)
        if plan.owned:
            await plan.task.aclose(exc)

    def _commit(self, plan: _Plan, usage: Any, text: str | None, model_name: str | None) -> None:
        try:
            plan.call.end(usage, output_text=text, model=model_name)
        finally:
            if plan.owned:
                plan.task.close()

    async def _acommit(
        self, plan: _Plan, usage: Any, text: str | None, model_name: str | None
    ) -> None:
        try:
            await plan.call.aend(usage, output_text=text, model=model_name)
        finally:
            if plan.owned:
                await plan.task.aclose()

    def _reported(self, plan: _Plan, result: ChatResult) -> tuple[Any, str | None, str | None]:
        """What a result reports to commit: (usage, output text, model name); marks the
        graceful final answer."""
        generations = result.generations
        if not generations:
            return None, "", None
        message = generations[0].message
        usage = _usage_or_raw(message)
        if usage is None and result.llm_output:
            usage = result.llm_output.get("token_usage") or result.llm_output.get("usage")
        meta = message.response_metadata
        name = meta.get("model_name")
        # the text only matters when the usage is missing or malformed (an estimate is made
        # from it) or content is captured: tool-call JSON is not rebuilt otherwise
        text = (
            _output_text(message)
            if type(usage) is not Usage or self.guard.capture_content
            else None
        )
        if plan.final:
            meta["agentguard_final"] = True
        return usage, text, name if isinstance(name, str) else None

    # -- BaseChatModel ---------------------------------------------------------------------------

    # ``_call_generate`` / ``_acall_generate`` add ``run_manager`` to ``plan.kwargs`` itself
    # (the call's own dict, no copy) and set the metered flag without ``metered_here()``;
    # with ``end`` (a metered call of ``_generate``), they also end it — release on failure,
    # else commit what the result reports (``_commit``'s body, inline): they run on every call.

    def _call_generate(
        self,
        plan: _Plan,
        messages: list[BaseMessage],
        run_manager: CallbackManagerForLLMRun | None,
        end: bool = False,
    ) -> ChatResult:
        model = plan.model
        try:
            if model.rate_limiter is not None:
                model.rate_limiter.acquire(blocking=True)
            kwargs = plan.kwargs
            if "_generate" in plan.facts.run_manager:
                kwargs["run_manager"] = run_manager
            token = METERED.set(True)
            try:
                result = model._generate(messages, stop=plan.stop, **kwargs)
            finally:
                METERED.reset(token)
        except BaseException as exc:
            if end:
                self._abort(plan, exc)
            raise
        if end:
            usage, text, name = self._reported(plan, result)
            try:
                plan.call.end(usage, output_text=text, model=name)
            finally:
                if plan.owned:
                    plan.task.close()
        return result

    async def _acall_generate(
        self,
        plan: _Plan,
        messages: list[BaseMessage],
        run_manager: AsyncCallbackManagerForLLMRun | None,
        end: bool = False,
    ) -> ChatResult:
        model = plan.model
        try:
            if model.rate_limiter is not None:
                await model.rate_limiter.aacquire(blocking=True)
            kwargs = plan.kwargs
            if "_agenerate" in plan.facts.run_manager:
                kwargs["run_manager"] = run_manager
            token = METERED.set(True)
            try:
                result = await model._agenerate(messages, stop=plan.stop, **kwargs)
            finally:
                METERED.reset(token)
        except BaseException as exc:
            if end:
                await self._aabort(plan, exc)
            raise
        if end:
            usage, text, name = self._reported(plan, result)
            try:
                if plan.task.awaits_store:
                    await plan.call.aend(usage, output_text=text, model=name)
                else:  # the embedded store: the async end would only run this
                    plan.call.end(usage, output_text=text, model=name)
            finally:
                if plan.owned:
                    await plan.task.aclose()
        return result

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        plan = self._begin(messages, stop, kwargs)
        if plan is None:
            return self._call_generate(self._forward(stop, kwargs), messages, run_manager)
        return self._call_generate(plan, messages, run_manager, end=True)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if not self.guard.awaits_store:  # _abegin would only run _begin's events
            plan = self._begin(messages, stop, kwargs)
        else:
            plan = await self._abegin(messages, stop, kwargs)
        if plan is None:
            return await self._acall_generate(self._forward(stop, kwargs), messages, run_manager)
        return await self._acall_generate(plan, messages, run_manager, end=True)

    def _delegate_stream(
        self,
        plan: _Plan,
        messages: list[BaseMessage],
        run_manager: CallbackManagerForLLMRun | None,
    ) -> Generator[ChatGenerationChunk, None, None]:
        model = plan.model
        kwargs = plan.kwargs
        cls = type(model)
        streams = cls._stream is not BaseChatModel._stream
        disabled = getattr(model, "_streaming_disabled", None)
        if not streams or (disabled is not None and disabled(**kwargs)):
            yield _as_chunk(self._call_generate(plan, messages, run_manager).generations[0].message)
            return
        if model.rate_limiter is not None:
            model.rate_limiter.acquire(blocking=True)
        if "_stream" in plan.facts.run_manager:
            kwargs["run_manager"] = run_manager
        chunks = model._stream(messages, stop=plan.stop, **kwargs)
        try:
            while True:
                with metered_here():  # only while the provider's code runs, not between chunks
                    chunk = next(chunks, None)
                if chunk is None:
                    return
                yield chunk
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    async def _adelegate_stream(
        self,
        plan: _Plan,
        messages: list[BaseMessage],
        run_manager: AsyncCallbackManagerForLLMRun | None,
    ) -> AsyncGenerator[ChatGenerationChunk, None]:
        model = plan.model
        kwargs = plan.kwargs
        cls = type(model)
        streams = cls._astream is not BaseChatModel._astream or cls._stream is not (
            BaseChatModel._stream
        )
        disabled = getattr(model, "_streaming_disabled", None)
        if not streams or (disabled is not None and disabled(**kwargs)):
            result = await self._acall_generate(plan, messages, run_manager)
            yield _as_chunk(result.generations[0].message)
            return
        if model.rate_limiter is not None:
            await model.rate_limiter.aacquire(blocking=True)
        if "_astream" in plan.facts.run_manager:
            kwargs["run_manager"] = run_manager
        chunks = model._astream(messages, stop=plan.stop, **kwargs)
        try:
            while True:
                with metered_here():
                    try:
                        chunk = await anext(chunks)
                    except StopAsyncIteration:
                        return
                yield chunk
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        plan = self._begin(messages, stop, kwargs)
        if plan is None:
            yield from self._delegate_stream(self._forward(stop, kwargs), messages, run_manager)
            return
        tally = _Tally()
        chunks = self._delegate_stream(plan, messages, run_manager)
        try:
            for chunk in chunks:
                if plan.final and not tally.chunks:
                    chunk.message.response_metadata["agentguard_final"] = True
                tally.add(chunk)
                yield chunk
        except GeneratorExit:
            # the consumer stopped reading: the provider has read the prompt and written what
            # was streamed, so the call is charged (estimated when no usage arrived)
            chunks.close()
            self._commit(plan, tally.reported(), tally.text, tally.model_name)
            raise
        except BaseException as exc:
            self._abort(plan, exc)
            raise
        self._commit(plan, tally.reported(), tally.text, tally.model_name)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        plan = await self._abegin(messages, stop, kwargs)
        if plan is None:
            forward = self._forward(stop, kwargs)
            async for chunk in self._adelegate_stream(forward, messages, run_manager):
                yield chunk
            return
        tally = _Tally()
        chunks = self._adelegate_stream(plan, messages, run_manager)
        try:
            async for chunk in chunks:
                if plan.final and not tally.chunks:
                    chunk.message.response_metadata["agentguard_final"] = True
                tally.add(chunk)
                yield chunk
        except (GeneratorExit, asyncio.CancelledError) as exc:
            await chunks.aclose()
            if tally.chunks:  # charged for what was streamed (see _stream)
                await self._acommit(plan, tally.reported(), tally.text, tally.model_name)
            else:
                await self._aabort(plan, exc)
            raise
        except BaseException as exc:
            await self._aabort(plan, exc)
            raise
        await self._acommit(plan, tally.reported(), tally.text, tally.model_name)


# LangChain reads ``inspect.signature(self._generate)`` (``_agenerate``) on every call, to know
# whether it takes ``run_manager``: ~20 µs from the code each time, ~6 µs from a signature the
# function carries (what ``inspect.signature`` returns first, ``__signature__``).
def _hold_signature(method: Callable[..., Any]) -> None:
    method.__signature__ = inspect.signature(method)  # type: ignore[attr-defined]


_hold_signature(BudgetedChatModel._generate)
_hold_signature(BudgetedChatModel._agenerate)
