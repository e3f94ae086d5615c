"""The ``mtkd`` command line.

Subcommands live in one registry, :data:`mtkd.registry.COMMANDS`; a module
adds its own with::

    @command("demo", help="...")
    def _demo_args(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
        p.add_argument(...)
        return run_demo            # called with the parsed namespace, returns an exit code

and, if it lives outside this file, one entry in the registry's
``locations`` (imported before the parser is built). Any :class:`~mtkd.errors.MtkdError`
prints ``error: <message>`` on one line to stderr and exits with status 2; a
training run stopped by SIGINT/SIGTERM (:class:`~mtkd.errors.Interrupted`)
prints one line saying how to resume and exits with 128 + the signal number.

``--offline`` (before or after the command) calls :func:`mtkd.env.go_offline`
before the command runs: Ultralytics, albumentations and the Hugging Face Hub
then make no network requests. Without it mtkd sets no environment variables
(``mtkd demo`` calls it itself).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

if __name__ == "__main__":
    # python -m mtkd.cli: run the imported module, so that its commands register once
    from mtkd.cli import main as _package_main

    sys.exit(_package_main())

from mtkd.errors import ConfigError, Interrupted, MtkdError, writing  # noqa: E402
from mtkd.registry import COMMANDS, summary  # noqa: E402

Runner = Callable[[argparse.Namespace], int]
Setup = Callable[[argparse.ArgumentParser], Runner]


def command(name: str, help: str) -> Callable[[Setup], Setup]:
    """Register ``setup`` (adds the arguments, returns the runner) as subcommand ``name``;
    ``help`` is its one-line description (kept as the function's docstring)."""

    def deco(setup: Setup) -> Setup:
        setup.__doc__ = help
        return COMMANDS.register(name)(setup)

    return deco


def _overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config YAML: a file, else a packaged config (e.g. synthetic_kd.yaml, "
                                   "classify/teacher.yaml; a leading configs/ is allowed)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def _load(args: argparse.Namespace, extra: Sequence[str] = ()) -> Dict[str, Any]:
    from mtkd.engine.config import load_config

    return load_config(args.config, list(args.overrides) + list(extra))


# -- train ---------------------------------------------------------------------------
@command("train", help="train a model (teacher, student or distilled student)")
def _train_args(p: argparse.ArgumentParser) -> Runner:
    _overrides(p)
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                   help="continue from PATH (default: <out>/last.pt); give it after the overrides")
    return _run_train


def _run_train(args: argparse.Namespace) -> int:
    from mtkd.engine.trainer import train

    cfg = _load(args)
    if args.resume is not None:
        cfg["train"]["resume"] = args.resume
    try:
        report = train(cfg)
    except Interrupted as exc:
        command = shlex.join(["mtkd", "train", args.config, *args.overrides, "--resume"])
        raise Interrupted(exc.reason, exc.exit_code, command) from None
    if report:
        print(format_table(report))
    return 0


# -- eval ----------------------------------------------------------------------------
TABLE_KEYS = ("map50_95", "map50", "miou", "params", "gflops", "latency_ms")


def format_table(metrics: Dict[str, Any], keys: Sequence[str] = TABLE_KEYS) -> str:
    """A two-row text table of the ``keys`` present in ``metrics``."""
    cols = [k for k in keys if k in metrics]
    cells = []
    for k in cols:
        v = metrics[k]
        cells.append(f"{v:,}" if isinstance(v, int) else f"{v:.4f}" if isinstance(v, float) else str(v))
    widths = [max(len(c), len(v)) for c, v in zip(cols, cells)]
    head = "  ".join(c.rjust(w) for c, w in zip(cols, widths))
    row = "  ".join(v.rjust(w) for v, w in zip(cells, widths))
    return f"{head}\n{row}"


@command("eval", help="evaluate a checkpoint on a split")
def _eval_args(p: argparse.ArgumentParser) -> Runner:
    _overrides(p)
    p.add_argument("--ckpt", required=True, help="checkpoint (best.pt / last.pt)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--json", default=None, metavar="OUT", help="also write the metrics to this JSON file")
    return _run_eval


def _run_eval(args: argparse.Namespace) -> int:
    from mtkd.engine.trainer import evaluate_checkpoint

    metrics = evaluate_checkpoint(_load(args), args.ckpt, args.split)
    print(format_table(metrics))
    if args.json:
        with writing(args.json):
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(metrics, indent=2))
    return 0


# -- predict -------------------------------------------------------------------------
@command("predict", help="predict an image, or every image of a folder, with a checkpoint or an exported ONNX file")
def _predict_args(p: argparse.ArgumentParser) -> Runner:
    p.add_argument("config", nargs="?", default=None,
                   help="run config YAML (as for train); optional with --onnx, where only eval.predict_conf and "
                        "eval.iou are read from it")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--ckpt", help="checkpoint (best.pt / last.pt); needs the config")
    model.add_argument("--onnx", metavar="FILE", help="a file written by mtkd export, run in onnxruntime: class "
                                                      "names, input size and normalisation come from the file")
    p.add_argument("--source", required=True, help="an image file, or a folder of images (searched recursively)")
    p.add_argument("--out", required=True, help="output folder")
    return _run_predict


def _run_predict(args: argparse.Namespace) -> int:
    if args.onnx is not None:
        from mtkd.engine.config import build_config
        from mtkd.export.runtime import predict_onnx

        e = (_load(args) if args.config is not None else build_config({}))["eval"]
        predict_onnx(args.onnx, args.source, args.out, conf=float(e["predict_conf"]), iou=float(e["iou"]))
    else:
        from mtkd.engine.trainer import predict_checkpoint

        if args.config is None:
            raise ConfigError("predict --ckpt: give the run config the checkpoint was trained with")
        predict_checkpoint(_load(args), args.ckpt, args.source, args.out)
    print(f"predictions written to {args.out}")
    return 0


