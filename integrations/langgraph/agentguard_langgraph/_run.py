"""``GuardedGraph``: a compiled graph run under a :class:`GraphGuard`, one task per run."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from langchain_core.runnables import Runnable

from agentguard import BudgetExceeded, BudgetLine
from agentguard._guard import _current as _current_task
from agentguard_langgraph._state import SPEND_KEY

if TYPE_CHECKING:
    from langchain_core.runnables import RunnableConfig

    from agentguard import Task
    from agentguard_langgraph._gate import GraphGuard

__all__ = ["GuardedGraph"]


#: The spend fields a thread's task is seeded from (the store counters of the same names).
_SEEDED = (
    "cost_usd",
    "tokens",
    "input_tokens",
    "output_tokens",
    "model_calls",
    "tool_calls",
    "retries",
    "steps",
)

#: The model node of each prebuilt agent, by the function it runs.
_PREBUILT_MODEL_NODES = {
    ("agent", "langgraph.prebuilt.chat_agent_executor", "create_react_agent.<locals>.call_model"),
    ("model", "langchain.agents.factory", "create_agent.<locals>.model_node"),
}


def _prebuilt_model_node(graph: Any) -> str | None:
    """The model node of a ``create_react_agent`` / ``create_agent`` graph, else ``None``."""
    nodes = getattr(getattr(graph, "builder", None), "nodes", None) or {}
    for name, module, qualname in _PREBUILT_MODEL_NODES:
        fn = getattr(getattr(nodes.get(name), "runnable", None), "func", None)
        if (getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)) == (
            module,
            qualname,
        ):
            return name
    return None


class _ModelStep(Runnable[Any, Any]):
    """A prebuilt agent's model node under the guard: one agent step per call (unless
    ``AgentGuardMiddleware`` counts them), the run's new spend added to its update."""

    def __init__(self, gg: GraphGuard, bound: Runnable[Any, Any], *, steps: bool) -> None:
        self.gg = gg
        self.bound = bound
        self.steps = steps
        self.name = getattr(bound, "name", None) or "agent"

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        gg = self.gg
        task = gg._task()
        try:
            if self.steps:
                gg._step(task)
            out = self.bound.invoke(input, config, **kwargs)
        except BudgetExceeded as exc:
            if gg._exit(task) == "error":
                raise
            out = gg._stopped(exc, task)
        return gg._record(task, out)

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        gg = self.gg
        task = gg._task()
        try:
            if self.steps:
                await gg._astep(task)
            out = await self.bound.ainvoke(input, config, **kwargs)
        except BudgetExceeded as exc:
            if gg._exit(task) == "error":
                raise
            out = gg._stopped(exc, task)
        return gg._record(task, out)


def _guard_prebuilt(gg: GraphGuard, graph: Any) -> Any:
    """A prebuilt agent's graph with its model node counting steps and recording spend (a
    copy: the caller's compiled graph is left as it was); any other graph as it is."""
    name = _prebuilt_model_node(graph)
    if name is None:
        return graph
    node = graph.nodes[name]
    # AgentGuardMiddleware counts the steps of a create_agent run itself
    metered = any(n.startswith("AgentGuardMiddleware.") for n in graph.nodes)
    step = _ModelStep(gg, node.bound, steps=not metered)
    return graph.copy({"nodes": {**graph.nodes, name: node.copy({"bound": step})}})


def _thread_id(config: RunnableConfig | None) -> str | None:
    configurable = (config or {}).get("configurable") or {}
    tid = configurable.get("thread_id")
    return str(tid) if tid is not None else None


