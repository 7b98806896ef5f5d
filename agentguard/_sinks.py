"""Trace sinks (SQLite, JSONL, memory, fan-out) and the SQLite reader behind the CLI.

* :class:`SQLiteSink` — the embedded default: one file, WAL journal, batched writes. Each batch is
  one transaction, so after a crash of the writing process (even ``kill -9``) every committed
  batch is intact and readable; only spans still in the in-memory buffer are lost.
* :class:`JSONLSink` — one JSON object per line, appended and flushed per batch.
* :class:`MemorySink` — lists in memory, for tests and ``agentguard.testing``.
* :class:`NullSink` — drops everything (traces disabled).
* :class:`MultiSink` — fans out to several sinks.
* :func:`open_sink` — turns a user's ``trace=`` setting into a sink.
* :class:`SQLiteTraceReader` — queries a trace database (tasks, spans, exact totals).

Money is stored exactly: ``Decimal`` as TEXT in SQLite and as strings in JSON, summed in Python
with ``Decimal``; an unknown cost stays ``NULL`` / ``None``, never ``0``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import IO, Any, Literal

from agentguard._errors import AgentGuardError
from agentguard._trace import Span, TaskRecord, TraceSink, _attrs_from_json
from agentguard._usage import Usage

__all__ = [
    "DEFAULT_DB",
    "SCHEMA_VERSION",
    "JSONLSink",
    "MemorySink",
    "MultiSink",
    "NullSink",
    "SQLiteSink",
    "SQLiteTraceReader",
    "TraceStoreError",
    "open_sink",
    "read_jsonl",
]

#: The trace database used when nothing else is configured (``AGENTGUARD_DB`` overrides it).
DEFAULT_DB = "agentguard.db"

#: Version of the SQLite schema written by this module (``meta.schema_version``).
SCHEMA_VERSION = 1

_TAG_COLUMNS = ("feature", "team", "env")
_TOKEN_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
)


class TraceStoreError(AgentGuardError):
    """A trace database is missing, unreadable, or written by an incompatible version."""

    code = "trace_store_error"


# -- SQLite schema ---------------------------------------------------------------------------

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tasks (
    task_id            TEXT PRIMARY KEY,
    parent_id          TEXT,
    start_time         REAL NOT NULL,
    end_time           REAL,
    status             TEXT NOT NULL,
    feature            TEXT,
    team               TEXT,
    env                TEXT,
    tags               TEXT NOT NULL,          -- JSON object
    input_tokens       INTEGER NOT NULL,
    output_tokens      INTEGER NOT NULL,
    cache_read_tokens  INTEGER NOT NULL,
    cache_write_tokens INTEGER NOT NULL,
    reasoning_tokens   INTEGER NOT NULL,
    usage_estimated    INTEGER NOT NULL,
    cost_usd           TEXT,                   -- exact Decimal; NULL = unknown
    model_calls        INTEGER NOT NULL,
    tool_calls         INTEGER NOT NULL,
    retries            INTEGER NOT NULL,
    steps              INTEGER NOT NULL,
    decisions          TEXT NOT NULL,          -- JSON object kind -> count
    saved_usd          TEXT NOT NULL,          -- exact Decimal
    tokens_saved       INTEGER NOT NULL,
    limit_hit          TEXT
);
CREATE INDEX IF NOT EXISTS tasks_start   ON tasks (start_time);
CREATE INDEX IF NOT EXISTS tasks_parent  ON tasks (parent_id);
CREATE INDEX IF NOT EXISTS tasks_feature ON tasks (feature, start_time);
CREATE INDEX IF NOT EXISTS tasks_team    ON tasks (team, start_time);
CREATE INDEX IF NOT EXISTS tasks_env     ON tasks (env, start_time);
CREATE TABLE IF NOT EXISTS spans (
    span_id            TEXT PRIMARY KEY,
    task_id            TEXT NOT NULL,
    parent_id          TEXT,
    kind               TEXT NOT NULL,
    name               TEXT NOT NULL,
    start_time         REAL NOT NULL,
    end_time           REAL,
    status             TEXT NOT NULL,
    model              TEXT,
    input_tokens       INTEGER,                -- all token columns NULL = no usage
    output_tokens      INTEGER,
    cache_read_tokens  INTEGER,
    cache_write_tokens INTEGER,
    reasoning_tokens   INTEGER,
    usage_estimated    INTEGER,
    cost_usd           TEXT,                   -- exact Decimal; NULL = unknown
    decision           TEXT,
    reason             TEXT,
    attrs              TEXT NOT NULL           -- JSON object
);
CREATE INDEX IF NOT EXISTS spans_task  ON spans (task_id, start_time);
CREATE INDEX IF NOT EXISTS spans_start ON spans (start_time);
INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', '{SCHEMA_VERSION}');
"""

