"""LangChain callback handlers that meter any runnable and stop it at its budget.

A callback handler sees every run of a chain, an agent or a graph — model calls, tools,
retrievers, retries — without changing the user's code: pass it in ``config={"callbacks":
[handler]}`` (or to a model's constructor) and every call is charged to a task.

What a callback can and cannot do: it runs *before* a model call and can raise, so it can
refuse the call (``BudgetExceeded`` comes out of ``invoke`` / ``stream`` / ``batch``
unchanged); it cannot change the call. Decisions that need the call changed — a graceful
``finish`` (a last call without tools), a ``downgrade`` to a cheaper model, an output cap
smaller than the one the call runs with — or a tool to be skipped (``block``) cannot be
carried out here, so the handler stops the run with the decision's reason instead. Use the
middleware or the budget-aware chat model of this package for those.

Layout: :class:`_Meter` holds all the logic, each hook one generator of guard events;
:class:`AgentGuardCallbackHandler` drives them on the sync event API and
:class:`AsyncAgentGuardCallbackHandler` awaits the async twins (``astart_model_call``, ...),
both one-line shells over it.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from uuid import UUID

from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler

from agentguard import BudgetExceeded, InvalidUsage, current_task
from agentguard.adapter import NO_KW, Event, Steps, adrive, drive
from agentguard_langchain._common import already_metered, output_cap, usage_of

if TYPE_CHECKING:
    from langchain_core.documents import Document
    from langchain_core.messages import BaseMessage
    from langchain_core.outputs import LLMResult
    from tenacity import RetryCallState

    from agentguard import Decision, Guard, ModelCall, Spent, Task, ToolCall

__all__ = ["AgentGuardCallbackHandler", "AsyncAgentGuardCallbackHandler"]

_USE_WRAPPER = (
    "a callback handler can only let a call run as it was made, or stop it; use the "
    "agentguard LangChain middleware or the budget-aware chat model to carry this out"
)
_RETRY_TAG = "retry:attempt:"
# ``BudgetedChatModel`` marks its runs' metadata with this key (its ``METERED_METADATA_KEY``):
# it meters those calls itself, and its own run starts before it enters ``metered_here()``.
_METERED_KEY = "agentguard_metered"
_CAP_KEYS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
_MODEL_KEYS = ("model", "model_name", "model_id")


# -- pure helpers -----------------------------------------------------------------------------


def _model_of(metadata: Mapping[str, Any] | None, params: Mapping[str, Any] | None) -> str:
    """The model id of a call: ``ls_model_name``, else the request's ``model`` field."""
    if metadata:
        name = metadata.get("ls_model_name")
        if name:
            return str(name)
    if params:
        for key in _MODEL_KEYS:
            name = params.get(key)
            if name:
                return str(name)
    return "unknown"


def _cap_of(metadata: Mapping[str, Any] | None, params: Mapping[str, Any] | None) -> int | None:
    """The output cap the call runs with: the request's ``max_tokens`` (or the provider's
    name for it), else ``ls_max_tokens``; ``None`` when the call is uncapped (a cap below 1:
    ``-1`` is "as many as the model may" for some LangChain models)."""
    if params:
        for key in _CAP_KEYS:
            cap = params.get(key)
            if isinstance(cap, int) and not isinstance(cap, bool):
                return output_cap(cap)
    return output_cap(metadata.get("ls_max_tokens")) if metadata else None


def _retry_attempt(tags: Sequence[str] | None) -> int | None:
    """The attempt number ``RunnableRetry`` tags a retried run with (``retry:attempt:2``)."""
    if tags:
        for tag in tags:
            if tag.startswith(_RETRY_TAG):
                try:
                    return int(tag[len(_RETRY_TAG) :])
                except ValueError:
                    return None
    return None


def _usage_record(message: Any) -> Any:
    """The usage a message reports (a ``Usage``), or its raw record when malformed — the core
    then charges the call's bound and logs it instead of breaking the run — or ``None``."""
    try:
        return usage_of(message)
    except InvalidUsage:
        raw = getattr(message, "usage_metadata", None)
        if raw:
            return raw
        meta = getattr(message, "response_metadata", None) or {}
        return meta.get("token_usage") or meta.get("usage")


