"""Tables (.csv, .parquet, .feather/.arrow) through pyarrow: chosen columns as float32 arrays,
string columns as category ids.

One reading of a table, whoever reads it (training's whole file, predict's blocks, the
memory-mapped conversion's blocks): every path reads record batches through `_blocks` and
converts each column with `_numbers` or `_as_strings`, so a cell means one thing everywhere:
- a CSV cell is the text written; it is a number as Arrow's float parser reads one,
  surrounding spaces aside ("1_000", "1 000", "1,5" are not numbers), or a boolean as
  pyarrow writes one ("true" is 1, "false" 0);
- a Parquet/Feather column means what its text in a CSV means (`_as_read`): a dictionary
  its values; a string or binary column (its UTF-8 text) and a null column (blank cells)
  are cells, judged and parsed exactly as a CSV's; a date, time or timestamp the text
  pyarrow's CSV writer writes (cells no one reads as numbers: categorical); a decimal the
  number its text is; a boolean 1 or 0; a duration its count of units;
- a column of cells is categorical when none of its cells looks like a number (`_is_text`),
  else numbers (`_text_numbers`), decided over the whole column, never by one block;
- a blank cell (empty, spaces only, or a null) is missing: unknown (id 0) in a categorical
  column, an error in a number column; never a category "" and never a number;
- float32 must hold the value: a whole number up to 2^64 in magnitude exactly (whatever
  holds it: an integer, a float, a decimal, a CSV cell with or without a point), so up to
  ±2^24 and beyond that only with at most 24 significant bits; any other finite value
  within ±3.4028235e+38. Anything else is one line naming the row (in a CSV, its line) and
  the column.

pyarrow is imported inside the functions: a run whose load-tensors is a cache hit never pays
for it (tests/test_export.py watches what a cached run imports).
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from trainflow.tasks.errors import InputError

if TYPE_CHECKING:
    import pyarrow as pa

TABLE_FORMATS = (".csv", ".parquet", ".feather", ".arrow")
UNKNOWN = 0  # the id of a category outside the vocabulary; known ones are 1 + their index
PROGRESS_AFTER_S = 2.0  # a load slower than this reports how far it is
PROGRESS_EVERY_S = 2.0
CSV_BYTES_PER_ROW = 128  # to turn a block's rows into the CSV parser's block bytes
FLOAT32_EXACT = 1 << 24  # float32 holds every integer up to this, in magnitude, exactly
# Whole numbers up to this magnitude are ids, counts or timestamps (uint64's range): float32
# must hold them exactly. Beyond it, a whole number is a magnitude, and rounds as a float.
WHOLE_UP_TO = 1 << 64
INTEGER = r"^[+-]?\d+$"  # a CSV cell written as an integer (surrounding spaces trimmed)

log = logging.getLogger("trainflow.data")

# A boolean as pyarrow's CSV writer spells it, and its reader reads it by default: a number,
# 1 or 0, as a Parquet boolean column is.
BOOLEANS = {"true": "1", "True": "1", "TRUE": "1", "false": "0", "False": "0", "FALSE": "0"}

# A cell no one would call a category: digits with separators ("1,5", "1 000"), signs and
# exponents, inf/nan, a boolean. A text column of these is a numeric column in a format we
# can't parse, not thousands of categories, so it stays an error that names the cell.
NUMBER_LIKE = (
    r"^\s*[+-]?(\d[\d.,' _]*|[.,]\d[\d' _]*)([eE][+-]?\d+)?\s*$"
    r"|^\s*[+-]?(?i:inf|infinity|nan)\s*$"
    rf"|^\s*({'|'.join(BOOLEANS)})\s*$"
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
    f.seek(0)
    if suffix == ".csv":  # without pyarrow: a cached run reads a CSV's header, nothing else
        return csv_header(f)
    import pyarrow as pa

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
    Every cell goes through the conversions `iter_columns` applies, block by block.
    """
    import pyarrow as pa

    where = _Where(f, suffix, column_names(f, suffix, source), source)
    given = vocabularies or {}
    if suffix == ".csv" and not given and (plain := _plain_csv(where, names)) is not None:
        return Columns(plain, {})
    pieces: dict[str, list[np.ndarray]] = {name: [] for name in names}
    # A categorical column's raw blocks, with their first rows: its vocabulary needs them all.
    # A column of cells (a CSV's, a Parquet string's) stays here until a cell looks like a
    # number; then it is numbers throughout, whichever block that cell is in.
    texts: dict[str, list[tuple[int, pa.Array]]] = {}
    rows = 0
    for batch in _blocks(where, names, 1 << 18, whole=True):
        for name in names:
            column = batch.column(name)
            if name in given or (
                name in categorical and not pieces[name] and _is_text(column, name, where, rows)
            ):
                texts.setdefault(name, []).append((rows, column))
                continue
            for first, kept in texts.pop(name, []):
                pieces[name].append(_numbers(kept, name, where, first))
            pieces[name].append(_numbers(column, name, where, rows))
        rows += batch.num_rows
    values = np.empty((rows, len(names)), dtype=np.float32, order="F")
    categories: dict[str, tuple[str, ...]] = {}
    for j, name in enumerate(names):
        if name in texts:
            chunks = [_as_strings(column, name, where, first) for first, column in texts[name]]
            strings = pa.chunked_array(chunks, pa.string())
            categories[name] = given[name] if name in given else vocabulary(strings)
            values[:, j] = category_ids(strings, categories[name])
        else:
            np.concatenate(pieces[name], out=values[:, j])
    return Columns(values, categories)


