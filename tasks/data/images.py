"""Image folders laid out as torchvision's ImageFolder (root/<class>/<image>) as uint8 tensors."""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xxhash
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from trainflow.tasks.cache.keys import file_digest
from trainflow.tasks.data.tables import available_memory
from trainflow.tasks.errors import InputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
PROGRESS_AFTER_S = 2.0
PROGRESS_EVERY_S = 2.0
# What Pillow raises for a file it cannot read as an image: an unknown format, truncated or
# malformed data, a size past its decompression-bomb limit, a mode it cannot convert.
UNREADABLE = (
    UnidentifiedImageError,
    Image.DecompressionBombError,
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
)


@dataclass(frozen=True)
class ImageFolder:
    root: str
    # Class folder names, sorted: a class's id is its index, as in torchvision's ImageFolder.
    classes: tuple[str, ...]
    # (path relative to root with "/" separators, class id), sorted by class id, then path.
    files: tuple[tuple[str, int], ...]

    def path(self, relative: str) -> str:
        return os.path.join(self.root, relative)


# --- the folder -------------------------------------------------------------------------------


def scan_image_folder(root: str) -> ImageFolder:
    """The classes and image files under `root`, or a one-line error for anything that would
    otherwise be dropped silently: a file beside the class folders, a file that is not an
    image by its extension, a class folder without images. Hidden entries (".DS_Store",
    ".ipynb_checkpoints") are skipped; links are followed, except one back to a folder it sits
    in, whose files are found through that folder already."""
    if not os.path.isdir(root):
        raise InputError(f"image folder {root!r}: not an existing directory")
    layout = f"images must sit in class folders {os.path.join(root, '<class>', '…')}"
    entries = _listed(root, root)
    stray = [name for name, kind in entries if kind != "dir"]
    if stray:
        raise InputError(f"image folder {root!r}: {stray[0]!r} is a file in the folder; {layout}")
    classes = tuple(name for name, _ in entries)
    if not classes:
        raise InputError(f"image folder {root!r}: no class folders; {layout}")
    top = _identity(root, root)
    files: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        found = _class_files(root, name, top)
        if not found:
            raise InputError(
                f"image folder {root!r}: class folder {os.path.join(root, name)!r} has no images"
            )
        files += ((relative, label) for relative in sorted(found))
    return ImageFolder(root, classes, tuple(files))


def folder_identity(folder: ImageFolder) -> dict[str, object]:
    """What decoded tensors depend on, for a cache key: every file's bytes and the class layout
    (names, each file's relative path and class), never where the folder is: a folder moved or
    copied elsewhere keeps its identity."""
    files = []
    for relative, label in folder.files:
        try:
            digest = file_digest(folder.path(relative))
        except OSError as exc:
            raise InputError(f"image file {folder.path(relative)!r}: {_reason(exc)}") from None
        files.append([relative, label, digest])
    return {"classes": list(folder.classes), "files": files}


def _class_files(root: str, name: str, top: tuple[int, int]) -> list[str]:
    """The image files under class folder `name`, in its subfolders too, relative to root."""
    found: list[str] = []
    pending = [(name, frozenset({top}))]
    while pending:
        relative, above = pending.pop()
        directory = os.path.join(root, relative)
        identity = _identity(directory, root)
        if identity in above:  # a link back to a folder it sits in: a loop
            continue
        for entry, kind in _listed(directory, root):
            path = f"{relative}/{entry}"
            if kind == "dir":
                pending.append((path, above | {identity}))
            elif kind != "file":
                raise InputError(f"image folder {root!r}: {path!r} is not a file (a broken link?)")
            elif os.path.splitext(entry)[1].lower() not in IMAGE_EXTENSIONS:
                raise InputError(
                    f"image folder {root!r}: {path!r} is not an image file (expected one of "
                    f"{', '.join(IMAGE_EXTENSIONS)}, any case); move it out of the folder"
                )
            else:
                found.append(path)
    return found


def _listed(directory: str, root: str) -> list[tuple[str, str]]:
    """(name, "dir" | "file" | "other") of a folder's entries, links followed, hidden ones left
    out; sorted by plain string order, the same in every locale."""
    try:
        with os.scandir(directory) as entries:
            found = [(e.name, _kind(e)) for e in entries if not e.name.startswith(".")]
    except OSError as exc:
        raise InputError(
            f"image folder {root!r}: cannot list {directory!r}: {_reason(exc)}"
        ) from None
    return sorted(found)


