"""The guard, its tasks, and the event API adapters call.

An adapter (LangChain, LangGraph, LlamaIndex) translates its framework's events into these
calls and nothing else:

===============================  ==========================================================
``task.start_model_call(...)``   before a model call: decide, reserve, return a ``ModelCall``
                                 with the model to use and the output cap to bind
``call.end(usage)``              the call finished: commit its actual cost, free the rest
``call.fail(error)``             the call failed: release the reservation
``task.start_tool_call(name)``   before a tool runs: count it against the caps
``tool.end()`` / ``tool.fail()`` the tool finished / failed
``task.record_retry(reason)``    a retry is about to happen
``task.step(name)``              an agent / graph step begins
``task.record_retrieval(...)``   a retriever returned documents
``task.trim(chunks)``            fit retrieved context to the budget
===============================  ==========================================================

Every ``start_*`` and ``step`` raises :class:`BudgetExceeded` when the decision is ``stop``;
``finish`` and ``block`` decisions are returned for the adapter to act on.

Each event that touches the budget store has an async twin (``astart_model_call``, ``aend``,
``afail``, ``astart_tool_call``, ``arecord_retry``, ``astep``, ``aclose``; ``async with
guard.task(...)``) awaiting the store's async methods; both run the same code: the halves
around an event's one store operation, or its steps (``drive`` / ``adrive``).
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import uuid
from collections import ChainMap
from collections.abc import Mapping, MutableMapping, Sequence
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from agentguard._decide import (
    CallRequest,
    Decision,
    Headroom,
    QuickFacts,
    Spent,
    _retry_decision,
    _step_decision,
    _tool_decision,
    crossed_soft_limits,
    decide_model_call,
    quick_allow,
    quick_facts,
    rung_threshold,
)
from agentguard._errors import BudgetExceeded, InvalidUsage, PolicyError, UnknownModelError
from agentguard._policy import Policy
from agentguard._store import Balance, BudgetLine, BudgetStore, Denied, MemoryStore, ReserveResult
from agentguard._trace import Span, TaskRecord, TraceSink
from agentguard._usage import Usage
from agentguard.adapter import Steps, adrive, drive

if TYPE_CHECKING:
    from agentguard._pricing import ModelRates, PriceBook
    from agentguard._tokens import TokenCounter
    from agentguard._trim import Chunk, TrimResult

__all__ = ["DecisionRecord", "Guard", "ModelCall", "Task", "ToolCall", "current_task"]

_ZERO = Decimal(0)
_current: ContextVar[Task | None] = ContextVar("agentguard_task", default=None)

# Sync and async events share one body. The events of the agent loop's hot path (a model
# call's start and end, a tool call, a step, a retry) are halves: ``_*_begin`` decides and
# returns the store operation's arguments, ``_model_call_reserved`` / ``_*_end`` /
# ``_*_finish`` does the bookkeeping with its result (a refused reservation is decided again
# there); the sync method calls the store's sync method between them, its async twin awaits the
# async one (driving a generator costs ~5 calls per event there). The other events are
# generators ("steps") yielding the store operations they need — ``(store, method, args,
# kwargs)`` — and receiving their results; ``agentguard.adapter.drive`` runs the steps on the
# store's sync methods (``reserve``, ...), ``adrive`` awaits its async twins (``areserve``,
# ...) — the driver the adapters use for their own events. Either way the decisions and
# bookkeeping are written once and an async app never blocks its event loop on store I/O.
_NO_KW: dict[str, Any] = {}  # the kwargs of most operations (only ever unpacked, never changed)
_NO_CHECK: dict[str, Any] = {"check": False}  # likewise
# the arguments of a charge: (lines, amounts, check)
_Charge = tuple[list[BudgetLine], dict[str, Decimal | int], bool]
# a step's or retry's span before it is built: (span id, name, start, parent id)
# what a step charges (read only)
_ONE_STEP: dict[str, Decimal | int] = {"steps": 1}
_Counted = tuple[str, str, float, str]


class _Events:
    """Where decisions and errors are reported.

    When the application has configured structlog, events go to structlog (``agentguard.*``
    with key-value fields). Otherwise they go to the standard ``logging`` logger
    ``"agentguard"`` — silent until the application configures logging, apart from Python's
    last-resort handler for warnings and errors — so a library never prints to stdout unasked.
    """

    __slots__ = ()

    def _emit(self, level: int, event: str, fields: dict[str, Any]) -> None:
        import structlog

        if structlog.is_configured():
            structlog.get_logger("agentguard").log(level, event, **fields)
            return
        import logging

        log = logging.getLogger("agentguard")
        if log.isEnabledFor(level):
            detail = " ".join(f"{k}={v!r}" for k, v in fields.items())
            log.log(level, "%s %s", event, detail, extra={"agentguard": fields})

    def info(self, event: str, **fields: Any) -> None:
        self._emit(20, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit(30, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit(40, event, fields)


_events = _Events()


def _logger() -> _Events:
    return _events


_TOKENS: Any = None

# agentguard._sinks.NullSink, set when the first Guard imports the sinks: events skip handing
# their spans to a guard whose sink (read at each event: ``Alerts.attach`` replaces it) is one
_NULL_SINK: Any = None
_INF = float("inf")
# the counters a decision reads, at zero (Task._spent merges a balance over them)
_NO_SPEND: dict[str, Decimal | int] = {
    "cost_usd": _ZERO,
    "input_tokens": 0,
    "output_tokens": 0,
    "model_calls": 0,
    "tool_calls": 0,
    "retries": 0,
    "steps": 0,
}


def _used(balance: Balance | None, counter: str) -> Any:
    """Committed plus reserved ``counter`` of a balance (0 without one): one count, read
    without building the whole :class:`Spent`."""
    if balance is None:
        return 0
    com, res = balance.committed, balance.reserved
    n = com[counter] if counter in com else 0  # noqa: SIM401
    if res and counter in res:
        n += res[counter]
    return n


def _call_amounts(estimate: int, d: Decision) -> dict[str, Decimal | int]:
    """What an allowed model call reserves: the call, its input estimate, the output cap it
    may write (and their sum), and its worst-case cost when it is priced."""
    out = d.max_tokens or 0
    amounts: dict[str, Decimal | int] = {
        "model_calls": 1,
        "input_tokens": estimate,
        "output_tokens": out,
        "tokens": estimate + out,
    }
    if d.reserve_usd is not None:
        amounts["cost_usd"] = d.reserve_usd
    return amounts


def _tokens() -> Any:
    """``agentguard._tokens``, imported on first use (it is not needed to import agentguard)
    and then read from a global: an import statement costs a microsecond per call."""
    global _TOKENS
    if _TOKENS is None:
        from agentguard import _tokens as module

        _TOKENS = module
    return _TOKENS


def current_task() -> Task | None:
    """The task the current context charges, or ``None`` outside ``guard.task(...)``.

    Example:
        >>> current_task() is None
        True
    """
    return _current.get()


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """A non-trivial decision taken for a task (downgrade, finish, block, stop, warn, trim...)."""

    kind: str  # "model" | "tool" | "retry" | "step" | "trim" | "soft_limit" | "overspend"
    action: str
    reason: str
    at: float
    model: str | None = None
    limit: str | None = None
    span_id: str | None = None


class Guard:
    """Keeps tasks inside their budgets. One guard is shared by every task of an application.

    Args:
        policy: a :class:`Policy`, a mapping of policy fields, or a path to a TOML/YAML file.
        store: where budgets live; :class:`MemoryStore` by default.
        traces: a trace sink, a path (``.db`` SQLite, ``.jsonl``), ``"memory"``, ``"otel"``
            (:class:`OTelSink` on the global OpenTelemetry providers), ``None`` for the
            default ``agentguard.db``, or ``False`` for no traces.
        prices: a :class:`PriceBook` (genai-prices plus overrides); a default one if omitted.
        tags: attribution tags every task inherits (``env="prod"``, ``org="acme"``).
        capture_content: store prompt and completion text in traces (off by default).

    Example:
        >>> import agentguard as ag
        >>> guard = ag.Guard(ag.Policy(max_cost_usd="0.25"), traces=False)
        >>> with guard.task("ticket-42", feature="support") as task:
        ...     call = task.start_model_call("gpt-4o-mini", input_tokens=1000, max_tokens=200)
        ...     _ = call.end(ag.Usage(input_tokens=1000, output_tokens=150))
        >>> task.cost_usd
        Decimal('0.000240000')
    """

    def __init__(
        self,
        policy: Policy | Mapping[str, Any] | str | os.PathLike[str] | None = None,
        *,
        store: BudgetStore | None = None,
        traces: TraceSink | str | os.PathLike[str] | Literal[False] | None = None,
        prices: PriceBook | None = None,
        tags: Mapping[str, str] | None = None,
        capture_content: bool = False,
    ) -> None:
        if policy is None:
            policy = Policy()
        elif isinstance(policy, str | os.PathLike):
            policy = Policy.from_file(Path(policy))
        elif not isinstance(policy, Policy):
            policy = Policy.build(policy)
        self.policy: Policy = policy
        self.store: BudgetStore = store if store is not None else MemoryStore()
        if prices is None:
            from agentguard._pricing import PriceBook

            prices = PriceBook()
        self.prices: PriceBook = prices
        from agentguard._sinks import NullSink, open_sink

        global _NULL_SINK
        _NULL_SINK = NullSink
        self.sink: TraceSink = open_sink(traces)
        self.tags: dict[str, str] = {**policy.tags, **(tags or {})}
        self.capture_content = capture_content
        self._ids = itertools.count(1)
        # id(policy) -> (policy, its tasks' shared rate maps; see Task._rate_maps)
        self._rates_by_policy: dict[
            int, tuple[Policy, dict[str, dict[str, ModelRates | None]]]
        ] = {}
        self.trace_errors = 0
        self._prefix = uuid.uuid4().hex[:10]
        # callables (event, fields) told of soft-limit crossings (e.g. agentguard.Alerts.attach)
        self.listeners: list[Any] = []
        self._check_ladder(policy)

    def _check_ladder(self, policy: Policy) -> None:
        """Refuse a downgrade ladder whose rungs go *up* in price (known prices only)."""
        prev: tuple[str, Decimal] | None = None
        for i, rung in enumerate(policy.downgrade):
            r = self.prices.rates(rung.to)
            if r is None:
                if policy.has_cost_limit:
                    raise PolicyError(
                        f"downgrade[{i}].to",
                        rung.to,
                        "no known price for this model; "
                        "a ladder under a cost limit must be priced (add a PriceBook override)",
                    )
                continue
            unit = r.input + r.output
            if prev is not None and unit > prev[1]:
                raise PolicyError(
                    f"downgrade[{i}].to",
                    rung.to,
                    f"the ladder goes up in price: {rung.to} costs more than {prev[0]}",
                )
            prev = (rung.to, unit)

    def _write(self, spans: list[Span]) -> None:
        """Hand spans to the sink. A failing sink never breaks the user's run: the error is
        logged (``agentguard.trace_error``) and budgets are still enforced."""
        try:
            self.sink.write_spans(spans)
        except Exception as exc:
            self._trace_error(exc, len(spans))

    def _write_task(self, record: TaskRecord) -> None:
        try:
            self.sink.write_task(record)
        except Exception as exc:
            self._trace_error(exc, 1)

    def _trace_error(self, exc: Exception, n: int) -> None:
        self.trace_errors += 1
        _logger().error("agentguard.trace_error", error=f"{type(exc).__name__}: {exc}", records=n)

    def _rate_maps_of(self, policy: Policy) -> dict[str, dict[str, ModelRates | None]]:
        held = self._rates_by_policy.get(id(policy))
        if held is None or held[0] is not policy:
            if len(self._rates_by_policy) >= 256:  # a policy per task: nothing shared then
                self._rates_by_policy.clear()
            held = self._rates_by_policy[id(policy)] = (policy, {})
        return held[1]

    def _next_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    # -- tasks ----------------------------------------------------------------------------------

    def task(
        self,
        task_id: str | None = None,
        *,
        policy: Policy | None = None,
        parent: Task | Literal[False] | None = None,
        **tags: str,
    ) -> _TaskScope:
        """Open a task: a sync or async context manager yielding a :class:`Task`.

        Inside another task of this guard (or with ``parent=``), the new task is a *child*:
        its spend also counts against every budget of the parent, so sub-agents and
        subgraphs cannot overspend the parent together. ``parent=False`` forces a root task.
        ``policy`` gives the child its own limits (e.g. a smaller ``max_cost_usd``).

        Example:
            >>> import agentguard as ag
            >>> guard = ag.Guard(traces=False)
            >>> with guard.task("t1", team="cx") as t:
            ...     with guard.task("t1.sub") as sub:
            ...         sub.parent is t
            True
        """
        return _TaskScope(self, task_id, policy, parent, tags)

    def open_task(
        self,
        task_id: str | None = None,
        *,
        policy: Policy | None = None,
        parent: Task | None = None,
        **tags: str,
    ) -> Task:
        """Open a task without a ``with`` block, for adapters whose framework reports the start
        and the end of a run as separate events (callbacks, middleware hooks).

        The task is *not* made current (no ContextVar is set): the adapter keeps it and calls
        :meth:`Task.close` exactly once when the run ends. ``parent`` makes it a child task.

        Example:
            >>> import agentguard as ag
            >>> g = ag.Guard(traces=False)
            >>> t = g.open_task("run-1", team="cx")
            >>> t.close()
            >>> t.status
            'ok'
        """
        return Task(self, task_id, policy, parent, tags)

    async def aopen_task(
        self,
        task_id: str | None = None,
        *,
        policy: Policy | None = None,
        parent: Task | None = None,
        **tags: str,
    ) -> Task:
        """The async twin of :meth:`open_task`: reads the task's balances with the store's
        async methods. Close it with ``await task.aclose()``."""
        task = Task(self, task_id, policy, parent, tags, load=False)
        await task._aload()
        return task

    @property
    def awaits_store(self) -> bool:
        """Whether the async events of this guard's tasks await the store: ``False`` only on
        the embedded :class:`MemoryStore` itself (no I/O: each async event would only run its
        sync twin, which an async adapter may call directly); ``True`` on any other store,
        subclasses of ``MemoryStore`` included."""
        return type(self.store) is not MemoryStore

    def close(self) -> None:
        """Flush and close the trace sink."""
        self.sink.flush()
        self.sink.close()

    # helpers used by tasks
    def _rates(self, model: str) -> ModelRates | None:
        return self.prices.rates(model)

    def _counter(self, model: str | None) -> TokenCounter:
        counter: TokenCounter = _tokens().counter_for(model)
        return counter


class _TaskScope:
    """``with guard.task(...)`` / ``async with guard.task(...)``."""

    __slots__ = ("_args", "_guard", "_task", "_token", "retires")

    def __init__(
        self,
        guard: Guard,
        task_id: str | None,
        policy: Policy | None,
        parent: Task | Literal[False] | None,
        tags: Mapping[str, str],
    ) -> None:
        self._guard = guard
        self._args = (task_id, policy, parent, tags)
        self._task: Task | None = None
        self._token: Token[Task | None] | None = None
        # the task's id was made up by an adapter (a branch's child id): see Task._retire
        self.retires = False

    def _make(self, load: bool) -> Task:
        task_id, policy, parent, tags = self._args
        if parent is None:
            cur = _current.get()
            parent = cur if cur is not None and cur.guard is self._guard else None
        elif parent is False:
            parent = None
        return Task(self._guard, task_id, policy, parent, tags, load=load, retires=self.retires)

    def _enter(self, task: Task) -> Task:
        self._task = task
        self._token = _current.set(task)
        return task

    def _leave(self) -> Task:
        assert self._task is not None
        assert self._token is not None
        try:
            _current.reset(self._token)
        except ValueError:  # reset from another context (a generator closed elsewhere)
            _current.set(self._task.parent)
        return self._task

    def __enter__(self) -> Task:
        return self._enter(self._make(load=True))

    def __exit__(self, et: object, exc: BaseException | None, tb: object) -> None:
        self._leave()._close(exc)

    async def __aenter__(self) -> Task:
        task = self._make(load=False)
        await task._aload()  # the store's async methods: the event loop is not blocked
        return self._enter(task)

    async def __aexit__(self, et: object, exc: BaseException | None, tb: object) -> None:
        await self._leave()._aclose(exc)


def _window_bucket(window: str, now: float) -> tuple[str, float]:
    """The bucket label of ``now`` and when that bucket ends (UTC)."""
    dt = datetime.fromtimestamp(now, UTC)
    if window == "hour":
        start = dt.replace(minute=0, second=0, microsecond=0)
        return start.strftime("%Y-%m-%dT%H"), start.timestamp() + 3600
    if window == "day":
        start = dt.replace(hour=0, minute=0, second=0, microsecond=0)
        return start.strftime("%Y-%m-%d"), start.timestamp() + 86400
    start = dt.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    nxt = (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )
    return start.strftime("%Y-%m"), nxt.timestamp()


class _PolicyFacts(NamedTuple):
    """What every task of a policy derives from it (a policy is frozen): read once per policy
    object, not once per task."""

    policy: Policy  # held: the facts are found by the policy's id
    limits: dict[str, Decimal | int]  # the task line's limits (copied by each task)
    has_cost_limit: bool
    needs_fraction: bool  # a ladder or soft limits read the spent fraction
    soft: bool
    quick: QuickFacts | None  # what the model lane's quick_allow reads (None: never asked)


_FACTS: dict[int, _PolicyFacts] = {}


def _policy_facts(policy: Policy) -> _PolicyFacts:
    facts = _FACTS.get(id(policy))
    if facts is None or facts.policy is not policy:
        if len(_FACTS) >= 1024:  # a policy per task (branches with policies of their own)
            _FACTS.clear()
        facts = _FACTS[id(policy)] = _PolicyFacts(
            policy,
            _task_limits(policy),
            policy.has_cost_limit,
            bool(policy.downgrade or policy.soft_limits),
            bool(policy.soft_limits),
            quick_facts(policy),
        )
    return facts


def _task_limits(policy: Policy) -> dict[str, Decimal | int]:
    if policy.on_limit == "warn":
        return {}
    pairs: list[tuple[str, Decimal | int | None]] = [
        ("cost_usd", policy.max_cost_usd),
        ("tokens", policy.max_total_tokens),
        ("input_tokens", policy.max_input_tokens),
        ("output_tokens", policy.max_total_output_tokens),
        ("model_calls", policy.max_model_calls),
        ("tool_calls", policy.max_tool_calls),
        ("retries", policy.max_retries),
        ("steps", policy.max_steps),
    ]
    limits = {k: v for k, v in pairs if v is not None}
    for tool, cap in policy.tool_limits.items():
        limits[f"tool:{tool}"] = cap
    return limits


class _Reservation:
    """A model call between its decision and its reservation (``_model_call_plan`` fills
    ``decision``, ``rid`` and ``amounts``; ``attempt`` counts refusals)."""

    __slots__ = (
        "amounts",
        "attempt",
        "decision",
        "finish",
        "lines",
        "messages",
        "model",
        "rate_map",
        "raw",
        "request",
        "rid",
        "span",
    )

    decision: Decision
    rid: str
    amounts: dict[str, Decimal | int]

    def __init__(
        self,
        model: str,
        messages: Sequence[Any] | None,
        finish: bool,
        request: CallRequest,
        rate_map: dict[str, ModelRates | None],
        lines: list[BudgetLine],
        span: Span,
        raw: int,
        attempt: int,
    ) -> None:
        self.model = model
        self.messages = messages
        self.finish = finish
        self.request = request
        self.rate_map = rate_map
        self.lines = lines
        self.span = span
        self.raw = raw
        self.attempt = attempt


class Task:
    """One unit of work (an agent run, a request) with its budget, counters and trace.

    Created by :meth:`Guard.task`. Adapters call its event methods; users read the results:
    ``cost_usd`` (``Decimal``, or ``None`` if some call could not be priced), ``usage``,
    ``decisions``, ``model_calls``, ``tool_calls``, ``saved_usd``.

    Every event that touches the budget store has an async twin (``astart_model_call``,
    ``call.aend``, ``call.afail``, ``astart_tool_call``, ``tool.aend``, ``arecord_retry``,
    ``astep``, ``aclose``) that awaits the store's async methods, for async apps on a store
    that does network I/O (``RedisStore``); the decisions are the same code.

    ``awaits_store`` says whether they await anything: on the embedded :class:`MemoryStore`
    (no I/O) each async twin only runs its sync twin, so an async adapter may call the sync
    event directly and spare the coroutine (``False`` there; ``True`` on any other store,
    subclasses of ``MemoryStore`` included).
    """

    # Slots: every event reads a dozen of these inside frameworks whose own work evicts them
    # from the CPU caches between events; slots sit at fixed offsets in one object, where a
    # ``__dict__`` of this size is a hashed lookup into a separate table.
    __slots__ = (
        "__weakref__",
        "_balances",
        "_blocked",
        "_charge_op",
        "_children",
        "_commit_op",
        "_downgraded_to",
        "_fresh",
        "_gone",
        "_has_cost_limit",
        "_kept",
        "_key",
        "_lanes",
        "_limits_of",
        "_lines",
        "_lines_until",
        "_local",
        "_lock",
        "_needs_fraction",
        "_open",
        "_quick",
        "_rate_maps",
        "_reserve_op",
        "_retires",
        "_seen_fraction",
        "_soft",
        "_soft_seen",
        "_usage",
        "awaits_store",
        "current_step_id",
        "decisions",
        "ended",
        "finished",
        "guard",
        "id",
        "limit_hit",
        "model_calls",
        "overspent",
        "parent",
        "policy",
        "priced_cost_usd",
        "retries",
        "saved_usd",
        "span",
        "started",
        "status",
        "steps",
        "tags",
        "tokens_saved",
        "tool_calls",
        "tool_calls_by_name",
        "unpriced_calls",
    )

    def __init__(
        self,
        guard: Guard,
        task_id: str | None,
        policy: Policy | None,
        parent: Task | None,
        tags: Mapping[str, str],
        *,
        load: bool = True,
        retires: bool = False,
    ) -> None:
        self.guard = guard
        # 12 random hex digits, as uuid4().hex[:12] gives, without building a UUID
        self.id = task_id or os.urandom(6).hex()
        self.parent = parent
        base_tags = parent.tags if parent is not None else guard.tags
        self.tags: dict[str, str] = {**base_tags, **tags}
        self.policy: Policy = (
            policy
            if policy is not None
            else (parent.policy if parent is not None else guard.policy)
        )
        self.started = time.time()
        self.ended: float | None = None
        self.status = "running"
        self.limit_hit: str | None = None
        # exact local accounting of this task (children roll theirs up through the store)
        self._lock = threading.Lock()
        # input, output, cache read, cache write, reasoning, estimated calls
        self._usage = [0, 0, 0, 0, 0, 0]
        self.priced_cost_usd: Decimal = _ZERO
        self.unpriced_calls = 0
        self.model_calls = 0
        self.tool_calls = 0
        self.tool_calls_by_name: dict[str, int] = {}
        self.retries = 0
        self.steps = 0
        self.decisions: list[DecisionRecord] = []
        self.saved_usd: Decimal = _ZERO
        self.tokens_saved = 0
        self.finished = False
        self.overspent = False
        self._soft_seen: set[tuple[str, float]] = set()
        self._open: dict[str, ModelCall] = {}
        self.current_step_id: str | None = None
        self._downgraded_to: str | None = None
        self._blocked: str | None = None
        # model -> the rates of it and of the models its decisions may pick: the same for every
        # task of this guard and policy, so shared by them (a task's first call of a model does
        # not price the ladder again)
        self._rate_maps: dict[str, dict[str, ModelRates | None]] = guard._rate_maps_of(self.policy)
        facts = _policy_facts(self.policy)
        self._has_cost_limit = facts.has_cost_limit
        self._needs_fraction = facts.needs_fraction
        self._quick = facts.quick
        self._soft = facts.soft  # else a balance update is a dict update
        # the embedded store does no I/O: an async event on it runs its sync twin (no
        # coroutine per store call); a subclass (agentguard.testing.LoopCheckingStore) is
        # awaited as any other store is
        self.awaits_store = guard.awaits_store
        self._local = not self.awaits_store
        # the sync store operations of the hot events: on the embedded store, their in-place
        # twins (no balances copied back: ``_balances`` is the store's live mapping)
        store: Any = guard.store
        if self._local:
            self._reserve_op = store.reserve_in_place
            self._commit_op = store.commit_in_place
            self._charge_op = store.charge_in_place
        else:
            self._reserve_op = store.reserve
            self._commit_op = store.commit
            self._charge_op = store.charge
        self.span: Span = Span(
            f"{guard._prefix}-{next(guard._ids)}",
            self.id,
            "task",
            self.id,
            self.started,
            parent.span.span_id if parent is not None else None,
            attrs={"tags": dict(self.tags)},
        )
        self._key = f"task:{self.id}"
        self._lines_until = _INF
        self._lines = self._build_lines(self.started, facts.limits)
        # what of _fast holds for the task's life (the sink is read at each event: Alerts.attach
        # replaces it)
        self._lanes = self._local and not self._soft and self._lines_until == _INF
        # (lines, money limits, token limits, rung thresholds) of _line_limits, for the
        # current list of lines
        self._limits_of: (
            tuple[
                list[BudgetLine],
                list[tuple[str, Decimal]],
                list[tuple[str, int]],
                list[tuple[str, Decimal, Decimal]],
            ]
            | None
        ) = None
        # the balances of the task's lines, as of its latest event. On the embedded store this
        # is the store's own ``live`` mapping, changed in place by every operation (there is
        # nothing to load, and results carry no copies): never written here — every write of
        # returned balances below is for other stores only
        self._balances: MutableMapping[str, Balance] = (
            guard.store.live if self._local else {}  # type: ignore[attr-defined]
        )
        # a fresh random id has spent nothing yet: its own line is not read back
        self._fresh = task_id is None
        # nothing can name it again: on the embedded store its line is retired once it and its
        # children have closed (see _retire); so is a child id an adapter made up (``retires``)
        self._retires = self._fresh or retires
        self._children = 0  # its open child tasks
        self._kept: Balance | None = None  # its line's balance while the line is retired
        self._gone = False  # its line was retired from a store other than the embedded one
        if load and not self._local:  # else the opener awaits _aload()
            keys = self._load_keys()
            if keys:
                self._balances.update(guard.store.snapshot(keys))
        # the committed fraction of the money budgets as of the latest event (soft limits fire
        # when it crosses one)
        self._seen_fraction = self._committed_fraction()[0] if self._soft else 0.0
        if parent is not None:  # (last: a task that failed to open is no child to wait for)
            with parent._lock:
                parent._children += 1
            if parent._kept is not None:  # a child of a closed task charges its line too
                parent._put_back()

    def _load_keys(self) -> list[str]:
        """The lines whose balances a new task reads: all of them, but its own line when its
        id is a fresh random one (nothing can have charged it)."""
        if self._fresh:
            return [ln.key for ln in self._lines if ln.key != self._key]
        return [ln.key for ln in self._lines]

    async def _aload(self) -> None:
        if self._local:
            return
        keys = self._load_keys()
        if keys:
            self._balances.update(await self.guard.store.asnapshot(keys))
        if self._soft:
            self._seen_fraction = self._committed_fraction()[0]

    # -- budgets ----------------------------------------------------------------------------

    def _build_lines(
        self, now: float, own: Mapping[str, Decimal | int] | None = None
    ) -> list[BudgetLine]:
        """The budget lines this task charges: its own, its parents', each matching budget.

        Two budgets on one key (a general ``team`` budget and a ``match="ops"`` one, or a
        parent's and a child's) merge into one line with the tighter limit of each counter.
        """
        merged: dict[str, tuple[dict[str, Decimal | int], float | None]] = {
            # the task's own limits (``own``: already read from its policy), copied: merged into
            self._key: (dict(_policy_facts(self.policy).limits if own is None else own), None)
        }
        until = float("inf")

        def add(key: str, limits: Mapping[str, Decimal | int], expires: float | None) -> None:
            if key not in merged:
                merged[key] = (dict(limits), expires)
                return
            have = merged[key][0]
            for counter, value in limits.items():
                old = have.get(counter)
                have[counter] = value if old is None else min(old, value)

        if self.parent is not None:
            for ln in self.parent._current_lines(now):
                add(ln.key, ln.limits, ln.expires_at)
            until = self.parent._lines_until
        warn = self.policy.on_limit == "warn"
        for b in self.policy.budgets:
            if b.scope == "global":
                key = "global"
            else:
                value = self.tags.get(b.scope)
                if value is None or (b.match is not None and value != b.match):
                    continue
                key = f"{b.scope}:{value}"
            expires = None
            if b.window is not None:
                label, expires = _window_bucket(b.window, now)
                key = f"{key}@{b.window}:{label}"
                until = min(until, expires)
            limits: dict[str, Decimal | int] = {}
            if not warn:
                if b.max_cost_usd is not None:
                    limits["cost_usd"] = b.max_cost_usd
                if b.max_total_tokens is not None:
                    limits["tokens"] = b.max_total_tokens
            add(key, limits, expires)
        self._lines_until = until
        return [BudgetLine(k, lim, exp) for k, (lim, exp) in merged.items()]

    def _current_lines(self, now: float | None = None) -> list[BudgetLine]:
        if now is None:
            now = time.time()
        if now >= self._lines_until:
            self._lines = self._build_lines(now)  # (a window ended)
        return self._lines

    def _spent(self) -> Spent:
        """The task's spend from its balances (``tool_calls_by_name`` empty: the tool decision
        reads its two counts itself, see :meth:`_decide_tool`)."""
        b = self._balances.get(self._key)
        if b is None:
            return Spent(finished=self.finished, blocked=self._blocked)
        # stores hand back Decimal money and int counts; merged over the zeros, every counter
        # a decision reads is a subscript (no call)
        com = {**_NO_SPEND, **b.committed}
        res = b.reserved
        if not res:  # nothing in flight (the usual case between calls): committed is all
            return Spent(
                com["cost_usd"],  # type: ignore[arg-type]
                com["input_tokens"],  # type: ignore[arg-type]
                com["output_tokens"],  # type: ignore[arg-type]
                com["model_calls"],  # type: ignore[arg-type]
                com["tool_calls"],  # type: ignore[arg-type]
                {},
                com["retries"],  # type: ignore[arg-type]
                com["steps"],  # type: ignore[arg-type]
                self.finished,
                self._blocked,
            )
        r = {**_NO_SPEND, **res}
        return Spent(
            com["cost_usd"] + r["cost_usd"],  # type: ignore[arg-type]
            com["input_tokens"] + r["input_tokens"],  # type: ignore[arg-type]
            com["output_tokens"] + r["output_tokens"],  # type: ignore[arg-type]
            com["model_calls"] + r["model_calls"],  # type: ignore[arg-type]
            com["tool_calls"] + r["tool_calls"],  # type: ignore[arg-type]
            {},
            com["retries"] + r["retries"],  # type: ignore[arg-type]
            com["steps"] + r["steps"],  # type: ignore[arg-type]
            self.finished,
            self._blocked,
        )

    def _line_limits(
        self,
    ) -> tuple[list[tuple[str, Decimal]], list[tuple[str, int]]]:
        """The money limits and the token limits of the task's lines (the task's own token
        limit is in :meth:`_spent`), read once per list of lines."""
        lines = self._lines
        got = self._limits_of
        if got is None or got[0] is not lines:
            money: list[tuple[str, Decimal]] = [
                (ln.key, ln.limits["cost_usd"])  # type: ignore[misc]  # money is Decimal
                for ln in lines
                if "cost_usd" in ln.limits
            ]
            tokens = [
                (ln.key, int(ln.limits["tokens"]))
                for ln in lines
                if "tokens" in ln.limits and ln.key != self._key
            ]
            # each money limit with the spend below which the line is below the ladder's
            # first rung (what the model lane compares before it asks quick_allow)
            quick = self._quick
            thresholds = (
                [] if quick is None else [(k, lim, rung_threshold(quick, lim)) for k, lim in money]
            )
            got = self._limits_of = (lines, money, tokens, thresholds)
        return got[1], got[2]

    def _headroom(self) -> Headroom:
        remaining: Decimal | None = None
        fraction = 0.0
        limit_usd = None
        budget = None
        tokens_left: int | None = None
        tokens_budget = None
        got = self._limits_of
        if got is None or got[0] is not self._lines:
            money, tokens = self._line_limits()
        else:
            money, tokens = got[1], got[2]
        balances = self._balances
        needs_fraction = self._needs_fraction
        for key, lim in money:
            bal = balances.get(key)
            if bal is None:
                used = _ZERO
            else:
                used = bal.committed.get("cost_usd", _ZERO) + bal.reserved.get(  # type: ignore[assignment]
                    "cost_usd", _ZERO
                )
            left = lim - used
            if remaining is None or left < remaining:
                remaining, limit_usd, budget = left, lim, key
            if needs_fraction:  # the largest spent/limit fraction (without a max() call)
                if lim > 0:
                    spent_fraction = float(used / lim)
                    if spent_fraction > fraction:
                        fraction = spent_fraction
                else:
                    fraction = 1.0
        for key, tl in tokens:
            bal = balances.get(key)
            left_t = tl - (int(bal.used("tokens")) if bal else 0)
            if tokens_left is None or left_t < tokens_left:
                tokens_left, tokens_budget = left_t, key
        if remaining is not None and remaining < 0:
            remaining = _ZERO
        return Headroom(remaining, fraction, limit_usd, budget, tokens_left, tokens_budget)

    def _refresh(self) -> None:
        drive(self._refresh_steps())

    def _refresh_steps(self) -> Steps[None]:
        if self._local:  # the embedded store's balances are read live
            return
        keys = [ln.key for ln in self._lines]
        if self._gone and self._key in keys:  # its line was retired: its balance as of then
            keys.remove(self._key)  # is the last one
            if not keys:
                return
        self._balances.update((yield (self.guard.store, "snapshot", (keys,), _NO_KW)))

    def _update(self, balances: Mapping[str, Balance]) -> None:
        """Take the balances a store operation returned (none on the embedded store, whose
        balances are read live) and raise the soft limits the committed spend crossed since
        the task's previous event."""
        if not self._local:
            self._balances.update(balances)
        soft = self.policy.soft_limits
        if not soft:
            return
        before = self._seen_fraction
        after, budget = self._committed_fraction()
        self._seen_fraction = after
        for f in crossed_soft_limits(soft, before, after):
            self._soft_limit(f, after, budget)

    def _committed_fraction(self) -> tuple[float, str | None]:
        """The largest committed spend / limit over the task's money budgets, and that budget:
        what soft limits read — money spent, not the worst cases reserved for calls in flight
        (a reservation that is mostly released must not raise an alert)."""
        money, _tokens = self._line_limits()
        fraction, budget = 0.0, None
        for key, lim in money:
            bal = self._balances.get(key)
            used = _ZERO if bal is None else bal.committed.get("cost_usd", _ZERO)
            f = float(used / lim) if lim > 0 else 1.0
            if budget is None or f > fraction:
                fraction, budget = f, key
        return fraction, budget

    def _soft_limit(self, fraction: float, now_fraction: float, budget: str | None) -> None:
        key = (budget or self._key, fraction)
        if key in self._soft_seen:
            return
        self._soft_seen.add(key)
        reason = f"{int(fraction * 100)}% of the budget on {key[0]} spent ({now_fraction:.0%})"
        self._record("soft_limit", "soft_limit", reason, None)
        fields = {
            "task_id": self.id,
            "budget": key[0],
            "threshold": fraction,
            "spent_fraction": round(now_fraction, 4),
            **self.tags,
        }
        _logger().warning("agentguard.soft_limit", **fields)
        for listener in self.guard.listeners:  # a failing listener never breaks the run
            try:
                listener("agentguard.soft_limit", fields)
            except Exception as exc:
                _logger().error("agentguard.listener_error", error=f"{type(exc).__name__}: {exc}")

    def _record(
        self,
        kind: str,
        action: str,
        reason: str,
        span: Span | None,
        *,
        model: str | None = None,
        limit: str | None = None,
    ) -> DecisionRecord:
        rec = DecisionRecord(
            kind,
            action,
            reason,
            time.time(),
            model,
            limit,
            span.span_id if span is not None else None,
        )
        with self._lock:
            self.decisions.append(rec)
        if kind != "soft_limit":
            log = _logger()
            emit = log.warning if action in ("stop", "finish") or kind == "overspend" else log.info
            emit(
                f"agentguard.{action}",
                task_id=self.id,
                kind=kind,
                model=model,
                limit=limit,
                reason=reason,
                **self.tags,
            )
        return rec

    def _stop(self, d: Decision, kind: str, span: Span | None) -> BudgetExceeded:
        self.limit_hit = d.limit
        self._record(kind, "stop", d.reason, span, limit=d.limit)
        return BudgetExceeded.from_decision(d, task_id=self.id)

    # -- read-outs --------------------------------------------------------------------------

    @property
    def span_id(self) -> str:
        """The id of this task's own span (the root of its trace tree)."""
        return self.span.span_id

    @property
    def usage(self) -> Usage:
        """Token usage of this task's own calls (``estimated`` if any call's was)."""
        u = self._usage
        return Usage(u[0], u[1], u[2], u[3], u[4], estimated=bool(u[5]), per_call=False)

    @property
    def cost_usd(self) -> Decimal | None:
        """Exact cost of this task's own calls; ``None`` if any call could not be priced."""
        return None if self.unpriced_calls else self.priced_cost_usd

    @property
    def spent(self) -> Spent:
        """Committed plus reserved spend of this task, children included, read from the store."""
        self._refresh()
        return self._spent()

    async def aspent(self) -> Spent:
        """The async twin of :attr:`spent`."""
        await adrive(self._refresh_steps())
        return self._spent()

    @property
    def last_spent(self) -> Spent:
        """:attr:`spent` as the store reported it with the task's latest event (no store I/O):
        what an adapter reads right after an event of its own, e.g. the steps used after
        :meth:`step`. Spend by other workers since then is not in it — except on the embedded
        :class:`MemoryStore`, whose balances a task reads live.

        Example:
            >>> import agentguard as ag
            >>> with ag.Guard(ag.Policy(max_steps=5), traces=False).task("t") as task:
            ...     _ = task.step()
            ...     _ = task.step()
            ...     task.last_spent.steps
            2
        """
        return self._spent()

    def _parent_span_id(self, parent: str | None) -> str:
        return parent or self.current_step_id or self.span.span_id

    # -- events: model calls -------------------------------------------------------------------

    def start_model_call(
        self,
        model: str,
        *,
        messages: Sequence[Any] | None = None,
        tools: Sequence[Any] | None = None,
        input_tokens: int | None = None,
        max_tokens: int | None = None,
        finish: bool = False,
        parent_span: str | None = None,
        name: str | None = None,
    ) -> ModelCall:
        """A model call is about to start: decide and reserve its worst case.

        Give either ``messages`` (and ``tools``), which are counted with the model's
        tokenizer plus a safety margin, or ``input_tokens`` when the adapter already knows.
        ``max_tokens`` is the caller's own output cap. ``finish=True`` marks the graceful final
        call made after a ``finish`` decision.

        Returns a :class:`ModelCall` whose ``decision`` says what to do: ``model`` and
        ``max_tokens`` to bind (``allow`` / ``downgrade`` / ``warn``), or ``finish`` — make the
        final call without tools instead. Raises :class:`BudgetExceeded` on ``stop``,
        :class:`UnknownModelError` for an unpriced model under a cost limit, and
        ``ValueError`` for a negative ``input_tokens`` or a ``max_tokens`` below 1 (nothing
        is reserved then).
        """
        guard = self.guard
        rate_map = self._rate_maps.get(model)
        if (
            not finish
            and self._lanes
            and rate_map is not None
            and guard.sink.__class__ is _NULL_SINK
            and not guard.capture_content
        ):  # see _fast
            # an allowed call of a model seen before, in one function (see _fast): the general
            # path's estimate, decision, reservation and call, without its plan
            estimate, raw = self._estimate_input(model, messages, tools, input_tokens)
            d = None
            quick = self._quick
            b = self._balances.get(self._key)
            if (
                quick is not None
                and not self.finished  # (Spent.finished, Spent.blocked: decide_model_call's)
                and self._blocked is None
                and (b is None or not b.reserved)  # nothing of the task's in flight
            ):
                got = self._limits_of
                if got is None or got[0] is not self._lines:
                    self._line_limits()
                    got = self._limits_of
                assert got is not None
                if not got[2]:  # no token budget (it would lower the cap)
                    # the least money left on the task's budgets, each below its first rung
                    balances = self._balances
                    left: Decimal | None = None
                    for key, lim, below in got[3]:
                        bal = balances.get(key)
                        if bal is None:
                            used = _ZERO
                        else:
                            bc, br = bal.committed, bal.reserved
                            used = bc["cost_usd"] if "cost_usd" in bc else _ZERO  # type: ignore[assignment]  # noqa: SIM401
                            if "cost_usd" in br:
                                used += br["cost_usd"]
                        if not used < below:  # at or past the rung: decide_model_call
                            break
                        rest = lim - used
                        if left is None or rest < left:
                            left = rest
                    else:
                        d = quick_allow(
                            self.policy,
                            quick,
                            _NO_SPEND if b is None else b.committed,
                            left,
                            model,
                            estimate,
                            max_tokens,
                            rate_map,
                        )
            if d is None:
                d = decide_model_call(
                    self.policy,
                    self._spent(),
                    self._headroom(),
                    CallRequest(model, estimate, max_tokens),
                    rate_map,
                )
            if d.action == "allow":
                amounts = _call_amounts(estimate, d)
                rid = f"{guard._prefix}-{next(guard._ids)}"
                lines = self._lines
                if guard.store.reserve_in_place(rid, lines, amounts).ok:  # type: ignore[attr-defined]
                    span = Span(
                        f"{guard._prefix}-{next(guard._ids)}",
                        self.id,
                        "model",
                        name or model,
                        time.time(),
                        parent_span or self.current_step_id or self.span.span_id,
                        model=model,
                        decision="allow",
                        reason=d.reason,
                        attrs={
                            "reserved_usd": d.reserve_usd,
                            "max_tokens": d.max_tokens,
                            "input_estimate": estimate,
                        },
                    )
                    opened = ModelCall(
                        self, span, d, lines, rid, estimate, raw, rate_map.get(model), amounts
                    )
                    with self._lock:
                        self._open[rid] = opened
                    return opened
            # anything else (another action, a refusal that changed nothing): the general path
        call = self._model_call_begin(
            model, messages, tools, input_tokens, max_tokens, finish, parent_span, name
        )
        reserve = self._reserve_op
        while type(call) is _Reservation:  # refused: decided again, up to four attempts
            call = self._model_call_reserved(call, reserve(call.rid, call.lines, call.amounts))
        return call  # type: ignore[return-value]

    async def astart_model_call(
        self,
        model: str,
        *,
        messages: Sequence[Any] | None = None,
        tools: Sequence[Any] | None = None,
        input_tokens: int | None = None,
        max_tokens: int | None = None,
        finish: bool = False,
        parent_span: str | None = None,
        name: str | None = None,
    ) -> ModelCall:
        """The async twin of :meth:`start_model_call`: the reservation awaits the store.

        Example:
            >>> import asyncio, agentguard as ag
            >>> guard = ag.Guard(ag.Policy(max_cost_usd="1"), traces=False)
            >>> async def run() -> str:
            ...     async with guard.task("t1") as task:
            ...         call = await task.astart_model_call("gpt-4o-mini", input_tokens=100)
            ...         await call.aend({"prompt_tokens": 100, "completion_tokens": 20})
            ...         return str(task.cost_usd.normalize())
            >>> asyncio.run(run())
            '0.000027'
        """
        if self._local:
            return self.start_model_call(
                model, messages=messages, tools=tools, input_tokens=input_tokens,
                max_tokens=max_tokens, finish=finish, parent_span=parent_span, name=name,
            )  # fmt: skip
        call = self._model_call_begin(
            model, messages, tools, input_tokens, max_tokens, finish, parent_span, name
        )
        areserve = self.guard.store.areserve
        while type(call) is _Reservation:
            call = self._model_call_reserved(
                call, await areserve(call.rid, call.lines, call.amounts)
            )
        return call  # type: ignore[return-value]

    def _model_call_begin(
        self,
        model: str,
        messages: Sequence[Any] | None,
        tools: Sequence[Any] | None,
        input_tokens: int | None,
        max_tokens: int | None,
        finish: bool,
        parent_span: str | None,
        name: str | None,
    ) -> ModelCall | _Reservation:
        """A model call up to its reservation: the estimate, the span, the decision; a
        ``ModelCall`` when the decision needs no reservation (a ``finish``), else the
        reservation to make."""
        if max_tokens is not None and max_tokens < 1:  # (the lane never allows one)
            raise ValueError(
                f"max_tokens={max_tokens!r}: a model call's output cap must be at least 1 token"
            )
        guard = self.guard
        policy = self.policy
        rate_map = self._rate_maps.get(model)
        if rate_map is None:
            rates = guard._rates(model)
            if rates is None and self._has_cost_limit:
                raise UnknownModelError(model)
            rate_map = {model: rates}
            for rung in policy.downgrade:
                rate_map[rung.to] = guard._rates(rung.to)
            if policy.finish_model is not None:
                rate_map[policy.finish_model] = guard._rates(policy.finish_model)
            self._rate_maps[model] = rate_map
        estimate, raw = self._estimate_input(model, messages, tools, input_tokens)
        request = CallRequest(model, estimate, max_tokens)
        lines = self._lines  # _current_lines(), without a call until a window ends
        if self._lines_until != _INF and time.time() >= self._lines_until:
            lines = self._current_lines()
        span = Span(
            f"{guard._prefix}-{next(guard._ids)}",
            self.id,
            "model",
            name or model,
            time.time(),
            parent_span or self.current_step_id or self.span.span_id,
            model=model,
        )
        return self._model_call_plan(
            _Reservation(model, messages, finish, request, rate_map, lines, span, raw, 0)
        )

    def _model_call_plan(self, plan: _Reservation) -> ModelCall | _Reservation:
        """Decide the call (again, after a refusal); a ``finish`` needs no reservation."""
        request = plan.request
        span = plan.span
        d = decide_model_call(
            self.policy,
            self._spent(),
            self._headroom(),
            request,
            plan.rate_map,
            finish_call=plan.finish,
        )
        if d.action == "finish" and not plan.finish:
            # the adapter will make the final call; it reserves then with finish=True
            self.finished = True
            span.kind, span.decision, span.reason = "decision", "finish", d.reason
            span.status = "finished"
            span.end = span.start
            self._record("model", "finish", d.reason, span, model=d.model, limit=d.limit)
            self.limit_hit = self.limit_hit or d.limit
            self.guard._write([span])
            # a decision, not a call: nothing to end; the final call is made with finish=True
            return ModelCall(
                self, span, d, plan.lines, None, request.input_tokens, plan.raw, None, done=True
            )
        if d.action == "stop":
            span.kind, span.decision, span.reason = "decision", "stop", d.reason
            span.status = "stopped"
            span.end = span.start
            self.guard._write([span])
            raise self._stop(d, "model", span)
        assert d.model is not None
        guard = self.guard
        plan.decision = d
        plan.rid = f"{guard._prefix}-{next(guard._ids)}"
        plan.amounts = _call_amounts(request.input_tokens, d)
        return plan

    def _model_call_reserved(
        self, plan: _Reservation, res: ReserveResult
    ) -> ModelCall | _Reservation:
        """The rest of a model call, given what its reservation returned: the call, or (when
        another worker took the budget first) the next attempt, decided again."""
        if not res.ok:
            if res.balances:  # (none from the embedded store: read live)
                self._balances.update(res.balances)  # someone else took it: decide again
            plan.attempt += 1
            if plan.attempt == 4:
                raise self._stop(_denied_decision(res.denied, "model call"), "model", plan.span)
            return self._model_call_plan(plan)
        if self._soft:
            self._update(res.balances)
        elif res.balances:  # (none from the embedded store: read live)
            self._balances.update(res.balances)
        d = plan.decision
        span = plan.span
        model = plan.model
        estimate = plan.request.input_tokens
        rid = plan.rid
        if plan.finish:
            self.finished = True
        span.decision = d.action
        span.reason = d.reason
        span.model = d.model
        attrs = span.attrs
        attrs["reserved_usd"] = d.reserve_usd
        attrs["max_tokens"] = d.max_tokens
        attrs["input_estimate"] = estimate
        if self.guard.capture_content and plan.messages is not None:
            attrs["prompt"] = _message_texts(plan.messages)
        if d.model != model:
            attrs["requested_model"] = model
        if d.action == "warn" or (d.action == "downgrade" and d.model != self._downgraded_to):
            self._downgraded_to = d.model if d.action == "downgrade" else self._downgraded_to
            self._record("model", d.action, d.reason, span, model=d.model, limit=d.limit)
        call = ModelCall(
            self,
            span,
            d,
            plan.lines,
            rid,
            estimate,
            plan.raw,
            plan.rate_map.get(d.model),  # type: ignore[arg-type]
            plan.amounts,
        )
        with self._lock:
            self._open[rid] = call
        return call

    def _estimate_input(
        self,
        model: str,
        messages: Sequence[Any] | None,
        tools: Sequence[Any] | None,
        input_tokens: int | None,
    ) -> tuple[int, int]:
        """(reservation estimate with margin, raw count)."""
        if input_tokens is not None:
            if input_tokens < 0:
                raise ValueError(f"input_tokens={input_tokens!r}: cannot be negative")
            return input_tokens, input_tokens
        if messages is None:
            return 0, 0
        tokens = _TOKENS or _tokens()
        counter = tokens.counter_for(model)
        raw = counter.count_messages(messages, tools)
        return tokens.reservation_tokens(counter, raw), raw

    # -- events: tools, retries, steps, retrieval ------------------------------------------

    def refuse_capped_call(self, d: Decision, cap: int, why: str) -> BudgetExceeded:
        """The stop for a call whose own output cap ``cap`` is above the ``d.max_tokens`` the
        guard allows, for an adapter that cannot lower a call's cap (a callback handler): the
        policy's ``max_output_tokens`` when that is what bounds it, else the tightest money
        budget with what the call would need at its own cap, else the token budget. ``why``
        says what to do instead.

        Example:
            >>> import agentguard as ag
            >>> with ag.Guard(ag.Policy(max_output_tokens=100), traces=False).task("t") as task:
            ...     call = task.start_model_call("gpt-4o-mini", input_tokens=10, max_tokens=500)
            ...     exc = task.refuse_capped_call(call.decision, 500, "lower the cap")
            ...     call.fail(exc)
            >>> exc.limit, exc.limit_value, exc.actual
            ('max_output_tokens', 100, 500)
        """
        assert d.max_tokens is not None
        policy_cap = self.policy.max_output_tokens
        if policy_cap is not None and d.max_tokens >= policy_cap:
            detail = f"the call may write {cap} output tokens; {why}"
            return BudgetExceeded(
                "max_output_tokens", policy_cap, cap, task_id=self.id, detail=detail
            )
        detail = (
            f"the budget pays for {d.max_tokens} output tokens but the call may write {cap}; {why}"
        )
        rates = self.guard.prices.rates(d.model) if d.model else None
        if d.reserve_usd is not None and rates is not None:
            # the money the call would need at its own cap, against the tightest money budget
            room = self._headroom()
            need = d.reserve_usd + (cap - d.max_tokens) * rates.output
            used = (room.limit_usd or 0) - (room.remaining_usd or 0)
            return BudgetExceeded(
                "max_cost_usd",
                room.limit_usd,
                used + need,
                budget=room.budget,
                task_id=self.id,
                detail=detail,
            )
        return BudgetExceeded(
            "max_total_tokens", self.policy.max_total_tokens, None, task_id=self.id, detail=detail
        )

    def start_unreserved_call(self, model: str, input_tokens: int, *, reason: str) -> ModelCall:
        """Record a model call already under way, without deciding or reserving for it.

        For adapters whose framework cannot stop or change a call (an instrumentation
        handler that only observes): the call's spend must still be recorded. ``end`` charges
        every enclosing budget unconditionally (no reservation to commit); the span carries
        ``reason`` and the attribute ``unreserved``.

        Example:
            >>> import agentguard as ag
            >>> with ag.Guard(traces=False).task("t") as task:
            ...     call = task.start_unreserved_call("gpt-4o-mini", 1000, reason="observed")
            ...     call.end(ag.Usage(input_tokens=1000, output_tokens=100))
            Decimal('0.000210000')
        """
        span = Span(
            span_id=self.guard._next_id(),
            task_id=self.id,
            kind="model",
            name=model,
            start=time.time(),
            parent_id=self.current_step_id or self.span_id,
            model=model,
            decision="allow",
            reason=reason,
            attrs={"unreserved": True, "input_estimate": input_tokens},
        )
        return ModelCall(
            self,
            span,
            Decision("allow", model=model, reason=reason),
            self._current_lines(),
            None,
            input_tokens,
            input_tokens,
            self.guard.prices.rates(model),
        )

    def start_tool_call(self, name: str, *, parent_span: str | None = None) -> ToolCall:
        """A tool is about to run. Returns a :class:`ToolCall`; check ``decision.action``:
        ``block`` means skip the tool and tell the model why (``decision.reason``).
        Raises :class:`BudgetExceeded` on ``stop``."""
        guard = self.guard
        if self._lanes and guard.sink.__class__ is _NULL_SINK:  # see _fast
            # an allowed tool call in one function
            b = self._balances.get(self._key)
            key = "tool:" + name
            d = _tool_decision(self.policy, name, int(_used(b, key)), _used(b, "tool_calls"))
            if (
                d.action == "allow"
                and guard.store.charge_in_place(  # type: ignore[attr-defined]
                    self._lines, {"tool_calls": 1, key: 1}
                ).ok
            ):
                span = Span(
                    f"{guard._prefix}-{next(guard._ids)}",
                    self.id,
                    "tool",
                    name,
                    time.time(),
                    parent_span or self.current_step_id or self.span.span_id,
                    decision="allow",
                    reason=d.reason,
                )
                with self._lock:
                    self.tool_calls += 1
                    by_name = self.tool_calls_by_name
                    by_name[name] = by_name[name] + 1 if name in by_name else 1
                return ToolCall(self, span, d)
            # anything else: the general path
        span, d, op = self._tool_call_begin(name, parent_span)
        res = None if op is None else self._charge_op(op[0], op[1], check=op[2])
        return self._tool_call_end(name, span, d, res)

    async def astart_tool_call(self, name: str, *, parent_span: str | None = None) -> ToolCall:
        """The async twin of :meth:`start_tool_call`."""
        if self._local:
            return self.start_tool_call(name, parent_span=parent_span)
        span, d, op = self._tool_call_begin(name, parent_span)
        res = None if op is None else await self.guard.store.acharge(op[0], op[1], check=op[2])
        return self._tool_call_end(name, span, d, res)

    def _tool_call_begin(
        self, name: str, parent_span: str | None
    ) -> tuple[Span, Decision, _Charge | None]:
        """A tool call up to its one store operation: the span, the decision, and the charge
        to make (``None``: the decision refuses the call)."""
        guard = self.guard
        span = Span(
            f"{guard._prefix}-{next(guard._ids)}",
            self.id,
            "tool",
            name,
            time.time(),
            parent_span or self.current_step_id or self.span.span_id,
        )
        d = self._decide_tool(name)
        if d.action == "allow" or d.action == "warn":
            lines = self._lines  # _current_lines(), without a call until a window ends
            if self._lines_until != _INF and time.time() >= self._lines_until:
                lines = self._current_lines()
            amounts: dict[str, Decimal | int] = {"tool_calls": 1, f"tool:{name}": 1}
            return span, d, (lines, amounts, d.action == "allow")  # a warning is not checked
        return span, d, None

    def _decide_tool(self, name: str) -> Decision:
        """:func:`~agentguard._decide.decide_tool_call` on the task's balance."""
        b = self._balances.get(self._key)
        return _tool_decision(
            self.policy, name, int(_used(b, "tool:" + name)), _used(b, "tool_calls")
        )

    def _tool_call_end(
        self, name: str, span: Span, d: Decision, res: ReserveResult | None
    ) -> ToolCall:
        """The rest of a tool call, given what the charge returned (``None``: not made)."""
        if res is not None:
            if res.ok:
                if self._soft:
                    self._update(res.balances)
                elif res.balances:  # (none from the embedded store: read live)
                    self._balances.update(res.balances)
            else:  # only a checked charge (``allow``) can be refused
                if res.balances:
                    self._balances.update(res.balances)
                d = self._decide_tool(name)
                if d.action == "allow":  # refused on an enclosing line the policy doesn't see
                    d = _denied_decision(res.denied, f"{name!r} tool call")
                    if self.policy.on_limit != "raise":
                        d.action = "block"
        span.decision, span.reason = d.action, d.reason
        if d.action == "stop" or d.action == "block":
            span.status = "stopped" if d.action == "stop" else "blocked"
            span.end = span.start
            self.guard._write([span])
            if d.action == "stop":
                raise self._stop(d, "tool", span)
            self._record("tool", "block", d.reason, span, limit=d.limit)
            self._blocked = d.limit or "max_tool_calls"  # the next model call is the final one
        else:
            if d.action == "warn":
                self._record("tool", "warn", d.reason, span, limit=d.limit)
            with self._lock:
                self.tool_calls += 1
                self.tool_calls_by_name[name] = self.tool_calls_by_name.get(name, 0) + 1
        return ToolCall(self, span, d)

    def record_retry(self, reason: str = "", *, parent_span: str | None = None) -> Decision:
        """A retry is about to happen. Raises :class:`BudgetExceeded` past ``max_retries``."""
        span, d, op = self._counted_begin("retry", "retries", _retry_decision, reason, parent_span)
        res = None if op is None else self._charge_op(op[0], op[1], check=op[2])
        return self._counted_end("retry", _retry_decision, span, d, res)

    async def arecord_retry(self, reason: str = "", *, parent_span: str | None = None) -> Decision:
        """The async twin of :meth:`record_retry`."""
        if self._local:
            return self.record_retry(reason, parent_span=parent_span)
        span, d, op = self._counted_begin("retry", "retries", _retry_decision, reason, parent_span)
        res = None if op is None else await self.guard.store.acharge(op[0], op[1], check=op[2])
        return self._counted_end("retry", _retry_decision, span, d, res)

    def step(self, name: str = "step", *, parent_span: str | None = None) -> Decision:
        """An agent or graph step begins. Past ``max_steps``: ``finish`` is returned under
        ``on_limit="finish"``, otherwise :class:`BudgetExceeded` is raised."""
        guard = self.guard
        if self._lanes and guard.sink.__class__ is _NULL_SINK:  # see _fast
            # an allowed step in one function
            d = _step_decision(self.policy, _used(self._balances.get(self._key), "steps"))
            if d.action == "allow" and guard.store.charge_in_place(self._lines, _ONE_STEP).ok:  # type: ignore[attr-defined]
                with self._lock:
                    self.steps += 1
                    self.current_step_id = f"{guard._prefix}-{next(guard._ids)}"
                return d
            # anything else (a cap, a refusal that changed nothing): the general path
        span, d, op = self._counted_begin("step", "steps", _step_decision, name, parent_span)
        res = None if op is None else self._charge_op(op[0], op[1], check=op[2])
        return self._counted_end("step", _step_decision, span, d, res)

    def _fast(self) -> bool:
        """Whether an event may take its fast lane: one function for the usual case — allowed,
        on the embedded store (in place), nothing to trace (a ``NullSink``), no soft limit to
        watch, no budget window to roll. The lane makes the general path's decision with the
        same pure function and, when it allows, the same store operation and bookkeeping;
        anything else (a cap reached, a refusal, a warning) goes the general way
        (``tests/test_fast_lanes.py`` holds the two to the same results)."""
        return self._lanes and self.guard.sink.__class__ is _NULL_SINK

    async def astep(self, name: str = "step", *, parent_span: str | None = None) -> Decision:
        """The async twin of :meth:`step`."""
        if self._local:
            return self.step(name, parent_span=parent_span)
        span, d, op = self._counted_begin("step", "steps", _step_decision, name, parent_span)
        res = None if op is None else await self.guard.store.acharge(op[0], op[1], check=op[2])
        return self._counted_end("step", _step_decision, span, d, res)

    def _counted_begin(
        self, kind: str, counter: str, decide: Any, name: str, parent_span: str | None
    ) -> tuple[_Counted, Decision, _Charge | None]:
        """A step or retry up to its one store operation: its span's id, name, start and
        parent (the span itself is built only when it is written or recorded), the decision,
        and the charge to make (``None``: the decision refuses it)."""
        guard = self.guard
        ident = (
            f"{guard._prefix}-{next(guard._ids)}",
            name or kind,
            time.time(),
            (parent_span or self.current_step_id or self.span.span_id)
            if kind != "step"
            else (parent_span or self.span.span_id),
        )
        d: Decision = decide(self.policy, _used(self._balances.get(self._key), counter))
        if d.action == "allow" or d.action == "warn":
            lines = self._lines  # _current_lines(), without a call until a window ends
            if self._lines_until != _INF and time.time() >= self._lines_until:
                lines = self._current_lines()
            return ident, d, (lines, {counter: 1}, d.action == "allow")
        return ident, d, None

    def _counted_end(
        self, kind: str, decide: Any, ident: _Counted, d: Decision, res: ReserveResult | None
    ) -> Decision:
        """The rest of a step or retry, given what the charge returned (``None``: not made)."""
        if res is not None:
            if res.ok:
                if self._soft:
                    self._update(res.balances)
                elif res.balances:  # (none from the embedded store: read live)
                    self._balances.update(res.balances)
            else:
                if res.balances:
                    self._balances.update(res.balances)
                counter = "retries" if kind == "retry" else "steps"
                d = decide(self.policy, _used(self._balances.get(self._key), counter))
                if d.action == "allow":
                    d = _denied_decision(res.denied, kind)
        if d.action == "allow" or d.action == "warn":
            with self._lock:
                if kind == "retry":
                    self.retries += 1
                else:
                    self.steps += 1
                    self.current_step_id = ident[0]
        guard = self.guard
        if d.action == "allow" and guard.sink.__class__ is _NULL_SINK:
            return d  # no span to write, no decision to record
        span = Span(ident[0], self.id, kind, ident[1], ident[2], ident[3])  # type: ignore[arg-type]
        span.decision, span.reason = d.action, d.reason
        span.end = span.start
        if d.action == "stop":
            span.status = "stopped"
            self.guard._write([span])
            raise self._stop(d, kind, span)
        if d.action == "finish" or d.action == "warn":
            if d.action == "finish":
                self.finished = True
                self.limit_hit = self.limit_hit or d.limit
            self._record(kind, d.action, d.reason, span, limit=d.limit)
        if guard.sink.__class__ is not _NULL_SINK:
            guard._write([span])
        return d

    def record_retrieval(
        self,
        name: str = "retriever",
        *,
        documents: int,
        tokens: int | None = None,
        texts: Sequence[str] | None = None,
        model: str | None = None,
        parent_span: str | None = None,
    ) -> Span:
        """A retriever returned ``documents`` chunks (counted from ``texts`` if given)."""
        if tokens is None and texts is not None:
            counter = self.guard._counter(model)
            tokens = sum(counter.count(t) for t in texts)
        now = time.time()
        span = Span(
            span_id=self.guard._next_id(),
            task_id=self.id,
            kind="retrieval",
            name=name,
            start=now,
            end=now,
            parent_id=self._parent_span_id(parent_span),
            attrs={"documents": documents, "tokens": tokens},
        )
        self.guard._write([span])
        return span

    def trim(
        self,
        chunks: Sequence[Chunk | str],
        budget_tokens: int | None = None,
        *,
        model: str | None = None,
        keep_order: bool = False,
        parent_span: str | None = None,
        **options: Any,
    ) -> TrimResult:
        """Fit retrieved chunks into ``budget_tokens`` (default: the policy's
        ``context_budget_tokens``); records tokens and dollars saved.

        Example:
            >>> import agentguard as ag
            >>> g = ag.Guard(ag.Policy(context_budget_tokens=5), traces=False)
            >>> with g.task() as t:
            ...     r = t.trim(["A short one.", "Another chunk that is long enough to drop."])
            >>> [c.text for c in r.kept]
            ['A short one.']
        """
        from agentguard._trim import trim_chunks

        budget = budget_tokens if budget_tokens is not None else self.policy.context_budget_tokens
        if budget is None:
            raise PolicyError(
                "context_budget_tokens",
                None,
                "set it in the policy or pass budget_tokens= to trim()",
            )
        start = time.time()
        result = trim_chunks(
            chunks, budget, self.guard._counter(model), keep_order=keep_order, **options
        )
        saved_usd: Decimal | None = None
        rates = self.guard._rates(model) if model else None
        if rates is not None:
            saved_usd = rates.input * result.tokens_saved
        span = Span(
            span_id=self.guard._next_id(),
            task_id=self.id,
            kind="trim",
            name="trim",
            start=start,
            end=time.time(),
            parent_id=self._parent_span_id(parent_span),
            decision="trim",
            model=model,
            attrs={
                "budget_tokens": budget,
                "tokens_in": result.tokens_in,
                "tokens_kept": result.tokens_kept,
                "tokens_saved": result.tokens_saved,
                "saved_usd": saved_usd,
                "chunks_in": len(chunks),
                "chunks_kept": len(result.kept),
                "estimated": result.tokens_in_estimated,
            },
        )
        with self._lock:
            self.tokens_saved += result.tokens_saved
            if saved_usd is not None:
                self.saved_usd += saved_usd
        if result.tokens_saved:
            self._record(
                "trim",
                "trim",
                f"kept {result.tokens_kept} of {result.tokens_in} context tokens "
                f"({len(result.kept)}/{len(chunks)} chunks)",
                span,
                model=model,
            )
        self.guard._write([span])
        return result

    # -- closing ----------------------------------------------------------------------------

    def close(self, exc: BaseException | None = None) -> None:
        """End the task (for tasks from :meth:`Guard.open_task`): release anything still
        reserved, write its record. ``exc`` is the error that ended the run, if any.
        Closing twice does nothing."""
        if self.ended is None:
            self._close(exc)

    async def aclose(self, exc: BaseException | None = None) -> None:
        """The async twin of :meth:`close`."""
        if self.ended is None:
            await self._aclose(exc)

    def _close(self, exc: BaseException | None) -> None:
        if self._open:
            drive(self._close_steps(exc))
        else:  # nothing to release: no store operation, no steps to drive
            gone = self._closed(exc)
            if gone:
                drive(_retire_steps(gone))

    async def _aclose(self, exc: BaseException | None) -> None:
        if self._open:
            await adrive(self._close_steps(exc))
        else:
            gone = self._closed(exc)
            if gone:
                await adrive(_retire_steps(gone))

    def _close_steps(self, exc: BaseException | None) -> Steps[None]:
        with self._lock:
            leftovers = list(self._open.values())
        for call in leftovers:  # a call that never ended must not hold budget forever
            yield from call._fail_steps(RuntimeError("task closed while the call was open"))
        gone = self._closed(exc)
        if gone:
            yield from _retire_steps(gone)

    def _closed(self, exc: BaseException | None) -> list[Task]:
        """The task's status, span and record, once no call of it holds budget. Returns the
        tasks whose lines can go from a store other than the embedded one (this one, its
        parent: see :meth:`_retire`), for the caller to retire with the store's I/O."""
        self.ended = time.time()
        if isinstance(exc, BudgetExceeded):
            self.status = "stopped"
            self.limit_hit = self.limit_hit or exc.limit
        elif exc is not None:
            self.status = "error"
        else:
            self.status = "finished" if self.finished else "ok"
        usage = self.usage
        self.span.end = self.ended
        self.span.status = self.status
        self.span.usage = usage
        self.span.cost_usd = self.cost_usd
        gone: list[Task] = []
        parent = self.parent
        if parent is not None:
            with parent._lock:
                parent._children -= 1
                last = not parent._children and parent.ended is not None
            if last and parent._retires:  # the parent closed first (its line waited for this)
                gone.append(parent)
        if self._retires:
            with self._lock:
                if not self._children:
                    gone.append(self)
        if gone:
            remote = []
            for task in gone:  # each on its own guard's store (a parent may have another)
                if task._local:
                    task._retire()  # the embedded store: in place, no I/O
                else:
                    remote.append(task)  # through the store's I/O, by the caller
            gone = remote
        guard = self.guard
        if guard.sink.__class__ is _NULL_SINK:  # traces off: no span or record to build
            return gone
        counts: dict[str, int] = {}
        for rec in self.decisions:
            counts[rec.action] = counts.get(rec.action, 0) + 1
        guard._write([self.span])
        guard._write_task(
            TaskRecord(
                task_id=self.id,
                parent_id=self.parent.id if self.parent else None,
                start=self.started,
                end=self.ended,
                status=self.status,
                tags=dict(self.tags),
                usage=usage,
                cost_usd=self.cost_usd,
                model_calls=self.model_calls,
                tool_calls=self.tool_calls,
                retries=self.retries,
                steps=self.steps,
                decisions=counts,
                saved_usd=self.saved_usd,
                tokens_saved=self.tokens_saved,
                limit_hit=self.limit_hit,
            )
        )
        return gone

    def _retire(self) -> None:
        """Drop the task's own line from the embedded store: nothing will charge it again —
        the task is closed, so are its children, and its id was made up (``task_id=None``, a
        handler's run id, an adapter's child id: ``_retires``) — and an always-on process
        opening a task per run must not keep a balance per run. The task keeps reading the
        line's last balance (``spent``, its children's included). A named task's line stays:
        the same id continues its budget. Other stores: :func:`_retire_steps`."""
        store: MemoryStore = self.guard.store  # type: ignore[assignment]
        kept = store.retire(self._key)
        if kept is None:  # retired already, or held by a reservation
            return
        self._balances = ChainMap({self._key: kept}, store.live)  # type: ignore[arg-type]
        # An event after the close (unusual, but not refused) must find the line as it was:
        # the fast lanes are closed and the general path's first store operation (or a paid
        # tool's charge, or a new child) puts the line back first (_put_back).
        self._kept = kept
        self._lanes = False
        self._reserve_op = self._reserve_after_close
        self._commit_op = self._commit_after_close
        self._charge_op = self._charge_after_close

    def _reserve_after_close(self, *args: Any, **kwargs: Any) -> Any:
        self._put_back()
        return self._reserve_op(*args, **kwargs)

    def _commit_after_close(self, *args: Any, **kwargs: Any) -> Any:
        self._put_back()
        return self._commit_op(*args, **kwargs)

    def _charge_after_close(self, *args: Any, **kwargs: Any) -> Any:
        self._put_back()
        return self._charge_op(*args, **kwargs)

    def _put_back(self) -> None:
        """Undo :meth:`_retire`: the line back in the embedded store with its balance, the
        task's operations and lanes as they were (its id, policy and lines are the same)."""
        with self._lock:
            kept = self._kept
            if kept is None:  # put back already (another thread's event)
                return
            store: MemoryStore = self.guard.store  # type: ignore[assignment]
            store.restore(self._key, kept)
            self._balances = store.live  # type: ignore[assignment]
            self._reserve_op = store.reserve_in_place
            self._commit_op = store.commit_in_place
            self._charge_op = store.charge_in_place
            self._lanes = not self._soft and self._lines_until == _INF
            self._kept = None

    def __repr__(self) -> str:
        return (
            f"Task(id={self.id!r}, cost_usd={self.cost_usd}, model_calls={self.model_calls}, "
            f"status={self.status!r})"
        )


