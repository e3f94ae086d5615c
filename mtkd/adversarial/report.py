"""``mtkd attack``: clean against attacked metrics of a checkpoint, over a list of eps.

The task's own evaluator scores every attack: :class:`AttackedLoader` wraps
the split's loader and hands the evaluator attacked batches (crafted with
gradients on, although the evaluators run under ``no_grad`` /
``inference_mode``), so classification reports ``top1``/``top5`` and the
multi-task task ``map50_95``/``map50``/``miou`` exactly as ``mtkd eval``
does. ``eval.max_batches`` limits the images, as there.

Outputs in ``out`` (default ``<checkpoint folder>/attack``):

* ``attack.json``: the attack's settings, clean metrics, attacked metrics per
  eps, the gradient-masking checks and warnings;
* ``attack_curve.png``: the headline metrics against eps (eps 0 = clean);
* ``attack_examples.png``: the task's prediction drawing (``draw_val``) for
  the first images, clean (top) and attacked at the largest eps (bottom). A
  multi-task tile shows the attacked image mapped back to its original size.

Gradient-masking checks (Athalye et al., ICML 2018; Carlini et al., "On
evaluating adversarial robustness", 2019), on the task's ``fitness`` score
(``top1`` for classification) and reported as warnings, not errors:

* at the largest eps of the list: score under PGD-20 <= PGD-10 <= FGSM (more
  steps must not help the model; PGD with the attack's random start, uniform
  when the attack is FGSM);
* every attacked score <= the clean score;
* PGD-20 at eps 0.5 drives the score towards 0 (below 10 % of the clean score).

A check passes within a tolerance of 1 % of the clean score, or one image's
worth of top-1 for classification, since random starts make runs differ
slightly.

Transfer (``surrogate``): the attack is crafted on a second checkpoint (its
architecture from its own recorded ``config.model``, else the target's) and
applied to the target; ``attack.json`` gets a ``transfer`` list per eps with
the target's metrics under the transferred attack and under random sign
noise of the same L-inf norm (:func:`~mtkd.adversarial.attacks.sign_noise`),
and the surrogate's own (white-box) metrics. For classification also the
rates: ``transfer_success`` = fraction of the images the target classifies
correctly that the transferred attack flips, ``surrogate_whitebox_success``
= the same for the surrogate attacked by itself, ``noise_success`` = the
fraction of target-correct images the noise flips.
"""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from mtkd.adversarial.attacks import AttackSpec, attack_batch, make_attack
from mtkd.errors import ConfigError, MtkdError, writing

#: Metrics drawn on the curve and printed, when present.
HEADLINE = ("top1", "map50_95", "map50", "miou")
#: eps of the "falls towards 0" check.
LARGE_EPS = 0.5
#: ... and the fraction of the clean score it must fall below.
LARGE_EPS_FRACTION = 0.1


def normalisation(task: Any, cfg: Dict[str, Any]) -> Tuple[Optional[List[float]], Optional[List[float]]]:
    """The input ``(mean, std)`` of ``cfg``'s data (the task's ``normalisation`` when it has one)."""
    fn = getattr(task, "normalisation", None)
    if fn is not None:
        mean, std = fn(cfg)
    else:
        mean, std = cfg["data"].get("mean"), cfg["data"].get("std")
    return (None if mean is None else [float(v) for v in mean]), (None if std is None else [float(v) for v in std])


class AttackedLoader:
    """Iterates ``loader`` and yields each batch with ``images`` replaced by ``attack(batch)``.

    Batches are drawn and attacked with gradients enabled and outside
    inference mode, whatever the caller (an evaluator) has switched off.
    ``max_batches`` stops early (the evaluator's own limit would draw one
    batch too many).
    """

    def __init__(self, loader: Any, attack: Callable[[Dict[str, Any]], torch.Tensor], device: torch.device,
                 max_batches: Optional[int] = None):
        self.loader, self.attack, self.device, self.max_batches = loader, attack, device, max_batches

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        from mtkd.engine.trainer import to_device

        it = iter(self.loader)
        b = 0
        while self.max_batches is None or b < self.max_batches:
            with torch.inference_mode(False), torch.enable_grad():
                try:
                    batch = to_device(next(it), self.device)
                except StopIteration:
                    return
                images = self.attack(batch)
            b += 1
            yield {**batch, "images": images}

    def __len__(self) -> int:
        n = len(self.loader)
        return n if self.max_batches is None else min(n, self.max_batches)


