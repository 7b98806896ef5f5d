"""The ``agentguard`` command, run in-process against real trace databases."""

from __future__ import annotations

import io
import json
import sqlite3
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from agentguard._cli import format_usd, main, parse_since
from agentguard._sinks import SQLiteSink
from agentguard._trace import Span, TaskRecord
from agentguard._usage import Usage

T0 = 1_767_312_000.0  # 2026-01-02T00:00:00Z
D = Decimal


def _task(
    task_id: str,
    start: float,
    tags: dict[str, str],
    *,
    status: str = "ok",
    seconds: float = 2.0,
    **kw: object,
) -> TaskRecord:
    return TaskRecord(task_id, None, start, start + seconds, status, tags, **kw)  # type: ignore[arg-type]


def build_db(path: Path) -> Path:
    """Five tasks: a traced support ticket, a cheap one, and three digests (one unpriced)."""
    support = {"feature": "support", "team": "cx", "env": "prod"}
    digest = {"feature": "digest", "team": "growth"}
    with SQLiteSink(path) as sink:
        sink.write_spans(
            [
                Span("t42", "ticket-42", "task", "ticket-42", T0, end=T0 + 4.2,
                     status="finished", usage=Usage(5200, 610, 4096, per_call=False),
                     cost_usd=D("0.0082062"), attrs={"tags": support}),
                Span("s1", "ticket-42", "step", "plan", T0 + 0.01, "t42", T0 + 1.5),
                Span("m1", "ticket-42", "model", "gpt-4o", T0 + 0.02, "s1", T0 + 1.2,
                     model="gpt-4o", usage=Usage(3000, 250, 2048), cost_usd=D("0.0078"),
                     decision="allow"),
                Span("r1", "ticket-42", "retrieval", "kb-search", T0 + 1.21, "s1", T0 + 1.4),
                Span("tr1", "ticket-42", "trim", "context", T0 + 1.41, "s1", T0 + 1.45,
                     decision="trim", reason="context over its 2,000-token budget",
                     attrs={"tokens_saved": 1850, "saved_usd": D("0.004625")}),
                Span("s2", "ticket-42", "step", "act", T0 + 1.5, "t42", T0 + 4.1),
                Span("tl1", "ticket-42", "tool", "lookup_order", T0 + 1.51, "s2", T0 + 1.9),
                Span("d1", "ticket-42", "decision", "budget", T0 + 1.95, "s2", T0 + 1.95,
                     decision="downgrade", reason="62% spent: gpt-4o -> gpt-4o-mini"),
                Span("m2", "ticket-42", "model", "gpt-4o-mini", T0 + 2.0, "s2", T0 + 3.3,
                     model="gpt-4o-mini", usage=Usage(2200, 360, 2048),
                     cost_usd=D("0.0004062"), decision="downgrade"),
                Span("d2", "ticket-42", "decision", "budget", T0 + 3.4, "s2", T0 + 3.4,
                     decision="finish", reason="max_cost_usd reached: final answer"),
                Span("m3", "ticket-43", "model", "gpt-4o-mini", T0 + 10, None, T0 + 11,
                     model="gpt-4o-mini", usage=Usage(1000, 100), cost_usd=D("0.00021")),
                Span("m4", "digest-7", "model", "llama-local", T0 + 20, None, T0 + 21,
                     model="llama-local", usage=Usage(800, 90, estimated=True)),
            ]
        )  # fmt: skip
        sink.write_task(
            _task("ticket-42", T0, support, status="finished", seconds=4.2,
                  usage=Usage(5200, 610, 4096, per_call=False), cost_usd=D("0.0082062"),
                  model_calls=2, tool_calls=1, steps=2,
                  decisions={"downgrade": 1, "finish": 1, "trim": 1},
                  saved_usd=D("0.004625"), tokens_saved=1850, limit_hit="max_cost_usd")
        )  # fmt: skip
        sink.write_task(
            _task("ticket-43", T0 + 10, {"feature": "support", "team": "cx"},
                  usage=Usage(1000, 100), cost_usd=D("0.00021"), model_calls=1)
        )  # fmt: skip
        sink.write_task(
            _task("digest-7", T0 + 20, digest, usage=Usage(800, 90, estimated=True),
                  cost_usd=None, model_calls=1, tool_calls=2, retries=1, steps=3)
        )  # fmt: skip
        sink.write_task(
            _task("digest-8", T0 + 30, digest, usage=Usage(400, 40), cost_usd=D("0.1"),
                  model_calls=1)
        )  # fmt: skip
        sink.write_task(
            _task("digest-9", T0 + 40, digest, usage=Usage(400, 40), cost_usd=D("0.2"),
                  model_calls=1, decisions={"warn": 1})
        )  # fmt: skip
    return path


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return build_db(tmp_path / "agentguard.db")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- report ------------------------------------------------------------------------------------

