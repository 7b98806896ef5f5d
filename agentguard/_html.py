"""The HTML cost-trace report behind ``agentguard report --html out.html``.

One self-contained file: inline CSS, inline SVG and a few lines of inline JavaScript; no
fonts, images, scripts or styles from anywhere else. The page carries a Content-Security-Policy
that forbids every network fetch, so a report built from untrusted trace data cannot call out
when opened.

Sections: a summary, spend over time (an SVG chart with a data table as its text alternative),
the top tasks, spend by feature / team / model, the decisions taken and what they saved, and a
waterfall of the spans of the most expensive tasks (a selector shows one at a time).

Rules the rendering keeps:

* every string that comes from a trace (task ids, tags, model, tool and step names, reasons) is
  HTML-escaped;
* money is printed exactly (:func:`agentguard._cli.format_usd`); an unknown cost prints as
  ``unknown``, never ``$0``; values from estimated token counts carry a ``~`` mark;
* prompt and completion text appear only when the trace holds them, i.e. the guard ran with
  ``capture_content=True``;
* the size stays bounded for any number of tasks: waterfalls for the top ``waterfalls`` tasks by
  cost, at most :data:`MAX_SPANS_PER_TASK` rows each, at most :data:`MAX_DECISION_ROWS` decision
  rows.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from agentguard._cli import format_usd
from agentguard._sinks import SQLiteTraceReader
from agentguard._trace import DECISIONS, Span, TaskRecord

__all__ = ["CSP", "MAX_DECISION_ROWS", "MAX_GROUP_ROWS", "MAX_SPANS_PER_TASK", "render_report"]

#: The page's Content-Security-Policy: inline styles, scripts and ``data:`` images only.
CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"

#: Rows per task waterfall; a longer task shows its first spans and says how many are left out.
MAX_SPANS_PER_TASK = 400

#: Rows in the decisions list, one per task and kind (the per-kind summary above it always
#: counts every decision).
MAX_DECISION_ROWS = 200

#: Rows per spend-by-feature / team / model table; the rest are summed in one more row.
MAX_GROUP_ROWS = 25

#: Longest captured prompt / completion text shown per span (opt-in content only).
_MAX_CONTENT_CHARS = 2000

_BUCKETS = (
    (1, "second"),
    (10, "10 seconds"),
    (60, "minute"),
    (300, "5 minutes"),
    (900, "15 minutes"),
    (3600, "hour"),
    (6 * 3600, "6 hours"),
    (86400, "day"),
    (7 * 86400, "week"),
    (30 * 86400, "30 days"),
)
_MAX_BUCKETS = 60

_DECISION_TEXT = {
    "downgrade": "model call served by a cheaper model",
    "trim": "retrieved context trimmed to the budget",
    "cap": "output capped by the remaining budget",
    "block": "tool call blocked by a cap",
    "finish": "graceful final answer at a limit",
    "soft_limit": "soft threshold crossed (warning only)",
    "warn": "over a limit, let through (on_limit=warn)",
    "stop": "run stopped at a limit",
}
_DECISION_ORDER = (*(d for d in DECISIONS if d != "allow"), "cap")


def _e(value: object) -> str:
    """HTML-escape any value (quotes too: safe in text and in attribute values)."""
    return html.escape(str(value), quote=True)


def _usd(value: Decimal | None, estimated: bool = False) -> str:
    if value is None:
        return '<span class="unknown" title="could not be priced">unknown</span>'
    text = _e(format_usd(value))
    if estimated:
        return f'<span class="est" title="from estimated token counts">~{text}</span>'
    return text


def _int(n: int, estimated: bool = False) -> str:
    if estimated:
        return f'<span class="est" title="estimated">~{n:,}</span>'
    return f"{n:,}"


def _ms(ms: float | None) -> str:
    return "open" if ms is None else f"{ms:,.1f}"


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ranked(tasks: Iterable[TaskRecord]) -> list[TaskRecord]:
    """Most expensive first; unknown costs after the priced ones, then by id."""
    return sorted(tasks, key=lambda t: (t.cost_usd is None, -(t.cost_usd or Decimal(0)), t.task_id))


def _sum_costs(values: Iterable[Decimal | None]) -> tuple[Decimal, int]:
    """(sum of the known costs, how many were unknown)."""
    total, unknown = Decimal(0), 0
    for v in values:
        if v is None:
            unknown += 1
        else:
            total += v
    return total, unknown


def _total_cell(priced: Decimal, unknown: int) -> str:
    if not unknown:
        return _usd(priced)
    return f"{_usd(None)} ({_e(format_usd(priced))} priced + {unknown:,} unpriced)"


# -- data --------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Bucket:
    start: float
    priced: Decimal
    unknown: int
    tasks: int


def _buckets(tasks: Sequence[TaskRecord]) -> tuple[list[_Bucket], str, int]:
    """Spend per time bucket (by task start), the bucket's name and its width in seconds."""
    if not tasks:
        return [], "", 0
    first = min(t.start for t in tasks)
    last = max(t.start for t in tasks)
    width, label = _BUCKETS[-1]
    for w, name in _BUCKETS:
        if int(last // w) - int(first // w) + 1 <= _MAX_BUCKETS:
            width, label = w, name
            break
    lo = int(first // width)
    n = int(last // width) - lo + 1
    out = [_Bucket(float((lo + i) * width), Decimal(0), 0, 0) for i in range(n)]
    for t in tasks:
        b = out[min(int(t.start // width) - lo, n - 1)]
        b.tasks += 1
        if t.cost_usd is None:
            b.unknown += 1
        else:
            b.priced += t.cost_usd
    return out, label, width


def _decision_label(s: Span) -> str | None:
    if s.decision is None:
        return None
    if s.decision == "allow":
        return "cap" if s.reason and "capped" in s.reason else None
    return s.decision


def _saved(s: Span) -> Decimal | None:
    v = s.attrs.get("saved_usd")
    if v is None:
        return None
    return v if isinstance(v, Decimal) else Decimal(str(v))


# -- sections ----------------------------------------------------------------------------------


def _summary(tasks: Sequence[TaskRecord]) -> str:
    priced, unknown = _sum_costs(t.cost_usd for t in tasks)
    saved = sum((t.saved_usd for t in tasks), Decimal(0))
    est = any(t.usage.estimated for t in tasks)
    tin = sum(t.usage.input_tokens for t in tasks)
    tout = sum(t.usage.output_tokens for t in tasks)
    cards = [
        ("Spend", _total_cell(priced, unknown)),
        ("Tasks", _int(len(tasks))),
        ("Model calls", _int(sum(t.model_calls for t in tasks))),
        ("Tool calls", _int(sum(t.tool_calls for t in tasks))),
        ("Tokens in / out", f"{_int(tin, est)} / {_int(tout, est)}"),
        ("Saved by decisions", _usd(saved)),
    ]
    items = "".join(
        f'<div class="card"><dt>{_e(k)}</dt><dd data-metric="{_e(k)}">{v}</dd></div>'
        for k, v in cards
    )
    return (
        '<section aria-labelledby="h-summary"><h2 id="h-summary">Summary</h2>'
        f'<dl class="cards">{items}</dl></section>'
    )


def _chart(tasks: Sequence[TaskRecord]) -> str:
    head = '<section aria-labelledby="h-time"><h2 id="h-time">Spend over time</h2>'
    buckets, label, width = _buckets(tasks)
    if not buckets:
        return head + '<p class="empty">No tasks recorded in this window.</p></section>'
    top = max(b.priced for b in buckets)
    peak = max(buckets, key=lambda b: (b.priced, -b.start))
    w, h, pad_l, pad_b, pad_t = 960, 220, 8, 28, 24
    inner_w, inner_h = w - 2 * pad_l, h - pad_b - pad_t
    slot = inner_w / len(buckets)
    bar_w = max(1.0, min(slot * 0.8, 48.0))
    bars: list[str] = []
    for i, b in enumerate(buckets):
        x = pad_l + i * slot + (slot - bar_w) / 2
        frac = float(b.priced / top) if top > 0 else 0.0
        bh = max(frac * inner_h, 1.0 if b.tasks else 0.0)
        y = pad_t + inner_h - bh
        tip = f"{_when(b.start)}: {format_usd(b.priced)} over {b.tasks} task(s)"
        if b.unknown:
            tip += f", {b.unknown} unpriced"
        cls = "bar unk" if b.unknown else "bar"
        bars.append(
            f'<rect class="{cls}" x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" '
            f'height="{bh:.1f}"><title>{_e(tip)}</title></rect>'
        )
    axis_y = pad_t + inner_h
    ticks = sorted({0, len(buckets) // 2, len(buckets) - 1})
    tick_text = "".join(
        f'<text class="tick" x="{pad_l + (i + 0.5) * slot:.1f}" y="{h - 8}" '
        f'text-anchor="middle">{_e(_when(buckets[i].start))}</text>'
        for i in ticks
    )
    desc = (
        f"Bar chart of spend per {label} from {_when(buckets[0].start)} to "
        f"{_when(buckets[-1].start + width)}: {len(buckets)} bars; the highest is "
        f"{format_usd(peak.priced)} in the {label} starting {_when(peak.start)}."
    )
    svg = (
        f'<svg class="chart" viewBox="0 0 {w} {h}" role="img" aria-labelledby="chart-t chart-d" '
        f'preserveAspectRatio="none">'
        f'<title id="chart-t">Spend per {_e(label)}</title><desc id="chart-d">{_e(desc)}</desc>'
        f'<line class="axis" x1="{pad_l}" y1="{axis_y}" x2="{w - pad_l}" y2="{axis_y}"/>'
        f'<text class="tick" x="{pad_l}" y="{pad_t - 8}">peak {_e(format_usd(top))} per '
        f"{_e(label)}</text>{''.join(bars)}{tick_text}</svg>"
    )
    rows = "".join(
        f"<tr><td>{_e(_when(b.start))}</td><td class=num>{b.tasks:,}</td>"
        f"<td class=num>{_total_cell(b.priced, b.unknown)}</td></tr>"
        for b in buckets
        if b.tasks
    )
    table = (
        "<details><summary>Data table</summary><table><caption>Spend per "
        f"{_e(label)} (by task start)</caption><thead><tr><th scope=col>{_e(label.title())} "
        "starting</th><th scope=col class=num>Tasks</th><th scope=col class=num>Spend</th>"
        f"</tr></thead><tbody>{rows}</tbody></table></details>"
    )
    return f'{head}<p class="note" id="chart-desc">{_e(desc)}</p>{svg}{table}</section>'


def _tag(t: TaskRecord, key: str) -> str:
    v = t.tags.get(key)
    return '<span class="muted">-</span>' if v is None else _e(v)


def _top(ranked: Sequence[TaskRecord], top: int, anchors: dict[str, int]) -> str:
    head = '<section aria-labelledby="h-top"><h2 id="h-top">Top tasks by cost</h2>'
    if not ranked:
        return head + '<p class="empty">No tasks recorded in this window.</p></section>'
    rows = []
    for i, t in enumerate(ranked[:top], 1):
        name = _e(t.task_id)
        if t.task_id in anchors:
            name = f'<a href="#task-{anchors[t.task_id]}" data-wf="{anchors[t.task_id]}">{name}</a>'
        decisions = _decision_counts(t.decisions)
        rows.append(
            f"<tr><td class=num>{i}</td><th scope=row>{name}</th><td>{_tag(t, 'feature')}</td>"
            f"<td>{_tag(t, 'team')}</td><td>{_e(t.status)}</td>"
            f"<td class=num>{t.model_calls:,}</td><td class=num>{t.tool_calls:,}</td>"
            f"<td class=num>{_usd(t.cost_usd, t.usage.estimated)}</td>"
            f"<td class=num>{_usd(t.saved_usd)}</td><td>{decisions}</td>"
            f"<td>{_e(t.limit_hit or '')}</td></tr>"
        )
    return (
        f"{head}<table><thead><tr><th scope=col class=num>#</th><th scope=col>Task</th>"
        "<th scope=col>Feature</th><th scope=col>Team</th><th scope=col>Status</th>"
        "<th scope=col class=num>Model calls</th><th scope=col class=num>Tool calls</th>"
        "<th scope=col class=num>Cost</th><th scope=col class=num>Saved</th>"
        "<th scope=col>Decisions</th><th scope=col>Limit hit</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></section>"
    )


def _decision_counts(counts: dict[str, int]) -> str:
    order = {d: i for i, d in enumerate(_DECISION_ORDER)}
    items = sorted(counts.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))
    return " ".join(f'<span class="pill d-{_e(k)}">{_e(k)}&nbsp;×{v}</span>' for k, v in items if v)


def _groups(totals: dict[str, list[dict[str, Any]]]) -> str:
    parts = ['<section aria-labelledby="h-by"><h2 id="h-by">Spend by feature, team and model</h2>']
    parts.append('<div class="grid3">')
    for by in ("feature", "team", "model"):
        groups = totals.get(by, [])
        parts.append(f'<div><h3 id="h-by-{by}">By {by}</h3>')
        if not groups:
            parts.append('<p class="empty">None recorded.</p></div>')
            continue
        top = max((g["priced_usd"] for g in groups), default=Decimal(0))
        rows = []
        for g in groups[:MAX_GROUP_ROWS]:
            key = _e(g["key"]) if g["key"] is not None else '<span class="muted">(none)</span>'
            frac = float(g["priced_usd"] / top) if top > 0 else 0.0
            cost = (
                _usd(g["cost_usd"])
                if g["cost_usd"] is not None
                else _total_cell(g["priced_usd"], g["unpriced"])
            )
            rows.append(
                f"<tr><th scope=row>{key}</th><td class=num>{g['tasks']:,}</td>"
                f"<td class=num>{g['model_calls']:,}</td><td class=num>{cost}"
                f'<span class="hbar" aria-hidden="true"><span style="width:{frac * 100:.1f}%">'
                "</span></span></td></tr>"
            )
        rest = groups[MAX_GROUP_ROWS:]
        if rest:
            unpriced = sum(g["unpriced"] for g in rest)
            priced = sum((g["priced_usd"] for g in rest), Decimal(0))
            # a task belongs to one feature / team, but may have called several models
            tasks = f"{sum(g['tasks'] for g in rest):,}" if by != "model" else ""
            rows.append(
                f'<tr class="rest"><th scope=row>{len(rest):,} more</th><td class=num>{tasks}'
                f"</td><td class=num>{sum(g['model_calls'] for g in rest):,}</td>"
                f"<td class=num>{_total_cell(priced, unpriced)}</td></tr>"
            )
        calls = "Model calls" if by != "model" else "Calls"
        parts.append(
            f'<table aria-labelledby="h-by-{by}"><thead><tr><th scope=col>{by.title()}</th>'
            f"<th scope=col class=num>Tasks</th><th scope=col class=num>{calls}</th>"
            f"<th scope=col class=num>Spend</th></tr></thead><tbody>{''.join(rows)}"
            "</tbody></table></div>"
        )
    parts.append("</div></section>")
    return "".join(parts)


@dataclass(slots=True)
class _Group:
    """Decisions of one kind in one task with the same model change, listed as one row."""

    label: str
    spans: list[Span]
    saved: Decimal | None = None
    tokens_saved: int = 0


def _group_decisions(labelled: Sequence[tuple[Span, str]]) -> list[_Group]:
    groups: dict[tuple[str, str, str, str], _Group] = {}
    for s, label in labelled:
        key = (s.task_id, label, str(s.attrs.get("requested_model") or ""), s.model or "")
        g = groups.get(key)
        if g is None:
            g = groups[key] = _Group(label, [])
        g.spans.append(s)
        v = _saved(s)
        if v is not None:
            g.saved = v if g.saved is None else g.saved + v
        g.tokens_saved += int(s.attrs.get("tokens_saved") or 0)
    return sorted(groups.values(), key=lambda g: (-(g.saved or Decimal(-1)), g.spans[0].start))


def _decision_row(g: _Group) -> str:
    first, last, n = g.spans[0], g.spans[-1], len(g.spans)
    served = first.model or ""
    requested = first.attrs.get("requested_model")
    model = _e(served)
    if requested and requested != served:
        model = f"{_e(requested)} → {_e(served)}"
    saved_txt = "" if g.saved is None else _usd(g.saved)
    if g.tokens_saved:
        saved_txt += f' <span class="muted">({g.tokens_saved:,} tokens)</span>'
    if not saved_txt:
        saved_txt = '<span class="muted" title="no saving is recorded for this decision">—</span>'
    reason = _e(first.reason or "")
    if n > 1 and last.reason and last.reason != first.reason:
        reason = f"first: {reason}<br>last: {_e(last.reason)}"
    times = f"&nbsp;×{n}" if n > 1 else ""
    return (
        f'<tr data-decision="{_e(g.label)}"><td class=nw>{_e(first.task_id)}</td>'
        f"<td class=nw>{_e(_when(first.start))}</td>"
        f'<td class=nw><span class="pill d-{_e(g.label)}">{_e(g.label)}{times}</span></td>'
        f"<td class=nw>{model}</td><td>{reason}</td><td class=num>{saved_txt}</td></tr>"
    )


def _decisions(tasks: Sequence[TaskRecord], spans: Sequence[Span]) -> str:
    head = (
        '<section aria-labelledby="h-dec"><h2 id="h-dec">Decisions and what they saved</h2>'
        '<p class="note">Savings are what the guard recorded: a downgrade saves the difference '
        "to the requested model's price for the same tokens, a trim the input price of the "
        "tokens it dropped. Caps, finishes and stops end work early; what that work would have "
        "cost is not known, so no saving is claimed for them.</p>"
    )
    # Decisions with spans are counted from the spans (a downgrade counts every call it served);
    # the others (soft-limit crossings) from the task records.
    counts: dict[str, int] = {}
    task_sets: dict[str, set[str]] = {}
    saved_by: dict[str, Decimal] = {}
    labelled = [(s, _decision_label(s) or "") for s in spans]
    for s, label in labelled:
        counts[label] = counts.get(label, 0) + 1
        task_sets.setdefault(label, set()).add(s.task_id)
        v = _saved(s)
        if v is not None:
            saved_by[label] = saved_by.get(label, Decimal(0)) + v
    from_spans = set(counts)
    for t in tasks:
        for k, n in t.decisions.items():
            if n and k not in from_spans:
                counts[k] = counts.get(k, 0) + n
                task_sets.setdefault(k, set()).add(t.task_id)
    if not counts:
        return head + '<p class="empty">No decisions were taken in this window.</p></section>'
    order = {d: i for i, d in enumerate(_DECISION_ORDER)}
    rows = []
    for k in sorted(counts, key=lambda k: (order.get(k, len(order)), k)):
        saved = saved_by.get(k)
        rows.append(
            f'<tr data-kind="{_e(k)}"><th scope=row><span class="pill d-{_e(k)}">{_e(k)}</span>'
            f"</th><td>{_e(_DECISION_TEXT.get(k, ''))}</td><td class=num>{counts[k]:,}</td>"
            f"<td class=num>{len(task_sets.get(k, ())):,}</td>"
            f"<td class=num>{_usd(saved) if saved is not None else '—'}</td></tr>"
        )
    summary = (
        "<table><caption>Every decision in the window</caption><thead><tr>"
        "<th scope=col>Decision</th><th scope=col>Meaning</th><th scope=col class=num>Count</th>"
        "<th scope=col class=num>Tasks</th><th scope=col class=num>Saved</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )
    groups = _group_decisions(labelled)
    shown = groups[:MAX_DECISION_ROWS]
    detail = "".join(_decision_row(g) for g in shown)
    caption = "Decisions recorded on spans, per task and kind, largest saving first"
    if len(shown) < len(groups):
        caption += f" (the first {len(shown):,} of {len(groups):,} rows)"
    soft = counts.get("soft_limit", 0)
    soft_note = (
        f'<p class="note">{soft:,} soft-limit crossing(s) are counted in the task records '
        "above; they are warnings and have no span of their own.</p>"
        if soft
        else ""
    )
    listing = (
        f"<table><caption>{_e(caption)}</caption><thead><tr><th scope=col>Task</th>"
        "<th scope=col>First</th><th scope=col>Decision</th><th scope=col>Model</th>"
        "<th scope=col>Reason</th><th scope=col class=num>Saved</th></tr></thead>"
        f"<tbody>{detail}</tbody></table>"
        if shown
        else ""
    )
    return f"{head}{summary}{soft_note}{listing}</section>"


# -- waterfalls --------------------------------------------------------------------------------


def _tree(spans: Sequence[Span]) -> list[tuple[int, Span]]:
    """Depth-first order with depths; orphans become roots; a cycle is cut."""
    ids = {s.span_id for s in spans}
    children: dict[str | None, list[Span]] = {}
    for s in spans:
        parent = s.parent_id if s.parent_id in ids and s.parent_id != s.span_id else None
        children.setdefault(parent, []).append(s)
    out: list[tuple[int, Span]] = []
    seen: set[str] = set()
    stack = [(0, s) for s in reversed(children.get(None, []))]
    while stack:
        depth, span = stack.pop()
        if span.span_id in seen:
            continue
        seen.add(span.span_id)
        out.append((depth, span))
        stack.extend((depth + 1, k) for k in reversed(children.get(span.span_id, [])))
    return out


def _content(s: Span) -> str:
    """Captured prompt / completion text: present only when the user opted in."""
    parts = []
    for key in ("prompt", "completion"):
        value = s.attrs.get(key)
        if value is None:
            continue
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        if len(text) > _MAX_CONTENT_CHARS:
            text = text[:_MAX_CONTENT_CHARS] + f"… ({len(text) - _MAX_CONTENT_CHARS:,} more chars)"
        parts.append(f"<details><summary>{key}</summary><pre>{_e(text)}</pre></details>")
    return "".join(parts)


_BUSY_KINDS = frozenset({"model", "tool", "retry", "retrieval", "trim", "decision"})


def _bar(s0: float, s1: float, t0: float, t1: float) -> tuple[float, float, str]:
    """A span's bar on the timeline ``t0..t1``: left %, width %, ``span`` or ``tick``."""
    total = max(t1 - t0, 1e-9)
    left = max(0.0, min(100.0, (s0 - t0) / total * 100))
    width = max(0.0, min(100.0 - left, (s1 - max(s0, t0)) / total * 100))
    mark = "tick" if width < 0.4 else "span"
    width = max(width, 0.4)
    return min(left, 100.0 - width), width, mark


def _waterfall(index: int, t: TaskRecord | None, task_id: str, spans: Sequence[Span]) -> str:
    tree = _tree(spans)
    start = t.start if t is not None else min((s.start for s in spans), default=0.0)
    ends = [s.end for s in spans if s.end is not None]
    end = t.end if t is not None and t.end is not None else max(ends, default=start)
    total = max(end - start, 1e-9)
    facts = []
    if t is not None:
        tags = " ".join(f"{_e(k)}={_e(v)}" for k, v in sorted(t.tags.items()))
        facts = [
            ("status", _e(t.status)),
            ("started", _e(_when(t.start))),
            ("duration", f"{_ms(t.duration_ms)} ms"),
            ("cost", _usd(t.cost_usd, t.usage.estimated)),
            ("saved", _usd(t.saved_usd)),
            ("model calls", f"{t.model_calls:,}"),
            ("tool calls", f"{t.tool_calls:,}"),
            ("retries", f"{t.retries:,}"),
        ]
        if tags:
            facts.insert(0, ("tags", tags))
        if t.limit_hit:
            facts.append(("limit hit", _e(t.limit_hit)))
        if t.decisions:
            facts.append(("decisions", _decision_counts(t.decisions)))
    else:
        facts = [("status", "no task record yet (still running, or it crashed)")]
    dl = "".join(f"<div><dt>{k}</dt><dd>{v}</dd></div>" for k, v in facts)
    rows = []
    shown = tree[:MAX_SPANS_PER_TASK]
    # When the calls start late in the task (setup, a slow first tokenizer load), the page's
    # script zooms the timeline onto them; the bars carry both placements.
    busy = min((s.start for s in spans if s.kind in _BUSY_KINDS), default=start)
    zoom = (busy - start) / total > 0.25 and end > busy
    for depth, s in shown:
        s_end = s.end if s.end is not None else end
        left, width, mark = _bar(s.start, s_end, start, end)
        zoomed = ""
        if zoom:
            zl, zw, zmark = _bar(s.start, s_end, busy, end)
            zoomed = f' data-z="{zl:.2f} {zw:.2f} {zmark}" data-f="{left:.2f} {width:.2f} {mark}"'
        u = s.usage
        est = bool(u is not None and u.estimated) or bool(s.attrs.get("estimated"))
        if s.cost_usd is not None:
            cost = _usd(s.cost_usd, est)
        elif s.kind == "model" or u is not None:
            cost = _usd(None)
        else:
            cost = ""
        label = _decision_label(s)
        decision = "" if label is None else f'<span class="pill d-{_e(label)}">{_e(label)}</span>'
        note = ""
        saved = _saved(s)
        if saved is not None:
            note += f' <span class="save">saved {_usd(saved)}</span>'
        if label is not None and s.reason:
            note += f'<div class="why" title="{_e(s.reason)}">{_e(s.reason)}</div>'
        if s.status not in ("ok", "finished"):
            note += f' <span class="bad">[{_e(s.status)}]</span>'
        name = _e(s.name)
        if s.model and s.model != s.name:
            name += f' <span class="muted">→ {_e(s.model)}</span>'
        tokens = "" if u is None else f"{_int(u.input_tokens, est)} / {_int(u.output_tokens, est)}"
        rows.append(
            f'<tr class="k-{_e(s.kind)}" data-kind="{_e(s.kind)}">'
            f'<th scope=row style="padding-left:{0.4 + depth * 1.1:.1f}em">{name}'
            f"{_content(s)}</th><td>{_e(s.kind)}</td>"
            f"<td class=num>{(s.start - start) * 1000:,.1f}</td>"
            f"<td class=num>{_ms(s.duration_ms)}</td>"
            f'<td class="tl" aria-hidden="true"><span class="{mark} b-{_e(s.kind)}" '
            f'style="left:{left:.2f}%;width:{width:.2f}%"{zoomed}></span></td>'
            f"<td class=num>{tokens}</td><td class=num>{cost}</td>"
            f"<td>{decision} {note}</td></tr>"
        )
    more = len(tree) - len(shown)
    more_note = (
        f'<p class="note">{more:,} more span(s) of this task are not shown; '
        f"see <code>agentguard trace {_e(task_id)}</code>.</p>"
        if more
        else ""
    )
    zoom_box = (
        f'<p class="zoom" hidden><label><input type="checkbox" class="zoom-box" '
        f'data-section="{index}"> zoom the timeline to {(busy - start) * 1000:,.1f} – '
        f"{total * 1000:,.1f} ms, where the calls are (nothing but steps before)</label></p>"
        if zoom
        else ""
    )
    soft = t.decisions.get("soft_limit", 0) if t is not None else 0
    soft_note = (
        f'<p class="note">Soft limits crossed: {soft} (warnings; no span of their own).</p>'
        if soft
        else ""
    )
    table = (
        f'<table class="wf"><caption>Spans of {_e(task_id)}: start and duration in ms from the '
        "task's start; the bar shows the same on a timeline</caption><thead><tr>"
        "<th scope=col>Span</th><th scope=col>Kind</th><th scope=col class=num>Start ms</th>"
        "<th scope=col class=num>Duration ms</th><th scope=col>Timeline</th>"
        "<th scope=col class=num>Tokens in / out</th><th scope=col class=num>Cost</th>"
        "<th scope=col>Decision</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
        if rows
        else '<p class="empty">No spans recorded for this task.</p>'
    )
    return (
        f'<section class="task" id="task-{index}" data-task-id="{_e(task_id)}" '
        f'aria-labelledby="h-task-{index}"><h3 id="h-task-{index}">{_e(task_id)}</h3>'
        f'<dl class="facts">{dl}</dl>{soft_note}{zoom_box}{table}{more_note}</section>'
    )


def _waterfalls(reader: SQLiteTraceReader, ranked: Sequence[TaskRecord], n: int) -> str:
    head = '<section aria-labelledby="h-wf"><h2 id="h-wf">Task waterfalls</h2>'
    chosen = list(ranked[:n])
    if not chosen:
        return head + '<p class="empty">No tasks recorded in this window.</p></section>'
    options = "".join(
        f'<option value="{i}">{_e(t.task_id)} — {_e(format_usd(t.cost_usd))}</option>'
        for i, t in enumerate(chosen)
    )
    intro = (
        f'<p class="note">The {len(chosen):,} most expensive of {len(ranked):,} task(s). '
        "Model calls, tools, retries, retrievals, trims and decisions, nested under their "
        "steps.</p>"
    )
    selector = (
        '<p class="picker"><label for="task-select">Task</label> '
        f'<select id="task-select"><option value="all">all {len(chosen)} tasks</option>'
        f"{options}</select></p>"
    )
    sections = "".join(
        _waterfall(i, t, t.task_id, reader.spans(t.task_id)) for i, t in enumerate(chosen)
    )
    return f"{head}{intro}{selector}{sections}</section>"


# -- page --------------------------------------------------------------------------------------

_CSS = """
:root{--fg:#1c2333;--muted:#5b6577;--line:#dfe3ea;--bg:#f6f7f9;--card:#fff;--accent:#2f6fdf;
--model:#2f6fdf;--tool:#d08a14;--retry:#c2413b;--retrieval:#2b9a74;--trim:#7b5cd6;
--step:#9aa3b2;--decision:#1c2333}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
color:var(--fg);background:var(--bg)}
header{background:#1c2333;color:#fff;padding:18px 28px}
header h1{margin:0;font-size:22px}header p{margin:4px 0 0;color:#c8cfdb}
main{padding:8px 28px 40px;max-width:1400px}
section{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:14px 18px;
margin:16px 0}
h2{font-size:17px;margin:0 0 10px}h3{font-size:15px;margin:10px 0 8px}
table{border-collapse:collapse;width:100%;margin:6px 0}
caption{text-align:left;color:var(--muted);font-size:12px;padding-bottom:4px}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid var(--line);vertical-align:top}
thead th{font-size:12px;color:var(--muted);font-weight:600;border-bottom:2px solid var(--line)}
tbody th{font-weight:500}
.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:0}
.card{background:var(--bg);border-radius:6px;padding:8px 14px;min-width:150px}
.card dt{font-size:12px;color:var(--muted)}.card dd{margin:0;font-size:20px;font-weight:600}
.chart{width:100%;height:220px;display:block}
.bar{fill:var(--accent)}.bar.unk{fill:#c2413b}
.axis{stroke:#9aa3b2}.tick{font-size:12px;fill:var(--muted)}
.grid3{display:grid;grid-template-columns:repeat(auto-fit,minmax(320px,1fr));gap:18px}
.hbar{display:block;height:4px;background:var(--bg);margin-top:3px}
.hbar span{display:block;height:4px;background:var(--accent);margin-left:auto}
.muted{color:var(--muted)}.empty{color:var(--muted);font-style:italic}
.note{color:var(--muted);font-size:12.5px;margin:4px 0 8px}
.unknown{color:#a33;font-weight:600}.est{border-bottom:1px dotted var(--muted)}
.save{color:#1f7a4f;font-weight:600;white-space:nowrap}.bad{color:#a33}
.pill{display:inline-block;padding:0 7px;border-radius:9px;font-size:12px;background:#e8ebf1;
white-space:nowrap}
.d-downgrade{background:#dbe8ff}.d-trim{background:#e9e1ff}.d-finish{background:#ffe9c7}
.d-stop,.d-block{background:#ffd9d6}.d-cap{background:#fff3bf}.d-soft_limit{background:#eef0d9}
.facts{display:flex;flex-wrap:wrap;gap:4px 18px;margin:0 0 8px}
.facts div{display:flex;gap:6px}.facts dt{color:var(--muted)}.facts dd{margin:0}
.wf td,.wf th{padding:2px 8px;font-size:12.5px}.nw,.wf tbody th{white-space:nowrap}
.wf td:last-child{min-width:220px}.why{color:var(--muted);font-size:12px}
.wf .why{max-width:230px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.wf .tl{position:relative;width:34%;min-width:260px;background:
repeating-linear-gradient(90deg,transparent 0 calc(25% - 1px),var(--line) calc(25% - 1px) 25%)}
.tl span{position:absolute;top:5px;height:10px;border-radius:2px;min-width:2px}
.tl .tick{height:14px;top:3px;width:2px!important}
.b-model{background:var(--model)}.b-tool{background:var(--tool)}.b-retry{background:var(--retry)}
.b-retrieval{background:var(--retrieval)}.b-trim{background:var(--trim)}
.b-step,.b-task{background:var(--step)}.b-decision{background:var(--decision)}
.k-task th{font-weight:700}
.zoom{margin:2px 0 6px;font-size:12.5px}.picker{margin:6px 0 10px}
.picker select{font:inherit;padding:2px 6px;margin-left:6px}
details summary{cursor:pointer;color:var(--accent);font-size:12.5px}
pre{white-space:pre-wrap;max-height:14em;overflow:auto;background:var(--bg);padding:6px}
.legend{font-size:12.5px;color:var(--muted)}
.legend span.sw{display:inline-block;width:10px;height:10px;border-radius:2px;margin:0 4px 0 10px}
"""

_JS = """
(function(){
  var sel=document.getElementById('task-select');
  if(!sel){return;}
  var tasks=document.querySelectorAll('section.task');
  function show(v){
    for(var i=0;i<tasks.length;i++){tasks[i].hidden=(v!=='all'&&tasks[i].id!=='task-'+v);}
  }
  sel.addEventListener('change',function(){show(sel.value);});
  function zoom(box){
    var bars=document.querySelectorAll('#task-'+box.getAttribute('data-section')+' .tl span');
    for(var i=0;i<bars.length;i++){
      var v=bars[i].getAttribute(box.checked?'data-z':'data-f');if(!v){continue;}
      var p=v.split(' ');bars[i].style.left=p[0]+'%';bars[i].style.width=p[1]+'%';
      bars[i].className=p[2]+' '+bars[i].className.split(' ').slice(1).join(' ');}
  }
  var boxes=document.querySelectorAll('input.zoom-box');
  for(var i=0;i<boxes.length;i++){
    boxes[i].parentNode.parentNode.hidden=false;boxes[i].checked=true;zoom(boxes[i]);
    boxes[i].addEventListener('change',function(){zoom(this);});}
  var links=document.querySelectorAll('a[data-wf]');
  for(var i=0;i<links.length;i++){links[i].addEventListener('click',function(){
    sel.value=this.getAttribute('data-wf');show(sel.value);});}
  sel.value=tasks.length?'0':'all';show(sel.value);
  document.documentElement.setAttribute('data-js','ready');
})();
"""

_LEGEND = (
    '<p class="legend">Span kinds: <span class="sw b-model"></span>model call'
    '<span class="sw b-tool"></span>tool<span class="sw b-retry"></span>retry'
    '<span class="sw b-retrieval"></span>retrieval<span class="sw b-trim"></span>trim'
    '<span class="sw b-decision"></span>decision<span class="sw b-step"></span>step. '
    "<span class=est>~</span> marks a value from estimated token counts; "
    '<span class="unknown">unknown</span> is a cost that could not be priced.</p>'
)


def render_report(
    reader: SQLiteTraceReader,
    *,
    since: float | None = None,
    feature: str | None = None,
    team: str | None = None,
    top: int = 10,
    waterfalls: int = 20,
    generated_at: float | None = None,
) -> str:
    """Render the HTML report for the tasks matching the filters (the ``report`` command's).

    Args:
        reader: an open trace database.
        since: only tasks started at or after this (epoch seconds).
        feature: only tasks tagged with this feature.
        team: only tasks tagged with this team.
        top: rows in the top-tasks table.
        waterfalls: how many of the most expensive tasks get a span waterfall.
        generated_at: the time printed as the report's creation time (default: now).

    Returns:
        The complete HTML document.

    Example:
        >>> import os, tempfile
        >>> from agentguard._sinks import SQLiteSink
        >>> db = os.path.join(tempfile.mkdtemp(), "t.db")
        >>> with SQLiteSink(db) as sink:
        ...     sink.write_task(TaskRecord("<t1>", None, 1.0, 2.0, "ok", {"feature": "faq"},
        ...                                cost_usd=Decimal("0.0012")))
        >>> with SQLiteTraceReader(db) as reader:
        ...     page = render_report(reader)
        >>> "&lt;t1&gt;" in page and "<t1>" not in page and "$0.0012" in page
        True
    """
    filters: dict[str, Any] = {"since": since, "feature": feature, "team": team}
    tasks = reader.tasks(**filters)
    totals = {by: reader.totals(by, **filters) for by in ("feature", "team", "model")}
    ranked = _ranked(tasks)
    decision_spans = reader.decision_spans(since, feature, team)
    anchors = {t.task_id: i for i, t in enumerate(ranked[:waterfalls])}
    scope = [f"{len(tasks):,} task{'s' * (len(tasks) != 1)}"]
    if since is not None:
        scope.append(f"since {_when(since)}")
    if feature is not None:
        scope.append(f"feature = {feature}")
    if team is not None:
        scope.append(f"team = {team}")
    when = _when(time.time() if generated_at is None else generated_at)
    body = "".join(
        [
            _summary(tasks),
            _chart(tasks),
            _top(ranked, top, anchors),
            _groups(totals),
            _decisions(tasks, decision_spans),
            _waterfalls(reader, ranked, waterfalls),
        ]
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_e(CSP)}">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        '<meta name="referrer" content="no-referrer">'
        f"<title>agentguard cost report</title><style>{_CSS}</style></head><body>"
        f"<header><h1>agentguard cost report</h1><p>{_e(', '.join(scope))} · "
        f"{_e(reader.path)} · generated {_e(when)}</p></header><main>{_LEGEND}{body}</main>"
        f"<script>{_JS}</script></body></html>\n"
    )