def _retire_steps(tasks: list[Task]) -> Steps[None]:
    """Retire the lines of closed ``tasks`` (see :meth:`Task._retire`) from a store other than
    the embedded one, where it is I/O (RedisStore sets them to expire): best effort — a store
    without ``retire`` keeps them, and an error keeps the line and never fails the close. The
    task keeps the balance the store hands back (its children's spend included) and stops
    reading its line."""
    for task in tasks:
        store = task.guard.store
        # (a subclass of the embedded store, e.g. LoopCheckingStore, would drop the line at
        # once, and an event after the close could not put it back on the async path: it keeps
        # its lines, as before; Redis lets a retired line expire later)
        if not hasattr(store, "retire") or isinstance(store, MemoryStore):
            continue
        try:
            kept = yield (store, "retire", (task._key,), _NO_KW)
        except Exception as exc:  # housekeeping must not fail the close
            _logger().warning("agentguard.retire_failed", key=task._key, error=repr(exc))
            continue
        if kept is not None:
            task._balances[task._key] = kept
            task._gone = True


@dataclass(slots=True)
class ModelCall:
    """A model call in flight. Bind ``model`` and ``max_tokens``; then ``end`` or ``fail``."""

    task: Task
    span: Span
    decision: Decision
    lines: Sequence[BudgetLine]
    reservation_id: str | None
    input_estimate: int
    input_counted: int
    rates: ModelRates | None
    amounts: Mapping[str, Decimal | int] = field(default_factory=dict)
    done: bool = False

    @property
    def model(self) -> str:
        """The model to call (the requested one, or the ladder's cheaper rung)."""
        return self.decision.model or self.span.model or self.span.name

    @property
    def max_tokens(self) -> int | None:
        """The output cap to bind on the call (``None``: no cap applies)."""
        return self.decision.max_tokens

    def end(
        self,
        usage: Usage | Mapping[str, Any] | Any | None = None,
        *,
        output_text: str | None = None,
        model: str | None = None,
    ) -> Decimal | None:
        """The call finished. ``usage`` as reported (any shape :meth:`Usage.parse` knows);
        when it is missing, the usage is estimated from the input count and ``output_text``
        and marked ``estimated``. Returns the call's cost (``None`` if unpriced)."""
        if self.done:
            return self.span.cost_usd
        task = self.task
        span = self.span
        rates = self.rates
        rid = self.reservation_id
        if (
            type(usage) is Usage
            and not usage.estimated
            and rates is not None
            and rid is not None
            and (model is None or model == span.model)
            and "requested_model" not in span.attrs
            and task._lanes
            and task.guard.sink.__class__ is _NULL_SINK
            and not task.guard.capture_content
        ):  # see Task._fast
            # a priced, reserved call ending as reported, in one function (see Task._fast): the
            # general path's cost, commit and bookkeeping; a call that cost more than it
            # reserved takes the general path (the overspend is recorded there)
            priced = rates.cost(usage)
            reserved = self.decision.reserve_usd
            if reserved is None or priced <= reserved:
                task.guard.store.commit_in_place(  # type: ignore[attr-defined]
                    rid,
                    self.lines,
                    {
                        "model_calls": 1,
                        "input_tokens": usage.input_tokens,
                        "output_tokens": usage.output_tokens,
                        "tokens": usage.input_tokens + usage.output_tokens,
                        "cost_usd": priced,
                    },
                )
                self.done = True
                with task._lock:
                    task._open.pop(rid, None)
                    tu = task._usage
                    tu[0] += usage.input_tokens
                    tu[1] += usage.output_tokens
                    tu[2] += usage.cache_read_tokens
                    tu[3] += usage.cache_write_tokens
                    tu[4] += usage.reasoning_tokens
                    task.model_calls += 1
                    task.priced_cost_usd += priced
                span.end = time.time()
                span.usage = usage
                span.cost_usd = priced
                return priced
        u, cost, actual = self._end_begin(usage, output_text, model)
        if self.reservation_id is not None:
            balances = task._commit_op(self.reservation_id, self.lines, actual)
        else:  # an unreserved call: its spend is recorded as it is
            balances = task._charge_op(self.lines, actual, check=False).balances
        return self._end_finish(u, cost, output_text, model, balances)

    async def aend(
        self,
        usage: Usage | Mapping[str, Any] | Any | None = None,
        *,
        output_text: str | None = None,
        model: str | None = None,
    ) -> Decimal | None:
        """The async twin of :meth:`end`: the commit awaits the store."""
        if self.task._local:
            return self.end(usage, output_text=output_text, model=model)
        if self.done:
            return self.span.cost_usd
        u, cost, actual = self._end_begin(usage, output_text, model)
        store = self.task.guard.store
        if self.reservation_id is not None:
            balances = await store.acommit(self.reservation_id, self.lines, actual)
        else:
            balances = (await store.acharge(self.lines, actual, check=False)).balances
        return self._end_finish(u, cost, output_text, model, balances)

    def _end_begin(
        self,
        usage: Usage | Mapping[str, Any] | Any | None,
        output_text: str | None,
        model: str | None,
    ) -> tuple[Usage, Decimal | None, dict[str, Decimal | int]]:
        """The end of a call up to its one store operation: the usage, its cost and the
        actual amounts to commit (or charge, for an unreserved call)."""
        task = self.task
        guard = task.guard
        decision = self.decision
        span = self.span
        if type(usage) is Usage:  # already valid: Usage.parse would return it as it is
            u = usage
        elif usage is None:
            out = 0
            if output_text:
                out = guard._counter(self.model).count(output_text)
            u = Usage(self.input_counted, out, estimated=True)
        else:
            try:
                u = Usage.parse(usage)
            except InvalidUsage as exc:
                # Never sum a corrupt record, never lose the spend: charge the call's upper
                # bound (its input estimate and the output cap it ran under), marked estimated.
                out = self.decision.max_tokens or 0
                if output_text:
                    out = guard._counter(self.model).count(output_text)
                u = Usage(self.input_counted, out, estimated=True)
                self.span.attrs["invalid_usage"] = str(exc)
                _logger().error(
                    "agentguard.invalid_usage", task_id=task.id, model=self.model, error=str(exc)
                )
        rates = self.rates
        if model is not None and model != (decision.model or span.model or span.name):
            rates = guard.prices.rates(model) or rates
        cost = rates.cost(u) if rates is not None else None
        actual: dict[str, Decimal | int] = {
            "model_calls": 1,
            "input_tokens": u.input_tokens,
            "output_tokens": u.output_tokens,
            "tokens": u.input_tokens + u.output_tokens,
        }
        if cost is not None:
            actual["cost_usd"] = cost
        return u, cost, actual

    def _end_finish(
        self,
        u: Usage,
        cost: Decimal | None,
        output_text: str | None,
        model: str | None,
        balances: Mapping[str, Balance],
    ) -> Decimal | None:
        """The rest of the end of a call, given the balances its commit returned."""
        task = self.task
        guard = task.guard
        span = self.span
        reserved = self.decision.reserve_usd
        self.done = True
        with task._lock:
            task._open.pop(self.reservation_id or "", None)
            tu = task._usage
            tu[0] += u.input_tokens
            tu[1] += u.output_tokens
            tu[2] += u.cache_read_tokens
            tu[3] += u.cache_write_tokens
            tu[4] += u.reasoning_tokens
            tu[5] += u.estimated
            task.model_calls += 1
            if cost is None:
                task.unpriced_calls += 1
            else:
                task.priced_cost_usd += cost
        attrs = span.attrs
        if "requested_model" in attrs:  # a downgraded call: what it saved
            saved = self._downgrade_saving(u, cost)
            if saved is not None:
                attrs["saved_usd"] = saved
                with task._lock:
                    task.saved_usd += saved
        if task._soft:
            task._update(balances)
        elif balances:  # (none from the embedded store: read live)
            task._balances.update(balances)
        span.end = time.time()
        span.usage = u
        span.cost_usd = cost
        if output_text is not None and guard.capture_content:
            span.attrs["completion"] = output_text
        if u.estimated:
            span.attrs["estimated"] = True
        if model is not None and model != span.model:
            span.attrs["reported_model"] = model
        if reserved is not None and cost is not None and cost > reserved:
            span.attrs["over_reservation"] = True
            task.overspent = True
            task._record(
                "overspend",
                "warn",
                f"the provider reported ${cost}, above the ${reserved} reserved",
                span,
                model=self.model,
            )
        if guard.sink.__class__ is not _NULL_SINK:
            guard._write([span])
        return cost

    def _downgrade_saving(self, u: Usage, cost: Decimal | None) -> Decimal | None:
        """What the same tokens would have cost on the model that was asked for."""
        requested = self.span.attrs.get("requested_model")
        if requested is None or cost is None:
            return None
        asked = self.task._rate_maps.get(requested, {}).get(requested)
        if asked is None:
            return None
        return asked.cost(u) - cost

    def fail(self, error: BaseException | None = None) -> None:
        """The call failed: release the reservation and record the error."""
        drive(self._fail_steps(error))

    async def afail(self, error: BaseException | None = None) -> None:
        """The async twin of :meth:`fail`: the release awaits the store."""
        await adrive(self._fail_steps(error))

    def _fail_steps(self, error: BaseException | None) -> Steps[None]:
        if self.done:
            return
        self.done = True
        task = self.task
        if self.reservation_id is not None:
            yield (self.task.guard.store, "release", (self.reservation_id,), _NO_KW)
            yield from task._refresh_steps()
        with task._lock:
            task._open.pop(self.reservation_id or "", None)
        self.span.end = time.time()
        self.span.status = "error"
        if error is not None:
            self.span.attrs["error"] = type(error).__name__
        task.guard._write([self.span])


