"""Policies: the validated description of what a task (and the budgets around it) may spend.

A :class:`Policy` is plain data. It is loaded from Python, a TOML or YAML file, or environment
variables, and every bad value is rejected with a message naming the field and the value.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from agentguard._errors import PolicyError

__all__ = ["Budget", "Downgrade", "OnLimit", "Policy", "Window"]

OnLimit = Literal["raise", "finish", "warn"]
Window = Literal["hour", "day", "month"]


def _to_decimal(value: Any) -> Any:
    """Money arrives as str, int or Decimal. A float would carry binary noise: refuse it."""
    if isinstance(value, float):
        raise ValueError(
            f"money must be given as a string or Decimal, not the float {value!r} "
            f"(write {str(value)!r})"
        )
    if isinstance(value, str):
        try:
            return Decimal(value.strip())
        except InvalidOperation:
            raise ValueError(f"{value!r} is not a decimal number") from None
    return value


Money = Annotated[Decimal, BeforeValidator(_to_decimal), Field(ge=0, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=0, strict=False)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


class Downgrade(_Frozen):
    """One rung of the downgrade ladder: from ``at`` (a fraction of the ceiling spent) use ``to``.

    Example:
        >>> Downgrade(at=0.6, to="gpt-4o-mini")
        Downgrade(at=0.6, to='gpt-4o-mini')
    """

    at: float = Field(gt=0, le=1)
    to: str = Field(min_length=1)

    def __init__(self, at: float, to: str, **kw: Any) -> None:
        try:
            super().__init__(at=at, to=to, **kw)  # type: ignore[call-arg]  # fields of this class
        except ValidationError as exc:
            raise _policy_error(exc, "Downgrade") from None


class Budget(_Frozen):
    """A budget that encloses tasks: a team, an org, a tenant, ... optionally per time window.

    ``scope`` names an attribution tag (``team``, ``org``, ``tenant``, ``feature``, ``user``,
    ``env``) or ``"global"``. A task tagged ``team="cx"`` charges the budget key ``team:cx``;
    with ``window="day"`` the key is ``team:cx@day:2026-11-22`` and rolls over at UTC midnight.
    ``match`` restricts the budget to one tag value (``Budget(scope="team", match="cx", ...)``);
    without it every value of the tag gets its own budget of this size.

    Example:
        >>> Budget(scope="team", max_cost_usd="50", window="day").scope
        'team'
    """

    scope: str = Field(min_length=1, pattern=r"^[A-Za-z_][A-Za-z0-9_\-]*$")
    match: str | None = None
    max_cost_usd: Money | None = None
    max_total_tokens: Count | None = None
    window: Window | None = None

    @model_validator(mode="after")
    def _has_a_limit(self) -> Budget:
        if self.max_cost_usd is None and self.max_total_tokens is None:
            raise ValueError(
                f"budget for scope={self.scope!r} sets neither max_cost_usd nor max_total_tokens"
            )
        return self


class Policy(_Frozen):
    """Limits for one task, the budgets around it, and what to do at a limit.

    Per-task limits (``None`` means unlimited):

    * ``max_cost_usd`` — dollars, ``Decimal``-exact; give it as a string (``"0.25"``).
    * ``max_total_tokens`` / ``max_input_tokens`` / ``max_total_output_tokens`` — token totals.
    * ``max_model_calls``, ``max_tool_calls``, ``tool_limits`` (per tool name),
      ``max_retries``, ``max_steps`` (agent or graph steps).
    * ``max_output_tokens`` — the output cap bound on *each* model call.
    * ``context_budget_tokens`` — retrieved context per call, for the trimmers.

    Behaviour: ``soft_limits`` (fractions of a ceiling that log a warning once each when the
    money spent, not reserved, crosses them), ``downgrade`` (the ladder), ``on_limit``
    (``raise`` / ``finish`` / ``warn``),
    ``finish_output_tokens`` (the cap of the graceful final answer, kept in reserve),
    ``budgets`` (enclosing team / org / window budgets) and ``tags`` (default attribution).

    Example:
        >>> p = Policy(max_cost_usd="0.25", max_model_calls=12, on_limit="finish",
        ...            downgrade=[Downgrade(at=0.6, to="gpt-4o-mini")])
        >>> p.max_cost_usd
        Decimal('0.25')
    """

    max_cost_usd: Money | None = None
    max_total_tokens: Count | None = None
    max_input_tokens: Count | None = None
    max_total_output_tokens: Count | None = None
    max_model_calls: Count | None = None
    max_tool_calls: Count | None = None
    tool_limits: dict[str, Count] = Field(default_factory=dict)
    max_retries: Count | None = None
    max_steps: Count | None = None
    max_output_tokens: Annotated[int, Field(gt=0)] | None = None
    context_budget_tokens: Count | None = None
    soft_limits: tuple[float, ...] = ()
    downgrade: tuple[Downgrade, ...] = ()
    on_limit: OnLimit = "raise"
    finish_output_tokens: Annotated[int, Field(gt=0)] = 256
    finish_model: str | None = None
    budgets: tuple[Budget, ...] = ()
    tags: dict[str, str] = Field(default_factory=dict)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _policy_error(exc, "Policy") from None

    @field_validator("soft_limits")
    @classmethod
    def _fractions(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        for f in v:
            if not 0 < f <= 1:
                raise ValueError(f"soft limit {f!r} is not a fraction in (0, 1]")
        return tuple(sorted(set(v)))

    @field_validator("downgrade")
    @classmethod
    def _ladder_ascends(cls, v: tuple[Downgrade, ...]) -> tuple[Downgrade, ...]:
        for prev, nxt in itertools.pairwise(v):
            if nxt.at <= prev.at:
                raise ValueError(
                    f"rungs must be in increasing order of `at`: {nxt.at!r} follows {prev.at!r}"
                )
        return v

    @property
    def has_cost_limit(self) -> bool:
        return self.max_cost_usd is not None or any(
            b.max_cost_usd is not None for b in self.budgets
        )

    # -- loading -----------------------------------------------------------------------------

    @classmethod
    def build(cls, data: Mapping[str, Any], *, source: str = "policy") -> Policy:
        """Validate a mapping, turning pydantic's errors into one :class:`PolicyError`.

        The message names each bad field (dotted path) and its value.
        """
        try:
            return cls(**{str(k): v for k, v in data.items()})
        except PolicyError as exc:
            exc.args = (str(exc).replace("invalid Policy", f"invalid {source}", 1),)
            raise

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Policy:
        """Load a policy from a ``.toml``, ``.yaml``/``.yml`` or ``.json`` file.

        In TOML the policy may sit at the top level or under ``[agentguard]`` /
        ``[tool.agentguard]`` (so it can live in ``pyproject.toml``).

        Example:
            ``Policy.from_file("agentguard.toml")``
        """
        p = Path(path)
        suffix = p.suffix.lower()
        if suffix not in (".toml", ".yaml", ".yml", ".json"):
            raise PolicyError("path", str(p), "expected a .toml, .yaml, .yml or .json file")
        text = p.read_text(encoding="utf-8")
        data: Any
        if suffix == ".toml":
            import tomllib

            try:
                data = tomllib.loads(text)
            except tomllib.TOMLDecodeError as exc:
                raise PolicyError(str(p), "<file>", f"not valid TOML: {exc}") from None
            if "tool" in data and "agentguard" in data.get("tool", {}):
                data = data["tool"]["agentguard"]
            elif "agentguard" in data:
                data = data["agentguard"]
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:  # pragma: no cover - exercised only without the extra
                raise ImportError(
                    'YAML policies need PyYAML: pip install "agentguard[yaml]"'
                ) from None
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise PolicyError(str(p), "<file>", f"not valid YAML: {exc}") from None
            if isinstance(data, dict) and "agentguard" in data:
                data = data["agentguard"]
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise PolicyError(str(p), "<file>", f"not valid JSON: {exc}") from None
        if not isinstance(data, Mapping):
            raise PolicyError(str(p), type(data).__name__, "a policy file must hold a table")
        return cls.build(data, source=str(p))

    @classmethod
    def from_env(
        cls, prefix: str = "AGENTGUARD_", environ: Mapping[str, str] | None = None
    ) -> Policy:
        """Load a policy from environment variables: ``AGENTGUARD_MAX_COST_USD=0.25`` etc.

        Scalars are given as plain text; lists and tables (``DOWNGRADE``, ``BUDGETS``,
        ``TOOL_LIMITS``, ``TAGS``, ``SOFT_LIMITS``) as JSON. Variables with the prefix that name
        no policy field are rejected, so a typo cannot silently disable a limit.

        Example:
            ``AGENTGUARD_MAX_COST_USD=0.25 AGENTGUARD_ON_LIMIT=finish`` -> ``Policy.from_env()``
        """
        env = os.environ if environ is None else environ
        data: dict[str, Any] = {}
        for key, raw in env.items():
            if not key.startswith(prefix) or key == f"{prefix}DB":
                continue
            name = key[len(prefix) :].lower()
            if name not in cls.model_fields:
                raise PolicyError(key, raw, f"no policy field named {name!r}")
            if name in ("downgrade", "budgets", "tool_limits", "tags", "soft_limits"):
                try:
                    data[name] = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise PolicyError(key, raw, f"expected JSON: {exc.msg}") from None
            else:
                data[name] = raw
        return cls.build(data, source="environment")


def _policy_error(exc: ValidationError, source: str) -> PolicyError:
    parts = []
    first_field, first_value = "policy", None
    for i, err in enumerate(exc.errors()):
        loc = ".".join(str(x) for x in err["loc"]) or "policy"
        value = err.get("input")
        msg = err["msg"]
        inner = (err.get("ctx") or {}).get("error")
        if isinstance(inner, PolicyError):  # a nested model (Downgrade, Budget) already said it
            loc = f"{loc}.{inner.field}" if loc != "policy" else inner.field
            value, msg = inner.value, inner.reason.split(": ", 1)[-1]
        if i == 0:
            first_field, first_value = loc, value
        parts.append(f"{loc}={value!r}: {msg}")
    error = PolicyError(first_field, first_value, "; ".join(parts))
    error.reason = "; ".join(parts)
    error.args = (f"invalid {source}: " + "; ".join(parts),)
    return error
