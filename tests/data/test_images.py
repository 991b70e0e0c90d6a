"""Image folders: the layout scanned strictly, every image decoded once into one uint8 tensor,
and an identity for the cache that follows the bytes and the classes, not the location."""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from trainflow.tasks.data import images
from trainflow.tasks.data.images import (
    IMAGE_EXTENSIONS,
    decode_image_file,
    decode_images,
    folder_identity,
    scan_image_folder,
)
from trainflow.tasks.errors import InputError


def noise(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (height, width) if channels == 1 else (height, width, channels)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def save(path: Path, image: Image.Image | np.ndarray, **options: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image.save(path, **options)
    return path


def rgb_folder(root: Path, size: int = 4) -> Path:
    for seed, name in enumerate(("dog/b.png", "cat/x/a.png", "cat/b.PNG", "Zebra/z.png")):
        save(root / name, noise(size, size, seed=seed))
    return root


def input_error(call, *args, prefix: str, fragments: tuple[str, ...] = ()) -> str:
    with pytest.raises(InputError) as info:
        call(*args)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(prefix), message
    for fragment in fragments:
        assert fragment in message, message
    return message


# --- the layout -------------------------------------------------------------------------------


def test_classes_are_sorted_by_plain_string_order_and_a_class_id_is_its_index(tmp_path):
    root = rgb_folder(tmp_path / "pets")
    folder = scan_image_folder(str(root))
    assert folder.root == str(root)
    assert folder.classes == ("Zebra", "cat", "dog")  # uppercase first, in every locale
    assert folder.files == (
        ("Zebra/z.png", 0),
        ("cat/b.PNG", 1),
        ("cat/x/a.png", 1),  # from a subfolder, as ImageFolder finds it
        ("dog/b.png", 2),
    )
    x, y = decode_images(folder)
    assert y.dtype == torch.int64 and y.tolist() == [0, 1, 1, 2]
    assert torch.equal(x[2], torch.from_numpy(noise(4, 4, seed=1)).permute(2, 0, 1))


def test_pixels_stay_uint8_exactly_as_stored(tmp_path):
    save(tmp_path / "a" / "1.png", noise(5, 7, seed=3))
    x, _ = decode_images(scan_image_folder(str(tmp_path)))
    assert x.dtype == torch.uint8 and x.shape == (1, 3, 5, 7) and x.is_contiguous()
    assert torch.equal(x[0], torch.from_numpy(noise(5, 7, seed=3)).permute(2, 0, 1))


def test_every_image_extension_counts_in_any_case(tmp_path):
    for i, extension in enumerate(IMAGE_EXTENSIONS):
        name = f"{i}{extension.upper() if i % 2 else extension}"
        save(tmp_path / "c" / name, noise(4, 4, seed=i))
    folder = scan_image_folder(str(tmp_path))
    assert len(folder.files) == len(IMAGE_EXTENSIONS)
    assert decode_images(folder)[0].shape == (len(IMAGE_EXTENSIONS), 3, 4, 4)


def test_hidden_files_and_folders_are_skipped(tmp_path):
    save(tmp_path / "cat" / "a.png", noise(4, 4))
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "cat" / ".DS_Store").write_bytes(b"\0")
    save(tmp_path / "cat" / ".ipynb_checkpoints" / "a-checkpoint.png", noise(4, 4))
    save(tmp_path / ".trash" / "b.png", noise(4, 4))
    folder = scan_image_folder(str(tmp_path))
    assert folder.classes == ("cat",) and folder.files == (("cat/a.png", 0),)


def test_links_are_followed_but_not_round_a_loop(tmp_path):
    root = tmp_path / "root"
    save(root / "cat" / "a.png", noise(4, 4))
    outside = save(tmp_path / "elsewhere" / "b.png", noise(4, 4, seed=1))
    (root / "cat" / "b.png").symlink_to(outside)
    (root / "cat" / "loop").symlink_to(root / "cat", target_is_directory=True)
    (root / "cat" / "up").symlink_to(root, target_is_directory=True)
    folder = scan_image_folder(str(root))
    assert folder.files == (("cat/a.png", 0), ("cat/b.png", 0))
    assert torch.equal(decode_images(folder)[0][1], decode_image_file(str(outside), None, 3))


def missing(root: Path) -> tuple[str, ...]:
    return ("not an existing directory",)


def without_classes(root: Path) -> tuple[str, ...]:
    root.mkdir()
    (root / ".hidden").mkdir()
    return ("no class folders",)


def file_in_root(root: Path) -> tuple[str, ...]:
    save(root / "cat" / "a.png", noise(4, 4))
    save(root / "b.png", noise(4, 4))
    return ("'b.png'", "images must sit in class folders")


def empty_class(root: Path) -> tuple[str, ...]:
    save(root / "cat" / "a.png", noise(4, 4))
    (root / "dog" / "sub").mkdir(parents=True)
    return (f"class folder {str(root / 'dog')!r} has no images",)


def text_file(root: Path) -> tuple[str, ...]:
    save(root / "cat" / "a.png", noise(4, 4))
    (root / "cat" / "notes.txt").touch()
    return ("'cat/notes.txt' is not an image file", ".png")


def no_extension(root: Path) -> tuple[str, ...]:
    save(root / "cat" / "a.png", noise(4, 4))
    (root / "cat" / "README").touch()
    return ("'cat/README' is not an image file",)


def dangling_link(root: Path) -> tuple[str, ...]:
    save(root / "cat" / "a.png", noise(4, 4))
    (root / "cat" / "gone.png").symlink_to(root / "nowhere.png")
    return ("'cat/gone.png' is not a file (a broken link?)",)


@pytest.mark.parametrize(
    "make",
    [missing, without_classes, file_in_root, empty_class, text_file, no_extension, dangling_link],
)
def test_a_layout_that_would_drop_data_is_a_one_line_error(tmp_path, make):
    root = tmp_path / "pets"
    fragments = make(root)
    input_error(
        scan_image_folder, str(root), prefix=f"image folder {str(root)!r}: ", fragments=fragments
    )


def test_a_class_folder_with_only_hidden_files_has_no_images(tmp_path):
    save(tmp_path / "cat" / "a.png", noise(4, 4))
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / ".DS_Store").write_bytes(b"\0")
    input_error(
        scan_image_folder, str(tmp_path), prefix="image folder", fragments=("/dog' has no images",)
    )