def _plain_csv(where: _Where, names: Sequence[str]) -> np.ndarray | None:
    """A CSV of plain numbers only, the common case, as `read_columns` would read it, in one
    parse on every core that converts as it reads; None for any other CSV, which the careful
    reader then reads cell by cell (a text or boolean cell, a blank, a row of the wrong length,
    a value beyond ±2^24, NaN or infinity), or one too large to hold as float64 beside the
    memory it would leave.

    The same numbers the careful reader makes: both parse a cell with Arrow's one float
    parser (its CSV converter trims surrounding spaces, as the careful reader does), and every
    value within ±2^24 is one that reader takes as it is and rounds to float32 alike.
    """
    import pyarrow as pa
    import pyarrow.csv as pv

    f, size = where.f, where.f.seek(0, io.SEEK_END)
    available = available_memory()
    # float64 cells (at least 2 bytes of text each: a digit and a comma) and their float32 copy.
    if available is not None and 6 * size > available:
        return None
    f.seek(0)
    counted = _Counted(f, where.source)
    read = pv.ReadOptions(column_names=where.header, skip_rows=1, block_size=1 << 20)
    convert = pv.ConvertOptions(
        include_columns=list(names),
        column_types=dict.fromkeys(names, pa.float64()),
        null_values=[],
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
    )
    try:
        table = pv.read_csv(counted, read_options=read, convert_options=convert)
    except (pa.ArrowException, OSError):  # the careful reader says which cell, or why
        return None
    if table.num_rows == 0:
        return None
    values = np.empty((table.num_rows, len(names)), dtype=np.float32, order="F")
    for j, name in enumerate(names):
        start = 0
        for chunk in table.column(name).chunks:
            numbers = chunk.to_numpy()
            if not (np.abs(numbers) <= FLOAT32_EXACT).all():  # NaN too: the comparison fails
                return None
            values[start : start + len(numbers), j] = numbers
            start += len(numbers)
        table = table.drop_columns([name])  # its float64 cells go as its float32 ones come
    counted.done(len(values))
    return values