def _kind(entry: os.DirEntry[str]) -> str:
    return "dir" if entry.is_dir() else "file" if entry.is_file() else "other"


def _identity(directory: str, root: str) -> tuple[int, int]:
    try:
        stat = os.stat(directory)
    except OSError as exc:
        raise InputError(
            f"image folder {root!r}: cannot read {directory!r}: {_reason(exc)}"
        ) from None
    return stat.st_dev, stat.st_ino


# --- decoding ---------------------------------------------------------------------------------


def decode_images(
    folder: ImageFolder,
    image_size: tuple[int, int] | None = None,
    progress: Callable[[str], None] | None = None,
    digests: Mapping[str, str] | None = None,
    channels: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Every image, decoded once, as one uint8 N×C×H×W tensor in `folder.files` order, and
    their int64 class ids.

    C is 1 when every image is grayscale (by its mode, read from its header before any
    decoding), else 3: a grayscale image among colour ones is repeated into R, G and B. An
    alpha channel is dropped, not composited: the colour values stay as stored, as
    torchvision's ImageFolder loader (`convert("RGB")`) gives them. A multi-frame file (GIF,
    TIFF) gives its first frame; EXIF orientation is not applied, as in torchvision's loader.
    Without `image_size` every image must have the same size; with (H, W), each one of another
    size is resized to it (bilinear, after conversion to 8 bits).

    `digests` (relative path → `folder_identity`'s digest): each image is decoded from bytes
    read once and hashed, and bytes other than the key's are refused: a file rewritten between
    the key and the decoding never stores its new pixels under the old key. `channels` forces
    C (predict: the model's).
    """
    total = len(folder.files)
    image_size = _checked_size(image_size, f"image folder {folder.root!r}")
    if not total:
        raise InputError(f"image folder {folder.root!r}: no images")
    clock = _Progress(progress, total)
    found, size = _shape(folder, image_size, clock)
    channels = channels or found
    height, width = size
    needed = total * channels * height * width
    available = available_memory()
    if available is not None and needed > available:
        raise InputError(
            f"image folder {folder.root!r}: {total:,} images of {channels}×{height}×{width} need "
            f"about {needed / 1e9:.1f} GB of memory, but only {available / 1e9:.1f} GB is available"
        )
    images = torch.empty((total, channels, height, width), dtype=torch.uint8)
    # A view of the same memory: each image is written straight into its slot, never stacked.
    # One thread: Pillow decodes without the GIL, yet a thread pool gained nothing measurable on
    # two cores.
    slots = images.numpy()
    for i, (relative, _) in enumerate(folder.files):
        path = folder.path(relative)
        expected = digests.get(relative) if digests is not None else None
        _put(_decoded(path, image_size, channels, expected), slots[i], path, size)
        clock.step("decoding images", i + 1)
    clock.finish("decoding images")
    labels = torch.tensor([label for _, label in folder.files], dtype=torch.int64)
    return images, labels


def decode_image_file(path: str, image_size: tuple[int, int] | None, channels: int) -> Tensor:
    """One image as a uint8 C×H×W tensor, by decode_images's rules: `channels` 1 (a colour image
    becomes its luminance) or 3; resized to `image_size` (H, W) if given and different."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels!r}")
    decoded = _decoded(path, _checked_size(image_size, f"image file {path!r}"), channels)
    image = torch.empty((channels, *decoded.shape[:2]), dtype=torch.uint8)
    _put(decoded, image.numpy(), path, tuple(decoded.shape[:2]))
    return image


def _checked_size(image_size: tuple[int, int] | None, where: str) -> tuple[int, int] | None:
    if image_size is None:
        return None
    size = tuple(image_size)
    if len(size) != 2 or not all(type(n) is int and n > 0 for n in size):
        raise InputError(f"{where}: the image size must be two positive integers H,W, not {size}")
    height, width = size
    return height, width


