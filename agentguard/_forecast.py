"""Spend forecast from recorded traces: per feature, requests per period x tokens per request x
blended rate, input and output apart, with a prompt-growth contingency, and the optimised
run-rate (what the recorded decisions achieved) next to the unoptimised one.

Definitions (per group, usually a ``feature``):

* **window** — the time the records cover: ``since`` to ``until`` when given, else the first
  task's start to the last task's end (across all groups, so groups are comparable).
* **requests per period** — root tasks (sub-tasks are part of their request) / window x period.
* **tokens per request** — the group's input and output tokens (sub-tasks included) / root tasks.
* **blended rates** — USD per input token = the model calls' input-side cost (each call
  re-priced with only its input, cache reads/writes and per-call fee, at the tier its input
  selects) / their input tokens; USD per output token = (recorded cost - input-side cost) /
  output tokens. Calls that could not be priced are left out of the rates and counted in
  ``unpriced_calls``.
* **input / output run-rate** = requests per period x tokens per request x rate; **other** =
  paid tool costs per period. **contingency** = the input run-rate x ``growth_pct`` % (prompts
  grow: longer histories, more retrieved context).
* **optimised** = input + output + other + contingency: the run-rate with the recorded
  decisions (downgrades, trims, caps) in effect. **unoptimised** = optimised + what the
  downgrade, trim and cap levers saved per period (see :mod:`agentguard._efficiency`); a lever
  that could not be estimated is left out and flagged in ``unestimated``.

Money is ``Decimal`` throughout; derived amounts are rounded to 1e-8 USD.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from agentguard._efficiency import grouped, lever_savings
from agentguard._trace import Span, TaskRecord
from agentguard._usage import Usage

if TYPE_CHECKING:
    from agentguard._pricing import PriceBook

__all__ = ["PERIODS", "Forecast", "forecast"]

#: Forecast periods in seconds (a month is 30 days).
PERIODS: dict[str, int] = {"hour": 3600, "day": 86400, "week": 7 * 86400, "month": 30 * 86400}
_ZERO = Decimal(0)
_CENT = Decimal("1e-8")
_OPTIMISING_LEVERS = ("downgrade", "trim", "cap")


def _q(v: Decimal) -> Decimal:
    return v.quantize(_CENT)


@dataclass(slots=True)
class Forecast:
    """The forecast of one group for one period (``key=None``: all groups together)."""

    key: str | None
    period: str
    requests: int
    window_s: float
    requests_per_period: Decimal
    input_tokens_per_request: Decimal
    output_tokens_per_request: Decimal
    input_rate_usd: Decimal | None
    output_rate_usd: Decimal | None
    input_usd: Decimal | None
    output_usd: Decimal | None
    other_usd: Decimal
    contingency_usd: Decimal | None
    optimised_usd: Decimal | None
    savings_usd: dict[str, Decimal] = field(default_factory=dict)
    unoptimised_usd: Decimal | None = None
    unestimated: list[str] = field(default_factory=list)
    unpriced_calls: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: money and rates as strings, ``None`` for unknown."""

        def s(v: Decimal | None) -> str | None:
            return None if v is None else str(v)

        return {
            "key": self.key,
            "period": self.period,
            "requests": self.requests,
            "window_s": self.window_s,
            "requests_per_period": s(self.requests_per_period),
            "input_tokens_per_request": s(self.input_tokens_per_request),
            "output_tokens_per_request": s(self.output_tokens_per_request),
            "input_usd_per_mtok": s(
                None if self.input_rate_usd is None else _q(self.input_rate_usd * 1_000_000)
            ),
            "output_usd_per_mtok": s(
                None if self.output_rate_usd is None else _q(self.output_rate_usd * 1_000_000)
            ),
            "input_usd": s(self.input_usd),
            "output_usd": s(self.output_usd),
            "other_usd": s(self.other_usd),
            "contingency_usd": s(self.contingency_usd),
            "optimised_usd": s(self.optimised_usd),
            "savings_usd": {k: str(v) for k, v in self.savings_usd.items()},
            "unoptimised_usd": s(self.unoptimised_usd),
            "unestimated": list(self.unestimated),
            "unpriced_calls": self.unpriced_calls,
        }


def _input_cost(s: Span, prices: PriceBook | None) -> Decimal | None:
    """The input side of a priced model call: its cost with the output removed."""
    u = s.usage
    if u is None or s.cost_usd is None:
        return None
    if u.output_tokens == 0:
        return s.cost_usd
    if prices is None:
        return None
    rates = prices.rates(s.model or s.name)
    if rates is None:
        return None
    return rates.cost(Usage(u.input_tokens, 0, u.cache_read_tokens, u.cache_write_tokens))


