"""The embedded store's in-place operations and the live balances the guard's tasks read.

A task on a plain :class:`MemoryStore` reads the store's own balances (``MemoryStore.live``)
instead of copies each operation hands back; these tests hold the in-place operations to the
public ones, and the tasks' reads to what the store holds.
"""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import agentguard as ag
from agentguard import Balance, BudgetLine, MemoryStore
from agentguard.testing import LoopCheckingStore

LINES = [
    BudgetLine("task:a", {"cost_usd": Decimal("1.00"), "steps": 5}),
    BudgetLine("team:x", {"cost_usd": Decimal("1.50")}),
    BudgetLine("global"),
]

ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("reserve"),
            st.integers(0, 6),
            st.integers(1, 3),
            st.decimals(Decimal("0.01"), Decimal("0.9"), places=2),
        ),
        st.tuples(
            st.just("commit"),
            st.integers(0, 6),
            st.integers(1, 3),
            st.decimals(Decimal("0"), Decimal("1.2"), places=2),
        ),
        st.tuples(st.just("release"), st.integers(0, 6), st.just(1), st.just(Decimal(0))),
        st.tuples(
            st.sampled_from(["charge", "charge_unchecked"]),
            st.just(0),
            st.integers(1, 3),
            st.integers(0, 3),
        ),
    ),
    max_size=40,
)


def _as_dicts(balances: dict[str, Balance] | object) -> dict[str, tuple[dict, dict]]:
    return {
        k: (dict(b.committed), dict(b.reserved))
        for k, b in balances.items()  # type: ignore[attr-defined]
        if b.committed or b.reserved
    }


@settings(max_examples=150, deadline=None)
@given(ops)
def test_in_place_operations_change_the_store_as_the_public_ones_do(
    sequence: list[tuple[str, int, int, object]],
) -> None:
    public, in_place = MemoryStore(), MemoryStore()
    for op, rid_n, n_lines, value in sequence:
        lines = LINES[:n_lines]
        rid = f"r{rid_n}"
        if op == "reserve":
            amounts = {"cost_usd": value, "model_calls": 1}
            try:
                a = public.reserve(rid, lines, amounts)
            except ValueError as exc:  # a reservation id is used once
                with pytest.raises(ValueError, match=str(exc)):
                    in_place.reserve_in_place(rid, lines, amounts)
                continue
            b = in_place.reserve_in_place(rid, lines, amounts)
            assert (a.ok, a.denied) == (b.ok, b.denied)
            assert not b.balances  # none copied back
        elif op == "commit":
            actual = {"cost_usd": value, "model_calls": 1}
            public.commit(rid, lines, actual)
            assert not in_place.commit_in_place(rid, lines, actual)
        elif op == "release":
            public.release(rid)
            in_place.release(rid)
        else:
            check = op == "charge"
            amounts = {"steps": value}
            a = public.charge(lines, amounts, check=check)
            b = in_place.charge_in_place(lines, amounts, check=check)
            assert (a.ok, a.denied) == (b.ok, b.denied)
            assert not b.balances
        keys = [ln.key for ln in LINES]
        assert _as_dicts(public.snapshot(keys)) == _as_dicts(in_place.live)
        assert _as_dicts(in_place.snapshot(keys)) == _as_dicts(in_place.live)


def test_a_keys_live_balance_is_never_replaced_and_snapshots_are_copies() -> None:
    store = MemoryStore()
    store.charge(LINES, {"steps": 1})
    held = {k: (b, b.committed, b.reserved) for k, b in store.live.items()}
    store.reserve("r1", LINES, {"cost_usd": Decimal("0.5")})
    store.commit("r1", LINES, {"cost_usd": Decimal("0.25")})
    store.reserve_in_place("r2", LINES, {"cost_usd": Decimal("0.5")})
    store.release("r2")
    store.charge_in_place(LINES, {"steps": 2}, check=False)
    for key, (b, com, res) in held.items():
        live = store.live[key]
        assert live is b and live.committed is com and live.reserved is res
    assert store.live["task:a"].committed == {"steps": 3, "cost_usd": Decimal("0.25")}
    snap = store.snapshot(["task:a"])["task:a"]
    assert snap == store.live["task:a"] and snap.committed is not com  # a copy
    public = store.charge(LINES[:1], {"steps": 1}).balances["task:a"]
    assert public.committed is not store.live["task:a"].committed  # a copy


def test_a_task_on_the_embedded_store_reads_the_live_balances_of_shared_budgets() -> None:
    policy = ag.Policy(budgets=[ag.Budget(scope="team", max_cost_usd="1")])
    guard = ag.Guard(policy, traces=False)
    with guard.task("a", team="x") as a, guard.task("b", team="x") as b:
        assert a._balances is guard.store.live  # type: ignore[attr-defined]
        call = a.start_model_call("gpt-4o-mini", input_tokens=1000)
        call.end(ag.Usage(1000, 100))
        # b has had no event since a spent: it sees a's spend without reading the store again
        room = b._headroom()
        assert room.budget == "team:x"
        assert room.remaining_usd == Decimal(1) - a.cost_usd


def test_a_task_on_another_store_keeps_its_own_copies() -> None:
    guard = ag.Guard(ag.Policy(max_steps=3), store=LoopCheckingStore(), traces=False)
    with guard.task("t") as task:
        task.step()
        assert task._balances is not guard.store.live  # type: ignore[attr-defined]
        assert task.last_spent.steps == 1