REPORT_TASKS = """\
Tasks
TASK       FEATURE  TEAM    MODEL CALLS  TOOL CALLS  INPUT TOK  OUTPUT TOK        COST      SAVED  DECISIONS                    LIMIT HIT
digest-9   digest   growth            1           0        400          40       $0.20      $0.00  warn×1                       -
digest-8   digest   growth            1           0        400          40       $0.10      $0.00  -                            -
digest-7   digest   growth            1           2       ~800         ~90     unknown      $0.00  -                            -
ticket-43  support  cx                1           0      1,000         100    $0.00021      $0.00  -                            -
ticket-42  support  cx                2           1      5,200         610  $0.0082062  $0.004625  trim×1 downgrade×1 finish×1  max_cost_usd
"""  # noqa: E501

REPORT_TOTALS = """\
Totals by feature
FEATURE  TASKS  MODEL CALLS  INPUT TOK  OUTPUT TOK                         COST      SAVED
digest       3            3      1,600         170  unknown: $0.30 + 1 unpriced      $0.00
support      2            3      6,200         710                   $0.0084162  $0.004625
"""


def test_report_tables(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "report", "--db", str(db))
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == f"agentguard report: 5 tasks (db {db})"
    assert REPORT_TASKS in out
    assert REPORT_TOTALS in out

    lines = out.splitlines()
    header = lines[lines.index("Tasks") + 1]
    assert header.split("  ")[0] == "TASK"
    ticket = next(line for line in lines if line.startswith("ticket-42 "))
    assert "$0.0082062" in ticket  # exact, not rounded to $0.01
    assert ticket.endswith("trim×1 downgrade×1 finish×1  max_cost_usd")

    top = lines[lines.index("Top 5 tasks by cost") :][:7]
    assert top[0] == "Top 5 tasks by cost"
    assert [row.split()[1] for row in top[2:]] == [
        "digest-9",
        "digest-8",
        "ticket-42",
        "ticket-43",
        "digest-7",  # unknown cost ranks last, never as 0
    ]
    assert top[-1].split()[-2:] == ["unknown", "$0.00"]

    team = lines[lines.index("Totals by team") :][:4]
    assert team[2].split()[:2] == ["growth", "3"]
    assert "$0.0084162" in team[3]

    model = lines[lines.index("Totals by model") :][:5]
    assert model[1].split() == ["MODEL", "TASKS", "CALLS", "INPUT", "TOK", "OUTPUT", "TOK",
                                "COST"]  # fmt: skip
    rows = {r.split()[0]: r for r in model[2:]}
    assert rows["gpt-4o"].split()[-1] == "$0.0078"
    assert rows["gpt-4o-mini"].split()[1:3] == ["2", "2"]
    assert rows["gpt-4o-mini"].split()[-1] == "$0.0006162"
    assert "unknown: $0.00 + 1 unpriced" in rows["llama-local"]


