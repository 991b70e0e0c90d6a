"""Tables through pyarrow (tasks/data/tables.py): CSV, Parquet and Feather give the same tensors,
--features reads only its columns, and a text column is categorical from end to end: its
vocabulary comes from the training rows, model.pt2 takes ids, predict takes the raw text."""

from __future__ import annotations

import csv
import datetime
import decimal
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
import torch
from prefect.states import State

import trainflow.tasks.data.tables
from trainflow.flows.predict_flow import main as predict
from trainflow.flows.train_flow import main as train
from trainflow.tasks.cache.stage import using_cache
from trainflow.tasks.data.mapped import Scratch
from trainflow.tasks.data.sources import DataFile
from trainflow.tasks.data.splits import split_indices
from trainflow.tasks.data.stream import convert_to_map
from trainflow.tasks.data.tables import iter_columns
from trainflow.tasks.data.tensors import load_dataset, table_row_blocks, training_categories
from trainflow.tasks.engine.models import OneHot, initial_model, instantiate, model_spec
from trainflow.tasks.errors import InputError
from trainflow.tasks.load_tensors import load_tensors

from ..conftest import REPO
from ..test_export import _imported

TABLE = pa.table(
    {
        "a": [1.5, -2.0, 3.25, 0.0, 7.0],
        "color": ["red", "blue", "red", "green", "blue"],
        "n": [1, 2, 3, 4, 5],
        "y": [0.5, 1.0, -1.5, 2.0, 3.0],
    }
)
CSV_TEXT = "a,color,n,y\n1.5,red,1,0.5\n-2,blue,2,1\n3.25, red,3,-1.5\n0,green,4,2\n7,blue,5,3\n"


def _write(folder: Path, table: pa.Table = TABLE, text: str = CSV_TEXT) -> dict[str, Path]:
    paths = {
        ".parquet": folder / "t.parquet",
        ".feather": folder / "t.feather",
        ".arrow": folder / "t.arrow",
        ".csv": folder / "t.csv",
    }
    pq.write_table(table, paths[".parquet"])
    feather.write_feather(table, paths[".feather"])
    with pa.ipc.new_file(paths[".arrow"], table.schema) as writer:
        writer.write_table(table)
    paths[".csv"].write_text(text)
    return paths


def test_csv_parquet_and_feather_of_one_table_give_equal_tensors(tmp_path):
    loaded = {suffix: load_dataset(str(path)) for suffix, path in _write(tmp_path).items()}
    first = loaded[".csv"]
    assert first.feature_names == ("a", "color", "n") and first.target_names == ("y",)
    assert first.categories == {"color": ("blue", "green", "red")}
    # ids are 1 + the index in the sorted vocabulary; " red" in the CSV is "red"
    assert first.x[:, 1].tolist() == [3.0, 1.0, 3.0, 2.0, 1.0]
    assert first.x.dtype == first.y.dtype == torch.float32
    for suffix, data in loaded.items():
        assert torch.equal(data.x, first.x), suffix
        assert torch.equal(data.y, first.y), suffix
        assert data.feature_names == first.feature_names and data.categories == first.categories


def _key(path: Path, cache: Path, **options) -> str:
    """load-tensors' key for the file, run as the stage body (a hit answers a State)."""
    with using_cache(str(cache), "use"):
        out = load_tensors.fn(str(path), (), 100, 42, 0.1, **options)
    return (out.result() if isinstance(out, State) else out).cache_key


def test_cache_keys_differ_per_format_and_features_and_are_stable(tmp_path):
    paths = _write(tmp_path)
    cache = tmp_path / "cache"
    keys = {suffix: _key(path, cache) for suffix, path in paths.items()}
    assert len(set(keys.values())) == len(keys)
    assert all(key.startswith("load-tensors-") for key in keys.values())
    assert {suffix: _key(path, cache) for suffix, path in paths.items()} == keys  # hits
    subset = _key(paths[".parquet"], cache, features=("a",))
    assert subset not in keys.values()
    assert _key(paths[".parquet"], cache, features=("a",)) == subset
    copy = tmp_path / "copy.parquet"
    copy.write_bytes(paths[".parquet"].read_bytes())
    assert _key(copy, cache) == keys[".parquet"]  # by content, not by name


