"""The span model, the sinks and the SQLite reader: exact money, batching, concurrency, crashes."""

from __future__ import annotations

import gc
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from decimal import Decimal
from pathlib import Path

import pytest

from agentguard._sinks import (
    SCHEMA_VERSION,
    JSONLSink,
    MemorySink,
    MultiSink,
    NullSink,
    SQLiteSink,
    SQLiteTraceReader,
    TraceStoreError,
    open_sink,
    read_jsonl,
)
from agentguard._trace import Span, TaskRecord, TraceSink, new_span_id
from agentguard._usage import Usage

T0 = 1_767_312_000.0  # 2026-01-02T00:00:00Z


def model_span(
    i: int, task: str = "t1", cost: Decimal | None = Decimal("0.000123"), **kw: object
) -> Span:
    return Span(
        span_id=f"s{i:08d}",
        task_id=task,
        kind="model",
        name="gpt-4o-mini",
        start=T0 + i,
        parent_id="root",
        end=T0 + i + 0.25,
        model="gpt-4o-mini",
        usage=Usage(input_tokens=1000 + i, output_tokens=50, cache_read_tokens=512),
        cost_usd=cost,
        decision="allow",
        attrs={"seq": i, **kw},
    )


def record(
    task_id: str,
    cost: Decimal | None,
    *,
    feature: str = "faq",
    team: str = "cx",
    start: float = T0,
    **kw: object,
) -> TaskRecord:
    return TaskRecord(
        task_id=task_id,
        parent_id=None,
        start=start,
        end=start + 2.0,
        status="ok",
        tags={"feature": feature, "team": team, "env": "prod"},
        usage=Usage(100, 10, per_call=False),
        cost_usd=cost,
        model_calls=1,
        **kw,  # type: ignore[arg-type]
    )


def count_rows(db: Path, table: str = "spans") -> int:
    conn = sqlite3.connect(db, timeout=30)
    try:
        return int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
    finally:
        conn.close()


def wait_rows(db: Path, n: int, timeout: float = 5.0, table: str = "spans") -> int:
    """Rows once the background flusher has written ``n`` of them (or the timeout passed)."""
    deadline = time.monotonic() + timeout
    while (rows := count_rows(db, table)) < n and time.monotonic() < deadline:
        time.sleep(0.005)
    return rows


# -- the model -------------------------------------------------------------------------------


def test_span_round_trip_is_exact_through_json() -> None:
    span = Span(
        span_id=new_span_id(),
        task_id="ticket-42",
        kind="model",
        name="claude-sonnet-4",
        start=T0,
        parent_id="p",
        end=T0 + 1.5,
        status="error",
        model="claude-sonnet-4",
        usage=Usage(2010, 50, 2000, 0, 10, estimated=True),
        cost_usd=Decimal("0.000000000123456789012345678"),
        decision="downgrade",
        reason="60% spent",
        attrs={
            "saved_usd": Decimal("0.1"),
            "reserved_usd": Decimal("1E-12"),
            "nested": {"x": Decimal("2.50"), "u": Usage(1, 1)},
            "error": "RateLimitError",
            "estimated": True,
        },
    )
    d = json.loads(json.dumps(span.to_dict()))
    back = Span.from_dict(d)
    assert back.cost_usd == Decimal("0.000000000123456789012345678")
    assert str(back.cost_usd) == str(span.cost_usd)
    assert back.usage == span.usage
    assert back.usage is not None
    assert back.usage.estimated
    assert back.attrs["saved_usd"] == Decimal("0.1")
    assert isinstance(back.attrs["saved_usd"], Decimal)
    assert back.attrs["reserved_usd"] == Decimal("1E-12")
    assert back.attrs["nested"] == {"x": "2.50", "u": Usage(1, 1).as_dict()}
    assert back.duration_ms == 1500.0
    for name in ("span_id", "task_id", "kind", "name", "start", "parent_id", "end", "status"):
        assert getattr(back, name) == getattr(span, name)


def test_span_defaults_and_unknown_cost() -> None:
    span = Span("a", "t", "tool", "search", T0)
    d = span.to_dict()
    assert d["cost_usd"] is None
    assert d["usage"] is None
    assert d["attrs"] == {}
    back = Span.from_dict(d)
    assert back == span
    assert back.cost_usd is None  # unknown stays unknown, never 0
    assert back.duration_ms is None


def test_a_float_cost_is_repaired_through_its_repr() -> None:
    d = Span("a", "t", "model", "m", T0).to_dict()
    d["cost_usd"] = 0.1  # someone wrote a float into a JSONL file
    assert Span.from_dict(d).cost_usd == Decimal("0.1")


