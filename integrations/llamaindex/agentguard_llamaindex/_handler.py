"""Metering through LlamaIndex's instrumentation module: one event handler and one span handler
over a shared, synchronous :class:`_Meter`.

:func:`instrument` attaches both to the root dispatcher (or a given one). From then on every
LLM chat and completion (streams included), embedding, agent tool call, agent step and
retrieval is charged to a task:

* the current task (``with guard.task(...)``) when there is one;
* otherwise a task opened for the root span of the run (an agent's ``run``, a query engine's
  ``query``, a bare ``llm.chat``) at its first charged event, and closed when that span and
  its last stream have ended.

What a handler cannot do: LlamaIndex's dispatcher swallows every exception raised in a handler,
so a handler can meter a call but never stop or change it. A stop the guard decides here is
kept and raised where exceptions do reach the caller — the budget-aware LLM
(:class:`~agentguard_llamaindex.BudgetedLLM`) or the :class:`BudgetRateLimiter` on the user's
own LLM — and a call that goes ahead anyway is still charged (span attr ``unreserved``).
Calls made through the budget-aware LLM are metered by it and skipped here.

Layout: the handlers are thin shells over :class:`_Meter`; all state sits in its maps under
one lock, so one meter serves many threads and event loops at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.instrumentation.span import SimpleSpan, active_span_id
from llama_index.core.instrumentation.span_handlers import BaseSpanHandler
from llama_index.core.rate_limiter import BaseRateLimiter
from llama_index_instrumentation import get_dispatcher
from llama_index_instrumentation.dispatcher import Dispatcher
from pydantic import PrivateAttr

from agentguard import AgentGuardError, BudgetExceeded, Usage, counter_for, current_task
from agentguard_llamaindex._common import (
    already_metered,
    defer_stop,
    model_of_payload,
    output_text,
    parsed_or_raw,
    pop_deferred_stop,
    usage_of,
)

if TYPE_CHECKING:
    import inspect

    from agentguard import Decision, Guard, ModelCall, Task, ToolCall

__all__ = [
    "AgentGuardEventHandler",
    "AgentGuardSpanHandler",
    "BudgetRateLimiter",
    "Instrumentation",
    "instrument",
]

_log = logging.getLogger("agentguard")
_USE_WRAPPER = (
    "an instrumentation handler can only let a call run as it was made; use "
    "agentguard_llamaindex.BudgetedLLM to carry this out"
)
_TOOL_METHODS = frozenset({"call", "acall"})
# an agent iteration ends when its model output is parsed (after the call, before its tools):
# like the LangGraph adapter's route, a step is counted after each model call
_STEP_METHODS = frozenset({"parse_agent_output"})
_AGENT_STEP_PREFIXES = ("BaseWorkflowAgent.", "AgentWorkflow.")


class _Root:
    """The task a root span's tree charges when no task is current."""

    __slots__ = ("ended", "open", "owned", "task")

    def __init__(self) -> None:
        self.task: Task | None = None
        self.owned = False
        self.ended = False  # the root span has exited (or was dropped)
        self.open = 0  # model calls (streams) still open under it


class _Rec:
    """One open span: its root, and whether it is (or runs inside) an LLM call or a tool."""

    __slots__ = ("in_llm", "in_tool", "llm", "root", "top")

    def __init__(self, root: _Root, in_llm: bool, in_tool: bool, *, top: bool = False) -> None:
        self.root = root
        self.top = top  # the root span itself
        self.llm = False
        self.in_llm = in_llm
        self.in_tool = in_tool


class _Call:
    """A model call between its start event and its end (or exception) event."""

    __slots__ = ("call", "last", "root", "usage")

    def __init__(self, call: ModelCall, root: _Root | None) -> None:
        self.call = call
        self.root = root
        self.usage: Any = None
        self.last: Any = None


def _is_tool(instance: Any) -> bool:
    from llama_index.core.tools import BaseTool

    return isinstance(instance, BaseTool) and not getattr(instance, "_agentguard_meters", False)


