"""The guard end to end through the core event API: decisions, reservations, traces."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import pytest
from genai_prices import Usage as GUsage
from genai_prices import calc_price
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

import agentguard as ag
from agentguard.testing import ScriptedModel

D = Decimal
MSGS = [{"role": "user", "content": "Plan a trip to Lisbon and book what is needed."}]


def guard(**policy: Any) -> ag.Guard:
    return ag.Guard(ag.Policy(**policy), traces="memory")


def spans(g: ag.Guard) -> list[ag.Span]:
    return g.sink.spans  # type: ignore[attr-defined, no-any-return]


def genai_cost(model: str, u: ag.Usage) -> Decimal:
    usage = GUsage(
        input_tokens=u.input_tokens,
        cache_read_tokens=u.cache_read_tokens,
        cache_write_tokens=u.cache_write_tokens,
        output_tokens=u.output_tokens,
    )
    return calc_price(usage, model).total_price


def test_issue_example_runaway_agent_downgrades_then_finishes() -> None:
    g = guard(
        max_cost_usd="0.05",
        max_model_calls=12,
        max_output_tokens=800,
        soft_limits=(0.5, 0.8),
        downgrade=[ag.Downgrade(at=0.6, to="gpt-4o-mini")],
        on_limit="finish",
    )
    model = ScriptedModel("gpt-4o", reply_tokens=900, tool_calls={"name": "search", "args": {}})
    history = list(MSGS)
    with g.task("ticket-42", feature="support", team="cx") as task:
        for _ in range(100):
            reply = model.invoke(task, history)
            history.append({"role": "assistant", "content": reply.text})
            if reply.finished:
                break
            history.append({"role": "tool", "content": "result " * 50})
    assert reply.finished
    assert isinstance(task.cost_usd, Decimal)
    assert task.cost_usd <= D("0.05")
    actions = [d.action for d in task.decisions if d.kind == "model"]
    assert "downgrade" in actions
    assert actions.index("downgrade") < actions.index("finish")
    assert task.status == "finished"
    # the cost is exactly genai-prices' for the same calls
    model_spans = [s for s in spans(g) if s.kind == "model" and s.usage is not None]
    assert sum(genai_cost(s.model or "", s.usage) for s in model_spans if s.usage) == task.cost_usd
    assert {s.model for s in model_spans} == {"gpt-4o", "gpt-4o-mini"}
    # a downgraded call saved what the same tokens cost on gpt-4o, minus what they cost
    downgraded = [s for s in model_spans if s.attrs.get("requested_model") == "gpt-4o"]
    assert downgraded
    assert task.saved_usd == sum(
        genai_cost("gpt-4o", s.usage) - genai_cost("gpt-4o-mini", s.usage)
        for s in downgraded
        if s.usage
    )
    assert task.saved_usd > 0
    record = g.sink.tasks[-1]  # type: ignore[attr-defined]
    assert record.task_id == "ticket-42"
    assert record.decisions["finish"] == 1
    assert record.tags == {"feature": "support", "team": "cx"}


def test_raise_mode_stops_with_numbers_and_never_overspends() -> None:
    g = guard(max_cost_usd="0.002", max_output_tokens=200)
    with pytest.raises(ag.BudgetExceeded) as info, g.task("t") as task:
        for _ in range(1000):
            call = task.start_model_call("gpt-4o-mini", input_tokens=2000)
            call.end(ag.Usage(2000, call.max_tokens or 0))
    err = info.value
    assert err.limit == "max_cost_usd"
    assert err.limit_value == D("0.002")
    assert "max_cost_usd of 0.002" in str(err)
    assert err.task_id == "t"
    assert task.cost_usd is not None
    assert task.cost_usd <= D("0.002")
    assert task.status == "stopped"
    assert task.limit_hit == "max_cost_usd"


def test_output_cap_is_min_of_policy_caller_and_what_is_left() -> None:
    g = guard(max_cost_usd="1", max_output_tokens=800)
    with g.task() as task:
        assert task.start_model_call("gpt-4o", input_tokens=10, max_tokens=300).max_tokens == 300
        assert task.start_model_call("gpt-4o", input_tokens=10).max_tokens == 800
    g2 = guard(max_cost_usd="0.001")
    with g2.task() as task:
        call = task.start_model_call("gpt-4o", input_tokens=100)
        # $0.001 - 100 x $2.5/M input = $0.00075 of output at $10/M = 75 tokens
        assert call.max_tokens == 75
        assert call.decision.reserve_usd == D("0.001")


@pytest.mark.parametrize("cap", [0, -5])
@pytest.mark.parametrize("on_limit", ["raise", "finish", "warn"])
def test_an_output_cap_below_one_is_refused_naming_the_field_and_value(
    cap: int, on_limit: str
) -> None:
    # not a budget stop ("max_total_tokens of None", "$1 left cannot pay for..."): bad input
    for policy in (ag.Policy(on_limit=on_limit), ag.Policy(max_cost_usd="1", on_limit=on_limit)):
        g = ag.Guard(policy, traces=False)  # nothing to trace: the lanes are taken
        with g.task() as task:
            task.start_model_call("gpt-4o", input_tokens=10).end(ag.Usage(10, 5))  # priced
            for _ in range(2):  # the first call of a model, and one on the fast lane
                with pytest.raises(ValueError, match=rf"max_tokens={cap}: .* at least 1 token"):
                    task.start_model_call("gpt-4o", input_tokens=10, max_tokens=cap)
            with pytest.raises(ValueError, match=rf"max_tokens={cap}"):
                asyncio.run(task.astart_model_call("gpt-4o", input_tokens=10, max_tokens=cap))
            assert (task.model_calls, task.finished, task.decisions) == (1, False, [])
            line = g.store.snapshot([f"task:{task.id}"])[f"task:{task.id}"]
            assert line.reserved == {}  # nothing reserved, nothing lost
            call = task.start_model_call("gpt-4o", input_tokens=10, max_tokens=1)
            assert (call.decision.action, call.max_tokens) == ("allow", 1)
            call.end(ag.Usage(10, 1))


def test_model_call_cap_keeps_last_call_for_the_final_answer() -> None:
    g = guard(max_model_calls=3, on_limit="finish")
    m = ScriptedModel("gpt-4o-mini", replies=["thinking"], tool_calls={"name": "x", "args": {}})
    with g.task() as task:
        replies = [m.invoke(task, MSGS) for _ in range(3)]
        assert [r.finished for r in replies] == [False, False, True]
        with pytest.raises(ag.BudgetExceeded, match="graceful final call"):
            m.invoke(task, MSGS)
    assert task.model_calls == 3


def test_model_call_cap_raise() -> None:
    g = guard(max_model_calls=2)
    with pytest.raises(ag.BudgetExceeded, match="max_model_calls of 2"), g.task() as task:
        for _ in range(3):
            task.start_model_call("gpt-4o-mini", input_tokens=5).end(ag.Usage(5, 1))
    assert task.model_calls == 2


def test_tool_caps_block_under_finish_and_raise_otherwise() -> None:
    g = guard(max_tool_calls=3, tool_limits={"search": 1}, on_limit="finish")
    with g.task() as task:
        assert task.start_tool_call("search").allowed
        blocked = task.start_tool_call("search")
        assert blocked.decision.action == "block"
        assert blocked.decision.limit == "tool_limits.search"
        assert task.start_tool_call("fetch").allowed
        assert task.start_tool_call("fetch").allowed
        assert task.start_tool_call("fetch").decision.action == "block"
        # all tools used: the next model call is the final answer
        assert task.start_model_call("gpt-4o-mini", input_tokens=9).decision.action == "finish"
    assert task.tool_calls == 3
    assert task.tool_calls_by_name == {"search": 1, "fetch": 2}
    g2 = guard(tool_limits={"search": 1})
    with pytest.raises(ag.BudgetExceeded, match=r"tool_limits\.search"), g2.task() as task:
        task.start_tool_call("search").end()
        task.start_tool_call("search")


def test_retries_and_steps() -> None:
    g = guard(max_retries=2, max_steps=3, on_limit="finish")
    with g.task() as task:
        task.record_retry("rate limit")
        task.record_retry("rate limit")
        with pytest.raises(ag.BudgetExceeded, match="max_retries"):
            task.record_retry("rate limit")
        assert [task.step("plan").action for _ in range(4)] == [
            "allow",
            "allow",
            "allow",
            "finish",
        ]
    g2 = guard(max_steps=1)
    with pytest.raises(ag.BudgetExceeded, match="max_steps"), g2.task() as task:
        task.step()
        task.step()


def test_warn_mode_proceeds_and_records() -> None:
    g = guard(max_cost_usd="0.0001", max_model_calls=1, on_limit="warn")
    with capture_logs() as logs, g.task() as task:
        for _ in range(3):
            call = task.start_model_call("gpt-4o", input_tokens=1000)
            call.end(ag.Usage(1000, 100))
    assert task.model_calls == 3
    assert task.cost_usd == 3 * (D("0.0025") + D("0.001"))
    assert any(d.action == "warn" for d in task.decisions)
    assert any(e["event"] == "agentguard.warn" for e in logs)


def test_child_tasks_roll_up_to_the_parent_budget() -> None:
    g = guard(max_cost_usd="0.01", max_output_tokens=100)
    child_policy = ag.Policy(max_cost_usd="0.004", max_output_tokens=100)
    with g.task("parent") as parent:
        spent_by_children = D(0)
        for i in range(5):
            with g.task(f"child-{i}", policy=child_policy) as child:
                assert child.parent is parent
                try:
                    while True:
                        c = child.start_model_call("gpt-4o", input_tokens=500)
                        c.end(ag.Usage(500, c.max_tokens or 0))
                except ag.BudgetExceeded as exc:
                    assert exc.budget in ("task:parent", f"task:child-{i}")
            assert child.cost_usd is not None
            assert child.cost_usd <= D("0.004")
            spent_by_children += child.cost_usd
        assert parent.spent.cost_usd == spent_by_children
        assert spent_by_children <= D("0.01")
        assert D("0.01") - spent_by_children < D("0.0025")  # the parent ran out, not luck


def test_team_budget_shared_by_tasks_with_daily_window() -> None:
    g = guard(
        max_output_tokens=100,
        budgets=[ag.Budget(scope="team", max_cost_usd="0.003", window="day")],
    )
    total = D(0)
    with pytest.raises(ag.BudgetExceeded) as info:
        for i in range(100):
            with g.task(f"t{i}", team="cx") as task:
                c = task.start_model_call("gpt-4o", input_tokens=100)
                c.end(ag.Usage(100, min(100, c.max_tokens or 0)))
                total += task.cost_usd or 0
    assert info.value.budget is not None
    assert info.value.budget.startswith("team:cx@day:")
    assert total <= D("0.003")
    with g.task("other", team="growth") as task:  # another team is not affected
        task.start_model_call("gpt-4o", input_tokens=100).end(ag.Usage(100, 100))


def test_unknown_model_refused_under_cost_limit_and_none_without() -> None:
    g = guard(max_cost_usd="1")
    with g.task() as task, pytest.raises(ag.UnknownModelError, match="my-local-llm"):
        task.start_model_call("my-local-llm", input_tokens=10)
    g2 = guard(max_model_calls=5)
    with g2.task() as task:
        c = task.start_model_call("my-local-llm", input_tokens=10)
        assert c.end(ag.Usage(10, 5)) is None
    assert task.cost_usd is None
    assert task.priced_cost_usd == 0
    assert task.usage == ag.Usage(10, 5)
    g3 = ag.Guard(
        ag.Policy(max_cost_usd="1"),
        traces=False,
        prices=ag.PriceBook(
            overrides={"my-local-llm": {"input_per_mtok": "0", "output_per_mtok": "0"}}
        ),
    )
    with g3.task() as task:
        assert task.start_model_call("my-local-llm", input_tokens=10).end(ag.Usage(10, 5)) == 0


def test_provider_reporting_more_than_reserved_is_recorded_and_flagged() -> None:
    g = guard(max_cost_usd="0.01", max_output_tokens=100)
    with g.task() as task:
        c = task.start_model_call("gpt-4o", input_tokens=100)
        cost = c.end(ag.Usage(100, 5000))  # the provider ignored max_tokens
        assert cost == D("0.05025")
        assert task.overspent
        with pytest.raises(ag.BudgetExceeded):
            task.start_model_call("gpt-4o", input_tokens=100)
    assert task.cost_usd == D("0.05025")  # never clipped
    flagged = [s for s in spans(g) if s.attrs.get("over_reservation")]
    assert len(flagged) == 1


def test_missing_usage_is_estimated_and_marked() -> None:
    g = guard(max_cost_usd="1")
    model = ScriptedModel("gpt-4o-mini", replies=["Four words right here."], report_usage=False)
    with g.task() as task:
        reply = model.invoke(task, MSGS)
    assert task.usage.estimated
    assert task.usage.output_tokens == reply.usage.output_tokens
    (span,) = [s for s in spans(g) if s.kind == "model"]
    assert span.attrs["estimated"] is True


def test_failed_call_releases_its_reservation() -> None:
    g = guard(max_cost_usd="0.001")
    with g.task() as task:
        c = task.start_model_call("gpt-4o", input_tokens=100)
        assert task.spent.cost_usd == D("0.001")  # reserved
        c.fail(TimeoutError())
        assert task.spent.cost_usd == 0
        c.end(ag.Usage(1, 1))  # ignored: the call is done
        assert task.cost_usd == 0
        task.start_model_call("gpt-4o", input_tokens=100)  # never ended: released at exit
    snap = g.store.snapshot(["task:" + task.id])
    assert snap["task:" + task.id].reserved.get("cost_usd", 0) == 0


def test_soft_limits_log_once_each() -> None:
    g = guard(max_cost_usd="0.01", soft_limits=(0.5, 0.8))
    with capture_logs() as logs, g.task() as task:
        for _ in range(4):
            task.start_model_call("gpt-4o", input_tokens=100).end(ag.Usage(100, 200))
    soft = [e for e in logs if e["event"] == "agentguard.soft_limit"]
    assert [e["threshold"] for e in soft] == [0.5, 0.8]
    assert [d.action for d in task.decisions if d.kind == "soft_limit"] == ["soft_limit"] * 2


def test_soft_limits_read_money_spent_not_reserved() -> None:
    """A call's reservation (its worst case) can pass a soft limit that its real cost does not:
    the alert comes when the spend does, and names the budget it was spent on."""
    g = guard(max_cost_usd="0.01", soft_limits=(0.5,))
    with capture_logs() as logs, g.task() as task:
        # gpt-4o: 100 in + up to 1000 out reserve ~$0.01025 -> capped to fit, well over 50%
        call = task.start_model_call("gpt-4o", input_tokens=100, max_tokens=1000)
        assert call.decision.reserve_usd is not None
        assert call.decision.reserve_usd > Decimal("0.005")
        assert not [e for e in logs if e["event"] == "agentguard.soft_limit"]
        call.end(ag.Usage(100, 20))  # $0.00045: 4.5% spent
        assert not [e for e in logs if e["event"] == "agentguard.soft_limit"]
        task.start_model_call("gpt-4o", input_tokens=100).end(ag.Usage(100, 500))  # +$0.00525
    soft = [e for e in logs if e["event"] == "agentguard.soft_limit"]
    assert [(e["threshold"], e["budget"]) for e in soft] == [(0.5, "task:" + task.id)]
    assert soft[0]["spent_fraction"] == pytest.approx(0.57)


class _SnapshotSpy(ag.MemoryStore):
    """A real MemoryStore that notes which lines each snapshot reads."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[list[str]] = []

    def snapshot(self, keys: Any) -> Any:
        self.reads.append(list(keys))
        return super().snapshot(keys)


