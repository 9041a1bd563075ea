"""Workers run only this package's jobs, of the flows they loaded (issue 12, "pickle on the
wire"): anyone who can write to the Redis server can enqueue a job.

Real Redis, real ``rq worker -c flow_assets.rq_settings`` processes started as the README
starts them. The package's jobs are JSON in Redis. A pickled job, a job naming another
callable, or a job of a flow (or handler) the worker did not load runs nothing and imports
nothing (each would create a marker file), and the worker goes on with legitimate jobs."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
import zlib
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

import dagster as dg
import pytest
import redis
from rq import Callback, Queue
from rq.job import Job

from flow_assets.errors import FlowDefinitionError
from flow_assets.flow import Flow
from flow_assets.rq import guard as rq_guard
from flow_assets.rq import worker as rq_worker
from flow_assets.rq.dispatch import ACK_FAILURE, RUN_JOBS, SERIALIZER, RqDispatch, enqueue_jobs
from flow_assets.sources.base import Page
from flow_assets.sources.files import FileSource
from resources.counts import Counts
from resources.ledger.ledger import Ledger
from resources.live.counters import LiveCounters
from tests.dagster import rq_flows
from tests.dagster.rq_flows import REPO_ROOT, RQ, rq_workers, wait_for
from tests.flowkit import assert_counts, make_defs, row_of, run_flow, run_keys_left, tick
from tests.ledger_helpers import process_page

FLOW = "rq_orders"  # a flow the workers load (rq_flows.WORKER_FLOWS)
RUN_ID = "run-guarded-1"


class RunsOnUnpickle:
    """Pickled, it holds a call: reading it back with pickle runs ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def started(
    redis_url: str, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[Flow, LiveCounters, Ledger]:
    """A running run of ``rq_orders``, as the page step of its Dagster run would see it."""
    monkeypatch.setenv("FLOW_DATABASE_URL", sqlite_url)
    flow = Flow(
        name=FLOW,
        source=FileSource("unused.jsonl"),
        key="id",
        handler=rq_flows.handle,
        dispatch=RqDispatch(batch_size=2, retries=0),
    )
    counters, store = LiveCounters(url=redis_url), Ledger(url=sqlite_url)
    store.start_run(RUN_ID, FLOW, None, datetime.now(timezone.utc), flow.run_policy())
    counters.start_run(FLOW, RUN_ID)
    return flow, counters, store


def marker_module(tmp_path: Path) -> tuple[str, Path, Path]:
    """A module (name, directory, marker) whose import creates the marker file."""
    name = f"rq_marker_{uuid.uuid4().hex[:8]}"
    directory, marker = tmp_path / "importable", tmp_path / f"{name}.imported"
    directory.mkdir()
    (directory / f"{name}.py").write_text(
        f"from pathlib import Path\n\nPath({str(marker)!r}).touch()\n\n\n"
        "def handle(batch):\n    pass\n\n\ndef on_failure(*args):\n    pass\n"
    )
    return name, directory, marker


def job_states(connection: redis.Redis, job_ids: list[str]) -> list[str | None]:
    jobs = Job.fetch_many(job_ids, connection=connection, serializer=SERIALIZER)
    return [job.get_status(refresh=False) if job else None for job in jobs]


def failure_of(connection: redis.Redis, job_id: str) -> str:
    result = Job.fetch(job_id, connection=connection, serializer=SERIALIZER).latest_result()
    return (result.exc_string if result else None) or ""


def wait_until_ended(connection: redis.Redis, job_ids: list[str], logs: Callable[[], str]) -> None:
    def ended() -> bool:
        return set(job_states(connection, job_ids)) <= {"finished", "failed"}

    wait_for(ended, 120, f"the worker to end {job_ids}; log:\n{logs()}")


# ------------------------------------------------------------------------------ on the wire


def test_the_package_s_jobs_are_json_in_redis(
    started: tuple[Flow, LiveCounters, Ledger],
) -> None:
    flow, counters, store = started
    process_page(flow, RUN_ID, Page(0, [{"id": "a", "n": 1}, {"id": "b"}]), counters, store)

    stored, meta = counters.rq_connection().hmget(f"rq:job:{FLOW}-{RUN_ID}-p0-j0", "data", "meta")
    assert isinstance(stored, bytes) and isinstance(meta, bytes)
    data = zlib.decompress(stored)  # RQ compresses a job's data, whatever its serializer
    assert not data.startswith(b"\x80")  # pickle's opening byte
    assert json.loads(data) == [
        RUN_JOBS,
        None,
        [flow.handler_path, FLOW, RUN_ID, 0, ["a", "b"], [{"id": "a", "n": 1}, {"id": "b"}]],
        {},
    ]
    assert json.loads(meta) == {
        "flow": FLOW,
        "run_id": RUN_ID,
        "page_index": 0,
        "ttl": counters.key_ttl_seconds,
    }


# -------------------------------------------------------------------------- real workers

# Every guard must hold in the worker process (SimpleWorker) and in its forked work horse.
EITHER_WORKER = pytest.mark.parametrize(
    "worker_class", ["rq.worker.SimpleWorker", "rq.worker.Worker"]
)


@EITHER_WORKER
def test_a_pickled_job_runs_nothing_and_the_worker_goes_on(
    worker_class: str,
    started: tuple[Flow, LiveCounters, Ledger],
    redis_url: str,
    sqlite_url: str,
    tmp_path: Path,
) -> None:
    """Hostile jobs in the flow's queue, ahead of a real page's jobs: a pickle whose reading
    runs ``touch``, a pickled job calling ``os.system``, and the same call as JSON. None
    runs; each fails; the worker then runs the page's jobs and the run's counts are exact."""
    flow, counters, store = started
    connection = counters.rq_connection()
    unpickled, called, called_json = (tmp_path / n for n in ("unpickled", "called", "json"))
    pickled = Queue(FLOW, connection=connection)  # RQ's default serializer: pickle
    hostile = [
        pickled.enqueue(print, RunsOnUnpickle(unpickled), job_id="evil-unpickle"),
        pickled.enqueue("posix.system", f"touch {called}", job_id="evil-call"),
        Queue(FLOW, connection=connection, serializer=SERIALIZER).enqueue(
            "posix.system", f"touch {called_json}", job_id="evil-call-json"
        ),
    ]
    handled = tmp_path / "handled.txt"
    records = [{"id": f"k{n}", "fail": n == 3} for n in range(6)]
    env = {"FLOW_DATABASE_URL": sqlite_url, "FLOW_TEST_HANDLED": str(handled)}

    with rq_workers(1, FLOW, redis_url, env, tmp_path, worker_class) as workers:
        process_page(flow, RUN_ID, Page(0, records), counters, store)

        def settled() -> bool:
            return store.page_totals([RUN_ID])[RUN_ID].counts.pending == 0

        wait_for(settled, 120, f"the page's jobs; worker log:\n{workers.tail()}")
        wait_until_ended(connection, [job.id for job in hostile], workers.tail)
        assert workers.alive() == [True]

    assert [path.exists() for path in (unpickled, called, called_json)] == [False] * 3
    assert job_states(connection, [job.id for job in hostile]) == ["failed"] * 3
    assert "DeserializationError" in failure_of(connection, "evil-unpickle")
    assert "DeserializationError" in failure_of(connection, "evil-call")
    assert "it names 'posix.system', which this worker does not run" in failure_of(
        connection, "evil-call-json"
    )
    assert sorted(handled.read_text().split()) == [f"k{n}" for n in range(6)]
    expected = Counts(source=6, dispatched=6, completed=5, failed=1)
    assert store.page_totals([RUN_ID])[RUN_ID].counts == expected


def test_a_job_of_a_flow_or_handler_the_worker_did_not_load_imports_nothing(
    started: tuple[Flow, LiveCounters, Ledger],
    redis_url: str,
    sqlite_url: str,
    tmp_path: Path,
) -> None:
    """Jobs enqueued exactly as the page step enqueues them, naming a module whose import
    creates a marker: as the handler of a flow the worker did not load, as another handler
    of a flow it loaded, and as a job's failure callback. Each fails saying what it
    refused and how to fix it; the module is never imported."""
    _, counters, store = started
    connection = counters.rq_connection()
    module, directory, marker = marker_module(tmp_path)
    store.start_run("run-ghost-1", "ghost", None, datetime.now(timezone.utc))

    def enqueue(flow: str, run_id: str, key: str) -> str:
        job_id = f"{flow}-{run_id}-p0-j0"
        enqueue_jobs(
            connection,
            RqDispatch(retries=0),
            queue=FLOW,
            handler=f"{module}:handle",
            flow=flow,
            run_id=run_id,
            page_index=0,
            records={key: {"id": key}},
            job_ids={key: job_id},
            pending={key},
            key_ttl_seconds=60,
        )
        return job_id

    unloaded_flow = enqueue("ghost", "run-ghost-1", "g1")
    other_handler = enqueue(FLOW, RUN_ID, "o1")
    hostile_callback = "callback-job"
    Queue(FLOW, connection=connection, serializer=SERIALIZER).enqueue(
        RUN_JOBS,
        f"{module}:handle",
        "ghost",
        "run-ghost-1",
        0,
        ["g2"],
        [{"id": "g2"}],
        job_id=hostile_callback,
        on_failure=Callback(f"{module}.on_failure"),
    )
    env = {"FLOW_DATABASE_URL": sqlite_url, "PYTHONPATH": str(directory)}
    job_ids = [unloaded_flow, other_handler, hostile_callback]
    with rq_workers(1, FLOW, redis_url, env, tmp_path, "rq.worker.SimpleWorker") as workers:
        wait_until_ended(connection, job_ids, workers.tail)
        assert workers.alive() == [True]

    assert not marker.exists()
    assert job_states(connection, job_ids) == ["failed"] * 3
    assert f"flow 'ghost' is not loaded on this worker (it runs late_orders, {FLOW})" in (
        failure_of(connection, unloaded_flow)
    )
    assert "Fix: start the worker with FLOW_RQ_PRELOAD" in failure_of(connection, unloaded_flow)
    assert (
        f"it names handler '{module}:handle' for flow '{FLOW}', whose handler on this worker"
        " is 'tests.dagster.rq_flows:handle'"
    ) in failure_of(connection, other_handler)
    assert f"it names '{module}.on_failure', which this worker does not run" in failure_of(
        connection, hostile_callback
    )


def hostile_job(connection: redis.Redis, job_id: str, data: list[Any]) -> None:
    """A job in the flow's queue whose JSON data is ``data`` (RQ's own enqueue would not
    write an instance it cannot import)."""
    Queue(FLOW, connection=connection, serializer=SERIALIZER).enqueue(RUN_JOBS, job_id=job_id)
    connection.hset(Job.key_for(job_id), "data", zlib.compress(json.dumps(data).encode()))


@EITHER_WORKER
def test_a_job_naming_an_instance_or_another_function_runs_nothing(
    worker_class: str,
    started: tuple[Flow, LiveCounters, Ledger],
    redis_url: str,
    sqlite_url: str,
    tmp_path: Path,
) -> None:
    """RQ calls ``getattr(instance, func_name)`` for a job whose data names an instance,
    importing nothing: ``["upper", "pwned", [], {}]`` ran ``str.upper``. The guard refuses
    it, and a job naming a callback as its function; the worker goes on with the page."""
    flow, counters, store = started
    connection = counters.rq_connection()
    hostile_job(connection, "evil-instance", ["upper", "pwned", [], {}])
    hostile_job(connection, "evil-empty-instance", [RUN_JOBS, "", [], {}])
    hostile_job(connection, "evil-callback", [ACK_FAILURE, None, [None, None, None, None], {}])
    hostile = ["evil-instance", "evil-empty-instance", "evil-callback"]
    env = {"FLOW_DATABASE_URL": sqlite_url}
    with rq_workers(1, FLOW, redis_url, env, tmp_path, worker_class) as workers:
        process_page(flow, RUN_ID, Page(0, [{"id": "a"}, {"id": "b"}]), counters, store)
        wait_until_ended(connection, hostile, workers.tail)
        wait_for(lambda: store.page_totals([RUN_ID])[RUN_ID].counts.pending == 0, 120, "acks")
        assert workers.alive() == [True]

    assert job_states(connection, hostile) == ["failed"] * 3
    evil = Job.fetch("evil-instance", connection=connection, serializer=SERIALIZER)
    assert evil.return_value() is None
    assert "it names 'upper' on an instance, which this worker does not run" in failure_of(
        connection, "evil-instance"
    )
    assert f"it names '{RUN_JOBS}' on an instance" in failure_of(connection, "evil-empty-instance")
    assert f"refused: it names '{ACK_FAILURE}', which" in failure_of(connection, "evil-callback")
    assert store.page_totals([RUN_ID])[RUN_ID].counts == Counts(2, 2, completed=2)


EMAIL, OTHER_EMAIL = "alice.liddell@example.com", "bob.sleigh@example.com"


def stored_in_redis(connection: redis.Redis, job_id: str) -> str:
    """What Redis keeps of a job but its arguments (its ``data``): the hash's other fields,
    and its latest result (exception text, return value)."""
    fields = connection.hgetall(Job.key_for(job_id))
    shown = [f"{k!r}={v!r}" for k, v in fields.items() if k != b"data"]
    result = Job.fetch(job_id, connection=connection, serializer=SERIALIZER).latest_result()
    assert result is not None
    return "\n".join([*shown, result.exc_string or "", json.dumps(result.return_value)])


@EITHER_WORKER
def test_a_handler_s_error_reaches_rq_masked_and_the_failure_rows_whole(
    worker_class: str,
    started: tuple[Flow, LiveCounters, Ledger],
    redis_url: str,
    sqlite_url: str,
    tmp_path: Path,
) -> None:
    """The handler raises for one job's record and fails another job's record: the worker's
    log and what RQ keeps in Redis show the errors as ``error_detail="masked"`` does; the
    failed jobs' rows keep the whole messages."""
    flow, counters, store = started
    connection = counters.rq_connection()
    records = [
        {"id": EMAIL, "raise_until": str(tmp_path / "never")},
        {"id": "k1"},
        {"id": OTHER_EMAIL, "fail": True},
        {"id": "k3"},
    ]
    env = {"FLOW_DATABASE_URL": sqlite_url}
    raised_job, failed_job = (f"{FLOW}-{RUN_ID}-p0-j{n}" for n in (0, 1))
    with rq_workers(1, FLOW, redis_url, env, tmp_path, worker_class) as workers:
        process_page(flow, RUN_ID, Page(0, records), counters, store)
        wait_for(lambda: store.page_totals([RUN_ID])[RUN_ID].counts.pending == 0, 120, "acks")
        # RQ sets a job's status after its callback acked it: wait for both.
        wait_until_ended(connection, [raised_job, failed_job], workers.tail)
        log = workers.tail()

    raised = f"ConnectionError: downstream is down for {EMAIL}"
    refused = f"ValueError: downstream refused {OTHER_EMAIL}"
    assert {(f.record_key, f.error) for f in store.job_failures(RUN_ID)} == {
        (EMAIL, raised),
        ("k1", raised),
        (OTHER_EMAIL, refused),
    }
    assert job_states(connection, [raised_job, failed_job]) == ["failed", "finished"]
    exc_string = failure_of(connection, raised_job)
    assert (
        f"JobHandlerError: flow '{FLOW}' page 0: the handler raised ConnectionError:"
        " downstream is down for <email>"
    ) in exc_string
    assert "downstream is down for <email>" in log
    result = Job.fetch(failed_job, connection=connection, serializer=SERIALIZER).return_value()
    assert result is not None and result["failed"] == {
        OTHER_EMAIL: "ValueError: downstream refused <email>"
    }
    assert "downstream" not in stored_in_redis(connection, failed_job).replace(
        "downstream refused <email>", ""
    )
    assert EMAIL not in stored_in_redis(connection, raised_job)
    assert EMAIL not in log and OTHER_EMAIL not in log


@pytest.mark.parametrize("detail", ["masked", "full"])
def test_a_handler_s_error_fails_the_job_as_the_flow_s_error_detail_shows_it(
    detail: str,
    started: tuple[Flow, LiveCounters, Ledger],
    registry: dict[str, Flow],
    tmp_path: Path,
) -> None:
    """The job's error (what RQ logs and keeps) is unchained; the rows get ``job_error``."""
    flow, _, _ = started
    rq_guard.register(
        Flow(
            name=FLOW,
            source=flow.source,
            key="id",
            handler=rq_flows.handle,
            dispatch="rq",
            error_detail=detail,
        )
    )
    record = {"id": EMAIL, "raise_until": str(tmp_path / "never")}
    with pytest.raises(rq_worker.JobHandlerError) as raised:
        rq_worker.run_jobs(rq_flows.HANDLER, FLOW, RUN_ID, 0, [EMAIL], [record])

    shown = EMAIL if detail == "full" else "<email>"
    assert str(raised.value) == (
        f"flow '{FLOW}' page 0: the handler raised ConnectionError: downstream is down for {shown}"
    )
    assert raised.value.job_error == f"ConnectionError: downstream is down for {EMAIL}"
    assert raised.value.__cause__ is None and raised.value.__context__ is None


def test_a_spawn_worker_is_refused_at_start(redis_url: str) -> None:
    """Its work horses run in fresh interpreters that never load the settings' guard."""
    command = [str(RQ), "worker", "-c", "flow_assets.rq_settings", "--url", redis_url]
    command += ["-w", "rq.worker.SpawnWorker", "--burst", FLOW]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "FLOW_RQ_PRELOAD": rq_flows.__name__}
    done = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert "cannot guard rq.worker.SpawnWorker" in done.stderr