def available_memory() -> int | None:
    """Bytes the kernel says a new allocation can get (Linux's MemAvailable), if known."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def iter_columns(
    f: IO[bytes],
    suffix: str,
    source: str,
    names: Sequence[str],
    vocabularies: dict[str, tuple[str, ...]],
    rows_per_block: int = 1 << 18,
) -> Iterator[np.ndarray]:
    """`read_columns(...).values` a block of rows at a time, for a table larger than memory
    (predict, the memory-mapped path): the same numbers and errors, with every categorical
    column's vocabulary given. Blocks hold up to about `rows_per_block` rows (a CSV's are
    whatever its parser's blocks hold)."""
    where = _Where(f, suffix, column_names(f, suffix, source), source)
    rows = 0
    for batch in _blocks(where, names, rows_per_block, whole=False):
        values = np.empty((batch.num_rows, len(names)), dtype=np.float32, order="F")
        for j, name in enumerate(names):
            column = batch.column(name)
            if name in vocabularies:
                strings = _as_strings(column, name, where, rows)
                values[:, j] = category_ids(strings, vocabularies[name])
            else:
                values[:, j] = _numbers(column, name, where, rows)
        yield values
        rows += batch.num_rows


def unfit_for_float32(values: np.ndarray) -> tuple[int, str] | None:
    """The first value (flat index) that float32 would change beyond rounding, and why: a
    whole number up to 2^64 in magnitude it can't hold exactly, or a finite number beyond
    its range. Every read path refuses these (README, "Data formats"): rounding 0.1 is what
    float32 does to any fraction, but an id or a timestamp turned into its neighbour is
    another value, whichever type held it."""
    flat = values.reshape(-1)
    if (found := _first_unfit(flat)) is None:
        return None
    i, whole = found
    return i, _unfit(str(int(flat[i])) if whole else repr(float(flat[i])), whole)


def _first_unfit(flat: np.ndarray) -> tuple[int, bool] | None:
    """The index of the first value `unfit_for_float32` refuses, and whether it is a whole
    number float32 can't hold (else: a finite value beyond its range)."""
    if flat.dtype.kind in "iu":
        whole = bad = _inexact_integers(flat)
    elif flat.dtype.kind == "f":
        whole = _inexact_whole(flat)
        bad = whole | _beyond_float32(flat)
    else:
        return None
    if not bad.any():
        return None
    i = int(np.argmax(bad))
    return i, bool(whole[i])


def _unfit(shown: str, integer: bool) -> str:
    if integer:
        return (
            f"the integer {shown} is not exact in float32 (it holds every integer up to "
            f"±2^24 = {FLOAT32_EXACT:,}, and larger ones only if they have at most 24 "
            "significant bits)"
        )
    largest = np.format_float_scientific(np.finfo(np.float32).max)
    return f"{shown} is beyond float32's range (±{largest})"


def _inexact_integers(ints: np.ndarray) -> np.ndarray:
    """Which integers have more than 24 significant bits (trailing zeros aside): float32's
    24-bit significand would round them. Exact for every width, 64-bit ones included."""
    magnitude = ints.astype(np.uint64)  # a negative one wraps: its two's complement
    one = np.uint64(1)
    if ints.dtype.kind == "i":
        magnitude = np.where(ints < 0, ~magnitude + one, magnitude)
    lowest = magnitude & (~magnitude + one)  # the lowest set bit (0 for 0)
    return magnitude // np.maximum(lowest, one) >= np.uint64(FLOAT32_EXACT)


def _inexact_whole(floats: np.ndarray) -> np.ndarray:
    """Which floats are whole numbers up to 2^64 in magnitude that float32 would round."""
    if floats.dtype.itemsize <= 4:  # float32 and float16 values are float32 values
        return np.zeros(floats.shape, dtype=bool)
    with np.errstate(over="ignore", invalid="ignore"):  # inf and NaN are neither: no warning
        narrowed = floats.astype(np.float32)
        return (np.abs(floats) <= WHOLE_UP_TO) & (np.floor(floats) == floats) & (narrowed != floats)


def _beyond_float32(floats: np.ndarray) -> np.ndarray:
    """Finite values that float32 would make infinite."""
    with np.errstate(over="ignore"):  # the overflow is what this looks for, not a warning
        return np.isinf(floats.astype(np.float32)) & np.isfinite(floats)


