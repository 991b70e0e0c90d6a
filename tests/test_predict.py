"""Batch prediction (flows/predict_flow.py, tasks/predict.py): what it writes is what the
exported model says, it never scores the same model and data twice, and bad input writes
nothing."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from trainflow.flows.predict_flow import main as predict
from trainflow.flows.train_flow import main as train
from trainflow.tasks.data.sources import DataFile
from trainflow.tasks.data.tables import read_columns
from trainflow.tasks.data.tensors import table_row_blocks
from trainflow.tasks.data.writers import output_bytes, write_blocks, write_output
from trainflow.tasks.engine.models import ModelSpec, instantiate
from trainflow.tasks.errors import InputError, StorageError
from trainflow.tasks.predict import (
    Scores,
    metrics,
    prediction_blocks,
    prediction_columns,
    row_blocks,
    score_rows,
)
from trainflow.tasks.runs.finder import ModelRun, latest_run, read_run

# --- pure logic, no Prefect -------------------------------------------------------------------


def _run(loss: str, targets: tuple[str, ...] = ("y",)) -> ModelRun:
    spec = ModelSpec("linear", 2, len(targets))
    return ModelRun("/nowhere", ("a", "b"), targets, {"loss": loss}, spec, "0" * 32)


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
    """A linear model over (a, color id, b), its weights and spec written here: scoring needs
    no training for this."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("model")
    spec = ModelSpec("linear", 3, 1)
    weight = torch.randn(1, 3, generator=torch.Generator().manual_seed(0))
    save_file({"0.weight": weight, "0.bias": torch.zeros(1)}, folder / "model.safetensors")
    (folder / "spec.json").write_text(json.dumps(dataclasses.asdict(spec)))
    (folder / "config.json").write_text(json.dumps({"loss": "mse"}))
    columns = {"features": ["a", "color", "b"], "targets": ["y"], "categories": COLORS}
    (folder / "columns.json").write_text(json.dumps(columns))
    return read_run(folder)


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
    # The model's batches are exactly batch_size rows whatever the blocks: one whole call
    # per batch of the table read at once gives the same bits.
    folder = Path(categorical_model.folder)
    state = load_file(folder / "model.safetensors")
    module = instantiate(categorical_model.spec, state).eval()
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


@pytest.fixture
def disk_store(tmp_path, monkeypatch) -> str:
    """An object store stand-in: a filesystem that fsspec does not count as local (so an
    output goes there by one upload, as to S3), keeping its files in a folder."""
    import fsspec
    from fsspec.implementations.dirfs import DirFileSystem
    from fsspec.implementations.local import LocalFileSystem

    root = tmp_path / "store"
    root.mkdir()

    class DiskStore(DirFileSystem):
        protocol = "diskstore"
        cachable = False

        def __init__(self, **options):
            super().__init__(path=str(root), fs=LocalFileSystem(auto_mkdir=True))

    fsspec.register_implementation("diskstore", DiskStore, clobber=True)
    return "diskstore://"


@pytest.mark.parametrize("folder", ["file-url", "local", "object-store"])
def test_an_output_is_whole_or_absent_when_a_block_fails_midway(tmp_path, folder, disk_store):
    import fsspec

    scores, run = Scores(torch.arange(300.0).reshape(-1, 1), {}), _run("mse")
    url = {
        "file-url": (tmp_path / "out" / "p.csv").as_uri(),
        "local": str(tmp_path / "out" / "p.csv"),
        "object-store": f"{disk_store}predictions/p.csv",
    }[folder]
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
    with pytest.raises(InputError, match=r"not a finished training run \(missing model.saf"):
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
        ("weights-not-of-the-spec", "model.safetensors does not fit spec.json \\(", 2),
        ("unknown-model-in-the-spec", "spec.json: --model 'nope' is not a known model", 2),
        ("no-spec", "no spec.json \\(trained before trainflow wrote one\\)", 2),
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
    elif case in ("weights-not-of-the-spec", "unknown-model-in-the-spec", "no-spec"):
        model = str(tmp_path / "run")
        shutil.copytree(trained, model)
        spec = json.loads((trained / "spec.json").read_text())
        if case == "no-spec":
            (tmp_path / "run" / "spec.json").unlink()
        else:
            edit = {"n_outputs": 3} if case == "weights-not-of-the-spec" else {"name": "nope"}
            (tmp_path / "run" / "spec.json").write_text(json.dumps(spec | edit))
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


