"""``mtkd attack``: clean against attacked metrics of a checkpoint (:mod:`mtkd.adversarial.report`)::

    mtkd attack CONFIG [key=value ...] --ckpt CKPT --attack fgsm|pgd --eps 4/255,8/255
                [--steps 10] [--step-size 1/255] [--split test] [--out DIR] [--no-checks]
                [--surrogate CKPT]

Sizes are in 0..1 pixels and accept fractions (``8/255``). Failed
gradient-masking checks print ``warning: ...`` lines; the exit status stays 0.
"""
from __future__ import annotations

import argparse
import sys

from mtkd.cli import Runner, _load, _overrides, command


@command("attack", help="attack a checkpoint (FGSM/PGD): clean vs attacked metrics over eps, masking checks")
def _attack_args(p: argparse.ArgumentParser) -> Runner:
    _overrides(p)
    p.add_argument("--ckpt", required=True, help="checkpoint to attack (best.pt / last.pt)")
    p.add_argument("--attack", default="pgd", help="fgsm or pgd (default pgd)")
    p.add_argument("--eps", default="8/255", help="comma-separated L-inf sizes in 0..1 pixels, e.g. 4/255,8/255")
    p.add_argument("--steps", type=int, default=None, help="PGD steps (default 10)")
    p.add_argument("--step-size", default=None, help="step size (default 2.5*eps/steps for PGD, eps for FGSM)")
    p.add_argument("--random-start", default=None, choices=("none", "uniform", "normal"),
                   help="start of the perturbation (default: uniform for PGD, none for FGSM)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--out", default=None, help="output folder (default <checkpoint folder>/attack)")
    p.add_argument("--no-checks", action="store_true", help="skip the gradient-masking checks (4 more attacks)")
    p.add_argument("--draw", type=int, default=4, help="images in attack_examples.png (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random starts")
    p.add_argument("--no-labels", action="store_true", help="attack the model's own predictions, not the labels")
    p.add_argument("--surrogate", default=None, metavar="CKPT",
                   help="also craft on this checkpoint and apply to the target (transfer success, surrogate "
                        "white-box success, sign-noise baseline)")
    mt = p.add_argument_group("multi-task objective")
    mt.add_argument("--no-seg", action="store_true", help="leave the segmentation CE out of the attacked loss")
    mt.add_argument("--no-det", action="store_true", help="leave the detection loss out of the attacked loss")
    mt.add_argument("--segpgd", action="store_true", help="SegPGD weighting of the segmentation CE")
    return _run_attack


def _run_attack(args: argparse.Namespace) -> int:
    import warnings

    from mtkd.adversarial.attacks import list_of, parse_eps
    from mtkd.adversarial.report import format_report, robustness_report

    cfg = _load(args)
    eps = list_of(args.eps, "--eps")
    step = None if args.step_size is None else parse_eps(args.step_size, "--step-size")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # printed below, once, on one line each
        report = robustness_report(cfg, args.ckpt, attack=args.attack, eps=eps, steps=args.steps, step_size=step,
                                   random_start=args.random_start, split=args.split, out=args.out,
                                   checks=not args.no_checks, n_draw=args.draw, seed=args.seed,
                                   seg=not args.no_seg, det=not args.no_det, segpgd=args.segpgd,
                                   use_labels=not args.no_labels, surrogate=args.surrogate)
    print(format_report(report))
    for msg in report["warnings"]:
        print(f"warning: {msg}", file=sys.stderr)
    print(f"report written to {report['files']['json']}")
    return 0
