#!/usr/bin/env python
"""Benchmark: adversarially robust distillation against PGD-AT and TRADES (classification), and
adversarial fine-tuning of the multi-task student (``--multitask``).

Classification (default)
------------------------
* **Data.** ``--data`` (an ImageFolder root with ``train/``, ``val/``,
  ``test/``), or the synthetic texture set of
  :func:`mtkd.tasks.classify.cli.make_classify_data` written to
  ``<out>/data``: 6 classes at 16 px (the two grating frequencies of 6
  classes stay below the Nyquist limit of 16 px), 256 train / 64 val / 171
  test images per class, so the test split has 1026 images. Normalisation
  is computed once from the training images and given to every run.
* **Teachers** (``cnn4w``, ``--teacher-arch``; seed 0, ``--teacher-epochs``
  (20), trained once, side by side, and timed: ``wall_s``): ``teacher_nat`` (CE)
  and ``teacher_at``, adversarially trained with ``--teacher-at-loss``:
  ``trades`` (beta 6, the default: RSLAD's and AdaAD's published students
  distil TRADES-trained teachers) or ``pgd_at`` (Madry's PGD-AT).
* **Students** (``mtkd/configs/classify/student_plain.yaml``: ``cnn4``, the
  same ``--epochs`` (10), batch, schedule and seeds for every role; the loss is
  ``loss.extra``):

  - ``plain``: ``ce``;
  - ``kd``: ``0.1 ce + 0.9 st`` (T 4), Hinton KD on clean inputs, AT teacher;
  - ``pgd_at``: ``pgd_at``; ``trades``: ``trades`` (beta 6); no teacher;
  - ``ard``, ``rslad``, ``adaad``, ``kd_adv``: ``adv_kd`` with that preset,
    AT teacher;
  - ``ard_nat``, ``rslad_nat``: ``adv_kd`` preset ``ard`` / ``rslad`` with
    the natural teacher.

  Every crafting loss trains with the same cheap attack: PGD-``--train-steps``
  (3) at ``--eps`` (4/255) with step 2.5 eps / steps and the loss's own
  random start.
* **Checkpoint choice** (``--select``): ``robust`` (the default) keeps, for
  every run that trains on attacked images (``pgd_at``, ``trades``, the
  presets and ``teacher_at``), the epoch of best val top-1 under PGD-10 at
  the training eps (``eval.attack``, ``train.save_best_on: robust_top1``):
  robust accuracy peaks before clean accuracy in adversarial training (Rice
  et al., ICML 2020). ``plain``, ``kd`` and ``teacher_nat`` keep clean val
  top-1. ``clean`` chooses every run on clean val top-1.
* **Scores** (each run, in its worker after training, on the TEST split with
  its ``best.pt``):
  ``clean`` (top-1, %) and ``robust`` (top-1 under PGD-``--eval-steps`` (20)
  at the training eps, step 2.5 eps / 20, uniform random start, against the
  labels), through :func:`mtkd.adversarial.report.robustness_report` (the
  report of ``mtkd attack`` is written to ``<run>/attack/attack.json``);
  each record carries the attack's settings (``attack``). The teachers also
  get the gradient-masking checks (``checks``; ``--no-checks`` skips them).
* **Target** (``derived``): with the adversarially trained teacher, the best
  preset (ard, rslad, adaad, kd_adv; by median robust) has its worst seed
  above PGD-AT's best seed on robust top-1, with its median clean top-1 at
  most 2 points below PGD-AT's. Reported beside it: each preset with the
  natural teacher against the AT teacher, and every role against PGD-AT.

Multi-task (``--multitask``)
----------------------------
The small testbed (``mtkd/configs/small/student.yaml``, data ``data/small``)
fine-tuned for ``--mt-epochs`` (1) from ``--init CKPT`` (the plain student's
converged checkpoint, through ``model.init``), 3 seeds, roles:

* ``plain``: the student config (clean hard losses);
* ``pgd_at``: plus ``pgd_at`` with ``output: multitask`` (the hard losses on
  ``x'``, weighted by the config's ``loss.det.ratio`` / ``loss.seg.ratio``);
* ``adv_kd``: plus ``adv_kd`` with ``output: multitask`` (``seg_kl`` +
  ``det_mse`` on ``x'`` against the teacher ``--teacher-ckpt``), with
  ``--mt-adv-kd`` (JSON) settings, by default :data:`MT_ADV_KD` (chosen on
  val). The classification presets do not apply to multi-task outputs;
  this is the preset role of the multi-task part.

Teachers, seed 0, before the students: ``teacher`` scores ``--teacher-ckpt``
itself (clean and robust, no training), and with ``--mt-teacher-at N``
``teacher_at`` fine-tunes it N epochs with ``pgd_at`` (as the ``pgd_at``
role, from the teacher's weights); ``adv_kd`` then distils that one.

Training attack PGD-``--train-steps`` at ``--mt-eps`` (4/255); scores on the
test split: ``map50_95``/``map50``/``miou`` and ``robust_map50``/
``robust_miou``/``robust_map50_95`` under PGD-``--mt-eval-steps`` (10) at
``--mt-eps`` (seg CE + detection loss against the labels); the same on the
val split as ``val_robust_*`` beside the attacked checkpoint's clean
``val_*``, on which settings are chosen (``--seeds 100 101``). Target: the
``adv_kd`` median robust mIoU and mAP50 each >= half its own clean median
and >= the ``plain`` median robust value + 0.05.

Runs go ``--jobs`` at a time (default 2 on 2+ cores, one torch thread each),
seed-major so the roles interleave, into ``<out>/runs/<role>_s<seed>``;
records go to ``<out>/results.json`` as they finish and a ``(role, seed)``
already there is skipped (``--force`` re-runs), so the benchmark resumes
across sittings; a sitting whose budget differs from the stored runs' stops
with an error instead of mixing them.

    python benchmarks/adversarial/run.py                      # -> benchmarks/adversarial/
    python benchmarks/adversarial/run.py --multitask --init runs/small/student/best.pt
                                                              # -> benchmarks/adversarial/multitask/

Tiny check (seconds): ``--quick`` (3 classes, a few images, 1 epoch, PGD-1 /
PGD-2, one seed, one job), e.g.
``python benchmarks/adversarial/run.py --quick --out /tmp/adv --roles plain pgd_at rslad``.
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

NAME = "adversarial"
CONFIGS = ROOT / "mtkd" / "configs"
TEACHER_CFG = CONFIGS / "classify" / "teacher.yaml"
STUDENT_CFG = CONFIGS / "classify" / "student_plain.yaml"
MT_STUDENT_CFG = CONFIGS / "small" / "student.yaml"
MT_TEACHER_CFG = CONFIGS / "small" / "teacher.yaml"

TEACHERS = ("teacher_nat", "teacher_at")
PRESETS = ("ard", "rslad", "adaad", "kd_adv")
NAT_PRESETS = ("ard", "rslad")
ROLES = ("plain", "kd", "pgd_at", "trades") + PRESETS + tuple(f"{p}_nat" for p in NAT_PRESETS)
MT_ROLES = ("plain", "pgd_at", "adv_kd")
MT_TEACHERS = ("teacher", "teacher_at")
MT_PRESET = "adv_kd"
CLS_METRICS = ("clean", "robust")
MT_METRICS = ("map50", "miou", "robust_map50", "robust_miou")
COST = ("epochs", "steps", "wall_s", "params", "gflops")
CLEAN_SLACK = 2.0
"""The best preset's median clean top-1 may be this many points below PGD-AT's."""
MT_ADV_KD: Dict[str, Any] = {"target": "clean", "T": 2.0, "w_adv": 2.0,
                             "det_kd": {"weight": 2.0, "w_box": 0.1, "w_obj": 10.0, "w_cls": 10.0}}
"""The multi-task ``adv_kd`` role's options, chosen on the val split (seeds 100 and 101) among 7 settings
(``benchmarks/README.md``): the adversarial seg_kl at weight 2 and det_mse at weight 4 with the small
testbed's ``kd.yaml`` term weights, against the natural teacher on clean inputs."""
MT_MARGIN = 0.05
"""The multi-task preset's robust median must beat the plain student's by this much."""
CHECKED = ("epochs", "teacher_epochs", "teacher_arch", "teacher_at_loss", "select", "eps", "train_steps", "eval_steps", "data", "overrides",
           "init", "teacher", "teacher_at_epochs", "adv_kd", "distill_T", "query_adv", "attack", "target_seed")