# --- what someone who can write the run folder or the cache can and cannot do ----------------


class _Exploit:
    """A pickle that, when unpickled, creates `marker`: code run by loading data."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _planted(program: bytes, marker: Path, how: str) -> bytes:
    """`program` (a torch.export.save archive) with code that runs when torch loads it: a
    pickle in the member torch unpickles (its sample inputs; weights_only=False is torch's
    fallback), or a shape expression in the graph's JSON (which torch hands to sympy's eval)."""
    import zipfile

    source, planted = zipfile.ZipFile(io.BytesIO(program)), io.BytesIO()
    with zipfile.ZipFile(planted, "w") as out:
        for info in source.infolist():
            data = source.read(info.filename)
            if how == "pickle" and info.filename.endswith("data/sample_inputs/model.pt"):
                buffer = io.BytesIO()
                torch.save(_Exploit(marker), buffer)
                data = buffer.getvalue()
            if how == "graph" and info.filename.endswith("models/model.json"):
                code = f"__import__('pathlib').Path({str(marker)!r}).touch() or Symbol("
                data = data.replace(b'"expr_str": "Symbol(', f'"expr_str": "{code}'.encode())
            out.writestr(info, data)
    return planted.getvalue()


def _predictions(out: Path) -> list[float]:
    return [float(r["prediction"]) for r in _read(out)]


@pytest.mark.usefixtures("prefect_api")
@pytest.mark.parametrize("how", ["pickle", "graph"])
def test_code_planted_in_model_pt2_never_runs(trained, tmp_path, how):
    table = _table(tmp_path / "t.csv", rows=50, seed=6, target=False)
    folder = tmp_path / "run"
    shutil.copytree(trained, folder)
    marker = tmp_path / "pwned"
    (folder / "model.pt2").write_bytes(_planted((trained / "model.pt2").read_bytes(), marker, how))
    out = tmp_path / "p.csv"
    code = predict(["--model", str(folder), "--data", str(table), "--out", str(out), "--no-cache"])
    assert not marker.exists()
    # model.pt2 is never what predict loads: the run's weights in its architecture are.
    assert code == 0
    expected = _expected(trained, table).astype(np.float32)
    assert np.array_equal(np.array(_predictions(out)).astype(np.float32), expected)


def _plant_in_cache(cache: Path, key: str, program: bytes) -> None:
    """Rewrite the export-graph entry's program, as anyone who can write the cache can: a
    new blob under its own checksum, and the record naming it."""
    import xxhash
    from safetensors.torch import load_file, save

    record_path = cache / "records" / f"{key}.json"
    record = json.loads(record_path.read_text())
    tensors = load_file(cache / "blobs" / f"{record['blob']['xxh3']}.safetensors")
    tensors["program"] = torch.frombuffer(bytearray(program), dtype=torch.uint8)
    blob = save(tensors)
    checksum = xxhash.xxh3_128_hexdigest(blob)
    (cache / "blobs" / f"{checksum}.safetensors").write_bytes(blob)
    record["blob"] = {"xxh3": checksum, "size": len(blob)}
    record_path.write_text(json.dumps(record))


def test_code_planted_in_the_export_graph_cache_entry_never_runs(tmp_path, subprocess_env):
    """A planted entry is a cache hit: training copies its program into the new run folder's
    model.pt2, and predict scores that folder without running it."""
    from .conftest import REPO

    def train_cli(name: str) -> str:
        command = [sys.executable, str(REPO / "flows" / "train_flow.py"), "--epochs", "3"]
        command += ["--run-name", name, "--runs-dir", "runs", "--cache-dir", "cache"]
        done = subprocess.run(
            command, cwd=tmp_path, env=subprocess_env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    train_cli("genuine")
    genuine = tmp_path / "runs" / "genuine"
    assert predict(["--model", str(genuine), "--no-cache"]) == 0
    expected = _predictions(genuine / "predictions.csv")
    stages = json.loads((genuine / "stages.json").read_text())
    (key,) = [s["key"] for s in stages if s["name"] == "export-graph"]
    program = (genuine / "model.pt2").read_bytes()
    for how in ("pickle", "graph"):
        marker = tmp_path / f"pwned-{how}"
        _plant_in_cache(tmp_path / "cache", key, _planted(program, marker, how))
        printed = train_cli(how)
        assert re.search(r"^export-graph\s+Cached\b", printed, re.MULTILINE), printed
        assert (tmp_path / "runs" / how / "model.pt2").read_bytes() != program  # planted
        assert predict(["--model", str(tmp_path / "runs" / how), "--no-cache"]) == 0
        assert not marker.exists()
        assert _predictions(tmp_path / "runs" / how / "predictions.csv") == expected


def _flow_run_id(capsys) -> str:
    printed = capsys.readouterr().out
    return re.search(r"/runs/flow-run/([0-9a-f-]{36})", printed).group(1)


@pytest.mark.usefixtures("prefect_api")
def test_a_flow_run_id_names_the_folder_that_run_wrote_from_any_folder(
    tmp_path, monkeypatch, capsys
):
    """Two folders each hold a run named 'same' (a relative --runs-dir, as the nightly
    deployment has): the flow run of the first is scored with its own model, from the second
    folder too, and refused once its folder is gone."""
    ids = {}
    for name, seed in (("a", 1), ("b", 2)):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        args = ["--epochs", "3", "--init-seed", str(seed), "--run-name", "same"]
        assert train([*args, "--cache-dir", str(tmp_path / f"cache-{name}")]) == 0
        ids[name] = _flow_run_id(capsys)
    scored = {}
    for name in ("a", "b"):  # each run's own model, by its folder
        out = tmp_path / f"{name}.csv"
        folder = str(tmp_path / name / "runs" / "same")
        assert predict(["--model", folder, "--out", str(out), "--no-cache"]) == 0
        scored[name] = _predictions(out)
    assert scored["a"] != scored["b"]
    out = tmp_path / "by-id.csv"  # from folder b, run a's id
    assert predict(["--model", f"prefect.flow-run.{ids['a']}", "--out", str(out)]) == 0
    assert _predictions(out) == scored["a"]
    capsys.readouterr()
    shutil.rmtree(tmp_path / "a" / "runs" / "same")
    out.unlink()
    assert predict(["--model", f"prefect.flow-run.{ids['a']}", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "a" / "runs" / "same") in err[0], err
    assert not out.exists()


def _flow_cli(script: str, args: list[str], cwd: Path, env: dict[str, str]):
    """A flow's command line, as a user runs it from `cwd`."""
    from .conftest import REPO

    command = [sys.executable, str(REPO / "flows" / script), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _train_id(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    """Train from `cwd`; the flow run's id, as the printed Prefect UI link names it."""
    done = _flow_cli("train_flow.py", args, cwd, env)
    assert done.returncode == 0, done.stderr[-3000:]
    return re.search(r"/runs/flow-run/([0-9a-f-]{36})", done.stdout).group(1)


def test_a_flow_run_id_is_refused_once_its_folder_holds_another_model(tmp_path, subprocess_env):
    """The folder run A recorded is moved away and run B, another config, trains under the same
    name: A's id never scores B's model. With A's folder back, or after a cached re-run of A's
    config into it (the same weights, bit for bit), A's id names A's model again."""
    work, other = tmp_path / "work", tmp_path / "other"
    work.mkdir(), other.mkdir()
    runs = work / "runs"

    def train(*args: str) -> str:
        return _train_id([*args, "--run-name", "idtest"], work, subprocess_env)

    def by_id(run_id: str, out: str):
        args = ["--model", f"prefect.flow-run.{run_id}", "--out", str(other / out), "--no-cache"]
        return _flow_cli("predict_flow.py", args, other, subprocess_env)

    a = train("--epochs", "2")
    assert by_id(a, "a.csv").returncode == 0
    scored_a = _predictions(other / "a.csv")
    (runs / "idtest").rename(runs / "idtest-moved")
    b = train("--epochs", "3", "--lr", "0.05")
    before = _files(tmp_path)
    done = by_id(a, "refused.csv")
    assert done.returncode == 2, done.stdout[-2000:]
    last = done.stderr.strip().splitlines()[-1]  # the error, after Prefect's log lines
    assert last.startswith("predict_flow.py: error: --model prefect.flow-run."), last
    assert f"{str(runs / 'idtest')!r} now holds another model" in last, last
    assert _files(tmp_path) == before  # nothing written
    assert by_id(b, "b.csv").returncode == 0
    assert _predictions(other / "b.csv") != scored_a

    shutil.rmtree(runs / "idtest")
    (runs / "idtest-moved").rename(runs / "idtest")
    assert by_id(a, "a-back.csv").returncode == 0
    assert _predictions(other / "a-back.csv") == scored_a
    rerun = train("--epochs", "2")  # A's config again: cached, the same files
    assert rerun != a
    assert by_id(a, "a-rerun.csv").returncode == 0
    assert _predictions(other / "a-rerun.csv") == scored_a


def test_the_default_data_and_cache_are_the_training_runs_from_any_folder(tmp_path, subprocess_env):
    """A run trained from `work` on `train.csv` with the default cache (both relative): predict
    from another folder, by flow run id or by the run folder, without --data or --cache-dir,
    scores that file and caches in that cache, never in a folder of its own working
    directory's."""
    work, other = tmp_path / "work", tmp_path / "other"
    work.mkdir(), other.mkdir()
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=80), rng.normal(size=80)
    (work / "train.csv").write_text(
        "a,b,y\n" + "".join(f"{a[i]},{b[i]},{1 + 2 * a[i] - b[i]}\n" for i in range(80))
    )
    run_id = _train_id(
        ["--data", "train.csv", "--epochs", "2", "--run-name", "r"], work, subprocess_env
    )
    cache = work / ".trainflow" / "cache"
    for model, printed in (
        (f"prefect.flow-run.{run_id}", "Completed"),
        (str(work / "runs" / "r"), "Cached"),
    ):
        out = other / "p.csv"
        done = _flow_cli(
            "predict_flow.py", ["--model", model, "--out", str(out)], other, subprocess_env
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert len(_read(out)) == 80  # the rows of work/train.csv
        assert re.search(rf"^score\s+{printed}\b", done.stdout, re.MULTILINE), done.stdout
        assert list((cache / "records").glob("score-*.json"))
        assert not (other / ".trainflow").exists()


@pytest.mark.usefixtures("prefect_api")
@pytest.mark.parametrize(("cell", "column"), [("nan", "a"), ("-inf", "b"), ("inf", "y")])
def test_a_nan_or_inf_cell_is_refused_naming_its_column_and_row(
    trained, tmp_path, capsys, cell, column
):
    table = _table(tmp_path / "t.csv", rows=20, seed=8)
    header, *rows = table.read_text().splitlines()
    cells = rows[7].split(",")
    cells[header.split(",").index(column)] = cell
    rows[7] = ",".join(cells)
    table.write_text("\n".join([header, *rows]) + "\n")
    out, cache = tmp_path / "out.csv", tmp_path / "cache"
    before = _files(tmp_path)
    args = ["--model", str(trained), "--data", str(table), "--out", str(out)]
    assert predict([*args, "--cache-dir", str(cache)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"column {column!r}" in err[0] and "row 7" in err[0], err
    assert _files(tmp_path) == before  # no output, no cache entry


@pytest.mark.usefixtures("prefect_api")
def test_an_output_that_dies_with_the_process_is_refused_before_scoring(
    trained, tmp_path, capsys, monkeypatch
):
    import fsspec

    import trainflow.tasks.predict

    def never(*args, **kwargs):
        raise AssertionError("scored an output that could not be kept")

    monkeypatch.setattr(trainflow.tasks.predict, "score_rows", never)
    before = _files(tmp_path)
    args = ["--model", str(trained), "--out", "memory://kept/p.csv"]
    assert predict([*args, "--cache-dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out memory://kept/p.csv" in err[0], err
    assert not fsspec.filesystem("memory").exists("/kept/p.csv")
    assert _files(tmp_path) == before


# A writer that has written its first block and waits to be killed.
STALLED_WRITER = """
import sys
import torch
from trainflow.tasks.engine.models import ModelSpec
from trainflow.tasks.runs.finder import ModelRun
from trainflow.tasks.predict import Scores, prediction_blocks
from trainflow.tasks.data.writers import write_output

run = ModelRun("/nowhere", ("a", "b"), ("y",), {"loss": "mse"}, ModelSpec("linear", 2, 1), "")

def blocks():
    parts = prediction_blocks(Scores(torch.zeros(300, 1), {}), run, rows_per_block=64)
    yield next(parts)
    print("writing", flush=True)
    sys.stdin.read()  # until killed

write_output(sys.argv[1], blocks())
"""


@pytest.mark.usefixtures("prefect_api")
def test_a_killed_writers_temporary_file_is_removed_by_the_next_predict(trained, tmp_path):
    import signal

    from .conftest import REPO

    out = tmp_path / "out" / "p.csv"
    args = ["--model", str(trained), "--out", str(out), "--no-cache"]

    def temporaries() -> list[str]:
        return sorted(p.name for p in out.parent.iterdir() if p.name != "p.csv")

    writer = subprocess.Popen(
        [sys.executable, "-c", STALLED_WRITER, str(out)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout.readline() == "writing\n"
        (live,) = temporaries()
        # Another predict to the same output meanwhile: the live writer's file is its own.
        assert predict(args) == 0
        assert temporaries() == [live]
        assert len(_read(out)) == 80
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=60)
    assert writer.returncode == -signal.SIGKILL
    assert temporaries() == [live]  # what a SIGKILL leaves
    assert predict(args) == 0
    assert temporaries() == []
    assert len(_read(out)) == 80


@pytest.mark.parametrize(
    "spec",
    [
        ModelSpec("linear", 3, 1),
        ModelSpec("mlp", 3, 4, (16, 8), "gelu"),
        ModelSpec("mlp", 3, 2, (8,), "tanh", standardize=True),
        ModelSpec("mlp", 3, 1, (8,), "silu", standardize=True, categories=((1, 4),)),
    ],
    ids=["linear", "mlp", "standardized", "categorical"],
)
def test_the_rebuilt_model_computes_what_its_model_pt2_does(tmp_path, spec):
    """Predict scores with the model rebuilt from spec.json and model.safetensors; for a
    genuine run folder that is model.pt2's numbers, bit for bit."""
    from safetensors.torch import save_file

    from trainflow.tasks.engine.models import initial_model
    from trainflow.tasks.export_graph import export_program
    from trainflow.tasks.runs.finder import rebuilt_model

    rows = torch.randn(64, 3, generator=torch.Generator().manual_seed(1))
    # A category id column: ids out of the vocabulary and NaN go to the unknown slot.
    odd = float("nan") if spec.categories else 2.0
    rows[:, 1] = torch.tensor([0.0, 1, 2, 3, 4, 1.5, -1, odd]).repeat(8)
    initial = initial_model(spec, seed=3, train_x=rows)
    program_file = tmp_path / "model.pt2"
    torch.export.save(export_program(instantiate(spec, initial.state).eval(), rows), program_file)
    save_file(initial.state, tmp_path / "model.safetensors")
    (tmp_path / "spec.json").write_text(json.dumps(dataclasses.asdict(spec)))
    (tmp_path / "config.json").write_text(json.dumps({"loss": "mse"}))
    columns = {"features": ["a", "b", "c"], "targets": ["y"]}
    (tmp_path / "columns.json").write_text(json.dumps(columns))
    model = rebuilt_model(read_run(tmp_path))
    with torch.no_grad():
        for batch in (1, 7, 64):
            expected = torch.export.load(program_file).module()(rows[:batch])
            assert not expected.isnan().any()
            assert torch.equal(model(rows[:batch]), expected)  # bit for bit
