"""DDP through torchrun: two CPU processes (gloo) train the toy task together.

Checks that both ranks trained the same number of steps, ended with identical
student, loss-adapter and auxiliary-group parameters (one DDP wrapper over
student and adapters, one per auxiliary group), that an adapter left out of
the graph on some steps, on one rank or both, trains in step on both ranks,
and that only rank 0 wrote files; that two ranks of 4 images train student
and adapters as one process does on those 8 images; and that feat_gan's
discriminators (R1 penalty on) stay identical across ranks that see different
features; and that a stop a callback asks for on one rank (early stopping on
rank 0, another callback on rank 1) ends the run on both; and that ``mtkd yolo
train``'s neck adapters, in their own DDP wrapper, start from rank 0's weights
and get the mean of both ranks' gradients. Each takes ~15-30 s
(process start-up dominates).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import test_engine
from mtkd.engine.trainer import Trainer
from mtkd.losses.base import Loss, register

TESTS = Path(__file__).resolve().parent


@register("toy_fit")
class ToyFitLoss(Loss):
    """A 1x1 adapter from ``feats.p3`` fitted to the detached seg logits. With ``gate``, the
    adapter is in the graph only for batches whose first image has an even index (the term
    is a constant zero otherwise); ``used`` records that per call."""

    def __init__(self, gate: bool = False):
        super().__init__()
        self.adapter = nn.Conv2d(8, 2, 1)
        self.gate = gate
        self.used: list = []

    def forward(self, student_out, teacher_out, batch):
        used = not self.gate or int(batch["index"][0]) % 2 == 0
        self.used.append(used)
        if not used:
            return 0.0 * student_out["seg"].sum()
        return (self.adapter(student_out["feats"]["p3"]) - student_out["seg"].detach()).pow(2).mean()


def without_batchnorm(self, cfg, num_classes):
    """The toy task's model with its BatchNorm replaced by an identity (no per-batch statistics)."""
    net = test_engine.ToyNet()
    net.body[1] = nn.Identity()
    return net


def equivalence_cfg(out: Path, batch: int) -> dict:
    """3 epochs of one SGD step each on the toy task's 8 "val" images, plus ``toy_fit``."""
    cfg = test_engine.toy_cfg(out, epochs=3, batch=batch, optimizer="sgd", lr=0.05)
    cfg["data"]["train"] = "val"
    cfg["loss"]["extra"] = [{"name": "toy_fit"}]
    return cfg


SCRIPT = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    import test_ddp, test_engine
    from mtkd.engine.trainer import Trainer

    out = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    cfg = test_engine.toy_cfg(out / "run", epochs=2, batch=4)
    # an auxiliary group (its critic is a composer parameter) and an adapter some steps leave out
    cfg["loss"]["extra"] = [{{"name": "toy_aux"}}, {{"name": "toy_fit", "gate": True}}]
    trainer = Trainer(cfg)
    build, teardown = trainer.build, trainer._teardown

    def build_and_record():
        build()
        torch.save({{k: v.detach().clone() for k, v in trainer.composer.named_parameters()}}, out / f"init{{rank}}.pt")

    def record(clean):
        # parameters only: BatchNorm statistics are rank-local after the last forward (DDP
        # broadcasts rank 0's buffers at the *start* of each forward)
        state = {{"model": dict(trainer.model.named_parameters()),
                  "composer": dict(trainer.composer.named_parameters())}}
        torch.save(state, out / f"rank{{rank}}.pt")
        in_ddp = {{id(p) for p in trainer.net.module.parameters()}}
        info = {{"steps": trainer.step, "world": trainer.dist.world_size,
                 "adapters_in_ddp": all(id(p) in in_ddp for p in trainer.composer.student_parameters()),
                 "used": trainer.composer.extra["toy_fit"].used}}
        (out / f"rank{{rank}}.json").write_text(json.dumps(info))
        teardown(clean)

    trainer.build, trainer._teardown = build_and_record, record
    trainer.fit()
