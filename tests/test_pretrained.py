"""`model.pretrained: false | true | PATH`: backbones, classifiers, teachers, config validation.

`true` is only checked to reach timm / smp (their downloads are not exercised);
PATH files are written here from perturbed encoders and read back through configs.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from mtkd.checkpoint import save_atomic
from mtkd.engine.config import build_config
from mtkd.errors import ConfigError
from mtkd.models import build_model
from mtkd.models.backbone import build_backbone
from mtkd.tasks.classify.models import build_classifier
from mtkd.tasks.classify.task import ClassifyTask
from mtkd.teachers import load_teacher

ROOT = Path(__file__).resolve().parents[1]
TINY = {"backbone": "resnet10t", "neck_channels": 16, "head_channels": 16, "seg_channels": 32}


def perturbed(module: torch.nn.Module, seed: int = 1) -> dict:
    """A copy of ``module``'s state dict with every float tensor moved away from its init."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
            for k, v in module.state_dict().items()}


def assert_same(state: dict, module: torch.nn.Module, skip: str = "") -> None:
    own = module.state_dict()
    checked = [k for k in state if not (skip and k.startswith(skip))]
    assert checked
    for k in checked:
        torch.testing.assert_close(own[k], state[k], rtol=0, atol=0, msg=k)


# -- multi-task backbones ----------------------------------------------------------------------
@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "body_prefix"])
def test_timm_encoder_loads_a_local_state_dict_through_the_config(tmp_path, wrap):
    state = perturbed(build_backbone("resnet10t").body)
    obj = {"plain": state, "state_dict": {"state_dict": state, "epoch": torch.tensor(3)},
           "model": {"model": state}, "body_prefix": {f"body.{k}": v for k, v in state.items()}}[wrap]
    path = tmp_path / "enc.pt"
    torch.save(obj, path)
    model = build_model({**TINY, "pretrained": str(path)}, 3)
    assert_same(state, model.backbone.body)
    fresh = build_model(TINY, 3)  # default: random init, not the file's weights
    assert not torch.equal(fresh.backbone.body.state_dict()["conv1.0.weight"], state["conv1.0.weight"])


def test_smp_encoder_and_reduced_timm_encoder_load_a_state_dict(tmp_path):
    # smp encoder; and the student's mobilenetv3, whose features_only body is rebuilt with 4 taps
    for name in ("smp:resnet18", "mobilenetv3_large_100"):
        state = perturbed(build_backbone(name).body)
        path = tmp_path / f"{name.replace(':', '_')}.pt"
        torch.save(state, path)
        assert_same(state, build_backbone(name, pretrained=str(path)).body)


def test_state_dict_errors_are_one_line_naming_the_file_and_key(tmp_path):
    state = build_backbone("resnet10t").body.state_dict()
    missing = tmp_path / "gone.pt"
    with pytest.raises(ConfigError, match=rf"^model\.pretrained: {missing}: file not found$"):
        build_model({**TINY, "pretrained": str(missing)}, 3)
    cases = {
        "extra.pt": ({**state, "extra.weight": torch.zeros(1)}, r"unexpected key 'extra\.weight'$"),
        "short.pt": ({k: v for k, v in state.items() if k != "conv1.0.weight"},
                     r"missing key 'conv1\.0\.weight'$"),
        "shape.pt": ({**state, "conv1.0.weight": torch.zeros(1, 2)},
                     r"'conv1\.0\.weight' has shape \[1, 2\] in the file, \[24, 3, 3, 3\] in the model$"),
        "list.pt": ([1, 2], r"not a state dict of tensors"),
    }
    for name, (obj, msg) in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(ConfigError) as info:
            build_backbone("resnet10t", pretrained=str(tmp_path / name))
        text = str(info.value)
        assert "\n" not in text and text.startswith(f"model.pretrained: {tmp_path / name}: "), text
        assert re.search(msg, text), text
    # num_batches_tracked may be absent (BatchNorm fills it, as torch's own strict loading does)
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, tmp_path / "nbt.pt")
    build_backbone("resnet10t", pretrained=str(tmp_path / "nbt.pt"))
    with pytest.raises(ConfigError, match=r"^model\.pretrained: expected false, true or a path"):
        build_model({**TINY, "pretrained": 3}, 3)


def test_true_is_passed_to_timm_and_smp(monkeypatch):
    import segmentation_models_pytorch.encoders as smp_encoders
    import timm

    seen = []
    create, get_encoder = timm.create_model, smp_encoders.get_encoder

    def fake_create(*args, **kwargs):
        seen.append(("timm", kwargs.get("pretrained")))
        return create(*args, **{**kwargs, "pretrained": False})

    def fake_encoder(*args, **kwargs):
        seen.append(("smp", kwargs.get("weights")))
        return get_encoder(*args, **{**kwargs, "weights": None})

    monkeypatch.setattr(timm, "create_model", fake_create)
    monkeypatch.setattr(smp_encoders, "get_encoder", fake_encoder)
    build_model({**TINY, "pretrained": True}, 3)
    assert seen[-1] == ("timm", True)
    build_backbone("smp:resnet18", pretrained=True)
    assert seen[-1] == ("smp", "imagenet")
    seen.clear()
    build_model(TINY, 3)
    assert seen and all(p is False for _, p in seen)
    build_classifier("timm/resnet10t", 4, pretrained=True)
    assert seen[-1] == ("timm", True)


