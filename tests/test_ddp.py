"""DDP through torchrun: two CPU processes (gloo) train the toy task together.

Checks that both ranks trained the same number of steps, ended with identical
student, loss-adapter and auxiliary-group parameters (DDP for the model;
broadcast + averaged gradients for composer parameters; a DDP wrapper per
auxiliary group), and that only rank 0 wrote files; and that feat_gan's
discriminators (R1 penalty on) stay identical across ranks that see different
features. Each takes ~15-30 s (process start-up dominates).
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

TESTS = Path(__file__).resolve().parent

SCRIPT = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    import test_engine
    from mtkd.engine.trainer import Trainer

    out = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    cfg = test_engine.toy_cfg(out / "run", epochs=2, batch=4)
    cfg["loss"]["extra"] = [{{"name": "toy_aux"}}]  # an auxiliary group (its critic is a composer parameter)
    trainer = Trainer(cfg)
    teardown = trainer._teardown

    def record(clean):
        # parameters only: BatchNorm statistics are rank-local after the last forward (DDP
        # broadcasts rank 0's buffers at the *start* of each forward)
        state = {{"model": dict(trainer.model.named_parameters()),
                  "composer": dict(trainer.composer.named_parameters())}}
        torch.save(state, out / f"rank{{rank}}.pt")
        (out / f"rank{{rank}}.json").write_text(json.dumps({{"steps": trainer.step, "world": trainer.dist.world_size}}))
        teardown(clean)

    trainer._teardown = record
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


def _torchrun(script: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")  # with conftest's offline switches
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), *args],
        capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.slow
def test_torchrun_feat_gan_discriminators_stay_in_sync(tmp_path):
    script = tmp_path / "gan_run.py"
    script.write_text(GAN_SCRIPT.format())
    proc = _torchrun(script, str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"gan{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["logs"]["extra/feat_gan/d_loss"] != r1["logs"]["extra/feat_gan/d_loss"]  # different features
    assert r0["disc"].keys() == r1["disc"].keys()
    for name, t in r0["disc"].items():
        assert torch.equal(t, r1["disc"][name]), name


@pytest.mark.slow
def test_torchrun_two_ranks_gloo(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT.format(tests=str(TESTS)))
    proc = _torchrun(script, str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    infos = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # 24 images over 2 ranks, batch 4 -> 3 steps per epoch on each rank
    assert infos[0] == infos[1] == {"steps": 6, "world": 2}
    s0, s1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for part in ("model", "composer"):
        for name, t in s0[part].items():
            assert torch.equal(t, s1[part][name]), f"{part}.{name} differs between ranks"
    run = tmp_path / "run"
    ck = torch.load(run / "last.pt", weights_only=True)
    assert ck["epoch"] == 2 and ck["step"] == 6
    assert (run / "best.pt").is_file() and (run / "test_metrics.json").is_file()
    assert json.loads((run / "test_metrics.json").read_text())["world_size"] == 2
    assert len((run / "results.csv").read_text().strip().splitlines()) == 3  # header + 2 epochs, rank 0 only