def _attack_fn(model: nn.Module, spec: AttackSpec, mean: Any, std: Any, device: torch.device, seed: int,
               options: Mapping[str, Any]) -> Callable[[Dict[str, Any]], torch.Tensor]:
    generator = torch.Generator(device=device).manual_seed(seed)

    def fn(batch: Dict[str, Any]) -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            return attack_batch(model, batch, spec, mean, std, generator=generator, **options)
        finally:
            model.train(was_training)

    return fn


class _Scorer:
    """Evaluates a model on a split, clean or under an attack."""

    def __init__(self, task: Any, model: nn.Module, cfg: Dict[str, Any], dataset: Any, loader: Any,
                 device: torch.device, mean: Any, std: Any, options: Mapping[str, Any], seed: int):
        self.task, self.model, self.cfg, self.ds, self.loader = task, model, cfg, dataset, loader
        self.device, self.mean, self.std, self.options, self.seed = device, mean, std, options, seed
        self.amp = bool(cfg["train"]["amp"])
        self.max_batches = cfg["eval"].get("max_batches")
        self.cache: Dict[AttackSpec, Dict[str, float]] = {}

    def clean(self) -> Dict[str, float]:
        return self.task.evaluate(self.model, self.loader, self.ds, self.cfg, self.device, self.amp)

    def attacked(self, spec: AttackSpec) -> Dict[str, float]:
        if spec not in self.cache:
            fn = _attack_fn(self.model, spec, self.mean, self.std, self.device, self.seed, self.options)
            self.cache[spec] = self.under(fn)
        return self.cache[spec]

    def under(self, fn: Callable[[Dict[str, Any]], torch.Tensor]) -> Dict[str, float]:
        """Metrics of the model on batches whose images ``fn(batch)`` replaces."""
        loader = AttackedLoader(self.loader, fn, self.device, self.max_batches)
        return self.task.evaluate(self.model, loader, self.ds, self.cfg, self.device, self.amp)

    def score(self, metrics: Mapping[str, float]) -> float:
        return float(self.task.fitness(dict(metrics)))

    def n_images(self) -> int:
        n = len(self.ds)
        if self.max_batches is not None:
            n = min(n, int(self.max_batches) * int(self.cfg["train"]["batch"]))
        return max(n, 1)


def _check(name: str, passed: bool, detail: str, values: Dict[str, float]) -> Dict[str, Any]:
    return {"name": name, "passed": bool(passed), "detail": detail, "values": values}


def masking_checks(scorer: _Scorer, clean: Mapping[str, float], attacked: Sequence[Tuple[float, Mapping[str, float]]],
                   template: AttackSpec) -> List[Dict[str, Any]]:
    """The gradient-masking checks of the module doc, as records ``{name, passed, detail, values}``."""
    clean_score = scorer.score(clean)
    tol = 0.01 * abs(clean_score)
    if "top1" in clean:
        tol = max(tol, 100.0 / scorer.n_images())
    eps = max(e for e, _ in attacked)
    start = template.random_start if template.name == "pgd" else "uniform"
    fgsm = scorer.score(scorer.attacked(make_attack("fgsm", eps)))
    pgd10 = scorer.score(scorer.attacked(make_attack("pgd", eps, steps=10, random_start=start)))
    pgd20 = scorer.score(scorer.attacked(make_attack("pgd", eps, steps=20, random_start=start)))
    large = scorer.score(scorer.attacked(make_attack("pgd", LARGE_EPS, steps=20, random_start=start)))
    e = f"{eps:.4g} ({eps * 255:.3g}/255)"
    checks = [
        _check("pgd20<=pgd10", pgd20 <= pgd10 + tol, f"at eps {e}: PGD-20 {pgd20:.4g} vs PGD-10 {pgd10:.4g}",
               {"pgd20": pgd20, "pgd10": pgd10}),
        _check("pgd10<=fgsm", pgd10 <= fgsm + tol, f"at eps {e}: PGD-10 {pgd10:.4g} vs FGSM {fgsm:.4g}",
               {"pgd10": pgd10, "fgsm": fgsm}),
    ]
    worst = max(scorer.score(m) for _, m in attacked)
    checks.append(_check("attacked<=clean", worst <= clean_score + tol,
                         f"best attacked score {worst:.4g} vs clean {clean_score:.4g}",
                         {"attacked_max": worst, "clean": clean_score}))
    bound = LARGE_EPS_FRACTION * clean_score + tol
    checks.append(_check("large_eps_to_zero", large <= bound,
                         f"PGD-20 at eps {LARGE_EPS}: {large:.4g} (should fall below {bound:.4g})",
                         {"pgd20_large_eps": large, "clean": clean_score}))
    for c in checks:
        c["tolerance"] = tol
    return checks