"""Budget keys that must match the stored runs' for a sitting to add to them."""


def log(msg: str) -> None:
    print(f"[{NAME}] {msg}", flush=True)


def parse(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, default_out=None, default_data=None, seeds=(0, 1, 2))
    p.add_argument("--roles", nargs="+", default=None,
                   help=f"student roles to run (default all: {' '.join(ROLES)}; multi-task: {' '.join(MT_ROLES)})")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs at a time, one torch thread each (default 2 on 2+ cores)")
    p.add_argument("--train-steps", type=int, default=None, help="PGD steps of the training attack (default 3)")
    p.add_argument("--force", action="store_true", help="re-run (role, seed) pairs already in results.json")
    p.add_argument("--quick", action="store_true",
                   help="a tiny setting that runs every code path in seconds (checks the plumbing, not robustness)")
    c = p.add_argument_group("classification")
    c.add_argument("--epochs", type=int, default=None, help="student epochs, every role (default 10)")
    c.add_argument("--teacher-epochs", type=int, default=None, help="epochs of both teachers (default 20)")
    c.add_argument("--teacher-arch", default="cnn4w", help="teacher classifier (default cnn4w)")
    c.add_argument("--teacher-at-loss", choices=("trades", "pgd_at"), default="trades",
                   help="how teacher_at is adversarially trained (default trades)")
    c.add_argument("--eps", default="4/255", help="L-inf eps of training and evaluation (default 4/255)")
    c.add_argument("--eval-steps", type=int, default=None, help="PGD steps of the robust score (default 20)")
    c.add_argument("--select", choices=("robust", "clean"), default="robust",
                   help="val top-1 that chooses the best checkpoint of the runs that train on attacked images: "
                        f"under PGD-{SELECT_STEPS} (robust, default) or clean")
    c.add_argument("--checks", action=argparse.BooleanOptionalAction, default=None,
                   help="gradient-masking checks on the teachers (default on)")
    c.add_argument("--classes", type=int, default=None, help="synthetic set: classes (default 6)")
    c.add_argument("--per-class", type=int, default=None, help="synthetic set: training images per class (256)")
    c.add_argument("--test-per-class", type=int, default=None, help="synthetic set: test images per class (171)")
    c.add_argument("--imgsz", type=int, default=None, help="synthetic set and runs: image side (default 16)")
    m = p.add_argument_group("multi-task (--multitask)")
    m.add_argument("--multitask", action="store_true", help="the multi-task part on the small testbed")
    m.add_argument("--init", default=None, help="the plain student's checkpoint every role fine-tunes from")
    m.add_argument("--teacher-ckpt", default=None, help="multi-task teacher (default runs/small/teacher/best.pt)")
    m.add_argument("--mt-epochs", type=int, default=None, help="fine-tuning epochs (default 1)")
    m.add_argument("--mt-eps", default="4/255", help="L-inf eps of training and evaluation (default 4/255)")
    m.add_argument("--mt-eval-steps", type=int, default=None, help="PGD steps of the robust scores (default 10)")
    m.add_argument("--mt-teacher-at", type=int, default=None,
                   help="epochs of PGD-AT fine-tuning of the teacher for adv_kd (default 0: the natural teacher)")
    m.add_argument("--mt-adv-kd", default=json.dumps(MT_ADV_KD),
                   help="JSON options of the adv_kd role's loss (besides output, eps, steps, step_size; "
                        "default: the setting chosen on val, MT_ADV_KD)")
    args = p.parse_args(argv)
    q = args.quick
    if args.multitask:
        tb = common.TESTBEDS["small"]
        args.testbed = "small"
        defaults: Dict[str, Any] = {"out": str(ROOT / "benchmarks" / NAME / "multitask"), "data": tb["data"],
                                    "teacher_ckpt": tb["teacher_ckpt"], "mt_epochs": 1, "mt_teacher_at": 0, "train_steps": 1 if q else 3,
                                    "mt_eval_steps": 1 if q else 10, "roles": list(MT_ROLES)}
        if args.init is None:
            p.error("--multitask needs --init CKPT (the plain student's checkpoint to fine-tune)")
    else:
        defaults = {"out": str(ROOT / "benchmarks" / NAME), "epochs": 1 if q else 10,
                    "teacher_epochs": 1 if q else 20, "train_steps": 1 if q else 3, "eval_steps": 2 if q else 20,
                    "checks": not q, "classes": 3 if q else 6, "per_class": 8 if q else 256,
                    "test_per_class": 4 if q else 171, "imgsz": 16, "roles": list(ROLES)}
    defaults["jobs"] = 1 if q else common.default_jobs()
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if q:
        args.seeds = args.seeds if "--seeds" in (argv if argv is not None else sys.argv) else [0]
        args.set = (["train.batch=8"] if not args.multitask else
                    ["train.batch=4", "train.max_steps=1", "eval.max_batches=1", "data.cache=false"]) + args.set
    known = MT_ROLES if args.multitask else ROLES
    bad = [r for r in args.roles if r not in known]
    if bad:
        p.error(f"--roles: unknown {' '.join(bad)}; known: {' '.join(known)}")
    return args


