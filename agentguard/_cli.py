"""The ``agentguard`` command: review cost traces and look up prices.

Subcommands (each takes ``--db PATH``, default ``$AGENTGUARD_DB`` or ``agentguard.db``, and
``--json`` for machine-readable output with money as strings):

* ``agentguard report [--since 24h|7d|ISO] [--feature F] [--team T] [--top N] [--limit N]`` —
  per-task table, the most expensive tasks, totals by feature, team and model;
  ``--html FILE [--waterfalls N]`` writes the same as one self-contained HTML page with a spend
  chart, the decisions and what they saved, and span waterfalls (:mod:`agentguard._html`);
* ``agentguard trace TASK_ID`` — one task's span tree with timing, tokens, cost and decisions;
* ``agentguard prices MODEL [--provider P]`` — the per-million-token rates agentguard uses.

Exit codes: 0 success, 2 usage errors, a missing database, an unknown task or model.

Money is printed exactly (``$0.001234``, never rounded to ``$0.00``); an unknown cost prints as
``unknown``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import IO, Any

from agentguard._trace import DECISIONS, Span, TaskRecord

__all__ = ["format_usd", "main", "parse_since"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SINCE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_NO_DB = "no trace database at {path}; run something under a Guard first or pass --db"


class _CLIError(Exception):
    """Reported on stderr as ``agentguard: error: ...``; exit code 2."""


# -- formatting ------------------------------------------------------------------------------


def format_usd(value: Decimal | None) -> str:
    """Format money exactly: at least 2 decimals, as many as the value needs.

    Example:
        >>> from decimal import Decimal
        >>> format_usd(Decimal("0.001234")), format_usd(Decimal("1234.5")), format_usd(None)
        ('$0.001234', '$1,234.50', 'unknown')
    """
    if value is None:
        return "unknown"
    if not value.is_finite():
        return str(value)
    exponent = value.normalize().as_tuple().exponent
    places = max(2, -exponent) if isinstance(exponent, int) else 2
    sign = "-" if value < 0 else ""
    return f"{sign}${abs(value):,.{places}f}"


def parse_since(text: str, *, now: float | None = None) -> float:
    """Parse ``--since``: a duration back from now (``90s``, ``30m``, ``24h``, ``7d``, ``2w``) or
    an ISO date / datetime (naive means UTC). Returns epoch seconds.

    Example:
        >>> parse_since("24h", now=100000.0)
        13600.0
        >>> parse_since("2026-01-02T00:00:00Z")
        1767312000.0
    """
    m = _SINCE_RE.match(text)
    if m:
        now = time.time() if now is None else now
        return now - float(m.group(1)) * _UNITS[m.group(2).lower()]
    try:
        dt = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--since {text!r}: expected a duration like 30m, 24h, 7d or an ISO date/time "
            "like 2026-11-20 or 2026-11-20T09:00:00+01:00"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def _fmt_int(n: int, estimated: bool = False) -> str:
    return f"{'~' if estimated else ''}{n:,}"


def _fmt_time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "open"
    return f"{ms:,.1f}"


class _Symbols:
    def __init__(self, stream: IO[str]) -> None:
        encoding = getattr(stream, "encoding", None) or "ascii"
        try:
            "×├└│─".encode(encoding)
            fancy = True
        except (UnicodeEncodeError, LookupError):
            fancy = False
        self.times = "×" if fancy else "x"
        self.tee = "├─ " if fancy else "|- "
        self.elbow = "└─ " if fancy else "`- "
        self.pipe = "│  " if fancy else "|  "


def _decisions(counts: dict[str, int], times: str) -> str:
    order = {d: i for i, d in enumerate(DECISIONS)}
    items = sorted(counts.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))
    return " ".join(f"{k}{times}{v}" for k, v in items if v)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> list[str]:
    """Plain-text table: two spaces between columns, ``align`` is one ``l``/``r`` per column."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.rjust(widths[i]) if align[i] == "r" else c.ljust(widths[i])
            for i, c in enumerate(cells)
        ]
        return "  ".join(parts).rstrip()

    return [line(headers), *(line(r) for r in rows)]


def _group_cost(g: dict[str, Any]) -> str:
    if g["cost_usd"] is not None:
        return format_usd(g["cost_usd"])
    return f"unknown: {format_usd(g['priced_usd'])} + {g['unpriced']} unpriced"