@dataclass(slots=True)
class ToolCall:
    """A tool call in flight."""

    task: Task
    span: Span
    decision: Decision
    done: bool = False

    @property
    def allowed(self) -> bool:
        return self.decision.proceeds

    def end(self, *, cost_usd: Decimal | None = None) -> None:
        """The tool finished. ``cost_usd`` for paid tools (search APIs...), if known."""
        if cost_usd is None:  # nothing to charge: no store operation, no steps to drive
            self._end_unpaid()
        else:
            drive(self._end_steps(cost_usd))

    async def aend(self, *, cost_usd: Decimal | None = None) -> None:
        """The async twin of :meth:`end` (a paid tool's cost is charged with the store's
        async methods)."""
        if cost_usd is None:
            self._end_unpaid()
        else:
            await adrive(self._end_steps(cost_usd))

    def _end_unpaid(self) -> None:
        if self.done:
            return
        self.done = True
        self.span.end = time.time()
        guard = self.task.guard
        if guard.sink.__class__ is not _NULL_SINK:
            guard._write([self.span])

    def _end_steps(self, cost_usd: Decimal) -> Steps[None]:
        """A paid tool finished: charge its cost (what :meth:`_end_unpaid` does, plus that)."""
        if self.done:
            return
        self.done = True
        self.span.end = time.time()
        self.span.cost_usd = cost_usd
        task = self.task
        if task._kept is not None:  # the task closed and its line was retired
            task._put_back()
        lines = task._current_lines()
        res = yield (task.guard.store, "charge", (lines, {"cost_usd": cost_usd}), _NO_CHECK)
        with task._lock:
            task.priced_cost_usd += cost_usd
        task._update(res.balances)
        task.guard._write([self.span])

    def fail(self, error: BaseException | None = None) -> None:
        """The tool raised."""
        if self.done:
            return
        self.done = True
        self.span.end = time.time()
        self.span.status = "error"
        if error is not None:
            self.span.attrs["error"] = type(error).__name__
        self.task.guard._write([self.span])

    async def afail(self, error: BaseException | None = None) -> None:
        """The async twin of :meth:`fail` (no store I/O: here for symmetry)."""
        self.fail(error)