_SPAN_COLUMNS = (
    "span_id, task_id, parent_id, kind, name, start_time, end_time, status, model, "
    "input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, reasoning_tokens, "
    "usage_estimated, cost_usd, decision, reason, attrs"
)
_INSERT_SPAN = f"INSERT OR REPLACE INTO spans ({_SPAN_COLUMNS}) VALUES ({', '.join('?' * 19)})"

_TASK_COLUMNS = (
    "task_id, parent_id, start_time, end_time, status, feature, team, env, tags, "
    "input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, reasoning_tokens, "
    "usage_estimated, cost_usd, model_calls, tool_calls, retries, steps, decisions, saved_usd, "
    "tokens_saved, limit_hit"
)
_INSERT_TASK = f"INSERT OR REPLACE INTO tasks ({_TASK_COLUMNS}) VALUES ({', '.join('?' * 24)})"


def _json_default(value: Any) -> Any:
    # Only called for values json cannot encode itself: money as exact strings, the rest readable.
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, Usage):
        return value.as_dict()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=_json_default).encode


def _span_row(s: Span) -> tuple[Any, ...]:
    u = s.usage
    return (
        s.span_id,
        s.task_id,
        s.parent_id,
        s.kind,
        s.name,
        s.start,
        s.end,
        s.status,
        s.model,
        None if u is None else u.input_tokens,
        None if u is None else u.output_tokens,
        None if u is None else u.cache_read_tokens,
        None if u is None else u.cache_write_tokens,
        None if u is None else u.reasoning_tokens,
        None if u is None else int(u.estimated),
        None if s.cost_usd is None else str(s.cost_usd),
        s.decision,
        s.reason,
        _dumps(s.attrs) if s.attrs else "{}",
    )


def _task_row(r: TaskRecord) -> tuple[Any, ...]:
    u = r.usage
    tags = r.tags
    return (
        r.task_id,
        r.parent_id,
        r.start,
        r.end,
        r.status,
        tags.get("feature"),
        tags.get("team"),
        tags.get("env"),
        _dumps(tags),
        u.input_tokens,
        u.output_tokens,
        u.cache_read_tokens,
        u.cache_write_tokens,
        u.reasoning_tokens,
        int(u.estimated),
        None if r.cost_usd is None else str(r.cost_usd),
        r.model_calls,
        r.tool_calls,
        r.retries,
        r.steps,
        _dumps(r.decisions),
        str(r.saved_usd),
        r.tokens_saved,
        r.limit_hit,
    )


def _span_from_row(row: sqlite3.Row) -> Span:
    usage = None
    if row["input_tokens"] is not None:
        usage = Usage(
            *(row[k] for k in _TOKEN_FIELDS), estimated=bool(row["usage_estimated"]), per_call=False
        )
    attrs = row["attrs"]
    return Span(
        span_id=row["span_id"],
        task_id=row["task_id"],
        kind=row["kind"],
        name=row["name"],
        start=row["start_time"],
        parent_id=row["parent_id"],
        end=row["end_time"],
        status=row["status"],
        model=row["model"],
        usage=usage,
        cost_usd=None if row["cost_usd"] is None else Decimal(row["cost_usd"]),
        decision=row["decision"],
        reason=row["reason"],
        attrs=_attrs_from_json(json.loads(attrs)) if attrs != "{}" else {},
    )


def _task_from_row(row: sqlite3.Row) -> TaskRecord:
    return TaskRecord(
        task_id=row["task_id"],
        parent_id=row["parent_id"],
        start=row["start_time"],
        end=row["end_time"],
        status=row["status"],
        tags={str(k): str(v) for k, v in json.loads(row["tags"]).items()},
        usage=Usage(
            *(row[k] for k in _TOKEN_FIELDS), estimated=bool(row["usage_estimated"]), per_call=False
        ),
        cost_usd=None if row["cost_usd"] is None else Decimal(row["cost_usd"]),
        model_calls=row["model_calls"],
        tool_calls=row["tool_calls"],
        retries=row["retries"],
        steps=row["steps"],
        decisions={str(k): int(v) for k, v in json.loads(row["decisions"]).items()},
        saved_usd=Decimal(row["saved_usd"]),
        tokens_saved=row["tokens_saved"],
        limit_hit=row["limit_hit"],
    )


def _connect(path: str, *, timeout: float = 30.0) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(path, timeout=timeout, check_same_thread=False, isolation_level=None)
    except sqlite3.Error as e:
        raise TraceStoreError(f"cannot open trace database {path!r}: {e}") from e
    conn.row_factory = sqlite3.Row
    return conn


