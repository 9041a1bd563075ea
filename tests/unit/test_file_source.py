"""FileSource (flow_assets/sources/files.py) over real JSONL, CSV and Parquet files written to
a per-test temporary directory; nothing faked."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flow_assets.errors import FlowDefinitionError, SourceError
from flow_assets.sources import FileSource, PageRef, Source

pytestmark = pytest.mark.unit


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def read_all(source: FileSource, partition_key: str | None = None) -> list[Any]:
    return [record for page in source.pages(partition_key) for record in page.records]


class TestJsonLines:
    def test_pages_of_page_size_with_stable_indexes_and_labels(self, tmp_path: Path) -> None:
        records = [{"id": i} for i in range(25)]
        path = write_jsonl(tmp_path / "orders.jsonl", records)
        pages = list(FileSource(path, page_size=10).pages(None))
        assert [p.index for p in pages] == [0, 1, 2]
        assert [len(p.records) for p in pages] == [10, 10, 5]
        assert [p.label for p in pages] == [
            f"{path}:rows 1-10",
            f"{path}:rows 11-20",
            f"{path}:rows 21-25",
        ]
        assert [r for p in pages for r in p.records] == records

    def test_records_stay_exactly_as_written(self, tmp_path: Path) -> None:
        records = [
            {
                "id": 1,
                "n": 5,
                "created_at": "2024-01-01",
                "nested": {"a": [1, 2]},
                "big": 2**62 + 1,
            },
            {"id": 2, "n": None, "price": 1.5},
            {"id": 3},
        ]
        path = write_jsonl(tmp_path / "mixed.ndjson", records)
        got = read_all(FileSource(path, page_size=2))
        assert got == records
        assert isinstance(got[0]["n"], int)
        assert "price" not in got[0]  # no key invented from a neighbour

    def test_blank_lines_are_skipped(self, tmp_path: Path) -> None:
        path = tmp_path / "gaps.jsonl"
        path.write_text('{"id": 1}\n\n  \n{"id": 2}\n', encoding="utf-8")
        assert read_all(FileSource(path)) == [{"id": 1}, {"id": 2}]

    def test_bad_line_names_file_and_line_after_earlier_pages(self, tmp_path: Path) -> None:
        path = write_jsonl(tmp_path / "broken.jsonl", [{"id": i} for i in range(4)])
        with path.open("a", encoding="utf-8") as f:
            f.write('{"id": 4, "trunc\n')
        pages = FileSource(path, page_size=2).pages(None)
        # Streaming: the pages before the bad line come out before the error.
        assert next(pages).records == [{"id": 0}, {"id": 1}]
        assert next(pages).records == [{"id": 2}, {"id": 3}]
        with pytest.raises(SourceError, match=rf"{path}:5 is not valid JSON"):
            next(pages)


class TestCsv:
    def test_types_are_inferred_and_blanks_are_none(self, tmp_path: Path) -> None:
        path = tmp_path / "people.csv"
        path.write_text("id,age,name,score\n1,30,ann,1.5\n2,,bob,\n3,41,,2.25\n", encoding="utf-8")
        got = read_all(FileSource(path, page_size=10))
        assert got == [
            {"id": 1, "age": 30, "name": "ann", "score": 1.5},
            {"id": 2, "age": None, "name": "bob", "score": None},
            {"id": 3, "age": 41, "name": None, "score": 2.25},
        ]
        assert all(type(r["id"]) is int for r in got)

    def test_chunks_and_labels(self, tmp_path: Path) -> None:
        path = tmp_path / "n.csv"
        path.write_text("n\n" + "".join(f"{i}\n" for i in range(7)), encoding="utf-8")
        pages = list(FileSource(path, page_size=3).pages(None))
        assert [[r["n"] for r in p.records] for p in pages] == [[0, 1, 2], [3, 4, 5], [6]]
        assert pages[-1].label == f"{path}:rows 7-7"

    @pytest.mark.parametrize("content", ["", "id,name\n"])
    def test_empty_files_have_no_pages(self, tmp_path: Path, content: str) -> None:
        path = tmp_path / "empty.csv"
        path.write_text(content, encoding="utf-8")
        assert list(FileSource(path).pages(None)) == []


class TestParquet:
    def test_batches_are_regrouped_into_exact_pages(self, tmp_path: Path) -> None:
        path = tmp_path / "events.parquet"
        table = pa.table(
            {
                "id": list(range(10)),
                "count": [i if i % 3 else None for i in range(10)],
                "ratio": [math.nan if i == 4 else i / 2 for i in range(10)],
            }
        )
        pq.write_table(table, path, row_group_size=3)  # batches of 3 or fewer
        pages = list(FileSource(path, page_size=4).pages(None))
        assert [len(p.records) for p in pages] == [4, 4, 2]
        records = [r for p in pages for r in p.records]
        assert [r["id"] for r in records] == list(range(10))
        assert records[0]["count"] is None and records[1]["count"] == 1
        assert type(records[1]["count"]) is int
        assert records[4]["ratio"] is None and records[5]["ratio"] == 2.5

    def test_not_a_parquet_file_is_a_source_error(self, tmp_path: Path) -> None:
        path = tmp_path / "fake.parquet"
        path.write_text("not parquet", encoding="utf-8")
        with pytest.raises(SourceError, match=r"cannot read .*fake.parquet as parquet"):
            list(FileSource(path).pages(None))


class TestGlobsAndPartitions:
    def test_glob_reads_sorted_files_with_continuous_indexes(self, tmp_path: Path) -> None:
        write_jsonl(tmp_path / "b.jsonl", [{"f": "b", "i": i} for i in range(3)])
        write_jsonl(tmp_path / "a.jsonl", [{"f": "a", "i": i} for i in range(3)])
        write_jsonl(tmp_path / "c.jsonl", [])
        (tmp_path / "sub").mkdir()  # a directory matching nothing it should read
        source = FileSource(str(tmp_path / "*.jsonl"), page_size=2)
        pages = list(source.pages(None))
        assert [p.index for p in pages] == [0, 1, 2, 3]
        # A page never spans two files.
        assert [[r["f"] for r in p.records] for p in pages] == [
            ["a", "a"],
            ["a"],
            ["b", "b"],
            ["b"],
        ]
        assert pages[1].label == f"{tmp_path / 'a.jsonl'}:rows 3-3"
        assert pages == list(source.pages(None))  # deterministic

    def test_partition_placeholder_picks_the_partition_file(self, tmp_path: Path) -> None:
        write_jsonl(tmp_path / "2024-01-01" / "part-0.jsonl", [{"day": 1}])
        write_jsonl(tmp_path / "2024-01-02" / "part-0.jsonl", [{"day": 2}])
        source = FileSource(str(tmp_path / "{partition}" / "part-*.jsonl"))
        assert read_all(source, "2024-01-02") == [{"day": 2}]
        assert read_all(source, "2024-01-01") == [{"day": 1}]

    def test_placeholder_without_partition_key_is_a_clear_error(self, tmp_path: Path) -> None:
        source = FileSource(str(tmp_path / "{partition}.jsonl"))
        with pytest.raises(SourceError, match="no partition key"):
            list(source.pages(None))

    def test_missing_file_names_the_path_and_the_fix(self, tmp_path: Path) -> None:
        source = FileSource(str(tmp_path / "{partition}.csv"), name="orders")
        missing = tmp_path / "2024-02-30.csv"
        with pytest.raises(SourceError, match=rf"'orders': file not found: {missing}\. Fix:"):
            list(source.pages("2024-02-30"))

    def test_glob_matching_nothing_is_a_clear_error(self, tmp_path: Path) -> None:
        with pytest.raises(SourceError, match=r"no file matches .*\*\.parquet\. Fix:"):
            list(FileSource(str(tmp_path / "*.parquet")).pages(None))


class TestPartitionKeysStayInTheDirectory:
    """A partition key replaces {partition} but never names a file outside the directory of
    the path's fixed part: keys with a path separator, a '.'/'..' component or a NUL are
    refused with a SourceError naming the key's problem and the fix."""

    ESCAPING = [
        "../secret",
        "..",
        ".",
        "a/../../secret",
        "/etc/passwd",
        "sub/part",
        "a\\b",
        "x\x00y",
        "",
    ]

    def files(self, tmp_path: Path) -> None:
        write_jsonl(tmp_path / "secret.jsonl", [{"secret": 1}])
        write_jsonl(tmp_path / "data" / "2024-01-01.jsonl", [{"day": 1}])
        write_jsonl(tmp_path / "data" / "a..b.jsonl", [{"day": 2}])
        write_jsonl(tmp_path / "data" / "nested" / "2024-01-01" / "part-0.jsonl", [{"day": 3}])

    @pytest.mark.parametrize("key", ESCAPING)
    @pytest.mark.parametrize(
        "template", ["data/{partition}.jsonl", "data/nested/{partition}/*.jsonl"]
    )
    def test_a_key_that_could_leave_the_directory_is_refused(
        self, tmp_path: Path, key: str, template: str
    ) -> None:
        self.files(tmp_path)
        source = FileSource(str(tmp_path / template), name="orders")
        for read in (lambda: read_all(source, key), lambda: source.plan(key)):
            with pytest.raises(SourceError) as caught:
                read()
            message = str(caught.value)
            assert message.startswith("Source 'orders': the partition key ")
            assert "Fix: use partition keys without" in message

    def test_the_message_does_not_echo_a_long_key(self, tmp_path: Path) -> None:
        self.files(tmp_path)
        source = FileSource(str(tmp_path / "data" / "{partition}.jsonl"))
        with pytest.raises(SourceError) as caught:
            read_all(source, "../" + "x" * 500)
        assert "x" * 60 not in str(caught.value)
        assert "path separator" in str(caught.value)

    @pytest.mark.parametrize(
        ("key", "expected"), [("2024-01-01", [{"day": 1}]), ("a..b", [{"day": 2}])]
    )
    def test_plain_keys_still_read_their_file(
        self, tmp_path: Path, key: str, expected: list[Any]
    ) -> None:
        self.files(tmp_path)
        assert read_all(FileSource(str(tmp_path / "data" / "{partition}.jsonl")), key) == expected

    @pytest.mark.parametrize("key", ["*", "t*", "tenant[AB]", "**", "tenant?"])
    def test_glob_characters_in_a_key_are_a_name_not_a_pattern(
        self, tmp_path: Path, key: str
    ) -> None:
        """A key with '*', '?' or '[' reads the file of that name, never other partitions'."""
        write_jsonl(tmp_path / "data" / "tenantA.jsonl", [{"tenant": "A"}])
        write_jsonl(tmp_path / "data" / "tenantB.jsonl", [{"tenant": "B"}])
        source = FileSource(str(tmp_path / "data" / "{partition}.jsonl"), name="orders")
        with pytest.raises(SourceError, match="file not found"):
            read_all(source, key)
        write_jsonl(tmp_path / "data" / f"{key}.jsonl", [{"tenant": key}])
        assert read_all(source, key) == [{"tenant": key}]


