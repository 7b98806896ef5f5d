"""``GraphGuard``: agentguard inside hand-written LangGraph ``StateGraph``s and prebuilt agents.

The graph guard translates graph events into the task's event API and the guard's decisions
into graph actions; it holds no budget arithmetic of its own:

==========================  ================================================================
guard decision              what the graph does
==========================  ================================================================
``allow`` / ``downgrade``   :meth:`GraphGuard.route` answers ``"continue"`` / ``"downgrade"``;
                            the model (a :class:`~agentguard_langchain.BudgetedChatModel`)
                            binds the output cap and calls the ladder's rung
``finish``                  ``"finish"`` at a step cap (the finishing node makes one last,
                            capped, tool-less call); at a money ceiling the model call itself
                            becomes that final answer
``block`` (tool)            the tool does not run; the model gets an error ``ToolMessage``
``stop``                    ``BudgetExceeded`` propagates (``exit_behavior="error"``), or the
                            route answers ``"stop"`` / the node ends the run with a message
                            saying why (``"end"``)
==========================  ================================================================

Decisions are taken in conditional edges and node wrappers, never in extra nodes: an extra
node costs a superstep.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import threading
import weakref
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, cast

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda
from langchain_core.runnables.config import var_child_runnable_config as _child_config
from langchain_core.utils.function_calling import convert_to_openai_tool
from langgraph.graph import END
from langgraph.prebuilt import ToolNode
from langgraph.types import Command
from typing_extensions import TypedDict  # the one LangGraph's own state schemas use

from agentguard import BudgetExceeded, PolicyError

try:  # where a node's config holds its Runtime (private to LangGraph; the values as of 1.0)
    from langgraph._internal._constants import CONF, CONFIG_KEY_RUNTIME
except ImportError:  # pragma: no cover - a LangGraph that moved them
    CONF, CONFIG_KEY_RUNTIME = "configurable", "__pregel_runtime"
from agentguard._guard import _current as _current_task
from agentguard_langchain import AgentGuardMiddleware, BudgetedChatModel
from agentguard_langchain._chat_model import _model_id, _usage_or_raw
from agentguard_langchain._common import METERED, metered_here
from agentguard_langchain._middleware import DEFAULT_FINISH_MESSAGE, _note, refused_tool_call
from agentguard_langgraph._state import SPEND_KEY

if TYPE_CHECKING:
    from langchain_core.tools import BaseTool
    from langgraph.prebuilt.tool_node import ToolCallRequest

    from agentguard import Decision, Guard, ModelCall, Policy, Spent, Task
    from agentguard_langgraph._run import GuardedGraph

__all__ = ["GraphGuard", "Route"]

#: What :meth:`GraphGuard.route` answers.
Route: TypeAlias = Literal["continue", "downgrade", "finish", "stop"]

_STOP_MESSAGE = "[agentguard: the run's budget stopped the run — {error}]"
_NodeFn: TypeAlias = Callable[..., Any]


class _Ledger:
    """What of a task's spend one graph guard has already put in the graph state, so each
    record adds only the rest. Updated in place, under the guard's lock."""

    __slots__ = (
        "cost",
        "decisions",
        "input_tokens",
        "model_calls",
        "output_tokens",
        "retries",
        "steps",
        "tool_calls",
        "tool_calls_by_name",
    )

    def __init__(self) -> None:
        self.cost = Decimal(0)
        self.input_tokens = 0
        self.output_tokens = 0
        self.model_calls = 0
        self.tool_calls = 0
        self.tool_calls_by_name: Mapping[str, int] = {}
        self.retries = 0
        self.steps = 0
        self.decisions = 0  # how many of the task's decisions


def _merge(result: Any, spend: dict[str, Any]) -> Any:
    """A node's return value with the spend update (a :class:`GraphSpend` delta) added."""
    if not spend:
        return result
    if result is None:
        return {SPEND_KEY: spend}
    if type(result) is dict or isinstance(result, Mapping):
        return {**result, SPEND_KEY: spend}
    if isinstance(result, Command) and (result.update is None or isinstance(result.update, dict)):
        return Command(
            graph=result.graph,
            update={**(result.update or {}), SPEND_KEY: spend},
            resume=result.resume,
            goto=result.goto,
        )
    if isinstance(result, list) and result and all(isinstance(r, Command) for r in result):
        return [*result, Command(update={SPEND_KEY: spend})]  # e.g. create_agent's model node
    return result  # other update lists, a pydantic state: the next recording node adds it


