"""Registered adapters of every zoo loss on model output dicts.

Built by name on dense (seg logits, neck maps p3..p5) and classifier
(logits, embed, f1..f4) outputs: gradients reach the student and never the
teacher, student and teacher widths may differ, trainable parts are
registered, batch size 1 works, hooks (bind, aux_groups, extra_state, index)
behave, and misuse raises ConfigError. First sp, cc, irg, vid, ofd, afd, crd,
dml, bss, sobolev, lwm on tiny models, then logits, st, at, fitnet, nst, pkt,
fsp, ft, rkd, ab on random output dicts. The tensor-level formulas are in
test_zoo_formulas.py.
"""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtkd.engine.aux import AuxOptimizers
from mtkd.errors import ConfigError
from mtkd.losses import build_loss
from mtkd.losses.zoo.pkt import PKTCosSim
from mtkd.losses.zoo.rkd import RKD
from mtkd.structures import VOID


class TinyCls(nn.Module):
    """Classifier output dict: logits, embed, feats f1..f4 (tanh, so second
    derivatives are not zero)."""

    def __init__(self, w: int, classes: int = 5):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3, w, 3, 1, 1), nn.Conv2d(w, 2 * w, 3, 2, 1),
                                    nn.Conv2d(2 * w, 2 * w, 3, 2, 1), nn.Conv2d(2 * w, 4 * w, 3, 2, 1)])
        self.fc = nn.Linear(4 * w, classes)

    def forward(self, x):
        feats = {}
        for i, conv in enumerate(self.convs, 1):
            x = torch.tanh(conv(x))
            feats[f"f{i}"] = x
        embed = x.mean(dim=(2, 3))
        return {"logits": self.fc(embed), "embed": embed, "feats": feats}


