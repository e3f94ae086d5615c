"""One training loop for teachers, plain students and distilled students.

The loop never names a loss or a task: the task object (:mod:`mtkd.engine.tasks`)
builds data, model, teacher and evaluation; the
:class:`~mtkd.losses.composer.LossComposer` holds every loss and tells the
trainer, through ``requires``, what it needs (``teacher_grad``: the
teacher's forward keeps its graph; ``input_grad``: the input images get
``requires_grad``). Choices made here:

* **Lazy modules.** One forward of student, teacher and composer runs on a
  batch of the first training samples before the optimizer is built, so lazy
  adapters inside losses get their shapes. The student's buffers (BatchNorm
  statistics) are restored afterwards, so this forward leaves no trace.
* **Adversarial inputs.** Before every forward the composer's ``pre_step``
  runs on the unwrapped student and the teacher; a loss declaring
  ``adv_split`` (``adv_kd``, ``pgd_at``, ``trades``) crafts
  ``batch["adv_images"]`` there (outside autocast), and the step then runs
  ONE student forward on ``cat([images, adv_images])``, split by
  :func:`split_output` into the clean output and its ``"adv"`` half (so
  BatchNorm and DDP see one pass); the teacher's forward is split likewise
  when a loss declares ``adv_teacher``. The losses get the input
  normalisation through ``bind_input`` (the task's ``normalisation``).
* **Optimizer.** AdamW (``momentum`` is beta1) or SGD with Nesterov momentum
  over ``model.parameters()`` + ``composer.student_parameters()``; weight
  decay only on tensors with ``ndim > 1`` (no decay on biases and norms).
* **Auxiliary groups.** What losses train apart from the student (a GAN
  discriminator, FT's paraphraser, DML's peer) they declare as auxiliary
  groups (``Loss.aux_groups``); the trainer builds their optimizers after the
  dry forward (:class:`~mtkd.engine.aux.AuxOptimizers`) and steps them after
  the student's step and EMA update, through the same grad scaler (updated
  once both are done). They keep their own constant learning rate unless
  ``train.aux_schedule`` scales it by the run's schedule, and are clipped to
  ``train.grad_clip`` only with ``train.aux_grad_clip``.
* **Schedule.** Per step: linear warm-up over ``warmup_epochs`` epochs, then
  cosine (or linear) decay to ``lr * lrf`` at the last step of the run:
  ``epochs`` x steps-per-epoch, or ``max_steps`` when smaller. With
  ``time_budget_s`` the schedule is re-sized after the first
  :data:`BUDGET_PROBE_STEPS` attempted steps to ``min(that, floor(budget /
  measured seconds per step))`` (under DDP the slowest rank's time), so the
  decay ends when the budget does; the measured time is frozen in
  ``last.pt`` and a resumed run sizes its schedule from it.
* **Data order and augmentation.** A ``DistributedSampler`` (also for one
  process) with ``set_epoch``: the order depends only on ``seed`` and the
  epoch, so a resumed run sees the same batches. The last incomplete batch is
  dropped when there is at least one full batch (BatchNorm cannot train on one
  image). A training dataset with a ``set_epoch(epoch, rank)`` method gets it
  called at the start of every epoch; mtkd's datasets then seed their
  augmentations from ``(seed, epoch, rank, worker id)``
  (:mod:`mtkd.datasets.transforms`). DataLoader workers are started afresh
  each epoch from a generator seeded by ``(seed, epoch, rank)``, and
  :func:`_seed_worker` seeds numpy and ``random`` in worker ``k`` from that
  generator's seed plus ``k``. So every random draw of an epoch depends only
  on those numbers, not on what earlier epochs drew.
  With ``data.unlabeled`` set, a :class:`~mtkd.datasets.mixing.MixedBatchSampler`
  (same ``set_epoch`` contract) mixes the task's unlabeled images into every
  batch at ``data.unlabeled_ratio``; an epoch is still one pass over the
  labelled set. It needs a teacher (a ConfigError otherwise).
* **Budgets.** ``max_steps`` counts optimizer steps; ``time_budget_s`` counts
  training wall-clock (data loading + steps, not validation) and ends the run
  when it is spent or when the schedule sized from it is complete. When a
  budget runs out mid-epoch, that partial epoch is validated, logged and
  saved, and training ends. One line says why the run stopped, and
  ``test_metrics.json`` records it as ``stop_reason`` (``time_budget``,
  ``max_steps``, ``epochs``, ``early_stopping`` or the reason another
  callback gave :meth:`Trainer.request_stop`) with ``steps`` and
  ``train_wall_s``.
* **Callbacks.** Early stopping (``train.patience``) and the plots
  (``train.plots``) are the built-in callbacks of
  :mod:`mtkd.engine.callbacks`, which the trainer installs before the ones
  it is given; a callback ends the run through :meth:`Trainer.request_stop`.
* **Non-finite loss.** ``train.nonfinite: stop`` raises a one-line MtkdError
  naming the step and the non-finite terms; ``skip`` warns, counts the step
  in ``skipped_steps`` and takes no optimizer step. Steps in these messages
  are numbered by attempt (successful plus skipped steps). Under DDP the
  decision is shared so that all ranks skip together. A run that ends
  without a single successful optimizer step raises an MtkdError instead of
  writing the test report.
* **Best checkpoint.** Chosen on the VAL split by ``train.save_best_on``
  (a val metric name, higher is better; ``fitness`` = the task's default, for
  the multi-task task the mean of map50 and miou). ``best.pt`` holds the
  evaluated weights (the EMA's when EMA is on). The final report is on the
  TEST split with those weights (``test_metrics.json``); it records the
  config key (``"split": "test"``) and the split that key named
  (``"split_read"``, :func:`split_read`), as ``mtkd eval``'s metrics do.
* **Bad samples.** With ``data.skip_bad`` the datasets skip bad samples
  (:meth:`mtkd.datasets.common.RecordDataset.skipped_files`): ``results.csv``
  counts the distinct training samples skipped so far (``skipped_samples``,
  all ranks and workers) and the val samples skipped (``val/skipped_samples``);
  ``test_metrics.json`` has ``skipped_samples`` (test split),
  ``train_skipped_samples`` and ``val_skipped_samples``, and one line says
  so when any was skipped. A dataset without ``skipped_files`` adds no count.
* **Interruption.** During the training loop the first SIGINT (Ctrl-C) or
  SIGTERM only sets a flag: the current step finishes, nothing is validated,
  ``last.pt`` is saved with the training state and the position inside the
  epoch, and :class:`~mtkd.errors.Interrupted` (one line saying how to
  resume) is raised. A second signal raises ``KeyboardInterrupt`` at once,
  unless it comes within ``SIGNAL_REPEAT_S`` of the first: that is one
  request delivered twice (to the process group and forwarded by a parent).
  DataLoader workers ignore both signals and are stopped by the trainer.
  Stale temporary files of killed checkpoint saves are removed from the run
  folder at start and at resume.
* **Starting weights.** ``model.init`` names any mtkd checkpoint (of the same
  task and class count) whose weights the run starts from, the optimizer and
  schedule starting fresh; a pruned checkpoint (``mtkd prune``) brings its
  pruned architecture (:mod:`mtkd.models.restore`), and every checkpoint of
  the run then records it too. ``model.pretrained`` is not applied then.
* **Resume.** ``train.resume`` (``--resume``) restores weights, optimizer,
  scheduler step, grad scaler, EMA, composer state and ``extra_state``, the
  auxiliary groups' optimizers, RNG states and the results history, and
  continues at the next epoch (after an interruption: inside the interrupted
  epoch, whose batches already trained are drawn again but skipped, so data
  and augmentation streams stay as in an uninterrupted run); a run resumed
  with the same config ends bit-identical to an uninterrupted one on the
  CPU, for any ``train.workers`` (the same in both runs). The schedule's
  length follows the *current* config, so raising ``train.epochs`` on resume
  extends the run. A ``last.pt`` of checkpoint format 1 or 2, which holds no
  ``aux_optimizers``, resumes only a run without auxiliary groups; otherwise
  a one-line error says to start fresh.
* **DDP.** Only rank 0 validates, plots and writes files; the others wait at
  a barrier. The student and the composer's trainable parameters (the
  adapters inside losses) train as one :class:`StudentWithAdapters`, wrapped
  once in DDP, whose forward runs the student, the teacher and the losses; so
  DDP broadcasts rank 0's student and adapters at the start and averages
  all their gradients. The rest of the composer's state (buffers, frozen
  parameters) is broadcast from rank 0 after the lazy forward. Each auxiliary
  group's module has its own DDP wrapper, which broadcasts rank 0's
  parameters and averages the group's gradients.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from mtkd import checkpoint as ckpt_io
from mtkd.engine import distributed as ddp
from mtkd.engine.aux import AuxOptimizers
from mtkd.engine.callbacks import CallbackList, EarlyStopping, Plots
from mtkd.engine.config import dump_config
from mtkd.engine.ema import ModelEMA
from mtkd.engine.logger import RunLogger
from mtkd.engine.tasks import Task, get_task
from mtkd.errors import ConfigError, Interrupted, MtkdError, writing
from mtkd.losses.composer import LossComposer
from mtkd.models.restore import (architecture_difference, build_pruned, checkpoint_entries, load_weights,
                                  model_from_checkpoint, state_dict_mismatch)
from mtkd.structures import DetOutput


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


#: Attempted steps timed before a ``time_budget_s`` run sizes its LR schedule.
BUDGET_PROBE_STEPS = 20
SIGNAL_REPEAT_S = 1.0
"""A SIGINT/SIGTERM this soon after the first is the same request delivered twice, not a second one."""


def _seed_worker(worker_id: int) -> None:
    """Seed numpy and ``random`` in a DataLoader worker from its torch seed (loader seed + worker id).

    The worker ignores SIGINT and SIGTERM: the main process handles them and shuts its workers down.
    """
    import random

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def to_device(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    """Tensors (and lists of tensors) of a batch moved to ``device``."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=True)
        elif isinstance(v, list) and v and all(isinstance(t, torch.Tensor) for t in v):
            out[k] = [t.to(device, non_blocking=True) for t in v]
        else:
            out[k] = v
    return out


