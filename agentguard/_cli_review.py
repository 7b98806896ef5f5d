"""The review commands of ``agentguard``: ``alerts``, ``forecast``, ``efficiency``, ``replay``.

Registered into the main parser by :func:`register` (see :mod:`agentguard._cli`); each takes
``--db PATH`` and ``--json`` like the others.

* ``agentguard alerts [--by feature] [--period day] [--factor 2] [--min-usd 0.01] [--since WHEN]
  [--webhook URL]`` — spend that grew ``factor`` times period over period, per tag value;
* ``agentguard forecast [--period day|week|month] [--growth 10] [--since WHEN] [--by feature]`` —
  run-rate per feature: requests, tokens per request, blended rates, optimised vs unoptimised;
* ``agentguard efficiency [--since WHEN] [--by feature]`` — token waste ratio, cost per
  completed task, savings by lever;
* ``agentguard replay --policy other.toml [--since WHEN] [--limit N]`` — what the recorded tasks
  would have cost under another policy, and which limits would have fired.
"""

from __future__ import annotations

import argparse
from decimal import Decimal, InvalidOperation
from typing import IO, Any

from agentguard._cli import (
    _CLIError,
    _emit,
    _positive,
    _reader,
    _table,
    _to_json,
    format_usd,
    parse_since,
)

__all__ = ["register"]


def _decimal(name: str) -> Any:
    def parse(text: str) -> Decimal:
        try:
            value = Decimal(text)
        except InvalidOperation:
            raise argparse.ArgumentTypeError(f"{name} {text!r}: expected a number") from None
        if not value.is_finite():
            raise argparse.ArgumentTypeError(f"{name} {text!r}: expected a finite number")
        return value

    return parse


# -- alerts ----------------------------------------------------------------------------------


def _cmd_alerts(args: argparse.Namespace, out: IO[str]) -> int:
    from agentguard._alerts import _PERIODS, Alerts, RateRule

    try:
        rule = RateRule(by=args.by, period=args.period, factor=args.factor, min_usd=args.min_usd)
        alerts = Alerts(rate_rules=[rule], webhook=args.webhook, log=False)
    except ValueError as e:
        raise _CLIError(str(e)) from None
    since = args.since
    if since is None:  # the previous period and this one
        import time

        since = time.time() - 2 * _PERIODS[args.period]
    with _reader(args) as reader:
        found = alerts.check(reader.tasks(since=since))
    alerts.close()
    if args.json:
        _emit(out, _to_json({"alerts": [a.to_dict() for a in found]}) + "\n")
        return 0
    if not found:
        _emit(
            out,
            f"no rate alerts: no {args.by} spent {args.factor}x its previous {args.period}'s "
            f"spend (at least {format_usd(rule.min_usd)})\n",
        )
        return 0
    rows = [
        [
            f"{a.fields['by']}={a.fields['group']}",
            str(a.fields["bucket"]),
            format_usd(a.fields["previous_usd"]),
            format_usd(a.fields["current_usd"]),
            f"{a.fields['current_usd'] / a.fields['previous_usd']:.2f}x",
        ]
        for a in found
    ]
    lines = _table(["GROUP", args.period.upper(), "PREVIOUS", "CURRENT", "GROWTH"], rows, "llrrr")
    _emit(out, f"Rate alerts ({args.factor}x period over period)\n" + "\n".join(lines) + "\n")
    if alerts.webhook is not None:
        _emit(out, f"webhook: {alerts.webhook.sent} sent, {alerts.webhook.failed} failed\n")
    return 0


# -- forecast and efficiency -----------------------------------------------------------------


def _records(args: argparse.Namespace, reader: Any) -> list[Any]:
    records = list(reader.tasks(since=args.since))
    if not records:
        raise _CLIError(
            "no tasks recorded"
            + (" since then" if args.since is not None else "")
            + " in "
            + reader.path
        )
    return records


