"""Pieces every LangChain entry point shares: reading usage off messages, the current task,
and the flag that keeps one model call from being charged twice."""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any

from agentguard import InvalidUsage, Usage

__all__ = ["METERED", "already_metered", "metered_here", "output_cap", "usage_of"]

# Set while the middleware or the budget-aware chat model is making a model call it meters
# itself: a callback handler attached to the same run sees it and does not charge the call
# again (a user may attach both; each call is charged once). A hot path may read and set it
# directly (``METERED.get()``; ``METERED.set(True)`` ... ``METERED.reset(token)``) instead of
# through the two helpers below.
METERED: ContextVar[bool] = ContextVar("agentguard_langchain_metered", default=False)


class metered_here:  # noqa: N801 - used as a function: ``with metered_here():``
    """Mark the model calls made inside this block as metered by the caller.

    A plain class, not ``contextlib.contextmanager`` (a generator per use): it is entered on
    every metered model and tool call.
    """

    __slots__ = ("_token",)

    def __enter__(self) -> None:
        self._token = METERED.set(True)

    def __exit__(self, *exc: object) -> None:
        METERED.reset(self._token)


def already_metered() -> bool:
    """True inside :func:`metered_here` (the call is charged by the middleware / wrapper)."""
    return METERED.get()


def usage_of(message: Any) -> Usage | None:
    """The usage a chat model reported on an ``AIMessage`` (or chunk), or ``None``.

    Reads ``usage_metadata`` (LangChain's normalised shape) first, then provider shapes in
    ``response_metadata`` (OpenAI ``token_usage``, Anthropic / Bedrock ``usage``).
    Raises :class:`agentguard.InvalidUsage` for a malformed record.
    """
    um = getattr(message, "usage_metadata", None)
    if um:
        return Usage.from_langchain(um)
    meta = getattr(message, "response_metadata", None)
    if isinstance(meta, Mapping):
        for key in ("token_usage", "usage"):
            raw = meta.get(key)
            if raw:
                try:
                    return Usage.parse(raw)
                except InvalidUsage:
                    raise
    return None


def output_cap(value: Any) -> int | None:
    """An output cap as the guard reads it: an int of at least 1, else ``None`` — no cap
    (``-1`` is "as many as the model may" for some LangChain models; a bool is not a cap).

    Example:
        >>> output_cap(200), output_cap(-1), output_cap(0), output_cap(True), output_cap("9")
        (200, None, None, None, None)
    """
    if type(value) is int or (isinstance(value, int) and not isinstance(value, bool)):
        return value if value > 0 else None
    return None