def detach_tree(x: Any) -> Any:
    """Detached copy of a model output (tensors, DetOutput, dicts, lists, tuples)."""
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, DetOutput):
        return x.detach()
    if isinstance(x, dict):
        return {k: detach_tree(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(detach_tree(v) for v in x)
    return x


def split_output(x: Any, n: int) -> tuple:
    """``(first, rest)``: a model output of a batch of ``n + m`` images cut into its first ``n`` and
    last ``m`` images (tensors along dim 0; a DetOutput's per-image fields; dicts, lists and
    tuples item by item; anything else, e.g. a DetOutput's anchors, goes to both halves)."""
    if isinstance(x, torch.Tensor):
        return (x[:n], x[n:]) if x.dim() > 0 else (x, x)
    if isinstance(x, DetOutput):
        parts = {k: split_output(getattr(x, k), n) for k in ("cls", "obj", "box", "box_dist")}
        levels = [split_output(lv, n) for lv in x.levels]
        halves = []
        for i in (0, 1):
            halves.append(DetOutput(cls=parts["cls"][i], obj=parts["obj"][i], box=parts["box"][i],
                                    anchors=x.anchors, strides=x.strides,
                                    box_dist=None if x.box_dist is None else parts["box_dist"][i],
                                    obj_is_proxy=x.obj_is_proxy, levels=[lv[i] for lv in levels]))
        return halves[0], halves[1]
    if isinstance(x, dict):
        pairs = {k: split_output(v, n) for k, v in x.items()}
        return {k: p[0] for k, p in pairs.items()}, {k: p[1] for k, p in pairs.items()}
    if isinstance(x, (list, tuple)):
        pairs = [split_output(v, n) for v in x]
        return type(x)(p[0] for p in pairs), type(x)(p[1] for p in pairs)
    return x, x


class WarmupDecay:
    """LR factor per step: linear warm-up, then cosine/linear decay to ``lrf``."""

    def __init__(self, total_steps: int, warmup_steps: int, lrf: float, cosine: bool):
        self.warmup_steps = max(int(warmup_steps), 0)
        self.lrf = lrf
        self.cosine = cosine
        self.resize(total_steps)

    def resize(self, total_steps: int) -> None:
        """Make the decay end at step ``total_steps`` (the warm-up stays, shortened if it must)."""
        self.total = max(int(total_steps), 1)
        self.warmup = min(self.warmup_steps, self.total - 1)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        progress = min(max((step - self.warmup) / max(self.total - 1 - self.warmup, 1), 0.0), 1.0)
        if self.cosine:
            return self.lrf + (1.0 - self.lrf) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - (1.0 - self.lrf) * progress


def build_optimizer(params: List[nn.Parameter], tcfg: Dict[str, Any]) -> torch.optim.Optimizer:
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": tcfg["weight_decay"]},
              {"params": no_decay, "weight_decay": 0.0}]
    # AdamW: fused (one kernel over all parameters) on CPU and CUDA, where foreach on a CPU still
    # loops over the tensors of a small model; foreach elsewhere (torch's CPU default is a
    # per-parameter loop). benchmarks/README.md, "step_time", says what each costs.
    if tcfg["optimizer"] == "adamw":
        fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point
                                     for p in params)
        return torch.optim.AdamW(groups, lr=tcfg["lr"], betas=(tcfg["momentum"], 0.999),
                                 **({"fused": True} if fused else {"foreach": True}))
    if tcfg["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=tcfg["lr"], momentum=tcfg["momentum"], nesterov=True, foreach=True)
    raise ConfigError(f"train.optimizer: expected adamw or sgd, got {tcfg['optimizer']!r}")


class StudentWithAdapters(nn.Module):
    """The student and the composer's trainable parameters as one module, for one DDP wrapper.

    ``student`` is the student itself; ``adapters`` registers the composer's
    trainable parameters that are not the student's (the same tensors the
    losses hold). The composer is referenced, not registered: its auxiliary
    groups have DDP wrappers of their own, and the trainer checkpoints student
    and composer apart. ``forward(batch)`` runs ``outputs(batch, student)``
    (student and teacher forward) and the composer, and returns ``(total,
    logs, student_out, teacher_out)`` with the outputs detached, so that only
    ``total`` carries the graph DDP searches for unused parameters.
    """

    def __init__(self, student: nn.Module, composer: LossComposer, adapters: List[nn.Parameter],
                 outputs: Callable[[Dict[str, Any], nn.Module], tuple]):
        super().__init__()
        self.student = student
        own = {id(p) for p in student.parameters()}
        self.adapters = nn.ParameterList([p for p in adapters if id(p) not in own])
        object.__setattr__(self, "_composer", composer)
        object.__setattr__(self, "_outputs", outputs)

    def forward(self, batch: Dict[str, Any]) -> tuple:
        s_out, t_out = self._outputs(batch, self.student)
        total, logs = self._composer(s_out, t_out, batch)
        return total, logs, detach_tree(s_out), detach_tree(t_out)


def _check_optional(section: Dict[str, Any], key: str, types: Any, minimum: float) -> None:
    value = section[key]
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, types) or value < minimum:
        raise ConfigError(f"train.{key}: expected null or a number >= {minimum}, got {value!r}")