""")


GAN_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    torch.set_num_threads(1)
    from mtkd.engine import distributed as ddp
    from mtkd.engine.aux import AuxOptimizers
    from mtkd.losses import build_loss

    info = ddp.setup("cpu")
    torch.manual_seed(0)  # the same D on every rank; features differ by rank below
    gan = build_loss("feat_gan", feats=["p3"], d_channels=4, r1=1.0, lr_d=1e-2)
    g = torch.Generator().manual_seed(100 + info.rank)

    def feats():
        return ({{"feats": {{"p3": torch.randn(2, 4, 6, 6, generator=g)}}}},
                {{"feats": {{"p3": torch.randn(2, 6, 6, 6, generator=g) + 1}}}})

    gan(*feats(), {{}})  # the dry forward builds adapter and D
    aux = AuxOptimizers([("extra/feat_gan", gan)], info)
    for step in range(1, 4):
        logs = aux.step(step, *feats(), {{}})
    torch.save({{"disc": dict(gan.disc.named_parameters()), "logs": logs}}, sys.argv[1] + f"/gan{{info.rank}}.pt")
    ddp.shutdown(info)
""")


def _torchrun(tmp_path: Path, name: str, source: str) -> subprocess.CompletedProcess:
    """Write ``source`` to ``tmp_path/name`` and run it on 2 ranks with ``tmp_path`` as its argument;
    fails the test unless it exits 0."""
    script = tmp_path / name
    script.write_text(source)
    env = dict(os.environ, OMP_NUM_THREADS="1")  # with conftest's offline switches
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
         str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_torchrun_feat_gan_discriminators_stay_in_sync(tmp_path):
    _torchrun(tmp_path, "gan_run.py", GAN_SCRIPT.format())
    r0, r1 = (torch.load(tmp_path / f"gan{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["logs"]["extra/feat_gan/d_loss"] != r1["logs"]["extra/feat_gan/d_loss"]  # different features
    assert r0["disc"].keys() == r1["disc"].keys()
    for name, t in r0["disc"].items():
        assert torch.equal(t, r1["disc"][name]), name


@pytest.mark.slow
def test_torchrun_two_ranks_gloo(tmp_path):
    _torchrun(tmp_path, "ddp_run.py", SCRIPT.format(tests=str(TESTS)))
    infos = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # 24 images over 2 ranks, batch 4 -> 3 steps per epoch on each rank
    for info in infos:
        assert (info["steps"], info["world"], info["adapters_in_ddp"]) == (6, 2, True)
    # the gated adapter (calls: the lazy forward, then 6 steps) was left out on one rank only at some
    # steps, and used somewhere
    used = [info["used"][1:] for info in infos]
    assert len(used[0]) == len(used[1]) == 6
    assert any(a != b for a, b in zip(*used)) and any(used[0] + used[1])
    s0, s1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for part in ("model", "composer"):
        for name, t in s0[part].items():
            assert torch.equal(t, s1[part][name]), f"{part}.{name} differs between ranks"
    init = torch.load(tmp_path / "init0.pt", weights_only=True)
    for name in ("hard.seg.adapter.weight", "extra.toy_fit.adapter.weight", "extra.toy_aux.critic.weight"):
        assert torch.equal(init[name], torch.load(tmp_path / "init1.pt", weights_only=True)[name]), name
        assert not torch.allclose(s0["composer"][name], init[name]), f"{name} did not train"
    run = tmp_path / "run"
    ck = torch.load(run / "last.pt", weights_only=True)
    assert ck["epoch"] == 2 and ck["step"] == 6
    assert (run / "best.pt").is_file() and (run / "test_metrics.json").is_file()
    assert json.loads((run / "test_metrics.json").read_text())["world_size"] == 2
    assert len((run / "results.csv").read_text().strip().splitlines()) == 3  # header + 2 epochs, rank 0 only


EQUIVALENCE_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    import test_ddp, test_engine
    from mtkd.engine.trainer import Trainer

    test_engine.ToyTask.build_model = test_ddp.without_batchnorm
    Trainer(test_ddp.equivalence_cfg(Path(sys.argv[1]) / "ddp", batch=4)).fit()
""")


@pytest.mark.slow
def test_torchrun_two_ranks_train_like_one_process_on_both_halves(tmp_path, monkeypatch):
    """2 ranks x 4 images per step end (up to rounding) where 1 process x 8 images ends: DDP averages
    the student's and the adapters' gradients alike (BatchNorm-free model, SGD)."""
    _torchrun(tmp_path, "equivalence.py", EQUIVALENCE_SCRIPT.format(tests=str(TESTS)))
    monkeypatch.setattr(test_engine.ToyTask, "build_model", without_batchnorm)
    trainer = Trainer(equivalence_cfg(tmp_path / "one", batch=8))
    build = trainer.build
    init = {}

    def build_and_record():
        build()
        init.update({f"composer.{k}": v.detach().clone() for k, v in trainer.composer.named_parameters()})
        init.update({f"model.{k}": v.detach().clone() for k, v in trainer.model.named_parameters()})

    trainer.build = build_and_record
    trainer.fit()
    one, two = (torch.load(tmp_path / run / "last.pt", weights_only=True) for run in ("one", "ddp"))
    assert one["step"] == two["step"] == 3
    for part in ("model", "composer"):
        a, b = one["train_state"][part], two["train_state"][part]
        assert a.keys() == b.keys()
        for name in a:
            assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-6), f"{part}.{name}"
    moved = (one["train_state"]["composer"]["extra.toy_fit.adapter.weight"]
             - init["composer.extra.toy_fit.adapter.weight"]).abs().max()
    assert moved > 1e-3  # far above the tolerance: the adapter's updates are compared


# One Trainer per torchrun: a second process group in the same processes can race the first's
# teardown at its rendezvous (the store still holds the first group's addresses).
STOP_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    import test_engine
    from mtkd.engine.trainer import Trainer

    out = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    epochs = []

    class Recorder:
        def on_epoch_end(self, trainer, means):
            epochs.append(trainer.epoch)

    class StopOnRank1:
        def on_epoch_end(self, trainer, means):
            if trainer.dist.rank == 1:
                trainer.request_stop("rank1", "asked on rank 1")

    if out.name == "es":  # lr 0: epoch 1 stays the best; rank 0 decides, both ranks stop after epoch 3
        trainer = Trainer(test_engine.toy_cfg(out / "run", epochs=10, batch=4, lr=0.0, patience=2),
                          callbacks=[Recorder()])
    else:  # a user callback asks on rank 1 only
        trainer = Trainer(test_engine.toy_cfg(out / "run", epochs=10, batch=4), callbacks=[Recorder(), StopOnRank1()])
    trainer.fit()
    (out / f"stop{{rank}}.json").write_text(json.dumps({{"epochs": epochs, "stop": trainer.stop_reason,
                                                         "detail": trainer.stop_detail}}))
""")


@pytest.mark.slow
@pytest.mark.parametrize("case, epochs, reason", [("es", [0, 1, 2], "early_stopping"), ("own", [0], "rank1")])
def test_torchrun_a_stop_asked_on_one_rank_stops_both(tmp_path, case, epochs, reason):
    out = tmp_path / case
    out.mkdir()
    proc = _torchrun(out, "stop_run.py", STOP_SCRIPT.format(tests=str(TESTS)))
    for rank in (0, 1):
        info = json.loads((out / f"stop{rank}.json").read_text())
        assert info["epochs"] == epochs and info["stop"] == reason, (rank, info)
    assert json.loads((out / "run" / "test_metrics.json").read_text())["stop_reason"] == reason
    if case == "own":
        assert all(json.loads((out / f"stop{r}.json").read_text())["detail"] == "asked on rank 1" for r in (0, 1))
        assert "stopped: rank1, asked on rank 1 (asked by a callback" in proc.stdout


YOLO_KD_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    torch.set_num_threads(1)
    from mtkd.engine import distributed as ddp
    from mtkd.structures import DetOutput
    from mtkd.yolo.losses import YoloKD
    from mtkd.yolo.trainer import kd_forward

    info = ddp.setup("cpu")
    torch.manual_seed(info.rank)  # adapters start different on each rank
    s_ch, t_ch = {{"p3": 4, "p4": 6}}, {{"p3": 8, "p4": 6}}
    kd = YoloKD(cls=0.0, dfl=0.0, obj=0.0, feat=1.0, student_channels=s_ch, teacher_channels=t_ch)
    before = {{k: v.detach().clone() for k, v in kd.state_dict().items()}}
    fwd = kd_forward(kd, info.world_size, info.device)
    start = {{k: v.detach().clone() for k, v in kd.state_dict().items()}}
    g = torch.Generator().manual_seed(100 + info.rank)  # each rank sees its own features
    det = DetOutput(cls=torch.zeros(2, 5, 3), obj=torch.zeros(2, 5), box=torch.zeros(2, 5, 4),
                    anchors=torch.zeros(5, 2), strides=torch.ones(5, 1))
    s_feats = {{k: torch.randn(2, c, 4, 4, generator=g) for k, c in s_ch.items()}}
    t_feats = {{k: torch.randn(2, c, 4, 4, generator=g) for k, c in t_ch.items()}}
    terms = fwd(det, det, s_feats, t_feats)
    sum(terms.values()).backward()
    grads = {{k: p.grad.clone() for k, p in kd.named_parameters()}}
    torch.save({{"wrapped": type(fwd).__name__, "before": before, "start": start, "grads": grads,
                "s_feats": s_feats, "t_feats": t_feats}}, sys.argv[1] + f"/yolo_kd{{info.rank}}.pt")
    del fwd
    ddp.shutdown(info)
""")


@pytest.mark.slow
def test_torchrun_yolo_kd_adapters_are_averaged_by_their_own_ddp_wrapper(tmp_path):
    """``mtkd yolo train``'s neck adapters under DDP: rank 0's adapters are broadcast at the wrap, and
    each rank ends its backward with the mean of both ranks' gradients, as one process computes it."""
    from mtkd.structures import DetOutput
    from mtkd.yolo.losses import YoloKD
    from mtkd.yolo.trainer import kd_forward

    _torchrun(tmp_path, "yolo_kd.py", YOLO_KD_SCRIPT.format())
    r0, r1 = (torch.load(tmp_path / f"yolo_kd{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["wrapped"] == r1["wrapped"] == "DistributedDataParallel"
    name = "terms.kd_feat.adapters.convs.p3.weight"  # 4 -> 8 channels: PyTorch's random init
    assert not torch.equal(r0["before"][name], r1["before"][name])  # seeded apart
    for key, value in r0["start"].items():
        assert torch.equal(value, r1["start"][key]), key  # rank 0's broadcast
    kd = YoloKD(cls=0.0, dfl=0.0, obj=0.0, feat=1.0, student_channels={"p3": 4, "p4": 6},
                teacher_channels={"p3": 8, "p4": 6})
    kd.load_state_dict(r0["start"])
    assert kd_forward(kd, 1, torch.device("cpu")) is kd  # one process: no wrapper
    det = DetOutput(cls=torch.zeros(2, 5, 3), obj=torch.zeros(2, 5), box=torch.zeros(2, 5, 4),
                    anchors=torch.zeros(5, 2), strides=torch.ones(5, 1))
    per_rank = []
    for r in (r0, r1):
        kd.zero_grad()
        sum(kd(det, det, r["s_feats"], r["t_feats"]).values()).backward()
        per_rank.append({k: p.grad.clone() for k, p in kd.named_parameters()})
    assert not torch.allclose(per_rank[0][name], per_rank[1][name])  # the ranks' own gradients differ
    for key in per_rank[0]:
        mean = (per_rank[0][key] + per_rank[1][key]) / 2
        for r in (r0, r1):
            assert torch.allclose(r["grads"][key], mean, rtol=1e-5, atol=1e-7), key
