"""Batch prediction (flows/predict_flow.py, tasks/predict.py): what it writes is what the
exported model says, it never scores the same model and data twice, and bad input writes
nothing."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from flows.predict_flow import main as predict
from flows.train_flow import main as train
from tasks.data import table_row_blocks
from tasks.errors import InputError, StorageError
from tasks.predict import (
    ModelRun,
    Scores,
    latest_run,
    metrics,
    output_bytes,
    prediction_blocks,
    prediction_columns,
    read_run,
    row_blocks,
    score_rows,
    write_blocks,
    write_output,
)
from tasks.sources import DataFile
from tasks.tables import read_columns

# --- pure logic, no Prefect -------------------------------------------------------------------


def _run(loss: str, targets: tuple[str, ...] = ("y",)) -> ModelRun:
    return ModelRun("/nowhere", ("a", "b"), targets, {"loss": loss}, "0" * 32)


def test_regression_predictions_are_the_outputs():
    outputs = torch.tensor([[1.5], [-2.0]])
    columns = prediction_columns(Scores(outputs, {}), _run("mse"))
    assert list(columns) == ["row", "prediction"]
    assert columns["row"].tolist() == [0, 1]
    assert columns["prediction"].tolist() == [1.5, -2.0]


def test_several_targets_get_a_column_each():
    columns = prediction_columns(Scores(torch.ones(3, 2), {}), _run("mse", ("p", "q")))
    assert list(columns) == ["row", "prediction_p", "prediction_q"]


def test_cross_entropy_predicts_the_likeliest_class_with_its_probabilities():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    columns = prediction_columns(Scores(logits, {}), _run("cross_entropy"))
    assert list(columns) == ["row", "prediction", "prob_0", "prob_1", "prob_2"]
    assert columns["prediction"].tolist() == [1, 0]
    probs = np.column_stack([columns[f"prob_{c}"] for c in range(3)])
    assert np.allclose(probs, torch.softmax(logits.double(), 1).numpy())
    assert np.allclose(probs.sum(1), 1)


def test_binary_logits_predict_class_one_above_one_half():
    logits = torch.tensor([[-1.0], [0.5]])
    columns = prediction_columns(Scores(logits, {}), _run("bce_with_logits"))
    assert columns["prediction"].tolist() == [0, 1]
    assert np.allclose(columns["prob_1"], torch.sigmoid(logits.double())[:, 0].numpy())
    assert np.allclose(columns["prob_0"] + columns["prob_1"], 1)


def test_metrics_match_an_independent_computation():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(50, 1))
    out = y + rng.normal(scale=0.1, size=(50, 1))
    m = metrics(torch.tensor(out, dtype=torch.float32), torch.tensor(y, dtype=torch.float32), "mse")
    assert m["mae"] == pytest.approx(np.abs(out - y).mean(), rel=1e-5)
    r2 = 1 - ((out - y) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    assert m["r2"] == pytest.approx(r2, rel=1e-5)
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    classes = torch.tensor([[0.0], [1.0], [1.0]])
    assert metrics(logits, classes, "cross_entropy")["accuracy"] == pytest.approx(2 / 3)


def _hard_floats(n: int) -> np.ndarray:
    """Values whose shortest round-trip text is long or odd: random doubles, a subnormal,
    huge and tiny exponents, negative zero."""
    edge = [0.1, 1e-30, 12345.678901, 5e-324, 1.7976931348623157e308, -0.0, 2.0**-1074 * 3]
    return np.concatenate([edge, np.random.default_rng(0).standard_normal(n) * 1e3])


def test_a_csv_output_reads_back_exactly():
    values = _hard_floats(1000)
    columns = {"row": np.arange(len(values)), "prediction": values}
    text = output_bytes(columns, ".csv").decode()
    assert text.splitlines()[0] == "row,prediction"  # a plain header, as a spreadsheet writes
    table = list(csv.DictReader(io.StringIO(text)))
    assert [r["row"] for r in table] == [str(i) for i in range(len(values))]  # ids, not floats
    assert np.array_equal([float(r["prediction"]) for r in table], values)
    assert np.array_equal(np.signbit([float(r["prediction"]) for r in table]), np.signbit(values))


def test_a_column_name_that_needs_quotes_keeps_the_csv_readable():
    columns = {"row": np.arange(2), 'prediction_"a,b"': np.array([1.5, 2.5])}
    table = list(csv.DictReader(io.StringIO(output_bytes(columns, ".csv").decode())))
    assert [r['prediction_"a,b"'] for r in table] == ["1.5", "2.5"]


def test_a_parquet_output_reads_back_exactly():
    values = _hard_floats(100)
    columns = {"row": np.arange(len(values)), "prediction": values, "prob_0": values / 2}
    table = pq.read_table(io.BytesIO(output_bytes(columns, ".parquet")))
    assert table.column_names == list(columns)
    assert table.schema.field("row").type == "int64"
    for name, column in columns.items():
        assert np.array_equal(table[name].to_numpy(), column)


def _scored(text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What predict reads of a CSV, its blocks joined."""
    blocks = list(table_row_blocks(io.BytesIO(text.encode()), "t.csv", ("a", "b"), ("y",), {}, 2))
    y = [y for _, y in blocks]
    return torch.cat([x for x, _ in blocks]), None if y[0] is None else torch.cat(y)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a,y\n1,2\n", "missing column(s) b"),
        ("a,b,c\n1,2,3\n", "unexpected column(s) c"),
        ("a,b,y\n1,2,x\n", "line 2, column 'y'"),
    ],
)
def test_columns_that_do_not_match_the_model_are_named(text, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _scored(text)


def test_features_are_taken_by_name_in_the_models_order():
    x, y = _scored("b,a\n2,1\n4,3\n")
    assert x.tolist() == [[1, 2], [3, 4]]
    assert y is None


# --- a block at a time: a table larger than memory --------------------------------------------


def _streamed_table(folder: Path, suffix: str, rows: int = 1000, bad_row: int | None = None):
    """A table with a categorical column (and a value no training row had), as `suffix`."""
    import pyarrow as pa
    import pyarrow.feather as feather

    rng = np.random.default_rng(7)
    table = {
        "b": rng.normal(size=rows).astype(str).tolist(),
        "color": rng.choice(["red", "blue", "violet"], size=rows).tolist(),
        "a": rng.normal(size=rows).tolist(),
        "y": rng.normal(size=rows).tolist(),
    }
    if bad_row is not None:
        table["b"][bad_row] = "oops"
    path = folder / f"t{suffix}"
    if suffix == ".csv":
        lines = ["b,color,a,y", *(",".join(str(table[c][i]) for c in table) for i in range(rows))]
        path.write_text("\n".join(lines) + "\n")
        return path
    arrow = pa.table({**table, "b": [float(v) for v in table["b"]]})
    if suffix == ".parquet":
        pq.write_table(arrow, path, row_group_size=100)  # several row groups, as a big file has
    else:
        feather.write_feather(arrow, path, chunksize=100)
    return path


COLORS = {"color": ("blue", "red")}  # the training rows' vocabulary: no violet


@pytest.fixture(scope="module")
def categorical_model(tmp_path_factory) -> ModelRun:
    """A program over (a, color id, b), exported here: scoring needs no training for this."""
    folder = tmp_path_factory.mktemp("model")
    model = torch.nn.Sequential(torch.nn.Linear(3, 1))
    torch.nn.init.normal_(model[0].weight, generator=torch.Generator().manual_seed(0))
    program = torch.export.export(
        model, (torch.ones(4, 3),), dynamic_shapes=({0: torch.export.Dim("rows")},)
    )
    torch.export.save(program, folder / "model.pt2")
    return ModelRun(str(folder), ("a", "color", "b"), ("y",), {"loss": "mse"}, "0" * 32, COLORS)


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".feather"])
def test_scoring_a_block_at_a_time_equals_scoring_the_whole_table(
    tmp_path, categorical_model, suffix
):
    path = _streamed_table(tmp_path, suffix)
    with DataFile(str(path)) as file:
        blocks = list(row_blocks(file, categorical_model, rows_per_block=37))
        assert len(blocks) > 5  # the small blocks were asked for, and read
        whole = score_rows(categorical_model, file, 16, "cpu", rows_per_block=10**7)
        streamed = score_rows(categorical_model, file, 16, "cpu", rows_per_block=37)
    with path.open("rb") as f:  # the whole table at once, as training reads one
        names = (*categorical_model.features, "y")
        table = read_columns(f, suffix, str(path), names, frozenset(COLORS), COLORS).values
    x, y = torch.from_numpy(table[:, :3].copy()), torch.from_numpy(table[:, 3:].copy())
    assert torch.equal(torch.cat([x_block for x_block, _ in blocks]), x)
    assert torch.equal(torch.cat([y_block for _, y_block in blocks]), y)
    assert set(x[:, 1].tolist()) == {0.0, 1.0, 2.0}  # violet: unknown (0), never an error
    assert torch.equal(streamed.outputs, whole.outputs)
    assert streamed.metrics == whole.metrics
    # The program's batches are exactly batch_size rows whatever the blocks: one whole call
    # per batch of the table read at once gives the same bits.
    module = torch.export.load(categorical_model.program).module()
    with torch.no_grad():
        by_hand = torch.cat([module(x[i : i + 16]) for i in range(0, len(x), 16)])
    assert torch.equal(streamed.outputs, by_hand)