async def test_a_task_with_a_fresh_id_does_not_read_its_own_line_back() -> None:
    """Nothing can have charged a line named by a fresh random id: opening such a task reads
    only the other lines (a store round trip saved per task on Redis)."""
    team = ag.Budget(scope="team", max_cost_usd="5")
    store = _SnapshotSpy()
    g = ag.Guard(ag.Policy(max_cost_usd="1", budgets=[team]), store=store, traces=False)
    with g.task() as fresh:
        pass
    with g.task(team="cx") as fresh_in_team:
        pass
    with g.task("ticket-1") as named:
        pass
    async with g.task(team="cx") as afresh:
        pass
    assert store.reads == [
        ["team:cx"],  # the fresh task without a team reads nothing at all
        ["task:ticket-1"],  # a task named by the caller may have spent already
        ["team:cx"],
    ]
    assert fresh.status == fresh_in_team.status == named.status == afresh.status == "ok"
    # a named task resumes what its line already holds
    with g.task("ticket-1") as again:
        again.start_model_call("gpt-4o-mini", input_tokens=10).end(ag.Usage(10, 5))
    with g.task("ticket-1") as third:
        assert third.last_spent.model_calls == 1


def test_current_task_follows_threads_with_copied_context_and_asyncio() -> None:
    g = guard()
    with g.task("outer") as outer:
        ctx = contextvars.copy_context()
        with ThreadPoolExecutor(2) as pool:
            seen = pool.submit(ctx.run, ag.current_task).result()
        assert seen is outer

        async def inner() -> ag.Task | None:
            async with g.task("async-child") as child:
                await asyncio.sleep(0)
                assert ag.current_task() is child
            return ag.current_task()

        assert asyncio.run(inner()) is outer
    assert ag.current_task() is None