def test_config_key_defaults_false_and_takes_bool_or_path():
    assert build_config({})["model"]["pretrained"] is False
    assert build_config({}, ["model.pretrained=weights/enc.pt"])["model"]["pretrained"] == "weights/enc.pt"
    assert build_config({}, ["model.pretrained=true"])["model"]["pretrained"] is True
    with pytest.raises(ConfigError, match=r"^model\.pretrained: expected bool or str, got int \(3\)$"):
        build_config({}, ["model.pretrained=3"])


# -- classifiers -------------------------------------------------------------------------------
def test_classifier_loads_all_but_its_class_layer(tmp_path):
    # cnn4 trained for 5 classes initialises a 7-class cnn4: everything but classifier.3
    state = perturbed(build_classifier("cnn4", 5))
    torch.save(state, tmp_path / "cnn4.pt")
    model = build_classifier("cnn4", 7, pretrained=str(tmp_path / "cnn4.pt"))
    assert_same(state, model, skip="classifier.3.")
    assert model.classifier[3].weight.shape == (7, 128)
    # a timm classifier's own state dict (1000-class style head of another size)
    import timm

    net = timm.create_model("resnet10t", num_classes=10)
    state = perturbed(net)
    torch.save({"state_dict": state}, tmp_path / "r10.pt")
    model = build_classifier("timm/resnet10t", 4, pretrained=str(tmp_path / "r10.pt"))
    assert model.head_name == "fc"
    assert_same(state, model.model, skip="fc.")
    # true needs timm's weights: cnn4 and torchvision models say what to do instead
    with pytest.raises(ConfigError, match=r"^model\.pretrained: cnn4 has no published weights"):
        build_classifier("cnn4", 3, pretrained=True)
    with pytest.raises(ConfigError, match=r"^model\.pretrained: true takes timm's weights; name the model "
                                          r"'timm/resnet18'"):
        build_classifier("resnet18", 3, pretrained=True)


def test_classify_task_reads_model_and_teacher_pretrained(tmp_path):
    state = perturbed(build_classifier("cnn4", 3))
    torch.save(state, tmp_path / "s.pt")
    cfg = build_config({"task": "classify"}, [f"model.pretrained={tmp_path / 's.pt'}"])
    assert_same(state, ClassifyTask().build_model(cfg, 3), skip="classifier.3.")
    cfg["teacher"]["model"] = {"name": "cnn4", "pretrained": str(tmp_path / "s.pt")}
    assert_same(state, ClassifyTask().build_teacher(cfg, 3), skip="classifier.3.")
    cfg["teacher"]["model"]["pretrained"] = str(tmp_path / "gone.pt")
    with pytest.raises(ConfigError, match=r"^teacher\.model\.pretrained: .*gone\.pt: file not found$"):
        ClassifyTask().build_teacher(cfg, 3)
    # with a checkpoint the checkpoint's weights are the teacher's: the init file is not read
    ckpt = build_classifier("cnn4", 3)
    save_atomic({"model": ckpt.state_dict()}, tmp_path / "t.pt")
    cfg["teacher"]["ckpt"] = str(tmp_path / "t.pt")
    assert_same(ckpt.state_dict(), ClassifyTask().build_teacher(cfg, 3))


# -- checkpoints replace the init ----------------------------------------------------------------
def test_teacher_and_eval_do_not_read_the_init_file_of_a_checkpointed_model(tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import random_checkpoint
    from mtkd.engine.trainer import load_model

    ckpt = random_checkpoint(tmp_path / "t.pt", TINY, ["a", "b", "c"])
    gone = str(tmp_path / "gone.pt")
    teacher = load_teacher({"ckpt": str(ckpt), "model": {**TINY, "pretrained": gone}}, 3)
    assert_same(torch.load(ckpt, weights_only=True)["model"], teacher.model)
    with pytest.raises(ConfigError, match=r"^teacher\.model\.pretrained: expected false, true or a path"):
        load_teacher({"ckpt": str(ckpt), "model": {**TINY, "pretrained": 1}}, 3)
    cfg = build_config({"model": {**TINY, "pretrained": gone}, "train": {"device": "cpu"}})
    _, model, classes, _ = load_model(cfg, ckpt)
    assert classes == ["a", "b", "c"]
    assert_same(torch.load(ckpt, weights_only=True)["model"], model)
