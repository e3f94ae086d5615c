"""Classic KD zoo, part 1: tensor cores against hand-computed values, and the adapters.

Expected values are written here from each paper's / the reference's formula
with plain Python or torch ops, never by calling the code under test.
"""
import math

import pytest
import torch

from mtkd.errors import ConfigError
from mtkd.losses import build_loss
from mtkd.losses.zoo.ab import AB
from mtkd.losses.zoo.at import AT
from mtkd.losses.zoo.fitnet import FitNet, Hint
from mtkd.losses.zoo.fsp import FSP
from mtkd.losses.zoo.ft import FT, Paraphraser, Translator
from mtkd.losses.zoo.logits import Logits
from mtkd.losses.zoo.nst import NST
from mtkd.losses.zoo.pkt import PKT, PKTCosSim
from mtkd.losses.zoo.rkd import RKD
from mtkd.losses.zoo.st import ST, SoftTarget
from mtkd.structures import VOID

NAMES = ["logits", "st", "at", "fitnet", "nst", "pkt", "fsp", "ft", "rkd", "ab"]


# --------------------------------------------------------------------------- cores
def test_aliases_are_the_reference_classes():
    assert ST is SoftTarget and FitNet is Hint and PKT is PKTCosSim


def test_logits_value_and_zero():
    s = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    t = torch.tensor([[0.0, 2.0], [2.0, -1.0]])
    assert Logits()(s, t).item() == pytest.approx((1 + 0 + 4 + 0) / 4)
    assert Logits()(t, t).item() == 0.0


def test_st_value_hand_checked():
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]])  # softmax -> (0.75, 0.25)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert SoftTarget(1.0)(s, t).item() == pytest.approx(expected, rel=1e-6)
    # T = 2: logits halved, times T^2 = 4; batchmean divides by rows only
    s2 = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    t2 = torch.tensor([[2 * math.log(3.0), 0.0], [0.0, 0.0]])
    expected2 = (expected + 0.0) / 2 * 4
    assert SoftTarget(2.0)(s2, t2).item() == pytest.approx(expected2, rel=1e-6)
    assert SoftTarget(4.0)(t2, t2).item() == pytest.approx(0.0, abs=1e-5)


def test_at_value_per_map_normalisation():
    # one sample, 2 channels, 1x2 map; Q = sum_c |A|^2 = (1+4, 0+9) = (5, 9)
    fs = torch.tensor([[[[1.0, 0.0]], [[2.0, 3.0]]]])
    ft = torch.tensor([[[[1.0, 1.0]]]])  # one channel: Q = (1, 1); widths may differ
    qs = [5 / math.hypot(5, 9), 9 / math.hypot(5, 9)]
    qt = [1 / math.sqrt(2), 1 / math.sqrt(2)]
    expected = ((qs[0] - qt[0]) ** 2 + (qs[1] - qt[1]) ** 2) / 2
    assert AT(2)(fs, ft).item() == pytest.approx(expected, rel=1e-4)  # eps 1e-6 in the norm
    assert AT(2)(fs, fs).item() == 0.0


def test_fitnet_value():
    fs = torch.arange(8.0).reshape(1, 2, 2, 2)
    ft = torch.zeros(1, 2, 2, 2)
    assert Hint()(fs, ft).item() == pytest.approx(sum(i * i for i in range(8)) / 8)
    assert Hint()(fs, fs).item() == 0.0


def test_nst_value_closed_form():
    # one channel each: k(s,s) = k(t,t) = 1 after normalisation, k(s,t) = cos^2
    fs = torch.tensor([[[[1.0, 0.0]]]])
    ft = torch.tensor([[[[1.0, 1.0]]]])
    assert NST()(fs, ft).item() == pytest.approx(2 - 2 * 0.5, rel=1e-6)
    # two student channels (e1, e2), one teacher channel (e1): means over the kernel matrices
    fs2 = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    ft2 = torch.tensor([[[[3.0, 0.0]]]])
    k_ss = (1 + 0 + 0 + 1) / 4
    k_tt = 1.0
    k_st = (1 + 0) / 2
    assert NST()(fs2, ft2).item() == pytest.approx(k_tt + k_ss - 2 * k_st, abs=1e-6)
    x = torch.randn(2, 3, 4, 4)
    assert NST()(x, x).item() == pytest.approx(0.0, abs=1e-6)


