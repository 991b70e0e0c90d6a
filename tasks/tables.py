"""Tables (.csv, .parquet, .feather/.arrow) through pyarrow: chosen columns as float32 arrays,
string columns as category ids.

pyarrow is imported inside the functions: a run whose load-tensors is a cache hit never pays
for it (tests/test_export.py watches what a cached run imports).
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from tasks.errors import InputError

if TYPE_CHECKING:
    import pyarrow as pa

TABLE_FORMATS = (".csv", ".parquet", ".feather", ".arrow")
UNKNOWN = 0  # the id of a category outside the vocabulary; known ones are 1 + their index
PROGRESS_AFTER_S = 2.0  # a load slower than this reports how far it is
PROGRESS_EVERY_S = 2.0
CSV_BYTES_PER_ROW = 128  # to turn a block's rows into the CSV parser's block bytes

log = logging.getLogger("trainflow.data")

# A cell no one would call a category: digits with separators ("1,5", "1 000"), signs and
# exponents, inf/nan. A text column of these is a numeric column in a format we can't parse,
# not thousands of categories, so it stays an error that names the cell.
NUMBER_LIKE = (
    r"^\s*[+-]?(\d[\d.,' _]*|[.,]\d[\d' _]*)([eE][+-]?\d+)?\s*$"
    r"|^\s*[+-]?(inf|infinity|nan)\s*$"
)


@dataclass(frozen=True)
class Columns:
    """Columns of one table, in the order asked for: numbers as float32, a categorical
    column as the ids of its values in `categories[name]` (UNKNOWN for a missing value)."""

    # N×C float32 in column-major order: each column is written as one block, and a caller
    # takes its row-major x and y out of it in one copy each.
    values: np.ndarray
    categories: dict[str, tuple[str, ...]]


def column_names(f: IO[bytes], suffix: str, source: str) -> list[str]:
    """The table's column names, read from its header or schema only."""
    import pyarrow as pa

    f.seek(0)
    if suffix == ".csv":
        return csv_header(f)
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(f).names)
        return list(_ipc_schema(f).names)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise InputError(f"data file {source!r}: not a readable {suffix} file ({exc})") from None


def csv_header(f: IO[bytes]) -> list[str]:
    """The header row's column names; `f` stays open (a TextIOWrapper closes its file when it
    is collected, unless detached)."""
    text = io.TextIOWrapper(f, encoding="utf-8-sig", errors="replace", newline="")
    try:
        return [name.strip() for name in next(csv.reader([text.readline()]), [])]
    finally:
        text.detach()


def read_columns(
    f: IO[bytes],
    suffix: str,
    source: str,
    names: Sequence[str],
    categorical: frozenset[str] = frozenset(),
    vocabularies: dict[str, tuple[str, ...]] | None = None,
) -> Columns:
    """`names` (and nothing else: Parquet and Feather read only those columns) as float32.

    A text column named in `categorical` becomes category ids: by `vocabularies[name]` if
    given (prediction), else by the column's own sorted values (training, before the split
    narrows them to the training rows). Any other text column is an error naming its cell.
    """
    import pyarrow as pa

    header = column_names(f, suffix, source)
    f.seek(0)
    counted = _Counted(f, source)
    try:
        table = _read_table(counted, suffix, header, list(names))
    except pa.ArrowInvalid as exc:
        if suffix != ".csv":
            raise InputError(f"data file {source!r}: not a readable {suffix} file") from None
        # Cells are converted after parsing, column by column below: this is the parse, and
        # what it refuses is a row's shape.
        reason = str(exc).splitlines()[0]
        raise InputError(_locate_bad_cell(f, header, source, (), reason)) from None
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"data file {source!r}: not a readable {suffix} file ({exc})") from None
    counted.done(table.num_rows)
    if table.num_rows == 0:
        _no_rows(suffix, source)
    return _converted(table, names, categorical, vocabularies, _Where(f, suffix, header, source))


