"""``agentguard report --html``: rendered from real traces, checked in a real headless Chromium.

The traces come from a real :class:`~agentguard.Guard` writing a real SQLite file, driven by
:class:`~agentguard.testing.ScriptedModel` (usage counted with the model's tokenizer). The page
is loaded from a file by Chromium (``tests/chromium.py``); the assertions read what the browser
shows after the page's script ran — visible text, waterfall rows, hidden sections, the chart —
and what it fetched (nothing: the page's Content-Security-Policy forbids it, and a control page
with a stray image proves the checks would see one).
"""

from __future__ import annotations

import html
import http.server
import io
import json
import re
import threading
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar

import pytest
from chromium import BrowserNotFoundError, find_browser, probe, require_browser, run

import agentguard as ag
from agentguard._cli import format_usd, main
from agentguard._html import CSP, MAX_DECISION_ROWS, MAX_GROUP_ROWS, render_report
from agentguard._sinks import SQLiteSink, SQLiteTraceReader
from agentguard._trace import Span, TaskRecord
from agentguard._usage import Usage
from agentguard.testing import ScriptedModel

HOSTILE_FEATURE = '<script>window.__pwned="feature"</script>'
HOSTILE_TOOL = "lookup<img src=x onerror=\"window.__pwned='tool'\">"
HOSTILE_TASK = 'ticket-<b>42</b>&"x"'
SECRET = "SECRET-PROMPT-TEXT-7f3a"


# -- a real trace --------------------------------------------------------------------------


def _agent_run(guard: ag.Guard, task_id: str, feature: str, team: str) -> ag.Task:
    """A runaway tool-calling agent: steps, model calls, tools, a retry, a retrieval, a trim."""
    model = ScriptedModel("gpt-4o", reply_tokens=300)
    history: list[dict[str, str]] = [{"role": "user", "content": f"Help me. {SECRET}"}]
    with guard.task(task_id, feature=feature, team=team) as task:
        chunks = [" ".join(f"w{i}x{j}" for j in range(150)) + "." for i in range(6)]
        task.record_retrieval("kb", documents=len(chunks), texts=chunks)
        kept = task.trim(chunks, model="gpt-4o")
        assert kept.tokens_saved > 0
        history.append({"role": "system", "content": " ".join(c.text for c in kept.kept)})
        task.record_retry("rate limited")
        for _ in range(40):
            if task.step("agent").action == "finish":
                model.invoke(task, history, final=True)
                break
            reply = model.invoke(task, history)
            if reply.finished:
                break
            history.append({"role": "assistant", "content": reply.text})
            tool = task.start_tool_call(HOSTILE_TOOL)
            if not tool.allowed:
                continue
            tool.end()
    return task


@pytest.fixture(scope="module")
def trace_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trace file written by real guards: a downgraded, trimmed, capped agent run with
    hostile names; a cheap run; an unpriced model; a stream without usage (estimated)."""
    db = tmp_path_factory.mktemp("html") / "traces.db"
    policy = ag.Policy(
        max_cost_usd="0.03",
        max_tool_calls=8,
        max_retries=3,
        max_output_tokens=400,
        context_budget_tokens=600,
        soft_limits=(0.5, 0.8),
        downgrade=[ag.Downgrade(at=0.5, to="gpt-4o-mini")],
        on_limit="finish",
    )
    guard = ag.Guard(policy, traces=str(db))
    _agent_run(guard, HOSTILE_TASK, HOSTILE_FEATURE, "cx")
    _agent_run(guard, "ticket-7", "support", "cx")
    with guard.task("quick-1", feature="faq", team="search") as task:
        ScriptedModel("gpt-4o-mini", replies=["Five days."]).invoke(
            task, [{"role": "user", "content": SECRET}]
        )
    tight = policy.model_copy(update={"max_cost_usd": Decimal("0.0002")})
    with guard.task("tight-1", policy=tight, feature="faq", team="search") as task:
        # the output cap comes from what is left of the budget: a "cap" decision
        ScriptedModel("gpt-4o-mini", reply_tokens=400).invoke(
            task, [{"role": "user", "content": "hi"}]
        )
    with guard.task("nousage-1", feature="faq", team="search") as task:
        ScriptedModel("gpt-4o-mini", replies=["No usage here."], report_usage=False).invoke(
            task, [{"role": "user", "content": "hi"}]
        )
    guard.close()
    # An unpriced self-hosted model: no money limit, so the guard lets it run, cost unknown.
    free = ag.Guard(ag.Policy(max_model_calls=5), traces=str(db))
    with free.task("local-1", feature="faq", team="search") as task:
        ScriptedModel("acme-private-llm", replies=["ok"]).invoke(
            task, [{"role": "user", "content": "hi"}]
        )
    free.close()
    return db


@pytest.fixture(scope="module")
def browser() -> str:
    return require_browser()


@pytest.fixture(scope="module")
def records(trace_db: Path) -> dict[str, TaskRecord]:
    with SQLiteTraceReader(trace_db) as reader:
        return {t.task_id: t for t in reader.tasks()}


@pytest.fixture(scope="module")
def shown(trace_db: Path, browser: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The report for ``trace_db``, rendered by the CLI and loaded in Chromium."""
    out = tmp_path_factory.mktemp("html-out") / "report.html"
    with redirect_stdout(io.StringIO()):
        assert main(["report", "--db", str(trace_db), "--html", str(out)]) == 0
    page = out.read_text(encoding="utf-8")
    data, log = probe(browser, page, out.parent)
    return page, data, log