# -- one run: train, then attack its best.pt ---------------------------------------------------
def robust_scores(out: str | Path, seed: int, eps: float, steps: int, checks: bool = False,
                  ckpt: Optional[str | Path] = None, config: Optional[str | Path] = None,
                  overrides: Sequence[str] = ()) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(record keys, clean test metrics)`` of a finished run: its ``best.pt`` (or ``ckpt``, with the config ``config``)
    attacked with PGD-``steps`` at ``eps`` (:func:`mtkd.adversarial.report.robustness_report`, written to
    ``<out>/attack``); ``overrides`` apply to ``config``.

    Classification: ``clean`` and ``robust`` top-1 on the test split; multi-task: ``robust_map50``,
    ``robust_miou`` and ``robust_map50_95`` on the test split, and the same on the val split as
    ``val_robust_*`` with the clean ``val_*`` of the attacked checkpoint (settings are chosen on these).
    Always ``attack`` (the settings) and, with ``checks``, the masking checks. The clean test metrics
    are those of the attacked checkpoint's report."""
    from mtkd.adversarial.report import robustness_report
    from mtkd.engine.config import load_config

    out = Path(out)
    cfg = load_config(str(config if config is not None else out / "config.yaml"), list(overrides))
    ckpt = Path(ckpt) if ckpt is not None else out / "best.pt"
    rep = robustness_report(cfg, ckpt, attack="pgd", eps=[eps], steps=steps, split="test",
                            out=out / "attack", checks=checks, n_draw=0, seed=seed)
    attacked = rep["attacked"][0]["metrics"]
    rec: Dict[str, Any] = {"attack": {"name": "pgd", "eps": eps, "eps_255": eps * 255, "steps": steps,
                                      "step_size": rep["attack"]["step_size"][0],
                                      "random_start": rep["attack"]["random_start"], "split": "test",
                                      "labels": True}}
    if rep["task"] == "classify":
        rec.update(clean=float(rep["clean"]["top1"]), robust=float(attacked["top1"]))
    else:
        keys = ("map50", "miou", "map50_95")
        rec.update({f"robust_{k}": float(attacked[k]) for k in keys if k in attacked})
        val = robustness_report(cfg, ckpt, attack="pgd", eps=[eps], steps=steps, split="val",
                                out=out / "attack_val", checks=False, n_draw=0, seed=seed)
        rec.update({f"val_robust_{k}": float(v) for k, v in val["attacked"][0]["metrics"].items() if k in keys})
        rec.update({f"val_{k}": float(v) for k, v in val["clean"].items() if k in keys})
    if checks:
        rec["checks"] = {c["name"]: c["passed"] for c in rep["checks"]}
        rec["check_warnings"] = list(rep["warnings"])
    return rec, {k: v for k, v in rep["clean"].items() if isinstance(v, (int, float))}