class TestJsonLinesRandomAccess:
    """plan() + fetch() give exactly the pages pages() gives, each page read on its own."""

    def write_files(self, tmp_path: Path) -> FileSource:
        first = tmp_path / "day" / "a.jsonl"
        first.parent.mkdir()
        # Blank lines (also whitespace-only and CRLF) are skipped; non-ASCII text; 23 records.
        lines = [json.dumps({"id": i, "name": f"café {i}"}) for i in range(23)]
        lines[4:4] = ["", "   "]
        first.write_bytes(("\r\n".join(lines[:10]) + "\n" + "\n".join(lines[10:]) + "\n").encode())
        write_jsonl(tmp_path / "day" / "b.jsonl", [{"id": 100 + i} for i in range(7)])
        (tmp_path / "day" / "c.jsonl").write_text("")  # no records: no page
        return FileSource(str(tmp_path / "{partition}" / "*.jsonl"), page_size=5)

    def test_planned_pages_equal_the_pages_read_in_order(self, tmp_path: Path) -> None:
        source = self.write_files(tmp_path)
        in_order = list(source.pages("day"))
        refs = source.plan("day")
        assert refs is not None and [ref.index for ref in refs] == list(range(7))
        fetched = [source.fetch(ref) for ref in reversed(refs)][::-1]  # any order
        assert fetched == in_order
        assert [len(page.records) for page in fetched] == [5, 5, 5, 5, 3, 5, 2]
        assert fetched[4].label.endswith("a.jsonl:rows 21-23")
        assert fetched[0].records[0] == {"id": 0, "name": "café 0"}

    def test_a_bad_line_names_its_file_and_line_when_its_page_is_fetched(
        self, tmp_path: Path
    ) -> None:
        path = tmp_path / "x.jsonl"
        path.write_text('{"id": 1}\n{"id": 2}\n\n{"id": 3, oops}\n{"id": 4}\n')
        source = FileSource(path, page_size=2)
        refs = source.plan(None)
        assert refs is not None and len(refs) == 2
        assert source.fetch(refs[0]).records == [{"id": 1}, {"id": 2}]
        with pytest.raises(SourceError, match=rf"{path}:4 is not valid JSON"):
            source.fetch(refs[1])

    def test_invalid_utf8_is_a_source_error_at_plan(self, tmp_path: Path) -> None:
        path = tmp_path / "x.jsonl"
        path.write_bytes(b'{"id": 1}\n{"id": "\xff"}\n')
        with pytest.raises(SourceError, match=r"cannot read .* as jsonl: UnicodeDecodeError"):
            FileSource(path).plan(None)