@dataclass(frozen=True)
class _Where:
    """The file a table came from, for the error that names a bad cell."""

    f: IO[bytes]
    suffix: str
    header: list[str]
    source: str

    def cell(self, name: str, row: int) -> str:
        """'data file …: line L, column c' in a CSV (the line an editor shows), else 'row R'."""
        line = self.line(row)
        at = f"line {line}" if line is not None else f"row {row}"
        return f"data file {self.source!r}: {at}, column {name!r}"

    def line(self, row: int) -> int | None:
        """The CSV line that ends data row `row` (0-based, as Arrow counts: blank lines
        skipped), read without moving the file's position: a parser may still be reading."""
        if self.suffix != ".csv":
            return None
        # Closed here, not when collected: by then the file may be closed, and the lines'
        # reader can't let go of it.
        with contextlib.closing(_lines(self.f)) as lines:
            records = csv.reader(lines)
            next(records, None)  # the header
            seen = -1
            for record in records:
                seen += bool(record)
                if record and seen == row:
                    return records.line_num
        return None


def _blocks(
    where: _Where, names: Sequence[str], rows: int, whole: bool
) -> Iterator[pa.RecordBatch]:
    """The table's `names` columns, a record batch at a time (a CSV's cells as raw bytes, for
    `_numbers` and `_as_strings` to convert); parse errors as one line; no rows is an error."""
    import pyarrow as pa

    f, suffix, source = where.f, where.suffix, where.source
    f.seek(0)
    counted = _Counted(f, source)
    total = 0
    try:
        for batch in _batches(counted, suffix, where.header, list(names), rows, whole):
            total += batch.num_rows
            yield batch if suffix == ".csv" else _as_read(batch)
    except pa.ArrowInvalid as exc:
        if suffix != ".csv":
            raise InputError(f"data file {source!r}: not a readable {suffix} file") from None
        # Cells are read as bytes, never converted by the parser: what it refuses is a row's
        # shape.
        reason = str(exc).splitlines()[0]
        raise InputError(_locate_bad_row(where, reason)) from None
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"data file {source!r}: not a readable {suffix} file ({exc})") from None
    counted.done(total)
    if total == 0:
        has = "has a header but" if suffix == ".csv" else "has"
        raise InputError(f"data file {source!r}: {has} no data rows")


def _batches(
    f: IO[bytes], suffix: str, header: list[str], names: list[str], rows: int, whole: bool
) -> Iterator[pa.RecordBatch]:
    """The table's `names` columns, a record batch at a time: `whole`, a Parquet or Arrow
    file read at once (all cores), else never more than about `rows` rows in memory."""
    import pyarrow as pa

    if suffix == ".parquet":
        import pyarrow.parquet as pq

        if whole:
            yield from pq.read_table(f, columns=names).to_batches()
            return
        # buffer_size: column chunks are read a buffer at a time, not a row group at once.
        parquet = pq.ParquetFile(f, buffer_size=1 << 20, pre_buffer=False)
        yield from parquet.iter_batches(batch_size=rows, columns=names)
        return
    if suffix in (".feather", ".arrow"):
        if whole:
            import pyarrow.feather as feather

            yield from feather.read_table(f, columns=names, memory_map=False).to_batches()
            return
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

    # Every cell as the bytes written, whole file or not: the parser never converts a cell,
    # so one function (`_numbers`) reads every number on every path, and a column's type
    # never depends on which rows a block holds. The parser's blocks are bytes, about `rows`
    # rows' worth, at most 1 MiB: the reader parses ahead, and its memory grows with the
    # block. A row must fit in a block: 1 KiB at the least (only a test asks for less).
    block = max(1 << 10, min(1 << 20, rows * CSV_BYTES_PER_ROW))
    read = pv.ReadOptions(column_names=header, skip_rows=1, block_size=block)
    convert = pv.ConvertOptions(
        include_columns=names,
        column_types=dict.fromkeys(names, pa.binary()),
        null_values=[],
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
    )
    yield from pv.open_csv(f, read_options=read, convert_options=convert)


