"""The flows RQ workers run in the dispatch="rq" tests, and helpers to run real workers.

The workers preload this module (``FLOW_RQ_PRELOAD``) and run the jobs of the flows it
defines (``WORKER_FLOWS``), and of no other flow. Records carry what the handler should do
with them, so the workers (other processes) need no other input: ``fail`` (report a failed
job), ``hang`` (on the first attempt, write this process's pid to that path and sleep until
killed), ``raise_until`` (raise until that path exists). Every key handled is appended to
``$FLOW_TEST_HANDLED``.

The killed-worker tests run ``QuickAbandonWorker`` / ``QuickAbandonSimpleWorker``: RQ's own
classes and code paths with one constant changed. RQ gives a started job's heartbeat 60 s
of grace before its registry cleanup calls the job abandoned; these give 5 s, so a killed
worker's job is found in seconds instead of a minute or more (the suite's longest waits).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
from rq.job import Job
from rq.worker import SimpleWorker, Worker

from flow_assets.dispatch import JobBatch
from flow_assets.flow import Flow
from flow_assets.sources.files import FileSource
from tests.dagster import settle_flows

REPO_ROOT = Path(__file__).resolve().parents[2]
HANDLER = "tests.dagster.rq_flows:handle"  # the handler path of the flows below
RQ = REPO_ROOT / ".venv" / "bin" / "rq"
RQ_HEARTBEAT_GRACE_S, ABANDON_GRACE_S = 60, 5


class QuickAbandonWorker(Worker):
    """``rq.worker.Worker`` whose jobs are found abandoned 5 s after their last heartbeat."""

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return super().get_heartbeat_ttl(job, working_time) - RQ_HEARTBEAT_GRACE_S + ABANDON_GRACE_S


class QuickAbandonSimpleWorker(SimpleWorker):
    """``rq.worker.SimpleWorker`` whose jobs are found abandoned 5 s after their timeout."""

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return super().get_heartbeat_ttl(job, working_time) - RQ_HEARTBEAT_GRACE_S + ABANDON_GRACE_S


def handle(batch: JobBatch) -> None:
    """The flows' handler, importable by the workers as ``tests.dagster.rq_flows:handle``."""
    for key, record in batch.items():
        hang, gate = record.get("hang"), record.get("raise_until")
        if hang and not os.path.exists(hang):
            Path(hang).write_text(str(os.getpid()))
            time.sleep(600)  # the test kills this worker here
        if gate and not os.path.exists(gate):
            raise ConnectionError(f"downstream is down for {key}")
        if record.get("fail"):
            batch.fail(record, ValueError(f"downstream refused {key}"))
    handled = os.environ.get("FLOW_TEST_HANDLED")
    if handled:
        with open(handled, "a") as out:
            out.write("".join(f"{key}\n" for key in batch.keys))


def _worker_flow(name: str, handler: Any) -> Flow:
    # A worker needs a flow's name and handler only: it never reads the source.
    source = FileSource("read-by-no-worker.jsonl")
    return Flow(name=name, source=source, key="id", handler=handler, dispatch="rq")


# The flows of test_rq_dispatch and test_rq_after_final, as their workers load them.
WORKER_FLOWS = [_worker_flow("rq_orders", handle), _worker_flow("late_orders", settle_flows.handle)]


class Workers:
    """Real ``rq worker`` processes, each in its own process group (its work horses make
    groups of their own)."""

    def __init__(self, processes: list[subprocess.Popen[bytes]], logs: list[Path]) -> None:
        self.processes = processes
        self.logs = logs

    def kill_holder_of(self, pid: int) -> int:
        """SIGKILL the worker running the job in process ``pid`` (the worker itself, or its
        work horse, which RQ puts in a process group of its own); its index. The worker
        dies first, so nothing of RQ sees the job end."""
        worker_pid = pid if pid in self.pids() else psutil.Process(pid).ppid()
        for index, process in enumerate(self.processes):
            if process.pid == worker_pid:
                os.killpg(worker_pid, signal.SIGKILL)
                if pid != worker_pid:
                    os.killpg(pid, signal.SIGKILL)
                process.wait(timeout=30)
                return index
        raise AssertionError(f"pid {pid} runs in none of the workers")

    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def alive(self) -> list[bool]:
        return [process.poll() is None for process in self.processes]

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)

    def tail(self) -> str:
        return "\n".join(log.read_text()[-3000:] for log in self.logs if log.exists())


@contextmanager
def rq_workers(
    count: int,
    queue: str,
    redis_url: str,
    env: Mapping[str, str],
    log_dir: Path,
    worker_class: str = "rq.worker.Worker",
) -> Iterator[Workers]:
    """``count`` workers on ``queue``; always killed (SIGKILL to each group) on exit.

    They preload this module; ``env`` may add a ``PYTHONPATH`` after the repository's.

    ``rq.worker.Worker`` forks a work horse per job; ``rq.worker.SimpleWorker`` runs jobs in
    the worker process (several times faster here: no fork, a warm database engine).

    Maintenance runs every 2 s (an idle worker wakes every worker-ttl - 15 = 5 s to check),
    so a surviving worker soon moves a dead worker's job out of RQ's started registry once
    the job's heartbeat expires: about a minute after the death with RQ's classes, seconds
    with the ``QuickAbandon*`` ones.
    """
    processes: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    full_env: dict[str, Any] = {
        **os.environ,
        **env,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])]),
        "FLOW_RQ_PRELOAD": "tests.dagster.rq_flows",
    }
    try:
        for n in range(count):
            log = log_dir / f"worker{n}.log"
            logs.append(log)
            command = [
                str(RQ), "worker", "-c", "flow_assets.rq_settings", "--url", redis_url,
                "-w", worker_class,
                "--name", f"{queue}-w{n}-{os.getpid()}", "--maintenance-interval", "2",
                "--job-monitoring-interval", "2", "--worker-ttl", "20", queue,
            ]  # fmt: skip
            with open(log, "wb") as out:
                processes.append(
                    subprocess.Popen(
                        command,
                        cwd=REPO_ROOT,
                        env=full_env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        yield Workers(processes, logs)
    finally:
        Workers(processes, logs).stop()


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.5) -> None:
    """Poll ``predicate`` until true; fail naming ``what`` after ``timeout`` (a hang guard)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