def _read_result(response: LLMResult | None) -> tuple[Any, str, str | None]:
    """(usage record or ``None``, generated text, model the provider reported) of a result.

    Usage comes from the first generation's message (``usage_metadata``, then provider shapes
    in ``response_metadata``; a stream's final chunk carries it into the merged message), else
    from ``llm_output["token_usage"]``. The text is only assembled when usage is missing.
    """
    usage: Any = None
    model: str | None = None
    if response is None:
        return None, "", None
    first = response.generations[:1]
    for gens in first:
        for gen in gens:
            msg = getattr(gen, "message", None)
            if msg is not None:
                if usage is None:
                    usage = _usage_record(msg)
                if model is None:
                    meta = msg.response_metadata
                    if meta:
                        reported = meta.get("model_name") or meta.get("model")
                        model = str(reported) if reported else None
    out = response.llm_output
    if out:
        if usage is None:
            usage = out.get("token_usage") or out.get("usage") or None
        if model is None and out.get("model_name"):
            model = str(out["model_name"])
    if usage is not None:
        return usage, "", model
    return None, "".join([gen.text for gens in first for gen in gens]), model


def _needs_change(d: Decision, cap: int | None) -> bool:
    """True when a model call's decision can only be carried out by changing the call: a
    graceful finish, a cheaper model, or an output cap below ``cap``, the one the call really
    runs with (``None``: uncapped or unknown, nothing to compare)."""
    if d.action in ("finish", "downgrade"):
        return True
    return (
        d.action == "allow" and cap is not None and d.max_tokens is not None and d.max_tokens < cap
    )


def _refusal(task: Task, d: Decision, cap: int | None, spent: Spent | None) -> BudgetExceeded:
    """The ``BudgetExceeded`` for a decision :func:`_needs_change` found (call released;
    ``spent``: the task's spend read after the release, for a ``downgrade``)."""
    if d.action == "finish":
        return BudgetExceeded.from_decision(
            d,
            task_id=task.id,
            why=f"a graceful finish cannot be made from a callback; {_USE_WRAPPER}",
            limit="max_cost_usd",
        )
    if d.action == "downgrade":
        return BudgetExceeded(
            "max_cost_usd",
            task.policy.max_cost_usd,
            spent.cost_usd if spent is not None else None,
            budget=d.budget,
            task_id=task.id,
            detail=f"{d.reason}; a callback cannot switch the model; {_USE_WRAPPER}",
        )
    assert cap is not None
    return task.refuse_capped_call(
        d,
        cap,
        f"a callback cannot lower the call's output cap: set max_tokens <= {d.max_tokens} on "
        "the model, or use the agentguard LangChain middleware or the budget-aware chat model",
    )


# -- shared state -----------------------------------------------------------------------------


class _Root:
    """The task a tree of runs charges: the user's current task, or one the handler opens
    (lazily, at the first charged event) for a root run and closes when that run ends."""

    __slots__ = ("named", "owned", "owners", "tags", "task", "task_id")

    def __init__(
        self,
        task: Task | None,
        task_id: str | None,
        tags: Mapping[str, str],
        *,
        owned: bool,
        named: bool,
    ) -> None:
        self.task = task
        self.task_id = task_id
        self.tags = tags
        self.owned = owned  # the handler opens and closes the task
        self.named = named  # a fixed task id shared by concurrent root runs
        self.owners: set[UUID] = set()  # root runs whose end may close the task


class _Runs:
    """Every handler of one guard shares these maps, so a handler attached twice (or two
    handlers of one guard on one run) registers each run once and charges it once."""

    __slots__ = ("__weakref__", "calls", "lock", "named", "retrievers", "runs", "tools")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.runs: dict[UUID, _Root] = {}  # every run seen -> the root it charges
        self.calls: dict[UUID, ModelCall] = {}
        self.tools: dict[UUID, ToolCall] = {}
        self.retrievers: dict[UUID, str] = {}
        self.named: dict[str, _Root] = {}


_STATES: weakref.WeakKeyDictionary[Guard, _Runs] = weakref.WeakKeyDictionary()
_STATES_LOCK = threading.Lock()


def _runs_of(guard: Guard) -> _Runs:
    with _STATES_LOCK:
        runs = _STATES.get(guard)
        if runs is None:
            runs = _STATES[guard] = _Runs()
        return runs


# -- the logic, shared by the sync and the async handler --------------------------------------