def _visible_lines(data: dict[str, Any]) -> list[str]:
    return [line.strip() for line in data["text"].splitlines() if line.strip()]


# -- what the browser shows ----------------------------------------------------------------


def test_page_loads_with_its_script_and_headings(shown: Any) -> None:
    _, data, _ = shown
    assert data["errors"] == []
    assert data["jsReady"] == "ready"
    assert data["title"] == "agentguard cost report"
    h2 = [h[3:] for h in data["headings"] if h.startswith("H2 ")]
    assert h2 == [
        "Summary",
        "Spend over time",
        "Top tasks by cost",
        "Spend by feature, team and model",
        "Decisions and what they saved",
        "Task waterfalls",
    ]


def test_summary_shows_exact_spend_and_unknown_cost(
    shown: Any, records: dict[str, TaskRecord]
) -> None:
    _, data, _ = shown
    priced = sum((r.cost_usd for r in records.values() if r.cost_usd is not None), Decimal(0))
    unpriced = [r.task_id for r in records.values() if r.cost_usd is None]
    assert unpriced == ["local-1"]
    lines = _visible_lines(data)
    spend = lines[lines.index("Spend") + 1]
    # one task could not be priced: the total is unknown, never a silent partial sum or $0
    assert spend == f"unknown ({format_usd(priced)} priced + 1 unpriced)"
    saved = sum((r.saved_usd for r in records.values()), Decimal(0))
    assert saved > 0
    assert lines[lines.index("Saved by decisions") + 1] == format_usd(saved)
    assert lines[lines.index("Tasks") + 1] == str(len(records))


def test_top_tasks_rows(shown: Any, records: dict[str, TaskRecord]) -> None:
    _, data, _ = shown
    text = data["text"]
    hostile = records[HOSTILE_TASK]
    # hostile ids and tags are shown as text, never run as markup
    assert f"{HOSTILE_TASK}\t{HOSTILE_FEATURE}\tcx\t" in text
    assert format_usd(hostile.cost_usd) in text
    assert data["pwned"] is None and data["images"] == 0
    local = next(line for line in text.splitlines() if "\tlocal-1\t" in line)
    assert "\tunknown\t" in local and "$0.00\t" not in local.split("unknown")[0]
    # the run without usage: its cost comes from estimated tokens and is marked
    est = next(line for line in text.splitlines() if "\tnousage-1\t" in line)
    assert f"~{format_usd(records['nousage-1'].cost_usd)}" in est