def _emit(out: IO[str], text: str) -> None:
    """Write ``text``; characters the terminal's encoding lacks become ``?``, not a traceback."""
    try:
        out.write(text)
    except UnicodeEncodeError:
        encoding = getattr(out, "encoding", None) or "ascii"
        out.write(text.encode(encoding, "replace").decode(encoding))


def _to_json(obj: Any) -> str:
    def default(o: Any) -> Any:
        if isinstance(o, Decimal):
            return str(o)
        if isinstance(o, set | frozenset | tuple):
            return list(o)
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")

    return json.dumps(obj, indent=2, ensure_ascii=False, default=default)


# -- commands --------------------------------------------------------------------------------


def _db_path(args: argparse.Namespace) -> str:
    return str(args.db or os.environ.get("AGENTGUARD_DB") or "agentguard.db")


def _reader(args: argparse.Namespace) -> Any:
    from agentguard._sinks import SQLiteTraceReader, TraceStoreError

    path = _db_path(args)
    if not os.path.isfile(path):
        raise _CLIError(_NO_DB.format(path=path))
    try:
        return SQLiteTraceReader(path)
    except TraceStoreError as e:
        raise _CLIError(str(e)) from None


def _cmd_report(args: argparse.Namespace, out: IO[str]) -> int:
    sym = _Symbols(out)
    since: float | None = args.since
    if args.html is not None:
        return _write_html(args, out)
    with _reader(args) as reader:
        filters = {"since": since, "feature": args.feature, "team": args.team}
        tasks: list[TaskRecord] = reader.tasks(**filters)
        totals = {by: reader.totals(by, **filters) for by in ("feature", "team", "model")}
    shown = tasks[: args.limit] if args.limit is not None else tasks
    ranked = sorted(
        tasks, key=lambda t: (t.cost_usd is None, -(t.cost_usd or Decimal(0)), t.task_id)
    )[: args.top or 5]

    if args.json:
        doc = {
            "db": _db_path(args),
            "since": since,
            "feature": args.feature,
            "team": args.team,
            "task_count": len(tasks),
            "tasks": [t.to_dict() for t in shown],
            "top_by_cost": [
                {"task_id": t.task_id, "feature": t.tags.get("feature"), "cost_usd": t.cost_usd}
                for t in ranked
            ],
            "totals": totals,
        }
        _emit(out, _to_json(doc) + "\n")
        return 0

    scope = [f"db {_db_path(args)}"]
    if since is not None:
        scope.append(f"since {_fmt_time(since)}")
    if args.feature is not None:
        scope.append(f"feature={args.feature}")
    if args.team is not None:
        scope.append(f"team={args.team}")
    lines = [f"agentguard report: {len(tasks)} task{'s' * (len(tasks) != 1)} ({', '.join(scope)})"]
    if not tasks:
        lines.append("no tasks recorded in this window")
        _emit(out, "\n".join(lines) + "\n")
        return 0

    lines.append("")
    if len(shown) < len(tasks):
        lines.append(f"Tasks (latest {len(shown)} of {len(tasks)})")
    else:
        lines.append("Tasks")
    rows = [
        [
            t.task_id,
            t.tags.get("feature", "-"),
            t.tags.get("team", "-"),
            _fmt_int(t.model_calls),
            _fmt_int(t.tool_calls),
            _fmt_int(t.usage.input_tokens, t.usage.estimated),
            _fmt_int(t.usage.output_tokens, t.usage.estimated),
            format_usd(t.cost_usd),
            format_usd(t.saved_usd),
            _decisions(t.decisions, sym.times) or "-",
            t.limit_hit or "-",
        ]
        for t in shown
    ]
    lines += _table(
        [
            "TASK",
            "FEATURE",
            "TEAM",
            "MODEL CALLS",
            "TOOL CALLS",
            "INPUT TOK",
            "OUTPUT TOK",
            "COST",
            "SAVED",
            "DECISIONS",
            "LIMIT HIT",
        ],
        rows,
        "lllrrrrrrll",
    )

    lines += ["", f"Top {len(ranked)} tasks by cost"]
    lines += _table(
        ["#", "TASK", "FEATURE", "TEAM", "COST", "SAVED"],
        [
            [
                str(i),
                t.task_id,
                t.tags.get("feature", "-"),
                t.tags.get("team", "-"),
                format_usd(t.cost_usd),
                format_usd(t.saved_usd),
            ]
            for i, t in enumerate(ranked, 1)
        ],
        "rlllrr",
    )

    for by in ("feature", "team", "model"):
        groups = totals[by]
        lines += ["", f"Totals by {by}"]
        if not groups:
            lines.append("(none)")
            continue
        # Savings belong to trim / decision spans, not to a model: no SAVED column by model.
        with_saved = by != "model"
        headers = [by.upper(), "TASKS", "MODEL CALLS" if with_saved else "CALLS"]
        headers += ["INPUT TOK", "OUTPUT TOK", "COST", *(["SAVED"] * with_saved)]
        lines += _table(
            headers,
            [
                [
                    g["key"] if g["key"] is not None else "(none)",
                    _fmt_int(g["tasks"]),
                    _fmt_int(g["model_calls"]),
                    _fmt_int(g["input_tokens"]),
                    _fmt_int(g["output_tokens"]),
                    _group_cost(g),
                    *([format_usd(g["saved_usd"])] * with_saved),
                ]
                for g in groups
            ],
            "lrrrrrr",
        )
    _emit(out, "\n".join(lines) + "\n")
    return 0


