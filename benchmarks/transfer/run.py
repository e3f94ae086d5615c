#!/usr/bin/env python
"""Benchmark: a surrogate distilled from a black-box model's output probabilities as a transfer-attack tool.

Protocol (classification):

* **Data**: as ``benchmarks/adversarial`` (``--data`` ImageFolder root, or
  the synthetic texture set written to ``<out>/data``: 6 classes at 16 px,
  1026 test images); normalisation computed once, given to every run.
* **Target** (role ``target``, seed ``--target-seed``, 1000): the black-box
  model, ``--target CKPT`` (its run folder's ``config.yaml`` is its config,
  with its own normalisation, ``--target-arch`` its architecture;
  ``--target-seed`` then names the seed it was trained with), or trained
  here: ``cnn4w`` (``--target-arch``) with CE for ``--target-epochs`` (20),
  as ``benchmarks/adversarial``'s natural teacher. The target's seed must
  not be a surrogate's: a seed fixes the order of the training batches, and
  a surrogate that saw the target's own order would transfer better for
  that reason alone (an attacker does not know the black box's seed).
* **Surrogates** (``cnn4``, ``mtkd/configs/classify/student_plain.yaml``,
  ``--epochs`` (20; chosen on val with ``--distill-T`` and ``--query-adv``,
  ``benchmarks/README.md``), seeds ``--seeds``):

  - ``distilled``: trained on the target's output probabilities only, no
    labels: ``loss.extra = [st]`` at ``--distill-T`` (4; the target's
    log-probabilities, which its probabilities give up to a constant, at
    temperature T), the target as teacher; with ``--query-adv JSON`` also a
    black-box ``adv_kd`` term (``black_box: true``, source student, at
    ``--distill-T``; the JSON sets the rest, e.g. ``{"objective": "kl",
    "target": "adv", "eps": 0.03, "steps": 1}``): each step the surrogate's
    own gradient moves the images towards its decision boundary and the
    target is queried there (forward only), Papernot et al.'s (AsiaCCS
    2017) substitute training; the target is never differentiated through
    and no label is read (``--mixup off`` with it); and, unless ``--mixup
    off``, a ``mixup_kd`` term (``w_clean: 0``, at ``--distill-T``;
    ``--mixup JSON`` sets the rest, default ``{"w_mix": 1}``): each step the
    target is also queried on mixtures of two training images and the
    surrogate matches it there (Beyer et al.'s CVPR 2022 function matching;
    forward queries only, no labels);
  - ``labels``: trained on the labels alone (``ce``), never sees the target;
    ``--labels-mixup JSON`` adds a ``mixup_ce`` term (mixup training, Zhang
    et al., ICLR 2018: the label-only counterpart of the distilled
    surrogate's mixed queries);
  - ``noise``: no model: random sign noise of the attack's L-inf norm
    (:func:`mtkd.adversarial.attacks.sign_noise`, seeded by the seed).
* **Attack**: ``--attack`` (FGSM, the source design's; or PGD with
  ``--steps``) crafted on the surrogate against the labels, at each of
  ``--eps`` (0.03 and 8/255), applied to the target, through
  ``mtkd attack --surrogate``'s machinery
  (:func:`mtkd.adversarial.report.robustness_report`, its report written to
  ``<run>/transfer/attack.json``).
* **Scores** per surrogate run (percent of the test images the target
  classifies correctly): ``transfer@<eps>`` (flipped by the transferred
  attack), ``whitebox@<eps>`` (the surrogate's own white-box success, of the
  images it classifies correctly), ``clean`` (the surrogate's test top-1);
  the ``noise`` record's ``transfer@<eps>`` is the share the noise flips.
  The same on the val split as ``val_*``: settings (``--distill-T``,
  ``--query-adv``, ``--mixup``) are chosen there, on seeds that never judge.
* **Target** (``derived``): at every eps, the median ``distilled`` transfer
  success over the seeds is at least 5 points above the median ``labels``
  one. The noise baseline and the white-box rates are reported beside it.

Runs go ``--jobs`` at a time (one torch thread each), seed-major, into
``<out>/runs/<role>_s<seed>``; resumable like the other benchmarks
(``--force`` re-runs; another budget stops with an error).

    python benchmarks/transfer/run.py                         # -> benchmarks/transfer/
    python benchmarks/transfer/run.py --target benchmarks/adversarial/runs/teacher_nat_s0/best.pt

Tiny check (seconds): ``python benchmarks/transfer/run.py --quick --out /tmp/transfer``.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402
from benchmarks.adversarial.run import (STUDENT_CFG, TEACHER_CFG, check_budget, classify_base,  # noqa: E402
                                        classify_data, q, recorder)

NAME = "transfer"
ROLES = ("distilled", "labels")
MARGIN = 5.0
"""Points by which the distilled surrogate's median transfer success must beat the label-only one's."""
COST = ("epochs", "steps", "wall_s", "params", "gflops")
MIXUP = '{"w_mix": 1}'
"""The distilled surrogate's ``mixup_kd`` options, chosen on val (``benchmarks/README.md``)."""


