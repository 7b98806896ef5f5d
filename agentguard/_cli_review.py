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

from agentguard._cli import _CLIError, _emit, _reader, _table, _to_json, format_usd, parse_since

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
    except ValueError as e:
        raise _CLIError(str(e)) from None
    since = args.since
    if since is None:  # the previous period and this one
        import time

        since = time.time() - 2 * _PERIODS[args.period]
    alerts = Alerts(rate_rules=[rule], webhook=args.webhook, log=False)
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