def test_features_read_only_their_columns(tmp_path):
    # A list column: reading it would fail conversion to numbers.
    table = TABLE.append_column("tags", pa.array([[1], [2], [], [3], [4]]))
    pq.write_table(table, tmp_path / "t.parquet")
    feather.write_feather(table, tmp_path / "t.feather")
    for name in ("t.parquet", "t.feather"):
        source = str(tmp_path / name)
        with pytest.raises(InputError, match=r"column 'tags' holds list<.*> values, not numbers"):
            load_dataset(source)
        data = load_dataset(source, ("y",), features=("n", "a"))
        assert data.feature_names == ("n", "a")
        assert data.x.tolist() == [[1, 1.5], [2, -2], [3, 3.25], [4, 0], [5, 7]]
    # A CSV is tokenized whole, but an unselected column's cells are never converted.
    source = tmp_path / "bad.csv"
    source.write_text("a,bad,y\n1,2,3\n4,oops,6\n")
    assert load_dataset(str(source), features=("a",)).x.tolist() == [[1.0], [4.0]]
    with pytest.raises(InputError, match=r"line 3, column 'bad': 'oops' is not a number"):
        load_dataset(str(source))


@pytest.mark.parametrize(
    ("features", "target", "message"),
    [
        (("zz",), (), "feature column 'zz' not found"),
        (("a", "a"), (), "appears twice"),
        (("a", "y"), (), "y both feature and target"),
    ],
)
def test_bad_feature_selections_are_one_line_errors(tmp_path, features, target, message):
    source = str(_write(tmp_path)[".parquet"])
    with pytest.raises(InputError, match=message) as info:
        load_dataset(source, target, features=features)
    assert repr(source) in str(info.value) and "\n" not in str(info.value)


def test_features_need_a_table(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.ones(2), y=np.ones(2))
    with pytest.raises(InputError, match=r"--features applies to tables"):
        load_dataset(str(path), features=("x",))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # A column mixing numbers and text is numbers with a bad cell, not a category.
        ("a,c,y\n1,2,1\n2,red,2\n", "line 3, column 'c': 'red' is not a number"),
        ("a,c,y\n1,red,1\n2,3,2\n", "line 2, column 'c': 'red' is not a number"),
        # Decimal commas are a number format we don't read, never a vocabulary.
        ('a,c,y\n1,"1,5",1\n2,"2,5",2\n', "line 2, column 'c': '1,5' is not a number"),
        # A text target: no categorical targets (yet).
        ("a,y\n1,cat\n2,dog\n", "line 2, column 'y': 'cat' is not a number"),
        ("a,c,y\n1,red,1\n2,blue\n", "line 3 has 2 fields, the header has 3"),
    ],
)
def test_bad_cells_are_named_by_line_and_column(tmp_path, text, message):
    source = tmp_path / "d.csv"
    source.write_text(text)
    with pytest.raises(InputError, match=message):
        load_dataset(str(source))


def test_typed_tables_name_the_bad_column(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"a": [1.0, 2.0], "y": ["x", "z"]}), path)
    # a text target is numbers with a bad cell, as in a CSV: the first cell that isn't one
    with pytest.raises(InputError, match=r"row 0, column 'y': 'x' is not a number$"):
        load_dataset(str(path))
    pq.write_table(pa.table({"a": [1.0, None, None], "y": [1.0, 2.0, 3.0]}), path)
    with pytest.raises(InputError, match=r"column 'a' has missing values, the first at row 1$"):
        load_dataset(str(path))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match=r"not a readable \.parquet file"):
        load_dataset(str(tmp_path / "junk.parquet"))


def test_bad_input_leaves_the_cache_as_it_was(tmp_path):
    paths = _write(tmp_path)
    cache = tmp_path / "cache"
    _key(paths[".parquet"], cache)
    before = {p: p.read_bytes() for p in cache.rglob("*") if p.is_file()}
    assert before
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"a": [1.0, 2.0], "y": ["x", "z"]}), bad)
    with pytest.raises(InputError):
        _key(bad, cache)
    assert {p: p.read_bytes() for p in cache.rglob("*") if p.is_file()} == before


