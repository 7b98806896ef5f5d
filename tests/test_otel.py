"""OTelSink against the real OpenTelemetry SDK: in-memory span exporter and metric reader."""

from __future__ import annotations

import subprocess
import sys
import threading
from decimal import Decimal
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as ga
from opentelemetry.semconv._incubating.metrics import gen_ai_metrics as gm
from opentelemetry.trace import StatusCode
from structlog.testing import capture_logs

import agentguard as ag
from agentguard._otel import OTelSink, provider_of


class OTel:
    def __init__(self, **kw: Any) -> None:
        self.exporter = InMemorySpanExporter()
        self.tp = TracerProvider()
        self.tp.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.mp = MeterProvider(metric_readers=[self.reader])
        kw.setdefault("meter_provider", self.mp)
        self.sink = OTelSink(tracer_provider=self.tp, **kw)

    def spans(self) -> list[ReadableSpan]:
        assert self.sink.flush(10)
        return list(self.exporter.get_finished_spans())

    def metrics(self) -> dict[str, list[Any]]:
        assert self.sink.flush(10)
        data = self.reader.get_metrics_data()
        out: dict[str, list[Any]] = {}
        assert data is not None
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    out.setdefault(m.name, []).extend(m.data.data_points)
        return out


def _run_agent(guard: ag.Guard) -> ag.Task:
    with guard.task("ticket-42", feature="support", team="cx", user="u-17") as task:
        task.step("plan")
        call = task.start_model_call("gpt-4o", input_tokens=1200, max_tokens=300)
        call.end({"prompt_tokens": 1200, "completion_tokens": 80,
                  "prompt_tokens_details": {"cached_tokens": 1024}})  # fmt: skip
        tool = task.start_tool_call("lookup_order")
        tool.end()
        with guard.task("ticket-42.sub") as sub:
            sub.start_model_call("gpt-4o-mini", input_tokens=400).end(
                {"prompt_tokens": 400, "completion_tokens": 40}
            )
        task.step("answer")
        bad = task.start_model_call("gpt-4o-mini", input_tokens=50)
        bad.fail(TimeoutError("provider timed out"))
        task.start_model_call("gpt-4o-mini", input_tokens=900).end(
            {"prompt_tokens": 900, "completion_tokens": 120}
        )
    return task