# -- make-synthetic ------------------------------------------------------------------
@command("make-synthetic", help="write the synthetic multi-task dataset (VOC, COCO and YOLO layouts)")
def _synthetic_args(p: argparse.ArgumentParser) -> Runner:
    p.add_argument("--out", required=True, help="output root (configs expect data/synthetic, data/small)")
    p.add_argument("--testbed", choices=("small", "large"), default=None,
                   help="the settings of a benchmark testbed (sizes, objects, clutter); options given "
                        "explicitly override them")
    p.add_argument("--n-train", type=int, default=None, help="training images (default 64, or the testbed's)")
    p.add_argument("--n-val", type=int, default=None, help="validation images (default 16, or the testbed's)")
    p.add_argument("--n-test", type=int, default=None, help="test images (default 16, or the testbed's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seg-missing", type=float, default=None, help="fraction of train images without masks")
    p.add_argument("--det-missing", type=float, default=None, help="fraction of train images without boxes")
    p.add_argument("--formats", nargs="+", default=["voc", "coco", "yolo"], choices=("voc", "coco", "yolo"),
                   help="layouts to write (default all three)")
    return _run_synthetic


def _run_synthetic(args: argparse.Namespace) -> int:
    from mtkd.datasets.synthetic import TESTBEDS, make_synthetic

    kwargs = dict(TESTBEDS[args.testbed]) if args.testbed else {"n_train": 64, "n_val": 16, "n_test": 16}
    given = {"n_train": args.n_train, "n_val": args.n_val, "n_test": args.n_test,
             "seg_missing": args.seg_missing, "det_missing": args.det_missing}
    kwargs.update({k: v for k, v in given.items() if v is not None})
    make_synthetic(args.out, seed=args.seed, formats=tuple(args.formats), **kwargs)
    print(f"synthetic dataset written to {args.out}")
    return 0


# -- list ----------------------------------------------------------------------------
LISTS = ("losses", "tasks", "formats", "presets", "commands")


def list_entries(what: str) -> List[Tuple[str, str]]:
    """``(name, description)`` rows of one of :data:`LISTS`.

    A registered loss or dataset format is described by the first sentence
    of the docstring of its module when that module registers only it (the
    loss modules open with the paper), else of its class, and a loss adds
    what it needs (``requires``); a task by its class docstring, a command
    by its help, a model preset by its settings.
    """
    from mtkd import registry

    if what == "presets":
        from mtkd.models import PRESETS

        return [(n, ", ".join(f"{k}={v}" for k, v in p.items())) for n, p in PRESETS.items()]
    table = {"losses": registry.LOSSES, "tasks": registry.TASKS, "formats": registry.FORMATS,
             "commands": registry.COMMANDS}[what]
    entries = list(table.items())
    per_module = Counter(obj.__module__ for _, obj in entries)
    rows = []
    for name, obj in entries:
        own_module = what in ("losses", "formats") and per_module[obj.__module__] == 1
        text = summary(sys.modules[obj.__module__] if own_module else obj)
        needs = sorted(getattr(obj, "requires", ()) or ()) if what == "losses" else []
        rows.append((name, f"{text} (needs: {', '.join(needs)})" if needs else text))
    return rows


@command("list", help="list the registered losses, tasks, dataset formats, model presets or commands")
def _list_args(p: argparse.ArgumentParser) -> Runner:
    p.add_argument("what", nargs="?", choices=LISTS, default=None, help="one table (default: all of them)")
    return _run_list


def _run_list(args: argparse.Namespace) -> int:
    for what in [args.what] if args.what else LISTS:
        if not args.what:
            print(f"{what}:")
        rows = list_entries(what)
        width = max((len(n) for n, _ in rows), default=0)
        for name, text in rows:
            print(f"{'  ' if not args.what else ''}{name.ljust(width)}  {text}".rstrip())
    return 0


# -- yolo ----------------------------------------------------------------------------
@command("yolo", help="distil into or prune an Ultralytics YOLO model: mtkd yolo train model=... teacher=... "
         "data=...; mtkd yolo prune model=... ratio=...")
def _yolo_args(p: argparse.ArgumentParser) -> Runner:
    p.add_argument("args", nargs=argparse.REMAINDER, help="[train|prune] key=value ... (Ultralytics style)")
    return _run_yolo


def _run_yolo(args: argparse.Namespace) -> int:
    from mtkd.yolo.cli import main as yolo_main

    return yolo_main(list(args.args))


# -- entry point ---------------------------------------------------------------------
OFFLINE_HELP = ("set the offline switches (YOLO_OFFLINE, YOLO_AUTOINSTALL, NO_ALBUMENTATIONS_UPDATE, "
                "HF_HUB_OFFLINE, where unset) and a local YOLO_CONFIG_DIR with a font, before running")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtkd", description="multi-task knowledge distillation")
    parser.add_argument("--offline", action="store_true", help=OFFLINE_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, setup in COMMANDS.items():
        help_text = summary(setup)
        p = sub.add_parser(name, help=help_text, description=help_text)
        # also accepted after the command (tools/*.py put the command first); SUPPRESS keeps
        # the subparser from resetting a flag given before the command
        p.add_argument("--offline", action="store_true", default=argparse.SUPPRESS, help=OFFLINE_HELP)
        p.set_defaults(_run=setup(p))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; returns the exit code (2 for an MtkdError, printed on one line)."""
    args = build_parser().parse_args(argv)
    if args.offline:
        from mtkd.env import go_offline

        go_offline()
    try:
        return int(args._run(args) or 0)
    except Interrupted as exc:
        print(exc, file=sys.stderr)
        return exc.exit_code
    except MtkdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

