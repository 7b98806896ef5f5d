"""``RedisStore``: budgets shared by every worker and process, on Redis or Redis Cluster.

The only module of agentguard that imports redis (``pip install "agentguard[redis]"``).
Layout, the Lua contract, failure modes and sizing are in ``docs/redis.md``; in short:

* one Lua script per operation (``_redis_lua.py``), loaded once per server and called by
  SHA (``EVALSHA``; on ``NOSCRIPT`` it is loaded and the call repeated);
* every key of a store carries one hash tag, ``{<namespace>}``, so each script's keys — task,
  team, org and window lines of one reservation, its lease record — live in one slot and the
  same store runs on Redis Cluster;
* money is kept as exact integers (10**-18 USD), sent and stored as ``(hi, lo)`` number pairs;
  reservations round up, commits half-even, limits down; amounts come back as ``Decimal``;
* a reservation is a lease, renewed every ``lease_ttl / 3`` by a background thread while this
  process holds it (up to ``lease_max``): held by a worker that died, it is reclaimed after
  ``lease_ttl``; a commit arriving after that is still recorded and counted in
  ``late_commits``;
* ``on_store_error``: ``"fail_closed"`` raises :class:`~agentguard.StoreError`;
  ``"fail_open"`` accounts locally and replays the spend into Redis when it is back, each
  operation at most once (commits are idempotent per reservation id, charges per op id).

All I/O lives in two small drivers (``_drive`` and ``_adrive``); each operation is one
generator that yields the script calls it needs, so the sync and async APIs share one body.

The sync path on a plain ``redis.Redis`` (and on each master of a ``RedisCluster``) skips
redis-py's per-command machinery, which costs more than the round trip itself: the store keeps
the connections it takes from the client's pool, packs each ``EVALSHA`` itself and reads one
bulk-string reply (JSON) that ``json.loads`` decodes in C. Anything unusual — a redirection, a
connection error, another client type — goes through the client's own ``evalsha``.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import AsyncGenerator, Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_EVEN, Context, Decimal
from typing import Any, Literal

from agentguard import _redis_lua as lua
from agentguard._errors import StoreError
from agentguard._store import Amount, Balance, BudgetLine, Denied, MemoryStore, ReserveResult

try:
    import redis
    import redis.asyncio as aredis
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
    from redis.backoff import NoBackoff
    from redis.cluster import ClusterNode, RedisCluster
    from redis.exceptions import (
        AskError,
        ClusterDownError,
        NoScriptError,
        TryAgainError,
    )
    from redis.retry import Retry
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    raise ImportError('RedisStore needs redis-py: pip install "agentguard[redis]"') from exc

__all__ = ["RedisStore"]

log = logging.getLogger("agentguard.redis")

MONEY = "cost_usd"
_SCALE = Decimal(10) ** 18  # money units per USD
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.MasterDownError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.RedisClusterException,
)
OnStoreError = Literal["fail_closed", "fail_open"]


# -- numbers ----------------------------------------------------------------------------------


_EXACT = Context(prec=64)  # wide enough for any stored amount, whatever the caller's context
_B = 10**12  # amounts travel and live as (hi, lo) pairs: hi * _B + lo, 0 <= lo < _B


def _units(counter: str, value: Amount, rounding: str) -> int:
    """``value`` in units: 10**-18 USD for money, 1 for integer counters."""
    if counter == MONEY:
        return int(_EXACT.multiply(Decimal(value), _SCALE).to_integral_value(rounding))
    if isinstance(value, int):
        return value
    return int(Decimal(value).to_integral_value(rounding))


def _amount(counter: str, n: int) -> Amount:
    """Units back to an amount: ``Decimal`` USD (trailing zeros dropped) or ``int``."""
    if counter != MONEY:
        return n
    return _EXACT.divide(n, _SCALE)


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _side(lo: dict[str, Any] | None, hi: dict[str, Any] | None) -> dict[str, Amount]:
    """One side of a budget document: ``lo`` parts, plus ``hi * 10**12`` where there is one."""
    if not lo:
        return {}
    out: dict[str, Any] = lo  # a fresh dict from json.loads: ours to change
    if hi:
        for c, h in hi.items():
            out[c] = out.get(c, 0) + int(h) * _B
    n = out.get(MONEY)
    if n is not None:
        out[MONEY] = _amount(MONEY, n)
    return out


def _balance(doc: Mapping[str, Any]) -> Balance:
    """A budget document as the scripts keep and return it — ``{"c": {counter: lo}, "C":
    {counter: hi}, "r": ..., "R": ...}``, committed and reserved in units, zeros left out — as a
    ``Balance``."""
    if not doc:
        return Balance({}, {})
    return Balance(_side(doc.get("c"), doc.get("C")), _side(doc.get("r"), doc.get("R")))


def _balances(keys: Sequence[str], docs: Sequence[Any]) -> dict[str, Balance]:
    """The balances a script returns: one document per key, in order."""
    if len(docs) != len(keys):
        raise ValueError(f"{len(docs)} balances for {len(keys)} keys")
    return {k: _balance(doc) for k, doc in zip(keys, docs, strict=True)}


def _pack(args: Sequence[str]) -> bytes:
    """One command in the Redis protocol (RESP), utf-8."""
    body = "".join([f"${len(a)}\r\n{a}\r\n" for a in args])
    if body.isascii():  # lengths in characters are lengths in bytes
        return f"*{len(args)}\r\n{body}".encode()
    parts = [a.encode() for a in args]
    out = [b"*%d\r\n" % len(parts)]
    out += [b"$%d\r\n%b\r\n" % (len(p), p) for p in parts]
    return b"".join(out)


def _loads(reply: Any) -> Any:
    return json.loads(reply)


_NAMES: dict[str, str] = {}  # counter name -> its JSON string, for reservation records


def _encode_amounts(amounts: Mapping[str, Amount], rounding: str) -> tuple[list[str], str]:
    """The script arguments for ``amounts`` (``n``, then ``counter, hi, lo`` triples), and the
    same triples as the JSON list a reservation record keeps."""
    args: list[str] = []
    held: list[str] = []
    names = _NAMES
    for counter, value in amounts.items():
        if value:
            if type(value) is int and counter != MONEY:
                n = value
            else:
                n = _units(counter, value, rounding)
            if 0 <= n < _B:
                h, lo = "0", str(n)
            else:
                hi, low = divmod(n, _B)
                h, lo = str(hi), str(low)
            args += (counter, h, lo)
            name = names.get(counter)
            if name is None:
                if len(names) > 4096:
                    names.clear()
                name = names[counter] = json.dumps(counter, ensure_ascii=False)
            held.append(f"{name},{h},{lo}")
    return [str(len(held)), *args], "[" + ",".join(held) + "]"


# -- requests and the pure part ----------------------------------------------------------------


@dataclass(slots=True)
class _Req:
    script: str
    keys: list[str]
    args: list[str]
    retry_arg: int | None = None  # index of the arg set to "1" when the call is retried

    def packed(self, sha: str) -> list[bytes]:
        keys = self.keys
        # send_packed_command takes a list of chunks
        return [_pack(["EVALSHA", sha, str(len(keys)), *keys, *self.args])]


class _Conns:
    """Connections taken once from a redis-py pool and kept for this store's own calls.

    Taking one is a ``list.pop`` (atomic under the GIL), so a call pays for neither the
    pool's lock and liveness poll nor redis-py's command pipeline. A connection goes back
    after every call, also after an error (redis-py disconnects it on I/O errors and it
    reconnects on the next send). ``close`` hands them all back to the pool.
    """

    __slots__ = ("free", "get", "pid", "pool")

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.free: list[Any] = []
        self.pid = os.getpid()
        # redis-py < 5.3 wants a command name, later versions warn when given one
        param = inspect.signature(pool.get_connection).parameters.get("command_name")
        named = param is not None and param.default is inspect.Parameter.empty
        self.get: Callable[[], Any] = (
            (lambda: pool.get_connection("EVALSHA")) if named else pool.get_connection
        )

    def take(self) -> tuple[Any, bool]:
        """A connection, and whether it was used before (it may have gone stale)."""
        if self.pid != os.getpid():  # forked: the parent's sockets are not ours
            self.free, self.pid = [], os.getpid()
        try:
            return self.free.pop(), True
        except IndexError:
            return self.get(), False

    def close(self) -> None:
        free, self.free = self.free, []
        for conn in free:
            try:
                self.pool.release(conn)
            except Exception:  # pragma: no cover - a pool that is already gone
                conn.disconnect()


class _Unavailable(Exception):  # noqa: N818 - internal signal, not an error for users
    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


@dataclass(slots=True)
class _Journal:
    """Operations accounted locally while Redis was unreachable, replayed in order."""

    ops: list[tuple[str, str, list[BudgetLine], dict[str, Amount]]] = field(default_factory=list)
    retry_at: float = 0.0


_SCRIPTS = {
    "reserve": lua.RESERVE,
    "commit": lua.COMMIT,
    "release": lua.RELEASE,
    "charge": lua.CHARGE,
    "snapshot": lua.SNAPSHOT,
    "renew": lua.RENEW,
    "retire": lua.RETIRE,
    "trivial": lua.TRIVIAL,
}


class RedisStore:
    """A :class:`~agentguard.BudgetStore` on Redis or Redis Cluster, shared by every worker.

    Args:
        client: a ``redis.Redis`` or ``redis.cluster.RedisCluster`` (sync) client.
        async_client: a factory for the matching ``redis.asyncio`` client, called once per event
            loop; without it the async methods run the sync client in a thread.
        namespace: the hash tag of every key (``{namespace}:...``); stores with different
            namespaces are independent and may live on different cluster shards.
        lease_ttl: seconds a reservation is held before it is reclaimed (a worker died).
        renew_leases: while this process holds a reservation, a background thread extends its
            lease every ``lease_ttl / 3`` seconds, so a call that runs longer than ``lease_ttl``
            keeps it; when the process dies the renewals stop and the lease runs out.
        lease_max: seconds a reservation is renewed at most (``None``: as long as it is held),
            so a call that is never ended (an adapter that lost it) cannot hold budget for the
            life of the process; a commit after that is recorded and flagged late.
        on_store_error: ``"fail_closed"`` (raise ``StoreError``) or ``"fail_open"`` (account
            locally, reconcile into Redis when it is back).
        retries: extra attempts of an operation after a connection error or timeout.
        retry_backoff: seconds before the first retry (doubling).
        reconnect_interval: under ``fail_open``, seconds between attempts to reach Redis again.
        dedupe_ttl: seconds a commit / charge is remembered so a replay is not counted twice.
        window_grace: seconds a windowed budget key outlives its window.
        closed_task_ttl: seconds the budget line of a closed task whose id was made up
            (opened without ``task_id``, as the adapters' run tasks are) stays in Redis before
            it expires — nothing names such a task again, so an always-on service does not
            leave a key per run; ``None`` keeps them (a named task's line is always kept).

    Example:
        >>> import agentguard as ag
        >>> store = ag.RedisStore.from_url("redis://localhost:6379/0")  # doctest: +SKIP
        >>> guard = ag.Guard(ag.Policy(max_cost_usd="1"), store=store)  # doctest: +SKIP
    """

    def __init__(
        self,
        client: Any,
        *,
        async_client: Callable[[], Any] | None = None,
        namespace: str = "agentguard",
        lease_ttl: float = 900.0,
        renew_leases: bool = True,
        lease_max: float | None = 3600.0,
        on_store_error: OnStoreError = "fail_closed",
        retries: int = 2,
        retry_backoff: float = 0.05,
        reconnect_interval: float = 1.0,
        dedupe_ttl: float = 3600.0,
        window_grace: float = 3600.0,
        closed_task_ttl: float | None = 3600.0,
    ) -> None:
        if on_store_error not in ("fail_closed", "fail_open"):
            raise ValueError(
                f"on_store_error={on_store_error!r}: must be 'fail_closed' or 'fail_open'"
            )
        if "{" in namespace or "}" in namespace:
            raise ValueError(f"namespace={namespace!r}: must not contain braces")
        self.client = client
        self._afactory = async_client
        self._aclients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[Any, Any]] = (
            weakref.WeakKeyDictionary()
        )
        self.namespace = namespace
        self.on_store_error: OnStoreError = on_store_error
        if not lease_ttl > 0:
            raise ValueError(f"lease_ttl={lease_ttl!r}: must be a positive number of seconds")
        self.lease_ttl = lease_ttl
        self.renew_leases = renew_leases
        if lease_max is not None and not lease_max > 0:
            raise ValueError(
                f"lease_max={lease_max!r}: must be a positive number of seconds or None"
            )
        self.lease_max = lease_max
        self.retries = retries
        self.retry_backoff = retry_backoff
        self.reconnect_interval = reconnect_interval
        self._lease_ms = str(int(lease_ttl * 1000))
        self._tomb_ms = str(max(1, int(dedupe_ttl * 1000)))
        self._grace = window_grace
        if closed_task_ttl is not None and not closed_task_ttl > 0:
            raise ValueError(
                f"closed_task_ttl={closed_task_ttl!r}: must be a positive number of seconds or None"
            )
        self.closed_task_ttl = closed_task_ttl
        self._closed_ms = None if closed_task_ttl is None else str(int(closed_task_ttl * 1000))
        p = "{" + namespace + "}:"
        self._p = p
        self._leases = p + "leases"
        self._stats = p + "stats"
        self._shas = {name: _sha1(src) for name, src in _SCRIPTS.items()}
        self._units: dict[tuple[str, Amount], tuple[str, str]] = {}  # limits, encoded
        self._line_cache: dict[int, tuple[BudgetLine, str, str, str]] = {}
        # the sync fast path: kept connections of a plain Redis, or of the cluster master
        # that holds this store's slot (found again after any redirection or error)
        self._single: _Conns | None = None
        self._cluster: _Conns | None = None
        self._slot: int | None = None
        self._cluster_generic = False  # after a fast-path failure: one call via the client
        if isinstance(client, RedisCluster):
            self._slot = int(client.keyslot(self._leases))  # type: ignore[no-untyped-call]
        elif _fast_pool(client):
            self._single = _Conns(client.connection_pool)
        # fail_open state
        self._lock = threading.Lock()
        self._reconciling = threading.Lock()
        self._journal = _Journal()
        self._local = MemoryStore()
        self._local_rids: set[str] = set()
        self._seen: dict[str, Balance] = {}
        # reservations this process holds in Redis: rid -> (keys, amounts); a local commit or
        # release during an outage takes them out of the balances last seen
        self._held: dict[str, tuple[list[str], dict[str, Amount]]] = {}
        self.late_commits = 0
        """Commits (in this process) whose lease had already expired: recorded, and flagged."""
        # lease renewal: reservations this process holds in Redis (rid -> record key)
        self._leased: dict[str, tuple[str, float]] = {}  # rid -> (record key, renew until)
        self._renewer: threading.Thread | None = None
        self._renewer_pid = 0
        self._stop_renewing = threading.Event()
        self.lease_renewals = 0
        """Lease renewals sent by this process (each one ``EVALSHA`` for all its leases)."""

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_url(cls, url: str, *, timeout: float = 1.0, **kwargs: Any) -> RedisStore:
        """A store on one Redis server (``redis://host:port/db``), sync and async clients.

        ``timeout`` bounds connecting and every command (seconds); retries are the store's own.

        Example:
            >>> store = RedisStore.from_url("redis://127.0.0.1:6379/0")  # doctest: +SKIP
        """
        opts: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0),
        }
        client = redis.Redis.from_url(url, **opts)

        def factory() -> Any:
            from redis.asyncio.retry import Retry as AsyncRetry

            return aredis.Redis.from_url(url, **{**opts, "retry": AsyncRetry(NoBackoff(), 0)})

        return cls(client, async_client=factory, **kwargs)

    @classmethod
    def from_cluster(
        cls,
        url: str | None = None,
        *,
        nodes: Sequence[tuple[str, int]] = (),
        timeout: float = 1.0,
        **kwargs: Any,
    ) -> RedisStore:
        """A store on Redis Cluster, from a node's URL or a list of ``(host, port)`` nodes.

        Example:
            >>> store = RedisStore.from_cluster("redis://10.0.0.5:7000")  # doctest: +SKIP
        """
        opts: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
        if url is None and not nodes:
            raise ValueError("from_cluster needs a url or nodes=[(host, port), ...]")

        # No retries inside the cluster clients: a resent reserve would find its own
        # reservation and be refused as a reused id. The store retries itself, flagging the
        # resend so the script recognises it (see _call / _acall).
        def make(sync: bool) -> Any:
            if sync:
                sopts = {**opts, "retry": Retry(NoBackoff(), 0)}
                if url is not None:
                    return RedisCluster.from_url(url, **sopts)
                startup = [ClusterNode(h, p) for h, p in nodes]  # type: ignore[no-untyped-call]
                return RedisCluster(startup_nodes=startup, **sopts)
            from redis.asyncio.cluster import ClusterNode as AsyncNode
            from redis.asyncio.retry import Retry as AsyncRetry

            aopts = {**opts, "retry": AsyncRetry(NoBackoff(), 0)}
            if url is not None:
                return AsyncRedisCluster.from_url(url, **aopts)
            return AsyncRedisCluster(startup_nodes=[AsyncNode(h, p) for h, p in nodes], **aopts)

        return cls(make(True), async_client=lambda: make(False), **kwargs)

    async def aclose(self) -> None:
        """Close the running event loop's async client, then as :meth:`close`.

        Without it the async client of a loop is closed when that loop shuts down its async
        generators (``asyncio.run`` does); call it where a loop outlives the store."""
        held = self._aclients.pop(asyncio.get_running_loop(), None)
        if held is not None:
            await held[1].aclose()  # the keeper's ``finally`` closes the client
        self.close()

    def close(self) -> None:
        """Stop renewing leases and close the sync client's connections."""
        self._stop_renewing.set()
        for conns in (self._single, self._cluster):
            if conns is not None:
                conns.close()
        self._cluster = None
        self.client.close()

    # -- keys and requests (pure) ---------------------------------------------------------------

    def _bkey(self, key: str) -> str:
        return self._p + "b:" + key

    def _line(self, line: BudgetLine) -> tuple[BudgetLine, str, str, str]:
        """(line, its Redis key, that key as JSON, its expire-at argument), cached per line
        object (a frozen ``BudgetLine``: its key and window never change)."""
        info = self._line_cache.get(id(line))
        if info is None or info[0] is not line:
            if len(self._line_cache) > 4096:
                self._line_cache.clear()
            bkey = self._bkey(line.key)
            info = (line, bkey, json.dumps(bkey, ensure_ascii=False), self._expiry(line))
            self._line_cache[id(line)] = info
        return info

    def _rkey(self, rid: str) -> str:
        return self._p + "r:" + rid

    def _expiry(self, line: BudgetLine) -> str:
        if line.expires_at is None:
            return "0"
        return str(int((line.expires_at + self._grace) * 1000))

    def _lines_args(self, lines: Sequence[BudgetLine]) -> list[str]:
        out: list[str] = []
        cache = self._units
        for line in lines:
            limits = line.limits
            out.append(str(len(limits)))
            for counter, limit in limits.items():
                enc = cache.get((counter, limit))
                if enc is None:
                    if len(cache) > 4096:
                        cache.clear()
                    hi, lo = divmod(_units(counter, limit, ROUND_FLOOR), _B)
                    enc = cache[(counter, limit)] = (str(hi), str(lo))
                out += (counter, *enc)
            out.append(self._line(line)[3])
        return out

    def _reserve_req(
        self, rid: str, lines: Sequence[BudgetLine], amounts: Mapping[str, Amount]
    ) -> _Req:
        infos = [self._line(ln) for ln in lines]
        enc, held = _encode_amounts(amounts, ROUND_CEILING)
        record = "[[" + ",".join([i[2] for i in infos]) + "]," + held + "]"
        args = [self._lease_ms, "0", self._tomb_ms, record, *enc, *self._lines_args(lines)]
        keys = [self._leases, self._rkey(rid), *[i[1] for i in infos]]
        return _Req("reserve", keys, args, retry_arg=1)

    def _commit_req(
        self, rid: str, lines: Sequence[BudgetLine], actual: Mapping[str, Amount]
    ) -> _Req:
        infos = [self._line(ln) for ln in lines]
        keys = [self._leases, self._rkey(rid), self._stats, *[i[1] for i in infos]]
        args = [
            self._tomb_ms,
            *_encode_amounts(actual, ROUND_HALF_EVEN)[0],
            *[i[3] for i in infos],
        ]
        return _Req("commit", keys, args)

    def _release_req(self, rid: str) -> _Req:
        return _Req("release", [self._leases, self._rkey(rid)], [self._tomb_ms])

    def _charge_req(
        self, op: str, lines: Sequence[BudgetLine], amounts: Mapping[str, Amount], check: bool
    ) -> _Req:
        keys = [self._p + "op:" + op, *[self._line(ln)[1] for ln in lines]]
        rounding = ROUND_CEILING if check else ROUND_HALF_EVEN
        args = [
            "1" if check else "0",
            self._tomb_ms,
            *_encode_amounts(amounts, rounding)[0],
            *self._lines_args(lines),
        ]
        return _Req("charge", keys, args)

    def _result(self, raw: Any, lines: Sequence[BudgetLine]) -> ReserveResult:
        reply = _loads(raw)
        status = reply[0]
        if status == -1:
            raise ValueError("reservation id is already held (or was used before)")
        balances = self._remember(lines, reply[5:])
        if status == 0:
            line = lines[reply[1] - 1]
            counter = reply[2]
            used = _amount(counter, int(reply[3]) * _B + int(reply[4]))
            limit = line.limits[counter]
            return ReserveResult(False, Denied(line.key, counter, limit, used, 0), balances)
        return ReserveResult(True, None, balances)

    def _remember(self, lines: Sequence[BudgetLine], flats: Sequence[Any]) -> dict[str, Balance]:
        out = _balances([ln.key for ln in lines], flats)
        self._seen.update(out)
        return out

    # -- operations: one generator each, shared by sync and async ---------------------------------

    def _op_reserve(
        self, rid: str, lines: Sequence[BudgetLine], amounts: Mapping[str, Amount]
    ) -> Generator[_Req, Any, ReserveResult]:
        try:
            if self._journal.ops or self._journal.retry_at:
                yield from self._reconcile()
            result = self._result((yield self._reserve_req(rid, lines, amounts)), lines)
        except _Unavailable as exc:
            self._unavailable(exc)
            with self._lock:
                res = self._local.reserve(rid, self._headroom(lines), amounts)
                if res.ok:
                    self._local_rids.add(rid)
                return self._local_result(res, lines)
        if result.denied is not None:
            d = result.denied
            result.denied = Denied(d.key, d.counter, d.limit, d.used, amounts[d.counter])
        else:
            if self.renew_leases:
                self._lease(rid)
            if self.on_store_error == "fail_open":
                self._held[rid] = (
                    [ln.key for ln in lines],
                    {c: a for c, a in amounts.items() if a},
                )
        return result

    def _op_commit(
        self, rid: str, lines: Sequence[BudgetLine], actual: Mapping[str, Amount]
    ) -> Generator[_Req, Any, Mapping[str, Balance]]:
        try:
            if self._journal.ops or self._journal.retry_at:
                yield from self._reconcile()
            reply = yield self._commit_req(rid, lines, actual)
        except _Unavailable as exc:
            self._unavailable(exc)
            self._leased.pop(rid, None)
            with self._lock:
                self._unhold(rid)
                self._local.commit(rid, lines, actual)
                self._local_rids.discard(rid)
                self._journal.ops.append(("commit", rid, list(lines), dict(actual)))
                return self._merged([ln.key for ln in lines])
        self._forget_local(rid)
        reply = _loads(reply)
        if reply[1]:
            self._late(rid)
        return self._remember(lines, reply[2:])

    def _op_release(self, rid: str) -> Generator[_Req, Any, None]:
        try:
            if self._journal.ops or self._journal.retry_at:
                yield from self._reconcile()
            yield self._release_req(rid)
        except _Unavailable as exc:
            self._unavailable(exc)
            self._leased.pop(rid, None)
            with self._lock:
                self._unhold(rid)
                self._local.release(rid)
                if rid not in self._local_rids:
                    self._journal.ops.append(("release", rid, [], {}))
                self._local_rids.discard(rid)
            return
        self._forget_local(rid)

    def _op_charge(
        self, lines: Sequence[BudgetLine], amounts: Mapping[str, Amount], check: bool
    ) -> Generator[_Req, Any, ReserveResult]:
        op = uuid.uuid4().hex
        try:
            if self._journal.ops or self._journal.retry_at:
                yield from self._reconcile()
            result = self._result((yield self._charge_req(op, lines, amounts, check)), lines)
        except _Unavailable as exc:
            self._unavailable(exc)
            with self._lock:
                res = self._local.charge(self._headroom(lines), amounts, check=check)
                if res.ok:
                    self._journal.ops.append(("charge", op, list(lines), dict(amounts)))
                return self._local_result(res, lines)
        if result.denied is not None:
            d = result.denied
            result.denied = Denied(d.key, d.counter, d.limit, d.used, amounts[d.counter])
        return result

    def _op_snapshot(self, keys: Sequence[str]) -> Generator[_Req, Any, Mapping[str, Balance]]:
        try:
            if self._journal.ops or self._journal.retry_at:
                yield from self._reconcile()
            req = _Req("snapshot", [self._leases, *[self._bkey(k) for k in keys]], [self._tomb_ms])
            flats = yield req
        except _Unavailable as exc:
            self._unavailable(exc)
            with self._lock:
                return self._merged(keys)
        reply = _loads(flats)
        out = _balances(keys, reply if reply else [])
        self._seen.update(out)
        return out

    def _op_retire(self, key: str) -> Generator[_Req, Any, Balance | None]:
        """Best effort: the line keeps its spend if Redis cannot be reached now, or an outage's
        spend is still to be replayed into it (the journal), or a reservation holds it."""
        self._seen.pop(key, None)
        if self._closed_ms is None or self._journal.ops or self._journal.retry_at:
            return None
        try:
            raw = yield _Req("retire", [self._bkey(key)], [self._closed_ms])
        except _Unavailable as exc:
            log.debug("the budget line %r was not retired (%r): it stays in Redis", key, exc)
            return None
        reply = _loads(raw)
        return _balance(reply[1]) if reply[0] == 1 else None

    # -- fail_open: local accounting and reconciliation -----------------------------------------

    def _unavailable(self, exc: _Unavailable) -> None:
        if self.on_store_error == "fail_closed":
            raise StoreError(
                f"the Redis budget store is unreachable ({exc.cause!r}); "
                "on_store_error='fail_closed' stops the call. Use on_store_error='fail_open' "
                "to continue on local accounting while Redis is down"
            ) from exc.cause
        with self._lock:
            if not self._journal.ops and not self._local_rids:
                log.warning("Redis budget store unreachable (%r): accounting locally", exc.cause)
            self._journal.retry_at = time.monotonic() + self.reconnect_interval

    def _reconcile(self) -> Generator[_Req, Any, None]:
        """Replay the journal into Redis (each op at most once); while it cannot, go local."""
        journal = self._journal
        if journal.retry_at and time.monotonic() < journal.retry_at:
            raise _Unavailable(ConnectionError("Redis unreachable; reconnecting later"))
        if not journal.ops:
            return
        if not self._reconciling.acquire(blocking=False):
            raise _Unavailable(ConnectionError("Redis is being reconciled by another thread"))
        try:
            while True:
                with self._lock:
                    if not journal.ops:
                        self._local = MemoryStore()  # its spend is in Redis now
                        self._local_rids.clear()
                        break
                    kind, ident, lines, amounts = journal.ops[0]
                if kind == "commit":
                    yield self._commit_req(ident, lines, amounts)
                elif kind == "charge":
                    yield self._charge_req(ident, lines, amounts, check=False)
                else:
                    yield self._release_req(ident)
                with self._lock:
                    journal.ops.pop(0)
            log.warning("Redis budget store reachable again: local spend reconciled")
        finally:
            self._reconciling.release()

    def _unhold(self, rid: str) -> None:
        held = self._held.pop(rid, None)
        if held is None:
            return
        keys, amounts = held
        for key in keys:
            seen = self._seen.get(key)
            if seen is not None:
                res = dict(seen.reserved)
                for c, a in amounts.items():
                    res[c] = max(res.get(c, 0) - a, 0)
                self._seen[key] = Balance(seen.committed, res)

    def _forget_local(self, rid: str) -> None:
        self._leased.pop(rid, None)
        if self._held:
            self._held.pop(rid, None)
        if self._local_rids and rid in self._local_rids:
            with self._lock:
                self._local.release(rid)
                self._local_rids.discard(rid)

    def _headroom(self, lines: Sequence[BudgetLine]) -> list[BudgetLine]:
        """Lines whose limits are what was left in Redis when it was last seen."""
        out = []
        for ln in lines:
            seen = self._seen.get(ln.key)
            if seen is None or not ln.limits:
                out.append(ln)
                continue
            limits = {c: lim - seen.used(c) for c, lim in ln.limits.items()}
            out.append(BudgetLine(ln.key, limits, ln.expires_at))
        return out

    def _merged(self, keys: Sequence[str]) -> dict[str, Balance]:
        local = self._local.snapshot(keys)
        out = {}
        for k in keys:
            seen, loc = self._seen.get(k, Balance()), local[k]
            com = dict(seen.committed)
            res = dict(seen.reserved)
            for c, v in loc.committed.items():
                com[c] = com.get(c, 0) + v
            for c, v in loc.reserved.items():
                res[c] = res.get(c, 0) + v
            out[k] = Balance(com, res)
        return out

    def _local_result(self, res: ReserveResult, lines: Sequence[BudgetLine]) -> ReserveResult:
        balances = self._merged([ln.key for ln in lines])
        denied = res.denied
        if denied is not None:
            line = next(ln for ln in lines if ln.key == denied.key)
            limit = line.limits[denied.counter]
            used = balances[denied.key].used(denied.counter)
            denied = Denied(denied.key, denied.counter, limit, used, denied.requested)
        return ReserveResult(res.ok, denied, balances)

    def _late(self, rid: str) -> None:
        self.late_commits += 1
        log.warning(
            "reservation_id=%r was committed after its lease expired (lease_ttl=%ss): "
            "the spend is recorded; raise lease_ttl if calls run this long",
            rid,
            self.lease_ttl,
        )

    # -- lease renewal --------------------------------------------------------------------------

    def _lease(self, rid: str) -> None:
        """Renew ``rid``'s lease until it is committed or released (or the process dies)."""
        if self._renewer_pid != os.getpid():  # first lease, or a forked child
            with self._lock:
                if self._renewer_pid != os.getpid():
                    self._leased = {}  # a parent's leases are the parent's to renew
                    self._stop_renewing = threading.Event()
                    self._renewer = threading.Thread(
                        target=_renew_loop,
                        args=(weakref.ref(self), self._stop_renewing, self.lease_ttl / 3),
                        name="agentguard-lease-renewal",
                        daemon=True,
                    )
                    self._renewer.start()
                    self._renewer_pid = os.getpid()
        until = float("inf") if self.lease_max is None else time.monotonic() + self.lease_max
        self._leased[rid] = (self._rkey(rid), until)

    def renew(self) -> int:
        """Extend the lease of every reservation this process holds now; the renewal thread
        calls it every ``lease_ttl / 3`` seconds. Returns how many leases were extended (a
        lease already reclaimed is not revived)."""
        now = time.monotonic()
        records = []
        for rid, (record, until) in list(self._leased.items()):
            if until < now:  # renewed for lease_max: left to run out
                self._leased.pop(rid, None)
            else:
                records.append(record)
        n = 0
        for i in range(0, len(records), 512):
            keys = [self._leases, *records[i : i + 512]]
            reply = self._call(_Req("renew", keys, [self._lease_ms, self._tomb_ms]))
            n += int(reply)
        self.lease_renewals += 1
        return n

    # -- drivers --------------------------------------------------------------------------------

    def _call(self, req: _Req) -> Any:
        client, sha = self.client, self._shas[req.script]
        last: BaseException | None = None
        for attempt in range(self.retries + 1):
            if attempt and req.retry_arg is not None:
                req.args[req.retry_arg] = "1"
            try:
                conns = self._single
                cluster_fast = not attempt and not self._cluster_generic
                if conns is None and self._slot is not None and cluster_fast:
                    conns = self._cluster or self._cluster_conns()
                if conns is not None:
                    try:
                        return self._send(conns, req)
                    except (AskError, TryAgainError, ClusterDownError):
                        if conns is self._single:
                            raise
                        self._drop_cluster()  # the cluster client follows the redirection
                    except _UNAVAILABLE:
                        if conns is not self._single:
                            # the next call goes through the cluster client, which refreshes
                            # its slot map on errors (a failover); then the master is looked up
                            self._drop_cluster()
                            self._cluster_generic = True
                        raise
                try:
                    reply = client.evalsha(sha, len(req.keys), *req.keys, *req.args)
                except NoScriptError:
                    client.script_load(_SCRIPTS[req.script])
                    reply = client.evalsha(sha, len(req.keys), *req.keys, *req.args)
                self._cluster_generic = False
                return reply
            except _UNAVAILABLE as exc:
                last = exc
                if attempt < self.retries:
                    time.sleep(self.retry_backoff * 2**attempt)
            except redis.exceptions.RedisError as exc:
                raise StoreError(f"the Redis budget store answered {exc!r}") from exc
        assert last is not None
        raise _Unavailable(last)

    def _send(self, conns: _Conns, req: _Req) -> Any:
        """One ``EVALSHA`` on a kept connection: send the packed command, read one reply.

        A connection kept idle may have been closed by the server (a restart, its
        ``timeout``): that shows as a connection error on a reused connection, and the call
        is sent once more on a fresh one, as a retry (a reserve retry is recognised, the
        other scripts are idempotent).
        """
        sha = self._shas[req.script]
        packed = req.packed(sha)
        conn, reused = conns.take()
        try:
            while True:
                try:
                    conn.send_packed_command(packed, check_health=False)
                    return conn.read_response()
                except NoScriptError:
                    conn.send_command("SCRIPT", "LOAD", _SCRIPTS[req.script], check_health=False)
                    conn.read_response()
                    conn.send_packed_command(packed, check_health=False)
                    return conn.read_response()
                except redis.exceptions.ConnectionError:
                    if not reused:
                        raise
                    reused = False
                    conn.disconnect()
                    if req.retry_arg is not None:
                        req.args[req.retry_arg] = "1"
                        packed = req.packed(sha)
        except BaseException as exc:
            if not isinstance(exc, redis.exceptions.ResponseError):
                conn.disconnect()  # an interrupted exchange leaves nothing behind
            raise
        finally:
            conns.free.append(conn)

    def _cluster_conns(self) -> _Conns | None:
        """Kept connections to the master of this store's slot, as the client last saw it."""
        assert self._slot is not None
        try:
            node = self.client.nodes_manager.get_node_from_slot(self._slot)
            pool = self.client.get_redis_connection(node).connection_pool
        except Exception:  # no slot map yet, a node down: the cluster client copes
            return None
        if not _fast_pool_type(pool):
            return None
        with self._lock:
            if self._cluster is None or self._cluster.pool is not pool:
                self._cluster = _Conns(pool)
            return self._cluster

    def _drop_cluster(self) -> None:
        conns, self._cluster = self._cluster, None
        if conns is not None:
            conns.close()

    async def _acall(self, req: _Req) -> Any:
        if self._afactory is None:
            return await asyncio.to_thread(self._call, req)
        loop = asyncio.get_running_loop()
        held = self._aclients.get(loop)
        if held is None:
            held = await self._aclient_for(loop)
        client = held[0]
        sha = self._shas[req.script]
        last: BaseException | None = None
        for attempt in range(self.retries + 1):
            if attempt and req.retry_arg is not None:
                req.args[req.retry_arg] = "1"
            try:
                try:
                    return await client.evalsha(sha, len(req.keys), *req.keys, *req.args)
                except NoScriptError:
                    await client.script_load(_SCRIPTS[req.script])
                    return await client.evalsha(sha, len(req.keys), *req.keys, *req.args)
            except _UNAVAILABLE as exc:
                last = exc
                if attempt < self.retries:
                    await asyncio.sleep(self.retry_backoff * 2**attempt)
            except redis.exceptions.RedisError as exc:
                raise StoreError(f"the Redis budget store answered {exc!r}") from exc
        assert last is not None
        raise _Unavailable(last)

    async def _aclient_for(self, loop: asyncio.AbstractEventLoop) -> tuple[Any, Any]:
        """The async client of this event loop; closed when the loop shuts down its async
        generators (``asyncio.run`` does), through a parked generator's ``finally``."""
        assert self._afactory is not None
        client = self._afactory()

        async def keeper() -> AsyncGenerator[None, None]:
            try:
                yield
            finally:
                await client.aclose()

        agen = keeper()
        await agen.__anext__()
        held = self._aclients[loop] = (client, agen)
        return held

    def _drive(self, gen: Generator[_Req, Any, Any]) -> Any:
        try:
            req = next(gen)
            while True:
                try:
                    reply = self._call(req)
                except _Unavailable as exc:
                    req = gen.throw(exc)
                else:
                    req = gen.send(reply)
        except StopIteration as stop:
            return stop.value

    async def _adrive(self, gen: Generator[_Req, Any, Any]) -> Any:
        try:
            req = next(gen)
            while True:
                try:
                    reply = await self._acall(req)
                except _Unavailable as exc:
                    req = gen.throw(exc)
                else:
                    req = gen.send(reply)
        except StopIteration as stop:
            return stop.value

    # -- the contract ---------------------------------------------------------------------------

    def reserve(
        self, reservation_id: str, lines: Sequence[BudgetLine], amounts: Mapping[str, Amount]
    ) -> ReserveResult:
        """Reserve ``amounts`` on every line at once, or nothing (one ``EVALSHA``)."""
        result: ReserveResult = self._drive(self._op_reserve(reservation_id, lines, amounts))
        return result

    def commit(
        self, reservation_id: str, lines: Sequence[BudgetLine], actual: Mapping[str, Amount]
    ) -> Mapping[str, Balance]:
        """Free the reservation and record the actual spend (idempotent per reservation id)."""
        out: Mapping[str, Balance] = self._drive(self._op_commit(reservation_id, lines, actual))
        return out

    def release(self, reservation_id: str) -> None:
        """Free a reservation; idempotent, a no-op after commit."""
        self._drive(self._op_release(reservation_id))

    def charge(
        self, lines: Sequence[BudgetLine], amounts: Mapping[str, Amount], *, check: bool = True
    ) -> ReserveResult:
        """Check and record in one step, without a reservation."""
        result: ReserveResult = self._drive(self._op_charge(lines, amounts, check))
        return result

    def snapshot(self, keys: Sequence[str]) -> Mapping[str, Balance]:
        """Committed and reserved per key (reclaiming expired leases first)."""
        out: Mapping[str, Balance] = self._drive(self._op_snapshot(keys))
        return out

    async def areserve(
        self, reservation_id: str, lines: Sequence[BudgetLine], amounts: Mapping[str, Amount]
    ) -> ReserveResult:
        result: ReserveResult = await self._adrive(self._op_reserve(reservation_id, lines, amounts))
        return result

    async def acommit(
        self, reservation_id: str, lines: Sequence[BudgetLine], actual: Mapping[str, Amount]
    ) -> Mapping[str, Balance]:
        out: Mapping[str, Balance] = await self._adrive(
            self._op_commit(reservation_id, lines, actual)
        )
        return out

    async def arelease(self, reservation_id: str) -> None:
        await self._adrive(self._op_release(reservation_id))

    async def acharge(
        self, lines: Sequence[BudgetLine], amounts: Mapping[str, Amount], *, check: bool = True
    ) -> ReserveResult:
        result: ReserveResult = await self._adrive(self._op_charge(lines, amounts, check))
        return result

    async def asnapshot(self, keys: Sequence[str]) -> Mapping[str, Balance]:
        out: Mapping[str, Balance] = await self._adrive(self._op_snapshot(keys))
        return out

    def retire(self, key: str) -> Balance | None:
        """A closed task's line: set it to expire after ``closed_task_ttl`` (an operation after
        that, e.g. an event of the task after its close, finds it until then — SET keeps a
        key's TTL) and forget its balance here. Returns its balance as of then, or ``None``
        when the line was kept: absent, held by a reservation, no ``closed_task_ttl``, or
        Redis out of reach or answering an error (best effort: never raises for that)."""
        try:
            out: Balance | None = self._drive(self._op_retire(key))
        except StoreError as exc:  # Redis answered with an error: the line stays
            log.debug("the budget line %r was not retired (%r): it stays in Redis", key, exc)
            return None
        return out

    async def aretire(self, key: str) -> Balance | None:
        """The async twin of :meth:`retire`."""
        try:
            out: Balance | None = await self._adrive(self._op_retire(key))
        except StoreError as exc:
            log.debug("the budget line %r was not retired (%r): it stays in Redis", key, exc)
            return None
        return out

    # -- operations for benchmarks and operators ------------------------------------------------

    def trivial(self) -> Any:
        """One ``EVALSHA`` of a script that returns 1 (the benchmarks' baseline)."""
        return self._call(_Req("trivial", [self._leases], []))

    def stats(self) -> dict[str, int]:
        """Store-wide counters kept in Redis (``late_commits``)."""
        raw = self.client.hgetall(self._stats)
        return {_s(k): int(v) for k, v in raw.items()}


def _renew_loop(
    ref: weakref.ReferenceType[RedisStore], stop: threading.Event, every: float
) -> None:
    """The renewal thread: holds the store weakly, ends when it is closed or collected."""
    while not stop.wait(every):
        store = ref()
        if store is None:
            return
        if store._leased:
            try:
                store.renew()
            except Exception as exc:  # Redis down: the next tick tries again
                log.warning("lease renewal failed (%r); retrying in %.3gs", exc, every)
        del store


def _fast_pool_type(pool: Any) -> bool:
    """A plain pool of utf-8 connections (not blocking, sentinel or cached)."""
    kwargs = getattr(pool, "connection_kwargs", {})
    return (
        type(pool) is redis.ConnectionPool
        and kwargs.get("encoding", "utf-8").lower().replace("-", "") == "utf8"
        and getattr(pool, "cache", None) is None
    )


def _fast_pool(client: Any) -> bool:
    """A plain ``redis.Redis`` whose pool the store may take connections from."""
    return (
        isinstance(client, redis.Redis)
        and getattr(client, "connection", None) is None
        and _fast_pool_type(getattr(client, "connection_pool", None))
    )


def _sha1(src: str) -> str:
    import hashlib

    return hashlib.sha1(src.encode(), usedforsecurity=False).hexdigest()
