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
from agentguard._decide import (
    CallRequest,
    Headroom,
    Spent,
    decide_model_call,
    quick_allow,
    quick_facts,
    rung_threshold,
)
from agentguard._pricing import PriceBook
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
                    _, n_in, n_out, model, counted, ended = event[:6]
                    cap = event[6] if len(event) > 6 else None  # the call's own max_tokens
                    if counted:
                        messages = [{"role": "user", "content": "order 1182 " * (n_in // 3)}]
                        call = task.start_model_call(model, messages=messages, max_tokens=cap)
                    else:
                        call = task.start_model_call(model, input_tokens=n_in, max_tokens=cap)
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
            except ValueError as exc:  # an output cap below 1
                out.append(("refused", str(exc)))
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
    _same_on_both_paths(policy, sequence)


def _same_on_both_paths(policy: ag.Policy, sequence: list[tuple[Any, ...]]) -> None:
    fast = ag.Guard(policy, traces=False)
    general = ag.Guard(policy, store=LoopCheckingStore(), traces=False)
    assert _run(fast, sequence) == _run(general, sequence)


# Policies that shape a model call's decision: model and input caps, output caps, token
# totals (no quick allow), a ladder (rungs low enough to be passed), a final call's model, and
# a team budget (money or tokens) beside the task's own.
model_policies = st.builds(
    lambda calls, inputs, out, totals, ladder, final, on_limit, cost, team, tools: ag.Policy(
        max_model_calls=calls,
        max_tool_calls=tools,
        max_input_tokens=inputs,
        max_output_tokens=out,
        max_total_tokens=totals[0],
        max_total_output_tokens=totals[1],
        downgrade=[ag.Downgrade(at=at, to=to) for at, to in ladder],
        finish_model=final[0],
        finish_output_tokens=final[1],
        on_limit=on_limit,
        max_cost_usd=cost,
        budgets=[ag.Budget(scope="team", **team)] if team else [],
    ),
    st.one_of(st.none(), st.none(), st.integers(0, 8)),
    st.one_of(st.none(), st.none(), st.integers(50, 3000)),
    st.one_of(st.none(), st.integers(1, 30), st.integers(100, 500)),
    st.sampled_from([(None, None)] * 4 + [(3000, None), (None, 600)]),
    st.sampled_from([(), ((0.3, "gpt-4o-mini"),), ((0.5, "gpt-4o-mini"), (0.8, "gpt-4.1-nano"))]),
    st.tuples(st.sampled_from([None, "gpt-4o-mini", "gpt-4o"]), st.sampled_from([64, 256])),
    st.sampled_from(["raise", "finish", "warn"]),
    st.sampled_from([None, "0.004", "0.02", "0.05", "1", "1"]),
    st.sampled_from([None, None, {"max_cost_usd": "0.01"}, {"max_total_tokens": 2500}]),
    st.one_of(st.none(), st.integers(0, 4)),
)

model_call = st.tuples(
    st.just("model"),
    st.integers(10, 800),
    st.integers(1, 400),
    st.sampled_from(["gpt-4o", "gpt-4o", "gpt-4o", "gpt-4o-mini"]),  # mostly one: its lane
    st.booleans(),
    st.sampled_from([True, True, True, False]),  # mostly ended (one open: nothing quick)
    st.one_of(st.none(), st.integers(0, 40), st.integers(100, 600)),
)
model_events = st.lists(
    st.one_of(  # mostly model calls
        model_call,
        model_call,
        model_call,
        st.just(("step",)),
        st.tuples(st.just("tool"), st.sampled_from(["search", "lookup"])),
    ),
    min_size=3,
    max_size=12,
)


@settings(max_examples=400, deadline=None)
@given(model_policies, model_events)
@example(  # the ladder's first rung passed on the second call: the quick allow is not taken
    ag.Policy(max_cost_usd="0.004", downgrade=[ag.Downgrade(at=0.3, to="gpt-4o-mini")]),
    [("model", 400, 100, "gpt-4o", False, True, 120)] * 3,
)
@example(  # past the first of two rungs, below the second: the first rung's model
    ag.Policy(
        max_cost_usd="0.01",
        max_output_tokens=100,
        downgrade=[ag.Downgrade(at=0.5, to="gpt-4o-mini"), ag.Downgrade(at=0.8, to="gpt-4.1-nano")],
    ),
    [("model", 100, 100, "gpt-4o", False, True, None)] * 7,
)
@example(  # a dearer final model: its keep-back leaves the second call less than its cap
    ag.Policy(
        max_cost_usd="0.0032", max_output_tokens=100, finish_model="gpt-4o", on_limit="finish"
    ),
    [("model", 100, 100, "gpt-4o-mini", False, True, None)] * 3,
)
@example(  # a tool call blocked under finish: the next model call is the final one
    ag.Policy(tool_limits={"search": 0}, max_output_tokens=100, on_limit="finish"),
    [("model", 100, 10, "gpt-4o", False, True, None), ("tool", "search")] * 2,
)
@example(  # a team budget tighter than the task's: the least money left is the team's
    ag.Policy(
        max_cost_usd="1",
        max_output_tokens=100,
        on_limit="finish",
        budgets=[ag.Budget(scope="team", max_cost_usd="0.006")],
    ),
    [("model", 100, 100, "gpt-4o", False, True, None)] * 4,
)
@example(  # the money kept back for the final call leaves too little for the full cap
    ag.Policy(max_cost_usd="0.01", max_output_tokens=100, on_limit="finish"),
    [("model", 100, 100, "gpt-4o", False, True, None)] * 7,
)
@example(  # under finish the last model call is kept for the final answer
    ag.Policy(max_model_calls=3, max_output_tokens=100, on_limit="finish"),
    [("model", 100, 10, "gpt-4o", False, True, None)] * 4,
)
@example(  # under finish a used-up tool cap makes the next model call the final one
    ag.Policy(max_tool_calls=1, max_output_tokens=100, on_limit="finish"),
    [("model", 100, 10, "gpt-4o", False, True, None), ("tool", "search")] * 2,
)
def test_model_calls_on_the_lane_are_decided_as_decide_model_call_decides(
    policy: ag.Policy, sequence: list[tuple[Any, ...]]
) -> None:
    # the lane's quick allow (no Spent, no Headroom) against decide_model_call on the general
    # path: the same decisions, spans, reservations and balances
    _same_on_both_paths(policy, sequence)


@settings(max_examples=500, deadline=None)
@given(
    model_policies,
    st.tuples(st.integers(0, 9), st.integers(0, 5), st.integers(0, 9), st.integers(0, 4000)),
    st.sampled_from(["0.01", "0.02", "1"]),
    st.one_of(st.decimals("0", "0.03", places=6), st.just(Decimal("0.006"))),
    st.sampled_from(["gpt-4o", "gpt-4o-mini"]),
    st.integers(0, 1500),
    st.one_of(st.none(), st.integers(0, 40), st.integers(100, 600)),
)
@example(  # the usual call: quick_allow answers it
    ag.Policy(max_cost_usd="1", max_output_tokens=100, on_limit="finish"),
    (2, 1, 2, 300),
    "1",
    Decimal("0.01"),
    "gpt-4o",
    400,
    None,
)
@example(  # the step cap reached: decide_model_call finishes
    ag.Policy(max_steps=3, max_output_tokens=100, on_limit="finish"),
    (2, 1, 3, 300),
    "1",
    Decimal("0.01"),
    "gpt-4o",
    400,
    None,
)
def test_quick_allow_decides_as_decide_model_call_where_it_decides(
    policy: ag.Policy,
    counts: tuple[int, int, int, int],
    limit: str,
    used: Decimal,
    model: str,
    estimate: int,
    max_tokens: int | None,
) -> None:
    # the pure function itself, against decide_model_call on the same task: a money budget
    # of ``limit`` with ``used`` spent (or none), the counts committed, nothing in flight
    facts = quick_facts(policy)
    if facts is None:  # a policy capping total or output tokens: never asked
        assert policy.max_total_tokens is not None or policy.max_total_output_tokens is not None
        return
    book = PriceBook()
    names = {model, *(r.to for r in policy.downgrade), policy.finish_model or model}
    rates = {m: book.rates(m) for m in names}
    calls, tools, steps, inputs = counts
    committed = {"model_calls": calls, "tool_calls": tools, "steps": steps, "input_tokens": inputs}
    spent = Spent(used, inputs, 0, calls, tools, {}, 0, steps)
    request = CallRequest(model, estimate, max_tokens)
    for lim in (Decimal(limit), None):  # a money budget, and none
        if lim is not None:
            if not used < rung_threshold(facts, lim):
                continue  # at or past the first rung: the guard asks decide_model_call
            room = Headroom(max(lim - used, Decimal(0)), float(used / lim), lim, "task:t")
        else:
            spent.cost_usd, room = Decimal(0), Headroom()
        quick = quick_allow(
            policy, facts, committed, None if lim is None else lim - used, model, estimate,
            max_tokens, rates,
        )  # fmt: skip
        if quick is not None:
            assert quick == decide_model_call(policy, spent, room, request, rates)
            assert quick.action == "allow" and quick.model == model


def test_the_quick_allow_decides_without_decide_model_call_only_below_the_first_rung(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import agentguard._guard as guard_module

    asked: list[str] = []
    real = guard_module.decide_model_call

    def counting(*args: Any, **kw: Any) -> Any:
        d = real(*args, **kw)
        asked.append(d.action)
        return d

    monkeypatch.setattr(guard_module, "decide_model_call", counting)
    policy = ag.Policy(
        max_cost_usd="1",
        max_output_tokens=100,
        downgrade=[ag.Downgrade(at=0.5, to="gpt-4o-mini")],
        on_limit="finish",
    )
    guard = ag.Guard(policy, traces=False)
    with guard.task("t") as task:
        key = f"task:{task.id}"
        task.start_model_call("gpt-4o", input_tokens=100).end(ag.Usage(0, 0))  # prices gpt-4o
        decisions = []
        # spent: well below the rung, within the rounding slack below it, at it
        for spent in ("0.49", "0.4999999999999", "0.5"):
            guard.store.live.clear()  # type: ignore[attr-defined]
            guard.store.charge([task._lines[0]], {"cost_usd": Decimal(spent)}, check=False)
            assert guard.store.live[key].committed["cost_usd"] == Decimal(spent)  # type: ignore[attr-defined]
            asked.clear()
            call = task.start_model_call("gpt-4o", input_tokens=100)
            d = call.decision
            decisions.append((d.action, d.model, d.reason, asked[:1]))
            call.end(ag.Usage(0, 0))
    # the quick allow decided the first; decide_model_call the two at or near the rung
    assert decisions == [
        ("allow", "gpt-4o", "within budget", []),
        ("allow", "gpt-4o", "within budget", ["allow"]),
        ("downgrade", "gpt-4o-mini", decisions[2][2], ["downgrade"]),
    ]
    assert decisions[2][2].startswith("gpt-4o -> gpt-4o-mini: 50% of task:t spent")


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