def log(msg: str) -> None:
    print(f"[{NAME}] {msg}", flush=True)


def parse(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, default_out=str(ROOT / "benchmarks" / NAME), default_data=None, seeds=(0, 1, 2))
    p.add_argument("--target", default=None,
                   help="the target checkpoint (default: trained into <out>/runs/target_s<--target-seed>)")
    p.add_argument("--target-seed", type=int, default=1000,
                   help="the target's training seed; never one of --seeds (default 1000)")
    p.add_argument("--target-arch", default="cnn4w", help="the target's classifier (default cnn4w)")
    p.add_argument("--target-epochs", type=int, default=None, help="epochs when the target is trained (default 20)")
    p.add_argument("--epochs", type=int, default=None, help="surrogate epochs (default 20)")
    p.add_argument("--distill-T", type=float, default=4.0, help="temperature of the distilled surrogate (default 4)")
    p.add_argument("--query-adv", default=None,
                   help="JSON options of a black-box adv_kd term added to the distilled surrogate's loss "
                        "(module doc), e.g. '{\"objective\": \"kl\", \"target\": \"adv\", \"eps\": 0.03, "
                        "\"steps\": 1}'")
    p.add_argument("--mixup", default=MIXUP,
                   help="JSON options of the mixup_kd term added to the distilled surrogate's loss (module doc; "
                        f"default '{MIXUP}'), or 'off'")
    p.add_argument("--labels-mixup", default="off",
                   help="JSON options of a mixup_ce term added to the label-trained surrogate's loss (module doc), "
                        "e.g. '{\"w_mix\": 1}', or 'off' (default)")
    p.add_argument("--attack", default="fgsm", choices=("fgsm", "pgd"), help="attack crafted on the surrogates")
    p.add_argument("--steps", type=int, default=None, help="PGD steps (default 10; FGSM takes one)")
    p.add_argument("--eps", default="0.03,8/255", help="comma-separated L-inf sizes (default 0.03,8/255)")
    p.add_argument("--roles", nargs="+", default=list(ROLES), choices=ROLES, help="surrogates to train")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs at a time, one torch thread each (default 2 on 2+ cores)")
    p.add_argument("--force", action="store_true", help="re-run (role, seed) pairs already in results.json")
    p.add_argument("--quick", action="store_true", help="a tiny setting that runs every code path in seconds")
    g = p.add_argument_group("synthetic data (without --data)")
    g.add_argument("--classes", type=int, default=None, help="classes (default 6)")
    g.add_argument("--per-class", type=int, default=None, help="training images per class (default 256)")
    g.add_argument("--test-per-class", type=int, default=None, help="test images per class (default 171)")
    g.add_argument("--imgsz", type=int, default=16, help="image side (default 16)")
    args = p.parse_args(argv)
    qk = args.quick
    defaults = {"target_epochs": 1 if qk else 20, "epochs": 1 if qk else 20, "classes": 3 if qk else 6,
                "per_class": 8 if qk else 256, "test_per_class": 4 if qk else 171,
                "jobs": 1 if qk else common.default_jobs()}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if qk:
        args.seeds = args.seeds if "--seeds" in (argv if argv is not None else sys.argv) else [0]
        args.set = ["train.batch=8"] + args.set
    return args


