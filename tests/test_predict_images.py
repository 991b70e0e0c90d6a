"""predict on image data: a run folder's class names are checked against its model, an image
folder is read as training reads it, and targets the model can't know are one line."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from trainflow.tasks.engine.models import initial_model, model_spec
from trainflow.tasks.errors import InputError
from trainflow.tasks.export_graph import write_sources
from trainflow.tasks.predict import check_class_ids, image_rows, scoring_folder
from trainflow.tasks.runs.finder import read_run


def _run_folder(root: Path, classes: object = ("cat", "dog", "fox"), channels: int = 3) -> Path:
    """A trained run's files, by hand: an MLP on uint8 C×4×4 images, three classes."""
    spec = model_spec(
        "mlp", channels * 16, 3, (4,), "relu", input_shape=(channels, 4, 4), input_dtype="uint8"
    )
    spec = dataclasses.replace(spec, n_classes=3)
    root.mkdir(parents=True)
    save_file(initial_model(spec, seed=0).state, root / "model.safetensors")
    (root / "spec.json").write_text(json.dumps(dataclasses.asdict(spec)))
    (root / "config.json").write_text(json.dumps({"loss": "cross_entropy"}))
    columns = {"features": ["x"], "targets": ["y"], "classes": classes}
    (root / "columns.json").write_text(json.dumps(columns))
    (root / "metrics.json").write_text("{}")
    (root / "model.pt2").write_bytes(b"")
    return root


def _image(path: Path, mode: str = "RGB", seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)


@pytest.mark.parametrize(
    ("classes", "why"),
    [
        (["only"], "1 class names for 3 classes"),
        ("abc", "classes must be a list of names"),
        (["a", None, "c"], "classes must be a list of names"),
        (["a", "a", "b"], "a class name appears twice"),
    ],
)
def test_class_names_that_do_not_fit_the_model_are_one_line(tmp_path, classes, why):
    folder = _run_folder(tmp_path / "run", classes)
    with pytest.raises(InputError, match=why) as info:
        read_run(folder)
    assert "\n" not in str(info.value) and "columns.json" in str(info.value)


def test_a_stray_image_beside_class_folders_is_refused_not_a_flat_folder(tmp_path):
    run = read_run(_run_folder(tmp_path / "run"))
    _image(tmp_path / "data" / "cat" / "a.png")
    _image(tmp_path / "data" / "stray.png")
    with pytest.raises(InputError, match=r"stray\.png"):
        scoring_folder(str(tmp_path / "data"), run)
    flat = tmp_path / "flat"
    _image(flat / "a.png")
    _image(flat / "b.png", seed=1)
    folder = scoring_folder(str(flat), run)
    assert folder.classes == () and [f for f, _ in folder.files] == ["a.png", "b.png"]


def test_grayscale_images_are_read_with_the_channels_the_model_takes(tmp_path):
    run = read_run(_run_folder(tmp_path / "run", channels=3))
    _image(tmp_path / "data" / "dog" / "a.png", mode="L")
    x, y = image_rows(scoring_folder(str(tmp_path / "data"), run), run)
    assert x.shape == (1, 3, 4, 4) and x.dtype == torch.uint8
    assert torch.equal(x[0, 0], x[0, 1]) and y.tolist() == [1]  # "dog": the model's class 1


def test_class_ids_the_model_does_not_know_are_one_line_naming_the_row():
    check_class_ids(torch.tensor([0, 2, 1]), 3, "d.npz")
    with pytest.raises(InputError, match=r"'d.npz': y, row 1 is class 9, .* 0 to 2"):
        check_class_ids(torch.tensor([0, 9, -1]), 3, "d.npz")


def test_the_source_copy_replaces_what_is_there_and_never_follows_a_link_out(tmp_path):
    run_dir, outside = tmp_path / "run", tmp_path / "outside"
    run_dir.mkdir()
    outside.mkdir()
    (run_dir / "source").symlink_to(outside, target_is_directory=True)
    write_sources(run_dir / "source", {"model.py": b"A = 1\n", "pkg/part.py": b"B = 2\n"})
    assert list(outside.iterdir()) == []
    assert not (run_dir / "source").is_symlink()
    assert (run_dir / "source" / "pkg" / "part.py").read_bytes() == b"B = 2\n"
    write_sources(run_dir / "source", {"other.py": b"C = 3\n"})  # a later run's code only
    assert sorted(p.name for p in (run_dir / "source").iterdir()) == ["other.py"]


def test_an_image_rewritten_after_the_score_key_was_made_is_refused(tmp_path):
    """predict's key hashes every image, and the decode must use those bytes or none."""
    from trainflow.tasks.data.images import folder_identity

    run = read_run(_run_folder(tmp_path / "run"))
    _image(tmp_path / "data" / "cat" / "a.png")
    folder = scoring_folder(str(tmp_path / "data"), run)
    digests = {relative: digest for relative, _, digest in folder_identity(folder)["files"]}
    image_rows(folder, run, digests)
    _image(tmp_path / "data" / "cat" / "a.png", seed=5)
    with pytest.raises(InputError, match="changed while being read"):
        image_rows(folder, run, digests)
