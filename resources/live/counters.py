"""``LiveCounters``: live run counters in Redis, one round trip per page.

Redis is a cache of the SQL ledger. Each method is idempotent, so a call retried after a
dropped connection is harmless; a run whose keys Redis lost is reported as lost (None or
False) and rebuilt from the ledger with :meth:`LiveCounters.rebuild`. The Lua scripts
behind the page methods live with their wrappers in ``resources.live.lua_pages`` and
``resources.live.lua_rq``. No Dagster import: the Dagster resource ``RedisCounters``
holds the same settings and returns one of these.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from resources.counts import COUNT_FIELDS, Counts
from resources.errors import CountersUnavailableError
from resources.home import flow_home
from resources.live import lua_final, lua_pages, lua_rq
from resources.live.embedded_redis import configured_redis_url, ensure_embedded_redis
from resources.live.keys import ALL_RUN_KEYS_PATTERN, parse_run_key, run_key, run_keys
from resources.live.lua import Outcome
from resources.redaction import redact_url

_T = TypeVar("_T")
_EMBEDDED = "embedded:"
_CHUNK = 1000  # fields per HSET when rebuilding, runs per pipeline: bounded, few round trips


# One client per (process id, target): a forked step process must not share sockets.
_CLIENTS: dict[tuple[int, str], redis.Redis] = {}
_RQ_CLIENTS: dict[tuple[int, str], redis.Redis] = {}


DEFAULT_KEY_TTL_SECONDS = 86400
RESTORED_FIELD = "restored_revision"  # in meta: this state is the restore of a reopened run


@dataclass(frozen=True)
class LiveCounters:
    """Live counters of flow runs in Redis (dedup claims, page counts, run totals).

    Clients are cached per process and target, so a ``LiveCounters`` holds settings only
    and is cheap to make.

    Args:
        url: Redis URL; None reads FLOW_REDIS_URL, else runs the embedded server.
        key_ttl_seconds: TTL of every run key, refreshed on each write.

    Examples:
        .. code-block:: python

            from resources.live.counters import LiveCounters

            counters = LiveCounters(url="redis://127.0.0.1:6379/0")
            owned = counters.claim_page("orders_api", run_id, 0, ["a", "b"])
    """

    url: str | None = None
    key_ttl_seconds: int = DEFAULT_KEY_TTL_SECONDS

    def __post_init__(self) -> None:
        ttl = self.key_ttl_seconds
        if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl <= 0:
            raise ValueError(f"key_ttl_seconds={ttl!r} must be an integer > 0")

    def client(self) -> redis.Redis:
        """The cached client of this process (decoded responses, retries with backoff)."""
        return self._client(self._target())

    def redacted_url(self) -> str:
        """The URL in use, password hidden; ``embedded:<home>`` for the embedded server."""
        target = self._target()
        return redact_url(target) if _is_url(target) else target

    def start_run(self, flow: str, run_id: str) -> None:
        """Mark the run's state as present in Redis (``meta``), with its TTL."""
        meta = run_key(flow, run_id, "meta")

        def op(client: redis.Redis) -> None:
            pipe = client.pipeline(transaction=True)
            pipe.hsetnx(meta, "created_at", _now())
            pipe.expire(meta, self.key_ttl_seconds)
            pipe.execute()

        self._run(op)

    def claim_page(
        self, flow: str, run_id: str, page_index: int, record_keys: Sequence[str]
    ) -> list[bool] | None:
        """Claim a page's record keys; True where the page owns the key (dispatch it).

        One round trip. A key already owned by another page, or repeated on this page, is
        a duplicate (False); a retried page owns its keys again.

        Returns:
            One flag per record key, or None when Redis lost the run: rebuild it from the
            SQL ledger and call again.
        """
        run_keys(flow, run_id)  # a bad name fails before any I/O
        _page(page_index)
        owned = self._run(
            lambda client: lua_pages.claim_page(
                client, flow, run_id, page_index, record_keys, self.key_ttl_seconds
            )
        )
        return None if owned is Outcome.LOST else owned

    def record_pages(self, flow: str, run_id: str, pages: Sequence[tuple[int, Counts]]) -> bool:
        """Store the counts of each ``(page_index, counts)``, replacing their earlier ones,
        in one round trip; False when Redis lost the run.

        The run totals move by the difference, so a page recorded twice counts once.
        """
        run_keys(flow, run_id)  # a bad name fails before any I/O
        for page_index, counts in pages:
            _page(page_index)
            if errors := [f for f in COUNT_FIELDS if getattr(counts, f) < 0]:
                raise ValueError(f"page {page_index} of run {run_id}: negative counts {errors}")
        if not pages:
            return True
        done = self._run(
            lambda client: lua_pages.record_pages(client, flow, run_id, pages, self.key_ttl_seconds)
        )
        return done is not Outcome.LOST

    def totals(self, flow: str, run_id: str) -> Counts | None:
        """The run's live totals, or None when Redis has no state for the run."""
        return self.totals_many([(flow, run_id)])[(flow, run_id)]

    def totals_many(self, runs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], Counts | None]:
        """Live totals of each ``(flow, run_id)``, None where Redis has no state for the run.

        One round trip per ``_CHUNK`` runs; each chunk is read atomically (MULTI/EXEC).
        """

        def op(client: redis.Redis) -> list[Any]:
            replies: list[Any] = []
            for start in range(0, len(runs), _CHUNK):
                pipe = client.pipeline(transaction=True)
                for flow, run_id in runs[start : start + _CHUNK]:
                    pipe.exists(run_key(flow, run_id, "meta"))
                    pipe.hgetall(run_key(flow, run_id, "totals"))
                replies.extend(pipe.execute())
            return replies

        replies = self._run(op) if runs else []
        found: dict[tuple[str, str], Counts | None] = {}
        for run, exists, totals in zip(runs, replies[::2], replies[1::2], strict=True):
            found[run] = (
                Counts(**{field: int(totals.get(field, 0)) for field in COUNT_FIELDS})
                if exists
                else None
            )
        return found

    def rebuild(
        self,
        flow: str,
        run_id: str,
        claims: Mapping[str, int],
        pages: Mapping[int, Counts],
        *,
        force: bool = False,
        restore_of: int | None = None,
    ) -> bool:
        """Rewrite the run's state from the SQL ledger, atomically (MULTI/EXEC).

        Args:
            claims: record key -> index of the page that owns it.
            pages: page index -> that page's recorded counts.
            force: rewrite even if the run's state is present.
            restore_of: the revision of a run reopened after its finalization: rewrite
                unless that reopening was restored already (its steps may have claimed
                keys since), and mark the state as its restore.

        Returns:
            True if rewritten. False if kept (``_keep``), or if another process rebuilt it
            meanwhile: a rebuild from an older snapshot would drop claims made since.
        """
        meta, seen, pages_key, totals_key = run_keys(flow, run_id)
        for page in (*claims.values(), *pages):
            _page(page)  # a bad index fails before any I/O

        def op(client: redis.Redis) -> bool:
            with client.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(meta, seen, pages_key)
                    if _keep(pipe, meta, seen, pages_key, force=force, restore_of=restore_of):
                        return False
                    # A rebuild after a loss keeps the mark of the reopening it restores.
                    marked = pipe.hget(meta, RESTORED_FIELD) if restore_of is None else restore_of
                    pipe.multi()
                    _rewrite(pipe, (meta, seen, pages_key, totals_key), claims, pages, marked)
                    for key in (seen, pages_key, totals_key, meta):
                        pipe.expire(key, self.key_ttl_seconds)
                    # One MULTI/EXEC: no claim ever sees a half-rebuilt run.
                    pipe.execute()
                except redis.WatchError:
                    return False
            return True

        return self._run(op)

    def restored_for(self, flow: str, run_id: str) -> int | None:
        """The revision of the reopening whose restore the run's state is, if any
        (``rebuild(restore_of=...)``)."""
        mark = self._run(lambda client: client.hget(run_key(flow, run_id, "meta"), RESTORED_FIELD))
        return None if mark is None else int(mark)

    def delete_run(self, flow: str, run_id: str) -> int:
        """Remove every key of the run; the number of keys removed."""
        return self.delete_runs([(flow, run_id)])

    def delete_runs(self, runs: Sequence[tuple[str, str]]) -> int:
        """Remove every key of each ``(flow, run_id)``; the number of keys removed.

        One DEL per run (a run's keys share a cluster slot), one round trip per chunk.
        """

        def op(client: redis.Redis) -> int:
            removed = 0
            for start in range(0, len(runs), _CHUNK):
                pipe = client.pipeline(transaction=False)
                for flow, run_id in runs[start : start + _CHUNK]:
                    pipe.delete(*run_keys(flow, run_id))
                removed += sum(int(n) for n in pipe.execute())
            return removed

        return self._run(op) if runs else 0

    def forget_final_runs(self, runs: Sequence[tuple[str, str, int]]) -> int:
        """Remove the keys of each published ``(flow, run_id, revision)``, except a run's that
        a re-execution reopened and restored since (``lua_final``); how many keys went."""
        return self._run(lambda client: lua_final.forget_final_runs(client, runs)) if runs else 0

    def stray_runs(self) -> list[tuple[str, str]]:
        """``(flow, run_id)`` of every run that has keys in Redis (SCAN, never KEYS)."""

        def op(client: redis.Redis) -> list[tuple[str, str]]:
            runs = set()
            for key in client.scan_iter(match=ALL_RUN_KEYS_PATTERN, count=1000):
                if parsed := parse_run_key(key):
                    runs.add(parsed[:2])
            return sorted(runs)

        return self._run(op)

    def _target(self) -> str:
        """The configured URL, validated, or ``embedded:<FLOW_HOME>``.

        Raises:
            ConfigurationError: the URL is not a usable Redis URL (never quoting a password).
        """
        url = configured_redis_url(self.url)
        if url is None:
            home = flow_home()
            return f"{_EMBEDDED}{home}"
        return url

    def _client(self, target: str) -> redis.Redis:
        key = (os.getpid(), target)
        client = _CLIENTS.get(key)
        if client is None:
            client = _CLIENTS[key] = _connect(target, decode_responses=True)
        return client

    def _run(self, op: Callable[[redis.Redis], _T]) -> _T:
        """Run ``op`` on this process's client; raise CountersUnavailableError if unreachable.

        The client has already retried with backoff. An embedded server that is gone
        (stopped, machine restarted) is started again and ``op`` runs once more: the new
        server is empty, so the scripts report the run as lost and the caller rebuilds it.
        """
        target = self._target()
        try:
            try:
                return op(self._client(target))
            except (redis.ConnectionError, redis.TimeoutError):
                if _is_url(target):
                    raise
                ensure_embedded_redis(_embedded_home(target))
                return op(self._client(target))
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise CountersUnavailableError(
                f"Redis at {self.redacted_url()} is unreachable after retries"
                f" ({type(exc).__name__}). Check that the server is running and that"
                " FLOW_REDIS_URL points at it."
            ) from None  # redis-py's text names the host and port, which we show redacted

    # --- jobs dispatched to RQ workers (dispatch="rq") ------------------------------------

    def rq_connection(self) -> redis.Redis:
        """A client for RQ on the same server (RQ needs undecoded responses), per process."""
        target = self._target()
        key = (os.getpid(), f"rq:{target}")
        client = _RQ_CLIENTS.get(key)
        if client is None:
            client = _RQ_CLIENTS[key] = _connect(target, decode_responses=False)
        return client

    def record_dispatched_page(
        self, flow: str, run_id: str, page_index: int, counts: Counts
    ) -> bool:
        """Record a page whose jobs go to workers: its dispatch counts, keeping any job
        outcomes already acked (a retried page); False when Redis lost the run."""
        _page(page_index)
        done = self._run(
            lambda client: lua_rq.record_dispatched_page(
                client, flow, run_id, page_index, counts, self.key_ttl_seconds
            )
        )
        return done is not Outcome.LOST