def test_traces_to_sqlite(tmp_path: Any) -> None:
    from agentguard._sinks import SQLiteTraceReader

    db = tmp_path / "t.db"
    g = ag.Guard(ag.Policy(max_cost_usd="0.10", context_budget_tokens=50), traces=str(db))
    with g.task("rag-1", feature="faq") as task:
        task.step("retrieve")
        task.record_retrieval("kb", documents=3, texts=["alpha " * 40, "beta " * 40, "gamma"])
        task.trim(["alpha " * 40, "beta " * 40, "gamma."], model="gpt-4o")
        task.start_model_call("gpt-4o", messages=MSGS).end(ag.Usage(60, 10))
    g.close()
    reader = SQLiteTraceReader(db)
    (rec,) = reader.tasks()
    assert rec.task_id == "rag-1"
    assert rec.cost_usd == task.cost_usd
    assert rec.tokens_saved > 0
    kinds = [s.kind for s in reader.spans("rag-1")]
    assert sorted(kinds) == sorted(["task", "step", "retrieval", "trim", "model"])
    for s in reader.spans("rag-1"):  # no prompt text stored
        assert "Lisbon" not in repr(s.to_dict())


def test_concurrent_workers_share_one_team_budget_exactly() -> None:
    """16 threads, each running tasks whose calls take 20 ms, against one team budget."""
    limit = D("0.02")
    g = guard(
        max_output_tokens=300,
        budgets=[ag.Budget(scope="team", max_cost_usd=limit)],
    )
    model = ScriptedModel("gpt-4o", reply_tokens=300, latency=0.02)
    barrier = threading.Barrier(16)
    stops = []

    def worker(n: int) -> None:
        barrier.wait()
        for i in range(20):
            try:
                with g.task(f"w{n}-{i}", team="cx") as task:
                    model.invoke(task, MSGS)
            except ag.BudgetExceeded:
                stops.append(n)
                return

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    committed = g.store.snapshot(["team:cx"])["team:cx"].committed["cost_usd"]
    assert committed <= limit
    assert len(stops) == 16
    total = sum((r.cost_usd or D(0)) for r in g.sink.tasks)  # type: ignore[attr-defined]
    assert total == committed  # every call that ran is in the trace


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["gpt-4o", "gpt-4o-mini", "claude-sonnet-4-5"]),
            st.integers(0, 20_000),
            st.floats(0, 1),
            st.booleans(),
        ),
        min_size=1,
        max_size=30,
    )
)
def test_committed_never_exceeds_the_limit_for_any_call_sequence(
    calls: list[tuple[str, int, float, bool]],
) -> None:
    g = ag.Guard(
        ag.Policy(
            max_cost_usd="0.05",
            on_limit="finish",
            downgrade=[ag.Downgrade(at=0.5, to="gpt-4o-mini")],
        ),
        traces=False,
    )
    with g.task() as task:
        for model, n_in, out_frac, fail in calls:
            try:
                c = task.start_model_call(model, input_tokens=n_in, finish=task.finished)
            except ag.BudgetExceeded:
                break
            if fail:
                c.fail()
                continue
            out = int((c.max_tokens or 0) * out_frac)
            c.end(ag.Usage(n_in, out))
            assert task.spent.cost_usd <= D("0.05")
    assert task.cost_usd is not None
    assert task.cost_usd <= D("0.05")


