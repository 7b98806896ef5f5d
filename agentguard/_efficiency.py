"""Efficiency metrics over recorded traces: where tokens went, what a completed task costs, and
what each lever saved.

**Token waste ratio.** Every token of a model call (input, cache included, plus output) falls in
exactly one bucket:

* ``overhead`` — every token of a task that produced no answer (status ``error`` or
  ``stopped``);
* ``retry`` — every token of a call that failed (status ``error``) or was retried (the next
  model-or-retry span of its task, in start order, is a ``retry``);
* ``context`` — input re-sent from earlier turns of the same task: for each answered call after
  the first, ``min(input, previous answered call's input + output)`` (an agent loop re-reads its
  history on every turn, cached or not);
* ``useful`` — the rest: the new input of each answered call and all its output.

``waste_ratio = (overhead + retry + context) / total`` — ``None`` when there are no tokens.

**Cost per completed task** = all spend of the group (failed tasks and sub-tasks included: they
are part of what the completions cost) / root tasks that completed (status ``ok`` or
``finished``). ``None`` when nothing completed or any cost is unknown.

**Savings by lever** (USD):

* ``downgrade`` — what the downgraded calls' tokens would have cost on the model that was asked
  for, minus what they cost (the guard's ``saved_usd`` on those model spans);
* ``trim`` — context tokens trimmed away times the model's input rate (``saved_usd`` on trim
  spans);
* ``cache`` — for calls with cache reads / writes: their cost with every input token billed as
  plain input, minus their cost (re-priced with the :class:`PriceBook`; negative when cache
  writes cost more than they saved);
* ``cap`` — tasks ended by a limit (``limit_hit``, status ``finished`` / ``stopped``): the median
  cost of the group's tasks that completed *without* a limit, minus the task's cost, floored at
  zero — an estimate of the run the cap cut short. ``None`` when the group has no such reference
  task (the counterfactual cannot be estimated).
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from agentguard._trace import Span, TaskRecord
from agentguard._usage import Usage

if TYPE_CHECKING:
    from agentguard._pricing import PriceBook

__all__ = ["LEVERS", "Efficiency", "TokenBreakdown", "efficiency", "lever_savings"]

#: The levers savings are attributed to, in report order.
LEVERS: tuple[str, ...] = ("downgrade", "trim", "cap", "cache")
_COMPLETED = frozenset({"ok", "finished"})
_FAILED = frozenset({"error", "stopped"})
_ZERO = Decimal(0)


@dataclass(slots=True)
class TokenBreakdown:
    """Tokens by bucket (see the module docs for the exact definitions)."""

    useful: int = 0
    context: int = 0
    retry: int = 0
    overhead: int = 0

    @property
    def total(self) -> int:
        return self.useful + self.context + self.retry + self.overhead

    @property
    def waste(self) -> int:
        return self.context + self.retry + self.overhead

    @property
    def waste_ratio(self) -> float | None:
        """``waste / total``; ``None`` without tokens.

        Example:
            >>> TokenBreakdown(useful=600, context=300, retry=100).waste_ratio
            0.4
        """
        return None if self.total == 0 else self.waste / self.total

    def add(self, other: TokenBreakdown) -> None:
        self.useful += other.useful
        self.context += other.context
        self.retry += other.retry
        self.overhead += other.overhead


@dataclass(slots=True)
class Efficiency:
    """The efficiency of one group of tasks (a feature, a team, or everything: ``key=None``)."""

    key: str | None
    tasks: int = 0
    completed: int = 0
    failed: int = 0
    cost_usd: Decimal | None = _ZERO
    tokens: TokenBreakdown = field(default_factory=TokenBreakdown)
    savings: dict[str, Decimal | None] = field(default_factory=dict)
    ended_by_limit: int = 0

    @property
    def cost_per_completed_usd(self) -> Decimal | None:
        if self.cost_usd is None or self.completed == 0:
            return None
        return self.cost_usd / self.completed

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: money as strings, ``None`` for unknown."""

        def money(v: Decimal | None) -> str | None:
            return None if v is None else str(v)

        ratio = self.tokens.waste_ratio
        return {
            "key": self.key,
            "tasks": self.tasks,
            "completed": self.completed,
            "failed": self.failed,
            "cost_usd": money(self.cost_usd),
            "cost_per_completed_usd": money(_q(self.cost_per_completed_usd)),
            "tokens": {
                "useful": self.tokens.useful,
                "context": self.tokens.context,
                "retry": self.tokens.retry,
                "overhead": self.tokens.overhead,
                "total": self.tokens.total,
            },
            "waste_ratio": None if ratio is None else round(ratio, 4),
            "savings_usd": {k: money(v) for k, v in self.savings.items()},
            "ended_by_limit": self.ended_by_limit,
        }


