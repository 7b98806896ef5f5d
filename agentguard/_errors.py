"""The exceptions agentguard raises.

Every error carries a stable ``code`` (used in logs and docs) and a message that names the
field and the value involved, so the user can fix the input without reading our source.
"""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agentguard._decide import Decision

__all__ = [
    "AgentGuardError",
    "BudgetExceeded",
    "InvalidUsage",
    "PolicyError",
    "StoreError",
    "UnknownModelError",
]


class AgentGuardError(Exception):
    """Base class of every exception raised by agentguard."""

    code: str = "agentguard_error"


class BudgetExceeded(AgentGuardError):  # noqa: N818 - the public name the issue and docs use
    """A limit of the policy stops the next action.

    Attributes:
        limit: the policy field that fired (``max_cost_usd``, ``max_model_calls``, ...).
        limit_value: the configured ceiling.
        actual: what the task (or enclosing budget) has used, plus what the action would add.
        budget: the budget key that fired (``task:ticket-42``, ``team:cx@day:2026-11-22``).
        task_id: the task that was stopped.
    """

    code = "budget_exceeded"

    def __init__(
        self,
        limit: str,
        limit_value: Decimal | int | None,
        actual: Decimal | int | None,
        *,
        budget: str | None = None,
        task_id: str | None = None,
        detail: str = "",
    ) -> None:
        self.limit = limit
        self.limit_value = limit_value
        self.actual = actual
        self.budget = budget
        self.task_id = task_id
        where = f" on {budget}" if budget else ""
        msg = f"Exceeded the {limit} of {limit_value}{where} ({limit}={actual})"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)

    @classmethod
    def from_decision(
        cls, d: Decision, *, task_id: str | None, why: str = "", limit: str = "budget"
    ) -> BudgetExceeded:
        """The stop a decision describes: its limit (``limit`` when it names none), values,
        budget and reason (``why`` appended: why it cannot be carried out otherwise).

        Example:
            >>> from agentguard._decide import Decision
            >>> d = Decision("stop", reason="5 of 5 steps used", limit="max_steps", limit_value=5)
            >>> str(BudgetExceeded.from_decision(d, task_id="t"))
            'Exceeded the max_steps of 5 (max_steps=None): 5 of 5 steps used'
        """
        return cls(
            d.limit or limit,
            d.limit_value,
            d.actual,
            budget=d.budget,
            task_id=task_id,
            detail=f"{d.reason}; {why}" if why else d.reason,
        )


class PolicyError(AgentGuardError, ValueError):
    """A policy (or a guard's configuration) is malformed. The message names field and value."""

    code = "invalid_policy"

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"{field}={value!r}: {reason}")


class InvalidUsage(AgentGuardError, ValueError):  # noqa: N818 - reads as a noun, like ValueError
    """A usage record is negative, non-integer, inconsistent or absurd; it is not summed."""

    code = "invalid_usage"

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        super().__init__(f"usage {field}={value!r}: {reason}")


class UnknownModelError(AgentGuardError, LookupError):
    """No price is known for a model that a cost limit needs priced."""

    code = "unknown_model"

    def __init__(self, model: str, detail: str = "") -> None:
        self.model = model
        msg = (
            f"model={model!r} has no known price, so a cost limit cannot be enforced for it. "
            "Add a price override (PriceBook(overrides={...})), an alias to a priced model, "
            "or set PriceBook(unknown_model='fallback', fallback=...)"
        )
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)


class StoreError(AgentGuardError):
    """The budget store could not be reached or answered unexpectedly."""

    code = "store_error"