def test_span_tree_mirrors_the_task_with_genai_attributes() -> None:
    otel = OTel()
    memory = ag.MemorySink()
    guard = ag.Guard(ag.Policy(max_cost_usd="1"), traces=ag.MultiSink(memory, otel.sink))
    task = _run_agent(guard)

    spans = otel.spans()
    # the exported tree holds exactly the spans the guard recorded (both tasks)
    assert len(spans) == len(memory.spans)
    names = sorted(s.name for s in spans)
    assert names.count("agentguard.task") == 2
    assert "execute_tool lookup_order" in names
    assert names.count("chat gpt-4o-mini") == 3
    assert "chat gpt-4o" in names

    roots = [s for s in spans if s.parent is None]
    assert [r.name for r in roots] == ["agentguard.task"]
    root = roots[0]
    assert root.attributes is not None
    assert root.attributes["agentguard.task_id"] == "ticket-42"
    assert root.attributes["agentguard.tag.feature"] == "support"
    assert root.attributes["agentguard.tag.team"] == "cx"
    assert root.attributes["agentguard.cost_usd"] == str(task.cost_usd)
    assert root.attributes[ga.GEN_AI_OPERATION_NAME] == "invoke_agent"
    trace_ids = {s.context.trace_id for s in spans}
    assert trace_ids == {root.context.trace_id}

    # parents: every recorded parent link is the same link in OTel
    otel_by_ctx = {s.context.span_id: s for s in spans}
    rec_of = {}
    for s in spans:
        a = s.attributes or {}
        match = [
            r for r in memory.spans
            if r.task_id == a["agentguard.task_id"] and r.kind == a["agentguard.span_kind"]
            and int(r.start * 1e9) == s.start_time
        ]  # fmt: skip
        assert len(match) == 1, s.name
        rec_of[s.context.span_id] = match[0]
    for s in spans:
        rec = rec_of[s.context.span_id]
        if s.parent is None:
            assert rec.parent_id is None
        else:
            assert rec_of[otel_by_ctx[s.parent.span_id].context.span_id].span_id == rec.parent_id
        assert s.end_time == int((rec.end if rec.end is not None else rec.start) * 1e9)

    big = next(s for s in spans if s.name == "chat gpt-4o")
    a = big.attributes or {}
    assert a[ga.GEN_AI_OPERATION_NAME] == "chat"
    assert a[ga.GEN_AI_REQUEST_MODEL] == "gpt-4o"
    assert a[ga.GEN_AI_RESPONSE_MODEL] == "gpt-4o"
    assert a[ga.GEN_AI_PROVIDER_NAME] == "openai"
    assert a[ga.GEN_AI_SYSTEM] == "openai"
    assert a[ga.GEN_AI_USAGE_INPUT_TOKENS] == 1200
    assert a[ga.GEN_AI_USAGE_OUTPUT_TOKENS] == 80
    assert a[ga.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS] == 1024
    assert a[ga.GEN_AI_REQUEST_MAX_TOKENS] == 300
    assert a["agentguard.decision"] == "allow"
    rec = rec_of[big.context.span_id]
    assert a["agentguard.cost_usd"] == str(rec.cost_usd)
    assert Decimal(str(a["agentguard.cost_usd"])) == rec.cost_usd  # exact, not a float
    assert big.kind.name == "CLIENT"

    tool = next(s for s in spans if s.name == "execute_tool lookup_order")
    assert (tool.attributes or {})[ga.GEN_AI_TOOL_NAME] == "lookup_order"
    assert (tool.attributes or {})[ga.GEN_AI_OPERATION_NAME] == "execute_tool"

    sub = next(s for s in spans if (s.attributes or {}).get("agentguard.task_id") == "ticket-42.sub"
               and s.name == "agentguard.task")  # fmt: skip
    assert sub.parent is not None and sub.parent.span_id == root.context.span_id

    failed = [s for s in spans if s.status.status_code is StatusCode.ERROR]
    assert len(failed) == 1 and failed[0].name == "chat gpt-4o-mini"
    assert failed[0].status.description == "TimeoutError"


def test_metrics_token_usage_duration_and_cost() -> None:
    otel = OTel()
    memory = ag.MemorySink()
    guard = ag.Guard(ag.Policy(max_cost_usd="1"), traces=ag.MultiSink(memory, otel.sink))
    task = _run_agent(guard)
    sub = memory.task("ticket-42.sub")
    assert sub is not None and task.cost_usd is not None and sub.cost_usd is not None

    m = otel.metrics()
    usage = m[gm.GEN_AI_CLIENT_TOKEN_USAGE]
    by_type: dict[str, int] = {}
    for p in usage:
        by_type[p.attributes[ga.GEN_AI_TOKEN_TYPE]] = by_type.get(
            p.attributes[ga.GEN_AI_TOKEN_TYPE], 0
        ) + int(p.sum)
    assert by_type == {
        "input": task.usage.input_tokens + sub.usage.input_tokens,
        "output": task.usage.output_tokens + sub.usage.output_tokens,
    }
    # three metered calls (the failed one has no usage): 3 points per token type in total
    assert sum(p.count for p in usage if p.attributes[ga.GEN_AI_TOKEN_TYPE] == "input") == 3
    big = [p for p in usage if p.attributes[ga.GEN_AI_REQUEST_MODEL] == "gpt-4o"]
    assert {p.attributes["agentguard.feature"] for p in big} == {"support"}
    assert all("agentguard.user" not in p.attributes for p in usage)  # not a metric tag

    duration = m[gm.GEN_AI_CLIENT_OPERATION_DURATION]
    assert sum(p.count for p in duration) == 3
    cost = sum(p.value for p in m["agentguard.cost"])
    assert cost == pytest.approx(float(task.cost_usd + sub.cost_usd), rel=1e-9)