# ------------------------------------------------------------------ the allow-list itself


def print_batch(batch: Any) -> None:
    """A second handler, for a flow named like a loaded one."""


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> dict[str, Flow]:
    """An empty allow-list for the test (a worker fills it once, in rq_settings)."""
    loaded: dict[str, Flow] = {}
    monkeypatch.setattr(rq_guard, "_loaded", loaded)
    return loaded


def test_a_worker_allows_the_rq_flows_its_preloaded_modules_define(
    registry: dict[str, Flow],
) -> None:
    environ = {"FLOW_RQ_PRELOAD": " tests.dagster.rq_flows, ,"}
    assert rq_guard.load(rq_guard.preload_modules(environ)) == ["late_orders", FLOW]
    assert rq_guard.handler_for(FLOW, "tests.dagster.rq_flows:handle") is rq_flows.handle
    with pytest.raises(rq_guard.JobRefusedError, match="flow 'ghost' is not loaded"):
        rq_guard.handler_for("ghost", "tests.dagster.rq_flows:handle")
    with pytest.raises(rq_guard.JobRefusedError, match="names handler 'os:system' for flow"):
        rq_guard.handler_for(FLOW, "os:system")
    twin = Flow(
        name=FLOW, source=FileSource("x.jsonl"), key="id", handler=print_batch, dispatch="rq"
    )
    with pytest.raises(FlowDefinitionError, match="two flows named 'rq_orders'"):
        rq_guard.register(twin)
    # A code location: flows in a list or dict, and Definitions (which refuse iteration).
    location = ModuleType("location")
    location.__dict__.update(flows=[twin], by_name={"x": twin}, defs=dg.Definitions())
    assert rq_guard.flows_in(location) == [twin]
    assert rq_guard.import_allowed(ACK_FAILURE).__name__ == "ack_failure"
    with pytest.raises(rq_guard.JobRefusedError, match=r"'builtins\.eval'"):
        rq_guard.import_allowed("builtins.eval")