def _duration(seconds: float) -> str:
    """``1.6 s``, ``12.0 min``, ``5.2 h``, ``3.1 days``."""
    for unit, size in (("days", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if seconds >= size:
            return f"{seconds / size:,.1f} {unit}"
    return f"{seconds:.1f} s"


def _cmd_forecast(args: argparse.Namespace, out: IO[str]) -> int:
    import time

    from agentguard._forecast import PERIODS, forecast

    by = None if args.by == "none" else args.by
    with _reader(args) as reader:
        records = _records(args, reader)
        try:
            rows = forecast(
                records,
                reader.spans,
                period=args.period,
                growth_pct=args.growth,
                by=by,
                since=args.since,
                until=time.time() if args.since is not None else None,
            )
        except ValueError as e:
            raise _CLIError(str(e)) from None
    if args.json:
        _emit(out, _to_json({"forecasts": [f.to_dict() for f in rows]}) + "\n")
        return 0
    total = rows[-1]
    lines = [
        f"Forecast per {args.period} from {total.requests} requests over "
        f"{_duration(total.window_s)} of traces (prompt-growth contingency {args.growth}%)",
    ]

    def usd(v: Decimal | None) -> str:
        return format_usd(v)

    def per_m(v: Decimal | None) -> str:
        return "unknown" if v is None else f"${(v * 1_000_000).quantize(Decimal('0.0001'))}"

    table = []
    for f in rows:
        name = "TOTAL" if f.key is None and by is not None else (f.key or "(untagged)")
        if f.key is None and by is None:
            name = "all"
        table.append(
            [
                name,
                f"{f.requests_per_period:,}",
                f"{f.input_tokens_per_request:,}",
                f"{f.output_tokens_per_request:,}",
                per_m(f.input_rate_usd),
                per_m(f.output_rate_usd),
                usd(f.input_usd),
                usd(f.output_usd),
                usd(f.contingency_usd),
                usd(f.optimised_usd),
                usd(f.unoptimised_usd) + ("*" if f.unestimated else ""),
            ]
        )
    header = [
        (by or "group").upper(), f"REQ/{args.period.upper()}", "IN TOK/REQ", "OUT TOK/REQ",
        "IN $/MTOK", "OUT $/MTOK", "INPUT", "OUTPUT", "CONTINGENCY", "OPTIMISED",
        "UNOPTIMISED",
    ]  # fmt: skip
    lines += _table(header, table, "lrrrrrrrrrr")
    if any(f.other_usd for f in rows):
        lines.append(f"OPTIMISED includes paid tools: {usd(total.other_usd)} per {args.period}")
    saved = ", ".join(f"{k} {usd(v)}" for k, v in total.savings_usd.items())
    lines.append(f"saved per {args.period} by the recorded decisions: {saved}")
    if any(f.unestimated for f in rows):
        lines.append(
            "* a lever could not be estimated (see `agentguard efficiency`): left out of "
            "UNOPTIMISED"
        )
    if total.unpriced_calls:
        lines.append(f"{total.unpriced_calls} model calls could not be priced: left out")
    if total.window_s < PERIODS[args.period]:
        lines.append(
            f"note: the traces cover {_duration(total.window_s)}, less than a {args.period}: "
            "the run-rate is extrapolated; use --since on a longer history"
        )
    _emit(out, "\n".join(lines) + "\n")
    return 0


def _cmd_efficiency(args: argparse.Namespace, out: IO[str]) -> int:
    from agentguard._efficiency import LEVERS, efficiency
    from agentguard._pricing import PriceBook

    by = None if args.by == "none" else args.by
    with _reader(args) as reader:
        rows = efficiency(_records(args, reader), reader.spans, by=by, prices=PriceBook())
    if args.json:
        _emit(out, _to_json({"efficiency": [e.to_dict() for e in rows]}) + "\n")
        return 0
    table = []
    for e in rows:
        ratio = e.tokens.waste_ratio
        name = "TOTAL" if e.key is None and by is not None else (e.key or "(untagged)")
        if e.key is None and by is None:
            name = "all"
        table.append(
            [
                name,
                str(e.tasks),
                str(e.completed),
                format_usd(e.cost_usd),
                format_usd(None if e.cost_per_completed_usd is None else
                           e.cost_per_completed_usd.quantize(Decimal("1e-8"))),
                f"{e.tokens.useful:,}",
                f"{e.tokens.context:,}",
                f"{e.tokens.retry:,}",
                f"{e.tokens.overhead:,}",
                "-" if ratio is None else f"{ratio:.1%}",
            ]
        )  # fmt: skip
    header = [
        (by or "group").upper(), "TASKS", "DONE", "COST", "COST/DONE", "USEFUL TOK",
        "CONTEXT TOK", "RETRY TOK", "OVERHEAD TOK", "WASTE",
    ]  # fmt: skip
    lines = ["Efficiency", *_table(header, table, "lrrrrrrrrr"), "", "Savings by lever"]
    lever_rows = [
        [
            "TOTAL" if e.key is None and by is not None else (e.key or "all"),
            *("n/a" if e.savings.get(lv) is None else format_usd(e.savings[lv]) for lv in LEVERS),
            str(e.ended_by_limit),
        ]
        for e in rows
    ]
    lines += _table(
        [(by or "group").upper(), *(lv.upper() for lv in LEVERS), "ENDED BY LIMIT"],
        lever_rows,
        "l" + "r" * (len(LEVERS) + 1),
    )
    lines.append(
        "waste = context re-sent + retried/failed calls + tasks without an answer, over all "
        "tokens; n/a = not estimable from the trace"
    )
    _emit(out, "\n".join(lines) + "\n")
    return 0


# -- replay ----------------------------------------------------------------------------------


def _cmd_replay(args: argparse.Namespace, out: IO[str]) -> int:
    from agentguard._errors import PolicyError
    from agentguard._policy import Policy
    from agentguard._replay import replay

    try:
        policy = Policy.from_file(args.policy)
    except FileNotFoundError:
        raise _CLIError(f"--policy {args.policy}: no such file") from None
    except (PolicyError, ValueError, OSError) as e:
        raise _CLIError(f"--policy {args.policy}: {e}") from None
    with _reader(args) as reader:
        records = [
            r
            for r in reader.tasks(since=args.since, feature=args.feature, team=args.team)
            if r.parent_id is None
        ]
        if not records:
            raise _CLIError(f"no tasks recorded to replay in {reader.path}")
        records = sorted(records, key=lambda r: (r.start, r.task_id))[-args.limit :]
        family: list[Any] = []
        pending = list(records)
        while pending:  # the chosen roots and all their sub-tasks
            r = pending.pop()
            family.append(r)
            pending.extend(reader.children(r.task_id))
        report = replay(family, reader.spans, policy)
    if args.json:
        _emit(out, _to_json(report.to_dict()) + "\n")
        return 0
    rows = []
    for t in report.tasks:
        status = t.status if t.status == t.recorded_status else f"{t.recorded_status}->{t.status}"
        if t.limit_hit:
            status += f" ({t.limit_hit})"
        delta = t.delta_usd
        rows.append(
            [
                t.task_id,
                t.tags.get("feature", "-"),
                format_usd(t.recorded_cost_usd),
                format_usd(t.cost_usd),
                "unknown" if delta is None else ("+" if delta > 0 else "") + format_usd(delta),
                f"{t.recorded_model_calls}->{t.model_calls}",
                status,
                ", ".join(t.fired) or "-" if t.error is None else f"error: {t.error}",
            ]
        )
    header = ["TASK", "FEATURE", "RECORDED", "REPLAYED", "DELTA", "CALLS", "STATUS", "FIRED"]
    lines = [f"Replay under {args.policy} ({len(report.tasks)} tasks)"]
    lines += _table(header, rows, "llrrrrll")
    rec, new = report.recorded_cost_usd, report.cost_usd
    lines.append(f"total: recorded {format_usd(rec)}, replayed {format_usd(new)}")
    fired = report.fired_counts()
    if fired:
        lines.append(
            "fired in: "
            + ", ".join(f"{k} {v} task{'s' if v != 1 else ''}" for k, v in fired.items())
        )
    _emit(out, "\n".join(lines) + "\n")
    return 0


# -- registration ----------------------------------------------------------------------------


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the review subcommands to the ``agentguard`` parser's subparsers ``sub``."""
    alerts = sub.add_parser(
        "alerts",
        parents=[common],
        help="spend of a feature/team growing N-fold period over period (from the trace)",
    )
    alerts.add_argument("--by", default="feature", metavar="TAG", help="tag to group by")
    alerts.add_argument(
        "--period", choices=("hour", "day", "week"), default="day", help="UTC period (day)"
    )
    alerts.add_argument(
        "--factor", type=_decimal("--factor"), default=Decimal(2), help="growth that alerts (2)"
    )
    alerts.add_argument(
        "--min-usd",
        type=_decimal("--min-usd"),
        default=Decimal("0.01"),
        metavar="USD",
        help="ignore groups spending less than this in the period (0.01)",
    )
    alerts.add_argument(
        "--since",
        type=parse_since,
        metavar="WHEN",
        help="look back to this (default: the previous and the current period)",
    )
    alerts.add_argument("--webhook", metavar="URL", help="also POST each alert to this URL")
    alerts.set_defaults(func=_cmd_alerts)

    fc = sub.add_parser(
        "forecast",
        parents=[common],
        help="run-rate per feature: requests x tokens x blended rate, optimised vs not",
    )
    fc.add_argument(
        "--period", choices=("hour", "day", "week", "month"), default="month", help="(month)"
    )
    fc.add_argument(
        "--growth",
        type=_decimal("--growth"),
        default=Decimal(10),
        metavar="PCT",
        help="prompt-growth contingency, percent of the input run-rate (10)",
    )
    fc.add_argument("--by", default="feature", metavar="TAG", help="tag to group by, or none")
    fc.add_argument(
        "--since",
        type=parse_since,
        metavar="WHEN",
        help="use tasks since then; the window runs to now (default: first to last task)",
    )
    fc.set_defaults(func=_cmd_forecast)

    eff = sub.add_parser(
        "efficiency",
        parents=[common],
        help="token waste ratio, cost per completed task, savings by lever",
    )
    eff.add_argument("--by", default="feature", metavar="TAG", help="tag to group by, or none")
    eff.add_argument("--since", type=parse_since, metavar="WHEN", help="24h, 7d or an ISO date")
    eff.set_defaults(func=_cmd_efficiency)

    rp = sub.add_parser(
        "replay",
        parents=[common],
        help="what recorded tasks would cost under another policy, and which limits fire",
    )
    rp.add_argument("--policy", required=True, metavar="FILE", help="policy file (TOML/YAML/JSON)")
    rp.add_argument("--since", type=parse_since, metavar="WHEN", help="24h, 7d or an ISO date")
    rp.add_argument("--feature", metavar="F", help="only tasks tagged feature=F")
    rp.add_argument("--team", metavar="T", help="only tasks tagged team=T")
    rp.add_argument(
        "--limit", type=_positive, default=200, metavar="N", help="the latest N tasks (200)"
    )
    rp.set_defaults(func=_cmd_replay)