def test_content_is_captured_only_when_opted_in() -> None:
    reply = ScriptedModel("gpt-4o-mini", replies=["Lisbon is lovely in May."])
    for capture in (False, True):
        g = ag.Guard(ag.Policy(max_cost_usd="1"), traces="memory", capture_content=capture)
        with g.task() as task:
            reply.invoke(task, MSGS)
        (span,) = [s for s in spans(g) if s.kind == "model"]
        text = repr(span.to_dict())
        assert ("Plan a trip to Lisbon" in text) is capture
        assert ("lovely in May" in text) is capture


def test_a_bad_usage_record_is_not_summed_and_the_spend_is_not_lost() -> None:
    g = guard(max_cost_usd="1", max_output_tokens=100)
    with capture_logs() as logs, g.task() as task:
        c = task.start_model_call("gpt-4o", input_tokens=1000)
        cost = c.end({"prompt_tokens": -5, "completion_tokens": 10})
    # charged at the call's bound: 1000 input tokens and the 100-token cap it ran under
    assert cost == D("0.0025") + D("0.001")
    assert task.usage == ag.Usage(1000, 100, estimated=True)
    (event,) = [e for e in logs if e["event"] == "agentguard.invalid_usage"]
    assert "input_tokens=-5" in event["error"]
    (span,) = [s for s in spans(g) if s.kind == "model"]
    assert "input_tokens=-5" in span.attrs["invalid_usage"]