def test_span_uses_slots() -> None:
    span = Span("a", "t", "tool", "search", T0)
    assert not hasattr(span, "__dict__")
    with pytest.raises(AttributeError):
        span.colour = "red"  # type: ignore[attr-defined]


def test_task_record_round_trip() -> None:
    rec = TaskRecord(
        task_id="ticket-42",
        parent_id="parent-1",
        start=T0,
        end=T0 + 3,
        status="finished",
        tags={"feature": "support", "team": "cx", "tenant": "acme"},
        usage=Usage(5200, 610, 4096, per_call=False),
        cost_usd=Decimal("0.0082062"),
        model_calls=2,
        tool_calls=1,
        retries=1,
        steps=2,
        decisions={"downgrade": 1, "finish": 1, "trim": 2},
        saved_usd=Decimal("0.004625"),
        tokens_saved=1850,
        limit_hit="max_cost_usd",
    )
    d = json.loads(json.dumps(rec.to_dict()))
    assert d["cost_usd"] == "0.0082062"
    assert d["saved_usd"] == "0.004625"
    assert TaskRecord.from_dict(d) == rec
    unknown = record("t", None)
    assert TaskRecord.from_dict(unknown.to_dict()).cost_usd is None


def test_task_record_from_spans_sums_exactly_and_propagates_unknown() -> None:
    task = Span("root", "t1", "task", "t1", T0, end=T0 + 9, status="finished",
                attrs={"tags": {"feature": "faq"}, "limit_hit": "max_cost_usd"})  # fmt: skip
    spans = [
        model_span(1, cost=Decimal("0.1")),
        model_span(2, cost=Decimal("0.2")),
        Span("st", "t1", "step", "plan", T0, "root"),
        Span("tl", "t1", "tool", "search", T0, "st"),
        Span("rt", "t1", "retry", "rate-limit", T0, "st"),
        Span(
            "tr",
            "t1",
            "trim",
            "ctx",
            T0,
            "st",
            decision="trim",
            attrs={"tokens_saved": 700, "saved_usd": "0.0007"},
        ),
        Span(
            "d",
            "t1",
            "decision",
            "budget",
            T0,
            "st",
            decision="downgrade",
            attrs={"saved_usd": Decimal("0.01")},
        ),
    ]
    rec = TaskRecord.from_spans(task, [task, *spans])
    assert rec.cost_usd == Decimal("0.3")
    assert str(rec.cost_usd) == "0.3"
    assert (rec.model_calls, rec.tool_calls, rec.retries, rec.steps) == (2, 1, 1, 1)
    assert rec.usage.input_tokens == 2003
    assert rec.usage.output_tokens == 100
    assert rec.decisions == {"trim": 1, "downgrade": 1}  # "allow" is not counted
    assert rec.saved_usd == Decimal("0.0107")
    assert rec.tokens_saved == 700
    assert rec.tags == {"feature": "faq"}
    assert rec.limit_hit == "max_cost_usd"
    assert rec.status == "finished"

    unpriced = TaskRecord.from_spans(task, [*spans, model_span(3, cost=None)])
    assert unpriced.cost_usd is None


# -- SQLite: batching and flushing -------------------------------------------------------------


def test_sqlite_round_trip(tmp_path: Path) -> None:
    db = tmp_path / "traces.db"
    spans = [
        model_span(1, saved_usd=Decimal("0.5")),
        model_span(2, cost=None),
        Span("tool", "t1", "tool", "search", T0 + 3, "root", T0 + 4, attrs={"error": "Timeout"}),
    ]
    with SQLiteSink(db) as sink:
        sink.write_spans(spans)
        sink.write_task(record("t1", Decimal("0.000246")))
    with SQLiteTraceReader(db) as reader:
        assert reader.spans("t1") == spans
        back = reader.spans("t1")
        assert back[0].attrs["saved_usd"] == Decimal("0.5")
        assert back[1].cost_usd is None
        assert back[2].usage is None
        assert reader.tasks() == [record("t1", Decimal("0.000246"))]
        assert reader.task("t1") == record("t1", Decimal("0.000246"))
        assert reader.task("nope") is None
        assert reader.spans("nope") == []

    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == (
        str(SCHEMA_VERSION),
    )
    row = conn.execute(
        "SELECT cost_usd, typeof(cost_usd), feature, team, env FROM tasks"
    ).fetchone()
    assert row == ("0.000246", "text", "faq", "cx", "prod")
    conn.close()