def test_waterfall_rows_match_the_trace(shown: Any, trace_db: Path) -> None:
    _, data, _ = shown
    first = next(s for s in data["sections"] if s["task"] == HOSTILE_TASK)
    with SQLiteTraceReader(trace_db) as reader:
        spans = reader.spans(HOSTILE_TASK)
    rows = first["rows"]
    assert len(rows) == len(spans)
    kinds = {r["kind"] for r in rows}
    assert {"task", "step", "model", "tool", "retry", "retrieval", "trim", "decision"} <= kinds
    by_kind: dict[str, list[Span]] = {}
    for s in spans:
        by_kind.setdefault(s.kind, []).append(s)
    model_rows = [r for r in rows if r["kind"] == "model"]
    # the tree order is not the start order: compare the multisets of costs and token pairs
    assert sorted(r["cells"][6] for r in model_rows) == sorted(
        format_usd(s.cost_usd) for s in by_kind["model"]
    )
    assert sorted(r["cells"][5] for r in model_rows) == sorted(
        f"{s.usage.input_tokens:,} / {s.usage.output_tokens:,}"
        for s in by_kind["model"]
        if s.usage is not None
    )
    tool_rows = [r for r in rows if r["kind"] == "tool"]
    assert {r["cells"][0] for r in tool_rows} == {HOSTILE_TOOL}
    # every row has a bar drawn inside the timeline, the task's own bar spans it
    task_row = rows[0]
    assert task_row["kind"] == "task" and task_row["bar"]["width"] == "100%"
    shown_first = data["sections"][0]
    assert shown_first["visible"] and shown_first["rows"][0]["bar"]["px"] > 150
    for r in rows:
        left = float(r["bar"]["left"].rstrip("%"))
        width = float(r["bar"]["width"].rstrip("%"))
        assert left >= 0 and left + width <= 100.01
    downgraded = [r for r in model_rows if "downgrade" in r["cells"][7]]
    assert downgraded and all("saved $" in r["cells"][7] for r in downgraded)
    assert any("finish" in r["cells"][7] for r in rows if r["kind"] == "decision")


def test_selector_shows_one_waterfall_at_a_time(shown: Any) -> None:
    _, data, _ = shown
    ids = [s["id"] for s in data["sections"]]
    assert len(ids) == 6  # every task of the trace, most expensive first
    assert data["visibleAtStart"] == ["task-0"]
    assert data["options"] == len(ids) + 1
    assert data["switched"] == {"to": "1", "visible": ["task-1"], "all": ids}


def test_decisions_and_savings_match_the_spans(shown: Any, trace_db: Path) -> None:
    _, data, _ = shown
    kinds = data["decisionKinds"]
    with SQLiteTraceReader(trace_db) as reader:
        spans = [s for t in reader.tasks() for s in reader.spans(t.task_id)]
    for kind in ("downgrade", "trim"):
        mine = [s for s in spans if s.decision == kind]
        saved = sum((s.attrs["saved_usd"] for s in mine if "saved_usd" in s.attrs), Decimal(0))
        assert saved > 0
        assert kinds[kind][2] == str(len(mine))
        assert kinds[kind][4] == format_usd(saved)
    # the list has one row per task and kind: the hostile task's downgrades, summed
    down = [s for s in spans if s.decision == "downgrade" and s.task_id == HOSTILE_TASK]
    text = data["text"].replace("\xa0", " ")
    start = text.index(f"{HOSTILE_TASK}\t", text.index("largest saving first"))
    row = text[start : text.index("\n", text.index("\nlast: ", start) + 1)]
    assert f"\tdowngrade ×{len(down)}\tgpt-4o → gpt-4o-mini\tfirst: " in row
    assert row.endswith("\t" + format_usd(sum((s.attrs["saved_usd"] for s in down), Decimal(0))))
    finishes = [s for s in spans if s.decision == "finish"]
    assert kinds["finish"][2] == str(len(finishes)) and kinds["finish"][4] == "—"
    assert "soft_limit" in kinds
    assert kinds["cap"][2] == "1" and kinds["cap"][3] == "1"  # tight-1's output cap


def test_chart_has_bars_and_a_text_alternative(shown: Any) -> None:
    _, data, _ = shown
    chart = data["chart"]
    assert chart["role"] == "img" and chart["labelledby"] == "chart-t chart-d"
    assert chart["bars"] >= 1 and chart["height"] > 100
    assert chart["title"].startswith("Spend per ")
    assert chart["desc"].startswith("Bar chart of spend per ")