def test_report_filters_and_limits(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "report", "--db", str(db), "--feature", "support", "--top", "1")
    assert code == 0
    assert out.splitlines()[0] == f"agentguard report: 2 tasks (db {db}, feature=support)"
    assert "digest" not in out
    assert "Top 1 tasks by cost" in out
    lines = out.splitlines()
    assert lines[lines.index("Top 1 tasks by cost") + 2].split()[1] == "ticket-42"
    model = lines[lines.index("Totals by model") :]
    assert "llama-local" not in "\n".join(model)

    code, out, _ = run(capsys, "report", "--db", str(db), "--team", "growth", "--limit", "2")
    assert code == 0
    assert "Tasks (latest 2 of 3)" in out
    assert "digest-7" not in out.split("Top")[0]

    code, out, _ = run(capsys, "report", "--db", str(db), "--since", "2026-01-02T00:00:25Z")
    assert code == 0
    assert out.startswith("agentguard report: 2 tasks (db ")
    assert "since 2026-01-02 00:00:25 UTC" in out.splitlines()[0]

    code, out, _ = run(capsys, "report", "--db", str(db), "--since", "1h")
    assert code == 0
    assert "agentguard report: 0 tasks" in out
    assert "no tasks recorded in this window" in out


def test_report_json(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "report", "--db", str(db), "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["task_count"] == 5
    assert [t["task_id"] for t in doc["tasks"]] == [
        "digest-9",
        "digest-8",
        "digest-7",
        "ticket-43",
        "ticket-42",
    ]
    t42 = doc["tasks"][-1]
    assert t42["cost_usd"] == "0.0082062"
    assert t42["decisions"] == {"downgrade": 1, "finish": 1, "trim": 1}
    assert TaskRecord.from_dict(t42).saved_usd == D("0.004625")
    assert doc["tasks"][2]["cost_usd"] is None
    assert doc["top_by_cost"][0] == {"task_id": "digest-9", "feature": "digest", "cost_usd": "0.2"}
    feature = {g["key"]: g for g in doc["totals"]["feature"]}
    assert feature["digest"]["cost_usd"] is None
    assert feature["digest"]["priced_usd"] == "0.3"
    assert feature["digest"]["unpriced"] == 1
    assert feature["support"]["cost_usd"] == "0.0084162"
    model = {g["key"]: g for g in doc["totals"]["model"]}
    assert model["gpt-4o-mini"]["cost_usd"] == "0.0006162"


def test_report_on_an_empty_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "empty.db"
    SQLiteSink(db).close()
    code, out, _ = run(capsys, "report", "--db", str(db))
    assert code == 0
    assert "0 tasks" in out
    assert "no tasks recorded" in out


def test_db_defaults_to_the_environment_variable(
    db: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTGUARD_DB", str(db))
    code, out, _ = run(capsys, "report")
    assert code == 0
    assert "5 tasks" in out


def test_db_defaults_to_agentguard_db_in_the_current_directory(
    db: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AGENTGUARD_DB", raising=False)
    monkeypatch.chdir(db.parent)
    code, out, _ = run(capsys, "trace", "ticket-43")
    assert code == 0
    assert out.startswith("task ticket-43  status=ok  feature=support team=cx")


# -- trace -------------------------------------------------------------------------------------

TRACE_TREE = """\
SPAN                KIND            MS  MODEL        IN TOK  OUT TOK        COST  DECISION   REASON
ticket-42           task       4,200.0                5,200      610  $0.0082062
├─ plan             step       1,490.0
│  ├─ gpt-4o        model      1,180.0  gpt-4o        3,000      250     $0.0078  allow
│  ├─ kb-search     retrieval    190.0
│  └─ context       trim          40.0                                            trim       context over its 2,000-token budget (saved 1,850 tok, $0.004625)
└─ act              step       2,600.0
   ├─ lookup_order  tool         390.0
   ├─ budget        decision       0.0                                            downgrade  62% spent: gpt-4o -> gpt-4o-mini
   ├─ gpt-4o-mini   model      1,300.0  gpt-4o-mini   2,200      360  $0.0004062  downgrade
   └─ budget        decision       0.0                                            finish     max_cost_usd reached: final answer
"""  # noqa: E501


def test_trace_tree(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "trace", "ticket-42", "--db", str(db))
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == "task ticket-42  status=finished  env=prod feature=support team=cx"
    assert lines[1].split("  ")[1:] == [
        "started 2026-01-02 00:00:00 UTC",
        "duration 4,200.0 ms",
        "cost $0.0082062",
        "saved $0.004625",
        "model calls 2",
        "tool calls 1",
        "tokens in 5,200 / out 610",
        "decisions trim×1 downgrade×1 finish×1",
        "limit hit max_cost_usd",
    ]
    assert out.endswith(TRACE_TREE)


def test_trace_of_an_unpriced_call_says_unknown(
    db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "trace", "digest-7", "--db", str(db))
    assert code == 0
    assert "cost unknown" in out.splitlines()[1]
    row = out.splitlines()[-1]
    assert row.split() == ["llama-local", "model", "1,000.0", "llama-local", "~800", "~90",
                           "unknown"]  # fmt: skip


def test_trace_without_a_task_record_yet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "running.db"
    with SQLiteSink(db) as sink:
        sink.write_spans([Span("a", "live-1", "task", "live-1", T0),
                          Span("b", "live-1", "tool", "search", T0 + 1, "a")])  # fmt: skip
    code, out, _ = run(capsys, "trace", "live-1", "--db", str(db))
    assert code == 0
    assert "no task record yet" in out.splitlines()[0]
    assert out.splitlines()[-2].split()[:3] == ["live-1", "task", "open"]
    assert out.splitlines()[-1].split()[:3] == ["└─", "search", "tool"]


def test_trace_lists_sub_tasks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "nested.db"
    with SQLiteSink(db) as sink:
        sink.write_spans([Span("p", "parent", "task", "parent", T0, end=T0 + 5)])
        sink.write_task(_task("parent", T0, {}, cost_usd=D("0.01"), seconds=5))
        for i, cost in enumerate([D("0.002"), None]):
            child = TaskRecord(f"sub-{i}", "parent", T0 + 1 + i, T0 + 2 + i, "ok", {},
                               cost_usd=cost)  # fmt: skip
            sink.write_task(child)
    code, out, _ = run(capsys, "trace", "parent", "--db", str(db))
    assert code == 0
    assert "  sub-tasks (costs not included above): sub-0 ($0.002), sub-1 (unknown)" in out
    code, out, _ = run(capsys, "trace", "parent", "--db", str(db), "--json")
    assert [c["task_id"] for c in json.loads(out)["children"]] == ["sub-0", "sub-1"]
    code, out, _ = run(capsys, "trace", "sub-1", "--db", str(db))
    assert code == 0
    assert "  parent task parent" in out
    assert "(no spans recorded)" in out


def test_trace_on_an_ascii_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "ascii.db"
    with SQLiteSink(db) as sink:
        sink.write_spans([Span("a", "t-1", "task", "t-1", T0, end=T0 + 1),
                          Span("b", "t-1", "tool", "résumé⚡", T0, "a", T0 + 1)])  # fmt: skip
        sink.write_task(_task("t-1", T0, {"feature": "café"}, decisions={"trim": 2}))
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="ascii"))
    assert main(["trace", "t-1", "--db", str(db)]) == 0
    sys.stdout.flush()
    text = raw.getvalue().decode("ascii")
    assert "feature=caf?" in text
    assert "decisions trimx2" in text
    assert text.splitlines()[-1].split()[:3] == ["`-", "r?sum??", "tool"]


def test_trace_json(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "trace", "ticket-42", "--db", str(db), "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["task"]["task_id"] == "ticket-42"
    assert doc["task"]["cost_usd"] == "0.0082062"
    spans = [Span.from_dict(s) for s in doc["spans"]]
    assert [s.span_id for s in spans] == ["t42", "s1", "m1", "r1", "tr1", "s2", "tl1", "d1",
                                          "m2", "d2"]  # fmt: skip
    assert spans[2].cost_usd == D("0.0078")
    assert spans[4].attrs["saved_usd"] == D("0.004625")


def test_trace_of_an_unknown_task(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "trace", "nope", "--db", str(db))
    assert code == 2
    assert out == ""
    assert err == f"agentguard: error: unknown task id 'nope' in {db}\n"


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["report"], ["trace", "ticket-42"]])
def test_a_missing_database_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    missing = tmp_path / "nowhere.db"
    code, out, err = run(capsys, *argv, "--db", str(missing))
    assert code == 2
    assert out == ""
    assert err == (
        f"agentguard: error: no trace database at {missing}; "
        "run something under a Guard first or pass --db\n"
    )
    assert not missing.exists()  # reading never creates the file