class TestContract:
    def test_jsonl_is_random_access_csv_and_parquet_are_sequential(self, tmp_path: Path) -> None:
        source = FileSource(write_jsonl(tmp_path / "x.jsonl", [{"id": 1}]))
        assert isinstance(source, Source)
        assert source.plan(None) == [
            PageRef(0, {"file": str(tmp_path / "x.jsonl"), "offset": 0, "line": 1, "row": 1})
        ]
        csv = tmp_path / "x.csv"
        csv.write_text("id\n1\n")
        assert FileSource(csv).plan(None) is None
        with pytest.raises(SourceError, match="sequential"):
            FileSource(csv).fetch(PageRef(0))

    def test_format_comes_from_the_suffix_or_the_argument(self, tmp_path: Path) -> None:
        assert FileSource("x.NDJSON").format == "jsonl"
        assert FileSource("x.pq").format == "parquet"
        path = write_jsonl(tmp_path / "records.txt", [{"id": 1}])
        assert read_all(FileSource(path, format="jsonl")) == [{"id": 1}]
        assert repr(FileSource("a/*.csv", page_size=5)) == (
            "FileSource('a/*.csv', format='csv', page_size=5)"
        )

    @pytest.mark.parametrize(
        ("args", "kwargs", "message"),
        [
            (("x.txt",), {}, "Cannot tell the format"),
            (("x.csv",), {"format": "xml"}, "format must be"),
            (("x.csv",), {"page_size": 0}, "page_size must be an integer >= 1"),
            (("",), {}, "path must be"),
        ],
    )
    def test_invalid_arguments_are_refused(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], message: str
    ) -> None:
        with pytest.raises(FlowDefinitionError, match=message):
            FileSource(*args, **kwargs)