def _as_read(batch: pa.RecordBatch) -> pa.RecordBatch:
    """A Parquet/Feather batch with each column as the values its text in a CSV means, so
    that one table reads alike in every format: a dictionary as its values; text as cells
    (`_is_cells`), for `_is_text` and `_numbers` to judge as a CSV's: a string as itself, a
    binary column as its bytes (the UTF-8 text that writer writes; other bytes are a bad
    cell), a null column as blank cells, a date, time or timestamp as the text that writer
    writes for it; a duration as its count of units, the number that writer writes."""
    import pyarrow as pa

    columns = []
    for column in batch.columns:
        kind = column.type
        if pa.types.is_dictionary(kind):
            column = column.dictionary_decode()
            kind = column.type
        if any(
            test(kind)
            for test in (
                pa.types.is_large_string,
                pa.types.is_null,
                pa.types.is_date,
                pa.types.is_time,
                pa.types.is_timestamp,
            )
        ):
            column = column.cast(pa.string())
        elif pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind):
            column = column.cast(pa.binary())
        elif pa.types.is_duration(kind):
            column = column.cast(pa.int64())
        columns.append(column)
    return pa.RecordBatch.from_arrays(columns, names=batch.schema.names)


def _is_cells(kind: pa.DataType) -> bool:
    """Whether a column read by `_blocks` holds cells of text: every CSV column (its bytes),
    and a Parquet/Feather column whose CSV cells are text (`_as_read`)."""
    import pyarrow as pa

    return pa.types.is_string(kind) or pa.types.is_binary(kind)


def categorical_columns(
    f: IO[bytes], suffix: str, source: str, names: Sequence[str], rows_per_block: int = 1 << 18
) -> list[str]:
    """Which of `names` `read_columns` would make categorical (given them as `categorical`):
    those none of whose cells looks like a number, read a block at a time. For a read that
    takes numbers only (the memory-mapped path) to say that a column it refused is text."""
    where = _Where(f, suffix, column_names(f, suffix, source), source)
    text, rows = dict.fromkeys(names, True), 0
    for batch in _blocks(where, names, rows_per_block, whole=False):
        for name in names:  # one cell that looks like a number makes the column numbers
            if text[name]:
                text[name] = _is_text(batch.column(name), name, where, rows)
        rows += batch.num_rows
        if not any(text.values()):
            break
    return [name for name in names if text[name]]


def vocabulary(strings: pa.ChunkedArray) -> tuple[str, ...]:
    """The column's distinct values, sorted; a missing value is no category."""
    import pyarrow.compute as pc

    return tuple(sorted(pc.unique(strings).drop_null().to_pylist()))


def category_ids(strings: pa.ChunkedArray | pa.Array, vocab: Sequence[str]) -> np.ndarray:
    """1 + each value's index in `vocab`; UNKNOWN (0) for a value not in it or missing."""
    import pyarrow as pa
    import pyarrow.compute as pc

    index = pc.index_in(strings, value_set=pa.array(list(vocab), pa.string()))
    ids = pc.fill_null(pc.add(index, 1), UNKNOWN)
    return ids.to_numpy(zero_copy_only=False).astype(np.float32)


def _ipc_schema(f: IO[bytes]) -> pa.Schema:
    import pyarrow as pa

    try:
        return pa.ipc.open_file(f).schema
    except pa.ArrowInvalid:  # an Arrow IPC stream rather than a file
        f.seek(0)
        return pa.ipc.open_stream(f).schema


def _is_text(column: pa.Array, name: str, where: _Where, first_row: int) -> bool:
    """A categorical column, in every format alike: cells (`_is_cells`) no one of which looks
    like a number (a column mixing the two is numbers with a bad cell)."""
    if not _is_cells(column.type):
        return False
    import pyarrow.compute as pc  # here: ~0.3 s of imports an all-number table never needs

    strings = _as_strings(column, name, where, first_row)
    return not pc.any(pc.match_substring_regex(strings, NUMBER_LIKE)).as_py()