def test_a_foreign_sqlite_file_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE t (x)")
    conn.close()
    code, _, err = run(capsys, "report", "--db", str(other))
    assert code == 2
    assert "is not an agentguard trace database" in err
    assert "Traceback" not in err


def test_usage_errors_exit_2(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "report", "--db", str(db), "--since", "yesterday")
    assert code == 2
    assert "--since 'yesterday': expected a duration" in err
    code, _, err = run(capsys, "report", "--db", str(db), "--top", "0")
    assert code == 2
    assert "expected a positive integer" in err
    code, _, err = run(capsys)
    assert code == 2
    assert "usage: agentguard" in err
    code, _, err = run(capsys, "bogus")
    assert code == 2
    code, out, _ = run(capsys, "--help")
    assert code == 0
    assert "report" in out
    assert "trace" in out
    assert "prices" in out


# -- prices ------------------------------------------------------------------------------------


def _rate_table(out: str, title: str) -> dict[str, list[str]]:
    lines = out.splitlines()
    i = next(n for n, line in enumerate(lines) if line.startswith(title))
    rows: dict[str, list[str]] = {}
    for line in lines[i + 1 :]:
        if not line:
            break
        label, *cells = [c.strip() for c in line.split("  ") if c.strip()]
        rows[label] = cells
    return rows