def _write_html(args: argparse.Namespace, out: IO[str]) -> int:
    from agentguard._html import render_report

    with _reader(args) as reader:
        page = render_report(
            reader,
            since=args.since,
            feature=args.feature,
            team=args.team,
            top=args.top or 10,
            waterfalls=args.waterfalls,
        )
    path = str(args.html)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(page)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise _CLIError(f"--html {path!r}: cannot write the report: {e.strerror or e}") from None
    size = len(page.encode("utf-8"))
    if args.json:
        _emit(out, _to_json({"html": path, "bytes": size}) + "\n")
    else:
        _emit(out, f"wrote {path} ({size / 1024:,.0f} KB)\n")
    return 0


def _span_cost(s: Span) -> str:
    if s.cost_usd is not None:
        return format_usd(s.cost_usd)
    if s.kind == "model" or s.usage is not None:
        return "unknown"
    return ""


def _span_note(s: Span) -> str:
    parts = [s.reason] if s.reason else []
    saved_tok = s.attrs.get("tokens_saved")
    saved_usd = s.attrs.get("saved_usd")
    if saved_tok or saved_usd:
        bits = []
        if saved_tok:
            bits.append(f"{int(saved_tok):,} tok")
        if saved_usd:
            bits.append(format_usd(Decimal(str(saved_usd))))
        parts.append(f"(saved {', '.join(bits)})")
    if s.status not in ("ok", "finished"):
        parts.append(f"[{s.status}]")
    return " ".join(parts)


def _tree(spans: list[Span], sym: _Symbols) -> list[tuple[str, Span]]:
    """Depth-first order with tree prefixes; orphans (parent not recorded) become roots."""
    ids = {s.span_id for s in spans}
    children: dict[str | None, list[Span]] = {}
    for s in spans:
        parent = s.parent_id if s.parent_id in ids and s.parent_id != s.span_id else None
        children.setdefault(parent, []).append(s)
    out: list[tuple[str, Span]] = []
    seen: set[str] = set()

    def walk(span: Span, prefix: str, connector: str) -> None:
        if span.span_id in seen:  # defensive: a cycle in corrupt data
            return
        seen.add(span.span_id)
        out.append((prefix + connector + span.name, span))
        kids = children.get(span.span_id, [])
        if connector == sym.tee:
            prefix += sym.pipe
        elif connector == sym.elbow:
            prefix += "   "
        for i, kid in enumerate(kids):
            walk(kid, prefix, sym.elbow if i == len(kids) - 1 else sym.tee)

    for root in children.get(None, []):
        walk(root, "", "")
    return out