def _check_version(conn: sqlite3.Connection, path: str) -> None:
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.DatabaseError as e:
        raise TraceStoreError(f"{path!r} is not an agentguard trace database: {e}") from e
    if row is None:
        raise TraceStoreError(f"{path!r} is not an agentguard trace database (no schema version)")
    try:
        version = int(row[0])
    except ValueError:
        version = -1
    if version != SCHEMA_VERSION:
        raise TraceStoreError(
            f"trace database {path!r} has schema version {row[0]!r}; this agentguard reads and "
            f"writes version {SCHEMA_VERSION} (upgrade agentguard or use a new --db file)"
        )


# -- SQLiteSink ------------------------------------------------------------------------------


class _SQLiteWriter:
    """The state of a :class:`SQLiteSink`, kept apart so a finalizer can flush it.

    ``buf_lock`` guards the buffers (held for microseconds by writers); ``io_lock`` serialises
    flushes so batches commit in the order they were buffered. Task records wait in ``tasks``
    and are committed in the same transaction as every span buffered before them.
    """

    def __init__(self, path: str, batch_size: int, flush_interval: float, max_buffer: int) -> None:
        self.path = path
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.max_buffer = max_buffer
        self.dropped = 0
        self.buf: list[Span] = []
        self.tasks: list[TaskRecord] = []
        self.buf_lock = threading.Lock()
        self.io_lock = threading.Lock()
        self.last_flush = time.monotonic()
        self.closed = False
        self.conn: sqlite3.Connection | None = self._open()
        self.wake = threading.Event()
        self.thread: threading.Thread | None = None
        self.errors = 0
        self.last_error: TraceStoreError | None = None
        # a background failure not yet reported to a caller (raised by the next write_task)
        self.unreported: TraceStoreError | None = None
        _WRITERS.add(self)

    def ensure_thread(self) -> None:
        """Start the background flusher (lazily; again in a forked child)."""
        if self.thread is None and not self.closed:
            with self.buf_lock:
                if self.thread is None:
                    self.thread = threading.Thread(
                        target=self._run, name=f"agentguard-sqlite:{self.path}", daemon=True
                    )
                    self.thread.start()

    def _run(self) -> None:
        # Holds the writer, never the sink, so the sink can still be collected and finalized.
        while not self.closed:
            woken = self.wake.wait(self.flush_interval)
            self.wake.clear()
            if woken and len(self.buf) < self.batch_size and len(self.tasks) < self.batch_size:
                # woken by a task record: gather what the next few milliseconds bring into the
                # same transaction (a commit costs far more than a row)
                time.sleep(_TASK_LINGER)
            if self.closed:
                return
            try:
                self.flush()
            except TraceStoreError as e:  # kept buffered; reported by the next caller
                self.errors += 1
                self.last_error = self.unreported = e

    def _open(self) -> sqlite3.Connection:
        conn = _connect(self.path)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(f"BEGIN IMMEDIATE;\n{_SCHEMA}\nCOMMIT;")
            _check_version(conn, self.path)
        except sqlite3.DatabaseError as e:
            conn.close()
            raise TraceStoreError(f"cannot use {self.path!r} as a trace database: {e}") from e
        except TraceStoreError:
            conn.close()
            raise
        return conn

    def after_fork_in_child(self) -> None:
        # SQLite connections must not cross fork(): the child keeps the inherited one alive but
        # unused (closing it could disturb the parent's WAL) and opens its own on next flush.
        # The inherited buffer is the parent's to write; locks may have been held mid-flush.
        if self.conn is not None:
            _INHERITED_CONNECTIONS.append(self.conn)
        self.conn = None
        self.buf = []
        self.tasks = []
        self.buf_lock = threading.Lock()
        self.io_lock = threading.Lock()
        self.wake = threading.Event()
        self.thread = None  # threads do not survive fork(); restarted on the next write

    def flush(self, *, block: bool = True) -> None:
        if not self.io_lock.acquire(blocking=block):
            return  # another thread is flushing; it, or the next write, takes the buffer
        try:
            if self.closed:
                return
            with self.buf_lock:  # spans and records together: a record never precedes its spans
                batch, self.buf = self.buf, []
                tasks, self.tasks = self.tasks, []
            if not batch and not tasks:
                self.last_flush = time.monotonic()
                return
            try:
                if self.conn is None:
                    self.conn = self._open()
                conn = self.conn
                rows = [_span_row(s) for s in batch]
                task_rows = [_task_row(t) for t in tasks]
                conn.execute("BEGIN IMMEDIATE")
                try:
                    if rows:
                        conn.executemany(_INSERT_SPAN, rows)
                    if task_rows:
                        conn.executemany(_INSERT_TASK, task_rows)
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                self.unreported = None  # written after all: nothing lost to report
            except (sqlite3.Error, TraceStoreError) as e:
                with self.buf_lock:  # keep them for the next attempt, within bounds
                    self.buf[:0] = batch
                    self.tasks[:0] = tasks
                    for kept in (self.buf, self.tasks):
                        overflow = len(kept) - self.max_buffer
                        if overflow > 0:
                            del kept[:overflow]
                            self.dropped += overflow
                raise TraceStoreError(f"writing traces to {self.path!r} failed: {e}") from e
            finally:
                self.last_flush = time.monotonic()
        finally:
            self.io_lock.release()

    def close(self) -> None:
        if self.closed:
            return
        try:
            self.flush()
        finally:
            with self.io_lock:
                if not self.closed:
                    self.closed = True
                    self.wake.set()
                    if self.conn is not None:
                        self.conn.close()
                        self.conn = None


