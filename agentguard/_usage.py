"""One normalised token-usage record, and converters from the shapes adapters meet.

Conventions (the ones genai-prices expects):

* ``input_tokens`` counts *every* input token, cache reads and cache writes included;
* ``cache_read_tokens`` / ``cache_write_tokens`` are the parts of the input served from / written
  to the provider's prompt cache;
* ``output_tokens`` counts every output token, reasoning included; ``reasoning_tokens`` is the
  reasoning part of it.

Providers disagree: Anthropic and Bedrock Converse report cache tokens *beside* the input, OpenAI
and LangChain's ``usage_metadata`` report them *inside* it. The converters here resolve that so
the rest of agentguard sees one shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agentguard._errors import InvalidUsage

__all__ = ["MAX_TOKENS_PER_CALL", "Usage"]

#: A single call reporting more tokens than this is treated as a corrupt record, not summed.
MAX_TOKENS_PER_CALL = 100_000_000

_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
)


def _as_count(field: str, value: object, *, per_call: bool) -> int:
    if value is None:
        return 0
    if isinstance(value, bool):
        raise InvalidUsage(field, value, "expected an integer token count, got a bool")
    if isinstance(value, int):
        count = value
    elif isinstance(value, float) and value.is_integer():
        count = int(value)
    else:
        raise InvalidUsage(field, value, "expected a non-negative integer token count")
    if count < 0:
        raise InvalidUsage(field, value, "token counts cannot be negative")
    if per_call and count > MAX_TOKENS_PER_CALL:
        raise InvalidUsage(
            field, value, f"more than {MAX_TOKENS_PER_CALL:,} tokens in one call is not plausible"
        )
    return count


class Usage:
    """Token usage of one call, or the sum of several.

    Example:
        >>> u = Usage(input_tokens=1200, cache_read_tokens=1000, output_tokens=80)
        >>> u.uncached_input_tokens, u.total_tokens
        (200, 1280)
    """

    __slots__ = (
        "cache_read_tokens",
        "cache_write_tokens",
        "estimated",
        "input_tokens",
        "output_tokens",
        "reasoning_tokens",
    )

    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    estimated: bool

    def __init__(
        self,
        input_tokens: int = 0,
        output_tokens: int = 0,
        cache_read_tokens: int = 0,
        cache_write_tokens: int = 0,
        reasoning_tokens: int = 0,
        *,
        estimated: bool = False,
        per_call: bool = True,
    ) -> None:
        i, o, cr, cw, r = (
            input_tokens,
            output_tokens,
            cache_read_tokens,
            cache_write_tokens,
            reasoning_tokens,
        )
        int_ = int
        if not (  # the fast path: plain in-range ints, as _as_count would return them
            type(i) is int_
            and type(o) is int_
            and type(cr) is int_
            and type(cw) is int_
            and type(r) is int_
            and i >= 0
            and o >= 0
            and cr >= 0
            and cw >= 0
            and r >= 0
            and (
                not per_call
                or (
                    i <= MAX_TOKENS_PER_CALL
                    and o <= MAX_TOKENS_PER_CALL
                    and cr <= MAX_TOKENS_PER_CALL
                    and cw <= MAX_TOKENS_PER_CALL
                    and r <= MAX_TOKENS_PER_CALL
                )
            )
        ):
            i = _as_count("input_tokens", input_tokens, per_call=per_call)
            o = _as_count("output_tokens", output_tokens, per_call=per_call)
            cr = _as_count("cache_read_tokens", cache_read_tokens, per_call=per_call)
            cw = _as_count("cache_write_tokens", cache_write_tokens, per_call=per_call)
            r = _as_count("reasoning_tokens", reasoning_tokens, per_call=per_call)
        if cr + cw > i:
            raise InvalidUsage(
                "cache_read_tokens",
                cr,
                f"cache reads ({cr}) + cache writes ({cw}) exceed input_tokens ({i}); "
                "input_tokens must include cached tokens (use Usage.from_anthropic for "
                "providers that report them separately)",
            )
        if r > o:
            raise InvalidUsage(
                "reasoning_tokens", r, f"reasoning tokens exceed output_tokens ({o})"
            )
        object.__setattr__(self, "input_tokens", i)
        object.__setattr__(self, "output_tokens", o)
        object.__setattr__(self, "cache_read_tokens", cr)
        object.__setattr__(self, "cache_write_tokens", cw)
        object.__setattr__(self, "reasoning_tokens", r)
        object.__setattr__(self, "estimated", bool(estimated))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Usage is immutable")

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def uncached_input_tokens(self) -> int:
        return self.input_tokens - self.cache_read_tokens - self.cache_write_tokens

    def __add__(self, other: object) -> Usage:
        if not isinstance(other, Usage):
            return NotImplemented
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cache_read_tokens + other.cache_read_tokens,
            self.cache_write_tokens + other.cache_write_tokens,
            self.reasoning_tokens + other.reasoning_tokens,
            estimated=self.estimated or other.estimated,
            per_call=False,
        )

    def __radd__(self, other: object) -> Usage:
        if other == 0:  # sum()
            return self
        return self.__add__(other)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Usage):
            return NotImplemented
        return self.as_dict() == other.as_dict()

    def __hash__(self) -> int:
        return hash(tuple(self.as_dict().values()))

    def __repr__(self) -> str:
        parts = [f"{k}={getattr(self, k)}" for k in _FIELDS if getattr(self, k)]
        if self.estimated:
            parts.append("estimated=True")
        return f"Usage({', '.join(parts)})"

    def as_dict(self) -> dict[str, Any]:
        """Plain dict, for traces and JSON."""
        d: dict[str, Any] = {k: getattr(self, k) for k in _FIELDS}
        d["estimated"] = self.estimated
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Usage:
        """Inverse of :meth:`as_dict` (sums read back from a trace are not per-call checked)."""
        return cls(
            *(data.get(k, 0) for k in _FIELDS),
            estimated=bool(data.get("estimated", False)),
            per_call=False,
        )

    # -- converters -------------------------------------------------------------------------

    @classmethod
    def from_langchain(cls, usage_metadata: Mapping[str, Any]) -> Usage:
        """From LangChain's ``AIMessage.usage_metadata`` (cache tokens are inside input).

        Example:
            >>> Usage.from_langchain({"input_tokens": 50, "output_tokens": 9, "total_tokens": 59,
            ...     "input_token_details": {"cache_read": 32}})
            Usage(input_tokens=50, output_tokens=9, cache_read_tokens=32)
        """
        if type(usage_metadata) is dict:  # the usual shape: plain look-ups, no _get calls
            get = usage_metadata.get
            in_d = get("input_token_details")
            out_d = get("output_token_details")
            if (in_d is None or type(in_d) is dict) and (out_d is None or type(out_d) is dict):
                # a missing count is 0 (what _as_count makes of None): Usage's fast path then
                i, o = get("input_tokens"), get("output_tokens")
                cr = in_d.get("cache_read") if in_d else None
                cw = in_d.get("cache_creation") if in_d else None
                r = out_d.get("reasoning") if out_d else None
                return cls(
                    0 if i is None else i,
                    0 if o is None else o,
                    0 if cr is None else cr,
                    0 if cw is None else cw,
                    0 if r is None else r,
                )
        in_d = _get(usage_metadata, "input_token_details") or {}
        out_d = _get(usage_metadata, "output_token_details") or {}
        return cls(
            input_tokens=_get(usage_metadata, "input_tokens"),
            output_tokens=_get(usage_metadata, "output_tokens"),
            cache_read_tokens=_get(in_d, "cache_read"),
            cache_write_tokens=_get(in_d, "cache_creation"),
            reasoning_tokens=_get(out_d, "reasoning"),
        )

    @classmethod
    def from_openai(cls, usage: Any) -> Usage:
        """From OpenAI's ``usage``: Chat Completions or Responses API, dict or SDK object."""
        if _get(usage, "prompt_tokens") is not None or _get(usage, "completion_tokens") is not None:
            in_d = _get(usage, "prompt_tokens_details") or {}
            out_d = _get(usage, "completion_tokens_details") or {}
            return cls(
                input_tokens=_get(usage, "prompt_tokens"),
                output_tokens=_get(usage, "completion_tokens"),
                cache_read_tokens=_get(in_d, "cached_tokens"),
                reasoning_tokens=_get(out_d, "reasoning_tokens"),
            )
        in_d = _get(usage, "input_tokens_details") or {}
        out_d = _get(usage, "output_tokens_details") or {}
        return cls(
            input_tokens=_get(usage, "input_tokens"),
            output_tokens=_get(usage, "output_tokens"),
            cache_read_tokens=_get(in_d, "cached_tokens"),
            reasoning_tokens=_get(out_d, "reasoning_tokens"),
        )

    @classmethod
    def from_anthropic(cls, usage: Any) -> Usage:
        """From Anthropic's Messages ``usage``, where cache tokens are *not* in ``input_tokens``.

        Example:
            >>> Usage.from_anthropic({"input_tokens": 10, "cache_read_input_tokens": 2000,
            ...     "cache_creation_input_tokens": 0, "output_tokens": 50})
            Usage(input_tokens=2010, output_tokens=50, cache_read_tokens=2000)
        """
        base = _as_count("input_tokens", _get(usage, "input_tokens"), per_call=True)
        cr = _as_count(
            "cache_read_input_tokens", _get(usage, "cache_read_input_tokens"), per_call=True
        )
        cw = _as_count(
            "cache_creation_input_tokens", _get(usage, "cache_creation_input_tokens"), per_call=True
        )
        return cls(
            input_tokens=base + cr + cw,
            output_tokens=_get(usage, "output_tokens"),
            cache_read_tokens=cr,
            cache_write_tokens=cw,
        )

    @classmethod
    def from_bedrock(cls, usage: Any) -> Usage:
        """From Bedrock Converse ``usage`` (``inputTokens`` excludes cache reads and writes)."""
        base = _as_count("inputTokens", _get(usage, "inputTokens"), per_call=True)
        out = _as_count("outputTokens", _get(usage, "outputTokens"), per_call=True)
        cr = _as_count("cacheReadInputTokens", _get(usage, "cacheReadInputTokens"), per_call=True)
        cw = _as_count("cacheWriteInputTokens", _get(usage, "cacheWriteInputTokens"), per_call=True)
        total = _get(usage, "totalTokens")
        if (
            total is not None
            and cr + cw
            and _as_count("totalTokens", total, per_call=True) == (base + out)
        ):
            # Some gateways fold the cache into inputTokens; totalTokens tells which it is.
            return cls(base, out, cr, cw)
        return cls(base + cr + cw, out, cr, cw)

    @classmethod
    def parse(cls, raw: Any) -> Usage:
        """Best-effort: recognise any of the shapes above by its keys."""
        if isinstance(raw, Usage):
            return raw
        if _get(raw, "prompt_tokens") is not None or _get(raw, "input_tokens_details") is not None:
            return cls.from_openai(raw)
        if _get(raw, "inputTokens") is not None:
            return cls.from_bedrock(raw)
        if (
            _get(raw, "cache_read_input_tokens") is not None
            or _get(raw, "cache_creation_input_tokens") is not None
        ):
            return cls.from_anthropic(raw)
        if _get(raw, "input_tokens") is not None or _get(raw, "output_tokens") is not None:
            return cls.from_langchain(raw)
        raise InvalidUsage("usage", raw, "unrecognised usage shape")


def _get(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    if type(obj) is dict:  # the common case, without an ABC instance check
        return obj.get(key)
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)