# ------------------------------------------------------- the production advice, verified

ADVICE = REPO_ROOT / "docs" / "production-redis.md"
PASSWORD = "test-only-secret"


def advised_acl() -> list[str]:
    """The ``ACL SETUSER`` rules of docs/production-redis.md, the password replaced."""
    [line] = [line for line in ADVICE.read_text().splitlines() if line.startswith("ACL SETUSER")]
    rules = line.split()[3:]  # after "ACL SETUSER <user>"
    return [f">{PASSWORD}" if rule.startswith(">") else rule for rule in rules]


@pytest.fixture
def admin(redis_url: str) -> Iterator[redis.Redis]:
    """The session Redis's default user, with the advised user ``flows`` (dropped after)."""
    client = redis.Redis.from_url(redis_url)
    client.execute_command("ACL", "SETUSER", "flows", "reset", *advised_acl())
    client.execute_command("ACL", "LOG", "RESET")
    try:
        yield client
    finally:
        client.execute_command("ACL", "DELUSER", "flows")
        client.close()


def refused_commands(admin: redis.Redis) -> set[str]:
    """What the server refused the user (``ACL LOG``), by command name."""
    entries = admin.execute_command("ACL", "LOG")
    return {entry[b"object"].decode() for entry in entries if entry[b"username"] == b"flows"}


