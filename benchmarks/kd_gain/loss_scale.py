#!/usr/bin/env python
"""Magnitudes of every loss term at the start of training, to choose KD weights.

Builds the trainer of a config (fresh student, the configured teacher, the
losses), runs ``--batches`` training batches through the student and the
teacher without any optimizer step (``Trainer.loss_terms``: no gradients,
student in train mode) and prints the mean of each logged term over them. Logged values are the terms
*before* their ``weight`` (and before alpha/ratio), so a weight that makes a
soft term match its hard term is ``hard / soft``. The numbers in the header
of ``mtkd/configs/synthetic_kd.yaml`` come from::

    python benchmarks/kd_gain/loss_scale.py mtkd/configs/synthetic_kd.yaml --batches 3 \\
        --set train.workers=0
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import build_trainer, take_batches  # noqa: E402


def term_means(config: str, overrides: Sequence[str], batches: int, seed: int = 0) -> Dict[str, float]:
    """Mean of each logged loss term over the first ``batches`` training batches
    (:meth:`mtkd.engine.trainer.Trainer.loss_terms`)."""
    tr = build_trainer(config, overrides, seed)
    sums: Dict[str, float] = {}
    got = take_batches(tr.train_loader, batches)
    for batch in got:
        for k, v in tr.loss_terms(batch).items():
            sums[k] = sums.get(k, 0.0) + v
    return {k: v / len(got) for k, v in sums.items()}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    args = p.parse_args(argv)
    from mtkd.env import go_offline

    go_offline()  # offline switches first

    means = term_means(args.config, args.set, args.batches, args.seed)
    lines: List[str] = [f"{k:32s} {v:10.4f}" for k, v in means.items()]
    print("\n".join(lines))
    return means


if __name__ == "__main__":
    main()