# Attempts: which attempt of the running node this is (``RetryPolicy`` re-runs: 2, 3...); 1
# outside a graph run. A node run again is a retry, counted against ``max_retries`` (raising
# ``BudgetExceeded`` past it) before the attempt runs. The node wrappers read it inline: the
# ``execution_info`` of the runtime LangGraph puts in the running node's config — what
# ``langgraph.runtime.get_runtime()`` returns, without its two calls and without a call per
# step of the way (no config, runtime or execution info: not a graph run, the first attempt).
#: The decision actions with which a tool does not run (``ToolCall.allowed`` is false).
_REFUSED = ("stop", "block")


def _no_task() -> RuntimeError:
    return RuntimeError(
        "GraphGuard found no task of its guard: run the graph with "
        "gg.bind(graph).invoke(...) or inside `with guard.task(...)`"
    )


def _past_cap_error(task: Task, d: Decision) -> BudgetExceeded:
    """A wrapped node's step past the cap stops (the cap's last step made the final answer
    already: the graph came back anyway)."""
    return BudgetExceeded(d.limit or "max_steps", None, None, task_id=task.id, detail=d.reason)


def _carry_signature(wrapper: _NodeFn, fn: _NodeFn) -> _NodeFn:
    """``wrapper`` (made with ``functools.wraps(fn)``) carrying ``fn``'s signature itself.

    LangChain's ``RunnableLambda`` asks ``inspect.signature`` of its function on every call
    (does it take ``config``, ``run_manager``?): from a wrapper that follows ``__wrapped__`` and
    rebuilds ``fn``'s signature each time (~15 µs per call in a tight loop), from one carried
    as ``__signature__`` at once (~4 µs). The signature is the same; LangGraph's own injection
    of ``config`` / ``runtime`` reads it as before.
    """
    # no signature to read (a builtin, an annotation that cannot be resolved): as wraps made it
    with contextlib.suppress(TypeError, ValueError, NameError):
        cast("Any", wrapper).__signature__ = inspect.signature(fn)
    return wrapper


def _finishes_at_cap(task: Task) -> bool:
    return task.policy.max_steps is not None and task.policy.on_limit == "finish"


def _at_cap(task: Task, spent: Spent) -> bool:
    cap = task.policy.max_steps
    return cap is not None and spent.steps >= cap


class _RouteInput(TypedDict, total=False):
    """What :meth:`GraphGuard.route` reads of the state: a key of its own that no node writes.

    LangGraph takes a conditional edge's input schema from its callable's type hints and reads
    only that schema's keys, fresh (the step's writes applied to copies of those channels).
    The guard decides from the task, not the state: asking for the whole state would copy the
    conversation's channel and re-apply its reducer on every edge (~40 Python calls).
    """

    agentguard_route: None


class _Edge(Runnable[Any, Any]):
    """A conditional-edge function as LangGraph takes it: a ``Runnable`` it calls as is.

    A plain function would be wrapped in a traced runnable (a callback run per call) and,
    under ``ainvoke``, run in a thread pool; the guard's decision takes microseconds and
    never blocks, so it is called directly, sync and async. Also callable: ``edge(state)``.
    Its type hints (what LangGraph reads an edge's input schema from) name
    :class:`_RouteInput`, so the edge reads no channel a node writes.
    """

    def __init__(
        self, decide: Callable[[Any], Any], adecide: Callable[[Any], Awaitable[Any]], name: str
    ) -> None:
        self._decide = decide
        self._adecide = adecide
        self.name = name
        self.__annotations__ = {"state": _RouteInput}

    def __call__(self, state: Any = None) -> Any:
        return self._decide(state)

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return self._decide(input)

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return await self._adecide(input)


class _RecordingToolNode(ToolNode):
    """``ToolNode`` whose update also adds the run's new spend to the ``BudgetState`` keys (so
    a thread interrupted after its tools ran has them in its checkpoint)."""

    _gg: GraphGuard

    def _func(self, input: Any, config: RunnableConfig, runtime: Any) -> Any:
        out = ToolNode._func(self, input, config, runtime)
        gg = self._gg
        task = _current_task.get()
        if task is None or task.guard is not gg.guard:
            raise _no_task()
        return gg._record(task, out)

    async def _afunc(self, input: Any, config: RunnableConfig, runtime: Any) -> Any:
        out = await ToolNode._afunc(self, input, config, runtime)
        gg = self._gg
        task = _current_task.get()
        if task is None or task.guard is not gg.guard:
            raise _no_task()
        return gg._record(task, out)


