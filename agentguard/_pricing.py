"""Model prices: genai-prices (offline) plus user overrides, resolved once per model and cached.

genai-prices' ``calc_price`` costs ~200 µs a call, far too much for the per-call path of a
guard. :class:`PriceBook` resolves each model once into a :class:`ModelRates` (per-token
``Decimal`` rates, long-context tiers included) and prices usage with plain ``Decimal``
arithmetic, which gives *exactly* the figure ``genai_prices.calc_price`` gives for the same usage.

How genai-prices prices a usage, and so how :meth:`ModelRates.cost` does:

* ``input_tokens`` includes cache reads and writes. Cache reads are billed at the cache-read
  rate and cache writes at the cache-write rate; **a model without a cache-read (or cache-write)
  price bills those tokens at its input rate** (genai-prices keeps them in the input bucket).
  :attr:`ModelRates.cache_read` / :attr:`ModelRates.cache_write` are ``None`` in that case.
* Tiered prices are a *cliff*: when the call's total input tokens exceed a tier's ``start``,
  every token of that unit (input, output, cache...) is billed at the tier's price.
* Reasoning tokens are part of ``output_tokens`` and billed at the output rate, except for the
  few models that price reasoning separately (``output_reasoning_mtok``, e.g. Perplexity's
  ``sonar-deep-research``): there the reasoning part is billed at :attr:`ModelRates.reasoning`
  (genai-prices is then given ``output_reasoning_tokens`` too).
* A per-request fee (``requests_kcount``, Perplexity) is charged once per call.
* Prices of other units (audio, image, web searches...) never apply to the token usage
  agentguard records, so they are ignored; genai-prices charges nothing for them either.

Each resolution is checked against genai-prices itself on probe usages; a model whose price the
fast path would not reproduce exactly is priced by delegating to genai-prices (slow, exact).
Prices that change with the time of day (DeepSeek peak hours) or on a future date are
re-resolved when they change, and :meth:`ModelRates.worst_case_cost` covers the highest price
in effect during the next 24 hours.

Money is ``Decimal`` throughout; an unknown price is ``None``, never ``0``.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from datetime import time as dtime
from decimal import ROUND_FLOOR, Decimal
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agentguard._errors import PolicyError, UnknownModelError
from agentguard._usage import MAX_TOKENS_PER_CALL, Usage

if TYPE_CHECKING:
    from genai_prices.types import ModelInfo, ModelPrice, Provider, TieredPrices

__all__ = ["ModelRates", "PriceBook", "PriceOverride", "RateTier"]

_MILLION = Decimal(1_000_000)
_THOUSAND = Decimal(1_000)
_ZERO = Decimal(0)
_FOREVER = math.inf

# genai-prices price keys the fast path models, and the ModelRates unit each one feeds.
_TOKEN_KEYS = (
    ("input", "input_mtok"),
    ("output", "output_mtok"),
    ("cache_read", "cache_read_mtok"),
    ("cache_write", "cache_write_mtok"),
    ("reasoning", "output_reasoning_mtok"),
)
_REQUEST_KEY = "requests_kcount"

# Bedrock model ids: an optional cross-region inference prefix, then "<vendor>.<model>".
_BEDROCK_RE = re.compile(
    r"^(?:(?:us|eu|apac|global|us-gov|jp|au|ca|regional)\.)?"
    r"(?:anthropic|amazon|meta|mistral|cohere|ai21|deepseek|qwen|openai|writer|nvidia|google"
    r"|moonshot|moonshotai|minimax|stability|twelvelabs|luma)\.[a-z0-9]"
)


# -- rates ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RateTier:
    """Per-token rates that apply when a call's total input tokens exceed ``start``.

    genai-prices' tiers are a cliff: above the threshold *all* tokens of the call use the tier's
    price. Tiers of the different units are merged into one table, so every tier carries the
    rate of every unit. ``cache_read`` / ``cache_write`` / ``reasoning`` are ``None`` when those
    tokens are billed like input (output, for reasoning).
    """

    start: int
    input: Decimal
    output: Decimal
    cache_read: Decimal | None = None
    cache_write: Decimal | None = None
    reasoning: Decimal | None = None
    per_request: Decimal | None = None


# One row of the internal cost table: (start, input, output, cache_read, cache_write,
# reasoning-or-None, per_request-or-None, worst-case input rate). Cache rates are effective
# (the input rate when the model has no cache price).
_Row = tuple[int, Decimal, Decimal, Decimal, Decimal, Decimal | None, Decimal | None, Decimal]


@dataclass(frozen=True, slots=True)
class ModelRates:
    """The resolved prices of one model, in USD per *one* token.

    Attributes:
        model: the model id that was asked for.
        resolved: the genai-prices model id (or the override / alias target).
        provider: the genai-prices provider id, ``None`` for overrides and the fallback.
        source: where the prices come from: ``"genai-prices 0.2.3"``, ``"override"``,
            ``"override(discount=0.8) of genai-prices 0.2.3"`` or ``"fallback"``.
        input: USD per input token (below the first tier).
        output: USD per output token.
        cache_read: USD per cache-read token; ``None`` means cache reads are billed as input.
        cache_write: USD per cache-write token; ``None`` means cache writes are billed as input.
        reasoning: USD per reasoning token for the rare models that price reasoning apart from
            output; ``None`` (the usual case) means reasoning tokens are billed as output.
        per_request: a fixed USD fee per call (``None`` when there is none).
        tiers: long-context tiers, ascending by ``start`` (see :class:`RateTier`).
        discount: the negotiated factor applied to genai-prices' rates, if any.
        peak: other rates this model's price switches to within the next 24 hours
            (time-of-day pricing); :meth:`worst_case_cost` covers them.
        exact_price: the genai-prices ``ModelPrice`` that :meth:`cost` delegates to when the
            fast path cannot reproduce genai-prices exactly for this model (normally ``None``).

    Example:
        >>> from agentguard._usage import Usage
        >>> r = PriceBook().require("gpt-4o")
        >>> r.cost(Usage(input_tokens=1000, cache_read_tokens=400, output_tokens=100))
        Decimal('0.00300000')
        >>> r.worst_case_cost(1000, 100)
        Decimal('0.0035000')
    """

    model: str
    resolved: str
    provider: str | None
    source: str
    input: Decimal
    output: Decimal
    cache_read: Decimal | None = None
    cache_write: Decimal | None = None
    reasoning: Decimal | None = None
    per_request: Decimal | None = None
    tiers: tuple[RateTier, ...] = ()
    discount: Decimal | None = None
    peak: tuple[ModelRates, ...] = field(default=(), repr=False, compare=False)
    exact_price: Any = field(default=None, repr=False, compare=False)
    _rows: tuple[_Row, ...] = field(init=False, repr=False, compare=False)
    # the only row, when there are no tiers (the usual case: no search per call), else None
    _single: _Row | None = field(init=False, repr=False, compare=False)
    # (worst-case input rate, output rate for a worst case, per-request fee) when there are no
    # tiers and no peak rates: worst_case_cost without a helper call
    _flat: tuple[Decimal, Decimal, Decimal | None] | None = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        rows = [
            _row(
                -1,
                self.input,
                self.output,
                self.cache_read,
                self.cache_write,
                self.reasoning,
                self.per_request,
            )
        ]
        rows.extend(
            _row(
                t.start,
                t.input,
                t.output,
                t.cache_read,
                t.cache_write,
                t.reasoning,
                t.per_request,
            )
            for t in sorted(self.tiers, key=lambda t: t.start)
        )
        object.__setattr__(self, "_rows", tuple(rows))
        single = rows[0] if len(rows) == 1 else None
        object.__setattr__(self, "_single", single)
        flat = None
        if single is not None and not self.peak:
            _, _, rout, _, _, rreas, rreq, wc_in = single
            flat = (wc_in, rout if rreas is None else max(rout, rreas), rreq)
        object.__setattr__(self, "_flat", flat)

    def _row_for(self, input_tokens: int) -> _Row:
        rows = self._rows
        if len(rows) > 1:
            for row in reversed(rows):
                if input_tokens > row[0]:
                    return row
        return rows[0]

    def cost(self, usage: Usage) -> Decimal:
        """The exact price of ``usage``, equal to genai-prices' ``calc_price(...).total_price``.

        Example:
            >>> from agentguard._usage import Usage
            >>> PriceBook().require("gpt-4o-mini").cost(Usage(input_tokens=2000, output_tokens=500))
            Decimal('0.000600000')
        """
        if self.exact_price is not None:
            return self._exact_cost(usage)
        i = usage.input_tokens
        row = self._single
        _, rin, rout, rcr, rcw, rreas, rreq, _ = row if row is not None else self._row_for(i)
        cr = usage.cache_read_tokens
        cw = usage.cache_write_tokens
        total = (i - cr - cw) * rin + cr * rcr + cw * rcw
        o = usage.output_tokens
        if rreas is None:
            total += o * rout
        else:
            rt = usage.reasoning_tokens
            total += (o - rt) * rout + rt * rreas
        if rreq is not None:
            total += rreq
        return total

    def _exact_cost(self, usage: Usage) -> Decimal:
        price = _genai_total(self.exact_price, usage, reasoning=self.reasoning is not None)
        return price if self.discount is None else price * self.discount

    def _worst_case(self, input_tokens: int, output_tokens: int) -> Decimal:
        _, _, rout, _, _, rreas, rreq, wc_in = self._row_for(input_tokens)
        out_rate = rout if rreas is None else max(rout, rreas)
        total = input_tokens * wc_in + output_tokens * out_rate
        if rreq is not None:
            total += rreq
        return total

    def worst_case_cost(self, input_tokens: int, output_tokens: int) -> Decimal:
        """An upper bound of the cost of a call, for a budget reservation.

        Every input token is priced at the highest rate an input token can cost (input, cache
        read or cache write: a cache write can cost more than plain input), the tier chosen by
        ``input_tokens``; output at the output (or reasoning, if higher) rate; plus any
        per-request fee. For a price that changes during the day, the highest one in effect
        within the next 24 hours. ``worst_case_cost(i, o) >= cost(u)`` for every usage ``u``
        with ``i`` input and ``o`` output tokens.

        Example:
            >>> PriceBook().require("claude-3-5-haiku").worst_case_cost(1000, 100)
            Decimal('0.001400')
        """
        flat = self._flat
        if flat is not None:  # _worst_case, inline
            wc_in, out_rate, rreq = flat
            total = input_tokens * wc_in + output_tokens * out_rate
            return total if rreq is None else total + rreq
        worst = self._worst_case(input_tokens, output_tokens)
        for other in self.peak:
            worst = max(worst, other._worst_case(input_tokens, output_tokens))
        return worst

    def _max_output(self, usd: Decimal, input_tokens: int) -> int:
        _, _, rout, _, _, rreas, rreq, wc_in = self._row_for(input_tokens)
        left = usd - input_tokens * wc_in - (rreq or _ZERO)
        if left < 0:
            return -1
        out_rate = rout if rreas is None else max(rout, rreas)
        if out_rate == 0:
            return MAX_TOKENS_PER_CALL
        n = int((left / out_rate).to_integral_value(rounding=ROUND_FLOOR))
        while n > 0 and n * out_rate > left:  # guard against rounding in the division
            n -= 1
        return min(n, MAX_TOKENS_PER_CALL)

    def max_output_tokens_for(self, usd: Decimal, input_tokens: int) -> int:
        """How many output tokens ``usd`` pays for, after the worst-case cost of the input.

        Rounded down, so ``worst_case_cost(input_tokens, result) <= usd``. Returns 0 when the
        input alone costs more than ``usd``; the result never exceeds ``MAX_TOKENS_PER_CALL``
        (100 M), which is also what a model with free output gets.

        Example:
            >>> from decimal import Decimal
            >>> PriceBook().require("gpt-4o").max_output_tokens_for(Decimal("0.01"), 1000)
            750
        """
        n = self._max_output(usd, input_tokens)
        for other in self.peak:
            n = min(n, other._max_output(usd, input_tokens))
        return max(n, 0)

    @property
    def per_million(self) -> dict[str, Decimal | None]:
        """The base-tier rates in USD per million tokens, for display."""
        out: dict[str, Decimal | None] = {
            "input": _display(self.input * _MILLION),
            "output": _display(self.output * _MILLION),
            "cache_read": None if self.cache_read is None else _display(self.cache_read * _MILLION),
            "cache_write": (
                None if self.cache_write is None else _display(self.cache_write * _MILLION)
            ),
        }
        if self.reasoning is not None:
            out["reasoning"] = _display(self.reasoning * _MILLION)
        return out

    def scaled(self, factor: Decimal, source: str) -> ModelRates:
        """These rates multiplied by ``factor`` (a negotiated discount), relabelled."""
        tiers = tuple(
            RateTier(
                t.start,
                t.input * factor,
                t.output * factor,
                _mul(t.cache_read, factor),
                _mul(t.cache_write, factor),
                _mul(t.reasoning, factor),
                _mul(t.per_request, factor),
            )
            for t in self.tiers
        )
        return replace(
            self,
            source=source,
            input=self.input * factor,
            output=self.output * factor,
            cache_read=_mul(self.cache_read, factor),
            cache_write=_mul(self.cache_write, factor),
            reasoning=_mul(self.reasoning, factor),
            per_request=_mul(self.per_request, factor),
            tiers=tiers,
            discount=factor if self.discount is None else self.discount * factor,
            peak=tuple(p.scaled(factor, source) for p in self.peak),
        )


def _row(
    start: int,
    rin: Decimal,
    rout: Decimal,
    rcr: Decimal | None,
    rcw: Decimal | None,
    rreas: Decimal | None,
    rreq: Decimal | None,
) -> _Row:
    cr = rin if rcr is None else rcr
    cw = rin if rcw is None else rcw
    return (start, rin, rout, cr, cw, rreas, rreq, max(rin, cr, cw))


def _mul(value: Decimal | None, factor: Decimal) -> Decimal | None:
    return None if value is None else value * factor


def _display(value: Decimal) -> Decimal:
    if value == value.to_integral_value():
        return value.quantize(Decimal(1))
    return value.normalize()


# -- overrides --------------------------------------------------------------------------------

_Rate = Annotated[Decimal, Field(ge=0, allow_inf_nan=False)]
_Discount = Annotated[Decimal, Field(gt=0, le=1, allow_inf_nan=False)]
_RATE_FIELDS = ("input_per_mtok", "output_per_mtok", "cache_read_per_mtok", "cache_write_per_mtok")


class _OverrideConflictError(ValueError):
    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"{field}={value!r}: {reason}")


class PriceOverride(BaseModel):
    """A user price for one model: explicit per-million rates, *or* a discount on genai-prices.

    Explicit rates price self-hosted or custom models (``0`` is allowed); ``cache_read_per_mtok``
    / ``cache_write_per_mtok`` default to ``None``: those tokens are then billed as input.
    ``discount`` (a factor in ``(0, 1]``) multiplies genai-prices' rates of the model (or of its
    alias target), for negotiated contracts. Invalid values raise :class:`PolicyError` naming
    the field and the value.

    Example:
        >>> PriceOverride(input_per_mtok="0.5", output_per_mtok=2).input_per_mtok
        Decimal('0.5')
        >>> PriceOverride(discount="0.8").discount
        Decimal('0.8')
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_per_mtok: _Rate | None = None
    output_per_mtok: _Rate | None = None
    cache_read_per_mtok: _Rate | None = None
    cache_write_per_mtok: _Rate | None = None
    discount: _Discount | None = None

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _policy_error(exc, "") from None

    @model_validator(mode="after")
    def _one_mode(self) -> PriceOverride:
        explicit = {k: getattr(self, k) for k in _RATE_FIELDS if getattr(self, k) is not None}
        if self.discount is not None:
            if explicit:
                given = ", ".join(f"{k}={v}" for k, v in explicit.items())
                raise _OverrideConflictError(
                    "discount",
                    self.discount,
                    f"give either a discount or explicit rates, not both (also got {given})",
                )
            return self
        for name in ("input_per_mtok", "output_per_mtok"):
            if getattr(self, name) is None:
                raise _OverrideConflictError(
                    name,
                    None,
                    "explicit rates need input_per_mtok and output_per_mtok "
                    "(or give discount=<factor> alone)",
                )
        return self

    @property
    def is_discount(self) -> bool:
        """True for a discount on genai-prices' rates, False for explicit rates."""
        return self.discount is not None

    def to_rates(self, model: str, resolved: str, source: str) -> ModelRates:
        """Explicit rates as a :class:`ModelRates` (not for a discount override)."""
        if self.input_per_mtok is None or self.output_per_mtok is None:
            raise PolicyError("discount", self.discount, "a discount has no rates of its own")
        return ModelRates(
            model=model,
            resolved=resolved,
            provider=None,
            source=source,
            input=self.input_per_mtok / _MILLION,
            output=self.output_per_mtok / _MILLION,
            cache_read=_per_token(self.cache_read_per_mtok),
            cache_write=_per_token(self.cache_write_per_mtok),
        )