class TinyDense(nn.Module):
    """Dense output dict: seg logits at input size and neck maps p3, p4, p5."""

    def __init__(self, w: int, classes: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(3, w, 3, 4, 1)
        self.p4 = nn.Conv2d(w, 2 * w, 3, 2, 1)
        self.p5 = nn.Conv2d(2 * w, 4 * w, 3, 2, 1)
        self.seg = nn.Conv2d(w, classes, 1)

    def forward(self, x):
        p3 = F.silu(self.stem(x))
        p4 = F.silu(self.p4(p3))
        p5 = F.silu(self.p5(p4))
        seg = F.interpolate(self.seg(p3), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return {"det": None, "seg": seg, "feats": {"p3": p3, "p4": p4, "p5": p5}}


def cls_batch(bs):
    return {"images": torch.randn(bs, 3, 16, 16), "labels": torch.randint(0, 5, (bs,)),
            "index": torch.arange(bs) + 3}


def dense_batch(bs):
    masks = torch.randint(0, 3, (bs, 32, 32))
    masks[:, :4] = VOID
    return {"images": torch.randn(bs, 3, 32, 32), "masks": masks, "has_seg": torch.ones(bs, dtype=torch.bool),
            "index": torch.arange(bs)}


def step(loss, student, teacher, batch):
    """What the trainer does: honour the declarations, forward, loss."""
    if "input_grad" in loss.requires:
        batch["images"].requires_grad_(True)
    s_out = student(batch["images"])
    if teacher is None:
        t_out = None
    elif "teacher_grad" in loss.requires:
        t_out = teacher(batch["images"])
    else:
        with torch.no_grad():
            t_out = teacher(batch["images"])
    return loss(s_out, t_out, batch), s_out, t_out


CASES = [  # name, kwargs, model kind
    ("sp", {}, "dense"), ("sp", {}, "cls"),
    ("cc", {}, "dense"), ("cc", {}, "cls"),
    ("irg", {}, "dense"), ("irg", {}, "cls"),
    ("vid", {}, "dense"), ("ofd", {}, "dense"), ("afd", {}, "dense"), ("afd", {}, "cls"),
    ("crd", {"n_data": 20, "nce_k": 8, "feat_dim": 6}, "dense"),
    ("crd", {"n_data": 20, "nce_k": 8, "feat_dim": 6}, "cls"),
    ("dml", {}, "dense"), ("dml", {}, "cls"),
    ("sobolev", {}, "cls"), ("lwm", {}, "cls"), ("bss", {"attack_size": 2, "num_steps": 2}, "cls"),
]
TRAINABLE = {"vid", "ofd", "afd", "crd"}
BATCH_RELATIONS = {"sp", "cc"}  # B x B relations only: constant at batch size 1


def models(kind):
    return (TinyDense(4), TinyDense(6)) if kind == "dense" else (TinyCls(4), TinyCls(6))


def make_correct(student, teacher, batch):
    """One label for every sample, and both models biased to predict it, so
    BSS has correctly classified samples to attack."""
    with torch.no_grad():
        label = teacher(batch["images"])["logits"][0].argmax()
        batch["labels"] = torch.full_like(batch["labels"], int(label))
        student.fc.weight.zero_()
        student.fc.bias.copy_(F.one_hot(label, 5).float())
        teacher.fc.bias.copy_(F.one_hot(label, 5).float() * 50)


@pytest.mark.parametrize("name,kwargs,kind", CASES)
@pytest.mark.parametrize("bs", [3, 1])
def test_adapter_gradients(name, kwargs, kind, bs):
    student, teacher = models(kind)
    batch = dense_batch(bs) if kind == "dense" else cls_batch(bs)
    if name == "bss":
        make_correct(student, teacher, batch)
    loss = build_loss(name, **kwargs)
    loss.bind(student, teacher)
    value, _, _ = step(loss, student, teacher, batch)
    assert value.dim() == 0 and torch.isfinite(value)
    if name == "bss":
        assert value.item() > 0  # samples were attacked and distilled
    value.backward()
    if bs == 1 and name in BATCH_RELATIONS:
        assert abs(value.item()) < 1e-10  # a one-sample relation matrix is constant
    else:
        grads = [p.grad for p in student.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), "no gradient reached the student"
    assert all(p.grad is None for p in teacher.parameters()), "gradient reached the teacher"
    params = list(loss.student_parameters())
    if name in TRAINABLE:
        assert params and any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
        assert all(p.requires_grad for p in params)
    else:
        assert not params


@pytest.mark.parametrize("name", ["sobolev", "lwm", "bss"])
def test_classification_only(name):
    student, teacher = models("dense")
    loss = build_loss(name)
    loss.bind(student, teacher)
    with pytest.raises(ConfigError, match=name):
        step(loss, student, teacher, dense_batch(2))


@pytest.mark.parametrize("name", ["sp", "cc", "irg", "dml"])
def test_zero_when_student_is_teacher(name):
    student = TinyDense(4)
    batch = dense_batch(2)
    loss = build_loss(name, **({"reinit": False} if name == "dml" else {}))
    loss.bind(student, student)
    value, _, _ = step(loss, student, student, batch)
    # zero up to float32 rounding (1e-10 failed at 3.5e-10 for dml with another thread count)
    assert abs(value.item()) < 1e-7


def test_sobolev_without_input_grad_is_config_error():
    student, teacher = models("cls")
    loss = build_loss("sobolev")
    batch = cls_batch(2)
    with pytest.raises(ConfigError, match="input_grad"):
        loss(student(batch["images"]), teacher(batch["images"]), batch)


def test_crd_needs_n_data_and_updates_memory_by_index():
    with pytest.raises(ConfigError, match="n_data"):
        build_loss("crd")
    student, teacher = models("cls")
    loss = build_loss("crd", n_data=10, nce_k=4, feat_dim=6)
    batch = cls_batch(2)
    batch["index"] = torch.tensor([2, 7])
    step(loss, student, teacher, batch)  # materialises the lazy embeddings
    memory = loss.core.contrast.memory_s
    before = memory.clone()
    step(loss, student, teacher, batch)
    changed = (memory != before).any(dim=1).nonzero().view(-1).tolist()
    assert changed == [2, 7]
    assert "core.contrast.memory_s" in loss.state_dict() and "core.contrast.Z_t" in loss.state_dict()
    batch["index"] = torch.tensor([2, 10])
    with pytest.raises(ConfigError, match="n_data"):
        step(loss, student, teacher, batch)


def test_dml_peer_hard_is_configurable():
    student, _ = models("cls")
    batch = cls_batch(2)
    loss = build_loss("dml", peer_hard=[{"name": "ce", "weight": 0.0}], peer_kd_weight=0.0, weight_decay=0.0)
    loss.bind(student, None)
    before = [p.detach().clone() for p in loss.peer.parameters()]
    _, s_out, _ = step(loss, student, None, batch)
    logs = AuxOptimizers([("", loss)]).step(1, s_out, None, batch)
    assert logs["peer_loss"] == 0.0
    assert all(torch.equal(b, p) for b, p in zip(before, loss.peer.parameters()))  # zero-weighted terms
    with pytest.raises(ConfigError, match="peer_hard"):
        build_loss("dml", peer_hard=[{"weight": 1.0}])


def test_vid_ofd_afd_parts_match_widths():
    student, teacher = models("dense")
    for name in ("vid", "ofd", "afd"):
        loss = build_loss(name)
        step(loss, student, teacher, dense_batch(2))
        assert set(loss.cores.keys()) == {"p3", "p4", "p5"}
    vid = build_loss("vid", feats=["p5"], sf=0.5)
    step(vid, student, teacher, dense_batch(2))
    reg = vid.cores["p5"].regressor
    assert (reg[0].in_channels, reg[0].out_channels, reg[-1].out_channels) == (16, 12, 24)


@pytest.mark.parametrize("kind", ["cls", "dense"])
def test_dml_peer_group_trains_peer_and_state_round_trips(kind):
    student, _ = models(kind)
    batch = dense_batch(2) if kind == "dense" else cls_batch(2)
    loss = build_loss("dml", lr=0.05)
    assert not loss.requires  # DML needs no teacher
    loss.bind(student, None)
    (group,) = loss.aux_groups()
    assert (group.name, group.optimizer, group.lr, group.momentum, group.weight_decay, group.nesterov) == \
        ("peer", "sgd", 0.05, 0.9, 1e-4, True)
    aux = AuxOptimizers([("", loss)])
    before = [p.detach().clone() for p in loss.peer.parameters()]
    value, s_out, _ = step(loss, student, None, batch)
    assert value.item() > 0  # re-initialised peer disagrees with the student
    logs = aux.step(1, {k: v for k, v in s_out.items() if k != "feats"}, None, batch)
    assert set(logs) == {"peer_loss", "peer_kd"}
    assert any(not torch.equal(b, p) for b, p in zip(before, loss.peer.parameters()))
    assert not list(loss.parameters())  # the peer is not trained by the student's optimiser

    buf = io.BytesIO()
    torch.save({"extra": loss.extra_state(), "aux": aux.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert set(state["extra"]) == {"peer"}
    other = build_loss("dml", lr=0.05)
    other.load_extra_state(state["extra"])  # before bind: applied when bound
    other.bind(student, None)
    for a, b in zip(loss.peer.state_dict().values(), other.peer.state_dict().values()):
        assert torch.equal(a, b)
    other_aux = AuxOptimizers([("", other)])
    other_aux.load_state_dict(state["aux"])
    assert other_aux.state_dict()["peer"]["state"].keys() == aux.state_dict()["peer"]["state"].keys()


def test_usable_from_composer_config():
    from mtkd.losses.composer import LossComposer

    student, teacher = models("cls")
    cfg = {"extra": [{"name": "sp", "weight": 0.5}, "cc", "irg", "vid", "ofd", "afd", "dml",
                     {"name": "crd", "n_data": 20, "nce_k": 4, "feat_dim": 6}]}
    composer = LossComposer(cfg, with_teacher=True)
    assert composer.requires == {"teacher", "index"}
    composer.bind(student, teacher)
    batch = cls_batch(2)
    with torch.no_grad():
        t_out = teacher(batch["images"])
    total, logs = composer(student(batch["images"]), t_out, batch)
    assert torch.isfinite(total) and {"extra/sp", "extra/crd", "extra/dml"} <= set(logs)
    trainable = list(composer.student_parameters())
    assert trainable and not any(p is q for p in trainable for q in composer.extra["dml"].peer.parameters())
    # Without a teacher only DML is kept (the others require one).
    assert list(LossComposer(cfg, with_teacher=False).extra.keys()) == ["dml"]


def test_lwm_teacher_feat_names_the_teachers_map():
    # at 16 px f3 is 4x4 and f2 8x8: pairing them is an error that points at teacher_feat
    student, teacher = TinyCls(4), TinyCls(6)
    with pytest.raises(ConfigError, match="teacher_feat"):
        step(build_loss("lwm", feat="f3", teacher_feat="f2"), student, teacher, cls_batch(2))
    torch.manual_seed(1)
    batch = cls_batch(2)
    explicit, _, _ = step(build_loss("lwm", feat="f3", teacher_feat="f3"), student, teacher,
                          {k: v.clone() for k, v in batch.items()})
    default, _, _ = step(build_loss("lwm", feat="f3"), student, teacher, {k: v.clone() for k, v in batch.items()})
    assert torch.isfinite(explicit) and torch.allclose(explicit, default)


# ==== logits, st, at, fitnet, nst, pkt, fsp, ft, rkd, ab ====================================
NAMES = ["logits", "st", "at", "fitnet", "nst", "pkt", "fsp", "ft", "rkd", "ab"]


def dense_out(b, widths, size=8, k=3, grad=False):
    c3, c4, c5 = widths
    out = {
        "seg": torch.randn(b, k, 16, 16),
        "feats": {
            "p3": torch.randn(b, c3, size, size),
            "p4": torch.randn(b, c4, size // 2, size // 2),
            "p5": torch.randn(b, c5, size // 4, size // 4),
        },
    }
    if grad:
        out["seg"].requires_grad_(True)
        for v in out["feats"].values():
            v.requires_grad_(True)
    return out


def cls_out(b, c=5, d=6, grad=False):
    out = {"logits": torch.randn(b, c), "embed": torch.randn(b, d),
           "feats": {f"f{i}": torch.randn(b, 4 * i, 16 // 2 ** i, 16 // 2 ** i) for i in range(1, 5)}}
    if grad:
        out["logits"].requires_grad_(True)
        out["embed"].requires_grad_(True)
        for v in out["feats"].values():
            v.requires_grad_(True)
    return out


DENSE_KW = {"logits": {"output": "seg"}, "st": {"output": "seg"}, "pkt": {"feats": ["p5"]},
            "rkd": {"feats": ["p5"]}, "ft": {"para_steps": 0}}


def _leaves(out):
    return [out["seg"], *out["feats"].values()] if "seg" in out else \
        [out["logits"], out["embed"], *out["feats"].values()]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("batch_size", [1, 3])
def test_adapter_dense_widths_differ_and_grad_flow(name, batch_size):
    loss = build_loss(name, **DENSE_KW.get(name, {}))
    assert "teacher" in loss.requires
    s = dense_out(batch_size, (8, 16, 32), grad=True)
    t = dense_out(batch_size, (12, 24, 48), grad=True)
    batch = {"masks": torch.zeros(batch_size, 16, 16, dtype=torch.long)}
    value = loss(s, t, batch)
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    assert all(x.grad is None for x in _leaves(t)), "gradient reached the teacher"
    grads = [x.grad for x in _leaves(s) if x.grad is not None]
    assert grads, "no gradient reached the student"
    if not (name in ("pkt", "rkd") and batch_size == 1):  # relations need 2 samples: zero gradient
        assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", NAMES)
def test_adapter_classifier_outputs(name):
    kw = {"ft": {"para_steps": 0}}.get(name, {})
    loss = build_loss(name, **kw)
    s, t = cls_out(4, d=6, grad=True), cls_out(4, d=9)
    for k in ("f1", "f2", "f3", "f4"):  # teacher twice as wide
        t["feats"][k] = torch.randn(4, 2 * s["feats"][k].shape[1], *s["feats"][k].shape[2:])
    value = loss(s, t, {"labels": torch.zeros(4, dtype=torch.long)})
    value.backward()
    assert torch.isfinite(value)


@pytest.mark.parametrize("name", ["logits", "st", "at", "fitnet", "nst", "pkt", "fsp", "ft", "rkd"])
def test_adapter_zero_when_student_is_teacher(name):
    kw = dict(DENSE_KW.get(name, {}))
    loss = build_loss(name, **kw)
    out = dense_out(2, (8, 16, 32))
    if name == "ft":  # equal widths: give the translator the paraphraser's encoder
        loss(out, out, {})  # builds both
        for n in ("p3", "p4", "p5"):
            loss.translators[n].encoder.load_state_dict(loss.paraphrasers[n].encoder.state_dict())
        loss.eval()  # same BN statistics on both sides
    assert loss(out, out, {}).item() == pytest.approx(0.0, abs=1e-6)


def test_adapters_are_registered_parameters():
    s, t = dense_out(2, (8, 16, 32)), dense_out(2, (12, 24, 48))
    for name in ("fitnet", "fsp", "ab"):
        loss = build_loss(name)
        loss(s, t, {})
        convs = list(loss.pairs.convs.values())
        assert len(convs) == 3 and all(c.out_channels == w for c, w in zip(convs, (12, 24, 48)))
        params = {id(p) for p in loss.student_parameters()}
        assert all(id(c.weight) in params for c in convs)
    for name in ("at", "nst"):  # width-agnostic maths: no adapter unless asked
        loss = build_loss(name)
        loss(s, t, {})
        assert not list(loss.parameters())
        loss = build_loss(name, adapt=True)
        loss(s, t, {})
        assert len(list(loss.parameters())) == 3
    # equal widths: no adapter at all
    loss = build_loss("fitnet")
    loss(s, dense_out(2, (8, 16, 32)), {})
    assert not list(loss.parameters())


def test_ft_translator_trains_with_student_paraphraser_on_its_own():
    s, t = dense_out(2, (8, 16, 32)), dense_out(2, (12, 24, 48))
    loss = build_loss("ft", feats=["p4"], para_steps=2)
    before = loss(s, t, {})
    aux = AuxOptimizers([("", loss)])
    (group,) = loss.aux_groups()
    assert (group.name, group.optimizer, group.lr, group.momentum, group.weight_decay, group.nesterov) == \
        ("paraphraser", "sgd", 0.01, 0.9, 1e-4, False)
    assert before.item() == 0.0  # inactive until the paraphraser is pre-trained
    assert set(loss.translators) == {"p4"} and set(loss.paraphrasers) == {"p4"}
    student_ids = {id(p) for p in loss.student_parameters()}
    assert student_ids == {id(p) for p in loss.translators.parameters()}
    assert not student_ids & {id(p) for p in loss.paraphrasers.parameters()}
    w0 = loss.paraphrasers["p4"].encoder[0].weight.detach().clone()
    logs = aux.step(1, s, t, {})
    assert "para_loss" in logs and logs["para_loss"] > 0
    assert not torch.equal(w0, loss.paraphrasers["p4"].encoder[0].weight)
    assert aux.state_dict()["paraphraser"]["state"]
    aux.step(2, s, t, {})
    assert loss.paraphraser_ready and int(loss.para_done) == 2
    assert not any(p.requires_grad for p in loss.paraphrasers.parameters())
    loss.train()
    assert not loss.paraphrasers.training  # stays frozen in eval mode
    assert aux.step(3, s, t, {}) == {}
    value = loss(s, t, {})
    assert value.item() > 0
    value.backward()
    assert loss.translators["p4"].encoder[0].weight.grad is not None
    assert loss.paraphrasers["p4"].encoder[0].weight.grad is None


def test_ft_resume_restores_optimizer_state():
    s, t = dense_out(2, (8, 16, 32)), dense_out(2, (12, 24, 48))
    a = build_loss("ft", feats=["p5"], para_steps=5)
    a(s, t, {})
    a_aux = AuxOptimizers([("", a)])
    a_aux.step(1, s, t, {})
    b = build_loss("ft", feats=["p5"], para_steps=5)
    b(s, t, {})  # dry forward builds the modules
    b_aux = AuxOptimizers([("", b)])
    b.load_state_dict(a.state_dict())
    b_aux.load_state_dict(copy.deepcopy(a_aux.state_dict()))  # as through a file: no shared tensors
    assert int(b.para_done) == 1
    a_aux.step(2, s, t, {})
    b_aux.step(2, s, t, {})
    assert int(b.para_done) == 2
    for pa, pb in zip(a.paraphrasers.parameters(), b.paraphrasers.parameters()):
        assert torch.equal(pa, pb)  # the momentum buffer came along


def test_seg_logits_ignore_void():
    s, t = dense_out(2, (8, 16, 32)), dense_out(2, (8, 16, 32))
    masks = torch.full((2, 16, 16), VOID, dtype=torch.long)
    masks[0, :4, :4] = 1
    keep = masks.reshape(-1) != VOID
    rows_s = s["seg"].permute(0, 2, 3, 1).reshape(-1, 3)[keep]
    rows_t = t["seg"].permute(0, 2, 3, 1).reshape(-1, 3)[keep]
    got = build_loss("logits", output="seg", ignore_void=True)(s, t, {"masks": masks})
    assert got.item() == pytest.approx(((rows_s - rows_t) ** 2).mean().item(), rel=1e-6)
    T = 2.0
    p_t = torch.softmax(rows_t / T, 1)
    kl = (p_t * (p_t.log() - torch.log_softmax(rows_s / T, 1))).sum() / rows_s.shape[0] * T * T
    got = build_loss("st", T=T, output="seg", ignore_void=True)(s, t, {"masks": masks})
    assert got.item() == pytest.approx(kl.item(), rel=1e-5)
    all_void = {"masks": torch.full((2, 16, 16), VOID, dtype=torch.long)}
    s["seg"].requires_grad_(True)
    z = build_loss("st", output="seg", ignore_void=True)(s, t, all_void)
    z.backward()
    assert z.item() == 0.0


def test_config_errors_name_the_key():
    s, t = dense_out(2, (8, 16, 32)), dense_out(2, (8, 16, 32))
    with pytest.raises(ConfigError, match="'at'.*'p9'"):
        build_loss("at", feats=["p9"])(s, t, {})
    with pytest.raises(ConfigError, match="'logits'"):
        build_loss("logits")(s, t, {})  # dense outputs have no 'logits'
    with pytest.raises(ConfigError, match="teacher"):
        build_loss("st", output="seg")(s, None, {})
    with pytest.raises(ConfigError, match="feats"):
        build_loss("fsp", feats=["p3"])
    with pytest.raises(ConfigError, match="bad arguments"):
        build_loss("rkd", margin=1.0)


def test_embedding_losses_pool_p5_on_dense_outputs():
    s, t = dense_out(4, (8, 16, 32)), dense_out(4, (12, 24, 48))
    es, et = s["feats"]["p5"].mean(dim=(2, 3)), t["feats"]["p5"].mean(dim=(2, 3))
    assert build_loss("pkt")(s, t, {}).item() == pytest.approx(PKTCosSim()(es, et).item(), rel=1e-6)
    assert build_loss("rkd", w_dist=1.0, w_angle=2.0)(s, t, {}).item() == pytest.approx(
        RKD(1.0, 2.0)(es, et).item(), rel=1e-6)
    both = build_loss("rkd", feats=["p4", "p5"])(s, t, {})
    e4s, e4t = s["feats"]["p4"].mean(dim=(2, 3)), t["feats"]["p4"].mean(dim=(2, 3))
    assert both.item() == pytest.approx((RKD(25, 50)(e4s, e4t) + RKD(25, 50)(es, et)).item() / 2, rel=1e-6)
    with pytest.raises(ConfigError, match="feats"):
        build_loss("pkt", feats="p5")
