"""The one Registry class (losses, tasks, dataset formats, commands) and ``mtkd list``."""
from __future__ import annotations

import pytest

from mtkd.cli import main
from mtkd.datasets import build_dataset
from mtkd.engine.tasks import get_task
from mtkd.errors import ConfigError
from mtkd.losses import build_loss
from mtkd.models import PRESETS
from mtkd.registry import COMMANDS, FORMATS, LOSSES, TASKS, Registry


def test_register_get_names_and_default_name():
    reg = Registry("widget")

    @reg.register("round")
    class Round:
        """A round widget."""

    @reg.register()
    def square():
        """A square widget."""

    assert reg.get("round") is Round and reg.get("square") is square
    assert reg.names() == ["round", "square"] and "round" in reg and "oval" not in reg
    assert list(reg.items()) == [("round", Round), ("square", square)]
    assert reg.unregister("square") is square and reg.names() == ["round"]


def test_registering_a_name_twice_is_an_error():
    reg = Registry("widget")
    reg.register("a")(type("A", (), {}))
    with pytest.raises(ValueError, match="widget 'a' is registered twice"):
        reg.register("a")(type("B", (), {}))
    assert "seg_kl" in LOSSES  # imports the built-in losses
    with pytest.raises(ValueError, match=r"loss 'seg_kl' is registered twice \(mtkd\.losses\.distill\.seg_kl\.SegKL and "):
        LOSSES.register("seg_kl")(type("Other", (), {}))
    assert LOSSES.get("seg_kl").__name__ == "SegKL"


def test_unknown_names_are_one_line_config_errors_with_close_names():
    reg = Registry("widget")
    for name in ("circle", "circles", "square"):
        reg.register(name)(type(name, (), {}))
    with pytest.raises(ConfigError) as info:
        reg.get("circel", "shape.kind")
    assert str(info.value) == ("shape.kind: unknown widget 'circel'; did you mean circle, circles? "
                               "known: circle, circles, square")
    with pytest.raises(ConfigError, match=r"^widget: unknown widget 'hexagon'; known: circle"):
        reg.get("hexagon")
    with pytest.raises(ConfigError, match=r"^loss\.extra\[0\]: unknown loss 'seg_k1'; did you mean seg_kl"):
        build_loss("seg_k1", "loss.extra[0]")
    with pytest.raises(ConfigError, match=r"^task: unknown task 'multitsak'; did you mean multitask\?"):
        get_task("multitsak")
    with pytest.raises(ConfigError, match=r"^data\.format: unknown format 'vco'; did you mean voc\?"):
        build_dataset({"format": "vco", "root": "x"}, "train", train=False)


def test_mtkd_registries_hold_the_builtin_entries():
    # their locations are imported on the first lookup
    assert {"seg_kl", "det_mse", "cwd", "st", "yolo_det"} <= set(LOSSES.names())
    assert {"multitask", "classify"} <= set(TASKS.names())
    assert FORMATS.names() == ["coco", "voc", "yolo"]
    assert {"train", "eval", "list", "demo", "classify", "attack", "export"} <= set(COMMANDS.names())
    assert build_loss("seg_kl", T=3.0).registry_name == "seg_kl"


def test_mtkd_list_prints_each_name_with_its_description(capsys):
    assert main(["list", "losses"]) == 0
    rows = dict(line.split(None, 1) for line in capsys.readouterr().out.strip().splitlines())
    assert sorted(rows) == LOSSES.names()
    # a loss module opens with its paper; what the loss needs follows
    assert rows["st"] == "ST: soft targets (the original knowledge distillation). (needs: teacher)"
    assert rows["seg_kl"].startswith("Pixel-wise logit distillation") and rows["seg_kl"].endswith("(needs: teacher)")
    assert rows["seg_ce"] == "Pixel cross-entropy (the hard segmentation loss), with an optional Dice term."
    assert main(["list", "presets"]) == 0
    presets = [line.split()[0] for line in capsys.readouterr().out.strip().splitlines()]
    assert presets == list(PRESETS)
    assert main(["list", "formats"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split() == ["voc", "Pascal", "VOC", "layout."]
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(f"{what}:\n" in out for what in ("losses", "tasks", "formats", "presets", "commands"))
    assert "  multitask  Detection + segmentation" in out
