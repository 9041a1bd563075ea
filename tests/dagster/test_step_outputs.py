"""What a flow's steps leave on disk, through real Dagster executions (``execute_job`` on a
persistent instance in a temporary DAGSTER_HOME, re-execution from failure) and real
finalizer ticks, on a real Redis and a SQLite ledger. The records carry a unique marker;
every file under DAGSTER_HOME is searched for it."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from upath import UPath

from flow_assets.chunk_io import RETENTION_ENV, ChunkFiles, chunks_root
from flow_assets.dagster_flow import PageChunk
from flow_assets.errors import ConfigurationError, SourceError
from flow_assets.sources.base import Page
from resources.counts import Counts
from sensors.chunk_cleanup import sweep_old_chunks
from tests.dagster import chunk_flows
from tests.flowkit import assert_counts, row_of, tick

REPO_ROOT = Path(__file__).resolve().parents[2]
ALL = chunk_flows.RECORDS


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "dagster_home"
    path.mkdir()
    return path


@pytest.fixture
def instance(home: Path) -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test(temp_dir=str(home)) as test_instance:
        yield test_instance


def flow_kwargs(
    tmp_path: Path, redis_url: str, sqlite_url: str, marker: str, file_format: str
) -> dict[str, Any]:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    chunk_flows.write_records(data, marker)
    return {
        "database_url": sqlite_url,
        "redis_url": redis_url,
        "data_dir": str(data),
        "broken_path": str(tmp_path / "broken"),
        "file_format": file_format,
    }


def files_holding(directory: Path, marker: str) -> list[Path]:
    needle = marker.encode()
    return [p for p in directory.rglob("*") if p.is_file() and needle in p.read_bytes()]


def execute(kwargs: dict[str, Any], instance: dg.DagsterInstance, **options: Any) -> Any:
    job = dg.build_reconstructable_job(
        "tests.dagster.chunk_flows",
        "build_job",
        reconstructable_kwargs=kwargs,
        reconstructor_working_directory=str(REPO_ROOT),
    )
    return dg.execute_job(job, instance=instance, run_config=chunk_flows.IN_PROCESS, **options)


def test_records_read_in_order_leave_the_disk_once_the_run_is_final_and_successful(
    tmp_path: Path, redis_url: str, sqlite_url: str, instance: dg.DagsterInstance, home: Path
) -> None:
    """CSV is read in order: the plan step hands the records to the page steps on disk, in
    the flow's chunk directory only (not in Dagster's default storage). The finalizer
    removes them when it finalizes the run completed."""
    kwargs = flow_kwargs(tmp_path, redis_url, sqlite_url, marker := uuid.uuid4().hex, "csv")
    with execute(kwargs, instance) as result:
        assert result.success
        run_id = result.run_id
    holding = files_holding(home, marker)
    assert holding, "the chunks of a sequential source hold its records"
    assert all(chunks_root(instance) / run_id in p.parents for p in holding), holding

    tick(chunk_flows.build_definitions(**kwargs), instance)
    assert row_of(sqlite_url, run_id).flow_status == "completed"
    assert files_holding(home, marker) == []
    assert not (chunks_root(instance) / run_id).exists()


def test_a_random_access_source_passes_page_refs_not_records(
    tmp_path: Path, redis_url: str, sqlite_url: str, instance: dg.DagsterInstance, home: Path
) -> None:
    kwargs = flow_kwargs(tmp_path, redis_url, sqlite_url, marker := uuid.uuid4().hex, "jsonl")
    with execute(kwargs, instance) as result:
        assert result.success
        run_id = result.run_id
    assert list((chunks_root(instance) / run_id).rglob("*.pickle")), "chunks were written"
    assert files_holding(home, marker) == [], "no record reached Dagster's storage"


def test_a_failed_run_keeps_its_chunks_for_a_reexecution_and_the_sweep_removes_them_later(
    tmp_path: Path,
    redis_url: str,
    sqlite_url: str,
    instance: dg.DagsterInstance,
    home: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A failed run keeps its records on disk: its re-execution from failure reads them and
    completes the run, which removes the chunks of both Dagster runs. A failed run nobody
    re-executes loses them to the sweep after the retention; a re-execution then fails
    saying why and what to do."""
    kwargs = flow_kwargs(tmp_path, redis_url, sqlite_url, marker := uuid.uuid4().hex, "csv")
    defs = chunk_flows.build_definitions(**kwargs)
    broken = Path(kwargs["broken_path"])
    broken.touch()
    with execute(kwargs, instance) as failed:
        assert not failed.success
        root = failed.run_id
    tick(defs, instance)
    assert row_of(sqlite_url, root).flow_status == "failed"
    assert files_holding(home, marker), "a failed run keeps its chunks"

    broken.unlink()
    reexecution = dg.ReexecutionOptions.from_failure(root, instance)
    with execute(kwargs, instance, reexecution_options=reexecution) as rerun:
        assert rerun.success
        rerun_id = rerun.run_id
    tick(defs, instance)
    row = row_of(sqlite_url, root)
    assert row.flow_status == "completed", row.failure_reason
    assert_counts(row, Counts(source=ALL, dispatched=ALL, completed=ALL))
    assert files_holding(home, marker) == []
    assert not (chunks_root(instance) / rerun_id).exists()

    # A second flow run fails and is left alone past the retention.
    broken.touch()
    with execute(kwargs, instance) as failed_again:
        second = failed_again.run_id
    tick(defs, instance)
    assert files_holding(home, marker)
    monkeypatch.setenv(RETENTION_ENV, "0")
    assert sweep_old_chunks(instance) == 1
    assert files_holding(home, marker) == []

    broken.unlink()
    reexecution = dg.ReexecutionOptions.from_failure(second, instance)
    with execute(kwargs, instance, reexecution_options=reexecution) as too_late:
        assert not too_late.success
        failures = [
            event.event_specific_data.error.message
            for event in too_late.all_events
            if event.is_step_failure
        ]
    assert any("is gone" in text and "Re-execute all steps" in text for text in failures), failures