def test_a_flow_runs_through_the_advised_acl_user_and_nothing_else_does(
    admin: redis.Redis,
    redis_url: str,
    sqlite_url: str,
    instance: dg.DagsterInstance,
    tmp_path: Path,
) -> None:
    """Dagster, the finalizer and a real forking worker all use the advised ACL user: an
    RQ flow and an inline flow run and are finalized with exact counts, and the server
    refused the user nothing but redis-py's optional ``CLIENT`` calls. The same user
    cannot touch other keys, run server commands, or flush the server."""
    acl_url = redis_url.replace("redis://", f"redis://flows:{PASSWORD}@")
    records = [{"id": f"o{n}", "fail": n % 10 == 3} for n in range(40)]
    data = tmp_path / "orders.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    flow = Flow(
        name=FLOW,
        source=FileSource(str(data), page_size=10),
        key="id",
        handler=rq_flows.handle,
        dispatch=RqDispatch(batch_size=4),
        max_failed_jobs=0.2,
    )
    inline = Flow(
        name="acl_inline", source=FileSource(str(data), page_size=10), key="id", handler=len
    )
    defs = make_defs([flow, inline], acl_url, sqlite_url)
    inline_run = run_flow(defs, inline.name, instance)  # pipelined scripts on a cold server
    assert inline_run.success
    store = Ledger(url=sqlite_url)
    env = {"FLOW_DATABASE_URL": sqlite_url}
    with rq_workers(1, FLOW, acl_url, env, tmp_path, "rq.worker.Worker") as workers:
        result = run_flow(defs, FLOW, instance)
        assert result.success

        def settled() -> bool:
            return store.page_totals([result.run_id])[result.run_id].counts.pending == 0

        wait_for(settled, 120, f"the jobs; worker log:\n{workers.tail()}")
    tick(defs, instance)
    row = row_of(sqlite_url, result.run_id)
    assert (row.flow_status, row.counter_mismatch) == ("partial_success", None)
    assert_counts(row, Counts(40, 40, completed=36, failed=4))
    inline_row = row_of(sqlite_url, inline_run.run_id)
    assert (inline_row.flow_status, inline_row.counter_mismatch) == ("completed", None)
    assert_counts(inline_row, Counts(40, 40, completed=40))
    assert run_keys_left(acl_url) == []
    # redis-py tries CLIENT SETINFO / MAINT_NOTIFICATIONS on connect and ignores a refusal.
    assert refused_commands(admin) <= {"client"}

    user = redis.Redis.from_url(acl_url)
    try:
        for refused in (
            lambda: user.set("session:1", "x"),
            lambda: user.get("other-app:secret"),
            user.flushall,
            lambda: user.config_get("dir"),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                refused()
    finally:
        user.close()
