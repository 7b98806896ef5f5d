"""What-if replay: run recorded tasks' usage through another policy and see, per task, what it
would have cost and which limits would have fired.

The replay drives a real :class:`~agentguard.Guard` (the real pure decisions and reservations)
over a fresh :class:`~agentguard.MemoryStore`, one recorded root task after another in start
order, with its sub-tasks as child tasks. Each recorded span becomes the event an adapter would
have sent:

* ``step`` -> ``task.step(name)``; ``retry`` -> ``task.record_retry()``;
* ``tool`` -> ``task.start_tool_call(name)``, ended with its recorded cost (skipped if blocked);
* ``retrieval`` -> ``task.record_retrieval(...)`` with its recorded document and token counts;
* ``model`` -> ``task.start_model_call(requested model, input_tokens=recorded estimate,
  max_tokens=the recorded output cap)`` (the new policy can only lower the cap), then
  ``call.end(recorded usage)`` — the same tokens, priced on the model the new policy picks
  (a downgrade), the output cut to the new output cap when it is lower. A ``finish`` decision
  makes the graceful final call with the same usage and ends the task's replay there, as an
  adapter would; a ``stop`` ends it as stopped. A call that failed is started and failed.
* ``trim`` and ``decision`` spans are not replayed: decisions are taken afresh, and the
  recorded input already reflects the recorded trimming (the chunk texts are not in traces).

Assumptions, stated: a downgraded call uses the same tokens; a task the new policy lets run
longer than it ran cannot be extended (the recorded run is all there is); windowed budgets
(``team@day``) all fall in the replay's one current window, as if every task ran in it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from agentguard._errors import AgentGuardError, BudgetExceeded
from agentguard._trace import Span, TaskRecord
from agentguard._usage import Usage

if TYPE_CHECKING:
    from agentguard._guard import DecisionRecord, Task
    from agentguard._policy import Policy
    from agentguard._pricing import PriceBook

__all__ = ["ReplayReport", "ReplayedTask", "replay"]

_ZERO = Decimal(0)


@dataclass(slots=True)
class ReplayedTask:
    """One recorded root task (its sub-tasks included) replayed under the new policy."""

    task_id: str
    tags: dict[str, str]
    recorded_cost_usd: Decimal | None
    cost_usd: Decimal | None
    recorded_status: str
    status: str
    recorded_limit: str | None
    limit_hit: str | None
    recorded_model_calls: int
    model_calls: int
    fired: list[str] = field(default_factory=list)
    skipped_spans: int = 0
    error: str | None = None

    @property
    def delta_usd(self) -> Decimal | None:
        """Replayed minus recorded cost (``None`` if either is unknown)."""
        if self.cost_usd is None or self.recorded_cost_usd is None:
            return None
        delta = self.cost_usd - self.recorded_cost_usd
        return delta if delta else _ZERO

    def to_dict(self) -> dict[str, Any]:
        def s(v: Decimal | None) -> str | None:
            return None if v is None else str(v)

        return {
            "task_id": self.task_id,
            "tags": dict(self.tags),
            "recorded_cost_usd": s(self.recorded_cost_usd),
            "cost_usd": s(self.cost_usd),
            "delta_usd": s(self.delta_usd),
            "recorded_status": self.recorded_status,
            "status": self.status,
            "recorded_limit": self.recorded_limit,
            "limit_hit": self.limit_hit,
            "recorded_model_calls": self.recorded_model_calls,
            "model_calls": self.model_calls,
            "fired": list(self.fired),
            "skipped_spans": self.skipped_spans,
            "error": self.error,
        }


@dataclass(slots=True)
class ReplayReport:
    """All replayed tasks and their totals."""

    tasks: list[ReplayedTask]

    @property
    def recorded_cost_usd(self) -> Decimal | None:
        return _sum(t.recorded_cost_usd for t in self.tasks)

    @property
    def cost_usd(self) -> Decimal | None:
        return _sum(t.cost_usd for t in self.tasks)

    def fired_counts(self) -> dict[str, int]:
        """How many tasks each kind of decision fired in (``finish``, ``downgrade``, ...)."""
        counts: dict[str, int] = {}
        for t in self.tasks:
            for kind in {f.split(" ", 1)[0] for f in t.fired}:
                counts[kind] = counts.get(kind, 0) + 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        rec, new = self.recorded_cost_usd, self.cost_usd
        return {
            "tasks": [t.to_dict() for t in self.tasks],
            "recorded_cost_usd": None if rec is None else str(rec),
            "cost_usd": None if new is None else str(new),
            "fired": self.fired_counts(),
        }


def _sum(values: Iterable[Decimal | None]) -> Decimal | None:
    total = _ZERO
    for v in values:
        if v is None:
            return None
        total += v
    return total


def _describe(d: DecisionRecord) -> str:
    if d.action == "soft_limit":  # reason: "80% of the budget on team:cx spent (83%)"
        pct, _, rest = d.reason.partition(" of the budget on ")
        budget = rest.rsplit(" spent", 1)[0]
        return f"soft_limit {pct}" + ("" if budget.startswith("task:") else f" {budget}")
    parts = [d.action]
    if d.action == "downgrade" and d.model:
        parts.append(f"-> {d.model}")
    if d.limit:
        parts.append(f"({d.limit})")
    return " ".join(parts)


@contextmanager
def _quiet() -> Iterator[None]:
    """The replayed decisions are not events of the application: keep them out of its log."""
    log = logging.getLogger("agentguard")
    was = log.disabled
    log.disabled = True
    try:
        yield
    finally:
        log.disabled = was


class _Run:
    """The replay state of one task (root or sub-task)."""

    __slots__ = ("done", "finishing", "task")

    def __init__(self, task: Task) -> None:
        self.task = task
        self.finishing = False
        self.done = False


def _final_usage(u: Usage, cap: int | None) -> Usage:
    if cap is None or u.output_tokens <= cap:
        return u
    return Usage(
        u.input_tokens,
        cap,
        u.cache_read_tokens,
        u.cache_write_tokens,
        min(u.reasoning_tokens, cap),
        estimated=u.estimated,
    )


def _model_event(run: _Run, s: Span) -> None:
    task = run.task
    requested = str(s.attrs.get("requested_model") or s.model or s.name)
    u = s.usage
    estimate = s.attrs.get("input_estimate")
    input_tokens = int(estimate) if estimate is not None else (u.input_tokens if u else 0)
    cap = s.attrs.get("max_tokens")
    final = run.finishing
    call = task.start_model_call(
        requested,
        input_tokens=input_tokens,
        max_tokens=None if cap is None else int(cap),
        finish=final,
    )
    if call.decision.action == "finish" and not final:
        final = True
        call = task.start_model_call(
            call.model, input_tokens=input_tokens, max_tokens=call.max_tokens, finish=True
        )
    if u is None or s.status == "error":
        call.fail(RuntimeError("the recorded call failed"))
    else:
        call.end(_final_usage(u, call.max_tokens))
    if final:
        run.done = True


def _event(run: _Run, s: Span) -> None:
    task = run.task
    kind = s.kind
    if kind == "model":
        _model_event(run, s)
    elif kind == "step":
        if task.step(s.name).action == "finish":
            run.finishing = True
    elif kind == "retry":
        task.record_retry(s.reason or s.name)
    elif kind == "tool":
        tool = task.start_tool_call(s.name)
        if tool.allowed:
            tool.end(cost_usd=s.cost_usd)
        else:
            run.finishing = True  # the next model call is the final answer
    elif kind == "retrieval":
        tokens = s.attrs.get("tokens")
        task.record_retrieval(
            s.name,
            documents=int(s.attrs.get("documents") or 0),
            tokens=None if tokens is None else int(tokens),
        )


def replay(
    records: Iterable[TaskRecord],
    spans_of: Callable[[str], Sequence[Span]],
    policy: Policy,
    *,
    prices: PriceBook | None = None,
) -> ReplayReport:
    """Replay recorded tasks under ``policy`` (see the module docs for the rules).

    Args:
        records: recorded task records; sub-tasks are replayed under their root.
        spans_of: task id -> its spans (e.g. ``SQLiteTraceReader.spans``).
        policy: the policy to try.
        prices: the price book (a default one if omitted).

    Example:
        >>> from agentguard._policy import Policy
        >>> t = TaskRecord("t1", None, 0.0, 3.0, "ok", {"feature": "faq"},
        ...                Usage(2000, 200), Decimal("0.00042"), model_calls=2)
        >>> calls = [Span(f"m{i}", "t1", "model", "gpt-4o-mini", float(i), end=i + 0.5,
        ...               model="gpt-4o-mini", usage=Usage(1000, 100),
        ...               cost_usd=Decimal("0.00021")) for i in (1, 2)]
        >>> r = replay([t], lambda _: calls, Policy(max_model_calls=1, on_limit="finish"))
        >>> r.tasks[0].cost_usd, r.tasks[0].status, r.tasks[0].fired
        (Decimal('0.000210000'), 'finished', ['finish (max_model_calls)'])
    """
    from agentguard._guard import Guard
    from agentguard._store import MemoryStore

    recs = list(records)
    children: dict[str, list[TaskRecord]] = {}
    for r in recs:
        if r.parent_id is not None:
            children.setdefault(r.parent_id, []).append(r)
    roots = sorted((r for r in recs if r.parent_id is None), key=lambda r: (r.start, r.task_id))
    guard = Guard(policy, store=MemoryStore(), traces=False, prices=prices)
    with _quiet():
        out = [_replay_one(guard, root, children, spans_of) for root in roots]
    return ReplayReport(out)


def _replay_one(
    guard: Any,
    root: TaskRecord,
    children: dict[str, list[TaskRecord]],
    spans_of: Callable[[str], Sequence[Span]],
) -> ReplayedTask:
    family = [root]
    i = 0
    while i < len(family):
        family.extend(children.get(family[i].task_id, ()))
        i += 1
    by_id = {r.task_id: r for r in family}
    events = sorted(
        (s for r in family for s in spans_of(r.task_id) if s.kind not in ("task", "decision")),
        key=lambda s: (s.start, s.span_id),
    )
    runs: dict[str, _Run] = {}
    order: list[_Run] = []
    error: str | None = None
    skipped = 0

    def run_of(task_id: str) -> _Run | None:
        run = runs.get(task_id)
        if run is not None:
            return run
        rec = by_id[task_id]
        parent = None
        if rec.parent_id is not None:
            parent_run = run_of(rec.parent_id)
            if parent_run is None or parent_run.done:
                return None
            parent = parent_run.task
        task = guard.open_task(rec.task_id, parent=parent, **rec.tags)
        run = runs[task_id] = _Run(task)
        order.append(run)
        return run

    run_of(root.task_id)
    for s in events:
        run = run_of(s.task_id)
        if run is None or run.done:
            skipped += 1
            continue
        try:
            _event(run, s)
        except BudgetExceeded as exc:
            run.done = True
            run.task.close(exc)
        except AgentGuardError as exc:  # e.g. an unpriced model under a cost limit
            run.done = True
            error = f"{type(exc).__name__}: {exc}"
            run.task.close(exc)
    for run in reversed(order):  # sub-tasks before their parents
        run.task.close()
    tasks = [run.task for run in order]
    top = tasks[0]
    fired = [_describe(d) for t in tasks for d in t.decisions]
    return ReplayedTask(
        task_id=root.task_id,
        tags=dict(root.tags),
        recorded_cost_usd=_sum(r.cost_usd for r in family),
        cost_usd=_sum(t.cost_usd for t in tasks),
        recorded_status=root.status,
        status=top.status,
        recorded_limit=root.limit_hit,
        limit_hit=top.limit_hit,
        recorded_model_calls=sum(r.model_calls for r in family),
        model_calls=sum(t.model_calls for t in tasks),
        fired=list(dict.fromkeys(fired)),
        skipped_spans=skipped,
        error=error,
    )