def _is_agent_step(span_id: str, instance: Any) -> bool:
    """A workflow agent's step: its span is named after the defining class (the step runs as
    a plain function, without ``instance``) or carries the agent as its instance."""
    if span_id.startswith(_AGENT_STEP_PREFIXES):
        return True
    from llama_index.core.agent.workflow import AgentWorkflow, BaseWorkflowAgent

    return isinstance(instance, BaseWorkflowAgent | AgentWorkflow)


def _method(span_id: str) -> str:
    return span_id.split("-", 1)[0].rsplit(".", 1)[-1]


def _refusal(task: Task, d: Decision, why: str) -> BudgetExceeded:
    return BudgetExceeded.from_decision(d, task_id=task.id, why=why, limit="max_cost_usd")


class _Meter:
    """Translates instrumentation events and spans into the guard's event API."""

    def __init__(self, guard: Guard, task_id: str | None, tags: Mapping[str, str]) -> None:
        for reserved in ("policy", "parent"):
            if reserved in tags:
                raise ValueError(f"tags[{reserved!r}]: {reserved!r} cannot be a tag name")
        self.guard = guard
        self.task_id = task_id
        self.tags = dict(tags)
        self.lock = threading.Lock()
        self.spans: dict[str, _Rec] = {}
        self.calls: dict[str, _Call | None] = {}  # None: metered elsewhere, skip its events
        self.tools: dict[str, ToolCall] = {}
        self.embeddings: dict[str, str] = {}
        self.refused: dict[str, BudgetExceeded] = {}
        self._events: dict[type, Any] | None = None

    # -- tasks ------------------------------------------------------------------------------

    def task_of(self, rec: _Rec | None) -> tuple[Task, _Root | None]:
        """The task an event under ``rec`` charges (opening the root's task if needed)."""
        cur = current_task()
        if cur is not None and cur.guard is self.guard:
            return cur, None
        root = rec.root if rec is not None else _Root()
        with self.lock:
            task = root.task
            if task is None:
                open_task: Any = self.guard.open_task  # tags are plain **kwargs
                task = root.task = open_task(self.task_id, **self.tags)
                root.owned = True
                if rec is None:
                    root.ended = True  # no span to wait for: closes with its last call
        return task, root

    def task_for_active_span(self) -> Task | None:
        """The task of the active span's root, for the budget-aware LLM (``None``: unknown)."""
        sid = active_span_id.get()
        rec = self.spans.get(sid) if sid is not None else None
        if rec is None:
            return None
        return self.task_of(rec)[0]

    def _settle(self, root: _Root | None, *, call_ended: bool) -> None:
        """Close an owned root task once its span and its last open call have ended."""
        if root is None:
            return
        with self.lock:
            if call_ended:
                root.open -= 1
            done = root.owned and root.ended and root.open <= 0 and root.task is not None
            task = root.task if done else None
            if done:
                root.task = None
        if task is not None:
            task.close()

    # -- spans ------------------------------------------------------------------------------

    def span_enter(self, id_: str, instance: Any, parent_id: str | None) -> None:
        with self.lock:
            parent = self.spans.get(parent_id) if parent_id is not None else None
        if parent is None:
            rec = _Rec(_Root(), False, False, top=True)
        else:
            rec = _Rec(parent.root, parent.in_llm or parent.llm, parent.in_tool)
        method = _method(id_)
        if method in _TOOL_METHODS and not rec.in_tool and _is_tool(instance):
            rec.in_tool = True
            if not already_metered():
                self._tool_start(id_, rec, instance)
        elif method in _STEP_METHODS and _is_agent_step(id_, instance):
            self._step(rec, instance)
        with self.lock:
            self.spans[id_] = rec

    def span_exit(self, id_: str, err: BaseException | None) -> None:
        with self.lock:
            rec = self.spans.pop(id_, None)
            tool = self.tools.pop(id_, None)
            self.refused.pop(id_, None)
            call = self.calls.pop(id_, None) if err is not None else None
        if tool is not None:
            if err is None:
                tool.end()
            else:
                tool.fail(err)
        if call is not None:  # the call failed before any end event (or was refused)
            call.call.fail(err)
            self._settle(call.root, call_ended=True)
        if rec is not None and rec.top:
            # the root span: its task (if one was opened) closes now, or with its last stream
            rec.root.ended = True
            self._settle(rec.root, call_ended=False)

    def _tool_start(self, id_: str, rec: _Rec, instance: Any) -> None:
        task, _ = self.task_of(rec)
        name = instance.metadata.get_name()
        try:
            tool = task.start_tool_call(name)
        except BudgetExceeded as exc:
            defer_stop(task, exc)  # raised by the budget-aware LLM's next call
            return
        if tool.allowed:
            with self.lock:
                self.tools[id_] = tool

    def _step(self, rec: _Rec, instance: Any) -> None:
        task, _ = self.task_of(rec)
        if task.finished:  # the output parsed is the graceful final answer
            return
        name = getattr(instance, "name", None)
        try:
            d = task.step(name if isinstance(name, str) and name else "agent_step")
        except BudgetExceeded as exc:
            defer_stop(task, exc)
            return
        if d.action == "finish":
            from agentguard_llamaindex._llm import expect_final_call

            expect_final_call(task)

    # -- events -----------------------------------------------------------------------------

    def _handlers(self) -> dict[type, Any]:
        from llama_index.core.instrumentation.events.embedding import (
            EmbeddingEndEvent,
            EmbeddingStartEvent,
        )
        from llama_index.core.instrumentation.events.exception import ExceptionEvent
        from llama_index.core.instrumentation.events.llm import (
            LLMChatEndEvent,
            LLMChatInProgressEvent,
            LLMChatStartEvent,
            LLMCompletionEndEvent,
            LLMCompletionInProgressEvent,
            LLMCompletionStartEvent,
        )
        from llama_index.core.instrumentation.events.retrieval import RetrievalEndEvent

        return {
            LLMChatStartEvent: lambda e: self._start(
                e.span_id, e.model_dict, e.messages, e.additional_kwargs
            ),
            LLMCompletionStartEvent: lambda e: self._start(
                e.span_id, e.model_dict, [e.prompt], e.additional_kwargs
            ),
            LLMChatInProgressEvent: lambda e: self._progress(e.span_id, e.response),
            LLMCompletionInProgressEvent: lambda e: self._progress(e.span_id, e.response),
            LLMChatEndEvent: lambda e: self._end(e.span_id, e.response),
            LLMCompletionEndEvent: lambda e: self._end(e.span_id, e.response),
            ExceptionEvent: lambda e: self._exception(e.span_id, e.exception),
            EmbeddingStartEvent: lambda e: self._embedding_start(e.span_id, e.model_dict),
            EmbeddingEndEvent: lambda e: self._embedding_end(e.span_id, e.chunks),
            RetrievalEndEvent: lambda e: self._retrieval(e.span_id, e.nodes),
        }

    def handle(self, event: BaseEvent) -> None:
        handlers = self._events
        if handlers is None:
            handlers = self._events = self._handlers()
        fn = handlers.get(type(event))
        if fn is not None:
            fn(event)

    def _start(
        self,
        sid: str | None,
        model_dict: Mapping[str, Any],
        messages: Sequence[Any],
        kwargs: Mapping[str, Any],
    ) -> None:
        if sid is None:
            return
        with self.lock:
            rec = self.spans.get(sid)
        if already_metered() or (rec is not None and rec.in_llm):
            with self.lock:  # the wrapper meters it, or an LLM call inside another (chat->complete)
                self.calls[sid] = None
            return
        if rec is not None:
            rec.llm = True
        task, root = self.task_of(rec)
        model = model_of_payload(model_dict)
        cap = (
            kwargs.get("max_tokens") or model_dict.get("max_tokens") or model_dict.get("num_output")
        )
        cap = cap if isinstance(cap, int) and not isinstance(cap, bool) and cap > 0 else None
        tools = kwargs.get("tools") or None
        refusal: BudgetExceeded | None = None
        call: ModelCall | None = None
        try:
            call = task.start_model_call(model, messages=messages, tools=tools, max_tokens=cap)
            d = call.decision
            if d.action == "finish":
                refusal = _refusal(
                    task, d, f"a graceful finish needs the call changed; {_USE_WRAPPER}"
                )
            elif d.action == "downgrade":
                refusal = _refusal(task, d, f"a handler cannot switch the model; {_USE_WRAPPER}")
            elif cap is not None and d.max_tokens is not None and d.max_tokens < cap:
                refusal = _refusal(
                    task,
                    d,
                    f"the budget pays for {d.max_tokens} output tokens, the call may write {cap}; "
                    f"{_USE_WRAPPER}",
                )
        except BudgetExceeded as exc:
            refusal = exc
        except AgentGuardError as exc:  # an unpriced model under a cost limit
            refusal = BudgetExceeded("max_cost_usd", None, None, task_id=task.id, detail=str(exc))
        if call is None or call.done:
            counter = counter_for(model)
            call = task.start_unreserved_call(
                model,
                counter.count_messages(messages, tools),
                reason=str(refusal) if refusal is not None else "metered",
            )
        if refusal is not None:
            _log.warning("agentguard.unenforced task_id=%s model=%s: %s", task.id, model, refusal)
        with self.lock:
            self.calls[sid] = _Call(call, root)
            if refusal is not None:
                self.refused[sid] = refusal
            if root is not None:
                root.open += 1

    def _progress(self, sid: str | None, response: Any) -> None:
        c = self.calls.get(sid) if sid is not None else None
        if c is None:
            return
        c.last = response
        u = usage_of(response)
        if u:
            c.usage = u

    def _end(self, sid: str | None, response: Any) -> None:
        if sid is None:
            return
        with self.lock:
            c = self.calls.pop(sid, None)
            self.refused.pop(sid, None)
        if c is None:
            return
        usage = usage_of(response) if response is not None else None
        if usage is None:
            usage = c.usage
        src = response if response is not None else c.last
        self._commit(c, usage, src)

    def _commit(self, c: _Call, usage: Any, response: Any) -> None:
        reported = getattr(getattr(response, "raw", None), "model", None)
        try:
            c.call.end(
                parsed_or_raw(usage),
                output_text=output_text(response) if usage is None and response else None,
                model=reported if isinstance(reported, str) and reported else None,
            )
        finally:
            self._settle(c.root, call_ended=True)

    def _exception(self, sid: str | None, exc: BaseException) -> None:
        if sid is None:
            return
        with self.lock:
            c = self.calls.pop(sid, None)
            self.refused.pop(sid, None)
        if c is None:
            return
        if isinstance(exc, GeneratorExit | asyncio.CancelledError):
            # the consumer stopped reading: the prompt was read and the streamed part written
            self._commit(c, c.usage, c.last)
        else:
            c.call.fail(exc)
            self._settle(c.root, call_ended=True)

    def _embedding_start(self, sid: str | None, model_dict: Mapping[str, Any]) -> None:
        if sid is not None:
            with self.lock:
                self.embeddings[sid] = model_of_payload(model_dict)

    def _embedding_end(self, sid: str | None, chunks: Sequence[str]) -> None:
        if sid is None:
            return
        with self.lock:
            model = self.embeddings.pop(sid, None)
            rec = self.spans.get(sid)
        if model is None or not chunks:
            return
        task, root = self.task_of(rec)
        counter = counter_for(model)
        tokens = sum(counter.count(c) for c in chunks)
        # EmbeddingEndEvent carries no token counts: the input is counted here, marked estimated
        call = task.start_unreserved_call(model, tokens, reason="embedding (tokens estimated)")
        call.span.attrs["embedding"] = True
        call.span.attrs["chunks"] = len(chunks)
        call.end(Usage(tokens, 0, estimated=True))
        if root is not None:
            with self.lock:
                root.open += 1
            self._settle(root, call_ended=True)

    def _retrieval(self, sid: str | None, nodes: Sequence[Any]) -> None:
        with self.lock:
            rec = self.spans.get(sid) if sid is not None else None
        task, root = self.task_of(rec)
        texts = []
        for n in nodes:
            node = getattr(n, "node", n)
            get = getattr(node, "get_content", None)
            texts.append(get() if callable(get) else str(getattr(node, "text", "")))
        name = sid.split("-", 1)[0].split(".", 1)[0] if sid else "retriever"
        task.record_retrieval(name, documents=len(nodes), texts=texts)
        if root is not None:
            with self.lock:
                root.open += 1
            self._settle(root, call_ended=True)

    # -- the rate-limiter hook --------------------------------------------------------------

    def refusal_for_active_span(self) -> BudgetExceeded | None:
        sid = active_span_id.get()
        if sid is None:
            return None
        with self.lock:
            exc = self.refused.pop(sid, None)
            rec = self.spans.get(sid)
        if exc is not None:
            return exc
        cur = current_task()
        task = cur if cur is not None and cur.guard is self.guard else None
        if task is None and rec is not None:
            task = rec.root.task
        return pop_deferred_stop(task) if task is not None else None

    def close_all(self) -> None:
        """Close the tasks this meter opened and still holds (on detach)."""
        with self.lock:
            roots = {id(r.root): r.root for r in self.spans.values()}
            roots.update({id(c.root): c.root for c in self.calls.values() if c and c.root})
            tasks = [r.task for r in roots.values() if r.owned and r.task is not None]
            for r in roots.values():
                r.task = None
        for t in tasks:
            t.close()