class BrokenSink:
    def write_spans(self, spans: Any) -> None:
        raise OSError("disk full")

    def write_task(self, record: Any) -> None:
        raise OSError("disk full")

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_a_failing_trace_sink_never_breaks_the_run_and_limits_still_hold() -> None:
    g = ag.Guard(ag.Policy(max_model_calls=2), traces=BrokenSink())
    with capture_logs() as logs, pytest.raises(ag.BudgetExceeded), g.task() as task:
        for _ in range(3):
            task.start_model_call("gpt-4o", input_tokens=10).end(ag.Usage(10, 1))
    assert task.model_calls == 2
    assert g.trace_errors >= 3
    assert any(e["event"] == "agentguard.trace_error" and "disk full" in e["error"] for e in logs)


def test_a_parent_limit_the_child_policy_does_not_know_stops_with_its_numbers() -> None:
    g = guard(max_model_calls=3)
    with g.task("parent"):
        child_policy = ag.Policy(max_model_calls=10)
        with pytest.raises(ag.BudgetExceeded) as info, g.task("kid", policy=child_policy) as kid:
            for _ in range(5):
                kid.start_model_call("gpt-4o-mini", input_tokens=5).end(ag.Usage(5, 1))
    assert kid.model_calls == 3
    err = info.value
    assert (err.limit, err.limit_value, err.actual, err.budget) == (
        "max_model_calls",
        3,
        4,
        "task:parent",
    )