def test_the_vocabulary_is_the_training_rows_and_the_rest_is_unknown(tmp_path):
    data = load_dataset(str(_write(tmp_path)[".csv"]))
    narrowed = training_categories(data, torch.tensor([0, 1, 4]))  # red, blue, blue
    assert narrowed.categories == {"color": ("blue", "red")}
    assert narrowed.x[:, 1].tolist() == [2.0, 1.0, 2.0, 0.0, 1.0]  # green: unknown (0)
    assert torch.equal(narrowed.x[:, [0, 2]], data.x[:, [0, 2]])
    plain = load_dataset("synthetic")
    assert training_categories(plain, torch.arange(10)) is plain  # the seed's path: untouched


def test_one_hot_puts_anything_outside_the_vocabulary_in_the_unknown_slot():
    layer = OneHot(3, ((1, 3),))
    x = torch.tensor([[5.0, 1, 7], [6, 2, 8], [7, 0, 9], [8, 3, 1], [9, -1, 2], [1, 1.5, 3]])
    x = torch.cat([x, torch.tensor([[0.0, float("nan"), 4]])])
    out = layer(x)
    assert out[:, 0].tolist() == x[:, 0].tolist() and out[:, 4].tolist() == x[:, 2].tolist()
    assert out[:, 1:4].argmax(1).tolist() == [1, 2, 0, 0, 0, 0, 0]
    assert out[:, 1:4].sum(1).tolist() == [1.0] * 7


def test_an_encoded_model_exports_and_standardizes_one_hot_slots():
    from trainflow.tasks.export_graph import export_program

    spec = model_spec("mlp", 3, 1, (4,), "relu", standardize=True, categories=((1, 3),))
    train_x = torch.tensor([[0.0, 1, 2], [1, 2, 3], [2, 1, 4], [3, 2, 5]])
    state = initial_model(spec, 7, train_x).state
    assert state["standardize.mean"].tolist() == [1.5, 0.0, 0.5, 0.5, 3.5]  # a, 3 slots, c
    model = instantiate(spec, state)
    program = export_program(model, train_x).module()
    rows = torch.tensor([[1.0, 9, 2], [2, 1, 3], [0, 2, 1]])
    assert torch.equal(program(rows), model(rows))


# --- end to end: train on text, predict on raw text -------------------------------------------


def _colored_table(path: Path, rows: int, seed: int, colors: list[str]) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    effect = {"red": 2.0, "green": -1.0, "blue": 0.5}
    lines = []
    for i in range(rows):
        a, color = float(rng.normal()), colors[i % len(colors)]
        lines.append([repr(a), color, repr(1 + a + effect.get(color, 0.0))])
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([["a", "color", "y"], *lines])
    return lines


@pytest.mark.usefixtures("prefect_api")
def test_a_categorical_column_round_trips_through_model_pt2_and_predict(tmp_path, capsys):
    rows = 60
    colors = ["red", "green", "blue"] * 20
    colors[int(split_indices(rows, 0.2, 13).val[0])] = "violet"  # a validation row's only
    data = tmp_path / "train.csv"
    _colored_table(data, rows, 1, colors)
    runs = tmp_path / "runs"
    args = ["--data", str(data), "--epochs", "20", "--runs-dir", str(runs), "--run-name", "m"]
    assert train([*args, "--no-cache", "--lr", "0.05"]) == 0
    run = runs / "m"
    columns = json.loads((run / "columns.json").read_text())
    assert columns == {
        "features": ["a", "color"],
        "targets": ["y"],
        "categories": {"color": ["blue", "green", "red"]},  # no violet: it is not a training row
    }

    # New rows with the same colours, one never seen ("cyan"), and Parquet: predict reads both.
    new = tmp_path / "new.csv"
    lines = _colored_table(new, 9, 2, ["red", "cyan", "blue", "green", "violet"])
    table = pa.table(
        {"color": [r[1] for r in lines], "a": [float(r[0]) for r in lines]}  # any column order
    )
    pq.write_table(table, tmp_path / "new.parquet")
    vocabulary = {"blue": 1, "green": 2, "red": 3}
    ids = torch.tensor([[float(r[0]), vocabulary.get(r[1], 0)] for r in lines])
    with torch.no_grad():
        expected = torch.export.load(run / "model.pt2").module()(ids)[:, 0].double().numpy()
    for source in (new, tmp_path / "new.parquet"):
        out = tmp_path / f"{source.stem}{source.suffix}.csv"
        assert predict(["--model", str(run), "--data", str(source), "--out", str(out)]) == 0
        got = np.array([float(r["prediction"]) for r in csv.DictReader(out.open())])
        assert np.array_equal(got.astype(np.float32), expected.astype(np.float32)), source
    assert sum(r[1] in ("cyan", "violet") for r in lines) == 3  # scored as unknown (id 0)
    capsys.readouterr()