def forecast(
    records: Iterable[TaskRecord],
    spans_of: Callable[[str], Sequence[Span]],
    *,
    period: str = "day",
    growth_pct: Decimal | int | str = 10,
    by: str | None = "feature",
    since: float | None = None,
    until: float | None = None,
    prices: PriceBook | None = None,
) -> list[Forecast]:
    """Forecast the spend per ``period`` of each value of the tag ``by``, then of everything.

    Args:
        records: recorded task records (sub-tasks included).
        spans_of: task id -> its spans.
        period: ``hour``, ``day``, ``week`` or ``month`` (30 days).
        growth_pct: prompt-growth contingency, percent of the input run-rate.
        by: the tag to group by (``None``: one group).
        since / until: the window the records cover (default: first start to last end).
        prices: splits each call's cost into input and output (a default PriceBook if omitted).

    Example:
        >>> from agentguard._pricing import PriceBook
        >>> m = Span("m", "t", "model", "gpt-4o-mini", 0.0, end=1.0, model="gpt-4o-mini",
        ...          usage=Usage(1000, 100), cost_usd=Decimal("0.00021"))
        >>> r = TaskRecord("t", None, 0.0, 3600.0, "ok", {"feature": "faq"},
        ...                Usage(1000, 100), Decimal("0.00021"))
        >>> f = forecast([r], lambda t: [m], period="day", growth_pct=0, prices=PriceBook())[0]
        >>> f.requests_per_period, f.input_usd, f.output_usd, f.optimised_usd
        (Decimal('24.00'), Decimal('0.00360000'), Decimal('0.00144000'), Decimal('0.00504000'))
    """
    seconds = PERIODS.get(period)
    if seconds is None:
        raise ValueError(f"period={period!r}: expected one of {', '.join(PERIODS)}")
    growth = Decimal(str(growth_pct))
    if not growth.is_finite() or growth < 0:
        raise ValueError(f"growth_pct={growth_pct!r}: expected a percentage >= 0")
    if prices is None:
        from agentguard._pricing import PriceBook

        prices = PriceBook()
    recs = list(records)
    if not recs:
        return []
    start = since if since is not None else min(r.start for r in recs)
    end = until if until is not None else max((r.end or r.start) for r in recs)
    window = max(end - start, 1.0)  # a second at least: never divide by zero
    scale = Decimal(seconds) / Decimal(repr(window))

    spans = functools.cache(spans_of)  # a task's spans are read once
    out = []
    for key, members in grouped(recs, by):
        requests = sum(1 for r in members if r.parent_id is None) or 1
        in_tok = out_tok = 0
        in_cost = out_cost = other = _ZERO
        priced_in = priced_out = 0
        unpriced = 0
        for r in members:
            in_tok += r.usage.input_tokens
            out_tok += r.usage.output_tokens
            for s in spans(r.task_id):
                if s.kind == "tool" and s.cost_usd is not None:
                    other += s.cost_usd
                if s.kind != "model" or s.usage is None:
                    continue
                ic = _input_cost(s, prices)
                if ic is None or s.cost_usd is None:
                    unpriced += 1
                    continue
                in_cost += ic
                out_cost += s.cost_usd - ic
                priced_in += s.usage.input_tokens
                priced_out += s.usage.output_tokens
        rpp = Decimal(requests) * scale
        in_per = Decimal(in_tok) / requests
        out_per = Decimal(out_tok) / requests
        in_rate = in_cost / priced_in if priced_in else (None if in_tok else _ZERO)
        out_rate = out_cost / priced_out if priced_out else (None if out_tok else _ZERO)
        in_usd = None if in_rate is None else _q(rpp * in_per * in_rate)
        out_usd = None if out_rate is None else _q(rpp * out_per * out_rate)
        other_usd = _q(other * scale)
        contingency = None if in_usd is None else _q(in_usd * growth / 100)
        optimised = (
            None
            if in_usd is None or out_usd is None or contingency is None
            else in_usd + out_usd + other_usd + contingency
        )
        levers, _ = lever_savings(members, spans, prices, reference_by=by)
        savings: dict[str, Decimal] = {}
        unestimated: list[str] = []
        for lever in _OPTIMISING_LEVERS:
            v = levers.get(lever)
            if v is None:
                unestimated.append(lever)
            else:
                savings[lever] = _q(v * scale)
        unoptimised = None if optimised is None else optimised + sum(savings.values(), _ZERO)
        out.append(
            Forecast(
                key=key,
                period=period,
                requests=requests,
                window_s=window,
                requests_per_period=rpp.quantize(Decimal("0.01")),
                input_tokens_per_request=in_per.quantize(Decimal("0.1")),
                output_tokens_per_request=out_per.quantize(Decimal("0.1")),
                input_rate_usd=in_rate,
                output_rate_usd=out_rate,
                input_usd=in_usd,
                output_usd=out_usd,
                other_usd=other_usd,
                contingency_usd=contingency,
                optimised_usd=optimised,
                savings_usd=savings,
                unoptimised_usd=unoptimised,
                unestimated=unestimated,
                unpriced_calls=unpriced,
            )
        )
    if by is not None:
        body = out[:-1]
        body.sort(key=lambda f: (-(f.optimised_usd or _ZERO), str(f.key)))
        out = [*body, out[-1]]
    return out
