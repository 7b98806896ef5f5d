"""Alerts: soft-limit crossings and spend that doubles period over period, delivered to the log,
to user callbacks and to a webhook — once per budget, threshold and period.

Two kinds of alert:

* ``soft_limit`` — a budget crossed one of the policy's ``soft_limits`` fractions
  (e.g. ``(0.5, 0.8, 1.0)``). The guard reports each crossing to its ``listeners``;
  :meth:`Alerts.attach` adds one. De-duplicated per budget key and threshold; a windowed
  budget's key names its period (``team:cx@day:2026-11-22``), so a daily budget alerts at 80%
  once a day, however many tasks see the crossing.
* ``rate`` — the spend of one value of a tag (a feature, a team...) in the current period
  reached ``factor`` times (default 2x) its spend in the previous period, even when no budget
  threshold is near. Periods are UTC hours, days or ISO weeks, by task end time. Live: an
  attached :class:`Alerts` is also a trace sink and sums each task's cost as the task closes.
  From recorded traces: :meth:`Alerts.check` (``agentguard alerts``) replays task records in end
  order. De-duplicated per rule, tag value and period. Groups whose current spend is below
  ``min_usd`` never alert (a $0.0001 -> $0.0003 jump is noise), nor groups with no spend in the
  previous period (nothing to double). Tasks of unknown cost are not summed.

Delivery: every new alert is logged as ``agentguard.alert`` (structlog when configured, else the
``agentguard`` logger), passed to each callback (called on the thread that raised it — keep them
quick), and queued for the :class:`Webhook` (a JSON POST with a bounded timeout from a
background thread, off the hot path). A failing callback or webhook is logged
(``agentguard.alert_error``), never raised into the user's run.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal

from agentguard._trace import Span, TaskRecord
from agentguard._worker import BackgroundQueue

if TYPE_CHECKING:
    from agentguard._guard import Guard

__all__ = ["Alert", "Alerts", "RateRule", "Webhook", "period_bucket"]

_PERIODS = {"hour": 3600, "day": 86400, "week": 7 * 86400}
_MONDAY = 4 * 86400  # 1970-01-05, the first Monday after the epoch


def _log() -> Any:
    from agentguard._guard import _logger

    return _logger()


def period_bucket(period: str, t: float) -> tuple[int, str]:
    """The index and label of the UTC period (``hour``, ``day``, ``week``) holding ``t``.

    Example:
        >>> period_bucket("day", 1767312000.0 + 3600)
        (20455, '2026-01-02')
        >>> period_bucket("week", 1767312000.0)[1], period_bucket("hour", 1767312000.0)[1]
        ('2026-W01', '2026-01-02T00')
    """
    seconds = _PERIODS.get(period)
    if seconds is None:
        raise ValueError(f"period={period!r}: expected 'hour', 'day' or 'week'")
    if period == "week":
        index = int((t - _MONDAY) // seconds)
        start = datetime.fromtimestamp(index * seconds + _MONDAY, UTC)
        year, week, _ = start.isocalendar()
        return index, f"{year}-W{week:02d}"
    index = int(t // seconds)
    start = datetime.fromtimestamp(index * seconds, UTC)
    return index, start.strftime("%Y-%m-%dT%H" if period == "hour" else "%Y-%m-%d")


@dataclass(frozen=True, slots=True)
class Alert:
    """One alert.

    Attributes:
        kind: ``soft_limit`` or ``rate``.
        key: the de-duplication key (``soft_limit:team:cx@day:2026-11-22:0.8``,
            ``rate:feature=support:day:2026-11-22``).
        message: one human-readable line.
        at: when it was raised, epoch seconds.
        fields: JSON-able details (money as strings): budget, threshold, spent_fraction,
            task_id and tags for soft limits; by, group, period, current_usd, previous_usd,
            factor for rate alerts.
    """

    kind: Literal["soft_limit", "rate"]
    key: str
    message: str
    at: float
    fields: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (the webhook's body)."""
        return {
            "kind": self.kind,
            "key": self.key,
            "message": self.message,
            "at": self.at,
            "fields": {k: str(v) if isinstance(v, Decimal) else v for k, v in self.fields.items()},
        }


@dataclass(frozen=True, slots=True)
class RateRule:
    """Alert when a tag value's spend in a period reaches ``factor`` times the previous period's.

    Args:
        by: the tag to group by (``feature``, ``team``, ``tenant``...).
        period: ``hour``, ``day`` or ``week`` (UTC).
        factor: the growth that alerts (``2`` = doubling).
        min_usd: groups spending less than this in the current period never alert.

    Example:
        >>> RateRule(by="team", period="hour").factor
        Decimal('2')
    """

    by: str = "feature"
    period: str = "day"
    factor: Decimal = Decimal(2)
    min_usd: Decimal = Decimal("0.01")

    def __post_init__(self) -> None:
        if self.period not in _PERIODS:
            raise ValueError(f"RateRule.period={self.period!r}: expected 'hour', 'day' or 'week'")
        for name in ("factor", "min_usd"):
            value = getattr(self, name)
            if isinstance(value, float) or not isinstance(value, Decimal | int | str):
                raise ValueError(f"RateRule.{name}={value!r}: give a Decimal, an int or a string")
            dec = Decimal(value)
            if not dec.is_finite() or dec < 0 or (name == "factor" and dec <= 1):
                raise ValueError(
                    f"RateRule.{name}={value!r}: "
                    + ("must be above 1" if name == "factor" else "cannot be negative")
                )
            object.__setattr__(self, name, dec)