def test_no_request_leaves_the_page(shown: Any) -> None:
    page, data, log = shown
    meta = html.escape(CSP, quote=True)
    assert f'<meta http-equiv="Content-Security-Policy" content="{meta}">' in page
    assert data["violations"] == []
    assert data["resources"] == []
    assert data["external"] == []
    assert "Content Security Policy" not in log  # Chromium logs every blocked load


def test_no_prompt_text_without_opt_in(shown: Any) -> None:
    page, data, _ = shown
    assert SECRET not in page and SECRET not in data["text"]


# -- controls: the checks above can fail ---------------------------------------------------


class _Counter(http.server.BaseHTTPRequestHandler):
    hits: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        type(self).hits.append(self.path)
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def local_server() -> Iterator[tuple[str, list[str]]]:
    hits: list[str] = []
    handler = type("Handler", (_Counter,), {"hits": hits})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()


def test_control_a_stray_fetch_is_blocked_and_seen(
    shown: Any, browser: str, local_server: tuple[str, list[str]], tmp_path: Path
) -> None:
    page, _, _ = shown
    url, hits = local_server
    stray = page.replace("</main>", f'<img src="{url}/leak.png" alt=""></main>')
    data, log = probe(browser, stray, tmp_path)
    assert any(f"{url}/leak.png" in v for v in data["violations"])
    assert f"'{url}/leak.png' violates the following Content Security Policy directive" in log
    assert any(e.startswith(f"IMG src={url}") for e in data["external"])
    assert hits == []  # the CSP held
    # without the CSP the same page does reach the server: the check above is not vacuous
    open_page = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", stray)
    data, _ = probe(browser, open_page, tmp_path, "open.html")
    assert hits == ["/leak.png"]
    assert any("leak.png" in r for r in data["resources"])


def test_control_unescaped_markup_would_run(browser: str, tmp_path: Path) -> None:
    page = (
        "<!DOCTYPE html><html><head><title>x</title></head><body>"
        f"<p>{HOSTILE_TOOL}</p><script>document.documentElement.setAttribute('data-js','ready')"
        "</script></body></html>"
    )
    data, _ = probe(browser, page, tmp_path)
    assert data["pwned"] == "tool" and data["images"] == 1


# -- content, scale, empty -----------------------------------------------------------------


def test_captured_content_is_shown_only_when_opted_in(tmp_path: Path, browser: str) -> None:
    db = tmp_path / "content.db"
    guard = ag.Guard(ag.Policy(max_cost_usd="1"), traces=str(db), capture_content=True)
    with guard.task("captured-1") as task:
        ScriptedModel("gpt-4o-mini", replies=["The <answer> & more"]).invoke(
            task, [{"role": "user", "content": f"{SECRET} <b>bold?</b>"}]
        )
    guard.close()
    with SQLiteTraceReader(db) as reader:
        page = render_report(reader)
    data, _ = probe(browser, page, tmp_path)
    assert data["errors"] == [] and data["pwned"] is None
    row = next(r for r in data["sections"][0]["rows"] if r["kind"] == "model")
    assert "prompt" in row["cells"][0] and "completion" in row["cells"][0]
    assert f"{SECRET} <b>bold?</b>" in page.replace("&lt;", "<").replace("&gt;", ">")
    assert "<b>bold?</b>" not in page