# --- channels and sizes -----------------------------------------------------------------------


def test_grayscale_images_of_every_depth_give_one_channel(tmp_path):
    save(tmp_path / "a" / "8bit.png", np.array([[0, 7], [200, 255]], dtype=np.uint8))
    save(tmp_path / "a" / "alpha.png", Image.new("LA", (2, 2), (9, 0)))
    save(tmp_path / "a" / "bilevel.png", Image.new("1", (2, 2), 1))
    sixteen = np.array([[0, 255], [32896, 65535]], dtype=np.uint16)
    save(tmp_path / "b" / "16bit.png", sixteen)
    floats = np.array([[0.4, 254.6], [300.0, -5.0]], dtype=np.float32)
    save(tmp_path / "b" / "float.tif", Image.fromarray(floats))
    x, _ = decode_images(scan_image_folder(str(tmp_path)))
    assert x.shape == (5, 1, 2, 2)
    assert x[:, 0].tolist() == [
        [[0, 7], [200, 255]],
        [[9, 9], [9, 9]],  # alpha dropped, the gray value kept
        [[255, 255], [255, 255]],
        [[0, 0], [128, 255]],  # 16 bits: the high byte
        [[0, 255], [255, 0]],  # floats on the 0–255 scale, rounded and clipped
    ]


def test_one_colour_image_among_grayscale_ones_gives_three_channels(tmp_path):
    gray = noise(3, 3, channels=1)
    save(tmp_path / "a" / "gray.png", gray)
    save(tmp_path / "b" / "colour.png", noise(3, 3, seed=1))
    x, _ = decode_images(scan_image_folder(str(tmp_path)))
    assert x.shape == (2, 3, 3, 3)
    assert torch.equal(x[0], torch.from_numpy(gray).expand(3, 3, 3))  # repeated into R, G, B
    assert torch.equal(x[1], torch.from_numpy(noise(3, 3, seed=1)).permute(2, 0, 1))