def _cmd_trace(args: argparse.Namespace, out: IO[str]) -> int:
    sym = _Symbols(out)
    with _reader(args) as reader:
        record: TaskRecord | None = reader.task(args.task_id)
        spans: list[Span] = reader.spans(args.task_id)
        children: list[TaskRecord] = reader.children(args.task_id)
    if record is None and not spans:
        raise _CLIError(f"unknown task id {args.task_id!r} in {_db_path(args)}")

    if args.json:
        doc = {
            "task": None if record is None else record.to_dict(),
            "spans": [s.to_dict() for s in spans],
            "children": [c.to_dict() for c in children],
        }
        _emit(out, _to_json(doc) + "\n")
        return 0

    lines: list[str] = []
    if record is not None:
        tags = " ".join(f"{k}={v}" for k, v in sorted(record.tags.items()))
        lines.append(
            f"task {record.task_id}  status={record.status}" + (f"  {tags}" if tags else "")
        )
        summary = [
            f"started {_fmt_time(record.start)}",
            f"duration {_fmt_ms(record.duration_ms)} ms",
            f"cost {format_usd(record.cost_usd)}",
            f"saved {format_usd(record.saved_usd)}",
            f"model calls {record.model_calls}",
            f"tool calls {record.tool_calls}",
            "tokens in "
            f"{_fmt_int(record.usage.input_tokens, record.usage.estimated)}"
            f" / out {_fmt_int(record.usage.output_tokens, record.usage.estimated)}",
        ]
        if record.decisions:
            summary.append(f"decisions {_decisions(record.decisions, sym.times)}")
        if record.limit_hit:
            summary.append(f"limit hit {record.limit_hit}")
        lines.append("  " + "  ".join(summary))
        if record.parent_id:
            lines.append(f"  parent task {record.parent_id}")
        if children:
            kids = ", ".join(f"{c.task_id} ({format_usd(c.cost_usd)})" for c in children)
            lines.append(f"  sub-tasks (costs not included above): {kids}")
    else:
        lines.append(f"task {args.task_id}  (no task record yet: still running, or it crashed)")

    if spans:
        lines.append("")
        rows = []
        for label, s in _tree(spans, sym):
            u = s.usage
            rows.append(
                [
                    label,
                    s.kind,
                    _fmt_ms(s.duration_ms),
                    s.model or "",
                    "" if u is None else _fmt_int(u.input_tokens, u.estimated),
                    "" if u is None else _fmt_int(u.output_tokens, u.estimated),
                    _span_cost(s),
                    s.decision or "",
                    _span_note(s),
                ]
            )
        lines += _table(
            ["SPAN", "KIND", "MS", "MODEL", "IN TOK", "OUT TOK", "COST", "DECISION", "REASON"],
            rows,
            "llrlrrrll",
        )
    else:
        lines += ["", "(no spans recorded)"]
    _emit(out, "\n".join(lines) + "\n")
    return 0


_RATE_LABELS = {
    "input": "input",
    "cache_read": "cached input",
    "cache_write": "cache write",
    "output": "output",
    "reasoning": "reasoning",
}
# What a missing (None) rate means: the tokens are billed at another unit's rate.
_BILLED_AS = {"cache_read": "as input", "cache_write": "as input", "reasoning": "as output"}
_MILLION = Decimal(1_000_000)


def _per_million(rate: Decimal | None) -> Decimal | None:
    if rate is None:
        return None
    value = rate * _MILLION
    return value.quantize(Decimal(1)) if value == value.to_integral_value() else value.normalize()


def _rate_cell(key: str, per_million: Decimal | None) -> str:
    if per_million is None:
        return _BILLED_AS.get(key, "n/a")
    return format_usd(per_million)


def _tier_per_million(tier: Any) -> dict[str, Decimal | None]:
    return {k: _per_million(getattr(tier, k, None)) for k in _RATE_LABELS}