def _pkt_expected(fs, ft, eps=1e-6):
    def probs(f):
        rows = []
        for a in f:
            na = math.sqrt(sum(v * v for v in a)) + eps
            rows.append([v / na for v in a])
        sims = [[(sum(x * y for x, y in zip(r1, r2)) + 1) / 2 for r2 in rows] for r1 in rows]
        return [[v / sum(r) for v in r] for r in sims]

    ps, pt = probs(fs), probs(ft)
    n = len(fs)
    return sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps))
               for i in range(n) for j in range(n)) / (n * n)


def test_pkt_value_and_zero():
    fs = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    ft = [[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 2.0]]  # widths differ
    got = PKTCosSim()(torch.tensor(fs), torch.tensor(ft)).item()
    assert got == pytest.approx(_pkt_expected(fs, ft), rel=1e-5)
    x = torch.randn(4, 5)
    assert PKTCosSim()(x, x).item() == pytest.approx(0.0, abs=1e-7)


def test_fsp_value_and_pooling():
    f1 = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # (1,1,2,2)
    f2 = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    g_s = (1 * 1 + 4 * 1) / 4
    g_t = 0.0
    zero = torch.zeros(1, 1, 2, 2)
    assert FSP()(f1, f2, zero, f2).item() == pytest.approx((g_s - g_t) ** 2)
    # F1 taller than F2: F1 average-pooled to F2's 1x1 -> mean 2.5; G = 2.5 * 7 / 1
    f2_small = torch.tensor([[[[7.0]]]])
    assert FSP()(f1, f2_small, zero, f2_small).item() == pytest.approx((2.5 * 7) ** 2)
    # fixed defect: F2 larger than F1 pools F2 instead of crashing
    assert FSP()(f2_small, f1, f2_small, zero).item() == pytest.approx((7 * 2.5) ** 2)
    assert FSP()(f1, f2, f1, f2).item() == 0.0


def test_ft_value():
    fs = torch.tensor([[3.0, 4.0]])  # normalised (0.6, 0.8)
    ft = torch.tensor([[0.0, 2.0]])  # normalised (0, 1)
    assert FT()(fs, ft).item() == pytest.approx((0.6 + 0.2) / 2)
    x = torch.randn(2, 3, 4, 4)
    assert FT()(x, 2 * x).item() == pytest.approx(0.0, abs=1e-6)


def _smooth_l1(a, b):
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def _rkd_expected(fs, ft, w_dist, w_angle):
    n = len(fs)

    def dist(f):
        d = [[math.dist(f[i], f[j]) if i != j else 0.0 for j in range(n)] for i in range(n)]
        pos = [v for r in d for v in r if v > 0]
        mu = sum(pos) / len(pos)
        return [v / mu for r in d for v in r]

    def angles(f):
        out = []
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    a = [x - y for x, y in zip(f[j], f[i])]
                    b = [x - y for x, y in zip(f[k], f[i])]
                    na, nb = math.hypot(*a), math.hypot(*b)
                    out.append(0.0 if na == 0 or nb == 0 else sum(x * y for x, y in zip(a, b)) / (na * nb))
        return out

    ds, dt = dist(fs), dist(ft)
    as_, at_ = angles(fs), angles(ft)
    l_d = sum(_smooth_l1(a, b) for a, b in zip(ds, dt)) / len(ds)
    l_a = sum(_smooth_l1(a, b) for a, b in zip(as_, at_)) / len(as_)
    return w_dist * l_d + w_angle * l_a