def _finite(v: torch.Tensor) -> bool:
    return bool(torch.isfinite(v).all())


class Trainer:
    """``Trainer(cfg).fit()`` trains, validates, checkpoints and writes the test report.

    ``cfg`` is a validated config (:func:`mtkd.engine.config.load_config`);
    ``task`` overrides the task looked up from ``cfg["task"]``; ``callbacks``
    follow the run (:mod:`mtkd.engine.callbacks`).
    """

    def __init__(self, cfg: Dict[str, Any], task: Optional[Task] = None, callbacks: Sequence[Any] = ()):
        self.cfg = cfg
        self.tcfg = cfg["train"]
        if self.tcfg["nonfinite"] not in ("stop", "skip"):
            raise ConfigError(f"train.nonfinite: expected stop or skip, got {self.tcfg['nonfinite']!r}")
        for key in ("epochs", "batch", "val_every"):
            if self.tcfg[key] < 1:
                raise ConfigError(f"train.{key}: must be >= 1, got {self.tcfg[key]}")
        _check_optional(self.tcfg, "max_steps", int, 1)
        _check_optional(self.tcfg, "time_budget_s", (int, float), 0)
        _check_optional(self.tcfg, "patience", int, 1)
        self.callbacks = CallbackList(self._builtin_callbacks() + list(callbacks))
        resume = self.tcfg["resume"]
        if resume is not None and not isinstance(resume, (bool, str)):
            raise ConfigError(f"train.resume: expected a path or true, got {resume!r}")
        self.task = task if task is not None else get_task(cfg["task"])
        self.out = Path(cfg["out"])
        self.dist = ddp.setup(self.tcfg["device"])
        self.device = self.dist.device
        self.amp = bool(self.tcfg["amp"])
        self.epoch = 0  # the current epoch, 0-based
        self.step = 0
        self.skipped = 0
        self.train_skipped: Optional[int] = None  # distinct training samples skipped as bad (data.skip_bad)
        self.train_wall = 0.0
        self.budget_step_time: Optional[float] = None
        self.stop_reason: Optional[str] = None
        self.stop_detail = ""  # why a callback asked to stop (request_stop), for the stop line
        self._stop_request: Optional[tuple] = None  # (reason, detail) of this rank's request_stop
        self.signal: Optional[signal.Signals] = None  # the first SIGINT/SIGTERM received while training
        self._signal_t = 0.0  # time.monotonic() of that signal
        self.epoch_batches = 0  # batches of the current epoch done (trained or skipped as non-finite)
        self._resume_batches = 0
        self._resume_ckpt: Optional[Dict[str, Any]] = None  # last.pt, read once by _build_student for _resume
        self._resume_sums: Dict[str, float] = {}
        self._resume_counts: Dict[str, int] = {}
        self.best_score = -math.inf
        self.best_epoch = 0

    def _builtin_callbacks(self) -> List[Any]:
        """The callbacks the config asks for (:mod:`mtkd.engine.callbacks`), in the order they run."""
        builtin: List[Any] = []
        if self.tcfg["patience"] is not None:
            builtin.append(EarlyStopping(self.tcfg["patience"]))
        if self.tcfg["plots"]:
            builtin.append(Plots())
        return builtin

    def request_stop(self, reason: str, detail: str = "") -> None:
        """End the run after the current epoch; for callbacks (e.g. :class:`~mtkd.engine.callbacks.EarlyStopping`).

        Read once the epoch's ``on_epoch_end`` hooks have run: the epoch is
        trained, validated (when ``train.val_every`` says so), logged and
        saved as usual, then every rank stops (a request on any rank
        suffices). ``reason`` becomes the report's ``stop_reason``, ``detail``
        says why in the stop line. The first request of a run counts.
        """
        if self._stop_request is None:
            self._stop_request = (str(reason), str(detail))

    # -- building -------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.amp:
            return contextlib.nullcontext()
        dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    def _loader(self, dataset: Any, train: bool, unlabeled: Any = None) -> DataLoader:
        t = self.tcfg
        kwargs: Dict[str, Any] = dict(batch_size=t["batch"], num_workers=t["workers"],
                                      collate_fn=self.task.collate, pin_memory=self.device.type == "cuda",
                                      worker_init_fn=_seed_worker)
        if train and unlabeled is not None:
            from mtkd.datasets.mixing import MixedBatchSampler, MixedDataset

            self.sampler = MixedBatchSampler(len(dataset), len(unlabeled), t["batch"],
                                             self.cfg["data"].get("unlabeled_ratio"), seed=self.cfg["seed"],
                                             rank=self.dist.rank, world_size=self.dist.world_size)
            self.generator = torch.Generator()
            del kwargs["batch_size"]
            return DataLoader(MixedDataset(dataset, unlabeled), batch_sampler=self.sampler,
                              generator=self.generator, **kwargs)
        if train:
            self.sampler = DistributedSampler(dataset, num_replicas=self.dist.world_size, rank=self.dist.rank,
                                              shuffle=True, seed=self.cfg["seed"])
            self.generator = torch.Generator()
            kwargs.update(sampler=self.sampler, generator=self.generator,
                          drop_last=len(self.sampler) >= t["batch"])
        return DataLoader(dataset, shuffle=False, **kwargs)

    def build(self) -> None:
        cfg, t = self.cfg, self.tcfg
        seed_everything(cfg["seed"])
        self.train_ds = self.task.build_dataset(cfg, "train", True)
        if len(self.train_ds) == 0:
            raise ConfigError("data.train: the training split is empty")
        self.classes = list(self.train_ds.classes)
        self.unlabeled_ds = self._build_unlabeled()
        self.val_ds = self.task.build_dataset(cfg, "val", False) if self.dist.is_main else None
        self.train_loader = self._loader(self.train_ds, train=True, unlabeled=self.unlabeled_ds)
        self.val_loader = self._loader(self.val_ds, train=False) if self.val_ds is not None else None

        nc = len(self.classes)
        self.model = self._build_student(nc).to(self.device)
        self.teacher = self.task.build_teacher(cfg, nc, self.model)
        if self.teacher is None and self.unlabeled_ds is not None:
            raise ConfigError("data.unlabeled: needs a teacher (teacher.ckpt or teacher.composite); "
                              "without one nothing supervises the unlabeled images")
        if self.teacher is not None:
            self.teacher = self.teacher.to(self.device).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        self.composer = LossComposer(cfg["loss"], with_teacher=self.teacher is not None).to(self.device)
        self.composer.bind(self.model, self.teacher)
        self.composer.bind_input(*self._input_normalisation())
        self.requires = self.composer.requires
        self._lazy_forward()
        ddp.broadcast_module(self.composer, self.dist)
        self.aux = AuxOptimizers(self.composer.modules_flat(), self.dist)

        params, seen = [], set()
        for p in list(self.model.parameters()) + list(self.composer.student_parameters()):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
        self.params = params
        self.optimizer = build_optimizer(params, t)
        steps_per_epoch = len(self.train_loader)
        self.schedule = WarmupDecay(self._total_steps(), round(t["warmup_epochs"] * steps_per_epoch), t["lrf"],
                                    t["cosine"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and self.device.type == "cuda")
        self.ema = ModelEMA(self.model, t["ema_decay"], t["ema_tau"]) if t["ema"] else None
        adapters = [p for p in self.composer.student_parameters() if p.requires_grad]
        both = StudentWithAdapters(self.model, self.composer, adapters, self._forward)
        # A loss may leave its adapters out of a step's graph (FT's translators while its paraphraser
        # pre-trains; a term that is a constant zero when a batch holds nothing to compare, on one rank
        # or all), and DDP fails at the next step unless it searches each step's graph for unused
        # parameters. Every parameter of a student alone is in each step's graph: no search then.
        self.net = ddp.wrap(both, self.dist, find_unused_parameters=len(both.adapters) > 0)

    def _input_normalisation(self) -> tuple:
        """``(mean, std)`` of the model input from the task (``(None, None)`` if it has none)."""
        fn = getattr(self.task, "normalisation", None)
        return fn(self.cfg) if fn is not None else (None, None)
    def _resume_path(self) -> Optional[Path]:
        path = self.tcfg["resume"]
        if path is None or path is False:
            return None
        return self.out / "last.pt" if path is True else Path(path)

    def _build_student(self, nc: int) -> nn.Module:
        """The student: built from ``model:``, from ``model.init``'s checkpoint, or as the run resumed.

        Resuming, the architecture is the one ``last.pt`` records (a pruned
        one included) and :meth:`_resume` loads its weights; with
        ``model.init`` the model is that checkpoint's, weights included
        (:func:`init_model`); otherwise it is built from ``model:``.
        """
        cfg = self.cfg
        init = cfg["model"].get("init")
        resume = self._resume_path()
        if resume is None and init is None:
            return self.task.build_model(cfg, nc)
        if init is not None and not isinstance(init, str):
            raise ConfigError(f"model.init: expected the path of an mtkd checkpoint, got {init!r}")
        build = lambda: self.task.build_model(_without_pretrained(cfg), nc)  # noqa: E731 - weights replaced
        if resume is not None:
            self._resume_ckpt = ckpt_io.load_checkpoint(resume)
            record = self._resume_ckpt.get("pruning")
            return build_pruned(record, resume) if record else build()
        return init_model(cfg, init, nc, build, self.classes)

    def _build_unlabeled(self) -> Any:
        """The task's ``data.unlabeled`` dataset, or ``None`` when the key is unset."""
        if self.cfg["data"].get("unlabeled") is None:
            return None
        build = getattr(self.task, "build_unlabeled", None)
        if build is None:
            raise ConfigError(f"data.unlabeled: not supported by task {self.task.name!r}")
        return build(self.cfg, self.train_ds)

    def _total_steps(self) -> int:
        """Length of the LR schedule: epochs x steps per epoch, capped by ``max_steps`` and the time budget."""
        t = self.tcfg
        total = t["epochs"] * len(self.train_loader)
        if t["max_steps"] is not None:
            total = min(total, int(t["max_steps"]))
        budget_steps = self._budget_steps()
        if budget_steps is not None:
            total = min(total, budget_steps)
        return total

    def _budget_steps(self) -> Optional[int]:
        """Steps that fit in ``time_budget_s`` at the measured step time (``None`` until measured)."""
        budget = self.tcfg["time_budget_s"]
        if budget is None or self.budget_step_time is None or self.budget_step_time <= 0:
            return None
        return max(int(math.floor(budget / self.budget_step_time)), 1)

    def _apply_schedule(self) -> None:
        """Re-size the schedule to :meth:`_total_steps` and set the LR of the current step from it."""
        self.schedule.resize(self._total_steps())
        self.scheduler.lr_lambdas = [self.schedule] * len(self.optimizer.param_groups)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * self.schedule(self.scheduler.last_epoch)

    def _measure_step_time(self) -> None:
        """After :data:`BUDGET_PROBE_STEPS` attempted steps, size the schedule to the time budget."""
        attempted = self.step + self.skipped
        per_step = max(ddp.gather_objects(self.train_wall / attempted, self.dist))
        self.budget_step_time = float(per_step)
        self._apply_schedule()
        if self.dist.is_main:
            tqdm.write(f"time budget: {per_step * 1000:.1f} ms per step over the first {attempted} steps; "
                       f"LR schedule sized to {self.schedule.total} steps")

    @contextlib.contextmanager
    def _traceless_train_mode(self) -> Any:
        """The student in train mode, its state (BatchNorm statistics) restored on leaving."""
        saved = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.train()
        try:
            yield
        finally:
            self.model.load_state_dict(saved)

    def _lazy_forward(self) -> None:
        n = min(self.tcfg["batch"], len(self.train_ds))
        batch = to_device(self.task.collate([self.train_ds[i] for i in range(n)]), self.device)
        with self._traceless_train_mode():
            batch = self.composer.pre_step(batch, self.model, self.teacher)
            with self._autocast():
                s_out, t_out = self._forward(batch)
                self.composer(s_out, t_out, batch)

    def loss_terms(self, batch: Dict[str, Any]) -> Dict[str, float]:
        """Every loss term the composer logs for one batch (a collated batch, e.g. of
        ``train_loader``), without training: ``{"seg/hard": ..., "seg/soft/<label>": ...,
        "total": ...}``, the names ``results.csv`` logs under ``train/``.

        Each loss's term is its value before its ``weight``, alpha and ratio;
        the sums ``<task>/soft``, ``<task>`` and ``total`` are weighted as the
        step weights them (``total`` is what it minimises). The batch goes through
        the losses' ``pre_step``, the student (in train mode, as in a step)
        and the teacher, without gradients unless a loss declares
        ``input_grad`` or ``teacher_grad``; no optimizer, EMA or auxiliary
        step is taken and the student's state is restored (losses keeping
        state of their own may update it). Call after :meth:`build`.
        """
        batch = to_device(batch, self.device)
        grad = bool({"input_grad", "teacher_grad"} & self.requires)
        self.composer.train()
        with self._traceless_train_mode():
            batch = self.composer.pre_step(batch, self.model, self.teacher)
            with torch.set_grad_enabled(grad), self._autocast():
                s_out, t_out = self._forward(batch)
                _, logs = self.composer(s_out, t_out, batch)
        return {k: float(v) for k, v in logs.items()}

    # -- one step -------------------------------------------------------------------
    def _teacher_forward(self, images: torch.Tensor) -> Optional[Dict[str, Any]]:
        if self.teacher is None:
            return None
        if "teacher_grad" in self.requires:
            return self.teacher(images)
        with torch.no_grad():
            return self.teacher(images)

    def _forward(self, batch: Dict[str, Any], student: Optional[nn.Module] = None) -> tuple:
        """Outputs of ``student`` (default: the trainer's) and the teacher. With a loss declaring
        ``adv_split`` and ``batch["adv_images"]`` set (by its ``pre_step``): one student forward on
        ``cat([images, adv_images])``, split into the clean output with the adversarial half under
        ``"adv"`` (and the teacher's likewise when a loss declares ``adv_teacher``)."""
        student = student if student is not None else self.model
        if "input_grad" in self.requires:
            batch["images"].requires_grad_(True)
        images = batch["images"]
        adv = batch.get("adv_images") if "adv_split" in self.requires else None
        if adv is None:
            return student(images), self._teacher_forward(images)
        n = images.shape[0]
        both = torch.cat([images, adv.to(images.dtype)])
        s_out, s_adv = split_output(student(both), n)
        s_out["adv"] = s_adv
        if self.teacher is not None and "adv_teacher" in self.requires:
            t_out, t_adv = split_output(self._teacher_forward(both), n)
            t_out["adv"] = t_adv
        else:
            t_out = self._teacher_forward(images)
        return s_out, t_out

    def train_step(self, batch: Dict[str, Any]) -> Optional[Dict[str, float]]:
        """Forward, loss, backward, optimizer/EMA/aux steps. ``None`` when the step was skipped."""
        batch = to_device(batch, self.device)
        batch = self.composer.pre_step(batch, self.model, self.teacher)  # e.g. crafts batch["adv_images"]
        with self._autocast():
            total, logs, s_out, t_out = self.net(batch)
        if ddp.any_true(not _finite(total), self.dist):
            bad = [k for k, v in logs.items() if not _finite(v)] or ["total"]
            # attempted steps: the successful ones plus the skipped ones, this one included
            where = f"step {self.step + self.skipped + 1} (epoch {self.epoch + 1})"
            if self.tcfg["nonfinite"] == "stop":
                raise MtkdError(f"non-finite loss at {where}: non-finite terms {bad} "
                                   "(set train.nonfinite=skip to skip such steps)")
            self.skipped += 1
            warnings.warn(f"non-finite loss at {where}: terms {bad}; step skipped "
                          f"({self.skipped} skipped so far)", RuntimeWarning, stacklevel=2)
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.scaler.scale(total).backward()
        if self.tcfg["grad_clip"] > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.params, self.tcfg["grad_clip"])
        self.scaler.step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        lr_factor = self.schedule(self.scheduler.last_epoch) if self.tcfg["aux_schedule"] else 1.0
        self.scheduler.step()
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.model)
        clip = self.tcfg["grad_clip"] if self.tcfg["aux_grad_clip"] else 0.0
        aux = self.aux.step(self.step, s_out, t_out, batch, self.scaler, clip, lr_factor)
        self.scaler.update()
        aux.update(self.composer.aux_step(s_out, t_out, batch))
        out = {k: float(v) for k, v in logs.items()}
        out.update(aux)
        return out

    # -- the loop -------------------------------------------------------------------
    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def _budget_spent(self) -> Optional[str]:
        """``"max_steps"`` or ``"time_budget"`` when that budget is spent, else ``None`` (same on all ranks)."""
        t = self.tcfg
        max_steps = t["max_steps"]
        budget_steps = self._budget_steps()
        if budget_steps is not None and self.step >= budget_steps and (max_steps is None or budget_steps < max_steps):
            return "time_budget"  # the schedule sized from the budget is complete
        if max_steps is not None and self.step >= max_steps:
            return "max_steps"
        if t["time_budget_s"] is not None and ddp.any_true(self.train_wall >= t["time_budget_s"], self.dist):
            return "time_budget"
        return None

    def train_epoch(self) -> tuple[Dict[str, float], Optional[str]]:
        """One epoch; returns (mean of each logged term, the budget spent or ``None``)."""
        self.sampler.set_epoch(self.epoch)
        self.generator.manual_seed(self.cfg["seed"] * 1000 + self.epoch * 16 + self.dist.rank)
        for ds in (self.train_ds, self.unlabeled_ds):
            set_epoch = getattr(ds, "set_epoch", None)
            if callable(set_epoch):
                set_epoch(self.epoch, self.dist.rank)
        self.net.train()
        self.composer.train()
        self.callbacks.call("on_epoch_start", self)
        # after an interruption: the batches already trained and their logged sums
        skip, sums, counts = self._resume_batches, dict(self._resume_sums), dict(self._resume_counts)
        self._resume_batches, self._resume_sums, self._resume_counts = 0, {}, {}
        self.epoch_batches = 0
        spent: Optional[str] = None
        bar = tqdm(self.train_loader, desc=f"epoch {self.epoch + 1}/{self.tcfg['epochs']}",
                   disable=not self.dist.is_main, leave=False, dynamic_ncols=True)
        step_hooks = self.callbacks.has("on_step_end")
        tick = time.perf_counter()
        for batch in bar:
            if self.epoch_batches < skip:
                # drawn like in the uninterrupted run (same data and augmentation streams), not trained again
                self.epoch_batches += 1
                tick = time.perf_counter()
                continue
            logs = self.train_step(batch)
            self.epoch_batches += 1
            now = time.perf_counter()
            self.train_wall += now - tick
            tick = now
            if (self.tcfg["time_budget_s"] is not None and self.budget_step_time is None
                    and self.step + self.skipped >= BUDGET_PROBE_STEPS):
                self._measure_step_time()
            if logs is not None:
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0.0) + v
                    counts[k] = counts.get(k, 0) + 1
                bar.set_postfix(loss=f"{sums['total'] / counts['total']:.4g}", refresh=False)
            if step_hooks:
                self.callbacks.call("on_step_end", self, logs)
                tick = time.perf_counter()  # the callbacks' time is not training time
            spent = self._budget_spent()
            if spent:
                break
            if ddp.any_true(self.signal is not None, self.dist):
                spent = "interrupted"
                break
        bar.close()
        self.epoch_sums, self.epoch_counts = sums, counts
        return ddp.reduce_means(sums, counts, self.dist), spent

    def _score(self, metrics: Dict[str, float]) -> float:
        key = self.tcfg["save_best_on"]
        if key == "fitness":
            return float(self.task.fitness(metrics))
        if key not in metrics:
            raise ConfigError(f"train.save_best_on: {key!r} is not a val metric; "
                              f"available: fitness, {', '.join(sorted(metrics))}")
        return float(metrics[key])

    def _base_ckpt(self, metrics: Dict[str, float]) -> Dict[str, Any]:
        return {"format": ckpt_io.FORMAT, "task": self.task.name, "classes": self.classes,
                "config": self.cfg, "epoch": self.epoch + 1, "step": self.step, "metrics": metrics,
                "best_score": self.best_score, "model": self.eval_model.state_dict(),
                **checkpoint_entries(self.eval_model)}

    def _train_state(self) -> Dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "ema_updates": self.ema.updates if self.ema is not None else 0,
                "composer": self.composer.state_dict(), "composer_extra": self.composer.extra_state(),
                "aux_optimizers": self.aux.state_dict(),
                "rng": ckpt_io.rng_state(), "history": self.logger.history, "skipped": self.skipped,
                "train_skipped": self.train_skipped, "train_wall": self.train_wall, "best_epoch": self.best_epoch,
                "budget_step_time": self.budget_step_time, "total_steps": self.schedule.total}

    def _resume(self) -> int:
        path = self._resume_path()
        if path is None:
            return 0
        ck = self._resume_ckpt or ckpt_io.load_checkpoint(path)
        self._resume_ckpt = None
        st = ck.get("train_state")
        if st is None:
            raise MtkdError(f"{path}: has no training state to resume from (use last.pt)")
        if "aux_optimizers" not in st and len(self.aux):
            raise MtkdError(f"{path}: a {ck.get('format', ckpt_io.READABLE_FORMATS[0])} checkpoint, written "
                            "before the trainer kept the losses' auxiliary optimizers, cannot resume this run's "
                            f"{[e.key for e in self.aux.entries]}; start the run fresh")
        recorded = (ck.get("config") or {}).get("model")
        load_weights(self.model, st["model"], path,
                     lambda d: MtkdError(f"{path}: does not match this run's model: {d}"),
                     "" if ck.get("pruning") else architecture_difference(recorded, self.cfg["model"]))
        problem = state_dict_mismatch(self.composer.state_dict(), st["composer"])
        try:
            self.composer.load_state_dict(st["composer"])
        except RuntimeError as exc:
            detail = problem or str(exc).strip().splitlines()[0]
            raise MtkdError(f"{path}: does not match this run's losses: {detail}") from None
        self.optimizer.load_state_dict(st["optimizer"])
        # LambdaLR.load_state_dict writes the saved schedule's attributes into our lambda
        # object; keep a fresh copy so a changed train.epochs/max_steps extends the run
        schedule = copy.copy(self.schedule)
        self.scheduler.load_state_dict(st["scheduler"])
        self.schedule = schedule
        # the step count comes from the checkpoint, the schedule's length from this run's config
        # and the frozen step time of a time budget (identical unless train.epochs/max_steps/
        # time_budget_s were changed to extend the run)
        self.budget_step_time = st.get("budget_step_time")
        self._apply_schedule()
        self._resume_batches = int(st.get("epoch_batches", 0))
        if self.dist.is_main:  # the saved sums are over all ranks: restore them once
            self._resume_sums = {k: float(v) for k, v in st.get("epoch_sums", {}).items()}
            self._resume_counts = {k: int(v) for k, v in st.get("epoch_counts", {}).items()}
        self.scaler.load_state_dict(st["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(ck["model"], st["ema_updates"])
        self.composer.load_extra_state(st["composer_extra"])
        if "aux_optimizers" in st:
            self.aux.load_state_dict(st["aux_optimizers"], path)
        ckpt_io.set_rng_state(st["rng"])
        self.logger.history = list(st["history"])
        self.step, self.skipped, self.train_wall = ck["step"], st["skipped"], st["train_wall"]
        self.train_skipped = st.get("train_skipped")  # the report's count when no epoch is left to run
        self.best_score, self.best_epoch = ck["best_score"], st["best_epoch"]
        return int(ck["epoch"])

    def _end_of_epoch(self, means: Dict[str, float], validate: bool) -> None:
        """Rank 0: validate, choose best (``best.pt``), log, save ``last.pt``."""
        metrics: Dict[str, float] = {}
        if validate:
            metrics = self.task.evaluate(self.eval_model, self.val_loader, self.val_ds, self.cfg,
                                         self.device, self.amp)
            score = self._score(metrics)
            if score > self.best_score:
                self.best_score, self.best_epoch = score, self.epoch + 1
                ckpt_io.save_atomic(self._base_ckpt(metrics), self.out / "best.pt")
            self.callbacks.call("on_validation_end", self, metrics)
        row: Dict[str, float] = {"epoch": self.epoch + 1, "step": self.step,
                                 "lr": self.optimizer.param_groups[0]["lr"], "train_wall_s": self.train_wall,
                                 "skipped_steps": self.skipped}
        if self.train_skipped is not None:
            row["skipped_samples"] = self.train_skipped
        row.update({f"train/{k}": v for k, v in means.items()})
        row.update({f"val/{k}": v for k, v in metrics.items()})
        val_skipped = skipped_samples(self.val_ds)
        if validate and val_skipped is not None:
            row["val/skipped_samples"] = val_skipped
        self.logger.log_epoch(row)
        ckpt = self._base_ckpt(metrics)
        ckpt["train_state"] = self._train_state()
        ckpt_io.save_atomic(ckpt, self.out / "last.pt")

    def test_report(self) -> Dict[str, Any]:
        """Rank 0: the best weights on the TEST split -> ``test_metrics.json``."""
        best = ckpt_io.load_checkpoint(self.out / "best.pt")
        model = self.eval_model
        model.load_state_dict(best["model"])
        test_ds = self.task.build_dataset(self.cfg, "test", False)
        metrics = self.task.evaluate(model, self._loader(test_ds, train=False), test_ds, self.cfg,
                                     self.device, self.amp)
        report: Dict[str, Any] = {"split": "test", "split_read": split_read(test_ds, self.cfg, "test"),
                                  "checkpoint": str(self.out / "best.pt"),
                                  "best_epoch": self.best_epoch, "val_best_score": self.best_score,
                                  "save_best_on": self.tcfg["save_best_on"], **metrics}
        report.update(self.task.model_info(model, self.cfg))
        report.update({"steps": self.step, "skipped_steps": self.skipped, "train_wall_s": self.train_wall,
                       "epochs_run": self.epoch + 1, "world_size": self.dist.world_size,
                       "stop_reason": self.stop_reason})
        counts = {"train": self.train_skipped, "val": skipped_samples(self.val_ds), "test": skipped_samples(test_ds)}
        if counts["test"] is not None:
            report["skipped_samples"] = counts["test"]
        report.update({f"{k}_skipped_samples": n for k, n in counts.items() if k != "test" and n is not None})
        if any(counts.values()):
            print("data.skip_bad: skipped bad samples (the warnings name them): "
                  + ", ".join(f"{k} {n}" for k, n in counts.items() if n is not None), flush=True)
        with writing(self.out / "test_metrics.json"):
            (self.out / "test_metrics.json").write_text(json.dumps(report, indent=2))
        return report

    def fit(self) -> Dict[str, Any]:
        """Train (or resume), then report on the test split. Returns the report (``{}`` off rank 0)."""
        report: Dict[str, Any] = {}
        clean = False
        try:
            self.build()
            main = self.dist.is_main
            if main:
                with writing(self.out):
                    self.out.mkdir(parents=True, exist_ok=True)
                with writing(self.out / "config.yaml"):
                    dump_config(self.cfg, self.out / "config.yaml")
                self._record_classes()
                stale = ckpt_io.remove_stale_temps(self.out)
                if stale:
                    print(f"removed {len(stale)} temporary checkpoint file(s) of an interrupted save in {self.out}",
                          flush=True)
            self.logger = RunLogger(self.out, enabled=main, tensorboard=self.tcfg["tensorboard"])
            self.start_epoch = start = self._resume()
            epochs = self.tcfg["epochs"]
            self.epoch = start - 1
            reason = self._budget_spent()
            previous_handlers = self._catch_signals()
            try:
                while reason is None and self.epoch + 1 < epochs:
                    self._raise_if_signalled()  # arrived during validation: last.pt is current
                    self.epoch += 1
                    means, reason = self.train_epoch()
                    if reason == "interrupted":
                        self._save_interrupted()
                        self._raise_if_signalled()
                    last = reason is not None or self.epoch + 1 == epochs
                    self.train_skipped = self._train_skipped()
                    if main:
                        self._end_of_epoch(means, validate=last or (self.epoch + 1) % self.tcfg["val_every"] == 0)
                    self.callbacks.call("on_epoch_end", self, means)
                    if ddp.any_true(self._stop_request is not None, self.dist):
                        reason, self.stop_detail = self._agreed_stop_request()
                        break
                    ddp.barrier(self.dist)
                self._raise_if_signalled()
            finally:
                self._restore_signals(previous_handlers)
            if self.step == 0 and self.skipped > 0:
                raise MtkdError(f"train.nonfinite=skip: all {self.skipped} training steps had a non-finite loss "
                                "and were skipped, so nothing was trained; no test report written "
                                "(check the data, train.lr and the loss weights)")
            self.stop_reason = reason or "epochs"
            if main:
                print(self._stop_message(), flush=True)
                self.logger.close()
                self.callbacks.call("on_train_end", self)
                report = self.test_report()
            clean = True
        finally:
            self._teardown(clean)
        return report

    def _agreed_stop_request(self) -> tuple:
        """``(reason, detail)`` of the lowest rank that asked to stop, the same on every rank (a collective call)."""
        return next(r for r in ddp.gather_objects(self._stop_request, self.dist) if r is not None)

    def _record_classes(self) -> None:
        """Print the class list the run trains on and write it to ``classes.txt`` of the run folder
        (one name a line, index = class id), saying whether it came from ``data.classes`` or was
        read from the data: a misspelt class name in the annotations shows up here as an extra class."""
        source = "data.classes" if self.cfg.get("data", {}).get("classes") else "read from the data"
        print(f"classes ({len(self.classes)}, {source}): {', '.join(map(str, self.classes))}", flush=True)
        path = self.out / "classes.txt"
        with writing(path):
            path.write_text("".join(f"{name}\n" for name in self.classes), encoding="utf-8")

    def _train_skipped(self) -> Optional[int]:
        """Distinct training samples (labelled and unlabeled) skipped as bad so far, over all ranks
        (a collective call); ``None`` when the datasets do not count them."""
        files = [skipped_files(ds) for ds in (self.train_ds, self.unlabeled_ds) if ds is not None]
        files = [f for f in files if f is not None]
        if not files:
            return None
        union = set()
        for rank_files in ddp.gather_objects(sorted(set().union(*files)), self.dist):
            union.update(rank_files)
        return len(union)

    # -- interruption ---------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signal is not None:
            if time.monotonic() - self._signal_t < SIGNAL_REPEAT_S:
                return  # the same stop request delivered twice (a process group and a parent forwarding it)
            raise KeyboardInterrupt  # a second request: stop at once
        self.signal = signal.Signals(signum)
        self._signal_t = time.monotonic()

    def _catch_signals(self) -> Dict[int, Any]:
        """Route SIGINT/SIGTERM to :meth:`_on_signal`; returns the previous handlers (none off the main thread)."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, self._on_signal)
        return previous

    @staticmethod
    def _restore_signals(previous: Dict[int, Any]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def _save_interrupted(self) -> None:
        """Rank 0: ``last.pt`` at this step boundary, with the position inside the unfinished epoch."""
        sums: Dict[str, float] = {}
        counts: Dict[str, int] = {}
        for rank_sums, rank_counts in ddp.gather_objects((self.epoch_sums, self.epoch_counts), self.dist):
            for k, v in rank_sums.items():
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + rank_counts[k]
        if self.dist.is_main:
            ckpt = self._base_ckpt({})
            ckpt["epoch"] = self.epoch  # completed epochs; the current one continues at epoch_batches
            ckpt["train_state"] = self._train_state()
            ckpt["train_state"].update(epoch_batches=self.epoch_batches, epoch_sums=sums, epoch_counts=counts)
            ckpt_io.save_atomic(ckpt, self.out / "last.pt")
        ddp.barrier(self.dist)

    def _raise_if_signalled(self) -> None:
        """Raise :class:`Interrupted` (same on all ranks) once a signal arrived; ``last.pt`` is saved by then."""
        if not ddp.any_true(self.signal is not None, self.dist):
            return
        sig = self.signal or signal.SIGTERM  # a rank that got none follows the others
        where = f"at step {self.step}, epoch {self.epoch + 1}" if self.epoch >= self.start_epoch else "before training"
        last = self.out / "last.pt"
        saved = f"{last} holds the training state" if last.is_file() else "nothing saved yet"
        raise Interrupted(f"interrupted by {sig.name} {where}; {saved}", 128 + int(sig),
                          "train.resume=true (mtkd train <config> <overrides> --resume)")

    def _stop_message(self) -> str:
        """One line saying why training ended."""
        t, reason = self.tcfg, self.stop_reason
        at = f"after {self.step} steps, epoch {self.epoch + 1}"
        if reason == "time_budget":
            return (f"stopped: time budget train.time_budget_s={t['time_budget_s']} spent {at} "
                    f"({self.train_wall:.1f} s of training; LR schedule of {self.schedule.total} steps)")
        if reason == "max_steps":
            return f"stopped: train.max_steps={t['max_steps']} reached ({at})"
        if reason == "epochs":
            return f"stopped: all train.epochs={t['epochs']} done ({self.step} steps)"
        why = f", {self.stop_detail}" if self.stop_detail else ""
        if reason == "early_stopping":
            return f"stopped: early stopping{why} (best epoch {self.best_epoch}; {at})"
        return f"stopped: {reason}{why} (asked by a callback; {at})"

    def _teardown(self, clean: bool) -> None:
        if getattr(self, "logger", None) is not None:
            self.logger.close()
        for name in ("net", "model", "optimizer", "aux", "ema", "teacher", "composer"):
            if hasattr(self, name):
                delattr(self, name)
        ddp.shutdown(self.dist, barrier=clean)


def skipped_files(dataset: Any) -> Optional[List[str]]:
    """The files ``dataset`` skipped as bad (``data.skip_bad``), or ``None`` when it does not say."""
    fn = getattr(dataset, "skipped_files", None)
    return list(fn()) if callable(fn) else None


def skipped_samples(dataset: Any) -> Optional[int]:
    """How many samples ``dataset`` skipped as bad so far, or ``None`` when it does not say."""
    files = skipped_files(dataset)
    return None if files is None else len(files)


def split_read(dataset: Any, cfg: Dict[str, Any], split: str) -> str:
    """The split ``dataset`` (built for config key ``split``) read: its ``split`` attribute (VOC/COCO/YOLO:
    the list file stem, split name or yaml key; classify: the folder), else the config's ``data.<split>``."""
    name = getattr(dataset, "split", None)
    if name is None:
        name = (cfg.get("data") or {}).get(split) or split
    return str(name)


def train(cfg: Dict[str, Any], task: Optional[Task] = None, callbacks: Sequence[Any] = ()) -> Dict[str, Any]:
    """Train the run described by ``cfg``; returns the test report (rank 0)."""
    return Trainer(cfg, task, callbacks).fit()


def _without_pretrained(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """``cfg`` with ``model.pretrained`` off, for a model whose weights a checkpoint then replaces
    (nothing to download, and a moved or deleted init file does not matter)."""
    return {**cfg, "model": {**cfg["model"], "pretrained": False}}


def _checked_task(ck: Dict[str, Any], path: str | Path, task: Task) -> None:
    own = ck.get("task")
    if own is not None and own != task.name:
        raise MtkdError(f"{path}: a {own!r} checkpoint, but the config's task is {task.name!r}")


def init_model(cfg: Dict[str, Any], path: str | Path, nc: int, build: Any,
               classes: Optional[List[str]] = None) -> nn.Module:
    """``model.init``: the model of checkpoint ``path`` with its weights, to start a run from.

    ``build()`` makes the config's architecture for an unpruned checkpoint; a
    pruned one rebuilds the architecture it records
    (:func:`mtkd.models.restore.model_from_checkpoint`). The checkpoint must
    be of the config's task and have ``nc`` classes (ConfigErrors naming
    ``model.init``); other class names only warn.
    """
    task = get_task(cfg["task"])
    try:
        ck = ckpt_io.load_checkpoint(path)
        _checked_task(ck, path, task)
    except MtkdError as exc:
        raise ConfigError(f"model.init: {exc}") from None
    own = ck.get("classes")
    if not isinstance(own, (list, tuple)) or len(own) != nc:
        n = len(own) if isinstance(own, (list, tuple)) else "no"
        raise ConfigError(f"model.init: {path} has {n} classes but the data has {nc}")
    if classes is not None and list(own) != list(classes):
        warnings.warn(f"model.init: {path} was trained on classes {list(own)}, the data has {list(classes)}",
                      stacklevel=2)
    return model_from_checkpoint(
        ck, path, build, num_classes=nc, model_cfg=cfg.get("model"),
        mismatch=lambda d: ConfigError(f"model.init: {path} does not fit the model of the config: {d}"))


def load_model(cfg: Dict[str, Any], ckpt_path: str | Path,
               task: Optional[Task] = None) -> tuple[Task, nn.Module, List[str], torch.device]:
    """The model of ``cfg["model"]`` with a checkpoint's ``"model"`` weights, in eval mode.

    Returns ``(task, model, classes, device)``; ``classes`` are the checkpoint's.
    Weights that do not fit the config's model raise an MtkdError naming the file.
    A pruned checkpoint brings its own architecture
    (:func:`mtkd.models.restore.model_from_checkpoint`).
    """
    task = task if task is not None else get_task(cfg["task"])
    device = ddp.resolve_device(cfg["train"]["device"])
    ck = ckpt_io.load_checkpoint(ckpt_path, trust_pickle=False)
    _checked_task(ck, ckpt_path, task)
    classes = ck.get("classes")
    if not classes:
        raise MtkdError(f"{ckpt_path}: checkpoint has no class list")
    model = model_from_checkpoint(
        ck, ckpt_path, lambda: task.build_model(_without_pretrained(cfg), len(classes)), model_cfg=cfg.get("model"),
        mismatch=lambda d: MtkdError(f"{ckpt_path}: weights do not fit the model of the config: {d}"))
    return task, model.to(device).eval(), list(classes), device


def evaluate_checkpoint(cfg: Dict[str, Any], ckpt_path: str | Path, split: str = "test",
                        task: Optional[Task] = None) -> Dict[str, Any]:
    """Metrics of a checkpoint on ``split`` plus params/gflops/latency.

    ``"split"`` is the config key, ``"split_read"`` the split it named (:func:`split_read`);
    ``"skipped_samples"`` counts the samples skipped as bad (``data.skip_bad``) where the dataset says.
    """
    task, model, classes, device = load_model(cfg, ckpt_path, task)
    ds = task.build_dataset(cfg, split, False)
    if list(ds.classes) != classes:
        raise MtkdError(f"{ckpt_path}: trained on classes {classes} but data.{split} has {list(ds.classes)}")
    t = cfg["train"]
    loader = DataLoader(ds, batch_size=t["batch"], num_workers=t["workers"], collate_fn=task.collate)
    metrics: Dict[str, Any] = {"split": split, "split_read": split_read(ds, cfg, split), "checkpoint": str(ckpt_path)}
    metrics.update(task.evaluate(model, loader, ds, cfg, device, bool(t["amp"])))
    skipped = skipped_samples(ds)
    if skipped is not None:
        metrics["skipped_samples"] = skipped
    metrics.update(task.model_info(model, cfg))
    return metrics


def predict_checkpoint(cfg: Dict[str, Any], ckpt_path: str | Path, source: str | Path, out: str | Path,
                       task: Optional[Task] = None) -> Any:
    """Predict image file ``source``, or every image of folder ``source``, into folder ``out`` with a checkpoint."""
    source = Path(source)
    if not source.exists():
        raise MtkdError(f"{source}: source not found (give an image file or a folder of images)")
    task, model, classes, device = load_model(cfg, ckpt_path, task)
    with writing(out):
        Path(out).mkdir(parents=True, exist_ok=True)
    return task.predict(model, source, Path(out), classes, cfg, device)