def eps_label(eps: float, text: str) -> str:
    """The column suffix of an eps as the user wrote it (``0.03``, ``8/255``)."""
    return text.strip() or f"{eps:.4g}"


def json_option(text: Optional[str], flag: str, loss: str) -> Optional[Dict[str, Any]]:
    """``text`` parsed as a JSON object of ``loss`` options, or ``None``; a one-line error names ``flag``."""
    from mtkd.errors import ConfigError

    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{flag}: not JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{flag}: expected a JSON object of {loss} options")
    return value


# -- one surrogate: train, then attack the target through it ----------------------------------
def transfer_scores(target_config: str, target_ckpt: str, surrogate_ckpt: Path, out: Path, seed: int,
                    attack: str, eps: Sequence[float], labels: Sequence[str], steps: Optional[int],
                    data: Sequence[str]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(surrogate record keys, noise record keys)`` (module doc), percent of target-correct images: on
    the test split, and on the val split as ``val_*`` (settings are chosen on these)."""
    from mtkd.adversarial.report import robustness_report
    from mtkd.engine.config import load_config

    cfg = load_config(target_config, list(data))
    rec: Dict[str, Any] = {}
    noise: Dict[str, Any] = {"attack": {"name": "sign_noise", "eps": list(eps), "split": "test"}}

    def pct(v: Optional[float]) -> Optional[float]:
        return None if v is None else 100.0 * float(v)

    for split, pre in (("test", ""), ("val", "val_")):
        rep = robustness_report(cfg, target_ckpt, attack=attack, eps=list(eps), steps=steps, split=split,
                                out=out if split == "test" else out.with_name(out.name + "_val"), checks=False,
                                n_draw=0, seed=seed, surrogate=surrogate_ckpt)
        if split == "test":
            rec["attack"] = {"name": attack, "steps": rep["attack"]["steps"],
                             "random_start": rep["attack"]["random_start"], "step_size": rep["attack"]["step_size"],
                             "eps": list(eps), "split": "test", "labels": True}
        rec[f"{pre}target_clean"] = noise[f"{pre}target_clean"] = float(rep["clean"]["top1"])
        for label, row in zip(labels, rep["transfer"]):
            rec[f"{pre}transfer@{label}"] = pct(row["transfer_success"])
            rec[f"{pre}whitebox@{label}"] = pct(row["surrogate_whitebox_success"])
            noise[f"{pre}transfer@{label}"] = pct(row["noise_success"])
    return rec, noise


def train_transfer_job(config: str, overrides: Sequence[str], seed: int, out: str, epochs: Optional[int],
                       threads: Optional[int], **transfer: Any) -> Tuple[Dict[str, Any], float]:
    """Train a surrogate (:func:`common.train_job`), then :func:`transfer_scores` in the same worker:
    ``report["record"]`` (the surrogate's) and ``report["noise"]``."""
    report, secs = common.train_job(config, overrides, seed, out, epochs, threads)
    rec, noise = transfer_scores(surrogate_ckpt=Path(out) / "best.pt", out=Path(out) / "transfer", seed=seed,
                                 **transfer)
    report["record"] = {"clean": float(report["top1"]), **rec}
    report["noise"] = noise
    return report, secs


def train_target_job(config: str, overrides: Sequence[str], seed: int, out: str, epochs: Optional[int],
                     threads: Optional[int]) -> Tuple[Dict[str, Any], float]:
    """Train the target; its record's ``clean`` is its test top-1."""
    report, secs = common.train_job(config, overrides, seed, out, epochs, threads)
    report["record"] = {"clean": float(report["top1"])}
    return report, secs


# -- verdicts -----------------------------------------------------------------------------------
def verdicts(runs: Sequence[Dict[str, Any]], labels: Sequence[str]) -> Tuple[List[str], Dict[str, Any]]:
    """Per eps: median transfer success of each role, and distilled - labels against :data:`MARGIN`."""
    def med(role: str, key: str) -> Optional[float]:
        v = [float(r[key]) for r in runs if r["role"] == role and isinstance(r.get(key), (int, float))]
        return statistics.median(v) if v else None

    lines: List[str] = []
    summary: Dict[str, Any] = {}
    target = med("target", "clean")
    if target is not None:
        lines.append(f"target: clean top-1 {target:.1f}")
    met = []
    for label in labels:
        key = f"transfer@{label}"
        d, l, n = med("distilled", key), med("labels", key), med("noise", key)
        wb = {r: med(r, f"whitebox@{label}") for r in ROLES}
        parts = [f"{r} {v:.1f}" for r, v in (("distilled", d), ("labels", l), ("noise", n)) if v is not None]
        wbs = ", ".join(f"{r} {v:.1f}" for r, v in wb.items() if v is not None)
        line = f"eps {label}: median transfer success " + ", ".join(parts) + (f" (white-box: {wbs})" if wbs else "")
        if d is not None and l is not None:
            ok = d - l >= MARGIN
            met.append(ok)
            summary[label] = {"distilled": d, "labels": l, "noise": n, "margin": d - l, "met": ok}
            line += f"; distilled - labels {d - l:+.1f} (>= {MARGIN:g}): {'MET' if ok else 'NOT MET'}"
        lines.append(line)
    if met and len(met) == len(labels):
        summary["met"] = all(met)
        lines.append(f"target (every eps): {'MET' if all(met) else 'NOT MET'}")
    else:
        lines.append("target: not yet measurable (distilled or labels runs missing)")
    return lines, summary


# -- main ---------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    from mtkd.adversarial.attacks import make_attack, parse_eps
    from mtkd.env import go_offline
    from mtkd.errors import ConfigError

    go_offline()
    args = parse(argv)
    texts = [t for t in args.eps.split(",") if t.strip()]
    eps = [parse_eps(t, "--eps") for t in texts]
    labels = [eps_label(e, t) for e, t in zip(eps, texts)]
    for e in eps:  # bad settings fail before anything trains
        make_attack(args.attack, e, args.steps, key="--attack")
    if args.target_seed in args.seeds:
        raise ConfigError(f"--target-seed {args.target_seed} is one of --seeds: that surrogate would train in "
                          "the target's own batch order")
    mixup_text = None if args.mixup.strip().lower() == "off" else args.mixup
    if args.query_adv is not None and mixup_text is not None:
        raise ConfigError("--query-adv and --mixup: both make the extra query images; give --mixup off")
    query = json_option(args.query_adv, "--query-adv", "adv_kd")
    mixup = json_option(mixup_text, "--mixup", "mixup_kd")
    labels_mixup = json_option(None if args.labels_mixup.strip().lower() == "off" else args.labels_mixup,
                               "--labels-mixup", "mixup_ce")
    query_entry = labels_entry = None
    if query is not None:
        query_entry = {"name": "adv_kd", "T": args.distill_T, **query, "black_box": True, "source": "student"}
    elif mixup is not None:
        query_entry = {"name": "mixup_kd", "T": args.distill_T, "w_clean": 0.0, **mixup}
    if labels_mixup is not None:
        labels_entry = {"name": "mixup_ce", **labels_mixup}
    from mtkd.losses import build_loss

    for flag, entry in (("--query-adv" if query is not None else "--mixup", query_entry),
                        ("--labels-mixup", labels_entry)):
        if entry is not None:  # bad options fail before anything trains
            build_loss(entry["name"], flag, **{k: v for k, v in entry.items() if k != "name"})
    extra = common.extra_overrides(args)
    data = classify_data(args)
    base = classify_base(data, args.imgsz, extra)
    target_data = [f"data.root={q(str(data))}"] + extra  # the target keeps its own normalisation
    out = Path(args.out)
    res_budget = {"epochs": args.epochs, "teacher_epochs": args.target_epochs, "teacher_arch": args.target_arch,
                  "target_seed": args.target_seed,
                  "eps": eps, "eval_steps": args.steps, "attack": args.attack, "distill_T": args.distill_T,
                  "query_adv": query, **({"mixup": mixup} if mixup is not None else {}),
                  **({"labels_mixup": labels_mixup} if labels_mixup is not None else {}),
                  "data": str(data), "overrides": extra, "teacher": args.target, "seeds": list(args.seeds),
                  "jobs": args.jobs}
    check_budget(out / "results.json", res_budget, args.force)
    res = common.Results(out, NAME, data=data, budget=res_budget, metrics=("clean",) + tuple(
        f"transfer@{label}" for label in labels), cost=COST)

    def refresh() -> None:
        lines, summary = verdicts(res.runs, labels)
        res.write(derived=lines, summary=summary)

    threads = 1 if args.jobs > 1 else None
    drop = common.METRICS
    # the target
    ts = args.target_seed
    if args.target is not None:
        target = Path(args.target)
        target_config = target.parent / "config.yaml"
        if not target.is_file() or not target_config.is_file():
            raise ConfigError(f"--target {target}: needs the checkpoint and its run's config.yaml beside it")
        if args.force or not res.has("target", ts):
            from mtkd.engine.config import load_config
            from mtkd.engine.trainer import evaluate_checkpoint

            report = evaluate_checkpoint(load_config(str(target_config), target_data), target, "test")
            rec = common.make_record("target", ts, report, given=str(target), clean=float(report["top1"]))
            for k in drop:
                rec.pop(k, None)
            res.add(rec)
    else:
        target = res.run_dir("target", ts) / "best.pt"
        target_config = target.parent / "config.yaml"
        if args.force or not res.has("target", ts) or not target.is_file():
            loss = [{"name": "ce"}]
            common.run_jobs([(("target", ts, target.parent, {"loss": loss}),
                              {"config": str(TEACHER_CFG), "seed": ts, "out": str(target.parent),
                               "epochs": args.target_epochs,
                               "overrides": base + [f"model.backbone={q(args.target_arch)}",
                                                    f"loss.extra={q(loss)}"]})],
                            1, None, recorder(res, refresh, drop), desc=f"{NAME} target", job=train_target_job)
    if not target.is_file():
        raise ConfigError(f"{target}: the target did not train")
    # the surrogates, seed-major
    base_done = recorder(res, refresh, drop)

    def on_done(key: tuple, report: Optional[Dict[str, Any]], secs: float, error: Optional[Exception]) -> None:
        if error is None and key[0] == "distilled":
            res.add({"role": "noise", "seed": int(key[1]), "epochs": 0, "steps": 0, "wall_s": 0.0, "params": None,
                     "gflops": None, **report["noise"]}, write=False)
        base_done(key, report, secs, error)

    teacher = [f"teacher.ckpt={q(str(target))}", f"teacher.model={q({'name': args.target_arch})}"]
    losses = {"distilled": [{"name": "st", "T": args.distill_T}], "labels": [{"name": "ce"}]}
    if query_entry is not None:
        losses["distilled"].append(query_entry)
    if labels_entry is not None:
        losses["labels"].append(labels_entry)
    jobs = []
    for seed in args.seeds:
        for role in args.roles:
            if res.has(role, seed) and not args.force:
                continue
            ov = base + [f"loss.extra={q(losses[role])}"] + (teacher if role == "distilled" else [])
            out_dir = res.run_dir(role, seed)
            jobs.append(((role, seed, out_dir, {"loss": losses[role]}),
                         {"config": str(STUDENT_CFG), "overrides": ov, "seed": seed, "out": str(out_dir),
                          "epochs": args.epochs}))
    job = functools.partial(train_transfer_job, target_config=str(target_config), target_ckpt=str(target),
                            attack=args.attack, eps=eps, labels=labels, steps=args.steps, data=target_data)
    common.run_jobs(jobs, args.jobs, threads, on_done, desc=NAME, job=job)
    refresh()
    print("\n".join(res.payload.get("derived", [])))
    log(f"wrote {res.json_path} and {res.md_path}")
    return res.payload


if __name__ == "__main__":
    common.cli(main, NAME)
