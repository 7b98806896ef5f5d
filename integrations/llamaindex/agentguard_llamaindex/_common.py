"""Pieces every LlamaIndex entry point shares: model ids, usage read off responses, the flag
that keeps a call metered by the wrapper from being charged again by the handlers, and the
stops decided where LlamaIndex would swallow them.

LlamaIndex's instrumentation dispatcher swallows every exception a handler raises, and a
workflow agent turns a tool's exception into a tool result. A stop decided in such a place is
kept here (:func:`defer_stop`) and raised at the next point where exceptions reach the caller:
the budget-aware LLM's next call, or the budget rate limiter's ``acquire``.
"""

from __future__ import annotations

import contextlib
import json
import threading
import weakref
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from agentguard import BudgetExceeded, InvalidUsage, Usage

if TYPE_CHECKING:
    from agentguard import Task

__all__ = [
    "already_metered",
    "defer_stop",
    "metered_here",
    "model_of_llm",
    "model_of_payload",
    "output_text",
    "pop_deferred_stop",
    "usage_of",
]

# Set while the budget-aware LLM calls its delegate: the instrumentation handler sees the
# delegate's start event in this context and leaves the call to the wrapper.
_METERED: ContextVar[bool] = ContextVar("agentguard_llamaindex_metered", default=False)

_MODEL_KEYS = ("model", "model_name", "model_id", "deployment_name", "engine")


@contextlib.contextmanager
def metered_here() -> Iterator[None]:
    """Mark the model calls started inside this block as metered by the caller."""
    token = _METERED.set(True)
    try:
        yield
    finally:
        _METERED.reset(token)


def already_metered() -> bool:
    """True inside :func:`metered_here`."""
    return _METERED.get()


def model_of_payload(payload: Mapping[str, Any] | None) -> str:
    """The model id in an LLM's or embedding's ``to_payload()`` / ``to_dict()`` dictionary.

    Example:
        >>> model_of_payload({"model": "gpt-4o-mini", "class_name": "OpenAI"})
        'gpt-4o-mini'
        >>> model_of_payload({"class_name": "MockLLM"})
        'MockLLM'
    """
    if payload:
        for key in _MODEL_KEYS:
            value = payload.get(key)
            if isinstance(value, str) and value and value != "unknown":
                return value
        name = payload.get("class_name")
        if isinstance(name, str) and name:
            return name
    return "unknown"


def model_of_llm(llm: Any) -> str:
    """The model id an LLM object calls (``model``, ``model_name``..., then
    ``metadata.model_name``, then its class name)."""
    for key in _MODEL_KEYS:
        value = getattr(llm, key, None)
        if isinstance(value, str) and value and value != "unknown":
            return value
    try:
        name = llm.metadata.model_name
    except Exception:  # a provider's metadata must not break metering
        name = None
    if isinstance(name, str) and name and name != "unknown":
        return name
    class_name = getattr(llm, "class_name", None)
    return str(class_name()) if callable(class_name) else type(llm).__name__


def _get(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)


_USAGE_KEYS = ("prompt_tokens", "input_tokens", "inputTokens", "completion_tokens")


def usage_of(response: Any) -> Any:
    """The usage a provider reported on a ``ChatResponse`` / ``CompletionResponse``, in its
    own shape (for :meth:`agentguard.Usage.parse`), or ``None``.

    Looks at ``response.raw.usage`` (OpenAI SDK objects, Anthropic messages, Bedrock Converse
    dictionaries, including ``cached_tokens`` details), then at counts in
    ``response.additional_kwargs`` (LlamaIndex's OpenAI LLM copies them there), then at a
    ``usage`` mapping in ``additional_kwargs``.

    Example:
        >>> from llama_index.core.base.llms.types import CompletionResponse
        >>> usage_of(CompletionResponse(text="hi", raw={"usage": {"prompt_tokens": 5,
        ...     "completion_tokens": 1}}))
        {'prompt_tokens': 5, 'completion_tokens': 1}
    """
    raw = getattr(response, "raw", None)
    usage = _get(raw, "usage")
    if usage:
        return usage
    extra = getattr(response, "additional_kwargs", None)
    if isinstance(extra, Mapping) and extra:
        nested = extra.get("usage")
        if nested:
            return nested
        if any(extra.get(k) for k in _USAGE_KEYS):
            return {k: v for k, v in extra.items() if k.endswith(("_tokens", "Tokens", "_details"))}
    return None


def parsed_or_raw(usage: Any) -> Any:
    """``usage`` as a :class:`Usage` when it parses; a malformed record is handed over raw so
    the guard charges the call's bound and flags it instead of failing the run."""
    if usage is None:
        return None
    try:
        return Usage.parse(usage)
    except InvalidUsage:
        return usage


def output_text(response: Any) -> str:
    """What a response wrote (text and tool calls), for an estimate when usage is missing."""
    fields = getattr(response, "__dict__", None)  # a pydantic miss (getattr) costs µs
    message = fields.get("message") if isinstance(fields, dict) else None
    if message is None:
        text = getattr(response, "text", None)
        return text if isinstance(text, str) else ""
    text = message.content or ""
    calls = message.additional_kwargs.get("tool_calls") if message.additional_kwargs else None
    for block in getattr(message, "blocks", ()) or ():
        name = getattr(block, "tool_name", None)
        if isinstance(name, str):
            args = getattr(block, "tool_kwargs", None)
            text += name + (args if isinstance(args, str) else json.dumps(args, default=str))
            calls = None  # the blocks already hold them
    for call in calls or ():
        fn = _get(call, "function")
        text += str(_get(fn, "name") or "") + str(_get(fn, "arguments") or "")
    return text


# -- stops decided where LlamaIndex swallows exceptions ---------------------------------------

_DEFERRED: weakref.WeakKeyDictionary[Task, BudgetExceeded] = weakref.WeakKeyDictionary()
_DEFERRED_LOCK = threading.Lock()


def defer_stop(task: Task, exc: BudgetExceeded) -> None:
    """Keep a stop decided inside a handler or a tool for the next enforcing point."""
    with _DEFERRED_LOCK:
        _DEFERRED.setdefault(task, exc)


def pop_deferred_stop(task: Task) -> BudgetExceeded | None:
    """The stop kept for ``task`` (and its parents), if any; it is raised once."""
    with _DEFERRED_LOCK:
        t: Task | None = task
        while t is not None:
            exc = _DEFERRED.pop(t, None)
            if exc is not None:
                return exc
            t = t.parent
    return None
