"""The fast lanes of ``Task.step``, ``Task.start_tool_call`` and ``Task.start_model_call`` (the
embedded store, nothing to trace, no soft limit: the usual case in one function) give what the
general path gives.

The same random policy and sequence of events run on a plain :class:`MemoryStore` (where the
lanes apply) and on a :class:`LoopCheckingStore` (a ``MemoryStore`` subclass: the general path,
as on any other store); every outcome, counter, decision and balance must match.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import agentguard as ag
from agentguard import BudgetExceeded
from agentguard.testing import LoopCheckingStore

policies = st.builds(
    lambda steps, tools, per_tool, on_limit, cost: ag.Policy(
        max_steps=steps,
        max_tool_calls=tools,
        tool_limits={"search": per_tool} if per_tool is not None else {},
        on_limit=on_limit,
        max_cost_usd=cost,
    ),
    st.one_of(st.none(), st.integers(0, 4)),
    st.one_of(st.none(), st.integers(0, 4)),
    st.one_of(st.none(), st.integers(0, 3)),
    st.sampled_from(["raise", "finish", "warn"]),
    st.sampled_from([None, "0.002", "1"]),
)

events = st.lists(
    st.one_of(
        st.just(("step",)),
        st.tuples(st.just("tool"), st.sampled_from(["search", "lookup"])),
        st.tuples(
            st.just("model"),
            st.integers(10, 400),
            st.integers(1, 60),
            st.sampled_from(["gpt-4o-mini", "claude-3-5-haiku"]),  # margins 0 and 0.35
            st.booleans(),  # the messages counted (else input_tokens given)
            st.booleans(),  # ended (else left open: the task's close releases it)
        ),
        st.just(("retry",)),
    ),
    max_size=14,
)


def _run(guard: ag.Guard, sequence: list[tuple[Any, ...]]) -> list[Any]:
    out: list[Any] = []
    with guard.task("t", team="x") as task:
        for event in sequence:
            try:
                if event[0] == "step":
                    d = task.step("agent")
                    out.append(("step", d.action, d.reason, d.limit))
                elif event[0] == "tool":
                    tool = task.start_tool_call(event[1])
                    d = tool.decision
                    out.append(("tool", d.action, d.reason, d.limit, tool.span.decision))
                    if d.proceeds:
                        tool.end()
                elif event[0] == "model":
                    _, n_in, n_out, model, counted, ended = event
                    if counted:
                        messages = [{"role": "user", "content": "order 1182 " * (n_in // 3)}]
                        call = task.start_model_call(model, messages=messages)
                    else:
                        call = task.start_model_call(model, input_tokens=n_in)
                    d = call.decision
                    span = call.span
                    out.append(
                        (
                            "model",
                            (d.action, d.model, d.max_tokens, d.reserve_usd, d.reason, d.limit),
                            (span.kind, span.name, span.model, span.decision, span.reason),
                            dict(span.attrs),
                            (call.input_estimate, call.input_counted, dict(call.amounts)),
                            span.parent_id == (task.current_step_id or task.span.span_id),
                            len(task._open),
                        )
                    )
                    if ended and (d.action != "finish" or call.reservation_id is not None):
                        # now and then more than was reserved (an overspend), or an estimate
                        n_out = n_out * 9 if n_in % 7 == 0 else min(n_out, d.max_tokens or n_out)
                        estimated = n_in % 5 == 0
                        usage = ag.Usage(n_in, n_out, n_in // 4, estimated=estimated)
                        cost = call.end(usage)
                        again = call.end(usage)  # an end repeated changes nothing
                        ended_at = span.end is not None
                        out.append(
                            (cost, again, span.usage, span.cost_usd, dict(span.attrs), ended_at)
                        )
                else:
                    d = task.record_retry("again")
                    out.append(("retry", d.action, d.limit))
            except BudgetExceeded as exc:
                out.append(("stopped", exc.limit, str(exc)))
        open_calls = len(task._open)
        line = guard.store.snapshot([f"task:{task.id}"])[f"task:{task.id}"]
        out.append(
            (
                task.steps,
                task.tool_calls,
                dict(task.tool_calls_by_name),
                task.model_calls,
                task.retries,
                task.finished,
                task.current_step_id is not None,
                [(r.kind, r.action, r.reason, r.limit) for r in task.decisions],
                dict(line.committed),
                dict(line.reserved),
                task.cost_usd,
                task.usage,
                task.overspent,
                open_calls,
            )
        )
    after = guard.store.snapshot([f"task:{task.id}"])[f"task:{task.id}"]  # closed: released
    out.append((dict(after.committed), dict(after.reserved)))
    return out


@settings(max_examples=200, deadline=None)
@given(policies, events)
@example(  # a model's second call takes the lane: counted with a margin, then left open
    ag.Policy(max_steps=3),
    [("model", 300, 20, "claude-3-5-haiku", True, True)] * 2
    + [("step",), ("tool", "search"), ("model", 90, 9, "claude-3-5-haiku", True, False)],
)
@example(  # the second call writes more than its cap: an overspend, on the general path
    ag.Policy(max_output_tokens=10, max_cost_usd="1"),
    [("model", 49, 30, "gpt-4o-mini", False, True)] * 2,
)
def test_the_fast_lanes_give_what_the_general_path_gives(
    policy: ag.Policy, sequence: list[tuple[Any, ...]]
) -> None:
    fast = ag.Guard(policy, traces=False)
    general = ag.Guard(policy, store=LoopCheckingStore(), traces=False)
    assert _run(fast, sequence) == _run(general, sequence)


def test_a_step_and_a_tool_call_on_the_fast_lane_charge_the_store_once_each() -> None:
    guard = ag.Guard(ag.Policy(max_steps=5, max_tool_calls=5), traces=False)
    with guard.task("t") as task:
        assert task._fast()
        d = task.step("agent")
        tool = task.start_tool_call("search")
        tool.end()
        assert (d.action, tool.decision.action, tool.span.decision) == ("allow", "allow", "allow")
        assert tool.span.parent_id == task.current_step_id
        assert guard.store.live[f"task:{task.id}"].committed == {  # type: ignore[attr-defined]
            "steps": 1,
            "tool_calls": 1,
            "tool:search": 1,
        }
        assert (task.steps, task.tool_calls, task.tool_calls_by_name) == (1, 1, {"search": 1})


def test_the_lanes_are_not_taken_with_traces_soft_limits_or_another_store() -> None:
    soft = ag.Policy(max_cost_usd=Decimal("1"), soft_limits=[0.5])
    for guard, fast in (
        (ag.Guard(traces="memory"), False),
        (ag.Guard(soft, traces=False), False),
        (ag.Guard(store=LoopCheckingStore(), traces=False), False),
        (ag.Guard(traces=False), True),
    ):
        with guard.task() as task:
            assert task._fast() is fast


def test_tasks_of_one_guard_and_policy_share_their_rate_maps() -> None:
    policy = ag.Policy(max_cost_usd="1", downgrade=[ag.Downgrade(at=0.5, to="gpt-4o-mini")])
    guard = ag.Guard(policy, traces=False)
    with guard.task("a") as a:
        a.start_model_call("gpt-4o", input_tokens=10).end(ag.Usage(10, 5))
        with guard.task("b") as b, guard.task("c", policy=ag.Policy(max_steps=2)) as c:
            assert b._rate_maps is a._rate_maps  # b's first call of gpt-4o prices nothing
            assert set(b._rate_maps["gpt-4o"]) == {"gpt-4o", "gpt-4o-mini"}
            assert c._rate_maps is not a._rate_maps and not c._rate_maps
            # an unpriced model under a cost limit is refused for every task, not only the first
            for task in (a, b):
                with pytest.raises(ag.UnknownModelError):
                    task.start_model_call("no-such-model-xyz", input_tokens=10)


def test_only_a_task_on_the_embedded_store_has_nothing_to_await() -> None:
    # an async adapter calls the sync events directly where awaits_store is False: only on the
    # plain MemoryStore, whose async twins would only run them (a subclass is awaited)
    for store, awaits in ((None, False), (LoopCheckingStore(), True)):
        guard = ag.Guard(store=store, traces=False)
        assert guard.awaits_store is awaits
        with guard.task() as task:
            assert task.awaits_store is awaits