def test_two_budgets_on_one_key_take_the_tighter_limit() -> None:
    g = guard(
        max_output_tokens=100,
        budgets=[
            ag.Budget(scope="team", max_cost_usd="1", window="day"),
            ag.Budget(scope="team", match="ops", max_cost_usd="0.002", window="day"),
        ],
    )
    total = D(0)
    with pytest.raises(ag.BudgetExceeded) as info:
        for i in range(10):
            with g.task(f"t{i}", team="ops") as task:
                c = task.start_model_call("gpt-4o", input_tokens=100)
                c.end(ag.Usage(100, min(100, c.max_tokens or 0)))
                total += task.cost_usd or 0
    assert info.value.limit_value == D("0.002")
    assert total <= D("0.002")


def test_open_task_and_close_without_a_with_block() -> None:
    g = guard(max_model_calls=1)
    parent = g.open_task("run-1", team="cx")
    assert ag.current_task() is None  # not made current
    child = g.open_task("run-1.sub", parent=parent)
    assert child.parent is parent
    assert child.tags == {"team": "cx"}
    call = child.start_model_call("gpt-4o-mini", input_tokens=10)
    child.close(RuntimeError("run failed"))  # an open call is released, the error recorded
    assert child.status == "error"
    assert parent.spent.model_calls == 0
    parent.close()
    parent.close()  # idempotent
    assert parent.status == "ok"
    assert [r.task_id for r in g.sink.tasks] == ["run-1.sub", "run-1"]  # type: ignore[attr-defined]
    assert call.done


def test_a_blocked_tool_makes_the_next_model_call_the_final_answer() -> None:
    """A model that keeps asking for a capped tool would loop forever on error messages."""
    g = guard(tool_limits={"search": 1}, on_limit="finish")
    with g.task() as task:
        assert task.start_tool_call("search").allowed
        assert task.start_model_call("gpt-4o-mini", input_tokens=9).decision.action == "allow"
        assert task.start_tool_call("search").decision.action == "block"
        final = task.start_model_call("gpt-4o-mini", input_tokens=9)
        assert final.decision.action == "finish"
        assert final.decision.limit == "tool_limits.search"


class _Msg:
    """A chat message object (read by attribute, kept by the counter's message cache)."""

    def __init__(self, role: str, content: str, **extra: Any) -> None:
        self.role = role
        self.content = content
        self.tool_calls = extra.get("tool_calls")
        self.tool_call_id = extra.get("tool_call_id")
        self.additional_kwargs: dict[str, Any] = {}