def test_no_prompt_text_unless_both_opt_in() -> None:
    secret = "my card number is 4111 1111 1111 1111"
    for sink_opt, expect in ((False, False), (True, True)):
        otel = OTel(capture_content=sink_opt)
        guard = ag.Guard(traces=otel.sink, capture_content=True)
        with guard.task("t") as task:
            call = task.start_model_call(
                "gpt-4o-mini", messages=[{"role": "user", "content": secret}]
            )
            call.end({"prompt_tokens": 20, "completion_tokens": 5}, output_text="the answer text")
        text = repr([dict(s.attributes or {}) for s in otel.spans()])
        assert (secret in text) is expect
        assert ("the answer text" in text) is expect
        if expect:
            model = next(s for s in otel.spans() if s.name.startswith("chat"))
            assert ga.GEN_AI_INPUT_MESSAGES in (model.attributes or {})
    # a guard that did not capture content has nothing to export, whatever the sink says
    otel = OTel(capture_content=True)
    guard = ag.Guard(traces=otel.sink)
    with guard.task("t") as task:
        task.start_model_call("gpt-4o-mini", messages=[{"role": "user", "content": secret}]).end(
            None, output_text="the answer text"
        )
    assert secret not in repr([dict(s.attributes or {}) for s in otel.spans()])


def test_unknown_cost_is_not_zero_and_estimated_is_flagged() -> None:
    otel = OTel()
    guard = ag.Guard(traces=otel.sink)  # no cost limit: an unpriced model may run
    with guard.task("t") as task:
        task.start_model_call("my-local-llm", input_tokens=10).end(None, output_text="hello")
    model = next(s for s in otel.spans() if s.name == "chat my-local-llm")
    a = model.attributes or {}
    assert "agentguard.cost_usd" not in a
    assert a["agentguard.cost_unknown"] is True
    assert a["agentguard.estimated"] is True
    assert ga.GEN_AI_PROVIDER_NAME not in a
    assert "agentguard.cost" not in otel.metrics()  # nothing priced, no cost point


def test_spans_wait_for_their_root_and_close_emits_leftovers() -> None:
    otel = OTel(meter_provider=False)
    guard = ag.Guard(traces=otel.sink)
    task = guard.open_task("open-run")
    task.start_model_call("gpt-4o-mini", input_tokens=10).end(
        {"prompt_tokens": 10, "completion_tokens": 1}
    )
    assert otel.spans() == []  # the tree is emitted when the task ends
    otel.sink.close()
    assert [s.name for s in otel.spans()] == ["chat gpt-4o-mini"]


def test_buffer_is_bounded() -> None:
    otel = OTel(max_buffered_spans=3)
    guard = ag.Guard(traces=otel.sink)
    task = guard.open_task("long")
    for _ in range(5):
        task.step("s")
    assert otel.sink.dropped == 2
    task.close()
    # the task span always gets in (it closes the tree): 3 steps and the task
    assert sorted(s.name for s in otel.spans()) == ["agentguard.step"] * 3 + ["agentguard.task"]
    assert otel.sink._buffered == 0


def test_provider_of_and_explicit_provider() -> None:
    assert provider_of("anthropic.claude-3-haiku-20240307-v1:0") == "aws.bedrock"
    assert provider_of("claude-3-haiku") == "anthropic"
    assert provider_of("openrouter/mistral-large") == "mistral_ai"
    assert provider_of(None) is None
    otel = OTel(provider="azure.ai.openai")
    guard = ag.Guard(traces=otel.sink)
    with guard.task("t") as task:
        task.start_model_call("gpt-4o-mini", input_tokens=10).end(
            {"prompt_tokens": 10, "completion_tokens": 1}
        )
    model = next(s for s in otel.spans() if s.name.startswith("chat"))
    assert (model.attributes or {})[ga.GEN_AI_PROVIDER_NAME] == "azure.ai.openai"


def test_import_agentguard_does_not_import_opentelemetry() -> None:
    code = "import sys, agentguard; print('opentelemetry' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("traces", ["ag.OTelSink()", "'otel'"])
