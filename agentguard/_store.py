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
* ``retire(key)`` (optional) — a closed task's line nothing will charge again: the store may let
  it go (the embedded one drops it, Redis lets it expire) unless a reservation holds it, and
  hands back its balance (``None``: kept). The guard calls it for tasks whose ids it made up.

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
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "Balance",
    "BudgetLine",
    "BudgetStore",
    "Denied",
    "MemoryStore",
    "ReserveResult",
]

Amount = Decimal | int

_EMPTY: Mapping[str, Any] = MappingProxyType({})  # read only


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


#: What the in-place operations of :class:`MemoryStore` return when they succeed (shared:
#: never changed).
_HELD = ReserveResult(True, None, _EMPTY)


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
        self._lock = threading.RLock()  # re-entrant: a public operation holds it around its
        # in-place twin and the copies it hands back
        # key -> its balance, changed in place: a key's committed and reserved dicts are made
        # once, on its first operation, and never replaced (see ``live``)
        self._live: dict[str, Balance] = {}
        # reservation id -> (keys, amounts)
        self._holds: dict[str, tuple[tuple[str, ...], dict[str, Amount]]] = {}

    @property
    def live(self) -> Mapping[str, Balance]:
        """Every key's balance as the store keeps it, changed in place by each operation.

        For the guard's own tasks on this store (in the same process): they read their
        balances here instead of from copies each operation returns. Read only; a key appears
        on its first operation and its ``Balance`` object (and that balance's two dicts) is
        never replaced.
        """
        return self._live

    # -- internals (called with the lock held) -------------------------------------------------
    #
    # reserve, commit and charge run once or twice per agent event: ``in`` tests and subscripts
    # rather than ``get`` calls, and no helper call per line or counter.

    def _copies(self, lines: Sequence[BudgetLine]) -> dict[str, Balance]:
        """The lines' balances, copied (what the public operations hand back)."""
        live = self._live
        out = {}
        for ln in lines:
            key = ln.key
            if key in live:
                b = live[key]
                out[key] = Balance(b.committed.copy(), b.reserved.copy())  # type: ignore[attr-defined]
            else:
                out[key] = Balance({}, {})
        return out

    def _free(self, reservation_id: str) -> None:
        hold = self._holds.pop(reservation_id, None)
        if hold is None:
            return
        keys, amounts = hold
        live = self._live
        for key in keys:
            res: dict[str, Amount] = live[key].reserved  # type: ignore[assignment]
            for counter, amount in amounts.items():
                left = res[counter] - amount
                if left:
                    res[counter] = left
                else:
                    del res[counter]

    def _put(
        self,
        lines: Sequence[BudgetLine],
        amounts: Mapping[str, Amount],
        check: bool,
        reserve: bool,
    ) -> Denied | None:
        """Add ``amounts`` to each line's committed counters (``reserve``: its reserved ones),
        all or nothing: with ``check``, first the refusal of the first line and counter that
        would go over its limit (committed + reserved + amount), and then nothing changes."""
        live = self._live
        if check:
            for line in lines:
                limits = line.limits
                if not limits:
                    continue
                key = line.key
                # ``in`` and subscripts rather than ``get`` calls: this runs on every event
                if key in live:
                    b = live[key]
                    com, res = b.committed, b.reserved
                else:
                    com = res = _EMPTY
                for counter, limit in limits.items():
                    if counter in amounts:
                        amount = amounts[counter]
                        if amount:
                            used = com[counter] if counter in com else 0  # noqa: SIM401
                            if counter in res:
                                used += res[counter]
                            if used + amount > limit:
                                return Denied(key, counter, limit, used, amount)
        for line in lines:
            key = line.key
            if key in live:
                b = live[key]
                into: dict[str, Amount] = b.reserved if reserve else b.committed  # type: ignore[assignment]
            else:
                into = {}
                live[key] = Balance({}, into) if reserve else Balance(into, {})
            for counter, amount in amounts.items():
                if amount:
                    into[counter] = (into[counter] + amount) if counter in into else amount
        return None

    # -- in place: the guard's tasks on this store read ``live`` instead of copies ---------------
    #
    # The operations of the contract, returning no balances (an empty mapping): the caller
    # reads them from ``live``.

    def reserve_in_place(
        self, reservation_id: str, lines: Sequence[BudgetLine], amounts: Mapping[str, Amount]
    ) -> ReserveResult:
        """:meth:`reserve` without copying the balances."""
        held = {}
        for counter, amount in amounts.items():  # a loop, not a comprehension's frame
            if amount:
                held[counter] = amount  # noqa: PERF403 - see above
        with self._lock:
            if reservation_id in self._holds:
                raise ValueError(f"reservation_id={reservation_id!r} is already held")
            denied = self._put(lines, held, True, True)
            if denied is not None:
                return ReserveResult(False, denied, _EMPTY)
            self._holds[reservation_id] = (tuple([ln.key for ln in lines]), held)
        return _HELD

    def commit_in_place(
        self, reservation_id: str, lines: Sequence[BudgetLine], actual: Mapping[str, Amount]
    ) -> Mapping[str, Balance]:
        """:meth:`commit` without copying the balances."""
        with self._lock:
            self._free(reservation_id)
            self._put(lines, actual, False, False)
        return _EMPTY

    def charge_in_place(
        self, lines: Sequence[BudgetLine], amounts: Mapping[str, Amount], *, check: bool = True
    ) -> ReserveResult:
        """:meth:`charge` without copying the balances."""
        with self._lock:
            denied = self._put(lines, amounts, check, False)
        return _HELD if denied is None else ReserveResult(False, denied, _EMPTY)

    def retire(self, key: str) -> Balance | None:
        """Drop ``key`` and hand back its last balance: for a line nothing will charge again
        (the guard retires the line of a closed task opened without an id, once its children
        have closed, so an always-on process does not keep one balance per run). ``None``
        when the key is absent, or still held by a reservation (then it stays).

        Example:
            >>> s = MemoryStore()
            >>> line = BudgetLine("task:t1")
            >>> _ = s.charge([line], {"steps": 2})
            >>> s.retire("task:t1").committed["steps"], "task:t1" in s.live
            (2, False)
        """
        with self._lock:
            for keys, _amounts in self._holds.values():
                if key in keys:
                    return None
            return self._live.pop(key, None)

    def restore(self, key: str, balance: Balance) -> None:
        """Put a retired line back with its balance (an event of its task after the close);
        amounts charged to the key since are added to it."""
        with self._lock:
            since = self._live.get(key)
            self._live[key] = balance
            if since is not None:  # added as any operation adds
                line = [BudgetLine(key)]
                self._put(line, since.committed, False, False)
                self._put(line, since.reserved, False, True)

    # -- the contract -------------------------------------------------------------------------
    #
    # The in-place operation and copies of the touched lines' balances, under one (re-entrant)
    # hold of the lock: the balances are those right after the operation.

    def reserve(
        self, reservation_id: str, lines: Sequence[BudgetLine], amounts: Mapping[str, Amount]
    ) -> ReserveResult:
        with self._lock:
            res = self.reserve_in_place(reservation_id, lines, amounts)
            return ReserveResult(res.ok, res.denied, self._copies(lines))

    def commit(
        self, reservation_id: str, lines: Sequence[BudgetLine], actual: Mapping[str, Amount]
    ) -> Mapping[str, Balance]:
        with self._lock:
            self.commit_in_place(reservation_id, lines, actual)
            return self._copies(lines)

    def release(self, reservation_id: str) -> None:
        with self._lock:
            self._free(reservation_id)

    def charge(
        self, lines: Sequence[BudgetLine], amounts: Mapping[str, Amount], *, check: bool = True
    ) -> ReserveResult:
        with self._lock:
            res = self.charge_in_place(lines, amounts, check=check)
            return ReserveResult(res.ok, res.denied, self._copies(lines))

    def snapshot(self, keys: Sequence[str]) -> Mapping[str, Balance]:
        with self._lock:
            live = self._live
            return {
                k: Balance(dict(live[k].committed), dict(live[k].reserved))
                if k in live
                else Balance({}, {})
                for k in keys
            }

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

    async def aretire(self, key: str) -> Balance | None:
        return self.retire(key)