# -- pictures -----------------------------------------------------------------------------------
class _AttackedItems:
    """The first images of a dataset with attacked images in place of the clean ones (for ``draw_val``)."""

    def __init__(self, dataset: Any, items: List[Dict[str, Any]], images: torch.Tensor, mean: Any, std: Any):
        self.dataset, self.classes = dataset, dataset.classes
        self.items = [{**it, "image": img} for it, img in zip(items, images.cpu())]
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        return self.items[i]

    def load_sample(self, i: int) -> Any:
        """The dataset's sample with its image replaced by the attacked one, letterbox undone."""
        import cv2

        sample = self.dataset.load_sample(i)
        item = self.items[i]
        img = item["image"]
        if self.std is not None:
            img = img * torch.tensor(self.std).view(-1, 1, 1) + torch.tensor(self.mean).view(-1, 1, 1)
        pix = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        h, w = sample.image.shape[:2]
        scale, pad_x, pad_y = (float(v) for v in item["letterbox"])
        size = pix.shape[0]
        nw, nh = min(size, max(1, round(w * scale))), min(size, max(1, round(h * scale)))
        px, py = int(pad_x), int(pad_y)
        crop = np.ascontiguousarray(pix[py:py + nh, px:px + nw])
        return dataclasses.replace(sample, image=cv2.resize(crop, (w, h), interpolation=cv2.INTER_LINEAR))


def _caption(path: Path, text: str) -> Any:
    from PIL import Image, ImageDraw

    img = Image.open(path).convert("RGB")
    canvas = Image.new("RGB", (img.width, img.height + 16), (255, 255, 255))
    canvas.paste(img, (0, 16))
    ImageDraw.Draw(canvas).text((2, 2), text, fill=(0, 0, 0))
    return canvas


def draw_examples(task: Any, model: nn.Module, dataset: Any, cfg: Dict[str, Any], device: torch.device,
                  spec: AttackSpec, mean: Any, std: Any, path: Path, n: int, seed: int,
                  options: Mapping[str, Any]) -> Optional[Path]:
    """``path``: the task's drawing of the first ``n`` images, clean over attacked with ``spec``."""
    import tempfile

    from PIL import Image

    from mtkd.engine.trainer import to_device

    n = min(n, len(dataset))
    if n == 0 or not hasattr(task, "draw_val"):
        return None
    items = [dataset[i] for i in range(n)]
    batch = to_device(task.collate(items), device)
    images = _attack_fn(model, spec, mean, std, device, seed, options)(batch)
    attacked = _AttackedItems(dataset, items, images, mean, std)
    with tempfile.TemporaryDirectory() as tmp:
        clean_png, adv_png = Path(tmp) / "clean.png", Path(tmp) / "adv.png"
        task.draw_val(model, _Subset(dataset, n), clean_png, cfg, device)
        task.draw_val(model, attacked, adv_png, cfg, device)
        top = _caption(clean_png, "clean")
        bottom = _caption(adv_png, f"attacked: {spec.describe()}")
    canvas = Image.new("RGB", (max(top.width, bottom.width), top.height + bottom.height), (255, 255, 255))
    canvas.paste(top, (0, 0))
    canvas.paste(bottom, (0, top.height))
    with writing(path):
        canvas.save(path)
    return path


