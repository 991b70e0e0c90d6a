"""Write scikit-learn's 8×8 digits as an .npz and as a folder of PNGs, with the same pixels."""

import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

HERE = Path(__file__).resolve().parent


def digits() -> tuple[np.ndarray, np.ndarray]:
    """The images as uint8 N×1×8×8 in 0–255 and the labels as int64 N."""
    data = load_digits()
    x = np.round(data.images * 255 / 16).astype(np.uint8)[:, None]
    return x, data.target.astype(np.int64)


def write_npz(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    # A file object, because np.savez appends ".npz" to a name that lacks it.
    with tmp.open("wb") as f:
        np.savez(f, x=x, y=y)
    tmp.replace(path)


def write_folder(root: Path, x: np.ndarray, y: np.ndarray) -> None:
    # Built beside the old folder, then swapped in, so a rerun never leaves a mix of both.
    tmp = root.with_name(f".{root.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted run
    try:
        for label in range(10):
            (tmp / str(label)).mkdir(parents=True)
        for index, (image, label) in enumerate(zip(x, y, strict=True)):
            Image.fromarray(image[0], mode="L").save(tmp / str(label) / f"{index:04d}.png")
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("data"), help="relative to this folder")
    out = HERE / parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    x, y = digits()
    write_npz(out / "digits.npz", x, y)
    write_folder(out / "digits", x, y)
    print(f"wrote {len(y)} digits to {out / 'digits.npz'} and {out / 'digits'}/<class>/*.png")


if __name__ == "__main__":
    main()