#: Seconds the background writer, woken by a task record, waits for more before committing.
_TASK_LINGER = 0.02

_WRITERS: weakref.WeakSet[_SQLiteWriter] = weakref.WeakSet()
_INHERITED_CONNECTIONS: list[sqlite3.Connection] = []


def _reset_writers_after_fork() -> None:
    for w in list(_WRITERS):
        w.after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_writers_after_fork)


class SQLiteSink:
    """The embedded default sink: a SQLite file in WAL mode, written in batches.

    ``write_spans`` and ``write_task`` only append to in-memory buffers (about a microsecond),
    so the caller's thread never waits on disk I/O. A background daemon thread writes the
    buffers as one transaction when they reach ``batch_size`` spans, when a task record arrives
    (``write_task`` wakes it: the record is readable some 20 ms after the task ends, the
    records of tasks ending meanwhile committed with it) and
    every ``flush_interval`` seconds; if that thread falls behind by four batches (spans or task
    records), the caller writes itself (back-pressure). A task record is committed in the same
    transaction as every span buffered before it, so a reader never sees a task's record
    without its spans. The buffers are also written on :meth:`flush` (which returns once
    everything written so far is committed) / :meth:`close`, when the sink is
    garbage-collected and at interpreter exit. A background write that fails keeps everything
    buffered; the error is counted in :attr:`errors`, raised by the next :meth:`write_task`
    (once) and by the next :meth:`flush`. A process killed between two writes loses only the
    unwritten buffers (the last few milliseconds of spans and task records): committed batches
    survive intact (WAL, ``synchronous=NORMAL``: durable against process crashes; a power loss
    may roll back the last transactions, never corrupt the file).

    Many threads may write at once; a forked child process opens its own connection.

    If a write fails (disk full, database locked for longer than 30 s), the call raises
    :class:`TraceStoreError` and the spans and records stay buffered for the next attempt; at
    most ``max_buffer`` spans (and as many task records) are kept, the oldest beyond that are
    dropped and counted in :attr:`dropped`.

    Args:
        path: the database file; created with its schema if missing. An existing file must be
            an agentguard trace database of the same schema version.
        batch_size: spans buffered before a write.
        flush_interval: seconds after which the next write also flushes.
        max_buffer: most spans kept in memory while writes are failing.

    Raises:
        TraceStoreError: the file cannot be opened or has another schema version.

    Example:
        >>> import tempfile, os, time
        >>> from agentguard._trace import Span
        >>> db = os.path.join(tempfile.mkdtemp(), "traces.db")
        >>> sink = SQLiteSink(db)
        >>> sink.write_spans([Span("s1", "t1", "tool", "search", time.time())])
        >>> sink.close()
        >>> [s.name for s in SQLiteTraceReader(db).spans("t1")]
        ['search']
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        batch_size: int = 256,
        flush_interval: float = 1.0,
        max_buffer: int = 65_536,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: must be at least 1")
        if flush_interval < 0:
            raise ValueError(f"flush_interval={flush_interval!r}: cannot be negative")
        if max_buffer < batch_size:
            raise ValueError(f"max_buffer={max_buffer!r}: must be at least batch_size")
        self.path = os.fspath(path)
        self._w = _SQLiteWriter(self.path, batch_size, flush_interval, max_buffer)
        # Flushes when the sink is collected, and at interpreter exit (weakref.finalize's own
        # atexit hook) without keeping the sink alive.
        self._finalizer = weakref.finalize(self, _SQLiteWriter.close, self._w)

    def __repr__(self) -> str:
        return f"SQLiteSink({self.path!r})"

    @property
    def dropped(self) -> int:
        """Spans and task records dropped because writes kept failing and the buffer was full."""
        return self._w.dropped

    @property
    def errors(self) -> int:
        """Background writes that failed (their spans stayed buffered)."""
        return self._w.errors

    def write_spans(self, spans: Sequence[Span]) -> None:
        """Buffer spans; write the buffer if it is full or ``flush_interval`` has passed."""
        w = self._w
        with w.buf_lock:
            if w.closed:
                raise TraceStoreError(f"{self!r} is closed")
            w.buf.extend(spans)
            n = len(w.buf)
        if w.thread is None:
            w.ensure_thread()
        if n >= w.batch_size:
            if n >= 4 * w.batch_size:  # the flusher is behind: write here (back-pressure)
                w.flush()
            else:
                w.wake.set()

    def write_task(self, record: TaskRecord) -> None:
        """Buffer the task's record and wake the background writer, which commits it with the
        spans buffered before it (some 20 ms later; :meth:`flush` forces it).

        Raises the error of a failed background write not yet reported (the record itself
        stays buffered for the next attempt)."""
        w = self._w
        with w.buf_lock:
            if w.closed:
                raise TraceStoreError(f"{self!r} is closed")
            w.tasks.append(record)
            n = len(w.tasks)
        if w.thread is None:
            w.ensure_thread()
        if n >= 4 * w.batch_size:  # the flusher is behind: write here (back-pressure)
            w.flush()
        elif not w.wake.is_set():
            w.wake.set()
        error = w.unreported
        if error is not None:
            w.unreported = None
            raise error

    def flush(self) -> None:
        """Write everything buffered so far (spans and task records), now."""
        self._w.flush()

    def close(self) -> None:
        """Flush and close the connection. Idempotent."""
        self._finalizer()

    def __enter__(self) -> SQLiteSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- JSONL -----------------------------------------------------------------------------------


class JSONLSink:
    """Append spans and task records to a file, one JSON object per line.

    Lines look like ``{"type": "span", "span_id": ..., "cost_usd": "0.0012", ...}`` and
    ``{"type": "task", "task_id": ..., ...}``; money is a string, unknown cost ``null``. Each
    ``write_spans`` / ``write_task`` call is written with one ``write`` and flushed to the OS, so
    lines from concurrent threads never interleave. Read it back with :func:`read_jsonl`.

    Example:
        >>> import tempfile, os
        >>> from agentguard._trace import Span
        >>> path = os.path.join(tempfile.mkdtemp(), "traces.jsonl")
        >>> with JSONLSink(path) as sink:
        ...     sink.write_spans([Span("s1", "t1", "tool", "search", 1.0)])
        >>> spans, tasks = read_jsonl(path)
        >>> spans[0].name
        'search'
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        self._file: IO[str] | None = open(  # noqa: SIM115 - closed by close() / finalizer
            self.path, "a", encoding="utf-8", newline="\n"
        )
        self._finalizer = weakref.finalize(self, _close_file, self._file)

    def __repr__(self) -> str:
        return f"JSONLSink({self.path!r})"

    def _write(self, text: str) -> None:
        with self._lock:
            if self._file is None:
                raise TraceStoreError(f"{self!r} is closed")
            self._file.write(text)
            self._file.flush()

    def write_spans(self, spans: Sequence[Span]) -> None:
        """Append one line per span."""
        if not spans:
            return
        lines = []
        for s in spans:
            d = s.to_dict()
            lines.append(_dumps({"type": "span", **d}))
        self._write("\n".join(lines) + "\n")

    def write_task(self, record: TaskRecord) -> None:
        """Append the task's line."""
        self._write(_dumps({"type": "task", **record.to_dict()}) + "\n")

    def flush(self) -> None:
        """Flush the file to the OS (writes are already flushed per batch)."""
        with self._lock:
            if self._file is not None:
                self._file.flush()

    def close(self) -> None:
        """Close the file. Idempotent."""
        with self._lock:
            self._file = None
        self._finalizer()

    def __enter__(self) -> JSONLSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close_file(f: IO[str]) -> None:
    f.close()