def _shape(
    folder: ImageFolder, image_size: tuple[int, int] | None, clock: _Progress
) -> tuple[int, tuple[int, int]]:
    """Channels and H×W of the tensor, from the files' headers alone (no pixel is decoded): a
    size that differs from the first image's, without `image_size`, is an error up front."""
    grayscale = True
    first: tuple[str, tuple[int, int]] | None = None
    for done, (relative, _) in enumerate(folder.files, 1):
        path = folder.path(relative)
        try:
            with Image.open(path) as image:
                mode, size = image.mode, (image.height, image.width)
        except UNREADABLE as exc:
            raise InputError(f"image file {path!r}: {_unreadable(exc)}") from None
        grayscale = grayscale and Image.getmodebase(mode) == "L"
        if first is None:
            first = path, size
        elif image_size is None and size != first[1]:
            raise InputError(
                f"image file {path!r}: {_hw(size)} (H×W), but {first[0]!r} is {_hw(first[1])}; "
                "pass --image-size H,W to resize every image to one size"
            )
        clock.step("reading image headers", done)
    assert first is not None
    return (1 if grayscale else 3), image_size or first[1]


def _decoded(
    path: str, image_size: tuple[int, int] | None, channels: int, digest: str | None = None
) -> np.ndarray:
    """The image's 8-bit pixels, H×W (channels 1) or H×W×3; with `digest`, from bytes that
    hash to it."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"image file {path!r}: {_reason(exc)}") from None
    if digest is not None and xxhash.xxh3_128_hexdigest(data) != digest:
        raise InputError(f"image file {path!r}: changed while being read; run again")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            image = _eight_bit(opened, channels)
            if image_size is not None and (image.height, image.width) != image_size:
                height, width = image_size
                image = image.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=None)
            return np.asarray(image)
    except UNREADABLE as exc:
        raise InputError(f"image file {path!r}: {_unreadable(exc)}") from None


def _eight_bit(image: Image.Image, channels: int) -> Image.Image:
    """`image` in mode "L" (channels 1) or "RGB" (channels 3)."""
    mode = image.mode
    if mode == "F":
        # Floats on the 0–255 scale, as Pillow's own convert("L") reads them; rounded to the
        # nearest (Pillow truncates) and clipped.
        pixels = np.nan_to_num(np.asarray(image), nan=0.0)
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    elif mode == "I" or mode.startswith("I;16"):
        # Integers as 16-bit (a 16-bit PNG or TIFF opens as either mode): the high byte, so the
        # full 0–65535 range maps onto 0–255; Pillow's convert("L") would clip at 255 instead.
        pixels = np.clip(np.asarray(image), 0, 65535).astype(np.uint16)
        image = Image.fromarray((pixels >> 8).astype(np.uint8))
    elif mode in ("P", "PA"):
        # Through RGBA, as Pillow asks for a palette with transparency; the alpha is dropped next.
        image = image.convert("RGBA")
    target = "L" if channels == 1 else "RGB"
    return image if image.mode == target else image.convert(target)


def _put(pixels: np.ndarray, slot: np.ndarray, path: str, size: tuple[int, int]) -> None:
    """Write H×W or H×W×3 pixels into a C×H×W slot."""
    if pixels.shape[:2] != size:  # the header said otherwise: the file changed in between
        raise InputError(f"image file {path!r}: changed while being read; run again")
    slot[...] = pixels if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


class _Progress:
    """Calls `report` once the work has taken PROGRESS_AFTER_S, then at most every
    PROGRESS_EVERY_S, and once at the end if it ever did."""

    def __init__(self, report: Callable[[str], None] | None, total: int):
        self.report, self.total = report, total
        self.start = self.last = time.perf_counter()
        self.said = ""

    def step(self, what: str, done: int) -> None:
        if self.report is None:
            return
        now = time.perf_counter()
        if now - self.start > PROGRESS_AFTER_S and (
            not self.said or now - self.last >= PROGRESS_EVERY_S
        ):
            self.last = now
            self._say(f"{what}: {done}/{self.total}")

    def finish(self, what: str) -> None:
        line = f"{what}: {self.total}/{self.total}"
        if self.report is not None and self.said and self.said != line:
            self._say(line)

    def _say(self, line: str) -> None:
        assert self.report is not None
        self.said = line
        self.report(line)


def _hw(size: tuple[int, int]) -> str:
    return f"{size[0]}×{size[1]}"


def _unreadable(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not an image Pillow can read (unknown format or corrupt header)"
    if isinstance(exc, Image.DecompressionBombError):
        return f"too many pixels ({' '.join(str(exc).split())})"
    if isinstance(exc, OSError) and exc.strerror:
        return _reason(exc)
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return f"cannot be decoded ({reason})"


def _reason(exc: OSError) -> str:
    return exc.strerror or " ".join(str(exc).split()) or type(exc).__name__
