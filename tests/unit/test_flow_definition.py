"""Flow declaration, record validation and JobBatch transitions: pure, nothing faked."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from datetime import timedelta

import dagster as dg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flow_assets.dispatch import JobBatch
from flow_assets.errors import FlowDefinitionError
from flow_assets.flow import Flow, unique_flows
from flow_assets.sources.base import Page, PageRef
from flow_assets.validation import validate_records


class ListSource:
    """A tiny in-memory source (not a fake of anything: the protocol allows it)."""

    def __init__(self, records: list[object], page_size: int = 2) -> None:
        self.records = records
        self.page_size = page_size

    def plan(self, partition_key: str | None) -> list[PageRef] | None:
        return None

    def fetch(self, ref: PageRef) -> Page:
        raise NotImplementedError

    def pages(self, partition_key: str | None) -> Iterator[Page]:
        for index, start in enumerate(range(0, len(self.records), self.page_size)):
            yield Page(index, self.records[start : start + self.page_size])


def make_flow(**overrides: object) -> Flow:
    options: dict[str, object] = {
        "name": "orders",
        "source": ListSource([]),
        "key": "id",
        "handler": lambda batch: None,
    }
    options.update(overrides)
    return Flow(**options)  # type: ignore[arg-type]


def test_a_flow_needs_only_name_source_key_and_handler() -> None:
    flow = make_flow()
    assert flow.job_name == "orders_job"
    assert flow.asset_key == dg.AssetKey(["flows", "orders"])
    assert flow.group == "flows"
    assert flow.tolerance.max_failed_jobs == 0


@pytest.mark.parametrize(
    "name",
    ["Orders", "1orders", "orders-api", "or*ders", "a{b}", "a:b", "a?b", "a[b]", "", "x" * 64],
)
def test_unsafe_flow_names_are_refused_with_the_rule(name: str) -> None:
    with pytest.raises(FlowDefinitionError, match="lower-case letters"):
        make_flow(name=name)


def test_unknown_options_are_named_with_the_valid_ones() -> None:
    with pytest.raises(FlowDefinitionError, match=r"unknown option\(s\) \['max_failures'\]"):
        make_flow(max_failures=3)


@pytest.mark.parametrize(
    ("option", "value", "fragment"),
    [
        ("source", object(), "source="),
        ("key", "", "key="),
        ("handler", 42, "handler="),
        ("partitions", "daily", "partitions="),
        ("schedule", "every day", "not a cron string"),
        ("max_failed_jobs", -1, "max_failed_jobs"),
        ("max_failed_jobs", 1.5, "max_failed_jobs"),
        ("pages_per_step", 0, "pages_per_step="),
        ("deadline", timedelta(0), "deadline="),
        ("group", "My Group", "Flow group"),
    ],
)
def test_invalid_options_fail_at_declaration(option: str, value: object, fragment: str) -> None:
    with pytest.raises(FlowDefinitionError, match=fragment):
        make_flow(**{option: value})


def test_schedule_on_static_partitions_is_refused_with_the_alternative() -> None:
    with pytest.raises(FlowDefinitionError, match="launch runs from a sensor"):
        make_flow(partitions=dg.StaticPartitionsDefinition(["eu", "us"]), schedule="0 * * * *")


def test_duplicate_flow_names_are_refused() -> None:
    with pytest.raises(FlowDefinitionError, match="two flows are named 'orders'"):
        unique_flows([make_flow(), make_flow()])


def test_validation_keys_good_records_and_rejects_the_rest_with_reasons() -> None:
    records = [
        {"id": "a"},
        {"id": 7},
        {"name": "no key"},
        {"id": 1.5},
        {"id": True},
        ["not", "an", "object"],
        {"id": ""},
        {"id": "b", "blob": "x" * 500},
    ]
    page = validate_records(records, "id", max_record_bytes=300)
    assert page.keys == ["a", "7"]
    reasons = {r.position: r.reason for r in page.rejects}
    assert reasons == {
        2: "record has no key field 'id'",
        3: "record key has type float; expected str or int",
        4: "record key has type bool; expected str or int",
        5: "record is a list, not an object",
        6: "record key must have 1 to 512 characters",
        7: reasons[7],
    }
    assert "over max_record_bytes=300" in reasons[7]
    assert page.rejects[0].raw == '{"name": "no key"}'


_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.just(10**600),  # 601 digits: over the key length limit
    st.floats(allow_nan=False),
    st.text(max_size=3),
    st.sampled_from(["", "x" * 512, "x" * 513]),
    st.lists(st.integers(), max_size=2),
)
_RECORDS = st.one_of(
    st.dictionaries(st.sampled_from(["id", "name"]), _VALUES, max_size=2),
    st.dictionaries(st.just("id"), _VALUES, max_size=1).map(OrderedDict),  # a Mapping, not a dict
    _VALUES,
)


@given(st.lists(_RECORDS, max_size=25))
def test_the_fast_path_keys_and_rejects_exactly_like_the_general_one(records: list[object]) -> None:
    fast = validate_records(records, "id")
    general = validate_records(records, "id", max_record_bytes=10**9)  # never over: same rules
    assert fast == general


def test_key_function_errors_reject_the_record() -> None:
    page = validate_records([{"a": 1}, {"b": 2}], lambda r: r["a"])
    assert page.keys == ["1"]
    assert page.rejects[0].reason == "key function raised KeyError: 'a'"


def test_job_outcomes_are_idempotent_transitions() -> None:
    records = [{"id": k} for k in "abcd"]
    batch = JobBatch(list("abcd"), records)
    batch.fail(records[0], RuntimeError("boom"))
    batch.fail("a", RuntimeError("boom again"))  # double report: no change
    batch.complete("b")
    batch.complete(records[1])  # double ack
    batch.fail("b", RuntimeError("late failure"))  # completed stays completed
    batch.fail("c", ValueError("first try"))
    batch.complete("c")  # failed -> completed on a successful retry
    assert batch.finish() == (3, 1)  # d was left pending: completed on return
    assert batch.failures == {"a": "RuntimeError: boom"}


def test_reporting_a_foreign_record_is_an_error() -> None:
    batch = JobBatch(["a"], [{"id": "a"}])
    with pytest.raises(KeyError, match="not part of this batch"):
        batch.complete({"id": "a"})  # an equal but different object
    with pytest.raises(KeyError, match="not part of this batch"):
        batch.fail("zzz", "nope")


def test_job_errors_are_redacted() -> None:
    batch = JobBatch(["a"], [{"id": "a"}])
    batch.fail("a", ConnectionError("cannot reach postgresql://app:hunter2@db/x"))
    batch.finish()
    assert "hunter2" not in batch.failures["a"]
    assert "postgresql://app:***@db/x" in batch.failures["a"]