def test_global_providers_are_used_by_default(traces: str) -> None:
    code = (
        "from opentelemetry import trace\n"
        "from opentelemetry.sdk.trace import TracerProvider\n"
        "from opentelemetry.sdk.trace.export import SimpleSpanProcessor\n"
        "from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter\n"
        "import agentguard as ag\n"
        "e = InMemorySpanExporter(); tp = TracerProvider()\n"
        "tp.add_span_processor(SimpleSpanProcessor(e)); trace.set_tracer_provider(tp)\n"
        f"g = ag.Guard(traces={traces})\n"
        "assert type(g.sink).__name__ == 'OTelSink'\n"
        "tracer = trace.get_tracer('app')\n"
        "with tracer.start_as_current_span('request') as req:\n"
        "    with g.task('t') as t:\n"
        "        t.step('s')\n"
        "g.close()\n"
        "spans = {s.name: s for s in e.get_finished_spans()}\n"
        "print(spans['agentguard.task'].parent.span_id == spans['request'].context.span_id)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_a_downgraded_call_names_the_model_the_request_went_to() -> None:
    otel = OTel()
    policy = ag.Policy(max_cost_usd="0.05", downgrade=[ag.Downgrade(at=0.01, to="gpt-4o-mini")])
    memory = ag.MemorySink()
    guard = ag.Guard(policy, traces=ag.MultiSink(memory, otel.sink))
    with guard.task("t") as task:
        for _ in range(2):
            task.start_model_call("gpt-4o", input_tokens=1200, max_tokens=300).end(
                {"prompt_tokens": 1200, "completion_tokens": 80}
            )
    cheap = next(s for s in otel.spans() if s.name == "chat gpt-4o-mini")
    a = cheap.attributes or {}
    assert a[ga.GEN_AI_REQUEST_MODEL] == a[ga.GEN_AI_RESPONSE_MODEL] == "gpt-4o-mini"
    assert a["agentguard.requested_model"] == "gpt-4o"
    assert a["agentguard.decision"] == "downgrade"
    rec = next(s for s in memory.spans if s.decision == "downgrade")
    assert a["agentguard.saved_usd"] == str(rec.attrs["saved_usd"])
    models = {p.attributes[ga.GEN_AI_REQUEST_MODEL] for p in otel.metrics()["agentguard.cost"]}
    assert models == {"gpt-4o", "gpt-4o-mini"}


@pytest.mark.parametrize("background", [True, False])
def test_emitted_on_a_background_thread_or_in_place(background: bool) -> None:
    otel = OTel(background=background)
    seen: list[str] = []

    class Spy(SimpleSpanProcessor):
        def on_end(self, span: ReadableSpan) -> None:
            seen.append(threading.current_thread().name)

    otel.tp.add_span_processor(Spy(otel.exporter))
    guard = ag.Guard(traces=otel.sink)
    with guard.task("t") as task:
        task.step("s")
    assert len(otel.spans()) == 2  # the spy records the thread, it does not export
    expected = "agentguard-otel" if background else threading.current_thread().name
    assert set(seen) == {expected}
    otel.sink.close()
    assert not otel.sink._worker.alive


def test_an_exporter_failure_is_logged_and_the_worker_goes_on() -> None:
    otel = OTel()

    class Broken(SimpleSpanProcessor):
        calls = 0

        def on_start(self, span: Any, parent_context: Any = None) -> None:
            Broken.calls += 1
            if Broken.calls == 1:
                raise RuntimeError("exporter down")

    otel.tp._active_span_processor._span_processors = (
        Broken(otel.exporter),
        *otel.tp._active_span_processor._span_processors,
    )
    guard = ag.Guard(traces=otel.sink)
    with capture_logs() as logs:
        for name in ("a", "b"):
            with guard.task(name) as task:
                task.step("s")
        spans = otel.spans()
    assert otel.sink.errors == 1
    assert [e["event"] for e in logs] == ["agentguard.trace_error"]
    assert {(s.attributes or {})["agentguard.task_id"] for s in spans} >= {"b"}


def test_otel_traces_without_opentelemetry_name_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"agentguard\[otel\]"):
        ag.Guard(traces="otel")