def _per_token(per_mtok: Decimal | None) -> Decimal | None:
    return None if per_mtok is None else per_mtok / _MILLION


def _policy_error(exc: ValidationError, prefix: str) -> PolicyError:
    err = exc.errors(include_url=False)[0]
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, _OverrideConflictError):
        field, value, reason = cause.field, cause.value, cause.reason
    else:
        field = ".".join(str(part) for part in err["loc"]) or "override"
        value, reason = err.get("input"), err["msg"]
    error = PolicyError(prefix + field, value, reason)
    error.reason = reason  # lets _parse_override re-prefix it
    return error


def _parse_override(where: str, raw: object) -> PriceOverride:
    if isinstance(raw, PriceOverride):
        return raw
    if not isinstance(raw, Mapping) or not all(isinstance(k, str) for k in raw):
        raise PolicyError(where, raw, "expected a PriceOverride or a mapping of its fields")
    try:
        return PriceOverride(**raw)
    except PolicyError as exc:
        reason = getattr(exc, "reason", str(exc))
        raise PolicyError(f"{where}.{exc.field}", exc.value, reason) from None


# -- genai-prices -----------------------------------------------------------------------------


class _Unpriced(Exception):  # noqa: N818 - internal signal, never escapes
    pass


def _genai_usage(usage: Usage, *, reasoning: bool) -> Any:
    from genai_prices import Usage as GenaiUsage

    kwargs: dict[str, int] = {
        "input_tokens": usage.input_tokens,
        "cache_read_tokens": usage.cache_read_tokens,
        "cache_write_tokens": usage.cache_write_tokens,
        "output_tokens": usage.output_tokens,
    }
    if reasoning:
        kwargs["output_reasoning_tokens"] = usage.reasoning_tokens
    return GenaiUsage(**kwargs)