def read_jsonl(path: str | os.PathLike[str]) -> tuple[list[Span], list[TaskRecord]]:
    """Read a :class:`JSONLSink` file back: ``(spans, task records)`` in file order.

    A span or task written several times is returned once, in its last version. A truncated
    last line (the writer died mid-write) is skipped.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "empty.jsonl")
        >>> open(p, "w").close()
        >>> read_jsonl(p)
        ([], [])
    """
    spans: dict[str, Span] = {}
    tasks: dict[str, TaskRecord] = {}
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # a torn final line
            raise
        kind = d.get("type")
        if kind == "span":
            span = Span.from_dict(d)
            spans.pop(span.span_id, None)
            spans[span.span_id] = span
        elif kind == "task":
            rec = TaskRecord.from_dict(d)
            tasks.pop(rec.task_id, None)
            tasks[rec.task_id] = rec
    return list(spans.values()), list(tasks.values())


# -- memory, null, multi ---------------------------------------------------------------------


class MemorySink:
    """Keeps spans and task records in lists (tests, ``agentguard.testing``).

    Example:
        >>> from agentguard._trace import Span
        >>> sink = MemorySink()
        >>> sink.write_spans([Span("s1", "t1", "tool", "search", 1.0)])
        >>> [s.name for s in sink.spans_of("t1")]
        ['search']
    """

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.tasks: list[TaskRecord] = []
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"MemorySink(spans={len(self.spans)}, tasks={len(self.tasks)})"

    def write_spans(self, spans: Sequence[Span]) -> None:
        """Append the spans."""
        with self._lock:
            self.spans.extend(spans)

    def write_task(self, record: TaskRecord) -> None:
        """Append the record."""
        with self._lock:
            self.tasks.append(record)

    def flush(self) -> None:
        """Nothing to do."""

    def close(self) -> None:
        """Nothing to do; the lists stay readable."""

    def spans_of(self, task_id: str) -> list[Span]:
        """The spans of one task, in write order."""
        with self._lock:
            return [s for s in self.spans if s.task_id == task_id]

    def task(self, task_id: str) -> TaskRecord | None:
        """The last record written for ``task_id``, if any."""
        with self._lock:
            for r in reversed(self.tasks):
                if r.task_id == task_id:
                    return r
        return None

    def clear(self) -> None:
        """Forget everything."""
        with self._lock:
            self.spans.clear()
            self.tasks.clear()