class _RateTracker:
    """Running spend per (tag value, period) for one rule; keeps the last two periods."""

    def __init__(self, rule: RateRule) -> None:
        self.rule = rule
        self._sums: dict[str, dict[int, Decimal]] = {}
        self._lock = threading.Lock()

    def add(self, record: TaskRecord) -> Alert | None:
        rule = self.rule
        group = record.tags.get(rule.by)
        if group is None or record.cost_usd is None:
            return None
        t = record.end if record.end is not None else record.start
        index, label = period_bucket(rule.period, t)
        with self._lock:
            sums = self._sums.setdefault(group, {})
            for old in [i for i in sums if i < index - 1]:
                del sums[old]
            current = sums[index] = sums.get(index, Decimal(0)) + record.cost_usd
            previous = sums.get(index - 1, Decimal(0))
        if previous <= 0 or current < rule.min_usd or current < rule.factor * previous:
            return None
        growth = current / previous
        return Alert(
            "rate",
            f"rate:{rule.by}={group}:{rule.period}:{label}",
            f"{rule.by}={group} spent ${current} this {rule.period} ({label}), "
            f"{growth:.2f}x the previous {rule.period}'s ${previous}",
            time.time(),
            {
                "by": rule.by,
                "group": group,
                "period": rule.period,
                "bucket": label,
                "current_usd": current,
                "previous_usd": previous,
                "factor": rule.factor,
                "task_id": record.task_id,
            },
        )