def _q(v: Decimal | None) -> Decimal | None:
    """Round a derived (divided) amount to a millionth of a cent."""
    return None if v is None else v.quantize(Decimal("1e-8"))


def _tokens(u: Usage | None) -> int:
    return 0 if u is None else u.input_tokens + u.output_tokens


def task_tokens(record: TaskRecord, spans: Sequence[Span]) -> TokenBreakdown:
    """One task's tokens by bucket.

    Example:
        >>> t = TaskRecord("t", None, 0.0, 1.0, "ok")
        >>> calls = [Span(f"m{i}", "t", "model", "gpt-4o", float(i), usage=Usage(i * 100, 50))
        ...          for i in (1, 2, 3)]
        >>> retry = Span("r", "t", "retry", "timeout", 2.5)
        >>> task_tokens(t, [*calls, retry])
        TokenBreakdown(useful=350, context=150, retry=250, overhead=0)
    """
    out = TokenBreakdown()
    ordered = sorted(
        (s for s in spans if s.kind in ("model", "retry")), key=lambda s: (s.start, s.kind)
    )
    if record.status in _FAILED:
        out.overhead = sum(_tokens(s.usage) for s in ordered if s.kind == "model")
        return out
    prev: Usage | None = None
    for i, s in enumerate(ordered):
        if s.kind != "model":
            continue
        u = s.usage
        retried = i + 1 < len(ordered) and ordered[i + 1].kind == "retry"
        if s.status == "error" or retried:
            out.retry += _tokens(u)
            continue
        if u is None:
            continue
        carried = 0 if prev is None else min(u.input_tokens, prev.input_tokens + prev.output_tokens)
        out.context += carried
        out.useful += u.input_tokens - carried + u.output_tokens
        prev = u
    return out


def _cache_saving(s: Span, prices: PriceBook | None) -> Decimal | None:
    u = s.usage
    if u is None or not (u.cache_read_tokens or u.cache_write_tokens) or s.cost_usd is None:
        return _ZERO
    if prices is None:
        return None
    rates = prices.rates(s.model or s.name)
    if rates is None:
        return None
    plain = Usage(u.input_tokens, u.output_tokens, reasoning_tokens=u.reasoning_tokens)
    return rates.cost(plain) - s.cost_usd