class GraphGuard:
    """Keeps a LangGraph run inside its budget: a gate in front of nodes, a routing edge on
    the guard's decision, agent-step caps, a finishing node, cost kept in the graph state and
    child budgets for subgraphs and ``Send`` branches.

    Run the graph through :meth:`bind` (``gg.bind(graph).invoke(...)``), which opens one task
    per run — or open ``with guard.task(...)`` around ``graph.invoke`` yourself; every node,
    edge and model call below charges that task.

    Args:
        guard: the :class:`agentguard.Guard` whose policy and budgets apply.
        models: the ladder's model ids (``Downgrade.to``, ``finish_model``) mapped to *unbound*
            chat models (checked as :class:`~agentguard_langchain.AgentGuardMiddleware` checks
            them: unbound, able to call tools).
        budget: ``"run"`` — each run has the policy's limits; ``"thread"`` — a checkpointed
            thread has them in total: a resumed run starts from what the thread's state
            (:class:`~agentguard_langgraph.BudgetState`) says it spent.
        task_id: id of the run tasks :meth:`bind` opens: a string, a callable
            ``(config) -> str``, or ``None`` for a fresh id per run.
        tags: attribution tags of those tasks.
        finish_message: the note added to a final answer the budget forced (``{reason}``,
            ``{limit}``); ``None`` adds none.
        exit_behavior: at a hard stop, ``"error"`` raises :class:`agentguard.BudgetExceeded`
            out of ``invoke``; ``"end"`` ends the run (the route answers ``"stop"``; a node
            answers with an ``AIMessage`` saying why). Default: ``"end"`` under
            ``on_limit="finish"``, else ``"error"``.
        messages_key: the state key holding the conversation.

    Example:
        >>> import agentguard as ag
        >>> from agentguard_langgraph import GraphGuard
        >>> gg = GraphGuard(ag.Guard(ag.Policy(max_steps=3, on_limit="finish"), traces=False))
        >>> gg.path_map(continue_to="agent", finish_to="finish")["finish"]
        'finish'
    """

    def __init__(
        self,
        guard: Guard,
        *,
        models: Mapping[str, BaseChatModel] | None = None,
        budget: Literal["run", "thread"] = "run",
        task_id: str | Callable[[RunnableConfig | None], str] | None = None,
        tags: Mapping[str, str] | None = None,
        finish_message: str | None = DEFAULT_FINISH_MESSAGE,
        exit_behavior: Literal["end", "error"] | None = None,
        messages_key: str = "messages",
    ) -> None:
        if budget not in ("run", "thread"):
            raise PolicyError("budget", budget, "must be 'run' or 'thread'")
        # the middleware validates exit_behavior, tags and the mapped models (reused checks)
        self._mw = AgentGuardMiddleware(
            guard, models=models, tags=tags, exit_behavior=exit_behavior
        )
        self.guard = guard
        self.models: dict[str, BaseChatModel] = dict(models or {})
        self.budget = budget
        self.task_id = task_id
        self.tags: dict[str, str] = dict(tags or {})
        self.finish_message = finish_message
        self.exit_behavior = exit_behavior
        self.messages_key = messages_key
        self._ledgers: weakref.WeakKeyDictionary[Task, _Ledger] = weakref.WeakKeyDictionary()
        self._last: tuple[Task, _Ledger] | None = None
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        self._edge = _Edge(self._route, self._aroute, "agentguard_route")

    # -- tasks ----------------------------------------------------------------------------------

    def _task(self) -> Task:
        task = _current_task.get()
        if task is None or task.guard is not self.guard:
            raise _no_task()
        return task

    def _exit(self, task: Task) -> str:
        if self.exit_behavior is not None:
            return self.exit_behavior
        return "end" if task.policy.on_limit == "finish" else "error"

    def bind(self, graph: Any) -> GuardedGraph:
        """The compiled ``graph`` run under this guard: one task per ``invoke`` / ``ainvoke``
        / ``stream`` / ``astream`` (a child of the caller's current task, if any); with
        ``budget="thread"`` the task starts from what the thread's state says it spent."""
        from agentguard_langgraph._run import GuardedGraph

        return GuardedGraph(self, graph)

    def _record(self, task: Task, out: Any) -> Any:
        """A node's return value ``out`` with the task's spend not yet in the state added
        under :data:`SPEND_KEY` (only the fields that changed; ``out`` as it is if nothing
        did). Called once per recording node: one call does the whole of it."""
        spend: dict[str, Any] = {}
        with self._lock:  # parallel nodes of one task: each adds a disjoint share
            # the task that recorded last keeps its ledger here (a weak mapping's get and set
            # cost a weakref each); the others' are in the weak mapping
            last = self._last
            if last is not None and last[0] is task:
                was = last[1]
            else:
                if last is not None and last[0].ended is None:  # a closed task spends no more
                    self._ledgers[last[0]] = last[1]
                was = self._ledgers.get(task) or _Ledger()
                self._last = (task, was)
            # each counter read once and compared with the ledger on its own (a parallel
            # node's event may land between two reads: the next record adds the rest)
            cost = task.priced_cost_usd
            # the same object: no call was priced since (a tool node's record), no Decimal
            # compared (each ``+=`` on the task's total makes a new one)
            if cost is not was.cost and cost != was.cost:
                spend["cost_usd"] = cost - was.cost
                was.cost = cost
            usage = task._usage  # as kept: ``task.usage`` builds and validates a ``Usage``
            d_in = usage[0] - was.input_tokens
            d_out = usage[1] - was.output_tokens
            if d_in or d_out:
                spend["tokens"] = d_in + d_out
                spend["input_tokens"] = d_in
                spend["output_tokens"] = d_out
                was.input_tokens += d_in
                was.output_tokens += d_out
            n = task.model_calls
            if n != was.model_calls:
                spend["model_calls"] = n - was.model_calls
                was.model_calls = n
            n = task.tool_calls
            if n != was.tool_calls:
                spend["tool_calls"] = n - was.tool_calls
                was.tool_calls = n
            by_name = task.tool_calls_by_name
            if by_name != was.tool_calls_by_name:
                by_name = dict(by_name)  # one copy: the task's dict keeps changing
                before = was.tool_calls_by_name
                counts: dict[str, int] = {}
                for name, k in by_name.items():
                    if k != before.get(name, 0):
                        counts[name] = k - before.get(name, 0)
                spend["tool_calls_by_name"] = counts
                was.tool_calls_by_name = by_name
            n = task.retries
            if n != was.retries:
                spend["retries"] = n - was.retries
                was.retries = n
            n = task.steps
            if n != was.steps:
                spend["steps"] = n - was.steps
                was.steps = n
            decisions = task.decisions
            n = len(decisions)
            if n != was.decisions:
                kinds = [
                    f"{d.kind}:{d.action}"
                    for d in decisions[was.decisions : n]
                    if d.kind != "soft_limit"
                ]
                if kinds:
                    spend["decisions"] = kinds
                was.decisions = n
        if not spend:
            return out
        if type(out) is dict:
            return {**out, SPEND_KEY: spend}
        return _merge(out, spend)

    def _stopped(self, exc: BudgetExceeded, task: Task) -> dict[str, Any]:
        msg = AIMessage(
            content=_STOP_MESSAGE.format(error=exc),
            response_metadata={
                "agentguard": {
                    "ended_by": "stop",
                    "limit": exc.limit,
                    "reason": str(exc),
                    "task_id": task.id,
                }
            },
        )
        return {self.messages_key: [msg]}

    # -- models and tools -------------------------------------------------------------------------

    def chat_model(self, model: BaseChatModel, **kwargs: Any) -> BudgetedChatModel:
        """``model`` as a :class:`~agentguard_langchain.BudgetedChatModel` on this guard and
        ladder: each call is decided and reserved, runs on the rung the guard picks with the
        output cap it allows, and becomes the graceful final answer at a money ceiling.

        Raises:
            PolicyError: a ladder rung (or ``finish_model``) is neither ``model`` nor mapped.
        """
        own = _model_id(model)
        policy = self.guard.policy
        targets = [(f"downgrade[{i}].to", r.to) for i, r in enumerate(policy.downgrade)]
        if policy.finish_model is not None:
            targets.append(("finish_model", policy.finish_model))
        for where, target in targets:
            if target != own and target not in self.models:
                raise PolicyError(
                    where,
                    target,
                    f"no chat model is mapped to it: pass models={{{target!r}: <chat model>}} "
                    f"to GraphGuard (the graph's own model is {own!r})",
                )
        return BudgetedChatModel(guard=self.guard, model=model, models=self.models, **kwargs)

    def tool_node(self, tools: Sequence[BaseTool | Callable[..., Any]], **kwargs: Any) -> ToolNode:
        """A ``ToolNode`` whose calls count against the tool caps (per tool and in total,
        parallel calls included); a blocked call answers the model with an error
        ``ToolMessage`` — the same tool gate as the LangChain agent middleware. Its update
        adds the run's new spend to the :class:`~agentguard_langgraph.BudgetState` key."""
        node = _RecordingToolNode(
            tools, wrap_tool_call=self._wrap_tool, awrap_tool_call=self._awrap_tool, **kwargs
        )
        node._gg = self
        return node

    def _tool_refused(
        self, task: Task, request: ToolCallRequest, exc: BudgetExceeded
    ) -> ToolMessage:
        if self._exit(task) == "error":
            raise exc
        return refused_tool_call(request.tool_call, stopped=exc)

    def _wrap_tool(
        self, request: ToolCallRequest, handler: Callable[[ToolCallRequest], Any]
    ) -> Any:
        """The tool gate of :meth:`tool_node`: counted against the tool caps before it runs;
        a blocked call answers the model with an error ``ToolMessage``."""
        task = _current_task.get()
        if task is None or task.guard is not self.guard:
            raise _no_task()
        try:
            tool = task.start_tool_call(request.tool_call["name"])
        except BudgetExceeded as exc:
            return self._tool_refused(task, request, exc)
        if tool.decision.action in _REFUSED:  # ``not tool.allowed``, without its two calls
            return refused_tool_call(request.tool_call, blocked=tool.decision.reason)
        # a callback handler on the same run does not count it again (``metered_here()``,
        # set and reset here without its object)
        token = METERED.set(True)
        try:
            result = handler(request)
        except BaseException as exc:
            METERED.reset(token)
            tool.fail(exc)
            raise
        METERED.reset(token)
        tool.end()
        return result

    async def _awrap_tool(
        self, request: ToolCallRequest, handler: Callable[[ToolCallRequest], Awaitable[Any]]
    ) -> Any:
        """Async :meth:`_wrap_tool` (the store is awaited; on the embedded store, which only
        runs the sync events, they are called directly: ``Task.awaits_store``)."""
        task = _current_task.get()
        if task is None or task.guard is not self.guard:
            raise _no_task()
        awaits = task.awaits_store
        try:
            name = request.tool_call["name"]
            tool = await task.astart_tool_call(name) if awaits else task.start_tool_call(name)
        except BudgetExceeded as exc:
            return self._tool_refused(task, request, exc)
        if tool.decision.action in _REFUSED:
            return refused_tool_call(request.tool_call, blocked=tool.decision.reason)
        token = METERED.set(True)
        try:
            result = await handler(request)
        except BaseException as exc:
            METERED.reset(token)
            await tool.afail(exc)
            raise
        METERED.reset(token)
        if awaits:
            await tool.aend()
        else:
            tool.end()
        return result

    # -- edges ------------------------------------------------------------------------------------

    @property
    def route(self) -> Callable[[Any], Route]:
        """A conditional edge on the guard's decision, to put in front of the agent's next
        step (after ``START`` and after the tools). Each call counts one agent step
        (``max_steps`` caps loops independently of ``recursion_limit``) and answers:

        * ``"continue"`` — go on;
        * ``"downgrade"`` — go on; the ladder has moved the run to a cheaper model;
        * ``"finish"`` — a cap is reached under ``on_limit="finish"``: go to the finishing
          node (:meth:`finish_node`). At a step cap this is the last step the cap allows,
          recorded as a ``step:finish`` decision;
        * ``"stop"`` — the budget stopped the run (``exit_behavior="end"``), or its final
          answer is already made.

        Map the answers to your nodes with :meth:`path_map`. No extra superstep is spent, and
        the edge is a ``Runnable`` LangGraph calls directly (no callback run, no thread hop
        under ``ainvoke``); ``gg.route(state)`` also works.
        """
        return self._edge

    def _route(self, state: Any = None) -> Route:
        task = self._task()
        if task.finished:  # the final answer was made; the graph came back anyway
            return "stop"
        try:
            d = task.step("agent")
            if d.action != "finish" and _finishes_at_cap(task) and _at_cap(task, task.last_spent):
                # the last step the cap allows is spent on the final answer: asking for the
                # next one records the step:finish decision (and marks the task as finishing)
                task.step("agent")
                return "finish"
        except BudgetExceeded as exc:
            return self._route_stopped(task, exc)
        return self._route_answer(task, d)

    async def _aroute(self, state: Any = None) -> Route:
        task = self._task()
        if task.finished:
            return "stop"
        try:
            d = await task.astep("agent")
            if d.action != "finish" and _finishes_at_cap(task) and _at_cap(task, task.last_spent):
                await task.astep("agent")
                return "finish"
        except BudgetExceeded as exc:
            return self._route_stopped(task, exc)
        return self._route_answer(task, d)

    def _route_stopped(self, task: Task, exc: BudgetExceeded) -> Route:
        if self._exit(task) == "error":
            raise exc
        return "stop"

    @staticmethod
    def _route_answer(task: Task, d: Decision) -> Route:
        if d.action == "finish":
            return "finish"
        if any(r.action == "downgrade" for r in task.decisions):
            return "downgrade"
        return "continue"

    def path_map(
        self,
        *,
        continue_to: str,
        finish_to: str | None = None,
        stop_to: str = END,
        downgrade_to: str | None = None,
    ) -> dict[Hashable, str]:
        """The ``path_map`` of :meth:`route` for ``add_conditional_edges``: each decision to
        one of your nodes (``finish_to`` defaults to ``stop_to``, ``downgrade_to`` to
        ``continue_to``). Typed as ``add_conditional_edges`` takes it (a ``dict`` is
        invariant: a ``dict[str, str]`` would not type-check there)."""
        return {
            "continue": continue_to,
            "downgrade": downgrade_to or continue_to,
            "finish": finish_to or stop_to,
            "stop": stop_to,
        }

    # -- nodes ------------------------------------------------------------------------------------

    def node(self, fn: _NodeFn, *, record: bool = True, step: bool = False) -> _NodeFn:
        """Wrap a node (sync or async): a budget stop inside it ends the run gracefully
        (``exit_behavior="end"``) and, with ``record=True``, its return value also adds the
        run's new spend to the :class:`~agentguard_langgraph.BudgetState` key.

        A node run again by its ``RetryPolicy`` asks the guard first: each attempt after the
        first is a retry, counted against ``max_retries``.

        With ``step=True`` each call of the node is one agent step, counted before it runs
        (instead of in :attr:`route` edges — use one or the other): the graph keeps its plain
        edges, and at ``max_steps`` under ``on_limit="finish"`` the last step's model call (a
        :meth:`chat_model`) is the final answer — capped, without tool calls, so
        ``tools_condition`` ends the run. Past the cap the node stops the run.

        The wrapper keeps the node's signature, so ``config`` / ``runtime`` injection still
        works.
        """
        name = getattr(fn, "__name__", "node")
        guard = self.guard
        # the hot path of every guarded iteration: the task, the attempt number and the spend
        # record are read inline (each Python call costs ~3x its tight-loop cost in a graph)
        if inspect.iscoroutinefunction(fn):
            afn = cast("Callable[..., Awaitable[Any]]", fn)

            @functools.wraps(afn)
            async def anode(*args: Any, **kwargs: Any) -> Any:
                task = _current_task.get()
                if task is None or task.guard is not guard:
                    raise _no_task()
                try:  # see "Attempts"
                    runtime = _child_config.get()[CONF][CONFIG_KEY_RUNTIME]  # type: ignore[index]
                    attempt = runtime.execution_info.node_attempt
                except (TypeError, LookupError, AttributeError):  # not in a graph run
                    attempt = 1
                try:
                    if attempt != 1 and isinstance(attempt, int) and attempt > 1:
                        await task.arecord_retry(f"{name}: attempt {attempt}")
                    if step:
                        d = await task.astep("agent") if task.awaits_store else task.step("agent")
                        if d.action == "finish":
                            raise _past_cap_error(task, d)
                    out = await afn(*args, **kwargs)
                except BudgetExceeded as exc:
                    if self._exit(task) == "error":
                        raise
                    out = self._stopped(exc, task)
                return self._record(task, out) if record else out

            return _carry_signature(anode, afn)

        @functools.wraps(fn)
        def snode(*args: Any, **kwargs: Any) -> Any:
            task = _current_task.get()
            if task is None or task.guard is not guard:
                raise _no_task()
            try:  # see "Attempts"
                runtime = _child_config.get()[CONF][CONFIG_KEY_RUNTIME]  # type: ignore[index]
                attempt = runtime.execution_info.node_attempt
            except (TypeError, LookupError, AttributeError):  # not in a graph run
                attempt = 1
            try:
                if attempt != 1 and isinstance(attempt, int) and attempt > 1:
                    task.record_retry(f"{name}: attempt {attempt}")
                if step:
                    d = task.step("agent")
                    if d.action == "finish":
                        raise _past_cap_error(task, d)
                out = fn(*args, **kwargs)
            except BudgetExceeded as exc:
                if self._exit(task) == "error":
                    raise
                out = self._stopped(exc, task)
            return self._record(task, out) if record else out

        return _carry_signature(snode, fn)

    def _step(self, task: Task) -> None:
        """Count one agent step of a wrapped node (see :func:`_past_cap_error`)."""
        d = task.step("agent")
        if d.action == "finish":
            raise _past_cap_error(task, d)

    async def _astep(self, task: Task) -> None:
        """Async :meth:`_step` (the store is awaited)."""
        d = await task.astep("agent")
        if d.action == "finish":
            raise _past_cap_error(task, d)

    def finish_node(
        self, model: BaseChatModel, *, tools: Sequence[Any] | None = None
    ) -> Runnable[Any, dict[str, Any]]:
        """The finishing node: one last call on the finish model with the final answer's
        output cap and ``tool_choice="none"`` (or no tools), answering from the conversation so
        far; the answer's ``response_metadata["agentguard"]`` says why the run ended. Route to
        it with :meth:`route`'s ``"finish"``; then go to ``END``."""
        own = _model_id(model)
        # the tools stay bound (tool_choice="none"): their schemas are part of the input
        schemas = [convert_to_openai_tool(t) for t in tools] if tools else None

        def ask(call: ModelCall) -> tuple[Any, dict[str, Any]]:
            """The chat model (tools bound, tool_choice="none") and kwargs of the call."""
            chat = self.models.get(call.model, model)
            kwargs: dict[str, Any] = {}
            if call.model not in self.models and call.model != own:
                kwargs["model"] = call.model
            if call.max_tokens is not None:
                kwargs["max_tokens"] = call.max_tokens
            runnable: Any = chat
            if tools:
                runnable = chat.bind_tools(list(tools), tool_choice="none")
            return runnable, kwargs

        def answer(task: Task, ai: BaseMessage) -> tuple[dict[str, Any], Any, str | None]:
            """The node's update and what the call reports (usage, model name)."""
            name = ai.response_metadata.get("model_name")
            update = {self.messages_key: [self._final(task, ai)]}
            return update, _usage_or_raw(ai), name if isinstance(name, str) else None

        def final(state: Any) -> dict[str, Any]:
            task = self._task()
            messages = list(state[self.messages_key])
            try:
                call = task.start_model_call(
                    own, messages=messages, tools=schemas, max_tokens=None, finish=True
                )
            except BudgetExceeded as exc:
                return self._end(exc)
            runnable, kwargs = ask(call)
            try:
                with metered_here():
                    ai = runnable.invoke(messages, **kwargs)
            except BaseException as exc:
                call.fail(exc)
                raise
            update, usage, name = answer(task, ai)
            call.end(usage, output_text=ai.text, model=name)
            return cast("dict[str, Any]", self._record(task, update))

        async def afinal(state: Any) -> dict[str, Any]:
            task = self._task()
            messages = list(state[self.messages_key])
            try:
                call = await task.astart_model_call(
                    own, messages=messages, tools=schemas, max_tokens=None, finish=True
                )
            except BudgetExceeded as exc:
                return self._end(exc)
            runnable, kwargs = ask(call)
            try:
                with metered_here():
                    ai = await runnable.ainvoke(messages, **kwargs)
            except BaseException as exc:
                await call.afail(exc)
                raise
            update, usage, name = answer(task, ai)
            await call.aend(usage, output_text=ai.text, model=name)
            return cast("dict[str, Any]", self._record(task, update))

        return RunnableLambda(final, afunc=afinal, name="agentguard_finish")

    def _end(self, exc: BudgetExceeded) -> dict[str, Any]:
        task = self._task()
        if self._exit(task) == "error":
            raise exc
        return cast("dict[str, Any]", self._record(task, self._stopped(exc, task)))

    def _final(self, task: Task, ai: BaseMessage) -> AIMessage:
        """The final answer: no tool calls, a note saying the budget ended the run."""
        rec = next((d for d in reversed(task.decisions) if d.action == "finish"), None)
        reason, limit = "the graph routed to its finishing node", None
        if rec is not None:
            reason, limit = rec.reason, rec.limit
        meta = {
            **ai.response_metadata,
            "agentguard": {
                "ended_by": "finish",
                "limit": limit,
                "reason": reason,
                "task_id": task.id,
            },
        }
        msg = ai if isinstance(ai, AIMessage) else AIMessage(content=ai.content, id=ai.id)
        update: dict[str, Any] = {
            "tool_calls": [],
            "invalid_tool_calls": [],
            "response_metadata": meta,
        }
        if self.finish_message is not None:
            update["content"] = _note(msg, self.finish_message.format(reason=reason, limit=limit))
        return msg.model_copy(update=update)

    def branch(
        self,
        fn: _NodeFn | Runnable[Any, Any],
        *,
        policy: Policy | None = None,
        name: str | None = None,
    ) -> _NodeFn:
        """Run a node — a ``Send`` branch, or a compiled subgraph — under a *child* task of
        the run's task: its spend rolls up into the parent's budgets (reservations hit every
        enclosing line at once, so parallel branches cannot jointly overspend them), and
        ``policy`` can give it tighter limits of its own. The branch's total spend is added
        to the parent graph's :class:`~agentguard_langgraph.BudgetState` key.

        A budget stop inside the branch ends only the branch under ``exit_behavior="end"``
        (its update then carries ``"branch:stop"`` in the decisions); under ``"error"`` it
        propagates.
        """
        label = name or getattr(fn, "name", None) or getattr(fn, "__name__", "branch")
        is_runnable = isinstance(fn, Runnable)
        is_async = not is_runnable and inspect.iscoroutinefunction(fn)

        def open_child() -> Any:
            parent = self._task()
            child_id = f"{parent.id}/{label}-{next(self._seq)}"
            scope = self.guard.task(child_id, parent=parent, policy=policy)
            scope.retires = True  # an id of ours: its line goes when the branch ends
            return scope

        def stopped_or_raise(exc: BudgetExceeded) -> BudgetExceeded:
            if self._exit(self._task()) == "error":
                raise exc
            return exc

        def close_out(child: Task, spent: Spent, out: Any, stopped: BudgetExceeded | None) -> Any:
            # spent: the child's own and its children's, read from the store; the update has
            # the fields spent (the three token counts if any token was), and the decisions
            totals: list[tuple[str, Any]] = [
                ("cost_usd", spent.cost_usd),
                ("model_calls", spent.model_calls),
                ("tool_calls", spent.tool_calls),
                ("tool_calls_by_name", {k: n for k, n in child.tool_calls_by_name.items() if n}),
                ("retries", spent.retries),
                ("steps", spent.steps),
            ]
            spend: dict[str, Any] = {k: v for k, v in totals if v}
            if spent.input_tokens or spent.output_tokens:
                spend["tokens"] = spent.input_tokens + spent.output_tokens
                spend["input_tokens"] = spent.input_tokens
                spend["output_tokens"] = spent.output_tokens
            spend["decisions"] = [f"{d.kind}:{d.action}" for d in child.decisions] + (
                ["branch:stop"] if stopped is not None else []
            )
            if stopped is not None:
                return {SPEND_KEY: spend}
            if is_runnable and isinstance(out, Mapping):
                # a subgraph's output is its whole state; its own spend key is replaced by
                # the child task's total
                out = {k: v for k, v in out.items() if k != SPEND_KEY}
            return _merge(out, spend)

        if is_runnable:
            runnable = cast("Runnable[Any, Any]", fn)

            def sub(state: Any, config: RunnableConfig) -> Any:
                child, out, stopped = None, None, None
                try:
                    with open_child() as child:
                        out = runnable.invoke(state, config)
                except BudgetExceeded as exc:
                    stopped = stopped_or_raise(exc)
                assert child is not None
                return close_out(child, child.spent, out, stopped)

            async def asub(state: Any, config: RunnableConfig) -> Any:
                child, out, stopped = None, None, None
                try:
                    async with open_child() as child:
                        out = await runnable.ainvoke(state, config)
                except BudgetExceeded as exc:
                    stopped = stopped_or_raise(exc)
                assert child is not None
                return close_out(child, await child.aspent(), out, stopped)

            return cast("_NodeFn", RunnableLambda(sub, afunc=asub, name=label))

        if is_async:
            afn = cast("Callable[..., Awaitable[Any]]", fn)

            @functools.wraps(afn)
            async def abranch(*args: Any, **kwargs: Any) -> Any:
                child, out, stopped = None, None, None
                try:
                    async with open_child() as child:
                        out = await afn(*args, **kwargs)
                except BudgetExceeded as exc:
                    stopped = stopped_or_raise(exc)
                assert child is not None
                return close_out(child, await child.aspent(), out, stopped)

            return abranch

        sfn = cast("Callable[..., Any]", fn)

        @functools.wraps(sfn)
        def sbranch(*args: Any, **kwargs: Any) -> Any:
            child, out, stopped = None, None, None
            try:
                with open_child() as child:
                    out = sfn(*args, **kwargs)
            except BudgetExceeded as exc:
                stopped = stopped_or_raise(exc)
            assert child is not None
            return close_out(child, child.spent, out, stopped)

        return sbranch