@pytest.mark.filterwarnings("error")  # Pillow warns on a palette with alpha converted to RGB
def test_alpha_is_dropped_leaving_the_colour_as_stored(tmp_path):
    save(tmp_path / "a" / "rgba.png", Image.new("RGBA", (2, 2), (10, 20, 30, 0)))
    palette = Image.new("P", (2, 2), 1)
    palette.putpalette([0, 0, 0, 40, 50, 60] + [0] * 762)
    save(tmp_path / "a" / "palette.png", palette, transparency=bytes([255, 128]))
    with Image.open(tmp_path / "a" / "palette.png") as image:
        assert isinstance(image.info["transparency"], bytes)
    x, _ = decode_images(scan_image_folder(str(tmp_path)))
    assert x[:, :, 0, 0].tolist() == [[40, 50, 60], [10, 20, 30]]


def test_images_of_different_sizes_need_an_image_size(tmp_path):
    save(tmp_path / "a" / "1.png", noise(4, 6))
    save(tmp_path / "a" / "2.png", noise(4, 6, seed=1))
    odd = save(tmp_path / "b" / "3.png", noise(5, 6, seed=2))
    input_error(
        decode_images,
        scan_image_folder(str(tmp_path)),
        prefix=f"image file {str(odd)!r}: ",
        fragments=("5×6", "4×6", "1.png", "--image-size H,W"),
    )


def test_image_size_resizes_each_image_of_another_size_and_no_other(tmp_path):
    small = save(tmp_path / "a" / "small.png", noise(3, 5))
    save(tmp_path / "a" / "right.png", noise(6, 4, seed=1))
    save(tmp_path / "b" / "gray.png", noise(9, 9, channels=1, seed=2))
    x, _ = decode_images(scan_image_folder(str(tmp_path)), image_size=(6, 4))
    assert x.shape == (3, 3, 6, 4)
    assert torch.equal(x[0], torch.from_numpy(noise(6, 4, seed=1)).permute(2, 0, 1))
    with Image.open(small) as image:
        resized = image.resize((4, 6), Image.Resampling.BILINEAR, reducing_gap=None)
    assert torch.equal(x[1], torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1))
    assert torch.equal(decode_images(scan_image_folder(str(tmp_path)), image_size=[6, 4])[0], x)


@pytest.mark.parametrize("size", [(0, 4), (4,), (2.5, 4), (True, 4)])
def test_an_image_size_must_be_two_positive_integers(tmp_path, size):
    save(tmp_path / "a" / "1.png", noise(4, 4))
    folder = scan_image_folder(str(tmp_path))
    with pytest.raises(InputError, match="two positive integers"):
        decode_images(folder, size)


# --- unreadable images ------------------------------------------------------------------------