def score_job(ckpt: str, config: str, overrides: Sequence[str], seed: int, out: str, threads: Optional[int],
              eps: float = 8 / 255, steps: int = 20, checks: bool = False) -> Tuple[Dict[str, Any], float]:
    """An existing checkpoint's clean and robust scores, as :func:`train_attack_job` gives a trained
    run's (the job of :func:`common.run_jobs`): the report holds its clean test metrics."""
    import time

    import torch

    from mtkd.env import go_offline

    go_offline()
    if threads:
        torch.set_num_threads(int(threads))
    t0 = time.perf_counter()
    rec, report = robust_scores(out, seed, eps, steps, checks, ckpt=ckpt, config=config, overrides=overrides)
    report["record"] = rec
    return report, time.perf_counter() - t0


def train_attack_job(config: str, overrides: Sequence[str], seed: int, out: str, epochs: Optional[int],
                     threads: Optional[int], eps: float = 8 / 255, steps: int = 20,
                     checks: bool = False) -> Tuple[Dict[str, Any], float]:
    """:func:`benchmarks.common.train_job`, then :func:`robust_scores` in the same worker; the scores go
    to ``report["record"]`` (the job of :func:`common.run_jobs`)."""
    report, secs = common.train_job(config, overrides, seed, out, epochs, threads)
    report["record"], _ = robust_scores(out, seed, eps, steps, checks)
    return report, secs


def recorder(res: common.Results, refresh: Any, drop: Sequence[str] = ()) -> Any:
    """``on_done`` of :func:`common.run_jobs` for jobs keyed ``(role, seed, out, extra)``: the record is
    :func:`common.make_record` plus ``report["record"]`` and ``extra``, without the keys ``drop``."""
    def on_done(key: tuple, report: Optional[Dict[str, Any]], secs: float, error: Optional[Exception]) -> None:
        role, seed, out, extra = key
        if error is not None:
            log(f"{role} seed {seed} failed: {error}")
            return
        rec = common.make_record(role, seed, report, out=out, total_s=secs, **extra)
        rec.update(report.get("record") or {})
        for k in drop:
            rec.pop(k, None)
        res.add(rec)
        refresh()
    return on_done


def check_budget(path: Path, budget: Dict[str, Any], force: bool) -> None:
    """Stop when ``path``'s stored runs used another budget (keys :data:`CHECKED`)."""
    if force or not path.is_file():
        return
    prev = json.loads(path.read_text()).get("budget", {})
    for key in CHECKED:
        if key in prev and key in budget and prev[key] != budget[key]:
            raise SystemExit(f"[{NAME}] {path}: its runs used {key}={prev[key]!r}, this sitting {budget[key]!r}; "
                             "use the same settings, another --out, or --force")