def test_slow_loads_report_rows_and_speed(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(trainflow.tasks.data.tables, "PROGRESS_AFTER_S", 0.0)
    monkeypatch.setattr(trainflow.tasks.data.tables, "PROGRESS_EVERY_S", 0.0)
    source = _write(tmp_path)[".csv"]
    with caplog.at_level(logging.INFO, logger="trainflow.data"):
        load_dataset(str(source))
    messages = [r.getMessage() for r in caplog.records if r.name == "trainflow.data"]
    assert any("loading" in m and "MB/s" in m for m in messages), messages
    assert any(m.startswith(f"loaded {source}: 5 rows") and "MB/s" in m for m in messages)


def test_a_cached_run_on_a_table_never_imports_pyarrow(tmp_path, subprocess_env):
    source = _write(tmp_path)[".csv"]
    script = str(REPO / "flows" / "train_flow.py")
    command = [sys.executable, "-X", "importtime", script, "--data", str(source), "--epochs", "2"]
    command += ["--val-fraction", "0.4", "--runs-dir", "runs"]
    cold, cached = (
        subprocess.run(command, env=subprocess_env, capture_output=True, text=True, timeout=600)
        for _ in range(2)
    )
    assert cold.returncode == 0, cold.stderr[-3000:]
    assert "pyarrow" in _imported(cold.stderr)  # the check sees a read
    assert cached.returncode == 0, cached.stderr[-3000:]
    warnings = [line for line in cached.stderr.splitlines() if "WARNING" in line]
    assert re.search(r"^load-tensors\s+Cached\b", cached.stdout, re.MULTILINE), warnings
    assert not {name for name in _imported(cached.stderr) if name.split(".")[0] == "pyarrow"}


@pytest.mark.usefixtures("prefect_api")
def test_a_categorical_run_extended_from_its_checkpoint_equals_an_uninterrupted_one(tmp_path):
    from safetensors.torch import load_file

    from trainflow.flows.config import TrainConfig
    from trainflow.flows.train_flow import train_flow

    data = tmp_path / "train.csv"
    _colored_table(data, 40, 3, ["red", "green", "blue", "green"])

    def run(name: str, epochs: int, cache: str):
        config = TrainConfig(
            data=str(data),
            epochs=epochs,
            model="mlp",
            hidden=(4,),
            standardize=True,
            runs_dir=str(tmp_path / "runs"),
            run_name=name,
            cache_dir=str(tmp_path / cache),
        )
        return train_flow(config)

    run("short", 3, "shared")
    extended = run("extended", 6, "shared")
    assert extended.resumed_from == {"epoch": 3, "batch": 0} and extended.epochs_trained == 3
    whole = run("whole", 6, "own")
    assert whole.resumed_from is None
    weights = [load_file(Path(s.run_dir) / "model.safetensors") for s in (extended, whole)]
    assert weights[0].keys() == weights[1].keys() and "standardize.mean" in weights[0]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    losses = [json.loads((Path(s.run_dir) / "metrics.json").read_text()) for s in (extended, whole)]
    assert losses[0]["val_loss"] == losses[1]["val_loss"]


def test_missing_values_read_a_block_at_a_time_are_reported_as_read_whole(tmp_path):
    # Nulls in two blocks: a message built from the first block alone would count one.
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"a": [1.0, 2.0, None, 4.0, None, 6.0], "y": [1.0] * 6}), path)
    with pytest.raises(InputError) as whole:
        load_dataset(str(path))
    with path.open("rb") as f, pytest.raises(InputError) as streamed:
        list(iter_columns(f, ".parquet", str(path), ["a", "y"], {}, rows_per_block=2))
    assert str(streamed.value) == str(whole.value)
    assert str(whole.value).endswith("column 'a' has missing values, the first at row 2")


# --- one reading: every read path converts a cell alike --------------------------------------