def test_a_bad_retention_setting_fails_at_load_naming_the_variable_and_the_fix(
    tmp_path: Path, redis_url: str, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    kwargs = flow_kwargs(tmp_path, redis_url, sqlite_url, "m", "csv")
    monkeypatch.setenv(RETENTION_ENV, "a week")
    with pytest.raises(ConfigurationError, match=f"{RETENTION_ENV}='a week' is invalid: set it"):
        chunk_flows.build_definitions(**kwargs)


def test_the_sweep_spares_chunks_a_running_reexecution_reads(
    instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed run's chunks are old, but its re-execution from failure is running and reads
    them: the group is busy and keeps them; once it ended long enough ago they go."""
    monkeypatch.delenv(RETENTION_ENV, raising=False)
    parent = dg.DagsterRun(job_name="chunked_orders_job", status=dg.DagsterRunStatus.FAILURE)
    instance.add_run(parent)
    child = dg.DagsterRun(
        job_name="chunked_orders_job",
        status=dg.DagsterRunStatus.STARTED,
        parent_run_id=parent.run_id,
        root_run_id=parent.run_id,
        tags={"dagster/root_run_id": parent.run_id, "dagster/parent_run_id": parent.run_id},
    )
    instance.add_run(child)
    chunk = chunks_root(instance) / parent.run_id / "chunked_orders_plan" / "result" / "p0"
    chunk.parent.mkdir(parents=True)
    chunk.write_bytes(b"records")
    in_ten_days = time.time() + 10 * 86400

    assert sweep_old_chunks(instance, now=in_ten_days) == 0
    assert chunk.exists()

    instance.report_run_failed(child)
    assert sweep_old_chunks(instance, now=in_ten_days) == 1
    assert not chunk.exists()


def test_a_record_nested_too_deep_to_hand_over_fails_with_a_reason(tmp_path: Path) -> None:
    """JSON the parser accepts may still nest past what pickling follows: the plan step
    then fails naming the problem, not with a raw RecursionError."""
    deep: Any = {}
    for _ in range(5000):
        deep = {"a": deep}
    chunk = PageChunk(pages=(Page(0, [deep]),))
    files = ChunkFiles(base_path=UPath(tmp_path))
    context = dg.build_output_context(step_key="orders_plan", name="result")
    with pytest.raises(SourceError, match="nests too deeply to hand to the page steps"):
        files.dump_to_path(context, chunk, UPath(tmp_path) / "chunk.pickle")
