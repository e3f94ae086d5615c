"""Training-log plots (matplotlib's Agg backend): :func:`plot_loss_curves` draws ``curves.png``."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mtkd.errors import DataError  # noqa: E402


def _read_log(csv_path: Path) -> Dict[str, List[float]]:
    """Numeric columns of a log CSV (``epoch`` first); empty cells become NaN."""
    try:
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise DataError(f"{csv_path}: log file not found") from None
    if not rows or "epoch" not in rows[0]:
        raise DataError(f"{csv_path}: expected a CSV with a header containing an 'epoch' column and data rows")
    columns: Dict[str, List[float]] = {}
    for name in rows[0]:
        values = []
        for row in rows:
            cell = (row.get(name) or "").strip()
            try:
                values.append(float(cell) if cell else math.nan)
            except ValueError:
                break
        else:
            columns[name] = values
    if "epoch" not in columns:
        raise DataError(f"{csv_path}: the 'epoch' column is not numeric")
    return columns


def plot_loss_curves(csv_path: str | Path, png_path: str | Path) -> Path:
    """One subplot per numeric logged column of ``csv_path`` against ``epoch``.

    Non-numeric columns (e.g. a time stamp) are skipped; empty cells are gaps.
    Raises DataError naming the CSV when it is missing, has no ``epoch``
    column, or has no rows. Returns the PNG path.
    """
    csv_path, png_path = Path(csv_path), Path(png_path)
    columns = _read_log(csv_path)
    epoch = columns.pop("epoch")
    if not columns:
        raise DataError(f"{csv_path}: no numeric column to plot besides 'epoch'")
    n = len(columns)
    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.6 * nrows), squeeze=False)
    for ax, (name, values) in zip(axes.flat, columns.items()):
        ax.plot(epoch, values, marker="o", markersize=2, linewidth=1.2)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