def _as_strings(column: pa.Array, name: str, where: _Where, first_row: int) -> pa.Array:
    """A column's cells as text, in every format alike: surrounding spaces don't count (" red"
    is "red"), and a blank cell (empty or spaces) is missing, never a category or a number:
    pyarrow writes a missing value to a CSV as a blank cell, and "" as `""`."""
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        strings = column.cast(pa.string())
    except pa.ArrowInvalid:  # bytes that are not UTF-8: a CSV's cells are read as bytes
        row = _first_failing(column, lambda part: part.cast(pa.string()))
        raise InputError(f"{where.cell(name, first_row + row)}: not UTF-8 text") from None
    strings = pc.utf8_trim_whitespace(strings)
    return pc.if_else(pc.equal(strings, ""), pa.scalar(None, pa.string()), strings)


def _numbers(column: pa.Array, name: str, where: _Where, first_row: int) -> np.ndarray:
    """A column as float32, by the same rules on every read path: a cell (a CSV's, a Parquet
    string's) is a number as Arrow's parser reads one (surrounding spaces aside) or a boolean;
    a blank or null is a missing value; a whole number up to 2^64 float32 can't hold exactly,
    or a finite value beyond its range, is refused."""
    import pyarrow as pa

    kind, source = column.type, where.source
    if _is_cells(kind):
        return _text_numbers(column, name, where, first_row)
    if pa.types.is_decimal(kind):
        # The number its text is, as in a CSV: exactly, where float64 would round
        # 12345678901234567890 before it could be checked.
        return _text_numbers(column.cast(pa.string()), name, where, first_row)
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
        raise InputError(f"data file {source!r}: column {name!r} holds {kind} values, not numbers")
    _refuse_missing(column, name, where, first_row)
    if pa.types.is_boolean(kind):  # 1 and 0
        column = column.cast(pa.float64())
    values = column.to_numpy(zero_copy_only=False)
    if (unfit := _first_unfit(values)) is not None:
        row, whole = unfit
        # The value as pyarrow's CSV writer writes it (the same cast), so every format says
        # the same.
        shown = column.slice(row, 1).cast(pa.string())[0].as_py()
        raise InputError(f"{where.cell(name, first_row + row)}: {_unfit(shown, whole)}")
    return values.astype(np.float32)


def _text_numbers(cells: pa.Array, name: str, where: _Where, first_row: int) -> np.ndarray:
    """Cells of text (a CSV's, a decimal's) as float32: a number as Arrow's float parser reads
    one, surrounding spaces aside, or a boolean as 1 or 0."""
    import pyarrow as pa
    import pyarrow.compute as pc

    try:  # the common case, every cell a bare number: trimming would change none of them
        parsed = cells.cast(pa.float64())
    except pa.ArrowInvalid:
        cells = _as_strings(cells, name, where, first_row)
        numbers = _booleans_as_digits(cells)
        try:
            parsed = numbers.cast(pa.float64())
        except pa.ArrowInvalid:
            row = _first_failing(numbers, lambda part: part.cast(pa.float64()))
            raise InputError(
                f"{where.cell(name, first_row + row)}: {cells[row].as_py()!r} is not a number"
            ) from None
    _refuse_missing(parsed, name, where, first_row)
    values = parsed.to_numpy(zero_copy_only=False)
    # Only a value beyond ±2^24 can be one float32 would change: a whole number it can't hold,
    # or a finite one (here: "1e400" too, which float64 already made infinite) beyond range.
    at = np.flatnonzero(np.abs(values) > FLOAT32_EXACT)
    if len(at):
        text = _as_strings(cells.take(pa.array(at)), name, where, first_row)
        inexact = _inexact_whole(values[at])
        # A cell written as digits is that integer exactly, not the float64 nearest it.
        integer = pc.match_substring_regex(text, INTEGER).to_numpy(zero_copy_only=False)
        inexact[integer] = _inexact_integer_cells(text.filter(pa.array(integer)))
        inf = pc.match_substring_regex(text, r"^[+-]?inf", ignore_case=True)
        infinite = np.isinf(values[at]) & ~inf.to_numpy(zero_copy_only=False)
        bad = inexact | infinite | _beyond_float32(values[at])
        if bad.any():
            k = int(np.argmax(bad))
            why = _unfit(text[k].as_py(), integer=bool(inexact[k]))
            raise InputError(f"{where.cell(name, first_row + int(at[k]))}: {why}")
    return values.astype(np.float32)