class _Subset:
    """The first ``n`` items of a dataset (``classes`` and ``load_sample`` passed through)."""

    def __init__(self, dataset: Any, n: int):
        self.dataset, self.n, self.classes = dataset, n, dataset.classes

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        return self.dataset[i]

    def load_sample(self, i: int) -> Any:
        return self.dataset.load_sample(i)


def plot_curve(eps: Sequence[float], rows: Sequence[Mapping[str, float]], path: Path, title: str) -> Path:
    """Headline metrics (``rows[i]`` at ``eps[i]``) against eps in /255 units."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in HEADLINE if all(k in r for r in rows)]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [e * 255 for e in eps]
    for k in keys:
        ax.plot(xs, [r[k] for r in rows], marker="o", label=k)
    ax.set_xlabel("eps (x/255)")
    ax.set_ylabel("metric")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if keys:
        ax.legend()
    fig.tight_layout()
    with writing(path):
        fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -- transfer -----------------------------------------------------------------------------------
def load_surrogate(cfg: Dict[str, Any], ckpt: Path, task: Any, classes: Sequence[str]) -> nn.Module:
    """The surrogate model: its checkpoint's recorded ``config.model`` (else ``cfg``'s) with its weights."""
    from mtkd.checkpoint import load_checkpoint
    from mtkd.engine.trainer import load_model

    saved = (load_checkpoint(ckpt).get("config") or {}).get("model")
    scfg = {**cfg, "model": {**cfg["model"], **saved}} if isinstance(saved, dict) else cfg
    _, model, s_classes, _ = load_model(scfg, ckpt, task)
    if list(s_classes) != list(classes):
        raise MtkdError(f"{ckpt}: the surrogate was trained on classes {list(s_classes)}, the target on "
                        f"{list(classes)}")
    return model


def _noise_fn(spec: AttackSpec, mean: Any, std: Any, device: torch.device,
              seed: int) -> Callable[[Dict[str, Any]], torch.Tensor]:
    from mtkd.adversarial.attacks import _content, is_classification_batch, sign_noise

    generator = torch.Generator(device=device).manual_seed(seed + 1)

    def fn(batch: Dict[str, Any]) -> torch.Tensor:
        x = batch["images"]
        valid = None if is_classification_batch(batch) else _content(batch, x.shape[-2:], x.device)
        return sign_noise(x, spec.eps, mean, std, valid=valid, generator=generator)

    return fn


@torch.no_grad()
def _predictions(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from mtkd.adversarial.attacks import logits_of

    return logits_of(model(x)).argmax(1)


def flip_rates(target: nn.Module, surrogate: nn.Module, loader: Any, spec: AttackSpec, mean: Any, std: Any,
               device: torch.device, seed: int, max_batches: Optional[int] = None,
               use_labels: bool = True) -> Dict[str, Any]:
    """Classification transfer rates of the module doc (and the counts they come from)."""
    from mtkd.adversarial.attacks import attack_classifier, sign_noise
    from mtkd.engine.trainer import to_device

    g = torch.Generator(device=device).manual_seed(seed)
    g_noise = torch.Generator(device=device).manual_seed(seed + 1)
    n = t_ok = s_ok = transfer = whitebox = noise = 0
    target.eval()
    surrogate.eval()
    for b, batch in enumerate(loader):
        if max_batches is not None and b >= max_batches:
            break
        batch = to_device(batch, device)
        x, y = batch["images"], batch["labels"]
        adv = attack_classifier(surrogate, x, spec, y if use_labels else None, mean, std, generator=g)
        noisy = sign_noise(x, spec.eps, mean, std, generator=g_noise)
        t_clean, s_clean = _predictions(target, x) == y, _predictions(surrogate, x) == y
        transfer += int((t_clean & (_predictions(target, adv) != y)).sum())
        whitebox += int((s_clean & (_predictions(surrogate, adv) != y)).sum())
        noise += int((t_clean & (_predictions(target, noisy) != y)).sum())
        n, t_ok, s_ok = n + len(y), t_ok + int(t_clean.sum()), s_ok + int(s_clean.sum())

    def rate(k: int, m: int) -> Optional[float]:
        return k / m if m else None

    return {"transfer_success": rate(transfer, t_ok), "surrogate_whitebox_success": rate(whitebox, s_ok),
            "noise_success": rate(noise, t_ok), "n_images": n, "n_target_correct": t_ok,
            "n_surrogate_correct": s_ok}


def transfer_report(scorer: _Scorer, surrogate: nn.Module, specs: Sequence[AttackSpec]) -> List[Dict[str, Any]]:
    """Per eps: the target's metrics under the attack crafted on ``surrogate`` and under sign noise,
    the surrogate's white-box metrics, and (classification) the flip rates."""
    rows = []
    surrogate_scorer = _Scorer(scorer.task, surrogate, scorer.cfg, scorer.ds, scorer.loader, scorer.device,
                               scorer.mean, scorer.std, scorer.options, scorer.seed)
    for spec in specs:
        fn = _attack_fn(surrogate, spec, scorer.mean, scorer.std, scorer.device, scorer.seed, scorer.options)
        row: Dict[str, Any] = {
            "eps": spec.eps, "eps_255": spec.eps * 255,
            "target_transfer": scorer.under(fn),
            "target_noise": scorer.under(_noise_fn(spec, scorer.mean, scorer.std, scorer.device, scorer.seed)),
            "surrogate_clean": surrogate_scorer.clean(),
            "surrogate_whitebox": surrogate_scorer.attacked(spec),
        }
        if scorer.task.name == "classify":
            row.update(flip_rates(scorer.model, surrogate, scorer.loader, spec, scorer.mean, scorer.std,
                                  scorer.device, scorer.seed, scorer.max_batches,
                                  bool(scorer.options.get("use_labels", True))))
        rows.append(row)
    return rows