# -- the handlers ---------------------------------------------------------------------------


class AgentGuardEventHandler(BaseEventHandler):
    """The event half of the instrumentation (LLM, embedding, retrieval events).

    Attach it with :func:`instrument`, which also attaches the span half; both share one
    meter. Events of LLM calls made through :class:`~agentguard_llamaindex.BudgetedLLM` are
    skipped (the wrapper meters them).
    """

    _meter: _Meter = PrivateAttr()

    def __init__(self, meter: _Meter) -> None:
        super().__init__()
        self._meter = meter

    @classmethod
    def class_name(cls) -> str:
        return "AgentGuardEventHandler"

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        self._meter.handle(event)


class AgentGuardSpanHandler(BaseSpanHandler[SimpleSpan]):
    """The span half of the instrumentation: runs and their roots, agent steps, tool calls.

    Keeps no spans of its own (``open_spans`` stays empty); the meter tracks what it needs.
    """

    _meter: _Meter = PrivateAttr()

    def __init__(self, meter: _Meter) -> None:
        super().__init__()
        self._meter = meter

    @classmethod
    def class_name(cls) -> str:
        return "AgentGuardSpanHandler"

    def span_enter(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        parent_id: str | None = None,
        tags: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._meter.span_enter(id_, instance, parent_id)

    def span_exit(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        result: Any | None = None,
        **kwargs: Any,
    ) -> None:
        self._meter.span_exit(id_, None)

    def span_drop(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        err: BaseException | None = None,
        **kwargs: Any,
    ) -> None:
        self._meter.span_exit(id_, err if err is not None else RuntimeError("span dropped"))

    def new_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        parent_span_id: str | None = None,
        tags: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> SimpleSpan | None:
        return None  # pragma: no cover - span_enter is overridden

    def prepare_to_exit_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        result: Any | None = None,
        **kwargs: Any,
    ) -> SimpleSpan | None:
        return None  # pragma: no cover - span_exit is overridden

    def prepare_to_drop_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        err: BaseException | None = None,
        **kwargs: Any,
    ) -> SimpleSpan | None:
        return None  # pragma: no cover - span_drop is overridden


