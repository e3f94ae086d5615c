"""``mtkd classify``: make the synthetic ImageFolder set, classify a folder of images.

Training and evaluation go through the generic commands
(``mtkd train classify/teacher.yaml``, ``mtkd eval ...``); this module
adds what they lack for classification::

    mtkd classify make-data --out data/classify [--classes 8 --per-class 64 --test-per-class 32 --imgsz 32]
    mtkd classify predict CONFIG [key=value ...] --ckpt PATH --source FILE|DIR [--labels FILE]

``make-data`` writes ``train/``, ``val/`` and ``test/`` splits plus
``labels.txt`` (:func:`make_classify_data`). ``predict`` prints one
``file class prob`` line per image of ``--source`` (see
:func:`mtkd.tasks.classify.predict.predict_folder`).

Choices made here:

* The test split is a second :func:`make_synthetic_imagefolder` draw with
  seed ``seed + 1`` (its ``val`` folder becomes ``test/``), so test images are
  independent of the train/val draw yet reproducible from ``seed``.
* ``predict`` takes the input size and normalisation from CONFIG; when
  CONFIG's ``data.mean``/``data.std`` are null (a training YAML whose stats
  were computed at training time) they come from the checkpoint's recorded
  config, which always holds them. Class names come from ``--labels``
  (``index name`` per line) or else from the checkpoint.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from mtkd.cli import Runner, command
from mtkd.errors import ConfigError


def make_classify_data(out: Union[str, Path], n_classes: int = 8, n_per_class: int = 64,
                       n_val_per_class: Optional[int] = None, n_test_per_class: int = 32, imgsz: int = 32,
                       seed: int = 0) -> Path:
    """Write the synthetic texture ImageFolder with ``train/``, ``val/``, ``test/`` and ``labels.txt``.

    ``n_val_per_class`` defaults to ``max(1, n_per_class // 4)``; the test
    split is drawn with seed ``seed + 1`` (module doc). Returns ``out``.
    An existing ``out/test`` is replaced.
    """
    from mtkd.tasks.classify.synthetic import make_synthetic_imagefolder

    if n_test_per_class < 1:
        raise ConfigError(f"n_test_per_class: must be >= 1, got {n_test_per_class}")
    out = Path(out)
    make_synthetic_imagefolder(out, n_classes=n_classes, n_per_class=n_per_class, imgsz=imgsz, seed=seed,
                               n_val_per_class=n_val_per_class)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        make_synthetic_imagefolder(tmp, n_classes=n_classes, n_per_class=1, imgsz=imgsz, seed=seed + 1,
                                   n_val_per_class=n_test_per_class)
        if (out / "test").exists():
            shutil.rmtree(out / "test")
        Path(tmp, "val").rename(out / "test")
    return out


def _checkpoint_data(ckpt: Union[str, Path]) -> Dict[str, Any]:
    from mtkd.checkpoint import load_checkpoint

    return dict((load_checkpoint(ckpt).get("config") or {}).get("data") or {})


def classify_predict(cfg: Dict[str, Any], ckpt: Union[str, Path], source: Union[str, Path],
                     labels: Optional[Union[str, Path]] = None) -> List[str]:
    """``file class prob`` lines for image file ``source`` or every image under folder ``source``
    (module doc for the sources of imgsz, mean/std and class names)."""
    from mtkd.tasks.classify.predict import predict_folder
    from mtkd.engine.trainer import load_model
    from mtkd.errors import DataError

    if cfg.get("task") != "classify":
        raise ConfigError(f"task: 'mtkd classify predict' needs a classify config, got {cfg.get('task')!r}")
    if not Path(source).exists():
        raise DataError(f"{source}: source not found (give an image file or a folder of images)")
    data = cfg["data"]
    mean, std = data.get("mean"), data.get("std")
    if mean is None or std is None:
        saved = _checkpoint_data(ckpt)
        mean = mean if mean is not None else saved.get("mean")
        std = std if std is not None else saved.get("std")
        if mean is None or std is None:
            raise ConfigError(f"data.mean/data.std: null in the config and not recorded in {ckpt}")
    _, model, classes, device = load_model(cfg, ckpt)
    return predict_folder(model, source, labels if labels is not None else classes, int(data["imgsz"]),
                          mean, std, device, skip_bad=bool(data.get("skip_bad", False)))


def _run_make_data(args: argparse.Namespace) -> int:
    out = make_classify_data(args.out, n_classes=args.classes, n_per_class=args.per_class,
                             n_val_per_class=args.val_per_class, n_test_per_class=args.test_per_class,
                             imgsz=args.imgsz, seed=args.seed)
    print(f"synthetic classification set written to {out}")
    return 0


def _run_predict(args: argparse.Namespace) -> int:
    from mtkd.engine.config import load_config

    cfg = load_config(args.config, list(args.overrides))
    for line in classify_predict(cfg, args.ckpt, args.source, args.labels):
        print(line)
    return 0


@command("classify", help="image classification: make the synthetic set, classify a folder")
def _classify_args(p: argparse.ArgumentParser) -> Runner:
    sub = p.add_subparsers(dest="classify_command", required=True, metavar="ACTION")
    mk = sub.add_parser("make-data", help="write the synthetic texture ImageFolder (train/val/test)")
    mk.add_argument("--out", required=True, help="output root (the classify configs expect data/classify)")
    mk.add_argument("--classes", type=int, default=8)
    mk.add_argument("--per-class", type=int, default=64, help="training images per class")
    mk.add_argument("--val-per-class", type=int, default=None, help="default: per-class // 4")
    mk.add_argument("--test-per-class", type=int, default=32)
    mk.add_argument("--imgsz", type=int, default=32)
    mk.add_argument("--seed", type=int, default=0)
    mk.set_defaults(_action=_run_make_data)
    pr = sub.add_parser("predict", help="print 'file class prob' for an image or every image of a folder")
    pr.add_argument("config", help="run config YAML: a file (e.g. <run>/config.yaml), else a packaged "
                                    "config (e.g. classify/student_st.yaml)")
    pr.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    pr.add_argument("--ckpt", required=True, help="checkpoint (best.pt / last.pt)")
    pr.add_argument("--source", required=True, help="an image file, or a folder of images (searched recursively)")
    pr.add_argument("--labels", default=None,
                    help="labels file, 'index name' per line (default: the checkpoint's classes)")
    pr.set_defaults(_action=_run_predict)
    return lambda args: int(args._action(args))
