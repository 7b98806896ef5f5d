"""Under ``ainvoke`` every budget-store operation of the graph guard is awaited: on a networked
store (Redis) a sync operation would block the event loop for a round trip. Checked with
``LoopCheckingStore``, which notes sync operations made while a loop runs on their thread."""

from __future__ import annotations

from typing import Any

import pytest
from langgraph.checkpoint.memory import InMemorySaver
from lg_support import Scripted, react_graph, user
from test_lg_fanout import build as fan_out_graph

import agentguard as ag
from agentguard.testing import LoopCheckingStore
from agentguard_langgraph import GraphGuard


def guard_on(store: Any, **policy: Any) -> ag.Guard:
    return ag.Guard(ag.Policy(**policy), store=store, traces=False)


async def run_both(policy: dict[str, Any], steps_in: str) -> tuple[Any, Any, LoopCheckingStore]:
    """The same graph run with ``invoke`` (outside any loop) and with ``ainvoke``."""
    results = []
    store = LoopCheckingStore()
    for mode in ("sync", "async"):
        guard = guard_on(LoopCheckingStore() if mode == "sync" else store, **policy)
        gg = GraphGuard(guard, models={"gpt-4o-mini": Scripted(model_name="gpt-4o-mini")})
        graph = gg.bind(react_graph(gg, Scripted(model_name="gpt-4o"), steps_in=steps_in))
        out = graph.invoke(user()) if mode == "sync" else await graph.ainvoke(user())
        results.append((out, graph.last_task))
    return results[0], results[1], store


@pytest.mark.parametrize("steps_in", ["node", "route"])
@pytest.mark.parametrize(
    "policy",
    [
        {"max_steps": 4, "on_limit": "finish"},  # a step cap: the final answer
        {"max_tool_calls": 2, "on_limit": "finish"},  # a tool cap: a blocked tool call
        {  # a money ceiling: a downgrade, then the final answer
            "max_cost_usd": "0.004",
            "downgrade": [ag.Downgrade(at=0.5, to="gpt-4o-mini")],
            "on_limit": "finish",
        },
    ],
    ids=["steps", "tools", "money"],
)
async def test_an_async_run_never_blocks_its_loop_on_the_store(
    policy: dict[str, Any], steps_in: str
) -> None:
    (sync_out, sync_task), (async_out, async_task), store = await run_both(policy, steps_in)
    assert store.blocking == []
    # the store was really used, through its async methods
    assert store.ops.get("areserve", 0) == async_task.model_calls > 0
    assert store.ops.get("acommit", 0) == async_task.model_calls
    assert store.ops.get("acharge", 0) >= async_task.steps + async_task.tool_calls
    # and the async run decided exactly as the sync one
    assert [(d.kind, d.action) for d in async_task.decisions] == [
        (d.kind, d.action) for d in sync_task.decisions
    ]
    assert async_task.cost_usd == sync_task.cost_usd
    assert async_out["agentguard"]["cost_usd"] == sync_out["agentguard"]["cost_usd"]
    assert async_out["agentguard"]["decisions"] == sync_out["agentguard"]["decisions"]


async def test_a_hard_stop_under_ainvoke_is_awaited_too() -> None:
    store = LoopCheckingStore()
    guard = guard_on(store, max_tool_calls=1, on_limit="raise")
    gg = GraphGuard(guard)
    graph = gg.bind(react_graph(gg, Scripted(model_name="gpt-4o"), steps_in="node"))
    with pytest.raises(ag.BudgetExceeded) as err:
        await graph.ainvoke(user())
    assert err.value.limit == "max_tool_calls"
    assert store.blocking == []


async def test_branches_and_a_resumed_thread_are_awaited() -> None:
    # Send fan-out: each branch a child task (opened, read and closed with the async API)
    store = LoopCheckingStore()
    guard = guard_on(store, max_cost_usd="0.05", max_steps=3, on_limit="finish")
    gg = GraphGuard(guard)
    graph = gg.bind(fan_out_graph(gg, Scripted(model_name="gpt-4o")))
    out = await graph.ainvoke({"topics": [f"topic {i}" for i in range(4)], "answers": []})
    assert len(out["answers"]) == 4
    assert store.blocking == []

    # a thread budget: the resumed run is seeded from the checkpoint with the async API
    store = LoopCheckingStore()
    guard = guard_on(store, max_steps=6, on_limit="finish")
    gg = GraphGuard(guard, budget="thread")
    graph = gg.bind(react_graph(gg, Scripted(model_name="gpt-4o"), checkpointer=InMemorySaver()))
    config: Any = {"configurable": {"thread_id": "t-1"}}
    first = await graph.ainvoke(user(), config)
    second = await graph.ainvoke(user("And order 1183?"), config)
    assert store.blocking == []
    assert second["agentguard"]["steps"] >= first["agentguard"]["steps"]
    assert graph.last_task is not None and graph.last_task.steps <= 1  # the thread's cap held


# -- the same, on a real Redis server ----------------------------------------------------------


def _redis_store(kind: str) -> Any:
    """A ``RedisStore`` on the test suite's private server (``tests/redis_servers.py``: a real
    ``redis-server`` on a free loopback port; missing, it skips — or fails under ``CI=true``)."""
    import sys
    import uuid
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
    import redis_servers

    server = redis_servers.require(kind)
    namespace = f"lg-{uuid.uuid4().hex[:10]}"
    if kind == "single":
        return ag.RedisStore.from_url(server.url, namespace=namespace)
    return ag.RedisStore.from_cluster(server.url, namespace=namespace)


@pytest.mark.parametrize("kind", ["single", "cluster"])
async def test_an_async_graph_on_a_real_redis_store_decides_as_on_memory(kind: str) -> None:
    policy = {
        "max_cost_usd": "0.004",
        "downgrade": [ag.Downgrade(at=0.5, to="gpt-4o-mini")],
        "max_tool_calls": 3,
        "on_limit": "finish",
    }
    results = []
    for store in (ag.MemoryStore(), _redis_store(kind)):
        guard = guard_on(store, **policy)
        gg = GraphGuard(guard, models={"gpt-4o-mini": Scripted(model_name="gpt-4o-mini")})
        graph = gg.bind(react_graph(gg, Scripted(model_name="gpt-4o"), steps_in="node"))
        out = await graph.ainvoke(user())
        task = graph.last_task
        assert task is not None
        results.append((out["agentguard"], [(d.kind, d.action) for d in task.decisions], task))
        guard.close()
    (mem_spend, mem_kinds, mem_task), (redis_spend, redis_kinds, redis_task) = results
    assert redis_kinds == mem_kinds == [("model", "finish")]  # the ceiling's final answer
    assert redis_spend == mem_spend
    assert redis_spend["model_calls"] == mem_task.model_calls > 1
    assert redis_task.cost_usd == mem_task.cost_usd
    # the store holds what the task spent (read back from Redis)
    assert redis_task.spent.cost_usd == redis_task.cost_usd
