"""Writes the small tables in this folder, deterministically: python tests/data/make_tables.py

scaled_binary.csv: 569 rows, 30 features, a binary target, shaped like the public breast-cancer
table that the issue tried: features from about 0.001 to 4,000, far from zero, and the class
carried mostly by the small ones. Unstandardized, gradient steps see only the large columns.
"""

from pathlib import Path

import numpy as np

HERE = Path(__file__).parent


def scaled_binary(rows: int = 569, features: int = 30, seed: int = 7) -> np.ndarray:
    rng = np.random.RandomState(seed)
    z = rng.randn(rows, features)
    weights = np.zeros(features)
    weights[:10] = rng.uniform(1.0, 2.0, 10) * rng.choice([-1, 1], 10)  # the small columns
    label = (z @ weights + 0.5 * rng.randn(rows) > 0).astype(np.float64)
    scales = np.logspace(np.log10(2.5e-4), np.log10(500), features)  # medians 0.001 … 2000
    x = scales * (4 + z)  # positive, like measurements, and far from zero
    return np.column_stack([x, label])


def main() -> None:
    table = scaled_binary()
    header = ",".join([*(f"f{j:02d}" for j in range(table.shape[1] - 1)), "label"])
    np.savetxt(
        HERE / "scaled_binary.csv", table, delimiter=",", header=header, comments="", fmt="%.6g"
    )


if __name__ == "__main__":
    main()
