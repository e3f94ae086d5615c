#!/usr/bin/env python
"""Where a student's mIoU is lost: finding objects, or naming their class.

Scores trained runs' ``best.pt`` on one split (default VAL: a diagnosis
that may steer the choice of KD settings must never read the test split)
and splits the segmentation confusion matrix in two parts:

* ``fg_iou``: the IoU of "any object" against background, classes merged
  (does the model find the objects' pixels?);
* ``fg_class_acc``: among the pixels that are an object in the labels and
  in the prediction, the share given the right class (does it name them?);

beside ``miou`` (every class, background included, as in training) and
``bg_iou``. Class 0 is background (the project's convention).

    python benchmarks/kd_gain/seg_errors.py --data data/small \\
        teacher=runs/small/teacher 'plain=benchmarks/kd_gain/runs/plain_s*' \\
        'kd=benchmarks/kd_gain/segcwd_c2c3/runs/kd_s?'

Each ``ROLE=GLOB`` names run folders (``best.pt`` and ``config.yaml``
inside); a seed is read from a folder name ending in ``_s<N>``. Writes
``--out``/``seg_errors.json`` (``runs``: role, seed, run, split, the
checkpoint's epochs and steps, params, gflops, ``wall_s`` of the scoring,
metrics) and a Markdown table of min / median / max per role.
"""
from __future__ import annotations

import argparse
import glob
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from benchmarks.common import data_overrides, stats  # noqa: E402

KEYS = ("miou", "bg_iou", "fg_iou", "fg_class_acc")


def split_confusion(matrix: torch.Tensor) -> Dict[str, float]:
    """``miou``/``bg_iou``/``fg_iou``/``fg_class_acc`` of a (K, K) confusion matrix, row = target,
    class 0 = background. mIoU averages the classes present in the target or the prediction."""
    m = matrix.double()
    tp = m.diag()
    union = m.sum(0) + m.sum(1) - tp
    present = union > 0
    fg_both = m[1:, 1:].sum()  # object in the labels and in the prediction, any class
    fg_union = fg_both + m[0, 1:].sum() + m[1:, 0].sum()
    return {"miou": float((tp[present] / union[present]).mean()) if present.any() else 0.0,
            "bg_iou": float(tp[0] / union[0]) if union[0] > 0 else 0.0,
            "fg_iou": float(fg_both / fg_union) if fg_union > 0 else 0.0,
            "fg_class_acc": float(tp[1:].sum() / fg_both) if fg_both > 0 else 0.0}


def confusion(run: Path, data: Sequence[str], split: str) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """Segmentation confusion matrix of ``run/best.pt`` on ``split``, accumulated by the
    evaluator itself (:func:`mtkd.tasks.multitask.evaluation.collect`, original pixels), and the
    record's other fields (epochs, steps, params, gflops of that checkpoint)."""
    from mtkd.checkpoint import load_checkpoint
    from mtkd.engine.config import load_config
    from mtkd.engine.trainer import load_model
    from mtkd.tasks.multitask.evaluation import collect

    cfg = load_config(run / "config.yaml", [*data, "train.device=cpu"])
    task, model, _, device = load_model(cfg, run / "best.pt")
    ds = task.build_dataset(cfg, split, False)
    scores = collect(model, DataLoader(ds, batch_size=64, collate_fn=task.collate), ds, device=device)
    if scores.confusion is None:
        raise SystemExit(f"{run}: no segmentation output on data.{split}")
    ck = load_checkpoint(run / "best.pt")  # its epoch and step (load_model keeps only the weights)
    info = task.model_info(model, cfg)
    return scores.confusion.matrix, {"epochs": ck.get("epoch"), "steps": ck.get("step"),
                                     "params": info.get("params"), "gflops": info.get("gflops")}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("roles", nargs="+", metavar="ROLE=GLOB", help="run folders of a role (shell glob)")
    p.add_argument("--data", default="data/small", help="the data the runs were trained on")
    p.add_argument("--split", default="val", choices=("val", "test", "train"))
    p.add_argument("--out", default=str(Path(__file__).parent / "seg_errors"))
    args = p.parse_args(argv)
    from mtkd.env import go_offline

    go_offline()
    torch.set_num_threads(1)
    data = data_overrides(args.data)
    runs: List[Dict[str, Any]] = []
    for spec in args.roles:
        role, sep, pattern = spec.partition("=")
        folders = sorted(Path(f) for f in glob.glob(pattern) if (Path(f) / "best.pt").is_file())
        if not sep or not folders:
            raise SystemExit(f"{spec}: expected ROLE=GLOB matching run folders with a best.pt")
        for run in folders:
            seed = re.search(r"_s(\d+)$", run.name)
            start = time.perf_counter()
            matrix, fields = confusion(run, data, args.split)
            metrics = split_confusion(matrix)
            runs.append({"role": role, "seed": int(seed.group(1)) if seed else None, "run": str(run),
                         "split": args.split, **fields, "wall_s": round(time.perf_counter() - start, 2),
                         "metrics": metrics})
            print(f"{role:10s} {run}: " + "  ".join(f"{k} {metrics[k]:.3f}" for k in KEYS), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "seg_errors", "data": args.data, "split": args.split, "runs": runs}
    (out / "seg_errors.json").write_text(json.dumps(payload, indent=1) + "\n")
    lines = [f"# seg_errors ({args.split} split, `{args.data}`)", "",
             "| role | seeds | " + " | ".join(f"{k} min / med / max" for k in KEYS) + " |",
             "|---|---|" + "---|" * len(KEYS)]
    for role in dict.fromkeys(r["role"] for r in runs):
        mine = [r for r in runs if r["role"] == role]
        cells = []
        for k in KEYS:
            s = stats([r["metrics"][k] for r in mine])
            cells.append(f"{s['min']:.3f} / {s['median']:.3f} / {s['max']:.3f}")
        seeds = ",".join(str(r["seed"]) for r in mine if r["seed"] is not None) or "-"
        lines.append(f"| {role} | {seeds} | " + " | ".join(cells) + " |")
    (out / "seg_errors.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return payload


if __name__ == "__main__":
    main()
