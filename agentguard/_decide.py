"""Pure decisions: given a policy, what has been spent and what a call asks for, what happens.

Nothing here does I/O, reads a clock or touches a store; the value classes are plain slotted
dataclasses (not frozen: frozen ones cost microseconds per call on this hot path) and are never
mutated after construction; every function is a pure function of
plain values, shared by every adapter, identical in sync and async code, and tested
exhaustively. The guard gathers the values (balances from the store, rates from the price book,
token estimates from the counter), calls one of these, then reserves what the decision says.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from agentguard._policy import Policy
    from agentguard._pricing import ModelRates

__all__ = [
    "MIN_USEFUL_OUTPUT_TOKENS",
    "Action",
    "CallRequest",
    "Decision",
    "Headroom",
    "Spent",
    "crossed_soft_limits",
    "decide_model_call",
    "decide_retry",
    "decide_step",
    "decide_tool_call",
    "quick_allow",
    "quick_facts",
    "rung_threshold",
]

Action = Literal["allow", "downgrade", "finish", "stop", "block", "warn"]

#: A call that could only afford fewer output tokens than this is not worth making.
MIN_USEFUL_OUTPUT_TOKENS = 16

_ZERO = Decimal(0)


@dataclass(slots=True)
class Spent:
    """What a task has used so far (committed plus in-flight reservations)."""

    cost_usd: Decimal = _ZERO
    input_tokens: int = 0
    output_tokens: int = 0
    model_calls: int = 0
    tool_calls: int = 0
    tool_calls_by_name: Mapping[str, int] = field(default_factory=dict)
    retries: int = 0
    steps: int = 0
    finished: bool = False  # a graceful-finish call has already been granted
    blocked: str | None = None  # the cap that blocked a tool call since the last model call

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(slots=True)
class Headroom:
    """The tightest of the money budgets enclosing a task (its own, its parents', team, org...).

    ``remaining_usd`` is ``None`` when no enclosing budget limits money. ``fraction_spent`` is the
    largest spent/limit fraction among them (drives the downgrade ladder and soft limits).
    """

    remaining_usd: Decimal | None = None
    fraction_spent: float = 0.0
    limit_usd: Decimal | None = None
    budget: str | None = None
    remaining_tokens: int | None = None
    tokens_budget: str | None = None


@dataclass(slots=True)
class CallRequest:
    """A model call about to start.

    ``input_tokens`` is the reservation estimate (margin already applied); ``max_tokens`` the
    caller's own output cap, if any.
    """

    model: str
    input_tokens: int
    max_tokens: int | None = None


@dataclass(slots=True)
class Decision:
    """What to do with the next action.

    * ``allow`` — go ahead with ``model`` and the output cap ``max_tokens``;
    * ``downgrade`` — go ahead, but with the cheaper ``model``;
    * ``finish`` — make one last call (``model``, ``max_tokens``, no tools) that answers from
      what the agent has, then end the run;
    * ``block`` — skip this tool call, tell the model why (the run continues towards a finish);
    * ``stop`` — refuse: the adapter raises :class:`~agentguard.BudgetExceeded`;
    * ``warn`` — a limit is exceeded but the policy only warns; go ahead.
    """

    action: Action
    model: str | None = None
    max_tokens: int | None = None
    reserve_usd: Decimal | None = None
    reason: str = ""
    limit: str | None = None
    limit_value: Decimal | int | None = None
    actual: Decimal | int | None = None
    budget: str | None = None

    @property
    def proceeds(self) -> bool:
        """True when the action goes ahead (allow, downgrade, finish, warn)."""
        return self.action not in ("stop", "block")


# The allow decisions of tools, retries and steps carry nothing but their reason: one shared
# object each (decisions are never mutated), not one built per event.
_ALLOW_TOOL = Decision("allow", reason="within tool limits")
_ALLOW_RETRY = Decision("allow", reason="within retry limit")
_ALLOW_STEP = Decision("allow", reason="within step limit")


def _limit_decision(
    policy: Policy,
    limit: str,
    limit_value: Decimal | int | None,
    actual: Decimal | int | None,
    reason: str,
    *,
    finish_ok: bool,
    budget: str | None = None,
) -> Decision:
    """The decision for a hit limit, by ``on_limit``."""
    if policy.on_limit == "warn":
        action: Action = "warn"
    elif policy.on_limit == "finish" and finish_ok:
        action = "finish"
    else:
        action = "stop"
    return Decision(
        action,
        reason=reason,
        limit=limit,
        limit_value=limit_value,
        actual=actual,
        budget=budget,
    )


def _min_cap(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    return a if b is None or a <= b else b


def _candidates(
    policy: Policy, request: CallRequest, headroom: Headroom, rates: Mapping[str, ModelRates | None]
) -> list[str]:
    """Models to try, best first: the ladder's pick for the current spend, then cheaper rungs.

    A rung is only taken when it is really cheaper than the requested model (known prices): a
    ladder never moves a call *up* in price.
    """
    requested = request.model
    ladder = policy.downgrade
    if not ladder:
        return [requested]
    base = rates.get(requested)
    base_unit = None if base is None else base.input + base.output
    fraction = headroom.fraction_spent
    start = -1  # the ladder's pick for the current spend, if any
    for i, rung in enumerate(ladder):
        if rung.at <= fraction:
            start = i
    if start >= 0:
        picked = ladder[start].to
        r = rates.get(picked)
        if picked == requested or (
            base_unit is not None and (r is None or r.input + r.output >= base_unit)
        ):
            start = -1  # not really cheaper: the requested model first
    if start >= 0:  # from the first rung naming the picked model, as it is ordered
        start = next(i for i, rung in enumerate(ladder) if rung.to == ladder[start].to)
    out: list[str] = [] if start >= 0 else [requested]
    for rung in ladder[start if start >= 0 else 0 :]:
        m = rung.to
        if m in out:
            continue
        if m != requested and base_unit is not None:
            r = rates.get(m)
            if r is None or r.input + r.output >= base_unit:
                continue
        out.append(m)
    return out


def _rung_at(policy: Policy, model: str) -> float:
    return next((r.at for r in policy.downgrade if r.to == model), 0.0)


def decide_model_call(
    policy: Policy,
    spent: Spent,
    headroom: Headroom,
    request: CallRequest,
    rates: Mapping[str, ModelRates | None],
    *,
    finish_call: bool = False,
) -> Decision:
    """Decide a model call: allow / downgrade / finish / stop / warn, with model and output cap.

    ``rates`` maps every model the decision may pick (the requested one and the ladder's) to
    its rates, or ``None`` when unpriced (the guard refuses unpriced models under a cost limit
    before calling this). ``finish_call`` marks the graceful final call the adapter makes after
    a ``finish`` decision: it may use the budget kept back for it.

    Example:
        >>> from agentguard._policy import Policy
        >>> d = decide_model_call(Policy(max_model_calls=1), Spent(model_calls=1), Headroom(),
        ...                       CallRequest("gpt-4o", 100), {"gpt-4o": None})
        >>> d.action, d.limit
        ('stop', 'max_model_calls')
    """
    finishing = policy.on_limit == "finish" and not finish_call
    if spent.finished and not finish_call:
        return Decision(
            "stop",
            reason="the task already made its graceful final call",
            limit="finished",
        )

    # 1. counting caps (calls, tools, steps, tokens)
    hit = _count_limit(policy, spent, request)
    if hit is not None and not finish_call:
        name, value, count, why, finish_ok = hit
        d = _limit_decision(policy, name, value, count, why, finish_ok=finish_ok)
        if d.action != "finish":
            if d.action == "warn":
                return _with_call(
                    d, request.model, _min_cap(policy.max_output_tokens, request.max_tokens)
                )
            return d
        return _finish(policy, request, headroom, rates, d)

    # 2. money and the ladder
    a, b = policy.max_output_tokens, request.max_tokens
    user_cap = b if a is None else (a if b is None or a <= b else b)  # _min_cap(a, b)
    if finish_call:
        user_cap = _min_cap(user_cap, policy.finish_output_tokens)
    # max(1, min(MIN_USEFUL_OUTPUT_TOKENS, user_cap or MIN_USEFUL_OUTPUT_TOKENS))
    need = (
        MIN_USEFUL_OUTPUT_TOKENS
        if not user_cap or user_cap >= MIN_USEFUL_OUTPUT_TOKENS
        else max(1, user_cap)
    )
    cap = user_cap
    tokens_left = headroom.remaining_tokens
    if policy.max_total_tokens is not None:
        task_left = policy.max_total_tokens - spent.total_tokens
        tokens_left = task_left if tokens_left is None else min(tokens_left, task_left)
    if policy.max_total_output_tokens is not None:
        cap = _min_cap(cap, max(0, policy.max_total_output_tokens - spent.output_tokens))
    if tokens_left is not None:
        cap = _min_cap(cap, max(0, tokens_left - request.input_tokens))

    # Below the ladder's first rung the requested model comes first: the cheaper rungs after it
    # (``_candidates``) are only listed when it does not fit.
    ladder = policy.downgrade
    if not ladder:
        candidates, listed = [request.model], True
    elif headroom.fraction_spent < ladder[0].at:  # (the rungs ascend)
        candidates, listed = [request.model], False
    else:
        candidates, listed = _candidates(policy, request, headroom, rates), True
    remaining = headroom.remaining_usd
    i = 0
    while i < len(candidates):
        model = candidates[i]
        i += 1
        r = rates.get(model)
        if remaining is None or r is None:
            if cap is not None and cap < need:
                break
            reserve = (
                None if r is None or cap is None else r.worst_case_cost(request.input_tokens, cap)
            )
            return _allow(model, request.model, cap, reserve, "no money limit applies")
        keep_back = _keep_back(policy, request, rates, model) if finishing else _ZERO
        available = remaining - keep_back
        reserve = r.worst_case_cost(request.input_tokens, cap) if cap is not None else None
        if reserve is not None and reserve <= available:
            out = cap  # the common case: the full cap fits, no division needed
        else:
            affordable = r.max_output_tokens_for(available, request.input_tokens)
            out = affordable if cap is None else min(cap, affordable)
            reserve = None
        if out is not None and out >= need:
            if reserve is None:
                reserve = r.worst_case_cost(request.input_tokens, out)
            why = "within budget"
            if model != request.model:
                if model == candidates[0]:
                    why = (
                        f"{headroom.fraction_spent:.0%} of {headroom.budget} spent "
                        f"(ladder rung at {_rung_at(policy, model):.0%})"
                    )
                else:
                    why = f"the remaining ${remaining} cannot pay for {request.model}"
            if user_cap is None or out < user_cap:
                why += f"; output capped at {out} tokens by the remaining budget"
            return _allow(model, request.model, out, reserve, why)
        if not listed:  # the requested model does not fit: the cheaper rungs next
            candidates = _candidates(policy, request, headroom, rates)
            listed = True

    if not listed:
        candidates = _candidates(policy, request, headroom, rates)
    # 3. nothing fits. ``actual`` is what the budget would reach with the smallest useful call
    # (spent + that call's worst case), so the message reads as an excess over the limit.
    smallest = [
        r.worst_case_cost(request.input_tokens, need)
        for r in (rates.get(m) for m in candidates)
        if r is not None
    ]
    needed = min(smallest) if smallest else _ZERO
    used = None if remaining is None else (headroom.limit_usd or _ZERO) - remaining
    limit_value: Decimal | int | None
    output_left = (
        None
        if policy.max_total_output_tokens is None
        else max(0, policy.max_total_output_tokens - spent.output_tokens)
    )
    if remaining is not None:
        limit_name, limit_value = "max_cost_usd", headroom.limit_usd
        actual: Decimal | int | None = (used or _ZERO) + needed
        reason = (
            f"${remaining} left on {headroom.budget} cannot pay for the next call "
            f"(at least ${needed})"
        )
        budget = headroom.budget
    elif output_left is not None and output_left < need:
        limit_name, limit_value = "max_total_output_tokens", policy.max_total_output_tokens
        actual = spent.output_tokens + need
        reason = f"{output_left} output tokens left cannot hold the next call (at least {need})"
        budget = None
    else:
        limit_name, limit_value = "max_total_tokens", policy.max_total_tokens
        actual = spent.total_tokens + request.input_tokens + need
        reason = f"{tokens_left} tokens left cannot hold the next call"
        budget = headroom.tokens_budget
    if finish_call:
        return Decision(
            "stop",
            reason=f"not even the graceful final call fits: {reason}",
            limit=limit_name,
            limit_value=limit_value,
            actual=actual,
            budget=budget,
        )
    d = _limit_decision(
        policy, limit_name, limit_value, actual, reason, finish_ok=True, budget=budget
    )
    if d.action == "finish":
        return _finish(policy, request, headroom, rates, d)
    if d.action == "warn":
        return _with_call(d, request.model, cap)
    return d


def _allow(
    model: str, requested: str, out: int | None, reserve: Decimal | None, why: str
) -> Decision:
    if model != requested:
        return Decision(
            "downgrade",
            model=model,
            max_tokens=out,
            reserve_usd=reserve,
            reason=f"{requested} -> {model}: {why}",
        )
    return Decision("allow", model=model, max_tokens=out, reserve_usd=reserve, reason=why)


def _with_call(d: Decision, model: str, cap: int | None) -> Decision:
    return Decision(
        d.action,
        model=model,
        max_tokens=cap,
        reserve_usd=None,
        reason=d.reason,
        limit=d.limit,
        limit_value=d.limit_value,
        actual=d.actual,
        budget=d.budget,
    )


# -- the quick allow ----------------------------------------------------------------------------
#
# The guard's model fast lane asks this before building a Spent and a Headroom for
# decide_model_call: the usual call — every counting cap passed, every money budget below the
# ladder's first rung, its worst case at its own cap within the money left — is allowed in a
# few comparisons, with no Decimal division and no candidate list. ``None`` means "ask
# decide_model_call"; tests/test_fast_lanes.py holds the two to the same decisions.

#: What :func:`quick_allow` reads of a policy (:func:`quick_facts`): the model calls, tool
#: calls and steps a task's counts must stay below; the input tokens they may reach (``None``:
#: no cap); the ladder's first rung less a slack (``None``: no ladder); the final call's model
#: (``None``: the requested one) and output cap; whether money is kept back for it.
QuickFacts = tuple[int, int, int, int | None, Decimal | None, str | None, int, bool]

_NO_CAP = 1 << 62  # a count no task reaches
_RUNG_SLACK = Decimal("1e-9")  # more than float(used / limit) can be rounded by
_BELOW_ANY, _BELOW_NONE = Decimal("Infinity"), Decimal("-Infinity")  # spends below them
_ZERO_COUNTS: dict[str, int] = {"model_calls": 0, "tool_calls": 0, "steps": 0, "input_tokens": 0}


def quick_facts(policy: Policy) -> QuickFacts | None:
    """The :data:`QuickFacts` of ``policy`` (its counting caps as ``_count_limit`` reads them),
    or ``None`` when it caps total or output tokens (which lower a call's cap: no quick allow).

    Example:
        >>> from agentguard._policy import Policy
        >>> quick_facts(Policy(max_model_calls=5, on_limit="finish"))[0]  # the last is kept
        4
    """
    if policy.max_total_tokens is not None or policy.max_total_output_tokens is not None:
        return None
    finishing = policy.on_limit == "finish"
    m, t, s = policy.max_model_calls, policy.max_tool_calls, policy.max_steps
    ladder = policy.downgrade
    return (
        _NO_CAP if m is None else (m - 1 if finishing else m),
        t if t is not None and finishing else _NO_CAP,  # a tool cap ends the run under finish
        _NO_CAP if s is None else s,
        policy.max_input_tokens,
        Decimal(ladder[0].at) - _RUNG_SLACK if ladder else None,
        policy.finish_model or (ladder[-1].to if ladder else None),
        policy.finish_output_tokens,
        finishing,
    )


def rung_threshold(facts: QuickFacts, limit: Decimal) -> Decimal:
    """The spend on a budget of ``limit`` below which it is surely below the ladder's first
    rung: any spend without a ladder, none for a limit of zero or less."""
    at = facts[4]
    if at is None:
        return _BELOW_ANY
    return limit * at if limit > 0 else _BELOW_NONE


def quick_allow(
    policy: Policy,
    facts: QuickFacts,
    committed: Mapping[str, Any],
    money_left: Decimal | None,
    model: str,
    input_tokens: int,
    max_tokens: int | None,
    rates: Mapping[str, ModelRates | None],
) -> Decision | None:
    """The decision :func:`decide_model_call` makes for a usual call, or ``None`` to ask it.

    For a task that has not finished, has no blocked tool call and nothing in flight, whose
    committed counters are ``committed``, whose every money budget is below its
    :func:`rung_threshold` (``money_left``: the least money left on them; ``None``: no money
    budget) and which no token budget encloses.

    Example:
        >>> from agentguard._policy import Policy
        >>> from agentguard._pricing import PriceBook
        >>> policy = Policy(max_cost_usd="1", max_output_tokens=100)
        >>> facts, rates = quick_facts(policy), {"gpt-4o": PriceBook().rates("gpt-4o")}
        >>> d = quick_allow(policy, facts, {}, Decimal("1"), "gpt-4o", 100, None, rates)
        >>> d.action, d.max_tokens, d.reserve_usd, d.reason
        ('allow', 100, Decimal('0.0012500'), 'within budget')
    """
    mc_cap, tc_cap, st_cap, in_cap, _at, fin_model, fin_out, finishing = facts
    c = {**_ZERO_COUNTS, **committed}
    if not (
        c["model_calls"] < mc_cap
        and c["tool_calls"] < tc_cap
        and c["steps"] < st_cap
        and (in_cap is None or c["input_tokens"] + input_tokens <= in_cap)
    ):
        return None
    a, cap = policy.max_output_tokens, max_tokens  # _min_cap(a, cap)
    if a is not None and (cap is None or a <= cap):
        cap = a
    if cap is not None and cap < 1:  # no useful call fits under the cap
        return None
    r = rates.get(model)
    if money_left is None:
        reserve = None if r is None or cap is None else r.worst_case_cost(input_tokens, cap)
        return Decision(
            "allow",
            model=model,
            max_tokens=cap,
            reserve_usd=reserve,
            reason="no money limit applies",
        )
    if r is None or cap is None:
        return None
    if finishing:  # _keep_back
        money_left -= (rates.get(fin_model or model) or r).worst_case_cost(
            input_tokens * 2, fin_out
        )
    reserve = r.worst_case_cost(input_tokens, cap)
    if reserve <= money_left:
        return Decision(
            "allow", model=model, max_tokens=cap, reserve_usd=reserve, reason="within budget"
        )
    return None


def _finish_model(policy: Policy, request: CallRequest) -> str:
    if policy.finish_model is not None:
        return policy.finish_model
    if policy.downgrade:
        return policy.downgrade[-1].to
    return request.model


def _keep_back(
    policy: Policy, request: CallRequest, rates: Mapping[str, ModelRates | None], model: str
) -> Decimal:
    """The worst case of the graceful final call, kept back from the money a call may use.

    The final call reads what this call reads plus what the turn adds. We cannot know the next
    tool result's size; we assume the final call reads at most twice this call's input
    (documented in docs/policy.md) and reserve for that. (Runs on every model call under
    ``finish``: ``_finish_model`` is written inline.)
    """
    fm = policy.finish_model
    if fm is None:
        fm = policy.downgrade[-1].to if policy.downgrade else request.model
    r = rates.get(fm) or rates.get(model)
    if r is None:
        return _ZERO
    return r.worst_case_cost(request.input_tokens * 2, policy.finish_output_tokens)


def _finish(
    policy: Policy,
    request: CallRequest,
    headroom: Headroom,
    rates: Mapping[str, ModelRates | None],
    why: Decision,
) -> Decision:
    fm = _finish_model(policy, request)
    r = rates.get(fm)
    if r is None and fm != request.model:
        fm, r = request.model, rates.get(request.model)
    cap = _min_cap(policy.finish_output_tokens, policy.max_output_tokens)
    reserve = None
    if headroom.remaining_usd is not None and r is not None:
        affordable = r.max_output_tokens_for(headroom.remaining_usd, request.input_tokens)
        cap = affordable if cap is None else min(cap, affordable)
        if cap < 1:
            return Decision(
                "stop",
                reason=f"{why.reason}; and the graceful final call does not fit either",
                limit=why.limit,
                limit_value=why.limit_value,
                actual=why.actual,
                budget=why.budget,
            )
        reserve = r.worst_case_cost(request.input_tokens, cap)
    return Decision(
        "finish",
        model=fm,
        max_tokens=cap,
        reserve_usd=reserve,
        reason=why.reason,
        limit=why.limit,
        limit_value=why.limit_value,
        actual=why.actual,
        budget=why.budget,
    )


def _count_limit(
    policy: Policy, spent: Spent, request: CallRequest
) -> tuple[str, int, int, str, bool] | None:
    """The first counting cap the next model call hits: (field, ceiling, actual, reason, finish_ok).

    Under ``on_limit="finish"`` the last allowed model call is kept for the final answer, and a
    reached tool or step cap makes the next model call the final one.
    """
    m = policy.max_model_calls
    if m is not None:
        if spent.model_calls >= m:
            return (
                "max_model_calls",
                m,
                spent.model_calls + 1,
                f"{spent.model_calls} of {m} model calls used",
                False,
            )
        if policy.on_limit == "finish" and spent.model_calls == m - 1:
            return (
                "max_model_calls",
                m,
                spent.model_calls + 1,
                f"the last of {m} model calls is kept for the final answer",
                True,
            )
    t = policy.max_tool_calls
    if t is not None and policy.on_limit == "finish" and spent.tool_calls >= t:
        return ("max_tool_calls", t, spent.tool_calls, f"all {t} tool calls used", True)
    if spent.blocked is not None and policy.on_limit == "finish":
        # a model that keeps asking for a capped tool would loop forever: answer now
        cap = policy.tool_limits.get(spent.blocked.removeprefix("tool_limits."), 0)
        return (spent.blocked, cap, cap + 1, f"a tool call was blocked by {spent.blocked}", True)
    s = policy.max_steps
    if s is not None and spent.steps >= s:
        return ("max_steps", s, spent.steps, f"{spent.steps} of {s} steps used", True)
    mi = policy.max_input_tokens
    if mi is not None and spent.input_tokens + request.input_tokens > mi:
        return (
            "max_input_tokens",
            mi,
            spent.input_tokens + request.input_tokens,
            f"the next call's ~{request.input_tokens} input tokens exceed what is left",
            True,
        )
    return None


def decide_tool_call(policy: Policy, spent: Spent, tool: str) -> Decision:
    """Decide a tool call: allow, or (at a cap) block / stop / warn by ``on_limit``.

    Under ``finish`` a capped tool call is *blocked* (the model is told, the run continues) and
    the next model call becomes the final answer.

    Example:
        >>> from agentguard._policy import Policy
        >>> spent = Spent(tool_calls_by_name={"search": 2})
        >>> decide_tool_call(Policy(tool_limits={"search": 2}), spent, "search").limit
        'tool_limits.search'
    """
    return _tool_decision(policy, tool, spent.tool_calls_by_name.get(tool, 0), spent.tool_calls)


def _tool_decision(policy: Policy, tool: str, used_tool: int, tool_calls: int) -> Decision:
    """:func:`decide_tool_call` from the two counts it reads (the guard reads them from the
    task's balance without building a :class:`Spent`)."""
    per_tool = policy.tool_limits.get(tool)
    if per_tool is not None and used_tool >= per_tool:
        return _tool_limit(
            policy,
            f"tool_limits.{tool}",
            per_tool,
            used_tool + 1,
            f"{tool!r} was called {used_tool} of {per_tool} times",
        )
    t = policy.max_tool_calls
    if t is not None and tool_calls >= t:
        return _tool_limit(
            policy, "max_tool_calls", t, tool_calls + 1, f"{tool_calls} of {t} tool calls used"
        )
    return _ALLOW_TOOL


def _tool_limit(policy: Policy, limit: str, value: int, actual: int, reason: str) -> Decision:
    action: Action = {"raise": "stop", "finish": "block", "warn": "warn"}[policy.on_limit]  # type: ignore[assignment]
    return Decision(action, reason=reason, limit=limit, limit_value=value, actual=actual)


def decide_retry(policy: Policy, spent: Spent) -> Decision:
    """Decide a retry: allow, or stop / warn at ``max_retries`` (a retry cannot be 'finished')."""
    return _retry_decision(policy, spent.retries)


def _retry_decision(policy: Policy, retries: int) -> Decision:
    """:func:`decide_retry` from the count it reads."""
    r = policy.max_retries
    if r is not None and retries >= r:
        action: Action = "warn" if policy.on_limit == "warn" else "stop"
        return Decision(
            action,
            reason=f"{retries} of {r} retries used",
            limit="max_retries",
            limit_value=r,
            actual=retries + 1,
        )
    return _ALLOW_RETRY


def decide_step(policy: Policy, spent: Spent) -> Decision:
    """Decide an agent / graph step: allow, or finish / stop / warn at ``max_steps``."""
    return _step_decision(policy, spent.steps)


def _step_decision(policy: Policy, steps: int) -> Decision:
    """:func:`decide_step` from the count it reads."""
    s = policy.max_steps
    if s is not None and steps >= s:
        return _limit_decision(
            policy, "max_steps", s, steps + 1, f"{steps} of {s} steps used", finish_ok=True
        )
    return _ALLOW_STEP


def crossed_soft_limits(soft_limits: Sequence[float], before: float, after: float) -> list[float]:
    """The soft-limit fractions crossed when spend moves from ``before`` to ``after``.

    Example:
        >>> crossed_soft_limits((0.5, 0.8), 0.4, 0.85)
        [0.5, 0.8]
    """
    return [f for f in soft_limits if before < f <= after]