def test_a_column_of_integers_then_a_decimal_streams_as_the_whole_table_reads(
    tmp_path, categorical_model
):
    # A streaming CSV parser fixes a column's type from its first block: integers there and
    # "1.5" in a later block would fail, where the whole-table read finds doubles.
    path = tmp_path / "ints.csv"
    rows = [f"{i},red,{-i},{i}" for i in range(3000)] + ["1.5,blue,2.5,3.5"]
    path.write_text("b,color,a,y\n" + "\n".join(rows) + "\n")
    with DataFile(str(path)) as file:
        assert len(list(row_blocks(file, categorical_model, rows_per_block=37))) > 5
        whole = score_rows(categorical_model, file, 16, "cpu", rows_per_block=10**7)
        streamed = score_rows(categorical_model, file, 16, "cpu", rows_per_block=37)
    assert torch.equal(streamed.outputs, whole.outputs)
    with path.open("rb") as f:
        names = (*categorical_model.features, "y")
        table = read_columns(f, ".csv", str(path), names, frozenset(COLORS), COLORS).values
    assert table[-1].tolist() == [2.5, 1.0, 1.5, 3.5]  # a, color (blue: id 1), b, y


def test_a_bad_cell_deep_in_a_streamed_csv_names_its_line_and_column(tmp_path, categorical_model):
    path = _streamed_table(tmp_path, ".csv", bad_row=900)
    with DataFile(str(path)) as file, pytest.raises(InputError) as error:
        score_rows(categorical_model, file, 16, "cpu", rows_per_block=37)
    where = f"data file {str(path)!r}: line 902, column 'b'"
    assert str(error.value) == f"{where}: 'oops' is not a number"


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".npz"])
def test_an_output_written_a_block_at_a_time_equals_one_written_whole(suffix):
    outputs = torch.from_numpy(np.random.default_rng(3).normal(size=(1000, 3)).astype(np.float32))
    scores, run = Scores(outputs, {}), _run("cross_entropy")
    buffer = io.BytesIO()
    write_blocks(buffer, prediction_blocks(scores, run, rows_per_block=64), suffix)
    whole = output_bytes(prediction_columns(scores, run), suffix)
    if suffix == ".csv":
        assert buffer.getvalue() == whole  # one header, rows numbered across the blocks
    elif suffix == ".parquet":
        streamed = pq.read_table(io.BytesIO(buffer.getvalue()))
        assert streamed.equals(pq.read_table(io.BytesIO(whole)))
    else:
        streamed, single = np.load(io.BytesIO(buffer.getvalue())), np.load(io.BytesIO(whole))
        assert streamed.files == single.files
        assert all(np.array_equal(streamed[name], single[name]) for name in single.files)