def q(value: Any) -> str:
    """An override value (JSON is YAML)."""
    return json.dumps(value)


# -- classification -----------------------------------------------------------------------------
def classify_data(args: argparse.Namespace) -> Path:
    """``--data`` (an ImageFolder root), or the synthetic set written to ``<out>/data`` when missing."""
    if args.data is not None:
        root = Path(args.data)
        if not (root / "train").is_dir():
            from mtkd.errors import DataError

            raise DataError(f"--data {root}: expected an ImageFolder root with train/, val/ and test/")
        return root
    root = Path(args.out) / "data"
    if not (root / "test").is_dir():
        from mtkd.tasks.classify.cli import make_classify_data

        print(f"[benchmark] writing the synthetic classification set to {root} ...", flush=True)
        make_classify_data(root, n_classes=args.classes, n_per_class=args.per_class,
                           n_test_per_class=args.test_per_class, imgsz=args.imgsz, seed=0)
    return root


def classify_base(data: Path, imgsz: int, extra: Sequence[str]) -> List[str]:
    """Overrides of every classification run: data, the normalisation computed once, no
    augmentation, no plots.

    The texture classes are (orientation, frequency) pairs of a grating, so
    the classify task's default augmentation changes the label: a horizontal
    flip turns orientation 60 degrees into 120, and a 0.6-1.0 scale crop
    moves the frequency by up to 1.3x where neighbouring classes are 1.6x
    apart (measurements: benchmarks/README.md, "adversarial").
    """
    from mtkd.tasks.classify.data import compute_mean_std

    mean, std = compute_mean_std(data / "train", imgsz)
    return [f"data.root={q(str(data))}", f"data.imgsz={imgsz}", f"data.mean={q(mean)}", f"data.std={q(std)}",
            "data.augment.enabled=false", "train.plots=false", "train.tensorboard=false",
            "train.patience=null"] + list(extra)


def attack_options(eps: float, steps: int) -> Dict[str, Any]:
    """The training attack of every crafting loss: PGD-``steps`` at ``eps``, step 2.5 eps / steps."""
    return {"eps": eps, "steps": steps, "step_size": 2.5 * eps / max(steps, 1)}


#: PGD steps of the robust val score that ``--select robust`` chooses checkpoints on.
SELECT_STEPS = 10


def select_overrides(loss: Sequence[Dict[str, Any]], eps: float, select: str) -> List[str]:
    """Overrides that choose the best checkpoint of a run with ``loss.extra`` ``loss`` (``--select``)."""
    crafts = any(term["name"] in ("pgd_at", "trades", "adv_kd") for term in loss)
    if select != "robust" or not crafts:
        return []
    return [f"eval.attack={q({'name': 'pgd', 'eps': eps, 'steps': SELECT_STEPS})}", "train.save_best_on=robust_top1"]


def role_loss(role: str, atk: Dict[str, Any], teacher_at_loss: str = "trades"
              ) -> Tuple[List[Dict[str, Any]], Optional[str]]:
    """``(loss.extra, teacher)`` of a classification role; teacher ``"teacher_at"``, ``"teacher_nat"`` or None.
    ``teacher_at`` trains like the role ``teacher_at_loss`` (``trades`` or ``pgd_at``)."""
    if role == "teacher_at":
        role = teacher_at_loss
    if role in ("plain", "teacher_nat"):
        return [{"name": "ce"}], None
    if role == "kd":
        return [{"name": "ce", "weight": 0.1}, {"name": "st", "weight": 0.9, "T": 4.0}], "teacher_at"
    if role == "pgd_at":
        return [{"name": "pgd_at", **atk}], None
    if role == "trades":
        return [{"name": "trades", "beta": 6.0, **atk}], None
    nat = role.endswith("_nat")
    preset = role[: -len("_nat")] if nat else role
    return [{"name": "adv_kd", "preset": preset, **atk}], "teacher_nat" if nat else "teacher_at"


def _values(runs: Sequence[Dict[str, Any]], role: str, key: str) -> List[float]:
    return [float(r[key]) for r in runs if r["role"] == role and isinstance(r.get(key), (int, float))]