def _genai_total(model_price: ModelPrice, usage: Usage, *, reasoning: bool) -> Decimal:
    return model_price.calc_price(_genai_usage(usage, reasoning=reasoning))["total_price"]


def _unit(value: Decimal | TieredPrices | None, per: Decimal) -> tuple[Decimal | None, list[Any]]:
    """(base rate per unit, tiers) of one genai-prices price."""
    from genai_prices.types import TieredPrices

    if value is None:
        return None, []
    if isinstance(value, TieredPrices):
        return value.base / per, sorted(value.tiers, key=lambda t: t.start)
    return value / per, []


def _rate_at(base: Decimal | None, tiers: list[Any], per: Decimal, start: int) -> Decimal | None:
    rate = base
    for tier in tiers:
        if tier.start <= start:
            rate = tier.price / per
    return rate


def _rates_from_price(
    model_price: ModelPrice, model: str, resolved: str, provider: str, source: str
) -> ModelRates:
    units: dict[str, tuple[Decimal | None, list[Any]]] = {
        name: _unit(getattr(model_price, key, None), _MILLION) for name, key in _TOKEN_KEYS
    }
    units["per_request"] = _unit(getattr(model_price, _REQUEST_KEY, None), _THOUSAND)
    if units["input"][0] is None:
        priced = sorted(k for k, v in vars(model_price).items() if v is not None)
        raise _Unpriced(
            f"genai-prices has no per-token input price for {resolved!r}"
            + (f" (it prices {', '.join(priced)})" if priced else " (no prices at all)")
        )
    starts = sorted({t.start for _, tiers in units.values() for t in tiers})

    def at(name: str, start: int) -> Decimal | None:
        base, tiers = units[name]
        per = _THOUSAND if name == "per_request" else _MILLION
        return _rate_at(base, tiers, per, start)

    tiers = tuple(
        RateTier(
            start=s,
            input=at("input", s) or _ZERO,
            output=at("output", s) or _ZERO,
            cache_read=at("cache_read", s),
            cache_write=at("cache_write", s),
            reasoning=at("reasoning", s),
            per_request=at("per_request", s),
        )
        for s in starts
    )
    return ModelRates(
        model=model,
        resolved=resolved,
        provider=provider,
        source=source,
        input=units["input"][0] or _ZERO,
        output=units["output"][0] or _ZERO,  # embedding models have no output price
        cache_read=units["cache_read"][0],
        cache_write=units["cache_write"][0],
        reasoning=units["reasoning"][0],
        per_request=units["per_request"][0],
        tiers=tiers,
    )


