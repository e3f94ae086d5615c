"""LossComposer labels: `as:` lets one loss appear twice in a section; duplicate labels are errors."""
from __future__ import annotations

import pytest
import torch

from mtkd.errors import ConfigError
from mtkd.losses.base import build_loss
from mtkd.losses.composer import LossComposer


def _outputs():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    return {"logits": s}, {"logits": t}, {"labels": torch.tensor([0, 1, 2, 3])}


def test_as_labels_let_one_loss_appear_twice_with_its_own_weight_and_log():
    cfg = {"det": {}, "seg": {}, "extra": [{"name": "st", "T": 2, "weight": 0.5},
                                           {"name": "st", "as": "st_t8", "T": 8, "weight": 0.25},
                                           "ce"]}
    composer = LossComposer(cfg, with_teacher=True)
    assert list(composer.extra) == ["st", "st_t8", "ce"]
    s, t, batch = _outputs()
    total, logs = composer(s, t, batch)
    st2, st8, ce = (build_loss("st", T=2)(s, t, batch), build_loss("st", T=8)(s, t, batch),
                    build_loss("ce")(s, t, batch))
    assert not torch.isclose(st2, st8)
    torch.testing.assert_close(logs["extra/st"], st2)
    torch.testing.assert_close(logs["extra/st_t8"], st8)
    torch.testing.assert_close(total, 0.5 * st2 + 0.25 * st8 + ce)


def test_duplicate_labels_in_one_section_are_one_line_config_errors():
    with pytest.raises(ConfigError) as info:
        LossComposer({"det": {}, "seg": {}, "extra": ["ce", {"name": "st", "T": 2}, {"name": "st", "T": 8}]},
                     with_teacher=True)
    assert str(info.value) == ("loss.extra[2]: duplicate loss label 'st' (also loss.extra[1]); "
                               "give one of them 'as: <label>'")
    # an `as` label clashing with another entry's name is a duplicate too
    with pytest.raises(ConfigError, match=r"^loss\.extra\[1\]: duplicate loss label 'ce' \(also loss\.extra\[0\]\)"):
        LossComposer({"det": {}, "seg": {}, "extra": ["ce", {"name": "st", "as": "ce"}]}, with_teacher=True)
    # soft terms of a task, checked with or without a teacher (the config is wrong either way)
    soft = {"det": {}, "seg": {"alpha": 0.5, "hard": "seg_ce", "soft": ["seg_kl", {"name": "seg_kl", "T": 4}]}}
    for with_teacher in (True, False):
        with pytest.raises(ConfigError, match=r"^loss\.seg\.soft\[1\]: duplicate loss label 'seg_kl' "
                                              r"\(also loss\.seg\.soft\[0\]\)"):
            LossComposer(soft, with_teacher=with_teacher)
    soft["seg"]["soft"][1]["as"] = "seg_kl_t4"
    assert list(LossComposer(soft, with_teacher=True).soft["seg"]) == ["seg_kl", "seg_kl_t4"]
    # the same label in different sections is fine; a bad label is named
    LossComposer({"det": {}, "seg": {}, "extra": [{"name": "ce", "as": "seg_kl"}]}, with_teacher=False)
    with pytest.raises(ConfigError, match=r"^loss\.extra\[0\]\.as: expected a non-empty label without"):
        LossComposer({"det": {}, "seg": {}, "extra": [{"name": "ce", "as": "a.b"}]}, with_teacher=False)
