"""Redis key naming (resources/live/keys.py); pure functions, nothing real or faked."""

from __future__ import annotations

import fnmatch

import pytest
from redis.crc import key_slot

from resources.live.keys import (
    ALL_RUN_KEYS_PATTERN,
    KINDS,
    parse_run_key,
    run_key,
    run_keys,
)
from resources.names import InvalidNameError

RUN_ID = "3f2b8c1e-6a1d-4f0e-9c2a-5d7e8f9a0b1c"


def test_run_key_layout() -> None:
    assert run_key("orders_api", RUN_ID, "seen") == f"flow:{{orders_api:{RUN_ID}}}:seen"


def test_run_keys_cover_every_kind_in_order() -> None:
    assert run_keys("orders_api", RUN_ID) == [run_key("orders_api", RUN_ID, k) for k in KINDS]
    assert KINDS == ("meta", "seen", "pages", "totals")


def test_all_keys_of_a_run_share_one_cluster_slot() -> None:
    slots = {key_slot(key.encode()) for key in run_keys("orders_api", RUN_ID)}
    assert len(slots) == 1
    # The hash tag is the flow and run, not the constant prefix: runs spread over slots.
    other_runs = {key_slot(run_key("orders_api", f"run-{i}", "meta").encode()) for i in range(20)}
    assert len(other_runs) > 1


@pytest.mark.parametrize("kind", KINDS)
def test_parse_run_key_round_trips(kind: str) -> None:
    assert parse_run_key(run_key("orders_api", RUN_ID, kind)) == ("orders_api", RUN_ID, kind)


@pytest.mark.parametrize(
    "key",
    ["flow:orders_api:run:meta", "other:{orders_api:run}:meta", "flow:{Orders:run}:meta", ""],
)
def test_parse_run_key_ignores_foreign_keys(key: str) -> None:
    assert parse_run_key(key) is None


def test_scan_pattern_matches_every_run_key_and_nothing_else() -> None:
    # Redis glob and fnmatch agree on '*' and on literal braces and colons.
    for key in run_keys("orders_api", RUN_ID):
        assert fnmatch.fnmatchcase(key, ALL_RUN_KEYS_PATTERN)
    assert not fnmatch.fnmatchcase("flowctl:cache", ALL_RUN_KEYS_PATTERN)
    assert not fnmatch.fnmatchcase("rq:queue:default", ALL_RUN_KEYS_PATTERN)


@pytest.mark.parametrize("char", [*"*?[]{}:", " ", "\n", "/"])
def test_flow_names_with_pattern_or_tag_characters_are_rejected(char: str) -> None:
    with pytest.raises(InvalidNameError, match="flow name"):
        run_key(f"orders{char}api", RUN_ID, "meta")


@pytest.mark.parametrize("name", ["", "Orders", "1orders", "x" * 64, None, 7])
def test_other_invalid_flow_names_are_rejected(name: object) -> None:
    with pytest.raises(InvalidNameError, match="lower-case letters"):
        run_keys(name, RUN_ID)  # type: ignore[arg-type]


@pytest.mark.parametrize("run_id", ["", "a*", "a}b", "a{b", "a:b", "a?b", "a[b]", "x" * 65])
def test_run_ids_with_pattern_or_tag_characters_are_rejected(run_id: str) -> None:
    with pytest.raises(ValueError, match="run id"):
        run_key("orders_api", run_id, "meta")


def test_unknown_kind_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown key kind"):
        run_key("orders_api", RUN_ID, "jobs")