def _message_texts(messages: Sequence[Any]) -> list[dict[str, str]]:
    """Role and text of each message, for traces that opted in to content capture."""
    out = []
    for m in messages:
        if isinstance(m, Mapping):
            role, content = m.get("role", ""), m.get("content", "")
        else:
            role = getattr(m, "type", None) or getattr(m, "role", "")
            content = getattr(m, "content", "")
        if not isinstance(content, str):
            content = " ".join(
                b.get("text", "") if isinstance(b, Mapping) else str(b) for b in content
            )
        out.append({"role": str(role), "content": content})
    return out


_COUNTER_LIMITS = {
    "cost_usd": "max_cost_usd",
    "tokens": "max_total_tokens",
    "input_tokens": "max_input_tokens",
    "output_tokens": "max_total_output_tokens",
    "model_calls": "max_model_calls",
    "tool_calls": "max_tool_calls",
    "retries": "max_retries",
    "steps": "max_steps",
}


def _denied_decision(denied: Denied | None, what: str) -> Decision:
    """A stop for a reservation the store kept refusing, naming the line that refused it
    (e.g. a parent task's or a team's counter the task's own policy does not see)."""
    if denied is None:  # pragma: no cover - a refusal always says why
        return Decision("stop", reason=f"the {what} was refused by the budget store")
    counter = denied.counter
    limit = _COUNTER_LIMITS.get(counter)
    if limit is None and counter.startswith("tool:"):
        limit = f"tool_limits.{counter[5:]}"
    return Decision(
        "stop",
        reason=(
            f"the {what} was refused on {denied.key}: {counter} at {denied.used} of "
            f"{denied.limit}, {denied.requested} more requested"
        ),
        limit=limit or counter,
        limit_value=denied.limit,
        actual=denied.used + denied.requested,
        budget=denied.key,
    )