def test_sqlite_batches_until_batch_size(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    sink = SQLiteSink(db, batch_size=10, flush_interval=3600)
    sink.write_spans([model_span(i) for i in range(9)])
    assert count_rows(db) == 0  # buffered
    sink.write_spans([model_span(9)])
    assert wait_rows(db, 10) == 10  # the 10th span filled the batch: the flusher wrote it
    sink.write_spans([model_span(10)])
    time.sleep(0.05)
    assert count_rows(db) == 10
    sink.flush()
    assert count_rows(db) == 11
    sink.write_spans([model_span(11)])
    sink.close()
    assert count_rows(db) == 12
    sink.close()  # idempotent
    with pytest.raises(TraceStoreError, match="closed"):
        sink.write_spans([model_span(12)])


def test_sqlite_flushes_after_the_interval(tmp_path: Path) -> None:
    db = tmp_path / "i.db"
    sink = SQLiteSink(db, batch_size=1000, flush_interval=0.3)
    started = time.monotonic()
    sink.write_spans([model_span(0)])
    sink.write_spans([model_span(1)])
    assert count_rows(db) == 0  # buffered: far from a batch
    assert wait_rows(db, 2) == 2  # the background flusher wrote them within the interval
    assert time.monotonic() - started < 2.0
    sink.close()


def test_write_task_wakes_the_writer_which_commits_the_buffer_and_the_record_at_once(
    tmp_path: Path,
) -> None:
    db = tmp_path / "t.db"
    sink = SQLiteSink(db, batch_size=1000, flush_interval=3600)  # only the record wakes it
    sink.write_spans([model_span(0), model_span(1)])
    started = time.monotonic()
    sink.write_task(record("t1", Decimal("0.3")))  # buffered: the caller does no I/O
    assert wait_rows(db, 1, table="tasks") == 1  # promptly, by the background writer
    assert time.monotonic() - started < 2.0
    assert count_rows(db, "spans") == 2  # in the same transaction as the record
    sink.write_task(record("t1", Decimal("0.4")))  # written again: replaced, not duplicated
    sink.flush()  # forces it, now
    assert count_rows(db, "tasks") == 1
    assert SQLiteTraceReader(db).tasks()[0].cost_usd == Decimal("0.4")
    sink.close()


def test_flush_writes_buffered_task_records_now(tmp_path: Path) -> None:
    db = tmp_path / "f.db"
    sink = SQLiteSink(db, batch_size=1000, flush_interval=3600)
    sink._w.ensure_thread()
    sink._w.io_lock.acquire()  # hold the background writer off
    try:
        sink.write_spans([model_span(0)])
        sink.write_task(record("t1", Decimal("0.1")))
        time.sleep(0.05)
        assert count_rows(db, "tasks") == 0  # buffered
    finally:
        sink._w.io_lock.release()
    sink.flush()
    assert count_rows(db, "tasks") == 1
    assert count_rows(db, "spans") == 1
    sink.close()


def test_a_failed_background_write_is_reported_by_the_next_write_task(tmp_path: Path) -> None:
    db = tmp_path / "report.db"
    sink = SQLiteSink(db, batch_size=1000, flush_interval=3600)
    real = sink._w.conn

    class Failing:
        def execute(self, *args: object) -> object:
            raise sqlite3.OperationalError("disk I/O error")

    sink._w.conn = Failing()  # type: ignore[assignment]
    sink.write_spans([model_span(0)])
    sink.write_task(record("t1", Decimal("0.1")))  # wakes the writer, whose write fails
    deadline = time.monotonic() + 5
    while sink.errors == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert sink.errors >= 1
    with pytest.raises(TraceStoreError, match="disk I/O error"):
        sink.write_task(record("t2", Decimal("0.2")))  # reports it; t2 is still buffered
    with sink._w.io_lock:  # the writer may be retrying t2 in the background: let it finish
        sink._w.unreported = None
    sink._w.conn = real
    sink.close()
    with SQLiteTraceReader(db) as reader:
        assert sorted(t.task_id for t in reader.tasks()) == ["t1", "t2"]
        assert [s.span_id for s in reader.spans("t1")] == ["s00000000"]


def test_rewriting_a_span_replaces_it(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    with SQLiteSink(db) as sink:
        open_span = Span("x", "t", "model", "gpt-4o", T0)
        sink.write_spans([open_span])
        sink.flush()
        open_span.end, open_span.cost_usd = T0 + 1, Decimal("0.01")
        sink.write_spans([open_span])
    (back,) = SQLiteTraceReader(db).spans("t")
    assert back.end == T0 + 1
    assert back.cost_usd == Decimal("0.01")


def test_sqlite_sink_flushes_when_garbage_collected(tmp_path: Path) -> None:
    db = tmp_path / "gc.db"
    sink = SQLiteSink(db, batch_size=1000, flush_interval=3600)
    sink.write_spans([model_span(i) for i in range(5)])
    del sink
    gc.collect()
    assert count_rows(db) == 5


def test_sqlite_sink_flushes_at_interpreter_exit(tmp_path: Path) -> None:
    db = tmp_path / "exit.db"
    script = f"""
        from agentguard._sinks import SQLiteSink
        from agentguard._trace import Span
        SINK = SQLiteSink({str(db)!r}, batch_size=1000, flush_interval=3600)
        SINK.write_spans([Span(f"s{{i}}", "t", "tool", "x", float(i)) for i in range(7)])
        # no flush, no close: the interpreter exits with the spans buffered
    """
    subprocess.run([sys.executable, "-c", textwrap.dedent(script)], check=True, timeout=60)
    assert count_rows(db) == 7


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_forked_child_writes_through_its_own_connection(tmp_path: Path) -> None:
    db = tmp_path / "fork.db"
    sink = SQLiteSink(db, batch_size=1000, flush_interval=3600)
    sink.write_spans([model_span(0)])  # buffered in the parent
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 0
        try:
            sink.write_spans([model_span(1, task="child")])
            sink.close()
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    sink.write_spans([model_span(2)])
    sink.close()
    reader = SQLiteTraceReader(db)
    assert [s.span_id for s in reader.spans("child")] == ["s00000001"]
    assert [s.span_id for s in reader.spans("t1")] == ["s00000000", "s00000002"]
    assert sqlite3.connect(db).execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_sixteen_threads_write_every_span_exactly_once(tmp_path: Path) -> None:
    db = tmp_path / "concurrent.db"
    sink = SQLiteSink(db, batch_size=256, flush_interval=0.01)
    threads, per_thread = 16, 1000
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            barrier.wait()
            for i in range(per_thread):
                sink.write_spans(
                    [
                        Span(
                            f"{t}-{i}",
                            f"task-{t}",
                            "model",
                            "gpt-4o",
                            T0 + i,
                            usage=Usage(i, 1),
                            cost_usd=Decimal(i) / 1000,
                            attrs={"thread": t, "i": i},
                        )
                    ]
                )
                if i % 250 == 249:
                    sink.write_task(record(f"task-{t}-{i}", Decimal("0.001")))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    sink.close()
    assert not errors

    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT span_id, task_id, cost_usd, attrs FROM spans").fetchall()
    assert len(rows) == threads * per_thread
    assert len({r[0] for r in rows}) == threads * per_thread
    expected = {f"{t}-{i}" for t in range(threads) for i in range(per_thread)}
    assert {r[0] for r in rows} == expected
    for span_id, task_id, cost, attrs in rows:
        t, i = map(int, span_id.split("-"))
        assert task_id == f"task-{t}"
        assert Decimal(cost) == Decimal(i) / 1000
        assert json.loads(attrs) == {"thread": t, "i": i}
    assert conn.execute("SELECT COUNT(*) FROM tasks").fetchone()[0] == threads * 4
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    conn.close()


# -- SQLite: a writer killed with SIGKILL --------------------------------------------------------

_CRASH_WRITER = """
import sys
from decimal import Decimal
from agentguard._sinks import SQLiteSink
from agentguard._trace import Span, TaskRecord
from agentguard._usage import Usage

sink = SQLiteSink(sys.argv[1], batch_size=50, flush_interval=3600)
pad = "x" * 2000  # fat rows make each commit take a while, so the kill lands mid-write
i = 0
while True:
    sink.write_spans([Span(
        f"s{i:08d}", f"task-{i // 50}", "model", "gpt-4o", float(i), end=float(i) + 0.5,
        model="gpt-4o", usage=Usage(i, 7), cost_usd=Decimal(i) / Decimal(10**9),
        attrs={"seq": i, "pad": pad, "saved_usd": Decimal(i) / Decimal(10**12)},
    )])
    i += 1
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize("kill_after_rows", [50, 1000, 5000])
def test_committed_batches_survive_sigkill_of_the_writer(
    tmp_path: Path, kill_after_rows: int
) -> None:
    db = tmp_path / "crash.db"
    proc = subprocess.Popen([sys.executable, "-c", _CRASH_WRITER, str(db)])
    try:
        deadline = time.monotonic() + 60
        seen = 0
        while seen < kill_after_rows:
            assert proc.poll() is None, "the writer died on its own"
            assert time.monotonic() < deadline, f"only {seen} rows after 60 s"
            time.sleep(0.005)
            if db.exists():
                try:
                    seen = count_rows(db)
                except sqlite3.OperationalError:  # schema not created yet
                    seen = 0
        os.kill(proc.pid, signal.SIGKILL)  # mid-run: the loop never stops writing
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    seqs = [r[0] for r in conn.execute("SELECT json_extract(attrs, '$.seq') FROM spans")]
    conn.close()
    n = len(seqs)
    assert n >= kill_after_rows
    # A transaction holds whatever was buffered when the flusher took the buffer: 50 spans, or
    # more when the writing loop outpaced it. What survives is every span of every committed
    # transaction: a contiguous prefix of the sequence, with no gap and no torn row.
    assert sorted(seqs) == list(range(n)), "committed batches must be complete and contiguous"

    reader = SQLiteTraceReader(db)
    for task in (0, n // 50 - 1):
        spans = reader.spans(f"task-{task}")
        assert len(spans) == 50
        for s in spans:
            i = s.attrs["seq"]
            assert s.span_id == f"s{i:08d}"
            assert s.usage == Usage(i, 7)
            assert s.cost_usd == Decimal(i) / Decimal(10**9)
            assert s.attrs["saved_usd"] == Decimal(i) / Decimal(10**12)
            assert s.attrs["pad"] == "x" * 2000
    reader.close()

    # the database is reusable by a new writer
    with SQLiteSink(db) as sink:
        sink.write_spans([model_span(0, task="after-crash")])
    assert len(SQLiteTraceReader(db).spans("after-crash")) == 1


_CRASH_TASK_WRITER = """
import sys
from decimal import Decimal
from agentguard._sinks import SQLiteSink
from agentguard._trace import Span, TaskRecord
from agentguard._usage import Usage

sink = SQLiteSink(sys.argv[1], batch_size=50, flush_interval=3600)
pad = "x" * 2000
i = 0
while True:
    task = f"task-{i // 20}"
    sink.write_spans([Span(
        f"s{i:08d}", task, "model", "gpt-4o", float(i), end=float(i) + 0.5,
        model="gpt-4o", usage=Usage(i, 7), cost_usd=Decimal(i) / Decimal(10**9),
        attrs={"seq": i, "pad": pad},
    )])
    i += 1
    if i % 20 == 0:  # the task ends: its record follows its 20 spans
        sink.write_task(TaskRecord(task, None, float(i - 20), float(i), "ok", model_calls=20))
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_committed_task_records_survive_sigkill_with_all_their_spans(tmp_path: Path) -> None:
    db = tmp_path / "crash-tasks.db"
    proc = subprocess.Popen([sys.executable, "-c", _CRASH_TASK_WRITER, str(db)])
    try:
        deadline = time.monotonic() + 60
        seen = 0
        while seen < 200:
            assert proc.poll() is None, "the writer died on its own"
            assert time.monotonic() < deadline, f"only {seen} task records after 60 s"
            time.sleep(0.005)
            if db.exists():
                try:
                    seen = count_rows(db, "tasks")
                except sqlite3.OperationalError:  # schema not created yet
                    seen = 0
        os.kill(proc.pid, signal.SIGKILL)  # mid-run: the loop never stops writing
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    seqs = sorted(r[0] for r in conn.execute("SELECT json_extract(attrs, '$.seq') FROM spans"))
    tasks = [r[0] for r in conn.execute("SELECT task_id FROM tasks")]
    conn.close()
    assert seqs == list(range(len(seqs))), "committed transactions must be complete, in order"
    assert len(tasks) >= 200
    reader = SQLiteTraceReader(db)
    for task_id in tasks:  # a record is never committed without the spans written before it
        assert len(reader.spans(task_id)) == 20
    reader.close()


def test_a_failed_write_keeps_the_spans_within_bounds(tmp_path: Path) -> None:
    db = tmp_path / "fail.db"
    sink = SQLiteSink(db, batch_size=2, flush_interval=3600, max_buffer=5)
    real = sink._w.conn

    class Failing:
        def execute(self, *args: object) -> object:
            raise sqlite3.OperationalError("disk I/O error")

    sink._w.conn = Failing()  # type: ignore[assignment]
    sink.write_spans([model_span(0), model_span(1)])  # a full batch: the flusher tries
    deadline = time.monotonic() + 5
    while sink.errors == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert sink.errors >= 1  # the background write failed; the caller was not disturbed
    with pytest.raises(TraceStoreError, match="disk I/O error"):
        sink.flush()  # an explicit flush reports it
    with pytest.raises(TraceStoreError):  # 8 spans = 4 batches behind: written inline, fails
        sink.write_spans([model_span(i) for i in range(2, 8)])
    assert sink.dropped == 3  # 8 buffered, 5 kept: the oldest 3 are gone
    sink._w.conn = real
    sink.close()
    conn = sqlite3.connect(db)
    assert [r[0] for r in conn.execute("SELECT span_id FROM spans ORDER BY span_id")] == [
        f"s{i:08d}" for i in range(3, 8)
    ]
    conn.close()


# -- SQLite: opening existing files ------------------------------------------------------------


def test_reopening_an_existing_database_appends(tmp_path: Path) -> None:
    db = tmp_path / "again.db"
    with SQLiteSink(db) as sink:
        sink.write_spans([model_span(0)])
    with SQLiteSink(db) as sink:
        sink.write_spans([model_span(1)])
    assert count_rows(db) == 2


def test_schema_is_created_in_an_existing_empty_sqlite_file(tmp_path: Path) -> None:
    db = tmp_path / "empty.db"
    sqlite3.connect(db).close()
    with SQLiteSink(db) as sink:
        sink.write_spans([model_span(0)])
    assert count_rows(db) == 1


def test_another_schema_version_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "future.db"
    SQLiteSink(db).close()
    conn = sqlite3.connect(db)
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(TraceStoreError, match="schema version '99'"):
        SQLiteSink(db)
    with pytest.raises(TraceStoreError, match="schema version '99'"):
        SQLiteTraceReader(db)


def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "notes.db"
    bogus.write_text("not a database, just some notes\n" * 100)
    with pytest.raises(TraceStoreError, match=r"notes\.db"):
        SQLiteSink(bogus)
    with pytest.raises(TraceStoreError, match=r"notes\.db"):
        SQLiteTraceReader(bogus)


def test_reader_on_a_missing_file_does_not_create_it(tmp_path: Path) -> None:
    db = tmp_path / "missing.db"
    with pytest.raises(TraceStoreError, match="no trace database"):
        SQLiteTraceReader(db)
    assert not db.exists()


def test_sink_arguments_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="batch_size=0"):
        SQLiteSink(tmp_path / "x.db", batch_size=0)
    with pytest.raises(ValueError, match="flush_interval=-1"):
        SQLiteSink(tmp_path / "x.db", flush_interval=-1)
    with pytest.raises(ValueError, match="max_buffer=10"):
        SQLiteSink(tmp_path / "x.db", batch_size=100, max_buffer=10)


# -- reader queries and exact totals -------------------------------------------------------------


@pytest.fixture
def populated(tmp_path: Path) -> Path:
    db = tmp_path / "totals.db"
    with SQLiteSink(db) as sink:
        sink.write_task(record("a", Decimal("0.1"), feature="faq", team="cx", start=T0))
        sink.write_task(record("b", Decimal("0.2"), feature="faq", team="cx", start=T0 + 10))
        sink.write_task(
            record(
                "c",
                Decimal("0.05"),
                feature="search",
                team="cx",
                start=T0 + 20,
                saved_usd=Decimal("0.01"),
            )
        )
        sink.write_task(record("d", None, feature="search", team="growth", start=T0 + 30))
        sink.write_task(record("e", Decimal("0.7"), feature="search", team="growth", start=T0 + 40))
        sink.write_spans(
            [
                model_span(1, task="a", cost=Decimal("0.1")),
                model_span(2, task="b", cost=Decimal("0.2")),
                model_span(3, task="d", cost=None),
                Span("tool-a", "a", "tool", "search", T0),
            ]
        )
    return db


def test_totals_are_exact_decimal_sums(populated: Path) -> None:
    reader = SQLiteTraceReader(populated)
    by_feature = {g["key"]: g for g in reader.totals("feature")}
    faq = by_feature["faq"]
    assert faq["cost_usd"] == Decimal("0.3")  # 0.1 + 0.2, exactly (0.30000000000000004 in float)
    assert str(faq["cost_usd"]) == "0.3"
    assert isinstance(faq["cost_usd"], Decimal)
    assert (faq["tasks"], faq["model_calls"], faq["input_tokens"]) == (2, 2, 200)

    search = by_feature["search"]
    assert search["cost_usd"] is None  # one unknown-cost task makes the group unknown
    assert search["priced_usd"] == Decimal("0.75")
    assert search["unpriced"] == 1
    assert search["saved_usd"] == Decimal("0.01")
    assert [g["key"] for g in reader.totals("feature")] == ["search", "faq"]  # costliest first

    by_team = {g["key"]: g for g in reader.totals("team")}
    assert by_team["cx"]["cost_usd"] == Decimal("0.35")
    assert by_team["growth"]["cost_usd"] is None
    assert by_team["growth"]["priced_usd"] == Decimal("0.7")
    assert {g["key"] for g in reader.totals("env")} == {"prod"}


def test_decision_spans_are_the_guards_decisions_of_the_matching_tasks(tmp_path: Path) -> None:
    db = tmp_path / "decisions.db"

    def decided(sid: str, task: str, decision: str, reason: str, at: float) -> Span:
        return Span(sid, task, "model", "gpt-4o", T0 + at, decision=decision, reason=reason)

    with SQLiteSink(db) as sink:
        sink.write_task(record("a", Decimal("0.1"), feature="faq", team="cx", start=T0))
        sink.write_task(record("b", Decimal("0.2"), feature="search", team="cx", start=T0 + 10))
        sink.write_spans(
            [
                decided("a1", "a", "allow", "within budget", 1),
                decided("a2", "a", "allow", "within budget; output capped at 40 tokens", 2),
                decided("a3", "a", "downgrade", "gpt-4o -> gpt-4o-mini: 60% spent", 3),
                decided("b1", "b", "finish", "12 of 12 steps used", 11),
                Span("b2", "b", "tool", "search", T0 + 12),
            ]
        )
    reader = SQLiteTraceReader(db)
    assert [s.span_id for s in reader.decision_spans()] == ["a2", "a3", "b1"]
    assert [s.span_id for s in reader.decision_spans(feature="search")] == ["b1"]
    assert [s.span_id for s in reader.decision_spans(since=T0 + 5)] == ["b1"]
    assert reader.decision_spans(team="growth") == []
    (finish,) = reader.decision_spans(feature="search")
    assert (finish.decision, finish.reason) == ("finish", "12 of 12 steps used")


def test_totals_by_model_come_from_model_spans(populated: Path) -> None:
    reader = SQLiteTraceReader(populated)
    (g,) = reader.totals("model")
    assert g["key"] == "gpt-4o-mini"
    assert g["model_calls"] == 3
    assert g["tasks"] == 3
    assert g["cost_usd"] is None
    assert g["priced_usd"] == Decimal("0.3")
    assert g["unpriced"] == 1
    (faq,) = reader.totals("model", feature="faq")
    assert faq["cost_usd"] == Decimal("0.3")
    assert reader.totals("model", since=T0 + 10**6) == []
    with pytest.raises(ValueError, match="by='tenant'"):
        reader.totals("tenant")  # type: ignore[arg-type]


def test_task_queries_filter_and_order(populated: Path) -> None:
    reader = SQLiteTraceReader(populated)
    assert [t.task_id for t in reader.tasks()] == ["e", "d", "c", "b", "a"]
    assert [t.task_id for t in reader.tasks(limit=2)] == ["e", "d"]
    assert [t.task_id for t in reader.tasks(since=T0 + 20)] == ["e", "d", "c"]
    assert [t.task_id for t in reader.tasks(feature="faq")] == ["b", "a"]
    assert [t.task_id for t in reader.tasks(team="growth", feature="search")] == ["e", "d"]
    assert reader.count_tasks(team="cx") == 3
    assert reader.tasks(feature="nope") == []
    d = reader.task("d")
    assert d is not None
    assert d.cost_usd is None
    assert [s.kind for s in reader.spans("a")] == ["tool", "model"]  # by start time


# -- JSONL ------------------------------------------------------------------------------------


def test_jsonl_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "traces.jsonl"
    spans = [model_span(1, saved_usd=Decimal("0.25")), model_span(2, cost=None)]
    with JSONLSink(path) as sink:
        sink.write_spans(spans)
        sink.write_spans([])
        sink.write_task(record("t1", Decimal("0.000246")))
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(x)["type"] for x in lines] == ["span", "span", "task"]
    assert json.loads(lines[0])["cost_usd"] == "0.000123"
    assert json.loads(lines[0])["attrs"]["saved_usd"] == "0.25"
    assert json.loads(lines[1])["cost_usd"] is None
    back_spans, back_tasks = read_jsonl(path)
    assert back_spans == spans
    assert back_tasks == [record("t1", Decimal("0.000246"))]

    with JSONLSink(path) as sink:  # appends
        sink.write_spans([model_span(3)])
    assert len(read_jsonl(path)[0]) == 3
    with pytest.raises(TraceStoreError, match="closed"):
        sink.write_spans([model_span(4)])