def classify_verdicts(runs: Sequence[Dict[str, Any]]) -> Tuple[List[str], Dict[str, Any]]:
    """Teacher lines, every role against PGD-AT, natural vs AT teacher, and the target (module doc)."""
    lines: List[str] = []
    summary: Dict[str, Any] = {}
    for t in TEACHERS:
        for r in (r for r in runs if r["role"] == t):
            failed = [k for k, ok in (r.get("checks") or {}).items() if not ok]
            lines.append(f"{t}: clean {r['clean']:.1f}, robust {r['robust']:.1f} (PGD-{r['attack']['steps']} at "
                         f"{r['attack']['eps_255']:.3g}/255), {r['steps']} steps in {r['wall_s']:.0f} s"
                         + (f"; masking checks failed: {', '.join(failed)}" if failed else
                            "; masking checks passed" if r.get("checks") else ""))
    pgd_r, pgd_c = _values(runs, "pgd_at", "robust"), _values(runs, "pgd_at", "clean")
    for role in ROLES:
        r, c = _values(runs, role, "robust"), _values(runs, role, "clean")
        if not r:
            continue
        vs = ""
        if pgd_r and role != "pgd_at":
            vs = f" ({statistics.median(r) - statistics.median(pgd_r):+.1f} vs pgd_at)"
        lines.append(f"{role}: median clean {statistics.median(c):.1f}, median robust {statistics.median(r):.1f}{vs}")
    for p in NAT_PRESETS:
        at, nat = _values(runs, p, "robust"), _values(runs, f"{p}_nat", "robust")
        if at and nat:
            m_at, m_nat = statistics.median(at), statistics.median(nat)
            lines.append(f"{p}: median robust with the AT teacher {m_at:.1f}, with the natural teacher {m_nat:.1f} "
                         f"({m_at - m_nat:+.1f})")
    medians = {p: statistics.median(_values(runs, p, "robust")) for p in PRESETS if _values(runs, p, "robust")}
    if not medians or not pgd_r:
        lines.append("target: not yet measurable (pgd_at or the presets missing)")
        return lines, summary
    best = max(medians, key=medians.get)
    worst, pgd_best = min(_values(runs, best, "robust")), max(pgd_r)
    clean_gap = statistics.median(_values(runs, best, "clean")) - statistics.median(pgd_c)
    met = worst > pgd_best and clean_gap >= -CLEAN_SLACK
    summary["target"] = {"best_preset": best, "worst_seed_robust": worst, "pgd_at_best_seed_robust": pgd_best,
                         "clean_vs_pgd_at": clean_gap, "met": met}
    lines.append(f"target (AT teacher): best preset {best}: worst seed robust {worst:.1f} vs PGD-AT best seed "
                 f"{pgd_best:.1f}, median clean {clean_gap:+.1f} vs PGD-AT (>= -{CLEAN_SLACK:g}): "
                 f"{'MET' if met else 'NOT MET'}")
    return lines, summary


def run_classify(args: argparse.Namespace, extra: List[str]) -> Dict[str, Any]:
    from mtkd.adversarial.attacks import parse_eps

    eps = parse_eps(args.eps, "--eps")
    data = classify_data(args)
    base = classify_base(data, args.imgsz, extra)
    budget = {"epochs": args.epochs, "teacher_epochs": args.teacher_epochs, "teacher_arch": args.teacher_arch,
              "teacher_at_loss": args.teacher_at_loss, "select": args.select,
              "eps": eps, "train_steps": args.train_steps, "eval_steps": args.eval_steps, "data": str(data),
              "overrides": extra, "seeds": list(args.seeds), "jobs": args.jobs, "imgsz": args.imgsz}
    out = Path(args.out)
    check_budget(out / "results.json", budget, args.force)
    res = common.Results(out, NAME, data=data, budget=budget, metrics=CLS_METRICS, cost=COST)

    def refresh() -> None:
        lines, summary = classify_verdicts(res.runs)
        res.write(derived=lines, summary=summary)

    on_done = recorder(res, refresh, drop=common.METRICS)
    atk = attack_options(eps, args.train_steps)
    job = functools.partial(train_attack_job, eps=eps, steps=args.eval_steps)
    threads = 1 if args.jobs > 1 else None
    arch = [f"model.backbone={q(args.teacher_arch)}"]

    def todo(role: str, seed: int) -> bool:
        return args.force or not res.has(role, seed)

    # phase 1: both teachers, side by side
    jobs = []
    for role in TEACHERS:
        loss, _ = role_loss(role, atk, args.teacher_at_loss)
        out_dir = res.run_dir(role, 0)
        if todo(role, 0) or not (out_dir / "best.pt").is_file():
            jobs.append(((role, 0, out_dir, {"loss": loss}),
                         {"config": str(TEACHER_CFG),
                          "overrides": base + arch + [f"loss.extra={q(loss)}"] + select_overrides(loss, eps, args.select),
                          "seed": 0, "out": str(out_dir), "epochs": args.teacher_epochs}))
    common.run_jobs(jobs, args.jobs, threads, on_done, desc=f"{NAME} teachers",
                    job=functools.partial(job, checks=bool(args.checks)))
    ckpts = {t: res.run_dir(t, 0) / "best.pt" for t in TEACHERS}
    # phase 2: the students, seed-major
    jobs = []
    for seed in args.seeds:
        for role in args.roles:
            if not todo(role, seed):
                continue
            loss, teacher = role_loss(role, atk)
            ov = base + [f"loss.extra={q(loss)}"] + select_overrides(loss, eps, args.select)
            if teacher is not None:
                if not ckpts[teacher].is_file():
                    log(f"{role} seed {seed}: no {teacher} checkpoint ({ckpts[teacher]}), skipped")
                    continue
                ov += [f"teacher.ckpt={q(str(ckpts[teacher]))}", f"teacher.model={q({'name': args.teacher_arch})}"]
            out_dir = res.run_dir(role, seed)
            jobs.append(((role, seed, out_dir, {"loss": loss, "teacher": teacher}),
                         {"config": str(STUDENT_CFG), "overrides": ov, "seed": seed, "out": str(out_dir),
                          "epochs": args.epochs}))
    common.run_jobs(jobs, args.jobs, threads, on_done, desc=NAME, job=job)
    refresh()
    return res.payload