class NullSink:
    """Drops everything: traces disabled (``trace=False``)."""

    def __repr__(self) -> str:
        return "NullSink()"

    def write_spans(self, spans: Sequence[Span]) -> None:
        """Drop the spans."""

    def write_task(self, record: TaskRecord) -> None:
        """Drop the record."""

    def flush(self) -> None:
        """Nothing to do."""

    def close(self) -> None:
        """Nothing to do."""


class MultiSink:
    """Sends everything to several sinks.

    Every sink gets every call even if an earlier one raises; the first error is re-raised
    after all sinks were called.

    Example:
        >>> a, b = MemorySink(), MemorySink()
        >>> MultiSink(a, b).write_task(TaskRecord("t1", None, 0.0, 1.0, "ok"))
        >>> len(a.tasks), len(b.tasks)
        (1, 1)
    """

    def __init__(self, *sinks: TraceSink) -> None:
        self.sinks: tuple[TraceSink, ...] = sinks

    def __repr__(self) -> str:
        return f"MultiSink({', '.join(map(repr, self.sinks))})"

    def _each(self, method: str, *args: Any) -> None:
        error: BaseException | None = None
        for sink in self.sinks:
            try:
                getattr(sink, method)(*args)
            except Exception as e:
                if error is None:
                    error = e
        if error is not None:
            raise error

    def write_spans(self, spans: Sequence[Span]) -> None:
        """Write the spans to every sink."""
        self._each("write_spans", spans)

    def write_task(self, record: TaskRecord) -> None:
        """Write the record to every sink."""
        self._each("write_task", record)

    def flush(self) -> None:
        """Flush every sink."""
        self._each("flush")

    def close(self) -> None:
        """Close every sink."""
        self._each("close")


SinkSpec = TraceSink | str | os.PathLike[str] | bool | None


def open_sink(spec: SinkSpec) -> TraceSink:
    """Turn a ``trace=`` setting into a sink.

    * ``None`` or ``True``: the embedded SQLite file, ``$AGENTGUARD_DB`` or ``agentguard.db``
      in the current directory;
    * ``False``, ``"off"``, ``"none"``: no traces (:class:`NullSink`);
    * ``"memory"`` / ``":memory:"``: :class:`MemorySink`;
    * ``"otel"``: :class:`~agentguard.OTelSink` on the global OpenTelemetry providers (the
      ``otel`` extra);
    * a path ending in ``.jsonl``: :class:`JSONLSink`; in ``.db``, ``.sqlite`` or ``.sqlite3``:
      :class:`SQLiteSink`;
    * a sink object is returned as it is.

    Raises:
        ValueError: any other value (the message names it).
        ImportError: ``"otel"`` without opentelemetry-api installed (the message names the
            extra to install).

    Example:
        >>> open_sink(False)
        NullSink()
        >>> type(open_sink("memory")).__name__
        'MemorySink'
    """
    if spec is None or spec is True:
        return SQLiteSink(os.environ.get("AGENTGUARD_DB") or DEFAULT_DB)
    if spec is False:
        return NullSink()
    if isinstance(spec, str | os.PathLike):
        text = os.fspath(spec)
        if text.lower() in ("off", "none", "null", "false"):
            return NullSink()
        if text in ("memory", ":memory:"):
            return MemorySink()
        if text.lower() == "otel":  # (ImportError naming the extra without opentelemetry-api)
            from agentguard._otel import OTelSink

            return OTelSink()
        suffix = Path(text).suffix.lower()
        if suffix == ".jsonl":
            return JSONLSink(text)
        if suffix in (".db", ".sqlite", ".sqlite3"):
            return SQLiteSink(text)
        raise ValueError(
            f"trace={text!r}: expected a path ending in .db, .sqlite, .sqlite3 or .jsonl, "
            "'memory', 'otel', False, or a sink object"
        )
    if isinstance(spec, TraceSink):
        return spec
    raise ValueError(
        f"trace={spec!r}: expected a path, 'memory', 'otel', None, False, or an object with "
        "write_spans / write_task / flush / close"
    )