class Webhook:
    """POST each alert as JSON to ``url`` from a background thread.

    Args:
        url: an ``http://`` or ``https://`` URL.
        timeout: seconds per request (connect and read).
        headers: extra headers (e.g. an ``Authorization`` token).
        max_queue: alerts waiting at most; beyond it new ones are dropped (``dropped``).

    ``sent``, ``failed`` and ``dropped`` count outcomes; failures are logged as
    ``agentguard.alert_error``, never raised.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 3.0,
        headers: Mapping[str, str] | None = None,
        max_queue: int = 1000,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"webhook url={url!r}: expected an http:// or https:// URL")
        if not timeout > 0:
            raise ValueError(f"webhook timeout={timeout!r}: must be positive")
        self.url = url
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self._worker: BackgroundQueue[dict[str, Any]] = BackgroundQueue(
            self._post, name="agentguard-webhook", max_queue=max_queue, on_error=self._failed
        )

    def __repr__(self) -> str:
        return f"Webhook({self.url!r}, sent={self.sent}, failed={self.failed})"

    def __call__(self, alert: Alert) -> None:
        """Queue the alert; returns at once."""
        if not self._worker.put(alert.to_dict()):
            self.dropped += 1
            _log().error("agentguard.alert_error", target=self.url, error="queue full: dropped")

    def _failed(self, exc: Exception) -> None:
        """An unexpected error posting (the expected ones are handled in :meth:`_post`):
        counted and logged, never raised."""
        self.failed += 1
        error = f"{type(exc).__name__}: {exc}"
        _log().error("agentguard.alert_error", target=self.url, error=error)

    def _post(self, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        request = urllib.request.Request(self.url, data=data, headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                response.read()
            self.sent += 1
        except (urllib.error.URLError, OSError, ValueError) as exc:
            self.failed += 1
            _log().error(
                "agentguard.alert_error",
                target=self.url,
                alert=body.get("key"),
                error=f"{type(exc).__name__}: {exc}",
            )

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued alert was posted (or failed); ``False`` on timeout."""
        return self._worker.drain(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Post what is queued (up to ``timeout``) and stop the thread."""
        self._worker.stop(timeout)


class Alerts:
    """Raise, de-duplicate and deliver alerts. Attach it to a guard for live alerts.

    Args:
        callbacks: functions called with each new :class:`Alert`.
        webhook: a URL or a :class:`Webhook`.
        rate_rules: :class:`RateRule` s checked as tasks close (and by :meth:`check`).
        task_budgets: also alert on each task's own budget (``task:<id>``) crossing a soft
            limit; off by default — one alert per task would be the spam alerts must avoid.
        log: log each alert as ``agentguard.alert``.
        max_keys: de-duplication keys remembered (oldest forgotten first).

    Example:
        >>> import agentguard as ag
        >>> seen = []
        >>> alerts = ag.Alerts(callbacks=[seen.append], log=False)
        >>> policy = ag.Policy(soft_limits=(0.5, 0.8),
        ...                    budgets=[ag.Budget(scope="team", max_cost_usd="0.001")])
        >>> guard = alerts.attach(ag.Guard(policy, traces=False))
        >>> for i in range(2):
        ...     with guard.task(f"t{i}", team="cx") as t:
        ...         _ = t.start_model_call("gpt-4o-mini", input_tokens=1000).end(
        ...             {"prompt_tokens": 1000, "completion_tokens": 500})
        >>> [(a.fields["budget"], a.fields["threshold"]) for a in seen]
        [('team:cx', 0.5), ('team:cx', 0.8)]
    """

    def __init__(
        self,
        *,
        callbacks: Sequence[Callable[[Alert], Any]] = (),
        webhook: str | Webhook | None = None,
        rate_rules: Sequence[RateRule] = (),
        task_budgets: bool = False,
        log: bool = True,
        max_keys: int = 10_000,
    ) -> None:
        self.callbacks = list(callbacks)
        self.webhook = Webhook(webhook) if isinstance(webhook, str) else webhook
        self.rate_rules = tuple(rate_rules)
        self.task_budgets = task_budgets
        self.log = log
        self.max_keys = max_keys
        self.history: deque[Alert] = deque(maxlen=1000)
        self.suppressed = 0
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._trackers = [_RateTracker(r) for r in self.rate_rules]

    def __repr__(self) -> str:
        return f"Alerts(raised={len(self.history)}, suppressed={self.suppressed})"

    # -- wiring -----------------------------------------------------------------------------

    def attach(self, guard: Guard) -> Guard:
        """Listen to ``guard``'s soft-limit crossings and, with rate rules, to its task
        records (the guard's sink becomes ``MultiSink(sink, self)``). Returns the guard."""
        from agentguard._sinks import MultiSink

        guard.listeners.append(self)
        if self.rate_rules:
            guard.sink = MultiSink(guard.sink, self)
        return guard

    def __call__(self, event: str, fields: Mapping[str, Any]) -> None:
        """A guard listener: turns ``agentguard.soft_limit`` events into alerts."""
        if event != "agentguard.soft_limit":
            return
        budget = str(fields.get("budget"))
        if budget.startswith("task:") and not self.task_budgets:
            return
        threshold = float(fields.get("threshold", 0))
        spent = float(fields.get("spent_fraction", 0))
        self.emit(
            Alert(
                "soft_limit",
                f"soft_limit:{budget}:{threshold:g}",
                f"budget {budget}: {threshold:.0%} threshold crossed ({spent:.0%} spent)",
                time.time(),
                dict(fields),
            )
        )

    # -- TraceSink (for live rate rules) ----------------------------------------------------

    def write_spans(self, spans: Sequence[Span]) -> None:
        """Nothing to do: rate rules read task records."""

    def write_task(self, record: TaskRecord) -> None:
        """Add a closed task's cost to the rate rules; alert on a doubling."""
        for tracker in self._trackers:
            alert = tracker.add(record)
            if alert is not None:
                self.emit(alert)

    def flush(self) -> None:
        """Wait for the webhook's queue to drain."""
        if self.webhook is not None:
            self.webhook.flush()

    def close(self) -> None:
        """Drain and stop the webhook."""
        if self.webhook is not None:
            self.webhook.close()

    # -- checks over recorded traces --------------------------------------------------------

    def check(self, records: Iterable[TaskRecord]) -> list[Alert]:
        """Run the rate rules over recorded task records (fresh running sums, end-time order)
        and deliver the new alerts; returns them.

        Example:
            >>> from decimal import Decimal
            >>> day = 86400.0
            >>> recs = [TaskRecord(f"t{i}", None, t, t + 1, "ok", {"feature": "faq"},
            ...                    cost_usd=Decimal(c))
            ...         for i, (t, c) in enumerate([(0, "1"), (day, "0.5"), (day + 5, "1.6")])]
            >>> [a.key for a in Alerts(rate_rules=[RateRule()], log=False).check(recs)]
            ['rate:feature=faq:day:1970-01-02']
        """
        trackers = [_RateTracker(r) for r in self.rate_rules]
        ordered = sorted(records, key=lambda r: r.end if r.end is not None else r.start)
        out = []
        for record in ordered:
            for tracker in trackers:
                alert = tracker.add(record)
                if alert is not None and self.emit(alert):
                    out.append(alert)
        return out

    # -- delivery ---------------------------------------------------------------------------

    def emit(self, alert: Alert) -> bool:
        """Deliver ``alert`` unless its key was already seen; ``True`` if delivered."""
        with self._lock:
            if alert.key in self._seen:
                self.suppressed += 1
                return False
            self._seen[alert.key] = None
            if len(self._seen) > self.max_keys:
                self._seen.popitem(last=False)
            self.history.append(alert)
        if self.log:
            _log().warning(
                "agentguard.alert", alert=alert.kind, key=alert.key, message=alert.message
            )
        for callback in self.callbacks:
            try:
                callback(alert)
            except Exception as exc:
                _log().error(
                    "agentguard.alert_error",
                    target=getattr(callback, "__name__", repr(callback)),
                    alert=alert.key,
                    error=f"{type(exc).__name__}: {exc}",
                )
        if self.webhook is not None:
            self.webhook(alert)
        return True