# -- multi-task ---------------------------------------------------------------------------------
def multitask_verdicts(runs: Sequence[Dict[str, Any]]) -> Tuple[List[str], Dict[str, Any]]:
    """Per metric (mAP50, mIoU): the preset's robust median against half its clean median and against
    the plain student's robust median + :data:`MT_MARGIN`."""
    lines: List[str] = []
    summary: Dict[str, Any] = {}
    for role in MT_TEACHERS + MT_ROLES:
        parts = [f"{m} {statistics.median(v):.3f}" for m in MT_METRICS if (v := _values(runs, role, m))]
        if parts:
            lines.append(f"{role}: median " + ", ".join(parts))
    checks = []
    for m in ("map50", "miou"):
        clean, rob = _values(runs, MT_PRESET, m), _values(runs, MT_PRESET, f"robust_{m}")
        plain = _values(runs, "plain", f"robust_{m}")
        if not (clean and rob and plain):
            continue
        c, r, p = statistics.median(clean), statistics.median(rob), statistics.median(plain)
        ok = r >= 0.5 * c and r >= p + MT_MARGIN
        checks.append(ok)
        summary[m] = {"clean": c, "robust": r, "plain_robust": p, "met": ok}
        lines.append(f"{MT_PRESET} {m}: robust {r:.3f} vs half its clean {0.5 * c:.3f} and plain robust + "
                     f"{MT_MARGIN} {p + MT_MARGIN:.3f}: {'MET' if ok else 'NOT MET'}")
    if len(checks) == 2:
        summary["met"] = all(checks)
        lines.append(f"target (robust mAP50 and mIoU): {'MET' if all(checks) else 'NOT MET'}")
    else:
        lines.append("target: not yet measurable (plain or adv_kd runs missing)")
    return lines, summary


def mt_pgd_at(cfg: Dict[str, Any], atk: Dict[str, Any]) -> Dict[str, Any]:
    """The ``pgd_at`` entry of a multi-task role: the hard losses on ``x'`` at the config's ratios."""
    w_det, w_seg = (float(cfg["loss"].get(t, {}).get("ratio", 1.0)) for t in ("det", "seg"))
    return {"name": "pgd_at", "output": "multitask", "w_det": w_det, "w_seg": w_seg, **atk}


def mt_role_overrides(role: str, cfg: Dict[str, Any], atk: Dict[str, Any], adv_kd: Dict[str, Any],
                      teacher: Path) -> List[str]:
    """The overrides of a multi-task role on top of the student config (module doc)."""
    extra = list(cfg["loss"].get("extra") or [])
    if role == "plain":
        return []
    if role == "pgd_at":
        return [f"loss.extra={q(extra + [mt_pgd_at(cfg, atk)])}"]
    entry = {"name": "adv_kd", **adv_kd, "output": "multitask", **atk}
    return [f"loss.extra={q(extra + [entry])}", f"teacher.ckpt={q(str(teacher))}"]