class GuardedGraph:
    """A compiled graph whose runs each charge one task (see :meth:`GraphGuard.bind`).

    ``invoke``, ``ainvoke``, ``stream`` and ``astream`` take the compiled graph's arguments;
    every other attribute (``get_state``, ``update_state``, ``get_graph``...) is the graph's.
    ``last_task`` is the task of the latest run.
    """

    def __init__(self, gg: GraphGuard, graph: Any) -> None:
        self.gg = gg
        self.graph = _guard_prebuilt(gg, graph)
        self.last_task: Task | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.graph, name)

    # -- opening a run's task -------------------------------------------------------------------

    def _task_args(
        self, config: RunnableConfig | None
    ) -> tuple[str | None, Task | None, dict[str, str]]:
        """The id, the parent (the caller's current task of this guard, if any) and the tags
        of a run's task."""
        gg = self.gg
        task_id = gg.task_id(config) if callable(gg.task_id) else gg.task_id
        tags = gg.tags
        tid = _thread_id(config) if config else None
        if tid is not None and "thread_id" not in tags:
            tags = {**tags, "thread_id": tid}
        cur = _current_task.get()
        return task_id, (cur if cur is not None and cur.guard is gg.guard else None), tags

    def _scope(self, config: RunnableConfig | None) -> Any:
        """``with`` / ``async with`` the run's task (for streams: a generator may be closed
        from another context, which the scope handles)."""
        task_id, parent, tags = self._task_args(config)
        open_scope: Callable[..., Any] = self.gg.guard.task  # tags are plain **kwargs
        return open_scope(task_id, parent=parent or False, **tags)

    def _seed(self, task: Task, values: Mapping[str, Any] | None) -> None:
        """``budget="thread"``: the task starts from what the thread's state says it spent."""
        amounts = self._seeded(task, values)
        if amounts:
            # only the task's own line: enclosing budgets (team, org) were charged when the
            # thread spent it
            self.gg.guard.store.charge([BudgetLine(f"task:{task.id}")], amounts, check=False)
            _ = task.spent  # re-read the balances

    async def _aseed(self, task: Task, values: Mapping[str, Any] | None) -> None:
        """Async :meth:`_seed` (the store is awaited)."""
        amounts = self._seeded(task, values)
        if amounts:
            await self.gg.guard.store.acharge([BudgetLine(f"task:{task.id}")], amounts, check=False)
            await task.aspent()

    def _seeded(self, task: Task, values: Mapping[str, Any] | None) -> dict[str, Decimal | int]:
        """The counters a thread's state seeds its run's task with (none for run budgets)."""
        amounts: dict[str, Decimal | int] = {}
        if self.gg.budget != "thread" or not values:
            return amounts
        spend = values.get(SPEND_KEY)
        if not isinstance(spend, Mapping):
            return amounts
        for counter in _SEEDED:
            value = spend.get(counter)
            if value:
                amounts[counter] = value
        by_name = spend.get("tool_calls_by_name")
        if isinstance(by_name, Mapping):
            for tool, n in by_name.items():
                if n:
                    amounts[f"tool:{tool}"] = n
        return amounts

    def _values(self, config: RunnableConfig | None) -> Mapping[str, Any] | None:
        if self.gg.budget != "thread" or _thread_id(config) is None:
            return None
        if getattr(self.graph, "checkpointer", None) is None:
            return None
        return dict(self.graph.get_state(config).values)

    async def _avalues(self, config: RunnableConfig | None) -> Mapping[str, Any] | None:
        if self.gg.budget != "thread" or _thread_id(config) is None:
            return None
        if getattr(self.graph, "checkpointer", None) is None:
            return None
        return dict((await self.graph.aget_state(config)).values)

    # -- running ---------------------------------------------------------------------------------

    # invoke / ainvoke open and close the run's task themselves (what ``with guard.task()``
    # does, without its scope object and five calls): they run once per graph run

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        """``graph.invoke`` under a task of its own."""
        values = self._values(config) if self.gg.budget == "thread" else None
        task_id, parent, tags = self._task_args(config)
        open_task: Callable[..., Task] = self.gg.guard.open_task  # tags are plain **kwargs
        task = self.last_task = open_task(task_id, parent=parent, **tags)
        token = _current_task.set(task)
        try:
            if values:
                self._seed(task, values)
            out = self.graph.invoke(input, config, **kwargs)
        except BaseException as exc:
            _current_task.reset(token)
            task.close(exc)
            raise
        _current_task.reset(token)
        task.close()
        return out

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        """``graph.ainvoke`` under a task of its own."""
        values = await self._avalues(config) if self.gg.budget == "thread" else None
        task_id, parent, tags = self._task_args(config)
        aopen_task: Callable[..., Awaitable[Task]] = self.gg.guard.aopen_task
        task = self.last_task = await aopen_task(task_id, parent=parent, **tags)
        token = _current_task.set(task)
        try:
            if values:
                await self._aseed(task, values)
            out = await self.graph.ainvoke(input, config, **kwargs)
        except BaseException as exc:
            _current_task.reset(token)
            await task.aclose(exc)
            raise
        _current_task.reset(token)
        await task.aclose()
        return out

    def stream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[Any]:
        """``graph.stream`` under a task of its own (closed when the stream ends)."""
        values = self._values(config)
        with self._scope(config) as task:
            self.last_task = task
            self._seed(task, values)
            with contextlib.closing(self.graph.stream(input, config, **kwargs)) as it:
                yield from it

    async def astream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        """``graph.astream`` under a task of its own (closed when the stream ends)."""
        values = await self._avalues(config)
        async with self._scope(config) as task:
            self.last_task = task
            await self._aseed(task, values)
            async for chunk in self.graph.astream(input, config, **kwargs):
                yield chunk