def test_timeline_zooms_onto_late_calls(tmp_path: Path, browser: str) -> None:
    """A task whose calls start 800 ms in: the script zooms the bars onto 800..1000 ms."""
    db = tmp_path / "late.db"
    t0 = 1_790_000_000.0
    with SQLiteSink(db) as sink:
        sink.write_spans(
            [
                Span("t", "late-1", "task", "late-1", t0, end=t0 + 1.0),
                Span("s", "late-1", "step", "plan", t0 + 0.005, "t", t0 + 0.005),
                Span("m", "late-1", "model", "gpt-4o", t0 + 0.8, "s", t0 + 0.9, model="gpt-4o",
                     usage=Usage(100, 10), cost_usd=Decimal("0.00035")),
                Span("x", "late-1", "tool", "search", t0 + 0.9, "s", t0 + 0.95),
            ]
        )  # fmt: skip
        sink.write_task(
            TaskRecord("late-1", None, t0, t0 + 1.0, "ok", {}, Usage(100, 10), Decimal("0.00035"))
        )
    with SQLiteTraceReader(db) as reader:
        page = render_report(reader)
    data, _ = probe(browser, page, tmp_path)
    zoom = data["zoom"]
    assert zoom["shown"] and zoom["checked"]
    assert "800.0 – 1,000.0 ms" in zoom["label"]
    # rows in tree order: task, step, model, tool
    assert zoom["zoomed"] == [["0%", "100%"], ["0%", "0.4%"], ["0%", "50%"], ["50%", "25%"]]
    assert not zoom["checkedAfter"]
    assert zoom["full"] == [["0%", "100%"], ["0.5%", "0.4%"], ["80%", "10%"], ["90%", "5%"]]


def test_empty_database(tmp_path: Path, browser: str) -> None:
    db = tmp_path / "empty.db"
    SQLiteSink(db).close()
    out = tmp_path / "empty.html"
    with redirect_stdout(io.StringIO()):
        assert main(["report", "--db", str(db), "--html", str(out)]) == 0
    data, _ = probe(browser, out.read_text(encoding="utf-8"), tmp_path)
    assert data["errors"] == [] and data["violations"] == []
    assert data["jsReady"] is None  # no selector: the script has nothing to do
    assert data["text"].count("No tasks recorded in this window.") == 3
    assert "No decisions were taken in this window." in data["text"]
    lines = _visible_lines(data)
    assert lines[lines.index("Spend") + 1] == "$0.00"  # no tasks: a known zero
    assert data["sections"] == [] and data["chart"] is None


def test_thousands_of_tasks_stay_bounded(tmp_path: Path, browser: str) -> None:
    db = tmp_path / "many.db"
    t0 = 1_790_000_000.0
    n = 3000
    with SQLiteSink(db) as sink:
        for i in range(n):
            start = t0 + i * 60.0
            cost = Decimal(i % 97 + 1) / Decimal(100000)
            spans = [
                Span(f"t{i}", f"task-{i}", "task", f"task-{i}", start, end=start + 2.0),
                Span(f"s{i}", f"task-{i}", "step", "agent", start + 0.01, f"t{i}", start + 1.9),
            ]
            spans += [
                Span(f"m{i}-{k}", f"task-{i}", "model", "gpt-4o", start + 0.1 + k * 0.3,
                     f"s{i}", start + 0.35 + k * 0.3, model="gpt-4o-mini",
                     usage=Usage(1000, 50), cost_usd=cost / 5, decision="downgrade",
                     reason="over 60%", attrs={"saved_usd": cost / 10})
                for k in range(5)
            ]  # fmt: skip
            sink.write_spans(spans)
            sink.write_task(
                TaskRecord(f"task-{i}", None, start, start + 2.0, "ok",
                           {"feature": f"f{i % 40}", "team": f"team{i % 3}"}, Usage(5000, 250),
                           cost, model_calls=5, decisions={"downgrade": 5}, saved_usd=cost / 2)
            )  # fmt: skip
    out = tmp_path / "many.html"
    with redirect_stdout(io.StringIO()):
        assert main(["report", "--db", str(db), "--html", str(out), "--waterfalls", "15"]) == 0
    page = out.read_text(encoding="utf-8")
    assert len(page.encode()) < 400_000  # ~150 KB: the page does not grow with the tasks
    data, _ = probe(browser, page, tmp_path)
    assert data["errors"] == []
    assert len(data["sections"]) == 15 and data["options"] == 16
    assert all(len(s["rows"]) == 7 for s in data["sections"])
    kinds = data["decisionKinds"]
    assert kinds["downgrade"][2] == f"{5 * n:,}" and kinds["downgrade"][3] == f"{n:,}"
    assert f"the first {MAX_DECISION_ROWS:,} of {n:,} rows" in data["text"]  # one per task
    assert 2 <= data["chart"]["bars"] <= 60
    # 40 features: the table shows the 25 most expensive and sums the other 15 in one row
    by_feature: dict[str, Decimal] = {}
    for i in range(n):
        by_feature[f"f{i % 40}"] = by_feature.get(f"f{i % 40}", Decimal(0)) + Decimal(
            i % 97 + 1
        ) / Decimal(100000)
    rest = sorted(by_feature.values(), reverse=True)[MAX_GROUP_ROWS:]
    assert f"\n{len(rest)} more\t" in data["text"]
    more = next(line for line in data["text"].splitlines() if line.startswith("15 more\t"))
    assert more.endswith("\t" + format_usd(sum(rest, Decimal(0))))
    total = sum((Decimal(i % 97 + 1) / Decimal(100000) for i in range(n)), Decimal(0))
    lines = _visible_lines(data)
    assert lines[lines.index("Spend") + 1] == format_usd(total)