def _every_read_path(
    path: Path,
    features: tuple[str, ...],
    targets: tuple[str, ...],
    categories: dict[str, tuple[str, ...]] | None = None,
) -> dict[str, tuple[list, list] | str]:
    """x and y as lists, or the error's message, from each way trainflow reads a table:
    training's whole file, predict's reader a few rows at a time, and (numbers only) the
    memory-mapped conversion."""
    source, out = str(path), {}

    def attempt(name, read):
        try:
            x, y = read()
            out[name] = (x.tolist(), y.tolist())
        except InputError as exc:
            out[name] = str(exc)

    def whole():
        data = load_dataset(source, targets, features=features)
        return data.x, data.y

    def streamed():
        with path.open("rb") as f:
            blocks = list(
                table_row_blocks(f, source, features, targets, categories or {}, rows_per_block=8)
            )
        return torch.cat([x for x, _ in blocks]), torch.cat([y for _, y in blocks])

    def mapped():
        with DataFile(source) as file:
            data = convert_to_map(file, path.suffix, targets, features, Scratch(None))
        return data.table.gather(torch.arange(len(data)))

    attempt("whole", whole)
    attempt("streamed", streamed)
    if categories is None:
        attempt("mapped", mapped)
    return out


def test_a_blank_text_cell_is_missing_and_unknown_in_every_format_and_read_path(tmp_path):
    # One table, as pyarrow writes it: a null is a blank CSV cell. A blank or spaces-only
    # string is missing too, so a Parquet "" and a CSV `""` agree.
    table = pa.table(
        {
            "a": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            "color": ["red", None, "blue", "", "  ", "red"],
            "y": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        }
    )
    paths = {suffix: tmp_path / f"t{suffix}" for suffix in (".csv", ".parquet", ".feather")}
    pa_csv.write_csv(table, paths[".csv"])
    pq.write_table(table, paths[".parquet"])
    feather.write_feather(table, paths[".feather"])
    vocabulary = {"color": ("blue", "red")}
    ids = [2.0, 0.0, 1.0, 0.0, 0.0, 2.0]
    for suffix, path in paths.items():
        data = load_dataset(str(path))
        assert data.categories == vocabulary, suffix
        assert data.x[:, 1].tolist() == ids, suffix
        read = _every_read_path(path, ("a", "color"), ("y",), vocabulary)
        assert read["whole"] == read["streamed"], suffix
        # predict's reader with any vocabulary, even one naming "": a blank is never a value
        with path.open("rb") as f:
            blocks = table_row_blocks(f, str(path), ("a", "color"), ("y",), {"color": ("",)}, 2)
            assert torch.cat([x for x, _ in blocks])[:, 1].tolist() == [0.0] * 6, suffix


NUMBERS = "a,y\n" + "".join(f"{i}.5,{i}\n" for i in range(300))


@pytest.mark.parametrize(
    ("cell", "read"),
    [
        ("1_000", "line 252, column 'a': '1_000' is not a number"),
        ("1 000", "line 252, column 'a': '1 000' is not a number"),
        ("١٢٣", "line 252, column 'a': '١٢٣' is not a number"),  # Arabic-Indic digits
        ('" 2.5 "', 2.5),  # surrounding spaces don't count, quoted or not
        ("+1e3", 1000.0),
        ("", "column 'a' has missing values, the first at row 250 (line 252)"),
    ],
)
def test_every_read_path_converts_a_cell_alike(tmp_path, cell, read):
    lines = NUMBERS.splitlines()
    lines[252 - 1] = f"{cell},250"
    path = tmp_path / "d.csv"
    path.write_text("\n".join(lines) + "\n")
    results = _every_read_path(path, ("a",), ("y",))
    if isinstance(read, str):
        expected = f"data file {str(path)!r}: {read}"
        assert results == {"whole": expected, "streamed": expected, "mapped": expected}
    else:
        assert results["whole"][0][250] == [read]
        assert results["whole"] == results["streamed"] == results["mapped"]


# Cells of plain numbers in every spelling Arrow's float parser takes, "-0" and an underflow
# to -0.0 among them; quoted and space-padded ones too.
PLAIN_SPELLINGS = (
    *("1.5", " 2.5 ", "\t3", "+3", "-0", ".5", "5.", "1e3", "1E-3", "1.0e+5", "+.5e-2"),
    *("0.1", "-1e-400", "1e-45", "00012", "16777216", "-16777216", '"7.25"'),
)


