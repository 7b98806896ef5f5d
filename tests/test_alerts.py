"""Alerts: soft-limit crossings from a real guard, rate-of-change from task records (live and
from a SQLite trace), de-duplication, and a webhook against a real local HTTP server."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

import agentguard as ag
from agentguard._alerts import period_bucket
from agentguard._sinks import SQLiteSink, SQLiteTraceReader
from agentguard._trace import TaskRecord

DAY = 86400.0
T0 = 1_767_312_000.0  # 2026-01-02T00:00:00Z


class _Server:
    """A local HTTP server recording POSTed JSON bodies; answers ``status``; a handler can be
    held until ``release`` is set."""

    def __init__(self, status: int = 204, hold: bool = False) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.status = status
        self.release = threading.Event()
        self.entered = threading.Event()
        if not hold:
            self.release.set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers["Content-Length"])
                body = json.loads(self.rfile.read(n))
                server.entered.set()
                server.release.wait(10)
                server.bodies.append(body)
                server.headers.append(dict(self.headers))
                self.send_response(server.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[_Server]:
    s = _Server()
    yield s
    s.close()


def _team_guard(alerts: ag.Alerts, **policy: Any) -> ag.Guard:
    p = ag.Policy(
        soft_limits=(0.25, 0.5, 0.8),
        on_limit="finish",
        budgets=[ag.Budget(scope="team", max_cost_usd="0.004", window="day")],
        **policy,
    )
    return alerts.attach(ag.Guard(p, traces=False))


def _spend(guard: ag.Guard, task_id: str, team: str = "cx", calls: int = 1) -> ag.Task:
    with guard.task(task_id, team=team, feature="support") as t:
        for _ in range(calls):
            call = t.start_model_call("gpt-4o-mini", input_tokens=2000, max_tokens=500)
            final = call.decision.action == "finish"
            if final:  # make the final answer, as an adapter does
                call = t.start_model_call(
                    "gpt-4o-mini", input_tokens=2000, max_tokens=500, finish=True
                )
            call.end({"prompt_tokens": 2000, "completion_tokens": call.max_tokens or 500})
            if final:
                break
    return t


def test_soft_limit_crossings_alert_once_per_budget_threshold_and_period() -> None:
    seen: list[ag.Alert] = []
    alerts = ag.Alerts(callbacks=[seen.append])
    guard = _team_guard(alerts)
    with capture_logs() as logs:
        for i in range(6):  # $0.0006 a task against $0.004 a day: crosses 25%, 50%, 80%
            _spend(guard, f"t{i}")
    day = period_bucket("day", seen[0].at)[1]
    assert [a.key for a in seen] == [
        f"soft_limit:team:cx@day:{day}:0.25",
        f"soft_limit:team:cx@day:{day}:0.5",
        f"soft_limit:team:cx@day:{day}:0.8",
    ]
    assert all(
        a.fields["team"] == "cx" and a.fields["budget"] == f"team:cx@day:{day}" for a in seen
    )
    logged = [e for e in logs if e["event"] == "agentguard.alert"]
    assert [e["key"] for e in logged] == [a.key for a in seen]
    assert logged[0]["log_level"] == "warning"

    # another team's budget is another key; the same crossing reported again is suppressed
    _spend(guard, "other", team="growth", calls=6)
    assert [a.fields["budget"].split("@")[0] for a in seen[3:]] == ["team:growth"] * 3
    before = len(seen)
    alerts("agentguard.soft_limit", dict(seen[0].fields))
    assert len(seen) == before and alerts.suppressed >= 1
    # the next day's window is a new period: it alerts again
    alerts("agentguard.soft_limit", {**seen[0].fields, "budget": "team:cx@day:2099-01-01"})
    assert seen[-1].key == "soft_limit:team:cx@day:2099-01-01:0.25"


def test_task_budgets_alert_only_when_asked() -> None:
    quiet: list[ag.Alert] = []
    loud: list[ag.Alert] = []
    policy = ag.Policy(max_cost_usd="0.002", soft_limits=(0.5,), on_limit="finish")
    g1 = ag.Alerts(callbacks=[quiet.append], log=False).attach(ag.Guard(policy, traces=False))
    g2 = ag.Alerts(callbacks=[loud.append], log=False, task_budgets=True).attach(
        ag.Guard(policy, traces=False)
    )
    for g in (g1, g2):
        for i in range(2):
            _spend(g, f"t{i}", calls=3)
    assert quiet == []
    assert [a.fields["budget"] for a in loud] == ["task:t0", "task:t1"]


def test_a_failing_callback_or_listener_never_breaks_the_run() -> None:
    def boom(alert: ag.Alert) -> None:
        raise RuntimeError("pager down")

    guard = _team_guard(ag.Alerts(callbacks=[boom]))
    guard.listeners.append(lambda event, fields: 1 / 0)
    with capture_logs() as logs:
        for i in range(6):
            t = _spend(guard, f"t{i}")
    assert t.status in ("ok", "finished")
    errors = [e for e in logs if e["event"] == "agentguard.alert_error"]
    assert len(errors) == 3 and "pager down" in errors[0]["error"]
    listener_errors = [e for e in logs if e["event"] == "agentguard.listener_error"]
    assert len(listener_errors) == 3 and "ZeroDivisionError" in listener_errors[0]["error"]


def _rec(task_id: str, end: float, cost: str | None, **tags: str) -> TaskRecord:
    return TaskRecord(
        task_id, None, end - 1, end, "ok", tags, cost_usd=None if cost is None else Decimal(cost)
    )


def test_rate_rule_alerts_on_doubling_below_any_threshold() -> None:
    alerts = ag.Alerts(rate_rules=[ag.RateRule(by="feature", period="day")], log=False)
    records = [
        _rec("a1", T0 + 100, "0.03", feature="support"),
        _rec("a2", T0 + 200, "0.02", feature="support"),  # day 1: $0.05
        _rec("b1", T0 + DAY + 100, "0.04", feature="support"),
        _rec("b2", T0 + DAY + 200, None, feature="support"),  # unknown cost: not summed
        _rec("b3", T0 + DAY + 300, "0.05", feature="support"),  # day 2: $0.09 < 2x
        _rec("b4", T0 + DAY + 400, "0.01", feature="support"),  # $0.10 = 2x: alert
        _rec("b5", T0 + DAY + 500, "0.50", feature="support"),  # same period: no new alert
        _rec("x1", T0 + 10, "0.001", feature="faq"),
        _rec("x2", T0 + DAY + 10, "0.005", feature="faq"),  # 5x but under min_usd
        _rec("y1", T0 + DAY + 10, "5", feature="new"),  # nothing the day before
    ]
    found = alerts.check(reversed(records))  # any order in: replayed by end time
    assert [a.key for a in found] == ["rate:feature=support:day:2026-01-03"]
    a = found[0]
    assert a.fields["current_usd"] == Decimal("0.10")
    assert a.fields["previous_usd"] == Decimal("0.05")
    assert a.fields["task_id"] == "b4"
    assert a.to_dict()["fields"]["current_usd"] == "0.10"  # money as a string in JSON
    assert "2.00x" in a.message
    assert alerts.suppressed == 1  # b5, in the period that already alerted
    # checked again: already alerted (b4 and b5 suppressed)
    assert alerts.check(records) == []
    assert alerts.suppressed == 3


def test_rate_rule_live_from_a_guard() -> None:
    seen: list[ag.Alert] = []
    alerts = ag.Alerts(
        callbacks=[seen.append], rate_rules=[ag.RateRule(by="team", min_usd="0.001")], log=False
    )
    memory = ag.MemorySink()
    guard = alerts.attach(ag.Guard(traces=memory))
    # yesterday this team spent $0.0012 (a record as the guard would have written it)
    alerts.write_task(_rec("y", time.time() - DAY, "0.0012", team="cx"))
    for i in range(4):  # $0.0006 each: the 4th task makes today $0.0024 = 2x
        _spend(guard, f"t{i}")
    assert len(memory.tasks) == 4  # the guard's own sink still gets everything
    assert [a.fields["task_id"] for a in seen] == ["t3"]
    assert seen[0].fields["group"] == "cx"


def test_rate_rule_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"RateRule.factor=Decimal\('1'\): must be above 1"):
        ag.RateRule(factor=Decimal(1))
    with pytest.raises(ValueError, match=r"RateRule.min_usd=0.5: give a Decimal"):
        ag.RateRule(min_usd=0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"RateRule.period='month'"):
        ag.RateRule(period="month")
    with pytest.raises(ValueError, match="webhook url='ftp://x'"):
        ag.Webhook("ftp://x")


def test_rate_check_over_a_sqlite_trace_and_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agentguard._cli import main

    db = tmp_path / "t.db"
    with SQLiteSink(db) as sink:
        for r in (
            _rec("a", T0 + 100, "0.05", feature="support", team="cx"),
            _rec("b", T0 + DAY + 100, "0.08", feature="support", team="cx"),
            _rec("c", T0 + DAY + 200, "0.03", feature="support", team="cx"),
        ):
            sink.write_task(r)
    with SQLiteTraceReader(db) as reader:
        found = ag.Alerts(rate_rules=[ag.RateRule()], log=False).check(reader.tasks())
    assert [a.fields["task_id"] for a in found] == ["c"]

    code = main(["alerts", "--db", str(db), "--since", "2026-01-01", "--by", "team"])
    out = capsys.readouterr().out
    assert code == 0
    assert "team=cx" in out and "2026-01-03" in out and "$0.11" in out
    assert main(["alerts", "--db", str(db), "--since", "2026-01-01", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [a["key"] for a in data["alerts"]] == ["rate:feature=support:day:2026-01-03"]
    # a higher factor finds nothing
    assert main(["alerts", "--db", str(db), "--since", "2026-01-01", "--factor", "3"]) == 0
    assert "no rate alerts" in capsys.readouterr().out
    assert main(["alerts", "--db", str(db), "--factor", "1"]) == 2
    assert "factor" in capsys.readouterr().err
    assert main(["alerts", "--db", str(db), "--webhook", "hooks.example.com"]) == 2
    assert "webhook url='hooks.example.com'" in capsys.readouterr().err


def test_webhook_posts_json_to_a_real_server(server: _Server) -> None:
    hook = ag.Webhook(server.url, headers={"Authorization": "Bearer t0k"})
    guard = _team_guard(ag.Alerts(webhook=hook, log=False))
    for i in range(6):
        _spend(guard, f"t{i}")
    assert hook.flush(10)
    assert hook.sent == 3 and hook.failed == 0
    assert [b["fields"]["threshold"] for b in server.bodies] == [0.25, 0.5, 0.8]
    assert server.bodies[0]["kind"] == "soft_limit"
    assert server.headers[0]["Content-Type"] == "application/json"
    assert server.headers[0]["Authorization"] == "Bearer t0k"
    hook.close()


def test_webhook_is_off_the_hot_path_and_bounded_by_its_timeout() -> None:
    slow = _Server(hold=True)
    try:
        hook = ag.Webhook(slow.url, timeout=0.3)
        alerts = ag.Alerts(webhook=hook, log=False)
        alert = ag.Alert("rate", "k1", "m", 0.0)
        alerts.emit(alert)  # returns while the server is still holding the request
        assert slow.entered.wait(10)
        assert hook.sent == 0 and slow.bodies == []
        with capture_logs() as logs:
            assert hook.flush(10)  # the request gave up after its timeout
        assert hook.failed == 1 and hook.sent == 0
        assert logs[0]["event"] == "agentguard.alert_error"
        assert "timed out" in logs[0]["error"]
    finally:
        slow.close()


def test_webhook_failures_are_logged_never_raised() -> None:
    failing = _Server(status=500)
    try:
        hook = ag.Webhook(failing.url)
        alerts = ag.Alerts(webhook=hook, log=False)
        with capture_logs() as logs:
            assert alerts.emit(ag.Alert("rate", "k1", "m", 0.0))
            assert hook.flush(10)
        assert hook.failed == 1 and len(failing.bodies) == 1
        assert "HTTP Error 500" in logs[0]["error"]
    finally:
        failing.close()
    # nothing listening on the port any more: connection refused, logged
    with capture_logs() as logs:
        alerts.emit(ag.Alert("rate", "k2", "m", 0.0))
        assert hook.flush(10)
    assert hook.failed == 2
    assert logs[0]["event"] == "agentguard.alert_error" and logs[0]["alert"] == "k2"
    hook.close()