# -- the report ---------------------------------------------------------------------------------
def _fill_normalisation(cfg: Dict[str, Any], ckpt: Path) -> None:
    """Null ``data.mean``/``data.std`` from the checkpoint's recorded config, where it has them."""
    data = cfg["data"]
    if data.get("mean") is not None and data.get("std") is not None:
        return
    from mtkd.checkpoint import load_checkpoint

    saved = dict((load_checkpoint(ckpt).get("config") or {}).get("data") or {})
    for key in ("mean", "std"):
        if data.get(key) is None and saved.get(key) is not None:
            data[key] = saved[key]


def _open(cfg: Dict[str, Any], ckpt: Path, split: str) -> Tuple[Any, nn.Module, Any, Any, torch.device]:
    from mtkd.engine.trainer import load_model

    _fill_normalisation(cfg, ckpt)
    task, model, classes, device = load_model(cfg, ckpt)
    ds = task.build_dataset(cfg, split, False)
    if list(ds.classes) != list(classes):
        raise MtkdError(f"{ckpt}: trained on classes {classes} but data.{split} has {list(ds.classes)}")
    t = cfg["train"]
    loader = DataLoader(ds, batch_size=t["batch"], num_workers=t["workers"], collate_fn=task.collate)
    return task, model, ds, loader, device