def test_a_csv_of_plain_numbers_is_parsed_once_and_reads_as_the_careful_reader_bit_for_bit(
    tmp_path, monkeypatch
):
    cells = PLAIN_SPELLINGS * 40
    path = tmp_path / "plain.csv"
    path.write_text("a,b,y\n" + "".join(f"{c},{i}.25,{i}\n" for i, c in enumerate(cells)))
    source = str(path)

    def bits(t: torch.Tensor) -> list[int]:
        return t.view(torch.int32).flatten().tolist()  # -0.0 is not 0.0 here

    # The one-pass parse: the block-by-block reader (pyarrow's streaming reader) is not used.
    with monkeypatch.context() as patch:
        patch.setattr(pa_csv, "open_csv", _fails("the one-pass read streamed"))
        whole = load_dataset(source)
    with path.open("rb") as f:
        blocks = list(table_row_blocks(f, source, ("a", "b"), ("y",), {}, rows_per_block=8))
    careful = torch.cat([x for x, _ in blocks]), torch.cat([y for _, y in blocks])
    assert bits(whole.x) == bits(careful[0]) and bits(whole.y) == bits(careful[1])
    assert bits(whole.x[:, 0][cells.index("-0") :: len(PLAIN_SPELLINGS)]) == [-(1 << 31)] * 40
    # Without the memory for the one-pass parse, the careful reader reads the file whole.
    monkeypatch.setattr(trainflow.tasks.data.tables, "available_memory", lambda: 1)
    read_carefully = load_dataset(source)
    assert bits(read_carefully.x) == bits(whole.x) and bits(read_carefully.y) == bits(whole.y)


def _fails(message: str):
    def fail(*args, **kwargs):
        raise AssertionError(message)

    return fail


INT64_BEYOND = 1_700_000_000_000_000_001  # a nanosecond timestamp: float32 would drop digits


@pytest.mark.parametrize(
    ("values", "kind", "message"),
    [
        ([INT64_BEYOND], pa.int64(), f"the integer {INT64_BEYOND} is not exact in float32"),
        ([16_777_217], pa.int64(), "the integer 16777217 is not exact in float32"),
        ([2**64 - 1], pa.uint64(), f"the integer {2**64 - 1} is not exact in float32"),
        ([1e300], pa.float64(), "1e+300 is beyond float32's range"),
        ([-1e39], pa.float64(), "-1e+39 is beyond float32's range"),
    ],
)
@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".feather"])
def test_a_number_float32_cannot_hold_is_one_line_naming_column_and_row_on_every_path(
    tmp_path, recwarn, values, kind, message, suffix
):
    rows = 40
    column = [1] * rows
    column[33] = values[0]
    table = pa.table({"a": pa.array(column, kind), "y": pa.array([1.0] * rows)})
    path = tmp_path / f"t{suffix}"
    if suffix == ".csv":
        pa_csv.write_csv(table, path)
        where = "line 35, column 'a'"
    else:
        (pq.write_table if suffix == ".parquet" else feather.write_feather)(table, path)
        where = "row 33, column 'a'"
    results = _every_read_path(path, ("a",), ("y",))
    (said,) = set(results.values())  # the same on every path
    assert said.startswith(f"data file {str(path)!r}: {where}: {message} ("), said
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize(
    ("values", "kind"),
    [
        ([16_777_216, -16_777_216], pa.int64()),  # float32 holds every integer up to 2^24
        ([30_000_000, 2**60], pa.int64()),  # and beyond, those with 24 significant bits
        ([16_777_217.5, 3.4e38], pa.float64()),  # a float rounds to float32, as any float does
    ],
)
@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_numbers_float32_holds_read_alike_on_every_path(tmp_path, values, kind, suffix):
    table = pa.table({"a": pa.array(values, kind), "y": pa.array([1.0] * len(values))})
    path = tmp_path / f"t{suffix}"
    (pa_csv.write_csv if suffix == ".csv" else pq.write_table)(table, path)
    results = _every_read_path(path, ("a",), ("y",))
    expected = [[float(np.float32(v))] for v in values]
    assert results["whole"][0] == expected, results
    assert results["whole"] == results["streamed"] == results["mapped"]


