"""Per-epoch run logs: ``results.csv`` and TensorBoard scalars (rank 0 only).

Each epoch is one row: ``epoch``, ``step``, ``lr``, ``train_wall_s``, the
epoch means of every logged training term as ``train/<term>`` and the
validation metrics as ``val/<metric>``. The CSV is rewritten whole each epoch
(atomically) with the union of all columns, so terms that appear later (an
auxiliary loss, a metric only computed on validation epochs) get their own
column and empty cells elsewhere. The history is kept as plain dicts so it
travels in ``last.pt`` and a resumed run keeps its earlier rows. A failed
write is a one-line MtkdError naming the file.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Dict, List, Optional

from mtkd.errors import writing

FIRST_COLUMNS = ["epoch", "step", "lr", "train_wall_s"]


class RunLogger:
    def __init__(self, out_dir: str | Path, enabled: bool = True, tensorboard: bool = True,
                 history: Optional[List[Dict[str, float]]] = None):
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.history: List[Dict[str, float]] = list(history or [])
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            with writing(self.out_dir / "tb"):
                self.writer = SummaryWriter(str(self.out_dir / "tb"))

    @property
    def csv_path(self) -> Path:
        return self.out_dir / "results.csv"

    def log_epoch(self, row: Dict[str, float]) -> None:
        if not self.enabled:
            return
        self.history.append(dict(row))
        self._write_csv()
        if self.writer is not None:
            epoch = int(row["epoch"])
            for key, value in row.items():
                if key != "epoch":
                    self.writer.add_scalar(key, value, epoch)
            self.writer.flush()

    def _write_csv(self) -> None:
        columns = list(FIRST_COLUMNS)
        for row in self.history:
            columns += [k for k in row if k not in columns]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=columns, restval="")
        w.writeheader()
        w.writerows(self.history)
        tmp = self.csv_path.with_suffix(".csv.tmp")
        with writing(self.csv_path):
            tmp.write_text(buf.getvalue())
            os.replace(tmp, self.csv_path)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