class Instrumentation:
    """The handlers :func:`instrument` attached for a guard to a dispatcher."""

    def __init__(self, guard: Guard, dispatcher: Dispatcher, meter: _Meter) -> None:
        self.guard = guard
        self.dispatcher = dispatcher
        self._meter = meter
        self.event_handler = AgentGuardEventHandler(meter)
        self.span_handler = AgentGuardSpanHandler(meter)
        self.attached = False

    def rate_limiter(self, inner: BaseRateLimiter | None = None) -> BudgetRateLimiter:
        """A :class:`BudgetRateLimiter` raising this instrumentation's stops (see there)."""
        return BudgetRateLimiter(self, inner)

    def detach(self) -> None:
        """Remove both handlers from the dispatcher and close the tasks they opened.
        Detaching twice does nothing."""
        with _REGISTRY_LOCK:
            if not self.attached:
                return
            d = self.dispatcher
            d.event_handlers = [h for h in d.event_handlers if h is not self.event_handler]
            d.span_handlers = [h for h in d.span_handlers if h is not self.span_handler]
            self.attached = False
            _REGISTRY.pop((self.guard, d.name), None)
            metas = _METERS.get(self.guard)
            if metas is not None and self._meter in metas:
                metas.remove(self._meter)
        self._meter.close_all()

    def __enter__(self) -> Instrumentation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