def test_prices(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "prices", "gpt-4o", "--provider", "openai")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[:3] == ["model     gpt-4o", "provider  openai", lines[2]]
    assert lines[2].startswith("source    genai-prices")
    assert _rate_table(out, "RATE") == {
        "input": ["$2.50"],
        "cached input": ["$1.25"],
        "cache write": ["as input"],  # no cache-write price: billed as input, not "free"
        "output": ["$10.00"],
    }
    assert "tiers" not in out


def test_prices_with_long_context_tiers(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "prices", "claude-sonnet-4-5")
    assert code == 0
    assert "provider  anthropic" in out
    assert _rate_table(out, "RATE")["cache write"] == ["$3.75"]
    tiers = _rate_table(out, "ABOVE INPUT TOK")
    assert tiers == {"200,000": ["$6.00", "$0.60", "$7.50", "$22.50"]}


def test_prices_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "prices", "gpt-4o", "--provider", "openai", "--json")
    assert code == 0
    doc = json.loads(out)
    assert (doc["model"], doc["provider"]) == ("gpt-4o", "openai")
    assert doc["source"].startswith("genai-prices")
    assert D(doc["per_million"]["input"]) == D("2.5")
    assert D(doc["per_million"]["cache_read"]) == D("1.25")
    assert D(doc["per_million"]["output"]) == D("10")
    assert doc["per_million"]["cache_write"] is None
    assert D(doc["per_token"]["input"]) == D("0.0000025")
    assert doc["tiers"] == []


def test_prices_of_an_unknown_model(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "prices", "no-such-model-xyz")
    assert code == 2
    assert out == ""
    assert "no price known for model 'no-such-model-xyz'" in err


# -- formatting --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (D("0.001234"), "$0.001234"),
        (D("0.000000000001"), "$0.000000000001"),
        (D("1E-7"), "$0.0000001"),
        (D("0"), "$0.00"),
        (D("0.00"), "$0.00"),
        (D("0.5"), "$0.50"),
        (D("1234.5"), "$1,234.50"),
        (D("2.500000"), "$2.50"),
        (D("1E+3"), "$1,000.00"),
        (D("-0.25"), "-$0.25"),
        (None, "unknown"),
    ],
)
def test_format_usd_is_exact(value: Decimal | None, text: str) -> None:
    assert format_usd(value) == text


def test_parse_since() -> None:
    now = 1_000_000.0
    assert parse_since("24h", now=now) == now - 86400
    assert parse_since("7d", now=now) == now - 7 * 86400
    assert parse_since("30m", now=now) == now - 1800
    assert parse_since("90s", now=now) == now - 90
    assert parse_since("2w", now=now) == now - 14 * 86400
    assert parse_since("1.5h", now=now) == now - 5400
    assert parse_since("2026-01-02") == T0  # naive means UTC
    assert parse_since("2026-01-02T01:00:00+01:00") == T0
