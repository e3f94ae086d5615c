#!/usr/bin/env python
"""Probe: which weight average of ONE training trajectory scores best on val?

One ``mtkd train`` run of ``--config`` (with ``--set`` overrides) carries,
besides the trainer's own EMA (``train.ema_decay`` / ``train.ema_tau``,
role ``default``), extra EMA copies of the same weights with the decays of
``--decays`` (the same ``ema_tau`` ramp; roles ``ema<decay>``) and the raw
weights (role ``raw``). At every validation each of them is evaluated on the
VAL split, so their differences come from the averaging alone, not from
another seed or another trajectory. Rows (one per validation) go to
``--out``/``<name>.json``; ``--out``/``results.json`` collects the last row of
every probe there (``runs``: role ``<name>:<average>``, seed, epochs, steps,
``val_fitness``).

    python benchmarks/plateau/ema_probe.py mtkd/configs/small/teacher.yaml --name teacher_e16 \\
        --set train.epochs=16 --seed 0 --out benchmarks/plateau/ema_probe
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import write_results  # noqa: E402
from mtkd.engine.config import load_config  # noqa: E402
from mtkd.engine.ema import ModelEMA  # noqa: E402
from mtkd.engine.trainer import Trainer  # noqa: E402


class AverageProbe:
    """Callback: extra EMAs of the trained weights, all evaluated at each validation."""

    def __init__(self, decays: List[float], rows_path: Path):
        self.decays, self.rows_path = decays, rows_path
        self.emas: Dict[float, ModelEMA] = {}
        self.rows: List[Dict[str, Any]] = []

    def on_step_end(self, trainer: Any, logs: Any) -> None:
        if trainer.ema is None:
            raise SystemExit("ema_probe: train.ema is false in the config, so there is no EMA to compare with")
        if not self.emas:  # same ramp position as the trainer's EMA after this step
            self.emas = {d: ModelEMA(trainer.model, d, trainer.tcfg["ema_tau"], trainer.ema.updates - 1)
                         for d in self.decays}
        for ema in self.emas.values():
            ema.update(trainer.model)

    def on_validation_end(self, trainer: Any, metrics: Dict[str, float]) -> None:
        row: Dict[str, Any] = {"epoch": trainer.epoch + 1, "step": trainer.step,
                               "default": trainer.task.fitness(metrics)}
        models = {"raw": trainer.model, **{f"ema{d}": e.module for d, e in self.emas.items()}}
        for name, model in models.items():
            was = model.training
            m = trainer.task.evaluate(model, trainer.val_loader, trainer.val_ds, trainer.cfg, trainer.device,
                                      trainer.amp)
            model.train(was)
            row[name] = trainer.task.fitness(m)
        self.rows.append(row)
        self.rows_path.write_text(json.dumps(self.rows, indent=1))
        print(json.dumps(row), flush=True)


def collect(out: Path, seed_of: Dict[str, int]) -> None:
    runs = []
    for path in sorted(out.glob("*.json")):
        if path.name in ("results.json", "seeds.json"):
            continue
        rows = json.loads(path.read_text())
        last = rows[-1]
        for key, value in last.items():
            if key in ("epoch", "step"):
                continue
            runs.append({"role": f"{path.stem}:{key}", "seed": seed_of.get(path.stem), "epochs": last["epoch"],
                         "steps": last["step"], "wall_s": None, "val_fitness": value})
    write_results(out, "ema_probe", None, {"note": "last validation of each probe run"}, runs,
                  metrics=("val_fitness",), cost=("epochs", "steps"))


def main(argv: Any = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("--name", required=True, help="this probe's file stem in --out")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decays", type=float, nargs="+", default=[0.999, 0.9995])
    p.add_argument("--out", default=str(ROOT / "benchmarks/plateau/ema_probe"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config, list(args.set) + [f"seed={args.seed}", f"out={out / 'runs' / args.name}"])
    Trainer(cfg, callbacks=[AverageProbe(args.decays, out / f"{args.name}.json")]).fit()
    seeds = json.loads((out / "seeds.json").read_text()) if (out / "seeds.json").exists() else {}
    seeds[args.name] = args.seed
    (out / "seeds.json").write_text(json.dumps(seeds, indent=1))
    collect(out, seeds)


if __name__ == "__main__":
    main()