class _SpendReader:
    """``task.spent`` (a store read) as an event: ``spent()`` for the sync driver, ``aspent()``
    for the async one."""

    __slots__ = ("task",)

    def __init__(self, task: Task) -> None:
        self.task = task

    def spent(self) -> Spent:
        return self.task.spent

    def aspent(self) -> Awaitable[Spent]:
        return self.task.aspent()


class _Meter:
    """Translates LangChain run events into the guard's event API. Each hook is written once,
    as a generator of guard events (see :mod:`agentguard_langchain._drive`): the sync handler
    drives it on the sync events, the async handler awaits their async twins, so on a
    networked store (Redis) the async handler never blocks its event loop."""

    raise_error: bool = True  # a stop must reach the caller, not be logged and swallowed
    run_inline: bool = True  # in async runs: on the loop, in order, no thread-pool hop

    def __init__(
        self,
        guard: Guard,
        *,
        task_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        self.guard = guard
        self.task_id = task_id
        self.task_tags: dict[str, str] = dict(tags or {})
        for reserved in ("policy", "parent"):
            if reserved in self.task_tags:
                raise ValueError(f"tags[{reserved!r}]: {reserved!r} cannot be a tag name")
        self._runs = _runs_of(guard)

    # -- runs and tasks --------------------------------------------------------------------

    def _enter(self, run_id: UUID, parent_run_id: UUID | None) -> _Root | None:
        """Register a run under its root; ``None`` if it is already registered (this run is
        seen by a second handler of the same guard)."""
        st = self._runs
        with st.lock:
            if run_id in st.runs:
                return None
            root = st.runs.get(parent_run_id) if parent_run_id is not None else None
            if root is None:  # a root run, or one whose parent this handler never saw
                root = self._new_root(run_id)
                root.owners.add(run_id)
            st.runs[run_id] = root
            return root

    def _new_root(self, run_id: UUID) -> _Root:
        """Called with the lock held."""
        cur = current_task()
        if cur is not None and cur.guard is self.guard and cur.ended is None:
            return _Root(cur, None, {}, owned=False, named=False)
        if self.task_id is None:
            return _Root(None, str(run_id), self.task_tags, owned=True, named=False)
        named = self._runs.named
        root = named.get(self.task_id)
        if root is None:
            root = named[self.task_id] = _Root(
                None, self.task_id, self.task_tags, owned=True, named=True
            )
        return root

    def _task_for(self, root: _Root) -> Steps[Task]:
        """The task to charge: the current task of this guard, else the root's (opened now
        if this is its first charged event)."""
        cur = current_task()
        if cur is not None and cur.guard is self.guard and cur.ended is None:
            return cur
        task = root.task
        if task is None:
            # opened outside the lock (the async handler awaits the store); if a concurrent
            # event opened the root's task first, that one is charged and this one is dropped
            # unused (nothing reserved or charged on it, no record written)
            opened = yield (self.guard, "open_task", (root.task_id,), dict(root.tags))
            if not root.named:  # named by its run id, which nothing names again: the embedded
                opened._retires = True  # store lets its line go when it closes (Task._retire)
            with self._runs.lock:
                task = root.task
                if task is None:
                    task = root.task = opened
        return task

    def _forget(self, run_id: UUID) -> Task | None:
        """A run ended: forget it; the task to close if its root's last root run ended."""
        st = self._runs
        with st.lock:
            root = st.runs.pop(run_id, None)
            if root is None or run_id not in root.owners:
                return None
            root.owners.discard(run_id)
            if root.owners:
                return None
            task, root.task = root.task, None
            if root.named and st.named.get(root.task_id or "") is root:
                del st.named[root.task_id or ""]
        return task if root.owned else None

    def _leave(self, run_id: UUID, error: BaseException | None) -> Steps[None]:
        """A run ended: forget it; close its root's task if it was the last root run."""
        task = self._forget(run_id)
        if task is not None:
            yield (task, "close", (error,), NO_KW)

    def _register(
        self, run_id: UUID, parent_run_id: UUID | None, tags: Any
    ) -> tuple[_Root | None, int]:
        """Register a run: its root (``None``: nothing to charge) and, for a ``RunnableRetry``
        attempt to record, its number (else 0)."""
        root = self._enter(run_id, parent_run_id)
        if root is None or not tags:
            return root, 0
        attempt = _retry_attempt(tags)
        if attempt is not None and attempt > 1 and not already_metered():
            return root, attempt
        return root, 0

    def _attempt(self, run_id: UUID, root: _Root, attempt: int) -> Steps[None]:
        """Record a ``RunnableRetry`` attempt (raises past ``max_retries``)."""
        try:
            task = yield from self._task_for(root)
            yield (task, "record_retry", (f"attempt {attempt}",), NO_KW)
        except BaseException as exc:  # no end event follows a failed start
            yield from self._leave(run_id, exc)
            raise

    def _started(self, run_id: UUID, parent_run_id: UUID | None, tags: Any) -> Steps[_Root | None]:
        """Register a run; record a ``RunnableRetry`` attempt. ``None``: nothing to charge."""
        root, attempt = self._register(run_id, parent_run_id, tags)
        if attempt:
            assert root is not None
            yield from self._attempt(run_id, root, attempt)
        return root

    # -- model calls -----------------------------------------------------------------------

    def _model_start(
        self,
        run_id: UUID,
        parent_run_id: UUID | None,
        tags: Any,
        metadata: Mapping[str, Any] | None,
        params: Mapping[str, Any] | None,
        messages: Sequence[Any],
    ) -> Steps[None]:
        root = yield from self._started(run_id, parent_run_id, tags)
        if root is None or already_metered() or (metadata and metadata.get(_METERED_KEY)):
            return
        try:
            model = _model_of(metadata, params)
            cap = _cap_of(metadata, params)
            tools = params.get("tools") if params else None
            task = yield from self._task_for(root)
            # the reservation is the last step that can raise: LangChain sends no
            # on_llm_error for a start that raised, so nothing after it may fail unhandled
            # the message objects themselves: the counter keeps each one's count, so an
            # agent's history is read once, not on every call
            call = yield (
                task,
                "start_model_call",
                (model,),
                {"messages": messages, "tools": tools, "max_tokens": cap},
            )
            if _needs_change(call.decision, cap):
                yield (call, "fail", (), NO_KW)
                spent = None
                if call.decision.action == "downgrade":
                    spent = yield (_SpendReader(task), "spent", (), NO_KW)
                raise _refusal(task, call.decision, cap, spent)
            with self._runs.lock:
                self._runs.calls[run_id] = call
        except BaseException as exc:
            yield from self._leave(run_id, exc)
            raise

    # An ending hook makes at most one event (end or fail the call or tool), then forgets the
    # run and closes its root's task: no generator on this hot path, but a pure part choosing
    # the event (``_model_ended``...) and a sync and an async shell making it
    # (``_finish`` / ``_afinish``).

    def _finish(
        self,
        run_id: UUID,
        error: BaseException | None,
        ending: Callable[..., Event | None],
        *args: Any,
    ) -> None:
        try:
            event = ending(run_id, *args)
            if event is not None:
                target, name, eargs, kwargs = event
                getattr(target, name)(*eargs, **kwargs)
        finally:
            if (task := self._forget(run_id)) is not None:
                task.close(error)

    async def _afinish(
        self,
        run_id: UUID,
        error: BaseException | None,
        ending: Callable[..., Event | None],
        *args: Any,
    ) -> None:
        try:
            event = ending(run_id, *args)
            if event is not None:
                target, name, eargs, kwargs = event
                await getattr(target, "a" + name)(*eargs, **kwargs)
        finally:
            if (task := self._forget(run_id)) is not None:
                await task.aclose(error)

    def _model_ended(self, run_id: UUID, response: LLMResult) -> Event | None:
        with self._runs.lock:
            call = self._runs.calls.pop(run_id, None)
        if call is None:
            return None
        usage, text, model = _read_result(response)
        return (
            call,
            "end",
            (usage,),
            {"output_text": text if usage is None else None, "model": model},
        )

    def _model_failed(self, run_id: UUID, error: BaseException, response: Any) -> Event | None:
        with self._runs.lock:
            call = self._runs.calls.pop(run_id, None)
        if call is None:
            return None
        usage, text, model = _read_result(response if _has_output(response) else None)
        if usage is None and not text:
            return (call, "fail", (error,), NO_KW)
        # a stream cut off part-way: what was generated is billed
        call.span.attrs["interrupted"] = type(error).__name__
        return (
            call,
            "end",
            (usage,),
            {"output_text": text if usage is None else None, "model": model},
        )

    # -- tools, retrievers, retries --------------------------------------------------------

    def _tool_start(
        self,
        run_id: UUID,
        parent_run_id: UUID | None,
        tags: Any,
        serialized: Mapping[str, Any] | None,
        kwargs: Mapping[str, Any],
    ) -> Steps[None]:
        root = yield from self._started(run_id, parent_run_id, tags)
        if root is None or already_metered():
            return
        try:
            name = str((serialized or {}).get("name") or kwargs.get("name") or "tool")
            task = yield from self._task_for(root)
            tool = yield (task, "start_tool_call", (name,), NO_KW)
            if not tool.allowed:  # "block": a callback cannot skip the tool
                raise BudgetExceeded.from_decision(
                    tool.decision,
                    task_id=task.id,
                    why=f"a callback cannot skip a tool; {_USE_WRAPPER}",
                    limit="max_cost_usd",
                )
            with self._runs.lock:
                self._runs.tools[run_id] = tool
        except BaseException as exc:
            yield from self._leave(run_id, exc)
            raise

    def _tool_ended(self, run_id: UUID, error: BaseException | None) -> Event | None:
        with self._runs.lock:
            tool = self._runs.tools.pop(run_id, None)
        if tool is None:
            return None
        return (tool, "end", (), NO_KW) if error is None else (tool, "fail", (error,), NO_KW)

    def _retriever_start(
        self, run_id: UUID, parent_run_id: UUID | None, tags: Any, kwargs: Mapping[str, Any]
    ) -> Steps[None]:
        root = yield from self._started(run_id, parent_run_id, tags)
        if root is None or already_metered():
            return
        with self._runs.lock:
            self._runs.retrievers[run_id] = str(kwargs.get("name") or "retriever")

    def _retriever_end(self, run_id: UUID, documents: Sequence[Document] | None) -> Steps[None]:
        with self._runs.lock:
            name = self._runs.retrievers.pop(run_id, None)
            root = self._runs.runs.get(run_id)
        try:
            if name is not None and root is not None and documents is not None:
                task = yield from self._task_for(root)
                # no store operation: the documents and their tokens go to the trace only
                task.record_retrieval(
                    name,
                    documents=len(documents),
                    texts=[d.page_content for d in documents],
                )
        finally:
            yield from self._leave(run_id, None)

    def _retry(self, run_id: UUID, parent_run_id: UUID | None, retry_state: Any) -> Steps[None]:
        """``on_retry`` (sent by LLM integrations' own retry loops)."""
        if already_metered():
            return
        with self._runs.lock:
            root = self._runs.runs.get(run_id)
            if root is None and parent_run_id is not None:
                root = self._runs.runs.get(parent_run_id)
        if root is None:
            return
        reason = "retry"
        outcome = getattr(retry_state, "outcome", None)
        if outcome is not None and outcome.failed:
            reason = f"retry after {type(outcome.exception()).__name__}"
        task = yield from self._task_for(root)
        yield (task, "record_retry", (reason,), NO_KW)


def _has_output(response: Any) -> bool:
    """True when an error's partial result holds generated text or usage (a stream that
    was cut off part-way), not just the provider's error details."""
    gens = getattr(response, "generations", None)
    if not gens:
        return False
    for gen in gens[0]:
        msg = getattr(gen, "message", None)
        if gen.text or (msg is not None and getattr(msg, "usage_metadata", None)):
            return True
    return False


# -- the handlers -----------------------------------------------------------------------------


class AgentGuardCallbackHandler(_Meter, BaseCallbackHandler):
    """Meters every model call, tool, retry and retrieval of a LangChain run against a
    guard, and stops the run with :class:`agentguard.BudgetExceeded` at its budget.

    Attach it per call (``config={"callbacks": [handler]}``, inherited by every nested
    runnable, LangGraph node, tool and sub-chain) or on a model (``callbacks=[handler]``).
    The same instance serves sync and async runs: it is ``run_inline``, so in ``ainvoke`` /
    ``astream`` LangChain calls it on the event loop, in order, without a thread-pool hop.

    Which task is charged: the current task (``with guard.task(...)``) when there is one;
    otherwise the handler opens a task for each root run — named ``task_id`` (runs in flight
    together with one ``task_id`` share one task) or the run id, with ``tags`` — and closes it
    when the root run ends or fails. A run's descendants charge its task even when their
    events arrive on other threads.

    What it can enforce: before a model call it reserves the call's worst case and raises
    ``BudgetExceeded`` if the budget is spent; the error comes out of ``invoke`` / ``stream``
    / ``batch`` unchanged. It cannot change a call, so a decision that needs one — a
    graceful ``finish``, a ``downgrade``, an output cap below the cap the call runs with —
    and a tool ``block`` also raise ``BudgetExceeded`` (with the decision's reason). For
    graceful finishes, downgrades and bound output caps use the middleware or the
    budget-aware chat model of this package. Give models a ``max_tokens``: an uncapped call
    reserves everything it could spend, and may still write past its reservation (the span
    is then flagged ``over_reservation``).

    Calls made inside :func:`agentguard_langchain._common.metered_here` (the middleware and the
    chat model wrapper) are left to them, and a run seen by two handlers of one guard is
    charged once. No prompt or completion text is kept.

    Args:
        guard: the guard whose budgets are charged.
        task_id: the id of the tasks opened for root runs (default: the root run's id).
        tags: attribution tags of those tasks (``team="cx"``, ``feature="search"``).

    Example:
        >>> import agentguard as ag
        >>> from agentguard_langchain import AgentGuardCallbackHandler
        >>> from agentguard_langchain.testing import ScriptedChatModel
        >>> guard = ag.Guard(ag.Policy(max_cost_usd="0.01"), traces=False)
        >>> handler = AgentGuardCallbackHandler(guard)
        >>> model = ScriptedChatModel(replies=["Refund approved."], max_tokens=100)
        >>> with guard.task("ticket-42") as task:
        ...     reply = model.invoke("Where is my parcel?", config={"callbacks": [handler]})
        >>> task.model_calls, task.usage.output_tokens == reply.usage_metadata["output_tokens"]
        (1, True)
    """

    def __init__(
        self,
        guard: Guard,
        *,
        task_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        _Meter.__init__(self, guard, task_id=task_id, tags=tags)

    def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Reserve the call's worst case; raise ``BudgetExceeded`` to refuse it."""
        drive(
            self._model_start(
                run_id, parent_run_id, tags, metadata, kwargs.get("invocation_params"), messages[0]
            )
        )

    def on_llm_start(
        self,
        serialized: dict[str, Any],
        prompts: list[str],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """A text-completion model call: as :meth:`on_chat_model_start`."""
        drive(
            self._model_start(
                run_id, parent_run_id, tags, metadata, kwargs.get("invocation_params"), prompts[:1]
            )
        )

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        """Charge the reported usage (estimated and marked when the provider sent none)."""
        self._finish(run_id, None, self._model_ended, response)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Release the reservation (charge the part of a stream that was generated)."""
        self._finish(run_id, error, self._model_failed, error, kwargs.get("response"))

    def on_chain_start(
        self,
        serialized: dict[str, Any],
        inputs: dict[str, Any],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Track the run tree (and ``RunnableRetry`` attempts)."""
        root, attempt = self._register(run_id, parent_run_id, tags)  # no generator per chain
        if attempt:
            assert root is not None
            drive(self._attempt(run_id, root, attempt))

    def on_chain_end(self, outputs: dict[str, Any], *, run_id: UUID, **kwargs: Any) -> None:
        """Close the task of a root run."""
        if (task := self._forget(run_id)) is not None:  # no generator per chain
            task.close()

    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Close the task of a root run, recording the error."""
        if (task := self._forget(run_id)) is not None:
            task.close(error)

    def on_tool_start(
        self,
        serialized: dict[str, Any],
        input_str: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        inputs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Count the tool against the caps; raise ``BudgetExceeded`` at a cap."""
        drive(self._tool_start(run_id, parent_run_id, tags, serialized, kwargs))

    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        """Close the tool's span."""
        self._finish(run_id, None, self._tool_ended, None)

    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Close the tool's span as failed."""
        self._finish(run_id, error, self._tool_ended, error)

    def on_retriever_start(
        self,
        serialized: dict[str, Any],
        query: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Track the retriever run."""
        drive(self._retriever_start(run_id, parent_run_id, tags, kwargs))

    def on_retriever_end(
        self, documents: Sequence[Document], *, run_id: UUID, **kwargs: Any
    ) -> None:
        """Record the documents retrieved and their tokens (not their text)."""
        drive(self._retriever_end(run_id, documents))

    def on_retriever_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Forget the retriever run."""
        drive(self._retriever_end(run_id, None))

    def on_retry(
        self,
        retry_state: RetryCallState,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        """Count a retry; raise ``BudgetExceeded`` past ``max_retries``."""
        drive(self._retry(run_id, parent_run_id, retry_state))


class AsyncAgentGuardCallbackHandler(_Meter, AsyncCallbackHandler):
    """:class:`AgentGuardCallbackHandler` as an ``AsyncCallbackHandler``, for async runs.

    Same behaviour, decisions and arguments; its hooks await the guard's async events
    (``astart_model_call``, ``aend``, ``aclose``...), so on a networked budget store
    (``RedisStore``) an async app's event loop never waits on a store round trip — the sync
    handler, which serves async runs inline, calls the store synchronously on the loop. Use
    this class for async runs only: in a *sync* run LangChain runs an async handler's
    coroutines in a throwaway event loop and logs and swallows what they raise, so it could
    not stop a sync run.

    Example:
        >>> import asyncio
        >>> import agentguard as ag
        >>> from agentguard_langchain import AsyncAgentGuardCallbackHandler
        >>> from agentguard_langchain.testing import ScriptedChatModel
        >>> guard = ag.Guard(traces=False)
        >>> handler = AsyncAgentGuardCallbackHandler(guard)
        >>> model = ScriptedChatModel(replies=["Refund approved."])
        >>> async def main() -> int:
        ...     async with guard.task("ticket-42") as task:
        ...         await model.ainvoke("Where is my parcel?", config={"callbacks": [handler]})
        ...     return task.model_calls
        >>> asyncio.run(main())
        1
    """

    def __init__(
        self,
        guard: Guard,
        *,
        task_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        _Meter.__init__(self, guard, task_id=task_id, tags=tags)

    async def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Reserve the call's worst case; raise ``BudgetExceeded`` to refuse it."""
        await adrive(
            self._model_start(
                run_id, parent_run_id, tags, metadata, kwargs.get("invocation_params"), messages[0]
            )
        )

    async def on_llm_start(
        self,
        serialized: dict[str, Any],
        prompts: list[str],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """A text-completion model call: as :meth:`on_chat_model_start`."""
        await adrive(
            self._model_start(
                run_id, parent_run_id, tags, metadata, kwargs.get("invocation_params"), prompts[:1]
            )
        )

    async def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        """Charge the reported usage (estimated and marked when the provider sent none)."""
        await self._afinish(run_id, None, self._model_ended, response)

    async def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Release the reservation (charge the part of a stream that was generated)."""
        await self._afinish(run_id, error, self._model_failed, error, kwargs.get("response"))

    async def on_chain_start(
        self,
        serialized: dict[str, Any],
        inputs: dict[str, Any],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Track the run tree (and ``RunnableRetry`` attempts)."""
        root, attempt = self._register(run_id, parent_run_id, tags)
        if attempt:
            assert root is not None
            await adrive(self._attempt(run_id, root, attempt))

    async def on_chain_end(self, outputs: dict[str, Any], *, run_id: UUID, **kwargs: Any) -> None:
        """Close the task of a root run."""
        if (task := self._forget(run_id)) is not None:
            await task.aclose()

    async def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Close the task of a root run, recording the error."""
        if (task := self._forget(run_id)) is not None:
            await task.aclose(error)

    async def on_tool_start(
        self,
        serialized: dict[str, Any],
        input_str: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        inputs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Count the tool against the caps; raise ``BudgetExceeded`` at a cap."""
        await adrive(self._tool_start(run_id, parent_run_id, tags, serialized, kwargs))

    async def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        """Close the tool's span."""
        await self._afinish(run_id, None, self._tool_ended, None)

    async def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Close the tool's span as failed."""
        await self._afinish(run_id, error, self._tool_ended, error)

    async def on_retriever_start(
        self,
        serialized: dict[str, Any],
        query: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Track the retriever run."""
        await adrive(self._retriever_start(run_id, parent_run_id, tags, kwargs))

    async def on_retriever_end(
        self, documents: Sequence[Document], *, run_id: UUID, **kwargs: Any
    ) -> None:
        """Record the documents retrieved and their tokens (not their text)."""
        await adrive(self._retriever_end(run_id, documents))

    async def on_retriever_error(
        self, error: BaseException, *, run_id: UUID, **kwargs: Any
    ) -> None:
        """Forget the retriever run."""
        await adrive(self._retriever_end(run_id, None))

    async def on_retry(
        self,
        retry_state: RetryCallState,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        """Count a retry; raise ``BudgetExceeded`` past ``max_retries``."""
        await adrive(self._retry(run_id, parent_run_id, retry_state))