def lever_savings(
    records: Sequence[TaskRecord],
    spans_of: Callable[[str], Sequence[Span]],
    prices: PriceBook | None = None,
    *,
    reference_by: str | None = None,
) -> tuple[dict[str, Decimal | None], int]:
    """Savings by lever for a group of tasks, and how many tasks a limit ended.

    ``None`` for a lever means it could not be estimated (an unpriced model, no reference
    task for ``cap``), never "saved nothing". ``reference_by`` names the tag whose value a
    capped task's reference tasks must share (the ``cap`` estimate compares like with like).
    """
    out: dict[str, Decimal | None] = dict.fromkeys(LEVERS, _ZERO)

    def add(lever: str, v: Decimal | None) -> None:
        cur = out[lever]
        out[lever] = None if cur is None or v is None else cur + v

    for r in records:
        for s in spans_of(r.task_id):
            saved = s.attrs.get("saved_usd") if s.attrs else None
            if s.kind == "model":
                if s.attrs.get("requested_model") and saved is not None:
                    add("downgrade", Decimal(str(saved)))
                add("cache", _cache_saving(s, prices))
            elif s.kind == "trim" and saved is not None:
                add("trim", Decimal(str(saved)))
    capped = [r for r in records if r.limit_hit and r.status in ("finished", "stopped")]
    reference: dict[str | None, list[Decimal]] = {}
    for r in records:
        if r.parent_id is None and not r.limit_hit and r.status == "ok" and r.cost_usd is not None:
            ref_key = r.tags.get(reference_by) if reference_by else None
            reference.setdefault(ref_key, []).append(r.cost_usd)
    for r in capped:
        costs = reference.get(r.tags.get(reference_by) if reference_by else None)
        if not costs or r.cost_usd is None:
            add("cap", None)
        else:
            add("cap", max(_ZERO, Decimal(statistics.median(costs)) - r.cost_usd))
    return out, len(capped)


def grouped(
    records: Sequence[TaskRecord], by: str | None
) -> list[tuple[str | None, Sequence[TaskRecord]]]:
    """The records by the value of their tag ``by`` and, last, all of them (key ``None``);
    with ``by=None`` only all of them.

    Example:
        >>> recs = [TaskRecord(t, None, 0.0, 1.0, "ok", {"team": t[0]}) for t in ("a1", "b1")]
        >>> [(k, len(m)) for k, m in grouped(recs, "team")]
        [('a', 1), ('b', 1), (None, 2)]
    """
    if by is None:
        return [(None, records)]
    groups: dict[str | None, list[TaskRecord]] = {}
    for r in records:
        groups.setdefault(r.tags.get(by), []).append(r)
    return [*groups.items(), (None, records)]


def efficiency(
    records: Iterable[TaskRecord],
    spans_of: Callable[[str], Sequence[Span]],
    *,
    by: str | None = "feature",
    prices: PriceBook | None = None,
) -> list[Efficiency]:
    """Efficiency per value of the tag ``by`` (``None``: one group for everything), most
    expensive first, then an overall group (``key=None``) when grouped.

    Args:
        records: task records (sub-tasks included; they count towards their group's spend).
        spans_of: a task id -> its spans (e.g. ``SQLiteTraceReader.spans``).
        by: the tag to group by.
        prices: re-prices cache savings; without it the ``cache`` lever is ``None`` wherever
            a call used the cache.

    Example:
        >>> from agentguard._sinks import MemorySink
        >>> recs = [TaskRecord("a", None, 0.0, 1.0, "ok", {"feature": "faq"},
        ...                    cost_usd=Decimal("0.02")),
        ...         TaskRecord("b", None, 0.0, 1.0, "error", {"feature": "faq"},
        ...                    cost_usd=Decimal("0.01"))]
        >>> [(e.key, e.completed, e.cost_per_completed_usd) for e in efficiency(recs, lambda t: [])]
        [('faq', 1, Decimal('0.03')), (None, 1, Decimal('0.03'))]
    """
    recs = list(records)
    spans = functools.cache(spans_of)  # a task's spans are read once
    out = []
    for key, members in grouped(recs, by):
        e = Efficiency(key)
        for r in members:
            if r.parent_id is None:
                e.tasks += 1
                if r.status in _COMPLETED:
                    e.completed += 1
                elif r.status in _FAILED:
                    e.failed += 1
            e.cost_usd = (
                None if e.cost_usd is None or r.cost_usd is None else e.cost_usd + r.cost_usd
            )
            e.tokens.add(task_tokens(r, spans(r.task_id)))
        e.savings, e.ended_by_limit = lever_savings(members, spans, prices, reference_by=by)
        out.append(e)
    if by is not None:
        body = out[:-1]
        body.sort(key=lambda e: (e.cost_usd is None, -(e.cost_usd or _ZERO), str(e.key)))
        out = [*body, out[-1]]
    return out