def run_multitask(args: argparse.Namespace) -> Dict[str, Any]:
    from mtkd.adversarial.attacks import parse_eps
    from mtkd.engine.config import load_config
    from mtkd.errors import ConfigError

    data_ov, extra = common.prepare(args)
    eps = parse_eps(args.mt_eps, "--mt-eps")
    init, teacher = Path(args.init), Path(args.teacher_ckpt)
    for flag, path in (("--init", init), ("--teacher-ckpt", teacher)):
        if not path.is_file():
            raise ConfigError(f"{flag} {path}: checkpoint not found")
    try:
        adv_kd = json.loads(args.mt_adv_kd)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--mt-adv-kd: not JSON ({exc.msg})") from None
    atk = attack_options(eps, args.train_steps)
    if not isinstance(adv_kd, dict):
        raise ConfigError("--mt-adv-kd: expected a JSON object of adv_kd options")
    from mtkd.losses import build_loss

    build_loss("adv_kd", "--mt-adv-kd", **{**adv_kd, "output": "multitask", **atk})  # fails before training
    budget = {"epochs": args.mt_epochs, "eps": eps, "train_steps": args.train_steps, "eval_steps": args.mt_eval_steps,
              "data": args.data, "overrides": extra, "init": str(init), "teacher": str(teacher), "adv_kd": adv_kd,
              "teacher_at_epochs": args.mt_teacher_at, "seeds": list(args.seeds), "jobs": args.jobs}
    out = Path(args.out)
    check_budget(out / "results.json", budget, args.force)
    res = common.Results(out, f"{NAME} (multi-task)", data=args.data, budget=budget, metrics=MT_METRICS, cost=COST)

    def refresh() -> None:
        lines, summary = multitask_verdicts(res.runs)
        res.write(derived=lines, summary=summary)

    threads = 1 if args.jobs > 1 else None
    score = functools.partial(train_attack_job, eps=eps, steps=args.mt_eval_steps)
    # phase 1: the natural teacher's scores and, with --mt-teacher-at, its PGD-AT fine-tune, side by side
    t_cfg = load_config(MT_TEACHER_CFG, data_ov + extra)
    jobs = []
    if args.force or not res.has("teacher", 0):
        jobs.append((("teacher", 0, res.run_dir("teacher", 0), {"checkpoint": str(teacher)}),
                     {"config": str(MT_TEACHER_CFG), "overrides": data_ov + extra, "seed": 0,
                      "out": str(res.run_dir("teacher", 0)), "epochs": 0}))
    t_at = res.run_dir("teacher_at", 0)
    if args.mt_teacher_at and (args.force or not res.has("teacher_at", 0) or not (t_at / "best.pt").is_file()):
        ov = data_ov + [f"model.init={q(str(teacher))}"] + extra + [
            f"loss.extra={q(list(t_cfg['loss'].get('extra') or []) + [mt_pgd_at(t_cfg, atk)])}"]
        jobs.append((("teacher_at", 0, t_at, {}), {"config": str(MT_TEACHER_CFG), "overrides": ov, "seed": 0,
                                                   "out": str(t_at), "epochs": args.mt_teacher_at}))
    common.run_jobs(jobs, args.jobs, threads, recorder(res, refresh), desc=f"{NAME} multi-task teachers",
                    job=functools.partial(_mt_teacher_job, ckpt=str(teacher), eps=eps, steps=args.mt_eval_steps))
    kd_teacher = t_at / "best.pt" if args.mt_teacher_at else teacher
    # phase 2: the students, seed-major
    base = data_ov + [f"model.init={q(str(init))}"] + extra
    cfg = load_config(MT_STUDENT_CFG, base)
    jobs = []
    for seed in args.seeds:
        for role in args.roles:
            if res.has(role, seed) and not args.force:
                continue
            if role == MT_PRESET and not kd_teacher.is_file():
                log(f"{role} seed {seed}: no teacher checkpoint ({kd_teacher}), skipped")
                continue
            out_dir = res.run_dir(role, seed)
            ov = base + mt_role_overrides(role, cfg, atk, adv_kd, kd_teacher)
            jobs.append(((role, seed, out_dir, {}), {"config": str(MT_STUDENT_CFG), "overrides": ov, "seed": seed,
                                                     "out": str(out_dir), "epochs": args.mt_epochs}))
    common.run_jobs(jobs, args.jobs, threads, recorder(res, refresh), desc=f"{NAME} multi-task", job=score)
    refresh()
    return res.payload


def _mt_teacher_job(config: str, overrides: Sequence[str], seed: int, out: str, epochs: Optional[int],
                    threads: Optional[int], ckpt: str = "", eps: float = 8 / 255, steps: int = 10
                    ) -> Tuple[Dict[str, Any], float]:
    """Phase 1's job: with ``epochs == 0`` :func:`score_job` of ``ckpt``, else :func:`train_attack_job`."""
    if epochs == 0:
        return score_job(ckpt, config, overrides, seed, out, threads, eps=eps, steps=steps)
    return train_attack_job(config, overrides, seed, out, epochs, threads, eps=eps, steps=steps)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    from mtkd.env import go_offline

    go_offline()
    args = parse(argv)
    if args.multitask:
        payload = run_multitask(args)
    else:
        payload = run_classify(args, common.extra_overrides(args))
    print("\n".join(payload.get("derived", [])))
    log(f"wrote {Path(args.out) / 'results.json'} and {Path(args.out) / 'results.md'}")
    return payload


if __name__ == "__main__":
    common.cli(main, NAME)
