"""``mtkd prune`` and ``mtkd export``: registered in :data:`mtkd.cli.COMMANDS` (nothing heavy is imported here)."""
from __future__ import annotations

import argparse

from mtkd.cli import _load, _overrides, command


def _ratio(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None


# -- prune ---------------------------------------------------------------------------
@command("prune", help="structured channel pruning of a checkpoint (Torch-Pruning); recover with "
                       "mtkd train ... model.init=<out>/best.pt")
def _prune_args(p: argparse.ArgumentParser):
    _overrides(p)
    p.add_argument("--ckpt", required=True, help="checkpoint to prune (best.pt of a run, or a pruned one)")
    p.add_argument("--out", required=True, metavar="DIR", help="writes DIR/best.pt (pruned) and DIR/prune.json")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--ratio", type=_ratio, metavar="R", help="share of each layer's channels to remove, in (0, 1)")
    how.add_argument("--target-gflops", type=float, metavar="G",
                     help="prune in steps until the model costs at most G GFLOPs at data.imgsz")
    p.add_argument("--importance", choices=("magnitude", "taylor", "lamp"), default="magnitude",
                   help="channel ranking: weight L2 norm (default), |weight x grad| on training batches, or LAMP")
    p.add_argument("--global", dest="global_pruning", action="store_true",
                   help="rank channels over the whole network instead of per layer")
    p.add_argument("--round-to", type=int, default=8, metavar="N",
                   help="keep channel counts multiples of N (default 8; 1 = no rounding)")
    return _run_prune


def _run_prune(args: argparse.Namespace) -> int:
    from mtkd.export.prune import check_ratio, prune_checkpoint, summary

    if args.ratio is not None:
        check_ratio(args.ratio)  # before the config is read
    report = prune_checkpoint(_load(args), args.ckpt, args.out, ratio=args.ratio, target_gflops=args.target_gflops,
                              importance=args.importance, global_pruning=args.global_pruning,
                              round_to=args.round_to)
    print(summary(report))
    print(f"pruned checkpoint written to {args.out}/best.pt; recover with: "
          f"mtkd train {args.config} model.init={args.out}/best.pt ...")
    return 0


# -- export --------------------------------------------------------------------------
@command("export", help="export a checkpoint (pruned or not) to ONNX, checked against PyTorch in onnxruntime")
def _export_args(p: argparse.ArgumentParser):
    _overrides(p)
    p.add_argument("--ckpt", required=True, help="checkpoint to export (best.pt of a run, or a pruned one)")
    p.add_argument("--format", dest="fmt", choices=("onnx",), default="onnx")
    p.add_argument("--out", required=True, metavar="FILE", help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18, as Ultralytics)")
    p.add_argument("--no-simplify", dest="simplify", action="store_false", help="skip onnxslim")
    p.add_argument("--int8", action="store_true",
                   help="also write <out stem>.int8.onnx: static INT8 (onnxruntime, QDQ, per-channel) and "
                        "<out stem>.int8.json, its metric drop against the fp32 file on the val split")
    p.add_argument("--calib", type=int, default=None, metavar="N",
                   help="training images to calibrate the INT8 ranges on (default 64)")
    p.add_argument("--parity-images", type=int, default=None, metavar="N",
                   help="val images the INT8 metric drop is measured on (default 100)")
    return _run_export


def _run_export(args: argparse.Namespace) -> int:
    from mtkd.errors import ConfigError
    from mtkd.export.onnx import export_checkpoint

    if not args.int8 and (args.calib is not None or args.parity_images is not None):
        raise ConfigError("--calib and --parity-images apply to --int8 only")
    report = export_checkpoint(_load(args), args.ckpt, args.out, fmt=args.fmt, opset=args.opset,
                               simplify=args.simplify, int8=args.int8, calib=args.calib,
                               parity_images=args.parity_images)
    par = report["parity"]
    diffs = ", ".join(f"{k} {v:.2g}" for k, v in par["max_abs_diff"].items())
    print(f"wrote {report['path']} ({report['bytes'] / 1e6:.2f} MB, opset {report['opset']}, {report['nodes']} nodes"
          f"{', simplified from ' + str(report['nodes_exported']) if report['simplified'] else ''}; "
          f"outputs {', '.join(report['outputs'])})")
    print(f"parity with PyTorch on {par['images']} val images: max abs diff {diffs}; "
          f"{par['boxes_checked']} boxes matched after NMS")
    if "int8" in report:
        from mtkd.export.quantize import summary

        print(summary(report["int8"]))
    return 0