def test_jsonl_keeps_the_last_version_and_skips_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "torn.jsonl"
    with JSONLSink(path) as sink:
        first = Span("x", "t", "model", "m", T0)
        sink.write_spans([first])
        sink.write_spans([Span("x", "t", "model", "m", T0, end=T0 + 1, cost_usd=Decimal("1"))])
    with path.open("a", encoding="utf-8") as f:
        f.write('{"type": "span", "span_id": "torn", "task_')
    (span,), tasks = read_jsonl(path)
    assert span.end == T0 + 1
    assert span.cost_usd == Decimal("1")
    assert tasks == []


def test_jsonl_lines_from_many_threads_never_interleave(tmp_path: Path) -> None:
    path = tmp_path / "threads.jsonl"
    sink = JSONLSink(path)

    def work(t: int) -> None:
        for i in range(200):
            sink.write_spans([model_span(i, task=f"t{t}", pad="y" * 300)])

    pool = [threading.Thread(target=work, args=(t,)) for t in range(16)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    sink.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 16 * 200
    assert all(json.loads(x)["attrs"]["pad"] == "y" * 300 for x in lines)


# -- memory, null, multi, open_sink ------------------------------------------------------------


def test_memory_sink() -> None:
    sink = MemorySink()
    sink.write_spans([model_span(1), model_span(2, task="other")])
    sink.write_task(record("t1", Decimal("1")))
    sink.write_task(record("t1", Decimal("2")))
    sink.flush()
    sink.close()
    assert [s.span_id for s in sink.spans_of("t1")] == ["s00000001"]
    rec = sink.task("t1")
    assert rec is not None
    assert rec.cost_usd == Decimal("2")
    assert sink.task("nope") is None
    sink.clear()
    assert sink.spans == []
    assert sink.tasks == []


def test_multi_sink_calls_every_sink_and_raises_the_first_error() -> None:
    class Broken(NullSink):
        def write_spans(self, spans: object) -> None:
            raise OSError("disk full")

    a, b = MemorySink(), MemorySink()
    multi = MultiSink(a, Broken(), b)
    with pytest.raises(OSError, match="disk full"):
        multi.write_spans([model_span(1)])
    assert len(a.spans) == len(b.spans) == 1
    multi.write_task(record("t", None))
    multi.flush()
    multi.close()
    assert len(a.tasks) == len(b.tasks) == 1


def test_every_sink_satisfies_the_protocol(tmp_path: Path) -> None:
    sinks = [
        NullSink(),
        MemorySink(),
        MultiSink(),
        SQLiteSink(tmp_path / "p.db"),
        JSONLSink(tmp_path / "p.jsonl"),
    ]
    for sink in sinks:
        assert isinstance(sink, TraceSink)
        sink.close()


def test_open_sink(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AGENTGUARD_DB", raising=False)
    default = open_sink(None)
    assert isinstance(default, SQLiteSink)
    assert default.path == "agentguard.db"
    default.close()
    assert (tmp_path / "agentguard.db").exists()

    monkeypatch.setenv("AGENTGUARD_DB", str(tmp_path / "env.db"))
    from_env = open_sink(None)
    assert isinstance(from_env, SQLiteSink)
    assert from_env.path == str(tmp_path / "env.db")
    from_env.close()

    assert isinstance(open_sink(False), NullSink)
    assert isinstance(open_sink("off"), NullSink)
    assert isinstance(open_sink("memory"), MemorySink)
    assert isinstance(open_sink(":memory:"), MemorySink)
    for name, cls in [
        ("t.jsonl", JSONLSink),
        ("t.db", SQLiteSink),
        ("t.sqlite", SQLiteSink),
        ("T.SQLITE3", SQLiteSink),
    ]:
        sink = open_sink(tmp_path / name)
        assert isinstance(sink, cls)
        sink.close()
    mem = MemorySink()
    assert open_sink(mem) is mem
    with pytest.raises(ValueError, match=r"trace='traces\.csv'"):
        open_sink("traces.csv")
    with pytest.raises(ValueError, match="trace=42"):
        open_sink(42)  # type: ignore[arg-type]