def iter_columns(
    f: IO[bytes],
    suffix: str,
    source: str,
    names: Sequence[str],
    vocabularies: dict[str, tuple[str, ...]],
    rows_per_block: int = 1 << 18,
) -> Iterator[np.ndarray]:
    """`read_columns(...).values` a block of rows at a time, for a table larger than memory
    (predict): the same numbers, with every categorical column's vocabulary given. Blocks
    hold up to about `rows_per_block` rows (a CSV's are whatever its parser's blocks hold)."""
    import pyarrow as pa

    header = column_names(f, suffix, source)
    f.seek(0)
    counted = _Counted(f, source)
    where = _Where(f, suffix, header, source)
    rows, categorical = 0, frozenset(vocabularies)
    try:
        for batch in _batches(counted, suffix, header, list(names), vocabularies, rows_per_block):
            table = pa.Table.from_batches([batch])
            yield _converted(table, names, categorical, vocabularies, where, rows).values
            rows += batch.num_rows
    except pa.ArrowInvalid as exc:
        if suffix != ".csv":
            raise InputError(f"data file {source!r}: not a readable {suffix} file") from None
        # A block's parse or its cells' conversion (numbers; the vocabulary columns are text).
        numbers = [name for name in names if name not in vocabularies]
        reason = str(exc).splitlines()[0]
        raise InputError(_locate_bad_cell(f, header, source, numbers, reason)) from None
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"data file {source!r}: not a readable {suffix} file ({exc})") from None
    counted.done(rows)
    if rows == 0:
        _no_rows(suffix, source)


def _no_rows(suffix: str, source: str) -> None:
    has = "has a header but" if suffix == ".csv" else "has"
    raise InputError(f"data file {source!r}: {has} no data rows")


@dataclass(frozen=True)
class _Where:
    """The file a table came from, for the error that names a bad cell's line."""

    f: IO[bytes]
    suffix: str
    header: list[str]
    source: str


def _converted(
    table: pa.Table,
    names: Sequence[str],
    categorical: frozenset[str],
    vocabularies: dict[str, tuple[str, ...]] | None,
    where: _Where,
    first_row: int = 0,
) -> Columns:
    values = np.empty((table.num_rows, len(names)), dtype=np.float32, order="F")
    categories: dict[str, tuple[str, ...]] = {}
    for j, name in enumerate(names):
        column = table.column(name)
        given = (vocabularies or {}).get(name)
        # With a vocabulary (predict) the column is categorical whatever its cells look like.
        if name in categorical and (
            given is not None or _is_text(column.type, where.suffix, column)
        ):
            strings = _as_strings(column, where.suffix)
            categories[name] = given if given is not None else vocabulary(strings)
            values[:, j] = category_ids(strings, categories[name])
        else:
            values[:, j] = _numbers(column, name, where, first_row)
    return Columns(values, categories)


def _batches(
    f: IO[bytes],
    suffix: str,
    header: list[str],
    names: list[str],
    text: dict[str, tuple[str, ...]],
    rows: int,
) -> Iterator[pa.RecordBatch]:
    """The table's `names` columns, a record batch at a time, never the whole file."""
    import pyarrow as pa

    if suffix == ".parquet":
        import pyarrow.parquet as pq

        # buffer_size: column chunks are read a buffer at a time, not a row group at once.
        parquet = pq.ParquetFile(f, buffer_size=1 << 20, pre_buffer=False)
        yield from parquet.iter_batches(batch_size=rows, columns=names)
        return
    if suffix in (".feather", ".arrow"):
        try:
            reader = pa.ipc.open_file(f)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:  # an Arrow IPC stream rather than a file
            f.seek(0)
            batches = iter(pa.ipc.open_stream(f))
        for batch in batches:  # a file's batches are as its writer made them: cut big ones
            for start in range(0, batch.num_rows, rows):
                yield batch.select(names).slice(start, rows)
        return
    import pyarrow.csv as pv

    # As _read_table reads a CSV, but every type given: a streaming parser fixes a column's
    # type from its first block, and a column of integers there and "1.5" later would fail.
    # The vocabulary columns are text: their cells are names, whatever they look like (a "1"
    # is a category's name); the others float64, as `_numbers` reads them. The parser's blocks
    # are bytes, about `rows` rows' worth, at most 1 MiB: the reader parses ahead, and its
    # memory grows with the block (a 10⁷-row CSV: +55 MB at 1 MiB, +565 MB at 16 MiB, at the
    # same speed). A row must fit in a block: 1 KiB at the least (only a test asks for less).
    block = max(1 << 10, min(1 << 20, rows * CSV_BYTES_PER_ROW))
    read = pv.ReadOptions(column_names=header, skip_rows=1, block_size=block)
    types = {name: pa.string() if name in text else pa.float64() for name in names}
    yield from pv.open_csv(f, read_options=read, convert_options=_as_written(names, types))