_TOOLS = [{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]


def _react_run(traces: Any, *, soft: bool) -> tuple[ag.Guard, ag.Task, list[Any]]:
    """A ReAct loop as an agent graph drives the core: step, model call over a growing history
    of message objects, end, tool call, end (some paid), until the policy finishes it."""
    g = ag.Guard(
        ag.Policy(
            max_cost_usd="0.02",
            max_steps=9,
            max_output_tokens=600,
            tool_limits={"search": 4},
            soft_limits=(0.25,) if soft else (),
            downgrade=[ag.Downgrade(at=0.3, to="gpt-4o-mini")],
            on_limit="finish",
        ),
        traces=traces,
    )
    seen: list[Any] = []
    history = [_Msg("user", "Find the cheapest flight to Lisbon and book it.")]
    with g.task("react-1", team="cx") as task:
        for i in range(20):
            step = task.step("agent")
            seen.append(("step", step.action, step.reason))
            call = task.start_model_call("gpt-4o", messages=history, tools=_TOOLS)
            d = call.decision
            seen.append(("model", d.action, d.model, d.max_tokens, d.reserve_usd, d.reason))
            final = d.action == "finish"
            if final:  # the graceful final call, without tools
                call = task.start_model_call("gpt-4o", messages=history, finish=True)
                d = call.decision
                seen.append(("final", d.action, d.model, d.max_tokens, d.reserve_usd, d.reason))
            # usage as a provider reports it: what was sent, an answer within the bound cap
            out = min(300, call.max_tokens or 300)
            cost = call.end(
                ag.Usage(call.input_counted, out, cache_read_tokens=8), model=call.model
            )
            seen.append(("cost", cost, dict(call.span.attrs)))
            if final:
                break
            tc = {"name": "search", "args": {"q": f"flights, page {i}"}, "id": f"c{i}"}
            history.append(_Msg("assistant", "", tool_calls=[tc]))
            tool = task.start_tool_call("search")
            seen.append(("tool", tool.decision.action, tool.decision.reason))
            if tool.allowed:
                tool.end(cost_usd=D("0.0005") if i % 2 else None)
            history.append(_Msg("tool", f"{i + 3} flights found", tool_call_id=f"c{i}"))
    return g, task, seen


@pytest.mark.parametrize("soft", [False, True])
def test_traces_off_changes_what_is_written_and_nothing_else(soft: bool) -> None:
    g_off, off, seen_off = _react_run(False, soft=soft)
    g_on, on, seen_on = _react_run("memory", soft=soft)
    assert repr(g_off.sink) == "NullSink()"
    assert seen_off == seen_on
    assert [a for a, *_ in seen_on].count("model") >= 4  # a real run: calls, a downgrade...
    assert {a[1] for a in seen_on if a[0] == "model"} >= {"allow", "downgrade", "finish"}

    def readout(t: ag.Task) -> Any:
        decisions = [(d.kind, d.action, d.reason, d.model, d.limit) for d in t.decisions]
        return (
            decisions,
            t.cost_usd,
            t.usage,
            t.model_calls,
            t.tool_calls,
            t.tool_calls_by_name,
            t.retries,
            t.steps,
            t.saved_usd,
            t.status,
            t.limit_hit,
            t.spent,
        )

    assert readout(off) == readout(on)
    assert ("soft_limit" in [d.kind for d in on.decisions]) is soft
    assert off.cost_usd is not None and off.cost_usd <= D("0.02")
    written = spans(g_on)
    assert {s.kind for s in written} >= {"task", "step", "model", "tool"}
    assert len(written) == 1 + sum(a[0] in ("step", "model", "final", "tool") for a in seen_on)


def test_spans_reach_a_sink_that_replaces_the_null_one_mid_run() -> None:
    g = ag.Guard(ag.Policy(max_cost_usd="1"), traces=False)
    with g.task("t") as task:
        task.step("before")
        g.sink = ag.MemorySink()  # as Alerts.attach replaces a guard's sink
        task.step("after")
        task.start_tool_call("search").end()
        task.start_model_call("gpt-4o-mini", input_tokens=10).end(ag.Usage(10, 5))
    assert [s.name for s in spans(g)] == ["after", "search", "gpt-4o-mini", "t"]