def _probes(rates: ModelRates) -> list[Usage]:
    """Usages that exercise every unit in every tier."""
    probes = []
    starts = [-1, *(t.start for t in rates.tiers)]
    for s in starts:
        n = max(s + 1, 1000)
        probes.append(
            Usage(
                input_tokens=n,
                cache_read_tokens=n // 3,
                cache_write_tokens=n // 5,
                output_tokens=777,
                reasoning_tokens=111,
                per_call=False,
            )
        )
    return probes


def _checked(rates: ModelRates, model_price: ModelPrice) -> ModelRates:
    """``rates``, or a copy that delegates to genai-prices if the fast path disagrees with it."""
    reasoning = rates.reasoning is not None
    try:
        for usage in _probes(rates):
            if rates.cost(usage) != _genai_total(model_price, usage, reasoning=reasoning):
                return replace(rates, exact_price=model_price)
    except (ValueError, ArithmeticError, Warning) as exc:  # Warning: under -W error
        raise _Unpriced(f"genai-prices cannot price {rates.resolved!r}: {exc}") from exc
    return rates


def _utc_time(t: dtime) -> dtime:
    if t.tzinfo is None:
        return t
    return datetime.combine(datetime(1970, 1, 1).date(), t).astimezone(UTC).time()


def _boundaries(info: ModelInfo, now: datetime) -> list[datetime]:
    """Future instants at which this model's price may change, ascending."""
    from genai_prices.types import StartDateConstraint, TimeOfDateConstraint

    if not isinstance(info.prices, list):
        return []
    found: set[datetime] = set()
    today = now.date()
    for conditional in info.prices:
        c = conditional.constraint
        if isinstance(c, StartDateConstraint):
            found.add(datetime.combine(c.start_date, dtime(0), tzinfo=UTC))
        elif isinstance(c, TimeOfDateConstraint):
            for t in (c.start_time, c.end_time):
                for day in (today, today + timedelta(days=1)):
                    found.add(datetime.combine(day, _utc_time(t), tzinfo=UTC))
    return sorted(b for b in found if b > now)