@pytest.mark.parametrize("folder", ["memory", "local"])
def test_an_output_is_whole_or_absent_when_a_block_fails_midway(tmp_path, folder):
    import fsspec

    scores, run = Scores(torch.arange(300.0).reshape(-1, 1), {}), _run("mse")
    url = "memory://predictions/p.csv" if folder == "memory" else str(tmp_path / "p.csv")
    write_output(url, prediction_blocks(scores, run, rows_per_block=64))
    fs, path = fsspec.core.url_to_fs(url)
    assert fs.cat_file(path) == output_bytes(prediction_columns(scores, run), ".csv")

    def failing():
        blocks = prediction_blocks(Scores(scores.outputs + 1, {}), run, rows_per_block=64)
        yield next(blocks)
        raise OSError(28, "No space left on device")

    with pytest.raises(StorageError, match="cannot write the output"):
        write_output(url, failing())
    # The first output stays as it was, and no temporary file is left beside it.
    assert fs.cat_file(path) == output_bytes(prediction_columns(scores, run), ".csv")
    names = [Path(entry).name for entry in fs.ls(str(Path(path).parent), detail=False)]
    assert names == ["p.csv"]
    if folder == "memory":
        fs.rm(path)


def test_latest_is_the_newest_completed_run(tmp_path):
    for name, complete in (("old", True), ("new", True), ("running", False)):
        folder = tmp_path / name
        folder.mkdir()
        for file in ("model.pt2", "config.json", "columns.json"):
            (folder / file).write_text("{}")
        if complete:
            (folder / "metrics.json").write_text("{}")
    os.utime(tmp_path / "old" / "metrics.json", ns=(1, 1))
    assert latest_run(tmp_path).name == "new"
    with pytest.raises(InputError, match="no completed run"):
        latest_run(tmp_path / "missing")