def robustness_report(cfg: Dict[str, Any], ckpt: str | Path, attack: str = "pgd",
                      eps: Sequence[float] = (8 / 255,), steps: Optional[int] = None,
                      step_size: Optional[float] = None, random_start: Any = None, split: str = "test",
                      out: Optional[str | Path] = None, checks: bool = True, n_draw: int = 4, seed: int = 0,
                      seg: bool = True, det: bool = True, segpgd: bool = False, use_labels: bool = True,
                      det_conf: float = 0.25, surrogate: Optional[str | Path] = None) -> Dict[str, Any]:
    """Clean and attacked metrics of checkpoint ``ckpt`` on ``split``; writes the files of the module doc.

    ``step_size`` applies to every eps when given (else each eps gets the
    attack's default). ``seg``/``det``/``segpgd``/``det_conf`` shape the
    multi-task objective (:func:`mtkd.adversarial.attacks.attack_multitask`);
    ``use_labels=False`` attacks the model's own predictions; ``surrogate``
    (a checkpoint) adds the transfer results of the module doc. Returns the
    report written to ``attack.json``.
    """
    ckpt = Path(ckpt)
    eps = [float(e) for e in eps]
    if not eps:
        raise ConfigError("eps: give at least one size")
    specs = [make_attack(attack, e, steps, step_size, random_start, key=f"attack[eps={e:.4g}]") for e in eps]
    out = Path(out) if out is not None else ckpt.parent / "attack"
    task, model, ds, loader, device = _open(cfg, ckpt, split)
    mean, std = normalisation(task, cfg)
    options: Dict[str, Any] = {"use_labels": use_labels}
    if task.name != "classify":
        options.update(seg=seg, det=det, segpgd=segpgd, det_conf=det_conf)
    scorer = _Scorer(task, model, cfg, ds, loader, device, mean, std, options, seed)

    clean = scorer.clean()
    attacked = [(spec.eps, scorer.attacked(spec)) for spec in specs]
    report: Dict[str, Any] = {
        "checkpoint": str(ckpt), "split": split, "task": task.name,
        "attack": {"name": attack, "steps": specs[0].steps, "random_start": specs[0].random_start,
                   "step_size": [s.step_size for s in specs], "seed": seed, **options},
        "normalisation": {"mean": mean, "std": std},
        "score": "fitness (task default; top1 for classify)",
        "clean": clean, "clean_score": scorer.score(clean),
        "attacked": [{"eps": e, "eps_255": e * 255, "metrics": m, "score": scorer.score(m)} for e, m in attacked],
        "checks": [], "warnings": [],
    }
    if checks:
        report["checks"] = masking_checks(scorer, clean, attacked, specs[0])
        for c in report["checks"]:
            if not c["passed"]:
                msg = f"possible gradient masking: check {c['name']} failed: {c['detail']}"
                report["warnings"].append(msg)
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
    if surrogate is not None:
        report["surrogate"] = str(surrogate)
        sur = load_surrogate(cfg, Path(surrogate), task, ds.classes)
        report["transfer"] = transfer_report(scorer, sur, specs)
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out / "attack.json")}
    files["curve"] = str(plot_curve([0.0] + eps, [clean] + [m for _, m in attacked], out / "attack_curve.png",
                                    f"{specs[0].name} ({specs[0].steps} steps) on {split}"))
    if n_draw > 0:
        drawn = draw_examples(task, model, ds, cfg, device, specs[int(np.argmax(eps))], mean, std,
                              out / "attack_examples.png", n_draw, seed, options)
        if drawn is not None:
            files["examples"] = str(drawn)
    report["files"] = files
    with writing(out / "attack.json"):
        (out / "attack.json").write_text(json.dumps(report, indent=2, default=_json_default))
    return report


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def format_report(report: Mapping[str, Any]) -> str:
    """A small text table: clean and each eps, headline metrics and score; then the checks."""
    clean = report["clean"]
    keys = [k for k in HEADLINE if k in clean]
    head = ["eps"] + keys
    rows = [["clean"] + [f"{clean[k]:.4f}" for k in keys]]
    for r in report["attacked"]:
        rows.append([f"{r['eps_255']:.3g}/255"] + [f"{r['metrics'][k]:.4f}" for k in keys])
    widths = [max(len(str(row[i])) for row in rows + [head]) for i in range(len(head))]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(row, widths)) for row in [head] + rows]
    for c in report.get("checks", []):
        lines.append(f"check {c['name']}: {'ok' if c['passed'] else 'FAILED'} ({c['detail']})")
    for r in report.get("transfer", []):
        eps = f"{r['eps_255']:.3g}/255"
        if "transfer_success" in r:
            def pct(v: Optional[float]) -> str:
                return "n/a" if v is None else f"{100 * v:.1f}%"

            lines.append(f"transfer at {eps}: {pct(r['transfer_success'])} of target-correct images flipped "
                         f"(surrogate white-box {pct(r['surrogate_whitebox_success'])}, sign noise "
                         f"{pct(r['noise_success'])})")
        else:
            parts = [f"{k} {r['target_transfer'][k]:.4f} (noise {r['target_noise'][k]:.4f})"
                     for k in HEADLINE if k in r["target_transfer"]]
            lines.append(f"transfer at {eps}: target " + ", ".join(parts))
    return "\n".join(lines)
