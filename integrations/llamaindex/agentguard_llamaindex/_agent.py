"""Agent loops: step and tool-call caps, and the graceful finish, for LlamaIndex workflow agents
(``FunctionAgent``, ``ReActAgent``, ``AgentWorkflow``).

:func:`guard_agent` puts an agent (or every agent of an ``AgentWorkflow``) under a guard:

* its LLM becomes a :class:`~agentguard_llamaindex.BudgetedLLM` — every model call is decided
  and reserved; at a cap under ``on_limit="finish"`` the next call is the graceful final answer
  (no tools, output-capped), which ends the agent's run; under ``"raise"``
  :class:`~agentguard.BudgetExceeded` comes out of ``await agent.run(...)``;
* its tools become :class:`GuardedTool` s (a ``FunctionTool`` that takes the workflow
  ``Context``: a :class:`GuardedFunctionTool`) — each call counts against ``max_tool_calls`` and
  ``tool_limits``; a call over a cap is not made (the model reads why) and the next model call
  is the final one;
* the instrumentation is attached (:func:`~agentguard_llamaindex.instrument`): each agent
  iteration (``run_agent_step``) counts one step against ``max_steps``, and a run outside any
  ``guard.task(...)`` gets a task of its own.

Workflow agents turn a tool's exception into a tool result, so a stop decided at a tool is kept
and raised by the next model call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from llama_index.core.tools import BaseTool, FunctionTool, ToolOutput
from llama_index.core.tools.types import AsyncBaseTool, ToolMetadata, adapt_to_async_tool

from agentguard import BudgetExceeded, Guard, ToolCall, current_task
from agentguard.adapter import NO_KW, Steps, adrive, drive
from agentguard_llamaindex._common import defer_stop, metered_here

if TYPE_CHECKING:
    from agentguard import Task

__all__ = ["BLOCKED_TOOL_MESSAGE", "GuardedFunctionTool", "GuardedTool", "guard_agent"]

#: What the model reads instead of a tool's output when a cap blocks the call.
BLOCKED_TOOL_MESSAGE = "[agentguard: this tool call was not made: {reason}. Answer without it.]"

A = TypeVar("A")


class GuardedTool(AsyncBaseTool):
    """A tool whose calls count against the current task's tool caps.

    A call over ``max_tool_calls`` or ``tool_limits[name]`` is not made under
    ``on_limit="finish"``: the tool returns :data:`BLOCKED_TOOL_MESSAGE` (an error output the
    agent shows the model) and the task's next model call is its final answer. Under
    ``"raise"`` the call raises :class:`~agentguard.BudgetExceeded` (kept for the next model
    call too, since agents turn tool exceptions into tool results). Outside any task the tool
    runs unmetered.

    Example:
        >>> import agentguard as ag
        >>> from llama_index.core.tools import FunctionTool
        >>> def lookup(q: str) -> str:
        ...     "Look a word up."
        ...     return q.upper()
        >>> guard = ag.Guard(ag.Policy(max_tool_calls=1, on_limit="finish"), traces=False)
        >>> tool = GuardedTool(FunctionTool.from_defaults(lookup), guard)
        >>> with guard.task("t1"):
        ...     first, second = tool.call(q="a"), tool.call(q="b")
        >>> first.content, second.is_error
        ('A', True)
    """

    _agentguard_meters = True  # the instrumentation leaves its calls to it

    def __init__(
        self, tool: BaseTool, guard: Guard, *, blocked_message: str = BLOCKED_TOOL_MESSAGE
    ) -> None:
        self.tool = adapt_to_async_tool(tool)
        self.guard = guard
        self.blocked_message = blocked_message

    @property
    def metadata(self) -> ToolMetadata:
        return self.tool.metadata

    def _task(self) -> Task | None:
        task = current_task()
        if task is not None and task.guard is self.guard:
            return task
        from agentguard_llamaindex._handler import task_for_active_span

        return task_for_active_span(self.guard)

    def _start(self, kwargs: dict[str, Any]) -> Steps[tuple[ToolCall | None, ToolOutput | None]]:
        """Count the call (one body for ``call`` and ``acall``)."""
        task = self._task()
        if task is None:
            return None, None
        name = self.metadata.get_name()
        try:
            call: ToolCall = yield (task, "start_tool_call", (name,), NO_KW)
        except BudgetExceeded as exc:
            defer_stop(task, exc)
            raise
        if call.allowed:
            return call, None
        text = self.blocked_message.format(reason=call.decision.reason)
        ctx = getattr(self.tool, "ctx_param_name", None)  # a Context is not part of the input
        raw_input = {k: v for k, v in kwargs.items() if k != ctx} if ctx else kwargs
        return None, ToolOutput(
            content=text, tool_name=name, raw_input=raw_input, raw_output=None, is_error=True
        )

    def call(self, *args: Any, **kwargs: Any) -> ToolOutput:
        call, blocked = drive(self._start(kwargs))
        if blocked is not None:
            return blocked
        try:
            with metered_here():
                out = self.tool.call(*args, **kwargs)
        except BaseException as exc:
            if call is not None:
                call.fail(exc)
            raise
        if call is not None:
            call.end()
        return out

    async def acall(self, *args: Any, **kwargs: Any) -> ToolOutput:
        """Async :meth:`call`: the count, the end and a failure await the budget store."""
        call, blocked = await adrive(self._start(kwargs))
        if blocked is not None:
            return blocked
        try:
            with metered_here():
                out = await self.tool.acall(*args, **kwargs)
        except BaseException as exc:
            if call is not None:
                await call.afail(exc)
            raise
        if call is not None:
            await call.aend()
        return out


class GuardedFunctionTool(FunctionTool):
    """A ``FunctionTool`` that takes the workflow ``Context``, gated as :class:`GuardedTool`
    gates a tool.

    A workflow agent injects its ``Context`` only into a tool it sees as a ``FunctionTool``
    that requires one, so such a tool stays a ``FunctionTool``: this one carries the wrapped
    tool's function, metadata, callbacks and context parameter, and its calls go through a
    :class:`GuardedTool` (counted against the tool caps; a call over a cap is not made). The
    context is passed on to the function and left out of a blocked call's ``raw_input``.

    Example:
        >>> import agentguard as ag
        >>> from llama_index.core.tools import FunctionTool
        >>> from llama_index.core.workflow import Context
        >>> def note(ctx, text: str) -> str:
        ...     "Keep a note."
        ...     return f"noted: {text}"
        >>> note.__annotations__["ctx"] = Context  # i.e. def note(ctx: Context, text: str)
        >>> guard = ag.Guard(ag.Policy(max_tool_calls=1, on_limit="finish"), traces=False)
        >>> tool = GuardedFunctionTool(FunctionTool.from_defaults(note), guard)
        >>> tool.requires_context, tool.ctx_param_name
        (True, 'ctx')
        >>> with guard.task("t1"):
        ...     first, second = tool.call(ctx=None, text="a"), tool.call(ctx=None, text="b")
        >>> first.content, second.is_error, second.raw_input
        ('noted: a', True, {'text': 'b'})
    """

    _agentguard_meters = True  # the instrumentation leaves its calls to it

    def __init__(
        self, tool: FunctionTool, guard: Guard, *, blocked_message: str = BLOCKED_TOOL_MESSAGE
    ) -> None:
        # the wrapped tool's state (function, metadata, callbacks, partial params, context
        # parameter) as is: not rebuilt from its function, which may be a partial or a callable
        self.__dict__.update(tool.__dict__)
        self.gate = GuardedTool(tool, guard, blocked_message=blocked_message)

    def call(self, *args: Any, **kwargs: Any) -> ToolOutput:
        return self.gate.call(*args, **kwargs)

    async def acall(self, *args: Any, **kwargs: Any) -> ToolOutput:
        return await self.gate.acall(*args, **kwargs)


def _guard_tool(tool: Any, guard: Guard) -> Any:
    if isinstance(tool, GuardedTool | GuardedFunctionTool):
        return tool
    if not isinstance(tool, BaseTool):
        if not callable(tool):
            return tool
        tool = FunctionTool.from_defaults(tool)
    if isinstance(tool, FunctionTool) and tool.requires_context:
        # the agent injects its Context only into a FunctionTool it sees as such
        return GuardedFunctionTool(tool, guard)
    return GuardedTool(tool, guard)


def _guard_one(agent: Any, guard: Guard, llm_options: dict[str, Any]) -> None:
    from agentguard_llamaindex._llm import BudgetedLLM

    llm = agent.llm
    if not isinstance(llm, BudgetedLLM):
        agent.llm = BudgetedLLM(guard=guard, llm=llm, **llm_options)
    if agent.tools:
        agent.tools = [_guard_tool(t, guard) for t in agent.tools]


def guard_agent(agent: A, guard: Guard, **llm_options: Any) -> A:
    """Put a workflow agent (``FunctionAgent``, ``ReActAgent``) or every agent of an
    ``AgentWorkflow`` under ``guard``: budgeted LLM, guarded tools, step counting. Returns the
    agent, changed in place. ``llm_options`` go to :class:`BudgetedLLM` (``llms`` for a
    ladder, ``max_tokens``, ``finish_prompt``...).

    Example:
        >>> import asyncio
        >>> import agentguard as ag
        >>> from llama_index.core.agent.workflow import FunctionAgent
        >>> from llama_index.core.tools import FunctionTool
        >>> from agentguard_llamaindex import guard_agent
        >>> from agentguard_llamaindex.testing import ScriptedLLM
        >>> def search(q: str) -> str:
        ...     "Search the web."
        ...     return "nothing new"
        >>> guard = ag.Guard(ag.Policy(max_tool_calls=2, on_limit="finish"), traces=False)
        >>> llm = ScriptedLLM(tool_rounds=-1, replies=["Here is what I found."])
        >>> agent = guard_agent(FunctionAgent(tools=[search], llm=llm), guard)
        >>> async def main():
        ...     async with guard.task("t1") as task:
        ...         result = await agent.run("news?")
        ...     return str(result), task.tool_calls, task.status
        >>> asyncio.run(main())
        ('Here is what I found.', 2, 'finished')
    """
    from agentguard_llamaindex._handler import instrument

    agents = getattr(agent, "agents", None)
    if isinstance(agents, dict):
        for a in agents.values():
            _guard_one(a, guard, llm_options)
    elif hasattr(agent, "llm") and hasattr(agent, "tools"):
        _guard_one(agent, guard, llm_options)
    else:
        raise TypeError(
            f"agent: a {type(agent).__name__} is neither a workflow agent (FunctionAgent, "
            "ReActAgent) nor an AgentWorkflow"
        )
    instrument(guard)
    return agent