def _as_written(names: Sequence[str], types: dict[str, Any] | None = None) -> Any:
    """Our names (stripped, as csv_header reads them) in place of the file's header row; every
    cell as written: no null spellings, booleans or dates, so "nan", "" or "true" stay what
    they are and the checks name them."""
    import pyarrow.csv as pv

    return pv.ConvertOptions(
        include_columns=list(names),
        column_types=types,
        null_values=[],
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
        true_values=[],
        false_values=[],
        timestamp_parsers=[],
    )


def vocabulary(strings: pa.ChunkedArray) -> tuple[str, ...]:
    """The column's distinct values, sorted; a missing value is no category."""
    import pyarrow.compute as pc

    return tuple(sorted(pc.unique(strings).drop_null().to_pylist()))


def category_ids(strings: pa.ChunkedArray, vocab: Sequence[str]) -> np.ndarray:
    """1 + each value's index in `vocab`; UNKNOWN (0) for a value not in it or missing."""
    import pyarrow as pa
    import pyarrow.compute as pc

    index = pc.index_in(strings, value_set=pa.array(list(vocab), pa.string()))
    ids = pc.fill_null(pc.add(index, 1), UNKNOWN)
    return ids.to_numpy().astype(np.float32)


def _read_table(f: IO[bytes], suffix: str, header: list[str], names: list[str]) -> pa.Table:
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(f, columns=names)
    if suffix in (".feather", ".arrow"):
        import pyarrow.feather as feather

        return feather.read_table(f, columns=names, memory_map=False)
    import pyarrow.csv as pv

    read = pv.ReadOptions(column_names=header, skip_rows=1)
    return pv.read_csv(f, read_options=read, convert_options=_as_written(names))


def _ipc_schema(f: IO[bytes]) -> pa.Schema:
    import pyarrow as pa

    try:
        return pa.ipc.open_file(f).schema
    except pa.ArrowInvalid:  # an Arrow IPC stream rather than a file
        f.seek(0)
        return pa.ipc.open_stream(f).schema


def _is_text(kind: pa.DataType, suffix: str, column: pa.ChunkedArray) -> bool:
    """A categorical column: text in Parquet/Feather; in a CSV, text no cell of which looks
    like a number (a column mixing the two is numbers with a bad cell)."""
    import pyarrow as pa

    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    textual = pa.types.is_string(kind) or pa.types.is_large_string(kind)
    if suffix != ".csv":
        return textual
    if not (textual or pa.types.is_date(kind)):
        return False
    import pyarrow.compute as pc  # here: ~0.3 s of imports an all-number table never needs

    strings = column.cast(pa.string())
    return not pc.any(pc.match_substring_regex(strings, NUMBER_LIKE, ignore_case=True)).as_py()


def _as_strings(column: pa.ChunkedArray, suffix: str) -> pa.ChunkedArray:
    import pyarrow as pa
    import pyarrow.compute as pc

    strings = column.cast(pa.string())
    # As the header's names are: " red" and "red" in a CSV are one category.
    return pc.utf8_trim_whitespace(strings) if suffix == ".csv" else strings