@pytest.mark.parametrize(
    ("cells", "message"),
    [
        (f"{INT64_BEYOND},1\n", f"line 3, column 'ts': the integer {INT64_BEYOND} is not exact"),
        ("1e300,1\n", "line 3, column 'ts': 1e300 is beyond float32's range"),
    ],
)
def test_a_number_float32_cannot_hold_is_exit_2_one_line_and_writes_nothing(
    tmp_path, subprocess_env, cells, message
):
    source = tmp_path / "d.csv"
    source.write_text("ts,y\n1,1\n" + cells + "2,2\n3,3\n")
    command = [sys.executable, str(REPO / "flows" / "train_flow.py"), "--data", str(source)]
    command += ["--runs-dir", "runs", "--cache-dir", "cache", "--epochs", "1"]
    done = subprocess.run(command, env=subprocess_env, capture_output=True, text=True, timeout=600)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-3000:]
    assert err[-1].startswith(f"train_flow.py: error: data file {str(source)!r}: {message}")
    assert "Traceback" not in done.stderr and "RuntimeWarning" not in done.stderr
    assert not any(p.is_file() for p in tmp_path.rglob("*") if p != source)


# --- one table, one set of tensors: a typed column means what its CSV text means ------------

ROWS = 6


def _one_table_cases() -> list:
    """(column a's values as pyarrow writes them to every format, what every read gives):
    numbers (a's floats), the vocabulary "as written" (its CSV cells), or the one-line
    error."""

    def at_row_3(value, filler, kind=None):
        values = [filler] * ROWS
        values[3] = value
        return pa.array(values, kind)

    big = 12_345_678_901_234_567_890
    stamp = datetime.datetime(2024, 1, 2, 3, 4, 5, 123456)
    zips = ["10001", "10002", "10003"] * 2
    return [
        pytest.param(pa.array([True, False] * 3), [1.0, 0.0] * 3, id="bool"),
        pytest.param(
            at_row_3(16_777_217.0, 1.0), "the integer 16777217 is not exact", id="whole-float"
        ),
        pytest.param(
            at_row_3(2.0**60 + 2.0**12, 1.0),
            "the integer 1.152921504606851e+18 is not exact",
            id="whole-float-beyond-2^53",
        ),
        pytest.param(
            at_row_3(decimal.Decimal(big), decimal.Decimal(1), pa.decimal128(20, 0)),
            f"the integer {big} is not exact",
            id="decimal-integer",
        ),
        pytest.param(
            at_row_3(decimal.Decimal("16777217.00"), decimal.Decimal(1), pa.decimal128(12, 2)),
            "the integer 16777217.00 is not exact",
            id="decimal-whole",
        ),
        pytest.param(
            at_row_3(decimal.Decimal("16777217.25"), decimal.Decimal(1), pa.decimal128(12, 2)),
            [1.0, 1.0, 1.0, float(np.float32(16_777_217.25)), 1.0, 1.0],
            id="decimal-fraction-rounds",
        ),
        pytest.param(
            at_row_3(decimal.Decimal(10**20 + 1), decimal.Decimal(1), pa.decimal128(21, 0)),
            [1.0, 1.0, 1.0, float(np.float32(1e20)), 1.0, 1.0],
            id="integer-beyond-2^64-rounds",
        ),
        pytest.param(
            at_row_3(2.0**60, 0.5), [0.5, 0.5, 0.5, 2.0**60, 0.5, 0.5], id="float32-holds-2^60"
        ),
        pytest.param(
            pa.array([1, 2, 1, 5, 2, 1]).dictionary_encode(),
            [1.0, 2.0, 1.0, 5.0, 2.0, 1.0],
            id="dictionary-of-int64",
        ),
        pytest.param(
            pa.array(["b", "a", "b", "c", "a", "b"]).dictionary_encode(),
            "as written",
            id="dict-str",
        ),
        pytest.param(
            pa.array([datetime.date(2024, 1, d % 3 + 1) for d in range(ROWS)], pa.date32()),
            "as written",
            id="date32",
        ),
        pytest.param(
            pa.array([stamp + datetime.timedelta(seconds=d % 2) for d in range(ROWS)]),
            "as written",
            id="timestamp",
        ),
        pytest.param(pa.array([stamp.time()] * ROWS, pa.time64("us")), "as written", id="time64"),
        pytest.param(
            pa.array([1, 2, 3, 4, 5, 6], pa.duration("s")),
            [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            id="duration",
        ),
        # A text column is judged by its cells, as a CSV's is: numbers once a cell looks like one.
        pytest.param(pa.array(zips), [float(z) for z in zips], id="string-of-numbers"),
        pytest.param(
            pa.array(zips, pa.large_string()), [float(z) for z in zips], id="large-string"
        ),
        pytest.param(
            pa.array(zips).dictionary_encode(), [float(z) for z in zips], id="dict-str-numbers"
        ),
        pytest.param(pa.array(["true", "false"] * 3), [1.0, 0.0] * 3, id="string-booleans"),
        pytest.param(at_row_3("1,5", "1"), "'1,5' is not a number", id="string-bad-cell"),
        pytest.param(pa.array([z.encode() for z in zips]), [float(z) for z in zips], id="binary"),
        pytest.param(pa.array([b"red", b"blue", b"red"] * 2), "as written", id="binary-text"),
        pytest.param(pa.array([None] * ROWS), "as written", id="all-null"),
    ]


def _same_place(message: str) -> str:
    """The error with its place as a row: a CSV's line L is data row L - 2."""
    return re.sub(r"line (\d+)", lambda m: f"row {int(m[1]) - 2}", message)


@pytest.mark.parametrize(("column", "read"), _one_table_cases())
def test_one_table_written_by_pyarrow_reads_alike_in_every_format_and_read_path(
    tmp_path, recwarn, column, read
):
    table = pa.table({"a": column, "y": pa.array([float(i) for i in range(ROWS)])})
    paths = {suffix: tmp_path / f"t{suffix}" for suffix in (".csv", ".parquet", ".feather")}
    pa_csv.write_csv(table, paths[".csv"])
    pq.write_table(table, paths[".parquet"])
    feather.write_feather(table, paths[".feather"])
    with paths[".csv"].open(newline="") as f:
        written = [row[0] for row in list(csv.reader(f))[1:]]
    if read == "as written":  # categorical: the vocabulary is the CSV writer's text
        vocabulary = {"a": tuple(sorted({cell for cell in written if cell}))}
        # a blank cell (a null) is missing: unknown, id 0
        ids = [[1.0 + vocabulary["a"].index(cell) if cell else 0.0] for cell in written]
    for suffix, path in paths.items():
        if read == "as written":
            assert load_dataset(str(path)).categories == vocabulary, suffix
            results = _every_read_path(path, ("a",), ("y",), vocabulary)
            assert results["whole"][0] == results["streamed"][0] == ids, (suffix, results)
            # the memory-mapped path takes numbers only: a categorical column is refused
            with DataFile(str(path)) as file, pytest.raises(InputError, match="'a'"):
                convert_to_map(file, suffix, ("y",), ("a",), Scratch(None))
        elif isinstance(read, str):
            results = _every_read_path(path, ("a",), ("y",))
            said = {_same_place(str(message)) for message in results.values()}
            tail = "" if read.endswith("is not a number") else " in float32 ("
            expected = f"data file {str(path)!r}: row 3, column 'a': {read}{tail}"
            assert len(said) == 1 and said.pop().startswith(expected), (suffix, results)
        else:
            results = _every_read_path(path, ("a",), ("y",))
            assert results["whole"][0] == [[v] for v in read], (suffix, results)
            assert results["whole"] == results["streamed"] == results["mapped"], suffix
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".feather"])
def test_a_string_column_is_numbers_once_any_block_holds_a_number(tmp_path, suffix):
    # Text in the first blocks, a number in the last: not categorical on any read path, in any
    # format, so its first text cell is the bad cell.
    cells = ["red"] * 20 + ["5"]
    table = pa.table({"a": pa.array(cells), "y": pa.array([1.0] * len(cells))})
    path = tmp_path / f"t{suffix}"
    if suffix == ".csv":
        pa_csv.write_csv(table, path)
    elif suffix == ".parquet":
        pq.write_table(table, path, row_group_size=4)
    else:
        feather.write_feather(table, path, chunksize=4)
    results = _every_read_path(path, ("a",), ("y",))
    said = {_same_place(str(message)) for message in results.values()}
    assert said == {f"data file {str(path)!r}: row 0, column 'a': 'red' is not a number"}