# -- the command ---------------------------------------------------------------------------


def test_cli_filters_and_json(trace_db: Path, tmp_path: Path) -> None:
    out = tmp_path / "faq.html"
    buf = io.StringIO()
    with redirect_stdout(buf):
        code = main(["report", "--db", str(trace_db), "--feature", "faq", "--html", str(out)])
    assert code == 0 and buf.getvalue().startswith(f"wrote {out} (")
    page = out.read_text(encoding="utf-8")
    assert "quick-1" in page and "ticket-7" not in page and "4 tasks" in page
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["report", "--db", str(trace_db), "--json", "--html", str(out)]) == 0
    doc = json.loads(buf.getvalue())
    assert doc == {"html": str(out), "bytes": out.stat().st_size}


def test_cli_errors(tmp_path: Path, trace_db: Path) -> None:
    err = io.StringIO()
    with redirect_stderr(err):
        assert main(["report", "--db", str(tmp_path / "nope.db"), "--html", "x.html"]) == 2
    assert "no trace database at" in err.getvalue()
    err = io.StringIO()
    target = tmp_path / "missing-dir" / "r.html"
    with redirect_stderr(err):
        assert main(["report", "--db", str(trace_db), "--html", str(target)]) == 2
    assert f"--html {str(target)!r}: cannot write the report" in err.getvalue()
    assert not target.parent.exists()
    err = io.StringIO()
    with redirect_stderr(err):
        assert main(["report", "--db", str(trace_db), "--html", "x", "--waterfalls", "0"]) == 2
    assert "--waterfalls" in err.getvalue()


# -- finding the browser -------------------------------------------------------------------


def _exe(directory: Path, name: str) -> Path:
    path = directory / name
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def test_browser_resolution_order(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    chrome = _exe(bin_dir, "google-chrome")
    env = {"PATH": str(bin_dir)}
    assert find_browser(env) == str(chrome)
    chromium_browser = _exe(bin_dir, "chromium-browser")
    assert find_browser(env) == str(chromium_browser)
    custom = _exe(tmp_path, "my-chrome")
    assert find_browser({**env, "AGENTGUARD_CHROMIUM": str(custom)}) == str(custom)
    with pytest.raises(BrowserNotFoundError, match="AGENTGUARD_CHROMIUM"):
        find_browser({**env, "AGENTGUARD_CHROMIUM": str(tmp_path / "absent")})


def test_missing_browser_fails_in_ci_and_skips_elsewhere(tmp_path: Path) -> None:
    env = {"PATH": str(tmp_path)}
    with pytest.raises(pytest.fail.Exception, match="CI=true and no Chromium"):
        require_browser({**env, "CI": "true"})
    with pytest.raises(pytest.skip.Exception, match="no Chromium"):
        require_browser(env)


def test_screenshot(browser: str, shown: Any, tmp_path: Path) -> None:
    page, _, _ = shown
    src = tmp_path / "r.html"
    src.write_text(page, encoding="utf-8")
    png = tmp_path / "r.png"
    proc = run(browser, "--window-size=1280,900", f"--screenshot={png}", src.as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(head[16:20], "big") == 1280
    assert int.from_bytes(head[20:24], "big") == 900