def _numbers(column: pa.ChunkedArray, name: str, where: _Where, first_row: int) -> np.ndarray:
    import pyarrow as pa

    f, suffix, header, source = where.f, where.suffix, where.header, where.source
    kind = column.type
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind):
        if column.null_count:
            nulls = column.is_null().to_numpy(zero_copy_only=False)
            row = first_row + int(np.flatnonzero(nulls)[0])
            # No count: a streamed read sees one block's, and both reads must say the same.
            raise InputError(
                f"data file {source!r}: column {name!r} has missing values, the first at row {row}"
            )
        # Through float64, as a CSV's text is parsed: the same table gives the same float32s.
        return column.cast(pa.float64()).to_numpy()
    if pa.types.is_boolean(kind) and suffix != ".csv":
        return column.cast(pa.float64()).to_numpy(zero_copy_only=False)
    if suffix == ".csv":
        # Arrow's parser refuses some spellings Python reads ("1_000"); those cells are still
        # numbers. Anything else is reported where it is.
        try:
            return np.array([float(cell) for cell in column.to_pylist()], dtype=np.float64)
        except (ValueError, TypeError):
            f.seek(0)
            raise InputError(_locate_bad_cell(f, header, source, [name])) from None
    what = "text" if _is_text(kind, suffix, column) else f"{kind} values"
    raise InputError(f"data file {source!r}: column {name!r} holds {what}, not numbers")


def _locate_bad_cell(
    f: IO[bytes],
    header: list[str],
    source: str,
    checked: Sequence[str],
    reason: str = "not a numeric CSV table",
) -> str:
    """Where a CSV first fails: a row of the wrong length, or a cell of a `checked` column
    that is not a number (the slow, exact path after pyarrow refused the file)."""
    f.seek(0)
    text = io.TextIOWrapper(f, encoding="utf-8-sig", errors="replace", newline="")
    rows = csv.reader(text)
    next(rows, None)  # the header
    for line_no, row in enumerate(rows, start=2):
        if not row:
            continue
        if len(row) != len(header):
            return (
                f"data file {source!r}: line {line_no} has {len(row)} fields, "
                f"the header has {len(header)}"
            )
        for column, cell in zip(header, row, strict=True):
            if column not in checked:
                continue
            try:
                float(cell)
            except ValueError:
                return (
                    f"data file {source!r}: line {line_no}, column {column!r}: "
                    f"{cell.strip()!r} is not a number"
                )
    return f"data file {source!r}: {reason}"


class _Counted:
    """A binary file that logs rows read and MB/s once a load takes longer than
    PROGRESS_AFTER_S, to the task's log (terminal and Prefect UI) when there is one."""

    def __init__(self, f: IO[bytes], source: str):
        self._f, self._source = f, source
        self._start = self._last = time.perf_counter()
        self._bytes = 0
        self._size = f.seek(0, io.SEEK_END)
        f.seek(0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def read(self, n: int = -1) -> bytes:
        chunk = self._f.read(n)
        self._count(len(chunk))
        return chunk

    def readinto(self, buffer: Any) -> int:
        n = self._f.readinto(buffer)
        self._count(n or 0)
        return n or 0

    def _count(self, n: int) -> None:
        self._bytes += n
        now = time.perf_counter()
        if now - self._start >= PROGRESS_AFTER_S and now - self._last >= PROGRESS_EVERY_S:
            self._last = now
            share = self._bytes / self._size if self._size else 1.0
            _info(
                f"loading {self._source}: {self._bytes / 1e6:,.0f} of {self._size / 1e6:,.0f} MB "
                f"({share:.0%}), {self._bytes / 1e6 / (now - self._start):,.0f} MB/s"
            )

    def done(self, rows: int) -> None:
        seconds = time.perf_counter() - self._start
        if seconds >= PROGRESS_AFTER_S:
            _info(
                f"loaded {self._source}: {rows:,} rows, {self._size / 1e6:,.0f} MB in "
                f"{seconds:.1f} s ({self._size / 1e6 / seconds:,.0f} MB/s)"
            )


def _info(message: str) -> None:
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        get_run_logger().info(message)
    except MissingContextError:
        log.info(message)