@dataclass(slots=True)
class _Genai:
    provider: Provider
    info: ModelInfo


_VERSION: list[str] = []


def _genai_source() -> str:
    if not _VERSION:
        import genai_prices

        _VERSION.append(f"genai-prices {genai_prices.__version__}")
    from genai_prices import data_snapshot

    if data_snapshot.get_snapshot().from_auto_update:
        return _VERSION[0] + " (auto-updated)"
    return _VERSION[0]


def _known_provider(provider_id: str) -> bool:
    from genai_prices import data_snapshot

    snap = data_snapshot.get_snapshot()
    return data_snapshot.find_provider_by_id(snap.providers, provider_id) is not None


def _find(ref: str, provider_id: str | None, tried: list[str]) -> _Genai | None:
    from genai_prices import data_snapshot

    snap = data_snapshot.get_snapshot()
    try:
        provider, info = snap.find_provider_model(ref, None, provider_id, None)
    except LookupError as exc:
        tried.append(str(exc))
        return None
    return _Genai(provider, info)


def _lookup_genai(ref: str, provider_id: str | None, tried: list[str]) -> _Genai | None:
    """Find a model in genai-prices: explicit provider, provider prefix, Bedrock id, anywhere."""
    ref = ref.strip().lower()
    if ref.startswith("arn:aws:bedrock:") and "/" in ref:
        ref = ref.rsplit("/", 1)[1]
        provider_id = provider_id or "aws"
    if (
        provider_id
        and _known_provider(provider_id)
        and (found := _find(ref, provider_id, tried)) is not None
    ):
        return found
    for sep in ("/", ":"):
        prefix, found_sep, rest = ref.partition(sep)
        if found_sep and rest and prefix and "." not in prefix and _known_provider(prefix):
            if (found := _find(rest, prefix, tried)) is not None:
                return found
            if _BEDROCK_RE.match(rest) and (found := _find(rest, "aws", tried)) is not None:
                return found
    if _BEDROCK_RE.match(ref) and (found := _find(ref, "aws", tried)) is not None:
        return found
    return _find(ref, None, tried)