def test_rkd_value_and_zero():
    fs = [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]
    ft = [[0.0, 0.0], [3.0, 0.0], [3.0, 3.0]]
    got = RKD(25.0, 50.0)(torch.tensor(fs), torch.tensor(ft)).item()
    assert got == pytest.approx(_rkd_expected(fs, ft, 25.0, 50.0), rel=1e-4)
    x = torch.randn(5, 4)
    assert RKD(25.0, 50.0)(x, x).item() == pytest.approx(0.0, abs=1e-6)
    # distance normalisation makes RKD scale-invariant
    assert RKD(1.0, 1.0)(x, 3 * x).item() == pytest.approx(0.0, abs=1e-5)


def test_rkd_batch_size_one_is_finite():
    one = torch.randn(1, 4, requires_grad=True)
    loss = RKD(25.0, 50.0)(one, torch.randn(1, 4))
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()


def test_ab_value():
    m = 2.0
    s = torch.tensor([-3.0, -1.0, 1.0, 3.0, -1.0, 1.0, 2.0])
    t = torch.tensor([-1.0, -1.0, -1.0, -1.0, 1.0, 1.0, 1.0])
    # t<=0: penalise s > -m by (s+m)^2; t>0: penalise s <= m by (s-m)^2
    per = [0.0, (-1 + m) ** 2, (1 + m) ** 2, (3 + m) ** 2, (-1 - m) ** 2, (1 - m) ** 2, (2 - m) ** 2]
    assert AB(m)(s, t).item() == pytest.approx(sum(per) / len(per))
    # zero once the student is past the margin on the teacher's side
    assert AB(m)(torch.tensor([-2.5, 2.5]), torch.tensor([-0.1, 0.3])).item() == 0.0


def test_ft_modules_follow_reference_shapes():
    para = Paraphraser(8, 0.5, use_bn=True)
    z, rec = para(torch.randn(2, 8, 4, 4))
    assert z.shape == (2, 4, 4, 4) and rec.shape == (2, 8, 4, 4)
    trans = Translator(6, 8, 0.5, use_bn=False)
    assert trans(torch.randn(2, 6, 4, 4)).shape == (2, 4, 4, 4)
    convs = [m for m in trans.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.bias is not None for c in convs)  # no BN -> convs keep their bias


# --------------------------------------------------------------------------- adapters
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
    assert before.item() == 0.0  # inactive until the paraphraser is pre-trained
    assert set(loss.translators) == {"p4"} and set(loss.paraphrasers) == {"p4"}
    student_ids = {id(p) for p in loss.student_parameters()}
    assert student_ids == {id(p) for p in loss.translators.parameters()}
    assert not student_ids & {id(p) for p in loss.paraphrasers.parameters()}
    w0 = loss.paraphrasers["p4"].encoder[0].weight.detach().clone()
    logs = loss.aux_step(s, t, {})
    assert "para_loss" in logs and logs["para_loss"] > 0
    assert not torch.equal(w0, loss.paraphrasers["p4"].encoder[0].weight)
    state = loss.extra_state()
    assert "para_optimizer" in state
    loss.aux_step(s, t, {})
    assert loss.paraphraser_ready and int(loss.para_done) == 2
    assert not any(p.requires_grad for p in loss.paraphrasers.parameters())
    loss.train()
    assert not loss.paraphrasers.training  # stays frozen in eval mode
    assert loss.aux_step(s, t, {}) == {}
    value = loss(s, t, {})
    assert value.item() > 0
    value.backward()
    assert loss.translators["p4"].encoder[0].weight.grad is not None
    assert loss.paraphrasers["p4"].encoder[0].weight.grad is None


def test_ft_resume_restores_optimizer_state():
    s, t = dense_out(2, (8, 16, 32)), dense_out(2, (12, 24, 48))
    a = build_loss("ft", feats=["p5"], para_steps=5)
    a(s, t, {})
    a.aux_step(s, t, {})
    b = build_loss("ft", feats=["p5"], para_steps=5)
    b(s, t, {})  # dry forward builds the modules
    b.load_state_dict(a.state_dict())
    b.load_extra_state(a.extra_state())
    assert int(b.para_done) == 1
    b.aux_step(s, t, {})
    mom = b._optimizer().state_dict()["state"]
    assert mom and int(b.para_done) == 2


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
