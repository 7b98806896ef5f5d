"""Test helpers shipped to users: a scripted model that behaves like a provider, offline.

``ScriptedModel`` answers from a script, reports usage the way a provider would (input counted
with the model's tokenizer, output honouring ``max_tokens``, optional cache hits), can take real
time to answer (so concurrency tests have calls truly in flight together), and drives the core
event API exactly as an adapter does. Use it to test policies before shipping them.

Example:
    >>> import agentguard as ag
    >>> from agentguard.testing import ScriptedModel
    >>> guard = ag.Guard(ag.Policy(max_cost_usd="0.01"), traces=False)
    >>> model = ScriptedModel("gpt-4o-mini", replies=["Hello there."])
    >>> with guard.task("t") as task:
    ...     reply = model.invoke(task, [{"role": "user", "content": "hi"}])
    >>> reply.text, reply.usage.output_tokens
    ('Hello there.', 3)
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from agentguard._openai_server import OpenAIServer
from agentguard._store import MemoryStore
from agentguard._usage import Usage

if TYPE_CHECKING:
    from agentguard._decide import Decision
    from agentguard._guard import Task

__all__ = ["LoopCheckingStore", "OpenAIServer", "Reply", "ScriptedModel"]

_FILLER = "The agent considers the retrieved evidence, weighs the options and plans its next step. "


@dataclass(slots=True)
class Reply:
    """What the scripted model answered, and the decision it ran under."""

    text: str
    model: str
    usage: Usage
    cost_usd: Decimal | None
    decision: Decision
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False  # this was the graceful final answer


class ScriptedModel:
    """A provider-like model driven by a script.

    Args:
        model: the model id it claims to be (prices come from the guard's price book).
        replies: texts to answer with, cycled; by default a long planning paragraph.
        reply_tokens: when no replies are given, how many tokens each answer wants to write
            (the answer is cut at the bound ``max_tokens``, like a provider's ``length`` stop).
        tool_calls: a tool call (``{"name": ..., "args": ...}``) attached to every answer that
            is not a final answer — a runaway agent that never stops calling tools.
        cached_fraction: the share of input tokens the provider reports as cache reads.
        latency: seconds each call takes.
        report_usage: ``False`` makes the model omit usage (as some streams do).
    """

    def __init__(
        self,
        model: str,
        *,
        replies: Iterable[str] | None = None,
        reply_tokens: int = 400,
        tool_calls: dict[str, Any] | None = None,
        cached_fraction: float = 0.0,
        latency: float = 0.0,
        report_usage: bool = True,
    ) -> None:
        self.model = model
        self._replies = itertools.cycle(list(replies)) if replies is not None else None
        self.reply_tokens = reply_tokens
        self.tool_call = tool_calls
        self.cached_fraction = cached_fraction
        self.latency = latency
        self.report_usage = report_usage
        self.calls = 0

    def _text(self, model: str, max_tokens: int | None, task: Task) -> str:
        counter = task.guard._counter(model)
        if self._replies is not None:
            text = next(self._replies)
        else:
            text = _FILLER * (self.reply_tokens // 16 + 1)
        if max_tokens is not None:
            tokens = counter.encode(text)
            if len(tokens) > max_tokens:
                text = counter.decode(tokens[:max_tokens])
        return text

    def invoke(
        self,
        task: Task,
        messages: Sequence[Any],
        *,
        tools: Sequence[Any] | None = None,
        max_tokens: int | None = None,
        final: bool = False,
    ) -> Reply:
        """One model call under ``task``: decide, (maybe) finish, call, report usage.

        On a ``finish`` decision the model is called once more without tools and its answer is
        the final one; ``final=True`` makes this call the graceful final answer itself (after
        a ``finish`` decision from a step or a tool cap). Raises
        :class:`~agentguard.BudgetExceeded` when the guard stops the call.
        """
        call = task.start_model_call(
            self.model,
            messages=messages,
            tools=None if final else tools,
            max_tokens=max_tokens,
            finish=final,
        )
        decision = call.decision
        if decision.action == "finish":
            final = True
            call = task.start_model_call(
                call.model, messages=messages, max_tokens=call.max_tokens, finish=True
            )
        try:
            if self.latency:
                time.sleep(self.latency)
            model = call.model
            text = self._text(model, call.max_tokens, task)
            counter = task.guard._counter(model)
            out = counter.count(text)
            sent = counter.count_messages(messages, None if final else tools)
            usage = Usage(sent, out, cache_read_tokens=int(sent * self.cached_fraction))
            self.calls += 1
        except BaseException as exc:
            call.fail(exc)
            raise
        cost = call.end(usage if self.report_usage else None, output_text=text)
        tool_calls = []
        if self.tool_call is not None and not final:
            tool_calls = [dict(self.tool_call, id=f"call_{self.calls}")]
        return Reply(text, model, usage, cost, decision, tool_calls, finished=final)


_SYNC_OPS = ("reserve", "commit", "release", "charge", "snapshot")


class LoopCheckingStore(MemoryStore):
    """A :class:`~agentguard.MemoryStore` that notes every *sync* operation made while an
    asyncio event loop is running on the calling thread — what, on a networked store
    (``RedisStore``), would block that loop for a round trip. An async app (or adapter) should
    leave ``blocking`` empty; ``ops`` counts every operation by name (``"areserve"``...).

    Example:
        >>> import asyncio, agentguard as ag
        >>> from agentguard.testing import LoopCheckingStore
        >>> store = LoopCheckingStore()
        >>> guard = ag.Guard(ag.Policy(max_cost_usd="1"), store=store, traces=False)
        >>> async def run() -> None:
        ...     async with guard.task("t") as task:
        ...         call = task.start_model_call("gpt-4o-mini", input_tokens=10)  # sync: blocks
        ...         await call.aend({"prompt_tokens": 10, "completion_tokens": 2})
        >>> asyncio.run(run())
        >>> store.blocking
        ['reserve']
    """

    def __init__(self) -> None:
        super().__init__()
        self.blocking: list[str] = []
        self.ops: dict[str, int] = {}
        self._async_depth = 0  # inside an async operation (which may use the sync bodies)

    def __getattribute__(self, name: str) -> Any:
        attr = super().__getattribute__(name)
        if name in _SYNC_OPS:
            return self._sync_op(name, attr)
        if name[:1] == "a" and name[1:] in _SYNC_OPS:
            return self._async_op(name, attr)
        return attr

    def _sync_op(self, name: str, fn: Any) -> Any:
        def op(*args: Any, **kwargs: Any) -> Any:
            self.ops[name] = self.ops.get(name, 0) + 1
            if not self._async_depth:
                try:
                    asyncio.get_running_loop()
                except RuntimeError:
                    pass
                else:
                    self.blocking.append(name)
            return fn(*args, **kwargs)

        return op

    def _async_op(self, name: str, fn: Any) -> Any:
        async def op(*args: Any, **kwargs: Any) -> Any:
            self.ops[name] = self.ops.get(name, 0) + 1
            self._async_depth += 1
            try:
                return await fn(*args, **kwargs)
            finally:
                self._async_depth -= 1

        return op
