"""OpenTelemetry export: a trace sink that mirrors each task's span tree as OTel spans and
records GenAI metrics, following the GenAI semantic conventions.

:class:`OTelSink` is a :class:`~agentguard._trace.TraceSink`, so it composes with the others::

    guard = Guard(policy, traces=MultiSink(SQLiteSink("agentguard.db"), OTelSink()))

How it works: the guard writes a span when it *ends* (a model span at ``call.end``, the task
span last, at task close). The sink buffers a task's spans and, when the root task's span
arrives, emits the whole tree at once — task → step → model / tool / retry / retrieval / trim /
decision, sub-tasks under their parent — with the recorded start and end times, so parents are
started before their children. The root's parent is the context current at task close (captured
then), so a task run inside an application's request span nests under it. By default a
background thread does the emitting, off the thread that closes the task; :meth:`OTelSink.flush`
waits for it.

Spans carry the GenAI attributes (``gen_ai.operation.name``, ``gen_ai.request.model``,
``gen_ai.response.model``, ``gen_ai.provider.name`` / ``gen_ai.system``,
``gen_ai.usage.input_tokens``, ``gen_ai.usage.output_tokens``,
``gen_ai.usage.cache_read.input_tokens``, ``gen_ai.usage.cache_creation.input_tokens``,
``gen_ai.usage.reasoning.output_tokens``, ``gen_ai.request.max_tokens``, ``gen_ai.tool.name``)
and agentguard's own (``agentguard.cost_usd`` as an exact decimal string — absent when the
cost is unknown, with ``agentguard.cost_unknown=true`` —, ``agentguard.decision``,
``agentguard.reason``, ``agentguard.task_id``, ``agentguard.tag.<name>``,
``agentguard.estimated``, ``agentguard.saved_usd``...). Prompt and completion text is exported
(``gen_ai.input.messages`` / ``gen_ai.output.messages``) only with ``capture_content=True``
*and* a guard that captured it.

Metrics, per model call: the histogram ``gen_ai.client.token.usage`` (``{token}``, one point
per ``gen_ai.token.type`` ``input`` / ``output``), ``gen_ai.client.operation.duration`` (``s``),
and the counter ``agentguard.cost`` (``USD``; a float — the exact value is on the span).

opentelemetry-api is imported when the sink is built, never at ``import agentguard``
(``pip install "agentguard[otel]"``).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from agentguard._trace import Span, TaskRecord
from agentguard._worker import BackgroundQueue

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

__all__ = ["OTelSink", "provider_of"]

# GenAI semantic-convention names (checked against opentelemetry-semantic-conventions in tests;
# spelled out so the sink needs only opentelemetry-api at run time).
_OP = "gen_ai.operation.name"
_REQ_MODEL = "gen_ai.request.model"
_RESP_MODEL = "gen_ai.response.model"
_PROVIDER = "gen_ai.provider.name"
_SYSTEM = "gen_ai.system"
_MAX_TOKENS = "gen_ai.request.max_tokens"
_IN = "gen_ai.usage.input_tokens"
_OUT = "gen_ai.usage.output_tokens"
_CACHE_READ = "gen_ai.usage.cache_read.input_tokens"
_CACHE_WRITE = "gen_ai.usage.cache_creation.input_tokens"
_REASONING = "gen_ai.usage.reasoning.output_tokens"
_TOOL = "gen_ai.tool.name"
_TOKEN_TYPE = "gen_ai.token.type"
_INPUT_MESSAGES = "gen_ai.input.messages"
_OUTPUT_MESSAGES = "gen_ai.output.messages"
TOKEN_USAGE = "gen_ai.client.token.usage"
OPERATION_DURATION = "gen_ai.client.operation.duration"
COST = "agentguard.cost"

# the semconv's advised bucket boundaries for token counts and durations
_TOKEN_BUCKETS = [4.0**i for i in range(14)]
_DURATION_BUCKETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48]
_DURATION_BUCKETS += [40.96, 81.92]

# model-name prefix -> gen_ai.provider.name (a small, explicit table; pass provider= otherwise)
_PROVIDER_PREFIXES: tuple[tuple[str, str], ...] = (
    ("gpt-", "openai"),
    ("o1", "openai"),
    ("o3", "openai"),
    ("o4", "openai"),
    ("chatgpt-", "openai"),
    ("text-embedding-", "openai"),
    ("claude", "anthropic"),
    ("gemini", "gcp.gemini"),
    ("mistral", "mistral_ai"),
    ("mixtral", "mistral_ai"),
    ("codestral", "mistral_ai"),
    ("deepseek", "deepseek"),
    ("grok", "x_ai"),
    ("command", "cohere"),
)
_BEDROCK = re.compile(
    r"^(?:(?:us|eu|apac|global)\.)?(?:anthropic|meta|amazon|cohere|mistral|ai21|deepseek|qwen)\."
)
_CONTENT_KEYS = frozenset({"prompt", "completion"})
_NUMERIC_TAGS = ("feature", "team", "env")


def provider_of(model: str | None) -> str | None:
    """The ``gen_ai.provider.name`` of a model id from its name, ``None`` when unsure.

    A Bedrock model id (``anthropic.claude-...``, ``us.meta.llama...``) is ``aws.bedrock``;
    in a ``router/model`` id the part after the last ``/`` is looked at.

    Example:
        >>> provider_of("gpt-4o-mini"), provider_of("claude-3-5-haiku"), provider_of("llama-3")
        ('openai', 'anthropic', None)
        >>> provider_of("us.anthropic.claude-3-5-haiku-20241022-v1:0")
        'aws.bedrock'
    """
    if not model:
        return None
    name = model.lower()
    if _BEDROCK.match(name):
        return "aws.bedrock"
    if "/" in name:
        name = name.rsplit("/", 1)[1]
    for prefix, provider in _PROVIDER_PREFIXES:
        if name.startswith(prefix):
            return provider
    return None


def _scalar(value: Any) -> Any:
    """An OTel attribute value: str / bool / int / float; Decimals as exact strings."""
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Decimal):
        return str(value)
    return None


class OTelSink:
    """A trace sink that emits OpenTelemetry spans and GenAI metrics.

    Args:
        tracer_provider: where spans go; the global one (``trace.get_tracer_provider()``) if
            omitted. Pass ``False`` for metrics only.
        meter_provider: where metrics go; the global one if omitted. ``False`` for spans only.
        provider: ``gen_ai.provider.name`` for every model span (``"openai"``), or a function
            of the model id; by default guessed from the model name (:func:`provider_of`).
        capture_content: export prompt / completion text the guard captured (only when the
            guard itself was built with ``capture_content=True``). Off by default.
        metric_tags: task tags added to metric points as ``agentguard.<tag>``; keep them
            low-cardinality (never a user or task id).
        max_buffered_spans: spans of unfinished tasks held at most; beyond it new spans are
            dropped and counted in ``dropped``.
        background: emit each finished tree from a background thread (default), so the
            SDK's work (~40 µs a span, ~30 µs a metric point) stays off the closing thread;
            ``False`` emits on it. :meth:`flush` waits for the queue either way.
        max_queue: finished trees waiting for the background thread at most; beyond it a
            tree is dropped and its spans counted in ``dropped``.

    Example:
        >>> from opentelemetry.sdk.trace import TracerProvider
        >>> from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        >>> from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
        ...     InMemorySpanExporter)
        >>> import agentguard as ag
        >>> exporter = InMemorySpanExporter()
        >>> tp = TracerProvider()
        >>> tp.add_span_processor(SimpleSpanProcessor(exporter))
        >>> guard = ag.Guard(traces=OTelSink(tracer_provider=tp, meter_provider=False))
        >>> with guard.task("t1", feature="faq") as task:
        ...     task.start_model_call("gpt-4o-mini", input_tokens=100).end(
        ...         {"prompt_tokens": 100, "completion_tokens": 20})
        Decimal('0.000027000')
        >>> guard.sink.flush()
        True
        >>> [s.name for s in exporter.get_finished_spans()]
        ['agentguard.task', 'chat gpt-4o-mini']
    """

    def __init__(
        self,
        *,
        tracer_provider: TracerProvider | bool | None = None,
        meter_provider: MeterProvider | bool | None = None,
        provider: str | Callable[[str], str | None] | None = None,
        capture_content: bool = False,
        metric_tags: Sequence[str] = _NUMERIC_TAGS,
        max_buffered_spans: int = 100_000,
        background: bool = True,
        max_queue: int = 10_000,
    ) -> None:
        try:
            from opentelemetry import metrics, trace
        except ImportError as exc:
            raise ImportError(
                'OTelSink needs opentelemetry-api: pip install "agentguard[otel]"'
            ) from exc
        from opentelemetry import context

        from agentguard import __version__

        self._trace = trace
        self._context = context
        self._tracer: Any = None
        self._tp: Any = None
        self._mp: Any = None
        if tracer_provider is not False:
            tp = None if tracer_provider in (None, True) else tracer_provider
            self._tp = tp if tp is not None else trace.get_tracer_provider()
            self._tracer = self._tp.get_tracer("agentguard", __version__)
        self._tokens: Any = None
        self._duration: Any = None
        self._cost: Any = None
        if meter_provider is not False:
            mp = None if meter_provider in (None, True) else meter_provider
            self._mp = mp if mp is not None else metrics.get_meter_provider()
            meter = self._mp.get_meter("agentguard", __version__)
            self._tokens = meter.create_histogram(
                TOKEN_USAGE,
                unit="{token}",
                description="Number of input and output tokens used.",
                explicit_bucket_boundaries_advisory=_TOKEN_BUCKETS,
            )
            self._duration = meter.create_histogram(
                OPERATION_DURATION,
                unit="s",
                description="GenAI operation duration.",
                explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
            )
            self._cost = meter.create_counter(
                COST, unit="USD", description="Cost of model calls and paid tools, in USD."
            )
        self._provider = provider
        self.capture_content = capture_content
        self.metric_tags = tuple(metric_tags)
        self.max_buffered_spans = max_buffered_spans
        self.dropped = 0
        self.errors = 0
        self.background = background
        self._worker: BackgroundQueue[tuple[list[Span], Span | None, Any]] = BackgroundQueue(
            self._emit_tree, name="agentguard-otel", max_queue=max_queue, on_error=self._failed
        )
        self._lock = threading.Lock()
        self._by_task: dict[str, dict[str, Span]] = {}
        self._task_span: dict[str, Span] = {}
        self._child_tasks: dict[str, list[str]] = {}  # parent task span id -> child task ids
        self._buffered = 0

    def __repr__(self) -> str:
        return f"OTelSink(buffered={self._buffered}, dropped={self.dropped})"

    # -- TraceSink --------------------------------------------------------------------------

    def write_spans(self, spans: Sequence[Span]) -> None:
        """Buffer the spans; a root task's span emits its whole tree."""
        roots: list[Span] = []
        with self._lock:
            for s in spans:
                spans_of = self._by_task.get(s.task_id)
                if spans_of is None:
                    spans_of = self._by_task[s.task_id] = {}
                if s.span_id not in spans_of:
                    # a task span always gets in: it closes (and frees) its tree
                    if self._buffered >= self.max_buffered_spans and s.kind != "task":
                        self.dropped += 1
                        continue
                    self._buffered += 1
                spans_of[s.span_id] = s
                if s.kind == "task" and s.end is not None:
                    self._task_span[s.task_id] = s
                    if s.parent_id is None:
                        roots.append(s)
                    else:
                        self._child_tasks.setdefault(s.parent_id, []).append(s.task_id)
            trees = [self._take_tree(r) for r in roots]
        if not roots:
            return
        ctx = self._context.get_current()  # the application's context at task close
        for root, tree in zip(roots, trees, strict=True):
            if not self.background:
                self._emit_spans(tree, root, ctx)
            elif not self._worker.put((tree, root, ctx)):
                self.dropped += len(tree)

    def _emit_tree(self, item: tuple[list[Span], Span | None, Any]) -> None:
        self._emit_spans(*item)

    def _failed(self, exc: Exception) -> None:
        """An exporter's bug, on the background thread: counted and logged, never raised."""
        self.errors += 1
        from agentguard._guard import _logger

        _logger().error("agentguard.trace_error", error=f"{type(exc).__name__}: {exc}")

    def write_task(self, record: TaskRecord) -> None:
        """Nothing to do: the task span carries what the record summarises."""

    def flush(self, timeout: float = 30.0) -> bool:
        """Emit every finished task's tree queued so far, then force the providers'
        processors to export what they hold (spans of tasks still running stay buffered).
        ``False`` if the queue did not drain within ``timeout`` seconds."""
        drained = self._worker.drain(timeout)
        for provider in (self._tp, self._mp):
            fn = getattr(provider, "force_flush", None)
            if fn is not None:
                fn()
        return drained

    def close(self) -> None:
        """Emit whatever is still buffered (trees of unfinished tasks, as they are) and flush.
        The providers are the application's: they are not shut down."""
        with self._lock:
            leftovers = [s for spans in self._by_task.values() for s in spans.values()]
            self._by_task.clear()
            self._task_span.clear()
            self._child_tasks.clear()
            self._buffered = 0
        self.flush()
        if leftovers:
            self._emit_spans(leftovers, None, None)
        self.flush()
        self._worker.stop(10)

    # -- tree -------------------------------------------------------------------------------

    def _take_tree(self, root: Span) -> list[Span]:
        """Remove and return the spans of ``root``'s task and its sub-tasks (lock held)."""
        task_ids = [root.task_id]
        out: list[Span] = []
        i = 0
        while i < len(task_ids):
            tid = task_ids[i]
            i += 1
            tspan = self._task_span.pop(tid, None)
            if tspan is not None:
                task_ids.extend(self._child_tasks.pop(tspan.span_id, ()))
            spans = self._by_task.pop(tid, {})
            self._buffered -= len(spans)
            out.extend(spans.values())
        return out

    def _emit_spans(self, spans: list[Span], root: Span | None, root_ctx: Any) -> None:
        by_id = {s.span_id: s for s in spans}
        children: dict[str | None, list[Span]] = {}
        task_spans = {s.task_id: s for s in spans if s.kind == "task"}
        for s in spans:
            parent = s.parent_id
            if parent is not None and parent not in by_id:
                # its parent was never written here: hang it under its task (or the root)
                t = task_spans.get(s.task_id, root)
                parent = t.span_id if t is not None and t is not s else None
            children.setdefault(parent, []).append(s)
        tags_of = {tid: t.attrs.get("tags") or {} for tid, t in task_spans.items()}
        for s in spans:
            tags = tags_of.get(s.task_id) or {}
            if s.kind == "model" and s.usage is not None:
                self._record_metrics(s, tags)
            elif s.kind == "tool" and s.cost_usd is not None and self._cost is not None:
                self._cost.add(float(s.cost_usd), {_TOOL: s.name, **self._metric_tags(tags)})
        if self._tracer is None:
            return
        trace = self._trace
        stack: list[tuple[Span, Any]] = [(s, root_ctx) for s in reversed(children.get(None, []))]
        while stack:
            s, parent_ctx = stack.pop()
            otel = self._start(s, parent_ctx)
            ctx = trace.set_span_in_context(otel)
            kids = sorted(children.get(s.span_id, ()), key=lambda c: c.start, reverse=True)
            stack.extend((c, ctx) for c in kids)
            otel.end(end_time=_ns(s.end if s.end is not None else s.start))

    # -- spans ------------------------------------------------------------------------------

    def _start(self, s: Span, parent_ctx: Any) -> Any:
        from opentelemetry.trace import SpanKind, Status, StatusCode

        name, attrs, kind = self._describe(s)
        otel = self._tracer.start_span(
            name,
            context=parent_ctx,
            kind=SpanKind.CLIENT if kind == "client" else SpanKind.INTERNAL,
            attributes=attrs,
            start_time=_ns(s.start),
        )
        if s.status in ("error", "stopped"):
            detail = s.attrs.get("error") or s.reason or s.status
            otel.set_status(Status(StatusCode.ERROR, str(detail)))
        return otel

    def _describe(self, s: Span) -> tuple[str, dict[str, Any], str]:
        a: dict[str, Any] = {
            "agentguard.task_id": s.task_id,
            "agentguard.span_kind": s.kind,
            "agentguard.status": s.status,
        }
        kind = "internal"
        if s.kind == "model":
            kind = "client"
            # the model the request went to (after a downgrade: the cheaper one; the model the
            # application asked for stays in agentguard.requested_model)
            requested = s.model or s.name
            served = s.attrs.get("reported_model") or requested
            a[_OP] = "chat"
            a[_REQ_MODEL] = str(requested)
            a[_RESP_MODEL] = str(served)
            provider = self._provider_for(str(served))
            if provider is not None:
                a[_PROVIDER] = provider
                a[_SYSTEM] = provider
            if s.attrs.get("max_tokens") is not None:
                a[_MAX_TOKENS] = int(s.attrs["max_tokens"])
            name = f"chat {requested}"
        elif s.kind == "tool":
            a[_OP] = "execute_tool"
            a[_TOOL] = s.name
            name = f"execute_tool {s.name}"
        elif s.kind == "retrieval":
            a[_OP] = "retrieval"
            a["gen_ai.data_source.id"] = s.name
            name = f"retrieval {s.name}"
        elif s.kind == "task":
            a[_OP] = "invoke_agent"
            name = "agentguard.task"
            for k, v in (s.attrs.get("tags") or {}).items():
                a[f"agentguard.tag.{k}"] = str(v)
        else:
            name = f"agentguard.{s.kind}"
            a["agentguard.name"] = s.name
        u = s.usage
        if u is not None:
            a[_IN] = u.input_tokens
            a[_OUT] = u.output_tokens
            if u.cache_read_tokens:
                a[_CACHE_READ] = u.cache_read_tokens
            if u.cache_write_tokens:
                a[_CACHE_WRITE] = u.cache_write_tokens
            if u.reasoning_tokens:
                a[_REASONING] = u.reasoning_tokens
            if u.estimated:
                a["agentguard.estimated"] = True
        if s.cost_usd is not None:
            a["agentguard.cost_usd"] = str(s.cost_usd)
        elif s.kind in ("model", "task") and u is not None:
            a["agentguard.cost_unknown"] = True
        if s.decision is not None:
            a["agentguard.decision"] = s.decision
        if s.reason:
            a["agentguard.reason"] = s.reason
        for k, v in s.attrs.items():
            if k in _CONTENT_KEYS or k in ("tags", "max_tokens") or v is None:
                continue
            value = _scalar(v)
            if value is not None:
                a[f"agentguard.{k}"] = value
        if self.capture_content:
            if "prompt" in s.attrs:
                a[_INPUT_MESSAGES] = json.dumps(s.attrs["prompt"], ensure_ascii=False)
            if "completion" in s.attrs:
                a[_OUTPUT_MESSAGES] = json.dumps(
                    [{"role": "assistant", "content": s.attrs["completion"]}], ensure_ascii=False
                )
        return name, a, kind

    def _provider_for(self, model: str) -> str | None:
        p = self._provider
        if p is None:
            return provider_of(model)
        if isinstance(p, str):
            return p
        return p(model)

    # -- metrics ----------------------------------------------------------------------------

    def _metric_tags(self, tags: Mapping[str, Any]) -> dict[str, Any]:
        return {f"agentguard.{t}": str(tags[t]) for t in self.metric_tags if t in tags}

    def _record_metrics(self, s: Span, tags: Mapping[str, Any]) -> None:
        if self._tokens is None:
            return
        served = str(s.attrs.get("reported_model") or s.model or s.name)
        attrs: dict[str, Any] = {
            _OP: "chat",
            _REQ_MODEL: str(s.model or s.name),
            _RESP_MODEL: served,
            **self._metric_tags(tags),
        }
        provider = self._provider_for(served)
        if provider is not None:
            attrs[_PROVIDER] = provider
        u = s.usage
        assert u is not None
        self._tokens.record(u.input_tokens, {**attrs, _TOKEN_TYPE: "input"})
        self._tokens.record(u.output_tokens, {**attrs, _TOKEN_TYPE: "output"})
        if s.end is not None:
            self._duration.record(max(0.0, s.end - s.start), attrs)
        if s.cost_usd is not None:
            self._cost.add(float(s.cost_usd), attrs)


def _ns(epoch: float) -> int:
    return int(epoch * 1_000_000_000)