def _cmd_prices(args: argparse.Namespace, out: IO[str]) -> int:
    from agentguard._pricing import PriceBook  # lazy: genai-prices is heavy to import

    try:
        rates = PriceBook().rates(args.model, args.provider)
    except LookupError:
        rates = None
    if rates is None:
        where = f" from provider {args.provider!r}" if args.provider else ""
        raise _CLIError(
            f"no price known for model {args.model!r}{where}; check the name, pass --provider, "
            "or add a price override"
        )
    per_million: dict[str, Decimal | None] = dict(rates.per_million)
    tiers: Sequence[Any] = tuple(getattr(rates, "tiers", ()) or ())
    per_request: Decimal | None = getattr(rates, "per_request", None)
    discount: Decimal | None = getattr(rates, "discount", None)
    peak: Sequence[Any] = tuple(getattr(rates, "peak", ()) or ())

    if args.json:
        doc = {
            "model": rates.model,
            "resolved": rates.resolved,
            "provider": rates.provider,
            "source": rates.source,
            "per_million": per_million,
            "per_token": {k: getattr(rates, k, None) for k in _RATE_LABELS},
            "per_request_usd": per_request,
            "discount": discount,
            "tiers": [
                {"above_input_tokens": t.start, "per_million": _tier_per_million(t)} for t in tiers
            ],
            "time_of_day_rates": len(peak),
        }
        _emit(out, _to_json(doc) + "\n")
        return 0

    head = [("model", str(rates.model))]
    if rates.resolved and rates.resolved != rates.model:
        head.append(("resolved", str(rates.resolved)))
    head += [("provider", rates.provider or "-"), ("source", str(rates.source))]
    if discount is not None:
        head.append(("discount", f"x{discount}"))
    lines = [f"{k:<9} {v}" for k, v in head]
    lines.append("")
    keys = [k for k in _RATE_LABELS if k in per_million]
    keys += [k for k in per_million if k not in _RATE_LABELS]
    lines += _table(
        ["RATE", "USD / 1M TOKENS"],
        [[_RATE_LABELS.get(k, k), _rate_cell(k, per_million[k])] for k in keys],
        "lr",
    )
    if per_request is not None:
        lines.append(f"plus {format_usd(per_request)} per request")
    if tiers:
        units = [k for k in _RATE_LABELS if k != "reasoning" or any(t.reasoning for t in tiers)]
        lines += [
            "",
            "Long-context tiers (USD / 1M tokens; when a call's input exceeds the threshold,",
            "all of its tokens are billed at the tier's rates)",
        ]
        lines += _table(
            ["ABOVE INPUT TOK", *(_RATE_LABELS[k].upper() for k in units)],
            [
                [_fmt_int(t.start), *(_rate_cell(k, _tier_per_million(t)[k]) for k in units)]
                for t in tiers
            ],
            "r" * (len(units) + 1),
        )
    if peak:
        lines += ["", f"time-of-day pricing: {len(peak)} other rate set(s) apply at some hours"]
    _emit(out, "\n".join(lines) + "\n")
    return 0


# -- entry point -----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--db",
        metavar="PATH",
        help="trace database (default: $AGENTGUARD_DB or agentguard.db)",
    )
    common.add_argument("--json", action="store_true", help="machine-readable JSON output")

    parser = argparse.ArgumentParser(
        prog="agentguard",
        description="Review agentguard cost traces and the prices behind them.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    report = sub.add_parser(
        "report", parents=[common], help="per-task costs, top tasks, totals by feature/team/model"
    )
    report.add_argument(
        "--since", type=parse_since, metavar="WHEN", help="24h, 7d, 30m or an ISO date/time"
    )
    report.add_argument("--feature", metavar="F", help="only tasks tagged feature=F")
    report.add_argument("--team", metavar="T", help="only tasks tagged team=T")
    report.add_argument(
        "--top",
        type=_positive,
        default=None,
        metavar="N",
        help="top N tasks by cost (default 5; 10 with --html)",
    )
    report.add_argument(
        "--limit",
        type=_positive,
        default=50,
        metavar="N",
        help="latest N tasks in the task table (default 50)",
    )
    report.add_argument(
        "--html",
        metavar="FILE",
        help="write a self-contained HTML report (charts, top tasks, waterfalls) to FILE",
    )
    report.add_argument(
        "--waterfalls",
        type=_positive,
        default=20,
        metavar="N",
        help="with --html: span waterfalls for the N most expensive tasks (default 20)",
    )
    report.set_defaults(func=_cmd_report)

    trace = sub.add_parser("trace", parents=[common], help="one task's span tree")
    trace.add_argument("task_id", metavar="TASK_ID")
    trace.set_defaults(func=_cmd_trace)

    prices = sub.add_parser("prices", parents=[common], help="the rates used for a model")
    prices.add_argument("model", metavar="MODEL")
    prices.add_argument("--provider", metavar="P", help="provider id, e.g. openai, anthropic")
    prices.set_defaults(func=_cmd_prices)
    from agentguard._cli_review import register  # alerts, forecast, efficiency, replay

    register(sub, common)
    return parser


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def main(argv: list[str] | None = None) -> int:
    """Run the ``agentguard`` command; returns the exit code.

    Args:
        argv: arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        0 on success, 2 on a usage error, a missing database, or an unknown task or model.

    Example:
        >>> main(["report", "--db", "/nonexistent/agentguard.db"])
        2
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse reports the error itself
        return e.code if isinstance(e.code, int) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    func: Callable[[argparse.Namespace, IO[str]], int] = args.func
    try:
        return func(args, sys.stdout)
    except _CLIError as e:
        print(f"agentguard: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `agentguard report | head`: stop quietly; keep Python from complaining at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # python -m agentguard._cli
    sys.exit(main())