def test_a_folder_that_is_not_a_finished_run_is_named(tmp_path):
    with pytest.raises(InputError, match=r"not a finished training run \(missing model.pt2"):
        read_run(tmp_path)


# --- the flow ---------------------------------------------------------------------------------


def _table(path: Path, rows: int, seed: int, target: bool = True) -> Path:
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=rows), rng.normal(size=rows)
    header = "b,a,y" if target else "b,a"  # not the training order: columns go by name
    lines = [header] + [
        f"{float(b[i])!r},{float(a[i])!r}" + (f",{float(1 + 2 * a[i] - b[i])!r}" if target else "")
        for i in range(rows)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def trained(prefect_api, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    data = root / "train.csv"
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=80), rng.normal(size=80)
    data.write_text(
        "a,b,y\n" + "".join(f"{a[i]},{b[i]},{1 + 2 * a[i] - b[i]}\n" for i in range(80))
    )
    args = ["--data", str(data), "--epochs", "30", "--runs-dir", str(root / "runs")]
    assert train([*args, "--run-name", "model", "--cache-dir", str(root / "cache")]) == 0
    return root / "runs" / "model"


def _expected(run: Path, table: Path) -> np.ndarray:
    """model.pt2 applied here, by hand, to the file's columns in the model's order."""
    rows = list(csv.DictReader(table.open()))
    x = torch.tensor([[float(r["a"]), float(r["b"])] for r in rows], dtype=torch.float32)
    with torch.no_grad():
        return torch.export.load(run / "model.pt2").module()(x)[:, 0].double().numpy()


def _read(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open()))


@pytest.mark.usefixtures("prefect_api")
def test_predictions_equal_the_exported_model_and_a_rerun_is_cached(trained, tmp_path, capsys):
    table = _table(tmp_path / "new.csv", rows=1000, seed=2, target=False)
    out = tmp_path / "out" / "p.csv"
    args = ["--model", str(trained), "--data", str(table), "--out", str(out), "--batch-size", "64"]
    args += ["--cache-dir", str(tmp_path / "cache")]
    assert predict(args) == 0
    rows = _read(out)
    assert [int(r["row"]) for r in rows] == list(range(1000))
    got = np.array([float(r["prediction"]) for r in rows])
    assert np.array_equal(got.astype(np.float32), _expected(trained, table).astype(np.float32))
    first = capsys.readouterr().out
    assert "score          Completed" in first
    out.unlink()
    assert predict(args) == 0
    assert "score          Cached" in capsys.readouterr().out
    assert _read(out) == rows
    # The cached scores in another format: the same numbers, bit for bit.
    parquet = tmp_path / "p.parquet"
    assert predict([*args[: args.index("--out")], "--out", str(parquet), *args[-4:]]) == 0
    written = pq.read_table(parquet)
    assert written["row"].to_pylist() == list(range(1000))
    assert np.array_equal(written["prediction"].to_numpy(), got)