# -- reader ----------------------------------------------------------------------------------

GroupBy = Literal["feature", "team", "env", "model"]


def _as_epoch(since: float | datetime | None) -> float | None:
    if since is None or isinstance(since, float | int):
        return since
    return since.timestamp()


class SQLiteTraceReader:
    """Read-side queries over a trace database (what ``agentguard report`` / ``trace`` use).

    Args:
        path: an existing database written by :class:`SQLiteSink`.

    Raises:
        TraceStoreError: the file does not exist, is not a trace database, or has another
            schema version.

    Example:
        >>> import tempfile, os
        >>> from decimal import Decimal
        >>> db = os.path.join(tempfile.mkdtemp(), "t.db")
        >>> with SQLiteSink(db) as sink:
        ...     for i, c in enumerate(["0.1", "0.2"]):
        ...         sink.write_task(TaskRecord(f"t{i}", None, 1.0, 2.0, "ok",
        ...                         {"feature": "faq"}, cost_usd=Decimal(c)))
        >>> SQLiteTraceReader(db).totals("feature")[0]["cost_usd"]
        Decimal('0.3')
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise TraceStoreError(f"no trace database at {self.path}")
        self._conn = _connect(self.path, timeout=10.0)
        self._lock = threading.Lock()
        try:
            _check_version(self._conn, self.path)
        except TraceStoreError:
            self._conn.close()
            raise

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()

    def __enter__(self) -> SQLiteTraceReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _query(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return self._conn.execute(sql, tuple(params)).fetchall()
            except sqlite3.DatabaseError as e:
                raise TraceStoreError(f"reading {self.path!r} failed: {e}") from e

    @staticmethod
    def _where(
        since: float | datetime | None, feature: str | None, team: str | None
    ) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        epoch = _as_epoch(since)
        if epoch is not None:
            clauses.append("start_time >= ?")
            params.append(epoch)
        if feature is not None:
            clauses.append("feature = ?")
            params.append(feature)
        if team is not None:
            clauses.append("team = ?")
            params.append(team)
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), params

    def tasks(
        self,
        since: float | datetime | None = None,
        limit: int | None = None,
        feature: str | None = None,
        team: str | None = None,
    ) -> list[TaskRecord]:
        """Task records, most recent first.

        Args:
            since: only tasks started at or after this (epoch seconds or aware datetime).
            limit: at most this many.
            feature: only this ``feature`` tag.
            team: only this ``team`` tag.
        """
        where, params = self._where(since, feature, team)
        sql = f"SELECT * FROM tasks{where} ORDER BY start_time DESC, task_id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        return [_task_from_row(r) for r in self._query(sql, params)]

    def task(self, task_id: str) -> TaskRecord | None:
        """One task's record, or ``None`` if none was written (yet)."""
        rows = self._query("SELECT * FROM tasks WHERE task_id = ?", (task_id,))
        return _task_from_row(rows[0]) if rows else None

    def count_tasks(
        self,
        since: float | datetime | None = None,
        feature: str | None = None,
        team: str | None = None,
    ) -> int:
        """How many task records match the filters."""
        where, params = self._where(since, feature, team)
        return int(self._query(f"SELECT COUNT(*) FROM tasks{where}", params)[0][0])

    def children(self, task_id: str) -> list[TaskRecord]:
        """Records of the sub-tasks whose parent is ``task_id``, in start order."""
        rows = self._query(
            "SELECT * FROM tasks WHERE parent_id = ? ORDER BY start_time, task_id", (task_id,)
        )
        return [_task_from_row(r) for r in rows]

    def spans(self, task_id: str) -> list[Span]:
        """A task's spans, in start order."""
        rows = self._query(
            "SELECT * FROM spans WHERE task_id = ? ORDER BY start_time, rowid", (task_id,)
        )
        return [_span_from_row(r) for r in rows]

    def decision_spans(
        self,
        since: float | datetime | None = None,
        feature: str | None = None,
        team: str | None = None,
    ) -> list[Span]:
        """The spans of the matching tasks that record a decision the guard took: any other
        than a plain ``allow``, and an ``allow`` whose output cap the budget lowered (its
        reason says ``capped``) — in start order.

        Args:
            since: only tasks started at or after this (epoch seconds or aware datetime).
            feature: only tasks with this ``feature`` tag.
            team: only tasks with this ``team`` tag.
        """
        where, params = self._where(since, feature, team)
        rows = self._query(
            "SELECT * FROM spans WHERE (decision IS NOT NULL AND decision != 'allow'"
            " OR (decision = 'allow' AND reason LIKE '%capped%'))"
            f" AND task_id IN (SELECT task_id FROM tasks{where}) ORDER BY start_time, rowid",
            params,
        )
        return [_span_from_row(r) for r in rows]

    def totals(
        self,
        by: GroupBy,
        *,
        since: float | datetime | None = None,
        feature: str | None = None,
        team: str | None = None,
    ) -> list[dict[str, Any]]:
        """Exact totals grouped by a tag (from task records) or by model (from model spans).

        Each group is a dict with ``key`` (the tag value or model; ``None`` when untagged),
        ``tasks``, ``model_calls``, ``input_tokens``, ``output_tokens``, ``cost_usd``,
        ``priced_usd``, ``unpriced`` and ``saved_usd``. ``cost_usd`` is the exact ``Decimal``
        sum, or ``None`` when any member (task, or model call for ``by="model"``) has an
        unknown cost; ``priced_usd`` is then the sum of the priced members and ``unpriced``
        how many were not. Groups come most expensive first.

        Args:
            by: ``feature``, ``team``, ``env`` or ``model``.
            since: only tasks / spans started at or after this.
            feature: only tasks with this ``feature`` tag.
            team: only tasks with this ``team`` tag.
        """
        groups: dict[str | None, dict[str, Any]] = {}

        def group(key: str | None) -> dict[str, Any]:
            g = groups.get(key)
            if g is None:
                g = groups[key] = {
                    "key": key,
                    "tasks": 0,
                    "model_calls": 0,
                    "input_tokens": 0,
                    "output_tokens": 0,
                    "priced_usd": Decimal(0),
                    "unpriced": 0,
                    "saved_usd": Decimal(0),
                    "_tasks": set(),
                }
            return g

        if by == "model":
            clauses = ["s.kind = 'model'"]
            params: list[Any] = []
            epoch = _as_epoch(since)
            if epoch is not None:
                clauses.append("s.start_time >= ?")
                params.append(epoch)
            for column, value in (("feature", feature), ("team", team)):
                if value is not None:
                    clauses.append(f"s.task_id IN (SELECT task_id FROM tasks WHERE {column} = ?)")
                    params.append(value)
            rows = self._query(
                "SELECT s.task_id, COALESCE(s.model, s.name) AS model, s.input_tokens, "
                "s.output_tokens, s.cost_usd, s.attrs FROM spans s WHERE " + " AND ".join(clauses),
                params,
            )
            for r in rows:
                g = group(r["model"])
                g["_tasks"].add(r["task_id"])
                g["model_calls"] += 1
                g["input_tokens"] += r["input_tokens"] or 0
                g["output_tokens"] += r["output_tokens"] or 0
                if r["cost_usd"] is None:
                    g["unpriced"] += 1
                else:
                    g["priced_usd"] += Decimal(r["cost_usd"])
                saved = json.loads(r["attrs"]).get("saved_usd")
                if saved is not None:
                    g["saved_usd"] += Decimal(str(saved))
        elif by in _TAG_COLUMNS:
            where, params = self._where(since, feature, team)
            rows = self._query(
                f"SELECT task_id, {by} AS key, model_calls, input_tokens, output_tokens, "
                f"cost_usd, saved_usd FROM tasks{where}",
                params,
            )
            for r in rows:
                g = group(r["key"])
                g["_tasks"].add(r["task_id"])
                g["model_calls"] += r["model_calls"]
                g["input_tokens"] += r["input_tokens"]
                g["output_tokens"] += r["output_tokens"]
                if r["cost_usd"] is None:
                    g["unpriced"] += 1
                else:
                    g["priced_usd"] += Decimal(r["cost_usd"])
                g["saved_usd"] += Decimal(r["saved_usd"])
        else:
            raise ValueError(f"by={by!r}: expected 'feature', 'team', 'env' or 'model'")

        out = []
        for g in groups.values():
            g["tasks"] = len(g.pop("_tasks"))
            g["cost_usd"] = None if g["unpriced"] else g["priced_usd"]
            out.append(g)
        out.sort(key=lambda g: (-g["priced_usd"], g["key"] is None, str(g["key"])))
        return out