def truncated_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(noise(32, 32)).save(buffer, format="PNG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


@pytest.mark.parametrize("content", [b"not an image", truncated_png()], ids=["text", "truncated"])
def test_a_corrupt_image_is_named(tmp_path, content):
    save(tmp_path / "a" / "good.png", noise(32, 32))
    bad = tmp_path / "b" / "bad.png"
    bad.parent.mkdir()
    bad.write_bytes(content)
    folder = scan_image_folder(str(tmp_path))
    input_error(decode_images, folder, prefix=f"image file {str(bad)!r}: ")
    input_error(decode_image_file, str(bad), None, 3, prefix=f"image file {str(bad)!r}: ")


# --- identity ---------------------------------------------------------------------------------


def identity(root: Path) -> dict[str, object]:
    return folder_identity(scan_image_folder(str(root)))


def test_identity_follows_the_content_not_the_location(tmp_path):
    root = rgb_folder(tmp_path / "here")
    before = identity(root)
    moved = tmp_path / "elsewhere" / "pets"
    shutil.copytree(root, moved)
    shutil.rmtree(root)
    assert identity(moved) == before


def test_identity_changes_with_one_byte_of_one_image(tmp_path):
    root = rgb_folder(tmp_path)
    before = identity(root)
    path = root / "cat" / "x" / "a.png"
    data = bytearray(path.read_bytes())
    data[-20] ^= 1
    path.write_bytes(bytes(data))
    assert identity(root) != before


def test_identity_changes_when_a_class_is_renamed(tmp_path):
    root = rgb_folder(tmp_path)
    before = identity(root)
    (root / "dog").rename(root / "hound")
    assert identity(root) != before


def test_identity_changes_when_a_file_is_renamed_or_moves_to_another_class(tmp_path):
    # Files in the same order before and after: only their paths and classes tell them apart.
    for seed, name in enumerate(("cat/a.png", "cat/m.png", "dog/n.png")):
        save(tmp_path / name, noise(2, 2, seed=seed))
    before = identity(tmp_path)
    (tmp_path / "cat" / "a.png").rename(tmp_path / "cat" / "b.png")
    renamed = identity(tmp_path)
    (tmp_path / "cat" / "m.png").rename(tmp_path / "dog" / "m.png")
    moved = identity(tmp_path)
    assert len({str(before), str(renamed), str(moved)}) == 3
    assert moved["classes"] == before["classes"] == ["cat", "dog"]


def test_identity_of_an_unreadable_file_is_an_error_naming_it(tmp_path):
    root = rgb_folder(tmp_path)
    folder = scan_image_folder(str(root))
    (root / "dog" / "b.png").unlink()
    input_error(folder_identity, folder, prefix=f"image file {str(root / 'dog' / 'b.png')!r}: ")


# --- progress and single files ----------------------------------------------------------------


def test_progress_is_reported_once_decoding_is_slow_and_then_sparingly(tmp_path, monkeypatch):
    for i in range(12):
        save(tmp_path / "a" / f"{i:02}.png", noise(2, 2, seed=i))
    ticks = iter(range(10_000))  # a clock one second ahead at every look
    monkeypatch.setattr(images, "time", SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    lines: list[str] = []
    decode_images(scan_image_folder(str(tmp_path)), progress=lines.append)
    assert lines, "a slow decoding said nothing"
    assert lines[-1] == "decoding images: 12/12"
    assert any(line.startswith("decoding images: ") for line in lines[:-1])
    # 24 steps (headers, then pixels), one second apart: a line at most every two seconds.
    assert len(lines) <= 13


def test_a_fast_decoding_reports_nothing(tmp_path):
    rgb_folder(tmp_path)
    lines: list[str] = []
    decode_images(scan_image_folder(str(tmp_path)), progress=lines.append)
    assert lines == []


@pytest.mark.parametrize("image_size", [None, (3, 5)])
@pytest.mark.parametrize("gray", [True, False])
def test_a_single_file_decodes_as_it_does_in_its_folder(tmp_path, image_size, gray):
    channels = 1 if gray else 3
    paths = [
        save(tmp_path / "a" / "1.jpg", noise(6, 6, channels, seed=1), quality=80),
        save(tmp_path / "b" / "2.png", noise(6, 6, channels, seed=2)),
    ]
    folder = scan_image_folder(str(tmp_path))
    x, _ = decode_images(folder, image_size)
    assert x.shape[1] == channels
    for i, path in enumerate(paths):
        single = decode_image_file(str(path), image_size, channels)
        assert single.dtype == torch.uint8 and torch.equal(single, x[i])


def test_an_image_rewritten_after_its_key_was_made_is_refused_not_stored(tmp_path):
    """The key hashes every file; the decode reads each file once more. A file rewritten in
    between (same size, other pixels) must not be decoded under the old key's digests."""
    root = rgb_folder(tmp_path / "images")
    folder = scan_image_folder(str(root))
    digests = {relative: digest for relative, _, digest in folder_identity(folder)["files"]}
    x, _ = decode_images(folder, digests=digests)  # the bytes the key was made of: fine
    save(root / "dog/b.png", noise(4, 4, seed=99))
    message = input_error(
        decode_images, folder, None, None, digests, prefix="image file", fragments=("b.png",)
    )
    assert "changed while being read" in message
    again, _ = decode_images(folder)  # without digests (no cache): the new pixels
    assert not torch.equal(again, x)


def test_channels_can_be_forced_as_a_model_takes_them(tmp_path):
    root = rgb_folder(tmp_path / "images")
    folder = scan_image_folder(str(root))
    gray, _ = decode_images(folder, channels=1)
    assert gray.shape[1] == 1
    for i, (relative, _) in enumerate(folder.files):
        assert torch.equal(gray[i], decode_image_file(str(root / relative), None, 1))