@pytest.mark.usefixtures("prefect_api")
def test_with_targets_the_metrics_are_reported(trained, tmp_path, capsys):
    table = _table(tmp_path / "labelled.csv", rows=200, seed=3)
    out = tmp_path / "p.npz"
    args = ["--model", str(trained), "--data", str(table), "--out", str(out), "--no-cache"]
    assert predict(args) == 0
    printed = capsys.readouterr().out
    reported = dict(
        re.findall(r"(\w+) ([-+.\deE]+)", printed.split("metrics: ")[1].splitlines()[0])
    )
    # An independent computation: the written predictions against the file's targets, read
    # as float32 the way training reads them.
    y = np.array([float(r["y"]) for r in _read(table)], dtype=np.float32).astype(np.float64)
    pred = np.load(out)["prediction"]
    assert float(reported["mae"]) == pytest.approx(np.abs(pred - y).mean(), rel=1e-4)
    r2 = 1 - ((pred - y) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    assert float(reported["r2"]) == pytest.approx(r2, rel=1e-6)


@pytest.mark.usefixtures("prefect_api")
def test_latest_scores_with_the_newest_run_into_its_folder(trained, capsys):
    assert predict(["--model", "latest", "--runs-dir", str(trained.parent), "--no-cache"]) == 0
    out = trained / "predictions.csv"
    assert len(_read(out)) == 80  # without --data: the 80 rows the run was trained on
    assert f"with {trained}" in capsys.readouterr().out


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.usefixtures("prefect_api")
@pytest.mark.parametrize(
    ("case", "message", "code"),
    [
        ("missing-model", "--model .*nope: no such run folder", 2),
        ("extra-column", "unexpected column\\(s\\) c", 2),
        ("unwritable-output", "cannot write the output", 1),
        ("bad-format", "--out: must be a .csv, .parquet or .npz file", 2),
        ("synthetic-for-two-features", "--data synthetic: the model takes a, b, synthetic", 2),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(trained, tmp_path, capsys, case, message, code):
    table = _table(tmp_path / "t.csv", rows=20, seed=4, target=False)
    model, out = str(trained), str(tmp_path / "out.csv")
    if case == "missing-model":
        model = str(tmp_path / "nope")
    elif case == "extra-column":
        table.write_text("a,b,c\n1,2,3\n")
    elif case == "unwritable-output":
        blocker = tmp_path / "blocker"
        blocker.write_text("a file, not a folder")
        out = str(blocker / "out.csv")
    elif case == "bad-format":
        out = str(tmp_path / "out.txt")
    elif case == "synthetic-for-two-features":
        table = "synthetic"
    cache = tmp_path / "cache"
    before = _files(tmp_path)
    with pytest.raises(SystemExit) if case == "bad-format" else contextlib.nullcontext():
        result = predict(
            ["--model", model, "--data", str(table), "--out", out, "--cache-dir", str(cache)]
        )
        assert result == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err and re.search(message, err[-1]), err
    assert _files(tmp_path) == before  # no output, no cache entry, nothing half-written


def test_the_run_folder_records_its_columns(trained):
    assert json.loads((trained / "columns.json").read_text()) == {
        "features": ["a", "b"],
        "targets": ["y"],
    }


@pytest.mark.usefixtures("prefect_api")
def test_the_same_program_under_another_column_order_is_scored_again(trained, tmp_path):
    """The cache keys the model by its program's bytes *and* its column schema: a run folder
    whose columns.json names the features in another order (the same model.pt2 bytes) must
    not be served the first folder's scores."""
    twin = tmp_path / "twin"
    shutil.copytree(trained, twin)
    (twin / "columns.json").write_text(json.dumps({"features": ["b", "a"], "targets": ["y"]}))
    table = _table(tmp_path / "t.csv", rows=50, seed=5, target=False)
    cache = str(tmp_path / "cache")
    outs = []
    for folder in (trained, twin):
        out = tmp_path / f"{folder.name}.csv"
        args = ["--model", str(folder), "--data", str(table), "--out", str(out)]
        assert predict([*args, "--cache-dir", cache]) == 0
        outs.append([float(r["prediction"]) for r in _read(out)])
    assert outs[0] != outs[1]  # b and a swapped in: other numbers, not a cache hit