def _rewrite(
    pipe: Any,
    keys: tuple[str, str, str, str],
    claims: Mapping[str, int],
    pages: Mapping[int, Counts],
    marked: object,
) -> None:
    """Queue the writes of a run's whole state (in a MULTI): claims, pages, totals, meta."""
    meta, seen, pages_key, totals_key = keys
    seen_items = [(key, str(page)) for key, page in claims.items()]
    page_items = [(str(i), ",".join(map(str, c.as_tuple()))) for i, c in pages.items()]
    total = sum(pages.values(), Counts())
    pipe.delete(seen, pages_key, totals_key, meta)
    for key, items in ((seen, seen_items), (pages_key, page_items)):
        for start in range(0, len(items), _CHUNK):
            pipe.hset(key, mapping=dict(items[start : start + _CHUNK]))
    pipe.hset(totals_key, mapping={f: getattr(total, f) for f in COUNT_FIELDS})
    state = {"created_at": _now(), "rebuilt_at": _now()}
    sizes = {"claims": len(seen_items), "pages": len(page_items)}
    pipe.hset(
        meta, mapping={**state, **sizes, **({} if marked is None else {RESTORED_FIELD: marked})}
    )


def _keep(
    client: Any, meta: str, seen: str, pages: str, *, force: bool, restore_of: int | None
) -> bool:
    """The run's state is to be kept as it is: restored for this reopening already, or
    (no reopening, not forced) whole."""
    if restore_of is not None:
        return bool(client.hget(meta, RESTORED_FIELD) == str(restore_of))
    return not force and _intact(client, meta, seen, pages)


