"""Records from local files (JSON Lines, CSV, Parquet), read page by page, never whole.

Pages hold ``page_size`` records of one file (the last page of each file may be shorter; a
page never spans two files), files in sorted order, with indexes running on across files.
JSON Lines is random access: ``plan`` scans the files once for where each page starts (byte
offset, line number), so each page step reads its own pages and no process holds the whole
source. CSV (quoted fields may span lines) and Parquet are read in order with ``pages``.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flow_assets.errors import FlowDefinitionError, SourceError
from flow_assets.options import require_int
from flow_assets.sources.base import Page, PageRef, SequentialSource
from resources.redaction import mask_personal_data

__all__ = ["FORMATS", "FileSource"]

FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
PARTITION_PLACEHOLDER = "{partition}"
SHOWN_KEY_CHARS = 40
_GLOB_CHARS = frozenset("*?[")
# What a partition key must not hold to stay one file name: path separators (both, so a
# path means the same on every system) and NUL.
_PATH_SEPARATORS = frozenset({"/", "\\", os.sep, os.altsep or "/"})


def _path_key_problem(key: str) -> str | None:
    """Why ``key`` could make a path leave its directory, or None."""
    if not _PATH_SEPARATORS.isdisjoint(key):
        return "holds a path separator"
    if "\x00" in key:
        return "holds a NUL character"
    if key in (".", ".."):
        return f"is the directory name {key!r}"
    return "is empty" if not key else None


def _exact_pages(chunks: Iterable[list[Any]], size: int) -> Iterator[list[Any]]:
    """Regroup record chunks of any length into pages of ``size`` (the last one shorter)."""
    buffer: list[Any] = []
    for chunk in chunks:
        buffer.extend(chunk)
        while len(buffer) >= size:
            yield buffer[:size]
            del buffer[:size]
    if buffer:
        yield buffer


def _to_records(table: pa.Table | pa.RecordBatch) -> list[dict[str, Any]]:
    """Plain Python dicts; float NaN (pandas' "missing") becomes None like any null."""
    columns = [
        pc.if_else(pc.is_nan(column), pa.scalar(None, column.type), column)
        if pa.types.is_floating(column.type)
        else column
        for column in table.columns
    ]
    return pa.Table.from_arrays(columns, names=table.schema.names).to_pylist()


class FileSource(SequentialSource):
    """Records from a local file, or from every file a glob pattern matches (sorted).

    Args:
        path: a file or a glob pattern; ``{partition}`` in it is replaced by the partition key.
        format: ``jsonl``, ``csv`` or ``parquet``; None infers it from the suffix
            (``.jsonl``/``.ndjson``, ``.csv``, ``.parquet``/``.pq``).
        page_size: records per page.
        name: name used in errors and logs (default: the path).

    Examples:
        >>> FileSource("exports/{partition}/orders-*.csv", page_size=500)
        FileSource('exports/{partition}/orders-*.csv', format='csv', page_size=500)
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        format: str | None = None,
        page_size: int = 1000,
        name: str | None = None,
    ) -> None:
        self.path = os.fspath(path)
        if not isinstance(self.path, str) or not self.path:
            raise FlowDefinitionError(f"path must be a file path or glob pattern, got {path!r}.")
        if format is None:
            format = FORMATS.get(Path(self.path).suffix.lower())
            if format is None:
                raise FlowDefinitionError(
                    f"Cannot tell the format of {self.path!r} from its suffix. Fix: pass "
                    "format='jsonl', 'csv' or 'parquet'."
                )
        format = {"ndjson": "jsonl"}.get(format, format)
        if format not in set(FORMATS.values()):
            raise FlowDefinitionError(
                f"format must be 'jsonl', 'csv' or 'parquet', got {format!r}."
            )
        require_int(page_size, "page_size", 1)
        self.format = format
        self.page_size = page_size
        self.name = name or self.path

    def __repr__(self) -> str:
        return f"FileSource({self.path!r}, format={self.format!r}, page_size={self.page_size})"

    __str__ = __repr__

    # -- the Source protocol ---------------------------------------------------------------

    def plan(self, partition_key: str | None) -> list[PageRef] | None:
        """JSON Lines: one ref per page (file, byte offset, line and row numbers); else None."""
        if self.format != "jsonl":
            return None
        refs: list[PageRef] = []
        for file in self.files(partition_key):
            with self._reading(file):
                starts = self._jsonl_record_starts(file)
                for row, (offset, line) in enumerate(starts, start=1):
                    if (row - 1) % self.page_size == 0:
                        params = {"file": file, "offset": offset, "line": line, "row": row}
                        refs.append(PageRef(len(refs), params))
        return refs

    def fetch(self, ref: PageRef) -> Page:
        """Read one planned JSON Lines page (the same records ``pages`` gives it)."""
        if self.format != "jsonl":
            return super().fetch(ref)  # raises: CSV and Parquet are read in order
        file, row = ref.params["file"], ref.params["row"]
        with self._reading(file):
            lines = self._jsonl_lines(file, ref.params["offset"], ref.params["line"])
            chunk = list(islice(lines, self.page_size))
            records = [self._parse_line(file, number, line) for number, line in chunk]
        return Page(ref.index, records, f"{file}:rows {row}-{row + len(records) - 1}")

    def pages(self, partition_key: str | None) -> Iterator[Page]:
        """Every record of every file, in pages; indexes run on across files."""
        index = 0
        for file in self.files(partition_key):
            first_row = 1
            for records in _exact_pages(self._read(file), self.page_size):
                last_row = first_row + len(records) - 1
                yield Page(index, records, f"{file}:rows {first_row}-{last_row}")
                index += 1
                first_row = last_row + 1

    # -- files -----------------------------------------------------------------------------

    def files(self, partition_key: str | None) -> list[str]:
        """The files this partition reads, sorted; SourceError if there are none."""
        pattern = self._resolve(partition_key)
        # Whether to glob is the path's own choice: a partition key holding '*' or '[' is a
        # name, never a pattern that reads other partitions' files.
        if _GLOB_CHARS.isdisjoint(self.path.replace(PARTITION_PLACEHOLDER, "")):
            if not os.path.isfile(pattern):
                raise SourceError(
                    f"Source {self.name!r}: file not found: {pattern}. Fix: check the path "
                    "(and the partition key, if the path has {partition}), or create the file."
                )
            return [pattern]
        files = sorted(f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
        if not files:
            raise SourceError(
                f"Source {self.name!r}: no file matches {pattern}. Fix: check the pattern "
                "(and the partition key, if the path has {partition}), or add the files."
            )
        return files

    def _resolve(self, partition_key: str | None) -> str:
        if PARTITION_PLACEHOLDER not in self.path:
            return self.path
        if partition_key is None:
            raise SourceError(
                f"Source {self.name!r}: the path {self.path!r} has a {PARTITION_PLACEHOLDER} "
                "placeholder but the run has no partition key. Fix: partition the flow, or "
                "remove the placeholder."
            )
        self._check_partition_key(partition_key)
        template = self.path.replace(PARTITION_PLACEHOLDER, "")
        # In a glob pattern the key is a literal, even if it holds '[' or '*'.
        key = partition_key if _GLOB_CHARS.isdisjoint(template) else glob.escape(partition_key)
        return self.path.replace(PARTITION_PLACEHOLDER, key)

    def _check_partition_key(self, partition_key: str) -> None:
        """A partition key names a file in the directory of the path's fixed part, never
        one outside it (``../secret``): keys that could leave it are refused."""
        problem = _path_key_problem(partition_key)
        if problem is None:
            return
        shown = repr(partition_key)
        if len(shown) > SHOWN_KEY_CHARS:
            shown = shown[: SHOWN_KEY_CHARS - 4] + "...'"
        raise SourceError(
            f"Source {self.name!r}: the partition key {shown} cannot go into the path"
            f" {self.path!r}: it {problem}, and a key must be a plain name, so that the path"
            " stays inside its directory. Fix: use partition keys"
            " without '/', '\\' or NUL, other than '', '.' and '..' (e.g. dates such as"
            " 2024-01-31), or map such keys to safe names before they reach the path."
        )

    def _read(self, file: str) -> Iterator[list[Any]]:
        reader = {"jsonl": self._read_jsonl, "csv": self._read_csv, "parquet": self._read_parquet}
        with self._reading(file):
            yield from reader[self.format](file)

    @contextmanager
    def _reading(self, file: str) -> Iterator[None]:
        """Turn a failure to read ``file`` into a SourceError naming it and the format."""
        try:
            yield
        except SourceError:
            raise
        except (OSError, ValueError, pa.ArrowException) as exc:
            # A parser's message may quote the row it choked on: personal data masked.
            raise SourceError(
                f"Source {self.name!r}: cannot read {file} as {self.format}: "
                f"{type(exc).__name__}: {mask_personal_data(str(exc))[:300]}. Fix: check that"
                f" the file is {self.format}."
            ) from None

    def _read_jsonl(self, file: str) -> Iterator[list[Any]]:
        # json, not pandas.read_json: pandas adds the keys a record lacks (as NaN, depending on
        # its neighbours in the chunk) and turns ints into floats; records must stay as written.
        lines = self._jsonl_lines(file)
        while chunk := list(islice(lines, self.page_size)):
            yield [self._parse_line(file, number, line) for number, line in chunk]

    @staticmethod
    def _jsonl_lines(file: str, offset: int = 0, first_line: int = 1) -> Iterator[tuple[int, str]]:
        """``(line number, text)`` of the non-blank lines from byte ``offset`` on.

        Lines end at a newline (read as bytes, so that a page can start at a byte offset).
        """
        with open(file, "rb") as data:
            data.seek(offset)
            for number, raw in enumerate(data, start=first_line):
                line = raw.decode("utf-8")
                if line.strip():
                    yield number, line

    @staticmethod
    def _jsonl_record_starts(file: str) -> Iterator[tuple[int, int]]:
        """``(byte offset, line number)`` where each non-blank line starts."""
        offset = 0
        with open(file, "rb") as data:
            for number, raw in enumerate(data, start=1):
                if raw.decode("utf-8").strip():
                    yield offset, number
                offset += len(raw)

    def _parse_line(self, file: str, number: int, line: str) -> Any:
        try:
            return json.loads(line)
        except json.JSONDecodeError as exc:
            raise SourceError(
                f"Source {self.name!r}: {file}:{number} is not valid JSON ({exc.msg}). "
                "Fix: repair or remove that line; each line must hold one JSON record."
            ) from None

    def _read_csv(self, file: str) -> Iterator[list[Any]]:
        # The pyarrow dtypes keep an int column with blanks as ints (numpy would make floats).
        try:
            chunks = pd.read_csv(file, chunksize=self.page_size, dtype_backend="pyarrow")
        except pd.errors.EmptyDataError:  # a 0-byte file: no header, no records
            return
        with chunks:
            for frame in chunks:
                yield _to_records(pa.Table.from_pandas(frame, preserve_index=False))

    def _read_parquet(self, file: str) -> Iterator[list[Any]]:
        with pq.ParquetFile(file) as parquet:
            for batch in parquet.iter_batches(batch_size=self.page_size):
                yield _to_records(batch)
