"""The cost-trace model: every task is a tree of spans, summarised by one record when it ends.

A :class:`Span` is one node of the tree (task -> step -> model call / tool call / retry /
retrieval / trim / decision). It carries timing, the model, normalised :class:`Usage`, the cost
in USD (``Decimal``; ``None`` when the call could not be priced, never ``0``), the decision the
guard took and why, and free-form ``attrs``.

A :class:`TaskRecord` is the summary row of one finished task, written by the guard when the task
ends; the ``agentguard report`` command reads these.

A :class:`TraceSink` receives both (see :mod:`agentguard._sinks` for SQLite, JSONL, memory...).

Privacy: no prompt or completion text is stored by agentguard. ``attrs`` are stored as given, so
code that fills them must not put prompt, completion, tool-argument or retrieved text in them
unless the user explicitly opted in to storing content.

Money in ``attrs``: ``Decimal`` values are serialised as strings by :meth:`Span.to_dict`; on the way
back, :meth:`Span.from_dict` turns the string value of every key ending in ``_usd``
(``saved_usd``, ``reserved_usd``, ...) back into a ``Decimal``, so keep to that naming.

This module is on the per-call hot path: it imports nothing heavy and the dataclasses use slots.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal, Protocol, runtime_checkable

from agentguard._usage import Usage

__all__ = [
    "DECISIONS",
    "SPAN_KINDS",
    "Span",
    "SpanKind",
    "TaskRecord",
    "TraceSink",
    "new_span_id",
]

SpanKind = Literal["task", "step", "model", "tool", "retry", "retrieval", "trim", "decision"]

#: Every span kind, in tree order (a task contains steps, a step contains the rest).
SPAN_KINDS: tuple[str, ...] = (
    "task",
    "step",
    "model",
    "tool",
    "retry",
    "retrieval",
    "trim",
    "decision",
)

#: Decision kinds in the order reports list them.
DECISIONS: tuple[str, ...] = (
    "allow",
    "warn",
    "soft_limit",
    "trim",
    "downgrade",
    "finish",
    "block",
    "stop",
)

#: Span kinds whose ``usage`` / ``cost_usd`` are their own (not a roll-up of children).
_METERED_KINDS = frozenset({"model", "retrieval"})


_getrandbits = random.getrandbits  # reseeded in forked children by the random module


def new_span_id() -> str:
    """A fresh random 64-bit span id as 16 hex characters (about 0.3 µs; not a secret).

    Example:
        >>> len(new_span_id())
        16
    """
    return "%016x" % _getrandbits(64)  # noqa: UP031 - the fastest spelling, on the hot path


def _dec(value: Any) -> Decimal | None:
    if value is None:
        return None
    if isinstance(value, Decimal):
        return value
    if isinstance(value, float):
        # A float that reached a trace is repaired through its shortest repr, never its binary
        # expansion (Decimal(0.1) would be 0.1000000000000000055...).
        return Decimal(repr(value))
    return Decimal(str(value))


def _jsonable(value: Any) -> Any:
    """``value`` with Decimals as strings and Usages as dicts, recursively; JSON-safe."""
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, Usage):
        return value.as_dict()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    return str(value)


def _attrs_to_json(attrs: Mapping[str, Any]) -> dict[str, Any]:
    for v in attrs.values():
        if not (v is None or isinstance(v, str | bool | int | float)):
            return {str(k): _jsonable(v) for k, v in attrs.items()}
    return dict(attrs)  # the common case: already flat and JSON-safe


def _attrs_from_json(attrs: Mapping[str, Any] | None) -> dict[str, Any]:
    if not attrs:
        return {}
    out = dict(attrs)
    for k, v in out.items():
        if k.endswith("_usd") and isinstance(v, str | int):
            out[k] = Decimal(v)
    return out


@dataclass(slots=True)
class Span:
    """One node of a task's trace tree.

    Args:
        span_id: unique id (see :func:`new_span_id`).
        task_id: the task the span belongs to.
        kind: ``task``, ``step``, ``model``, ``tool``, ``retry``, ``retrieval``, ``trim`` or
            ``decision``.
        name: model id, tool name, step name, or the task id for the task span.
        start: start time, epoch seconds (``time.time()``).
        parent_id: the enclosing span, ``None`` for the task span.
        end: end time, epoch seconds; ``None`` while the span is open.
        status: ``ok``, ``error``, ``stopped`` or ``finished``.
        model: the model that served the call (after any downgrade).
        usage: normalised token usage of this span's own call (model / retrieval spans).
        cost_usd: cost of this span's own call; ``None`` means unknown (unpriced), never 0.
        decision: the guard's decision, e.g. ``allow``, ``downgrade``, ``finish``, ``stop``,
            ``trim``, ``block``, ``warn``, ``soft_limit``.
        reason: a short human-readable reason for the decision.
        attrs: extra JSON-able values: ``tags`` (task span), ``tokens_saved``, ``saved_usd``,
            ``reserved_usd``, ``over_reservation``, ``estimated``, ``error`` type, ...
            Never prompt or completion text unless the user opted in.

    Example:
        >>> from decimal import Decimal
        >>> s = Span("s1", "ticket-42", "model", "gpt-4o-mini", start=1700000000.0,
        ...          end=1700000000.25, model="gpt-4o-mini",
        ...          usage=Usage(input_tokens=1200, output_tokens=80),
        ...          cost_usd=Decimal("0.000228"), decision="allow")
        >>> s.duration_ms
        250.0
        >>> Span.from_dict(s.to_dict()) == s
        True
    """

    span_id: str
    task_id: str
    kind: SpanKind
    name: str
    start: float
    parent_id: str | None = None
    end: float | None = None
    status: str = "ok"
    model: str | None = None
    usage: Usage | None = None
    cost_usd: Decimal | None = None
    decision: str | None = None
    reason: str | None = None
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def duration_ms(self) -> float | None:
        """Wall time in milliseconds, ``None`` while the span is open."""
        if self.end is None:
            return None
        return (self.end - self.start) * 1000.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict: ``cost_usd`` and Decimal attrs as strings, ``usage`` as a dict.

        Example:
            >>> Span("s1", "t1", "tool", "search", 1.0, cost_usd=None).to_dict()["cost_usd"] is None
            True
        """
        return {
            "span_id": self.span_id,
            "task_id": self.task_id,
            "parent_id": self.parent_id,
            "kind": self.kind,
            "name": self.name,
            "start": self.start,
            "end": self.end,
            "status": self.status,
            "model": self.model,
            "usage": None if self.usage is None else self.usage.as_dict(),
            "cost_usd": None if self.cost_usd is None else str(self.cost_usd),
            "decision": self.decision,
            "reason": self.reason,
            "attrs": _attrs_to_json(self.attrs),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Span:
        """Inverse of :meth:`to_dict` (unknown keys, such as a JSONL ``type``, are ignored)."""
        usage = d.get("usage")
        end = d.get("end")
        return cls(
            span_id=str(d["span_id"]),
            task_id=str(d["task_id"]),
            kind=d["kind"],
            name=str(d["name"]),
            start=float(d["start"]),
            parent_id=d.get("parent_id"),
            end=None if end is None else float(end),
            status=d.get("status") or "ok",
            model=d.get("model"),
            usage=None if usage is None else Usage.from_dict(usage),
            cost_usd=_dec(d.get("cost_usd")),
            decision=d.get("decision"),
            reason=d.get("reason"),
            attrs=_attrs_from_json(d.get("attrs")),
        )


@dataclass(slots=True)
class TaskRecord:
    """The summary of one finished task: one row per task, written when the task ends.

    A record counts the task's *own* spans. A sub-task (sub-agent, subgraph) has its own record
    whose ``parent_id`` names the parent task; readers roll children up when they need to, so
    summing every record never counts a call twice.

    Args:
        task_id: the task id.
        parent_id: the parent task's id for a sub-task, else ``None``.
        start: start time, epoch seconds.
        end: end time, epoch seconds.
        status: the task span's final status (``ok``, ``error``, ``stopped``, ``finished``).
        tags: attribution tags: ``feature``, ``team``, ``env``, ``user``, ``tenant``, ...
        usage: total token usage of the task's model and retrieval calls.
        cost_usd: total cost; ``None`` when any model call could not be priced.
        model_calls: number of model-call spans.
        tool_calls: number of tool-call spans.
        retries: number of retry spans.
        steps: number of step spans.
        decisions: count of each non-``allow`` decision taken, e.g. ``{"downgrade": 1}``.
        saved_usd: estimated dollars saved by trims, downgrades and caps (``0`` when none).
        tokens_saved: estimated tokens saved.
        limit_hit: the policy limit that ended the task (``max_cost_usd``, ...), if any.

    Example:
        >>> from decimal import Decimal
        >>> r = TaskRecord("ticket-42", None, 1.0, 2.0, "finished", {"feature": "support"},
        ...                Usage(100, 10), Decimal("0.0012"), model_calls=2, tool_calls=1)
        >>> TaskRecord.from_dict(r.to_dict()) == r
        True
    """

    task_id: str
    parent_id: str | None
    start: float
    end: float | None
    status: str
    tags: dict[str, str] = field(default_factory=dict)
    usage: Usage = field(default_factory=Usage)
    cost_usd: Decimal | None = None
    model_calls: int = 0
    tool_calls: int = 0
    retries: int = 0
    steps: int = 0
    decisions: dict[str, int] = field(default_factory=dict)
    saved_usd: Decimal = Decimal(0)
    tokens_saved: int = 0
    limit_hit: str | None = None

    @property
    def duration_ms(self) -> float | None:
        """Wall time in milliseconds, ``None`` if the task has no end time."""
        if self.end is None:
            return None
        return (self.end - self.start) * 1000.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict: money as strings, ``usage`` as a dict."""
        return {
            "task_id": self.task_id,
            "parent_id": self.parent_id,
            "start": self.start,
            "end": self.end,
            "status": self.status,
            "tags": dict(self.tags),
            "usage": self.usage.as_dict(),
            "cost_usd": None if self.cost_usd is None else str(self.cost_usd),
            "model_calls": self.model_calls,
            "tool_calls": self.tool_calls,
            "retries": self.retries,
            "steps": self.steps,
            "decisions": dict(self.decisions),
            "saved_usd": str(self.saved_usd),
            "tokens_saved": self.tokens_saved,
            "limit_hit": self.limit_hit,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TaskRecord:
        """Inverse of :meth:`to_dict` (unknown keys are ignored)."""
        end = d.get("end")
        usage = d.get("usage")
        return cls(
            task_id=str(d["task_id"]),
            parent_id=d.get("parent_id"),
            start=float(d["start"]),
            end=None if end is None else float(end),
            status=str(d.get("status") or "ok"),
            tags={str(k): str(v) for k, v in (d.get("tags") or {}).items()},
            usage=Usage() if usage is None else Usage.from_dict(usage),
            cost_usd=_dec(d.get("cost_usd")),
            model_calls=int(d.get("model_calls") or 0),
            tool_calls=int(d.get("tool_calls") or 0),
            retries=int(d.get("retries") or 0),
            steps=int(d.get("steps") or 0),
            decisions={str(k): int(v) for k, v in (d.get("decisions") or {}).items()},
            saved_usd=_dec(d.get("saved_usd")) or Decimal(0),
            tokens_saved=int(d.get("tokens_saved") or 0),
            limit_hit=d.get("limit_hit"),
        )

    @classmethod
    def from_spans(cls, task: Span, spans: Iterable[Span]) -> TaskRecord:
        """Summarise a task from its task span and the rest of its spans.

        * usage and cost sum the ``model`` and ``retrieval`` spans (other kinds carry roll-ups
          or nothing); the cost is ``None`` if any such span that has usage has no cost;
        * counts come from the span kinds; ``decisions`` counts every decision but ``allow``;
        * ``saved_usd`` / ``tokens_saved`` sum those attrs over all spans (the task span's too);
        * ``tags`` come from ``task.attrs["tags"]``, ``limit_hit`` from
          ``task.attrs["limit_hit"]``.

        Example:
            >>> from decimal import Decimal
            >>> t = Span("t", "t1", "task", "t1", 0.0, end=1.0, attrs={"tags": {"team": "cx"}})
            >>> m = Span("m", "t1", "model", "gpt-4o", 0.1, "t", 0.5, usage=Usage(10, 5),
            ...          cost_usd=Decimal("0.1"))
            >>> d = Span("d", "t1", "decision", "budget", 0.6, "t", 0.6, decision="finish")
            >>> r = TaskRecord.from_spans(t, [m, d])
            >>> r.cost_usd, r.model_calls, r.decisions, r.tags
            (Decimal('0.1'), 1, {'finish': 1}, {'team': 'cx'})
        """
        usage = Usage()
        cost: Decimal | None = Decimal(0)
        model_calls = tool_calls = retries = steps = tokens_saved = 0
        saved = Decimal(0)
        decisions: dict[str, int] = {}
        for s in (task, *spans):
            if s is not task and s.span_id == task.span_id:
                continue
            kind = s.kind
            if kind == "model":
                model_calls += 1
            elif kind == "tool":
                tool_calls += 1
            elif kind == "retry":
                retries += 1
            elif kind == "step":
                steps += 1
            if kind in _METERED_KINDS:
                if s.usage is not None:
                    usage = usage + s.usage
                if s.cost_usd is not None:
                    if cost is not None:
                        cost += s.cost_usd
                elif kind == "model" or s.usage is not None:
                    cost = None
            if s.decision is not None and s.decision != "allow":
                decisions[s.decision] = decisions.get(s.decision, 0) + 1
            if s.attrs:
                sv = s.attrs.get("saved_usd")
                if sv is not None:
                    saved += _dec(sv) or Decimal(0)
                tokens_saved += int(s.attrs.get("tokens_saved") or 0)
        raw_tags = task.attrs.get("tags") or {}
        limit_hit = task.attrs.get("limit_hit")
        return cls(
            task_id=task.task_id,
            parent_id=task.attrs.get("parent_task_id"),
            start=task.start,
            end=task.end,
            status=task.status,
            tags={str(k): str(v) for k, v in raw_tags.items()},
            usage=usage,
            cost_usd=cost,
            model_calls=model_calls,
            tool_calls=tool_calls,
            retries=retries,
            steps=steps,
            decisions=decisions,
            saved_usd=saved,
            tokens_saved=tokens_saved,
            limit_hit=None if limit_hit is None else str(limit_hit),
        )


@runtime_checkable
class TraceSink(Protocol):
    """Where spans and task records go. Implementations must be thread-safe.

    ``write_spans`` is called on the hot path (once per finished span or batch of spans) and
    should only buffer; ``write_task`` is called once when a task ends and should make the task
    visible to readers promptly. Writing a span again with the same ``span_id`` replaces it
    where the sink can (SQLite), or appends a newer version (JSONL; readers keep the last).
    """

    def write_spans(self, spans: Sequence[Span]) -> None:
        """Record finished (or updated) spans."""
        ...

    def write_task(self, record: TaskRecord) -> None:
        """Record the summary of a finished task."""
        ...

    def flush(self) -> object:
        """Persist everything buffered so far. What it returns is the sink's own (e.g.
        :class:`~agentguard.OTelSink` says whether its queue drained); callers ignore it."""
        ...

    def close(self) -> None:
        """Flush and release resources; later writes are errors or no-ops, per sink."""
        ...