def _intact(client: Any, meta: str, seen: str, pages: str) -> bool:
    """The run's state is whole: meta exists and agrees with the sizes of seen and pages
    (the same test as the Lua scripts' ``intact()``)."""
    recorded = client.hmget(meta, "claims", "pages")
    if not client.exists(meta):
        return False
    claims, page_count = (int(value or 0) for value in recorded)
    return bool(client.hlen(seen) == claims and client.hlen(pages) == page_count)


def _connect(target: str, *, decode_responses: bool) -> redis.Redis:
    """A new client of the target (the embedded server started if need be)."""
    url = target if _is_url(target) else ensure_embedded_redis(_embedded_home(target))
    return redis.Redis.from_url(
        url,
        decode_responses=decode_responses,
        socket_connect_timeout=5,
        socket_timeout=30,
        # Safe to retry for the counters: every operation of theirs is idempotent.
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries=4),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


def _is_url(target: str) -> bool:
    return not target.startswith(_EMBEDDED)


def _embedded_home(target: str) -> Path:
    return Path(target.removeprefix(_EMBEDDED))


def _page(page_index: int) -> str:
    if isinstance(page_index, bool) or not isinstance(page_index, int) or page_index < 0:
        raise ValueError(f"page index {page_index!r} must be an integer >= 0")
    return str(page_index)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()