_REGISTRY: dict[tuple[Guard, str], Instrumentation] = {}
_METERS: weakref.WeakKeyDictionary[Guard, list[_Meter]] = weakref.WeakKeyDictionary()
_REGISTRY_LOCK = threading.Lock()


def instrument(
    guard: Guard,
    dispatcher: Dispatcher | None = None,
    *,
    task_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> Instrumentation:
    """Meter every LlamaIndex LLM call, embedding, agent tool call and step, and retrieval
    seen by ``dispatcher`` (the root dispatcher by default) into ``guard``'s tasks.

    Idempotent: instrumenting the same guard and dispatcher again returns the attached
    :class:`Instrumentation`. ``task_id`` and ``tags`` name the tasks opened for root spans
    run outside any ``guard.task(...)``. Use it as a context manager, or call
    :meth:`Instrumentation.detach`, to remove the handlers.

    Example:
        >>> import agentguard as ag
        >>> from agentguard_llamaindex import instrument
        >>> from llama_index.core.llms import MockLLM
        >>> guard = ag.Guard(traces=False)
        >>> with instrument(guard) as inst, guard.task("t1") as task:
        ...     _ = MockLLM(max_tokens=5).complete("Hello there")
        >>> task.model_calls, task.usage.output_tokens, task.usage.estimated
        (1, 5, True)
        >>> instrument(guard) is inst, inst.attached
        (False, False)
    """
    d = dispatcher if dispatcher is not None else get_dispatcher()
    with _REGISTRY_LOCK:
        existing = _REGISTRY.get((guard, d.name))
        if existing is not None and existing.attached and existing.dispatcher is d:
            return existing
        meter = _Meter(guard, task_id, tags or {})
        inst = Instrumentation(guard, d, meter)
        d.add_event_handler(inst.event_handler)
        d.add_span_handler(inst.span_handler)
        inst.attached = True
        _REGISTRY[(guard, d.name)] = inst
        _METERS.setdefault(guard, []).append(meter)
    return inst


def task_for_active_span(guard: Guard) -> Task | None:
    """The task an instrumentation of ``guard`` attributes the active span to, if any."""
    for meter in _METERS.get(guard, ()):
        task = meter.task_for_active_span()
        if task is not None:
            return task
    return None


class BudgetRateLimiter(BaseRateLimiter):
    """Enforcement for users who keep their own LLM: set it as the LLM's ``rate_limiter``.

    LlamaIndex calls ``acquire`` / ``async_acquire`` after the LLM's start event (where the
    instrumentation decided the call) and just before the provider is called; an exception
    raised there reaches the caller. This limiter raises the stop decided for the call — or a
    :class:`~agentguard.BudgetExceeded` for a decision a handler cannot carry out (a graceful
    finish, a cheaper model, a smaller output cap) and for a stop deferred from a step or a
    tool — then defers to ``inner``, the user's own rate limiter, if any.

    Example:
        >>> import agentguard as ag
        >>> from agentguard_llamaindex import instrument
        >>> from llama_index.core.llms import MockLLM
        >>> guard = ag.Guard(ag.Policy(max_model_calls=1), traces=False)
        >>> with instrument(guard) as inst, guard.task("t1"):
        ...     llm = MockLLM(max_tokens=3)
        ...     llm.rate_limiter = inst.rate_limiter()
        ...     _ = llm.complete("first")
        ...     try:
        ...         llm.complete("second")
        ...     except ag.BudgetExceeded as exc:
        ...         print(exc.limit)
        max_model_calls
    """

    def __init__(self, instrumentation: Instrumentation, inner: BaseRateLimiter | None = None):
        self.instrumentation = instrumentation
        self.inner = inner

    def _check(self) -> None:
        exc = self.instrumentation._meter.refusal_for_active_span()
        if exc is not None:
            raise exc

    def acquire(self, num_tokens: int = 0) -> None:
        self._check()
        if self.inner is not None:
            self.inner.acquire(num_tokens)

    async def async_acquire(self, num_tokens: int = 0) -> None:
        self._check()
        if self.inner is not None:
            await self.inner.async_acquire(num_tokens)
