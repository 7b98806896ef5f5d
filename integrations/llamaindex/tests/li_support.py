"""Shared test support for agentguard_llamaindex's tests."""

from __future__ import annotations

import asyncio
import functools
import gc
import warnings
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, ParamSpec

from agentguard_llamaindex import _handler

P = ParamSpec("P")


def clean_llamaindex_state() -> Iterator[None]:
    """Around a test: afterwards, detach the handlers it attached to LlamaIndex's global root
    dispatcher (``guard_agent`` attaches them), and collect the agents it built.

    A workflow agent's default memory is a SQLAlchemy chat store on an in-memory aiosqlite
    database that LlamaIndex never closes: its ``ResourceWarning`` would surface in whichever
    later test the garbage collector happens to run, so the agents are collected here.
    """
    before = set(map(id, _handler._REGISTRY.values()))
    yield
    for inst in list(_handler._REGISTRY.values()):
        if id(inst) not in before:
            inst.detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def in_fresh_loop(test: Callable[P, Coroutine[Any, Any, None]]) -> Callable[P, None]:
    """Run an async test with ``asyncio.run`` (a loop of its own, shut down properly).

    Workflow agents keep their default memory in an aiosqlite database; under
    pytest-asyncio's loop its connection outlives the test and warns wherever it is
    collected, while ``asyncio.run`` shuts it down with the loop.
    """

    @functools.wraps(test)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        asyncio.run(test(*args, **kwargs))

    return run