# -- the price book ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    rates: ModelRates | None
    expires: float  # epoch seconds; math.inf when the price cannot change
    detail: str


class PriceBook:
    """Model prices from genai-prices plus user overrides, resolved once per model and cached.

    Args:
        overrides: model id -> :class:`PriceOverride` (or a mapping of its fields): explicit
            rates for custom or self-hosted models, or a ``discount`` on genai-prices' rates.
        aliases: custom model id -> a genai-prices model ref or another override key, e.g.
            ``{"my-proxy/gpt4o-prod": "gpt-4o"}``.
        unknown_model: what :meth:`rates` does for a model nobody prices: ``"error"`` returns
            ``None`` (a guard refuses it under a cost limit); ``"fallback"`` prices it with
            ``fallback`` (labelled ``source="fallback"``).
        fallback: explicit rates for unknown models; required with ``unknown_model="fallback"``.
        provider: default genai-prices provider id (``"openai"``, ``"aws"``, ``"azure"``...)
            used when :meth:`rates` is not given one.

    Model ids are matched case-insensitively. ``"openai/gpt-4o"``, ``"azure/gpt-4o"``,
    ``"bedrock/..."`` and LangChain's ``"openai:gpt-4o"`` use the prefix as the provider when
    genai-prices knows it; Bedrock ids (``"us.anthropic.claude-3-5-sonnet-20240620-v1:0"``) are
    looked up under AWS.

    Example:
        >>> from agentguard._usage import Usage
        >>> book = PriceBook(
        ...     overrides={"llama-local": {"input_per_mtok": 0, "output_per_mtok": 0},
        ...                "gpt-4o": {"discount": "0.8"}},
        ...     aliases={"my-proxy/gpt4o-prod": "gpt-4o"})
        >>> book.require("my-proxy/gpt4o-prod").source
        'override(discount=0.8) of genai-prices 0.2.3'
        >>> book.cost("llama-local", Usage(input_tokens=10, output_tokens=5))
        Decimal('0')
        >>> book.rates("no-such-model") is None
        True
    """

    def __init__(
        self,
        overrides: Mapping[str, PriceOverride | Mapping[str, Any]] | None = None,
        aliases: Mapping[str, str] | None = None,
        *,
        unknown_model: Literal["error", "fallback"] = "error",
        fallback: PriceOverride | Mapping[str, Any] | None = None,
        provider: str | None = None,
    ) -> None:
        if unknown_model not in ("error", "fallback"):
            raise PolicyError("unknown_model", unknown_model, "expected 'error' or 'fallback'")
        self._overrides: dict[str, PriceOverride] = {}
        for key, raw in (overrides or {}).items():
            where = f"overrides[{key!r}]"
            if not isinstance(key, str) or not key.strip():
                raise PolicyError("overrides", key, "model ids must be non-empty strings")
            if key.strip().lower() in self._overrides:
                raise PolicyError(where, raw, "duplicate model id (ids are case-insensitive)")
            self._overrides[key.strip().lower()] = _parse_override(where, raw)
        self._aliases: dict[str, str] = {}
        for key, target in (aliases or {}).items():
            if not isinstance(key, str) or not key.strip():
                raise PolicyError("aliases", key, "model ids must be non-empty strings")
            if not isinstance(target, str) or not target.strip():
                raise PolicyError(f"aliases[{key!r}]", target, "expected a model id")
            if key.strip().lower() in self._aliases:
                raise PolicyError(
                    f"aliases[{key!r}]", target, "duplicate model id (ids are case-insensitive)"
                )
            self._aliases[key.strip().lower()] = target.strip().lower()
        for key in self._aliases:
            chain = [key]
            while chain[-1] in self._aliases:
                nxt = self._aliases[chain[-1]]
                if nxt in chain:
                    raise PolicyError(
                        f"aliases[{key!r}]", nxt, "alias cycle: " + " -> ".join([*chain, nxt])
                    )
                chain.append(nxt)
        self._fallback: ModelRates | None = None
        if fallback is not None:
            fb = _parse_override("fallback", fallback)
            if fb.is_discount:
                raise PolicyError(
                    "fallback.discount",
                    fb.discount,
                    "the fallback prices models genai-prices does not know, so it needs "
                    "explicit input_per_mtok and output_per_mtok",
                )
            if unknown_model != "fallback":
                raise PolicyError(
                    "fallback", fallback, "is only used with unknown_model='fallback'"
                )
            self._fallback = fb.to_rates("", "fallback", "fallback")
        elif unknown_model == "fallback":
            raise PolicyError(
                "fallback", None, "unknown_model='fallback' needs fallback rates to price with"
            )
        self.unknown_model = unknown_model
        self.provider = provider
        self._cache: dict[tuple[str, str | None], _Entry] = {}
        self._lock = threading.Lock()

    def rates(self, model: str, provider: str | None = None) -> ModelRates | None:
        """The rates of ``model``, or ``None`` when nobody prices it (and no fallback is set).

        Cached per ``(model, provider)``: a second lookup returns the same object.

        Example:
            >>> PriceBook().rates("gpt-4o").per_million["input"]
            Decimal('2.5')
        """
        key = (model, provider if provider is not None else self.provider)
        entry = self._cache.get(key)
        if entry is None or entry.expires <= time.time():
            entry = self._entry(key)
        return entry.rates

    def require(self, model: str, provider: str | None = None) -> ModelRates:
        """Like :meth:`rates`, but raise :class:`UnknownModelError` for an unpriced model.

        Example:
            >>> try:
            ...     PriceBook().require("no-such-model")
            ... except UnknownModelError as exc:
            ...     print(exc.model)
            no-such-model
        """
        rates = self.rates(model, provider)
        if rates is None:
            key = (model, provider if provider is not None else self.provider)
            entry = self._cache.get(key)
            raise UnknownModelError(model, entry.detail if entry is not None else "")
        return rates

    def cost(self, model: str, usage: Usage, provider: str | None = None) -> Decimal | None:
        """The price of ``usage`` on ``model``, or ``None`` when the model is unpriced.

        Example:
            >>> from agentguard._usage import Usage
            >>> PriceBook().cost("gpt-4o", Usage(input_tokens=1000, output_tokens=100))
            Decimal('0.00350000')
        """
        rates = self.rates(model, provider)
        return None if rates is None else rates.cost(usage)

    def clear_cache(self) -> None:
        """Forget resolved rates (e.g. after installing a newer genai-prices snapshot)."""
        with self._lock:
            self._cache.clear()

    # -- resolution ---------------------------------------------------------------------------

    def _entry(self, key: tuple[str, str | None]) -> _Entry:
        with self._lock:
            entry = self._cache.get(key)
            now = time.time()
            if entry is not None and entry.expires > now:
                return entry
            model, provider = key
            tried: list[str] = []
            expires = [_FOREVER]
            rates = self._resolve(model.strip().lower(), provider, (), tried, expires)
            detail = ""
            if rates is None:
                detail = "; ".join(dict.fromkeys(tried)) or "empty model id"
                if self._fallback is not None:
                    rates = replace(self._fallback, model=model)
            else:
                rates = replace(rates, model=model)
            entry = _Entry(rates, expires[0], detail)
            self._cache[key] = entry
            return entry

    def _resolve(
        self,
        name: str,
        provider: str | None,
        seen: tuple[str, ...],
        tried: list[str],
        expires: list[float],
    ) -> ModelRates | None:
        if not name:
            return None
        override = self._overrides.get(name)
        if override is not None and not override.is_discount:
            return override.to_rates(name, name, "override")
        target = self._aliases.get(name)
        if target is not None and target not in seen:
            base = self._resolve(target, provider, (*seen, name), tried, expires)
        else:
            base = None
            for sep in ("/", ":"):
                prefix, found_sep, rest = name.partition(sep)
                if (
                    found_sep
                    and (rest in self._overrides or rest in self._aliases)
                    and _known_provider(prefix)
                ):
                    base = self._resolve(rest, prefix, (*seen, name), tried, expires)
                    break
            if base is None:
                base = self._genai_rates(name, provider, tried, expires)
        if base is None:
            if override is not None:
                tried.append(
                    f"the discount override of {name!r} needs a genai-prices price to discount; "
                    "add an alias to a known model or give explicit rates"
                )
            return None
        if override is not None and override.discount is not None:
            return base.scaled(
                override.discount, f"override(discount={override.discount}) of {base.source}"
            )
        return base

    def _genai_rates(
        self, ref: str, provider: str | None, tried: list[str], expires: list[float]
    ) -> ModelRates | None:
        found = _lookup_genai(ref, provider, tried)
        if found is None:
            return None
        now = datetime.now(UTC)
        source = _genai_source()
        model_id, provider_id = found.info.id, found.provider.id
        try:
            rates = _checked(
                _rates_from_price(found.info.get_prices(now), ref, model_id, provider_id, source),
                found.info.get_prices(now),
            )
            bounds = _boundaries(found.info, now)
            if bounds:
                expires[0] = min(expires[0], bounds[0].timestamp())
                horizon = now + timedelta(days=1)
                current = found.info.get_prices(now)
                others: list[ModelPrice] = []
                for b in bounds:
                    if b > horizon:
                        break
                    price = found.info.get_prices(b)
                    if price != current and all(price != o for o in others):
                        others.append(price)
                peak = tuple(
                    _checked(_rates_from_price(p, ref, model_id, provider_id, source), p)
                    for p in others
                )
                rates = replace(rates, peak=peak)
        except _Unpriced as exc:
            tried.append(str(exc))
            return None
        return rates
