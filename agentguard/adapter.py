"""One body for the sync and the async path of an event (for adapters; the core uses it too).

An adapter's event handling (LangChain's middleware gate and callback hooks, LlamaIndex's
budget-aware LLM and guarded tools) is written once, as a generator that yields the guard
events it needs — ``(target, name, args, kwargs)``, e.g. ``(task, "start_model_call",
(model,), {...})`` — and receives their results (or has their exceptions thrown in).
:func:`drive` calls the sync events (``task.start_model_call``); :func:`adrive` awaits their
async twins (``task.astart_model_call``: the name with an ``a`` in front), so an async run never
blocks its event loop on a networked budget store while the decisions stay the same code. The
core's own multi-step events (a failed call's release, a task's close) yield budget-store
operations the same way.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, TypeVar

__all__ = ["Event", "Steps", "adrive", "drive"]

#: ``(target, event name, args, kwargs)``: a guard, task, model call or tool call event.
Event = tuple[Any, str, tuple[Any, ...], dict[str, Any]]
T = TypeVar("T")
#: A generator of events returning ``T``.
Steps = Generator[Event, Any, T]
NO_KW: dict[str, Any] = {}  # the kwargs of most events (only ever unpacked, never changed)


def drive(steps: Steps[T]) -> T:
    """Run ``steps`` on the sync events.

    Example:
        >>> def steps():
        ...     n = yield ([1, 2], "index", (2,), {})
        ...     return n + 1
        >>> drive(steps())
        2
    """
    try:
        op = next(steps)
        while True:
            target, name, args, kwargs = op
            try:
                result = getattr(target, name)(*args, **kwargs)
            except BaseException as exc:
                op = steps.throw(exc)
            else:
                op = steps.send(result)
    except StopIteration as stop:
        value: T = stop.value
        return value


async def adrive(steps: Steps[T]) -> T:
    """Run ``steps`` awaiting the async twin of each event (``a`` + its name).

    Example:
        >>> import asyncio
        >>> class Task:
        ...     def step(self, name): return "sync " + name
        ...     async def astep(self, name): return "async " + name
        >>> def steps():
        ...     return (yield (Task(), "step", ("agent",), {}))
        >>> drive(steps()), asyncio.run(adrive(steps()))
        ('sync agent', 'async agent')
    """
    try:
        op = next(steps)
        while True:
            target, name, args, kwargs = op
            try:
                result = await getattr(target, "a" + name)(*args, **kwargs)
            except BaseException as exc:
                op = steps.throw(exc)
            else:
                op = steps.send(result)
    except StopIteration as stop:
        value: T = stop.value
        return value
