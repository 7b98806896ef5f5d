"""Budget stores: where committed and reserved spend lives, checked and changed atomically.

The contract (every store passes one conformance suite, ``tests/test_store_conformance.py``):

* ``reserve(rid, lines, amounts)`` — all-or-nothing across every line (task, parent tasks, team,
  org, windows): for each line and each counter that line limits,
  ``committed + reserved + amount <= limit``; otherwise nothing changes and the first failing
  line is reported. A reservation id is used once.
* ``commit(rid, lines, actual)`` — frees the reservation (if still held) and adds the *actual*
  amounts to ``committed`` on the same lines. Actual spend is never clipped: it may exceed a
  limit when a provider reports more than was reserved; later reservations then fail.
* ``release(rid)`` — frees a reservation; idempotent; a no-op after commit.
* ``charge(lines, amounts, check=True)`` — check and commit in one step, without a
  reservation (counters such as steps and retries); ``check=False`` records spend that was not
  admitted in advance (``on_limit="warn"``, a late report).
* ``snapshot(keys)`` — committed and reserved per key.

Invariant: for every key and limited counter, ``committed + reserved <= limit`` holds after any
interleaving of reserve / commit / release — except through actual spend above a reservation,
which is recorded truthfully and flagged by the guard.

Amounts are ``Decimal`` for money (``cost_usd``) and ``int`` for everything else (tokens, calls).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Protocol, runtime_checkable

__all__ = [
    "Balance",
    "BudgetLine",
    "BudgetStore",
    "Denied",
    "MemoryStore",
    "ReserveResult",
]

Amount = Decimal | int

_EMPTY: Mapping[str, Amount] = {}  # read only


@dataclass(frozen=True, slots=True)
class BudgetLine:
    """One budget an operation touches: its key and the counters it limits.

    ``limits`` may be empty: the line then only records (e.g. a team with no ceiling).
    ``expires_at`` (epoch seconds) lets a store drop a windowed key after its window.
    """

    key: str
    limits: Mapping[str, Amount] = field(default_factory=dict)
    expires_at: float | None = None


@dataclass(slots=True)
class Balance:
    """Committed and reserved amounts of one key, by counter."""

    committed: Mapping[str, Amount] = field(default_factory=dict)
    reserved: Mapping[str, Amount] = field(default_factory=dict)

    def used(self, counter: str) -> Amount:
        """Committed plus reserved for ``counter``."""
        return self.committed.get(counter, 0) + self.reserved.get(counter, 0)


@dataclass(frozen=True, slots=True)
class Denied:
    """Why a reservation was refused: the first line and counter that would overflow."""

    key: str
    counter: str
    limit: Amount
    used: Amount
    requested: Amount


@dataclass(slots=True)
class ReserveResult:
    """The outcome of ``reserve``, with the balances of the touched keys after it."""

    ok: bool
    denied: Denied | None = None
    balances: Mapping[str, Balance] = field(default_factory=dict)


@runtime_checkable
class BudgetStore(Protocol):
    """Where budgets live. Sync and async methods; see the module docstring for the contract."""

    def reserve(
        self, reservation_id: str, lines: Sequence[BudgetLine], amounts: Mapping[str, Amount]
    ) -> ReserveResult: ...

    def commit(
        self, reservation_id: str, lines: Sequence[BudgetLine], actual: Mapping[str, Amount]
    ) -> Mapping[str, Balance]: ...

    def release(self, reservation_id: str) -> None: ...

    def charge(
        self, lines: Sequence[BudgetLine], amounts: Mapping[str, Amount], *, check: bool = True
    ) -> ReserveResult: ...

    def snapshot(self, keys: Sequence[str]) -> Mapping[str, Balance]: ...

    async def areserve(
        self, reservation_id: str, lines: Sequence[BudgetLine], amounts: Mapping[str, Amount]
    ) -> ReserveResult: ...

    async def acommit(
        self, reservation_id: str, lines: Sequence[BudgetLine], actual: Mapping[str, Amount]
    ) -> Mapping[str, Balance]: ...

    async def arelease(self, reservation_id: str) -> None: ...

    async def acharge(
        self, lines: Sequence[BudgetLine], amounts: Mapping[str, Amount], *, check: bool = True
    ) -> ReserveResult: ...

    async def asnapshot(self, keys: Sequence[str]) -> Mapping[str, Balance]: ...


class MemoryStore:
    """The embedded default: process-local, thread- and asyncio-safe, exact.

    One lock guards all keys; every operation holds it for a few microseconds and never
    awaits while holding it, so the async methods are safe on any event loop.

    Example:
        >>> s = MemoryStore()
        >>> line = BudgetLine("task:t1", {"cost_usd": Decimal("1")})
        >>> s.reserve("r1", [line], {"cost_usd": Decimal("0.6")}).ok
        True
        >>> s.reserve("r2", [line], {"cost_usd": Decimal("0.6")}).denied.counter
        'cost_usd'
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._committed: dict[str, dict[str, Amount]] = {}
        self._reserved: dict[str, dict[str, Amount]] = {}
        # reservation id -> (keys, amounts)
        self._holds: dict[str, tuple[tuple[str, ...], dict[str, Amount]]] = {}

    # -- internals (called with the lock held) -------------------------------------------------
    #
    # reserve, commit and charge run once or twice per agent event: ``in`` tests and subscripts
    # rather than ``get`` calls, and no helper call per line or counter.

    def _balances(self, lines: Sequence[BudgetLine]) -> dict[str, Balance]:
        com, res = self._committed, self._reserved
        out = {}
        for ln in lines:
            key = ln.key
            c = com.get(key)
            r = res.get(key)
            out[key] = Balance({} if c is None else c.copy(), {} if r is None else r.copy())
        return out

    def _balance(self, key: str) -> Balance:
        return Balance(dict(self._committed.get(key, {})), dict(self._reserved.get(key, {})))

    def _free(self, reservation_id: str) -> None:
        hold = self._holds.pop(reservation_id, None)
        if hold is None:
            return
        keys, amounts = hold
        for key in keys:
            res = self._reserved[key]
            for counter, amount in amounts.items():
                left = res[counter] - amount
                if left:
                    res[counter] = left
                else:
                    del res[counter]

    def _add(
        self, lines: Sequence[BudgetLine], amounts: Mapping[str, Amount]
    ) -> dict[str, Balance]:
        """Add ``amounts`` to each line's committed counters; the lines' balances after it."""
        committed, reserved = self._committed, self._reserved
        out = {}
        for line in lines:
            key = line.key
            if key in committed:
                com = committed[key]
            else:
                com = committed[key] = {}
            for counter, amount in amounts.items():
                if amount:
                    com[counter] = (com[counter] + amount) if counter in com else amount
            out[key] = Balance(com.copy(), reserved[key].copy() if key in reserved else {})
        return out

    def _check(self, lines: Sequence[BudgetLine], amounts: Mapping[str, Amount]) -> Denied | None:
        committed, reserved = self._committed, self._reserved
        for line in lines:
            limits = line.limits
            if not limits:
                continue
            key = line.key
            # ``in`` and subscripts rather than ``get`` calls: this runs on every reservation
            com = committed[key] if key in committed else _EMPTY  # noqa: SIM401
            res = reserved[key] if key in reserved else _EMPTY  # noqa: SIM401
            for counter, limit in limits.items():
                if counter in amounts:
                    amount = amounts[counter]
                    if amount:
                        used = com[counter] if counter in com else 0  # noqa: SIM401
                        if counter in res:
                            used += res[counter]
                        if used + amount > limit:
                            return Denied(key, counter, limit, used, amount)
        return None

    # -- the contract -------------------------------------------------------------------------

    def reserve(
        self, reservation_id: str, lines: Sequence[BudgetLine], amounts: Mapping[str, Amount]
    ) -> ReserveResult:
        with self._lock:
            if reservation_id in self._holds:
                raise ValueError(f"reservation_id={reservation_id!r} is already held")
            denied = self._check(lines, amounts)
            if denied is not None:
                return ReserveResult(False, denied, self._balances(lines))
            held = {}
            for counter, amount in amounts.items():  # a loop, not a comprehension's frame
                if amount:
                    held[counter] = amount  # noqa: PERF403 - see above
            committed, reserved = self._committed, self._reserved
            keys = []
            out = {}
            for line in lines:
                key = line.key
                keys.append(key)
                if key in reserved:
                    res = reserved[key]
                    for counter, amount in held.items():
                        res[counter] = (res[counter] + amount) if counter in res else amount
                else:
                    res = reserved[key] = held.copy()
                out[key] = Balance(committed[key].copy() if key in committed else {}, res.copy())
            self._holds[reservation_id] = (tuple(keys), held)
            return ReserveResult(True, None, out)

    def commit(
        self, reservation_id: str, lines: Sequence[BudgetLine], actual: Mapping[str, Amount]
    ) -> Mapping[str, Balance]:
        with self._lock:
            self._free(reservation_id)
            return self._add(lines, actual)

    def release(self, reservation_id: str) -> None:
        with self._lock:
            self._free(reservation_id)

    def charge(
        self, lines: Sequence[BudgetLine], amounts: Mapping[str, Amount], *, check: bool = True
    ) -> ReserveResult:
        with self._lock:
            if check:
                denied = self._check(lines, amounts)
                if denied is not None:
                    return ReserveResult(False, denied, self._balances(lines))
            return ReserveResult(True, None, self._add(lines, amounts))

    def snapshot(self, keys: Sequence[str]) -> Mapping[str, Balance]:
        with self._lock:
            return {k: self._balance(k) for k in keys}

    async def areserve(
        self, reservation_id: str, lines: Sequence[BudgetLine], amounts: Mapping[str, Amount]
    ) -> ReserveResult:
        return self.reserve(reservation_id, lines, amounts)

    async def acommit(
        self, reservation_id: str, lines: Sequence[BudgetLine], actual: Mapping[str, Amount]
    ) -> Mapping[str, Balance]:
        return self.commit(reservation_id, lines, actual)

    async def arelease(self, reservation_id: str) -> None:
        self.release(reservation_id)

    async def acharge(
        self, lines: Sequence[BudgetLine], amounts: Mapping[str, Amount], *, check: bool = True
    ) -> ReserveResult:
        return self.charge(lines, amounts, check=check)

    async def asnapshot(self, keys: Sequence[str]) -> Mapping[str, Balance]:
        return self.snapshot(keys)