def _booleans_as_digits(strings: pa.Array) -> pa.Array:
    """Cells spelled as BOOLEANS as "1" and "0"; any other cell as it is."""
    import pyarrow as pa
    import pyarrow.compute as pc

    index = pc.index_in(strings, value_set=pa.array(list(BOOLEANS)))
    digits = pc.take(pa.array(list(BOOLEANS.values())), index)
    return pc.if_else(pc.is_null(index), strings, digits)


def _inexact_integer_cells(cells: pa.Array) -> np.ndarray:
    """`_inexact_integers` of cells written as integers (digits, a sign)."""
    import pyarrow as pa

    try:
        return _inexact_integers(cells.cast(pa.int64()).to_numpy())
    except pa.ArrowInvalid:  # beyond int64: Python's integers are exact at any size
        magnitudes = [abs(int(cell)) for cell in cells.to_pylist()]
        whole = [0 < n <= WHOLE_UP_TO and n // (n & -n) >= FLOAT32_EXACT for n in magnitudes]
        return np.array(whole, dtype=bool)


def _refuse_missing(column: pa.Array, name: str, where: _Where, first_row: int) -> None:
    if column.null_count:
        row = first_row + int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        line = where.line(row)
        # No count: a streamed read sees one block's, and both reads must say the same.
        raise InputError(
            f"data file {where.source!r}: column {name!r} has missing values, the first at "
            f"row {row}" + (f" (line {line})" if line is not None else "")
        )


def _first_failing(array: pa.Array, convert: Callable[[pa.Array], object]) -> int:
    """The index of the first element `convert` refuses (it refuses the whole array): by
    halves, with the very conversion that failed, so the cell named is the one it refused."""
    import pyarrow as pa

    lo, hi = 0, len(array)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            convert(array.slice(lo, mid - lo))
        except pa.ArrowInvalid:
            hi = mid
        else:
            lo = mid
    return lo


def _locate_bad_row(where: _Where, reason: str) -> str:
    """Where a CSV's parse fails: a row of the wrong length (Python's csv module: the slow,
    exact path after pyarrow refused the file)."""
    with contextlib.closing(_lines(where.f)) as lines:  # closed while the file is open
        rows = csv.reader(lines)
        next(rows, None)  # the header
        for line_no, row in enumerate(rows, start=2):
            if row and len(row) != len(where.header):
                return (
                    f"data file {where.source!r}: line {line_no} has {len(row)} fields, "
                    f"the header has {len(where.header)}"
                )
    return f"data file {where.source!r}: {reason}"


def _lines(f: IO[bytes]) -> Iterator[str]:
    """The file's text lines from its start, read by positional reads of its descriptor where
    it has one, so a parser reading ahead on another thread keeps its position; `f` stays
    open (a TextIOWrapper closes its file when it is collected, unless detached)."""
    try:
        raw: IO[bytes] = io.BufferedReader(_PositionalReader(f.fileno()))
        borrowed = False
    except (AttributeError, OSError, io.UnsupportedOperation):
        f.seek(0)
        raw, borrowed = f, True
    text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace", newline="")
    try:
        yield from text
    finally:
        if borrowed:
            # Closed meanwhile (Arrow closes a Python file its reader wrapped): nothing to keep.
            with contextlib.suppress(ValueError):
                text.detach()


class _PositionalReader(io.RawIOBase):
    """A descriptor's bytes from offset 0, by pread: never moves the descriptor's offset, and
    never closes it."""

    def __init__(self, fd: int):
        self._fd, self._offset = fd, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        chunk = os.pread(self._fd, len(buffer), self._offset)
        buffer[: len(chunk)] = chunk
        self._offset += len(chunk)
        return len(chunk)


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
