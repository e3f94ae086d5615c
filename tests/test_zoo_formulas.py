"""Tensor-level cores of every zoo loss: exact values on small cases.

Each expected value is written out from the paper's / the reference's formula
with plain Python or torch (loops where that is clearer), never by calling the
core under test: logits, st, at, fitnet, nst, pkt, fsp, ft, rkd, ab first,
then sp, cc, irg, vid, ofd, afd, crd, dml, bss, sobolev, lwm. The losses'
adapters (model output dicts, widths, gradients, hooks) are in
test_zoo_adapters.py.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from mtkd.errors import ConfigError
from mtkd.losses.zoo.ab import AB
from mtkd.losses.zoo.afd import AFD
from mtkd.losses.zoo.at import AT
from mtkd.losses.zoo.bss import BSS, BSSAttacker, select_attack
from mtkd.losses.zoo.cc import CC
from mtkd.losses.zoo.crd import CRD, ContrastLoss
from mtkd.losses.zoo.dml import DML
from mtkd.losses.zoo.fitnet import FitNet, Hint
from mtkd.losses.zoo.fsp import FSP
from mtkd.losses.zoo.ft import FT, Paraphraser, Translator
from mtkd.losses.zoo.irg import IRG
from mtkd.losses.zoo.logits import Logits
from mtkd.losses.zoo.lwm import LwM
from mtkd.losses.zoo.nst import NST
from mtkd.losses.zoo.ofd import OFD, ofd_distance
from mtkd.losses.zoo.pkt import PKT, PKTCosSim
from mtkd.losses.zoo.rkd import RKD
from mtkd.losses.zoo.sobolev import Sobolev
from mtkd.losses.zoo.sp import SP
from mtkd.losses.zoo.st import ST, SoftTarget
from mtkd.losses.zoo.vid import VID


# ==== logits, st, at, fitnet, nst, pkt, fsp, ft, rkd, ab ====================================
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


# ==== sp, cc, irg, vid, ofd, afd, crd, dml, bss, sobolev, lwm ==============================
D = torch.float64


def rand(*shape):
    return torch.randn(*shape, dtype=D)


# ---- SP -------------------------------------------------------------------------------------
def sp_expected(a, b):
    def gram(x):
        x = x.reshape(len(x), -1)
        g = torch.stack([torch.stack([(x[i] * x[j]).sum() for j in range(len(x))]) for i in range(len(x))])
        return g / g.pow(2).sum(1, keepdim=True).sqrt()
    return ((gram(a) - gram(b)) ** 2).sum() / len(a) ** 2


def test_sp_exact_zero_and_batch1():
    a, b = rand(3, 2, 4, 4), rand(3, 5, 2, 2)  # widths and sizes may differ
    assert torch.allclose(SP()(a, b), sp_expected(a, b))
    assert SP()(a, a.clone()).item() == 0.0
    assert SP()(a * 3.0, a).item() < 1e-20  # row normalisation: scale-free
    assert torch.isfinite(SP()(a[:1], b[:1]))


# ---- CC -------------------------------------------------------------------------------------
def test_cc_exact_and_rbf_limit():
    gamma, p_order = 0.4, 2
    fs, ft = rand(4, 6), rand(4, 3)

    def corr(f, order):
        f = f / f.norm(dim=1, keepdim=True)
        out = torch.empty(len(f), len(f), dtype=D)
        for i in range(len(f)):
            for j in range(len(f)):
                s = float(f[i] @ f[j])
                out[i, j] = sum(math.exp(-2 * gamma) * (2 * gamma * s) ** p / math.factorial(p)
                                for p in range(order + 1))
        return out

    expected = ((corr(fs, p_order) - corr(ft, p_order)) ** 2).mean()
    assert torch.allclose(CC(gamma, p_order)(fs, ft), expected)
    assert CC(gamma, p_order)(fs, fs.clone()).item() == 0.0
    # A long expansion is the Gaussian RBF exp(-gamma |a - b|^2) of the unit vectors.
    cc = CC(gamma, 25)
    u = F.normalize(fs, dim=1)
    assert torch.allclose(cc.get_correlation_matrix(fs), torch.exp(-gamma * torch.cdist(u, u) ** 2), atol=1e-10)
    assert torch.isfinite(CC(gamma, p_order)(fs[:1], ft[:1]))


# ---- IRG ------------------------------------------------------------------------------------
def _pair_dist(x):
    x = x.reshape(len(x), -1)
    d = torch.zeros(len(x), len(x), dtype=D)
    for i in range(len(x)):
        for j in range(len(x)):
            if i != j:
                d[i, j] = ((x[i] - x[j]) ** 2).sum()
    return d / d.max()


def _tran(fm1, fm2):
    if fm1.shape[2] > fm2.shape[2]:
        fm1 = F.avg_pool2d(fm1, fm1.shape[2] // fm2.shape[2])
    if fm1.shape[1] < fm2.shape[1]:
        fm2 = (fm2[:, 0::2] + fm2[:, 1::2]) / 2.0
    d = ((fm1 - fm2) ** 2).flatten(1).sum(1)
    return d / d.max()


def test_irg_exact_zero_and_batch1():
    w = (0.1, 5.0, 5.0)
    s = (rand(3, 2, 4, 4), rand(3, 4, 2, 2), rand(3, 6), rand(3, 5))
    t = (rand(3, 3, 4, 4), rand(3, 6, 2, 2), rand(3, 8), rand(3, 5))
    mse = lambda a, b: ((a - b) ** 2).mean()  # noqa: E731
    expected = (w[0] * mse(s[3], t[3])
                + w[1] * (mse(_pair_dist(s[2]), _pair_dist(t[2])) + mse(_pair_dist(s[0]), _pair_dist(t[0]))
                          + mse(_pair_dist(s[1]), _pair_dist(t[1]))) / 3
                + w[2] * mse(_tran(s[0], s[1]), _tran(t[0], t[1])))
    irg = IRG(*w)
    assert torch.allclose(irg(s, t), expected)
    assert irg(s, tuple(x.clone() for x in s)).item() == 0.0
    one = irg(tuple(x[:1] for x in s), tuple(x[:1] for x in t))  # reference: 0/0 = NaN here
    assert torch.allclose(one, w[0] * mse(s[3][:1], t[3][:1]))


def test_irg_width_ratio_must_be_integer():
    s = (rand(2, 2, 2, 2), rand(2, 3, 2, 2), rand(2, 4), rand(2, 3))
    with pytest.raises(ConfigError, match="irg"):
        IRG(1, 1, 1)(s, s)


# ---- VID ------------------------------------------------------------------------------------
def test_vid_exact_and_initial_variance():
    torch.manual_seed(1)
    vid = VID(3, 4, 2, init_var=5.0).double()
    var = F.softplus(vid.alpha) + 1e-6
    assert torch.allclose(var, torch.full_like(var, 5.0))
    fs, ft = rand(2, 3, 3, 3), rand(2, 2, 3, 3)
    w1, w2, w3 = (m.weight for m in vid.regressor if isinstance(m, torch.nn.Conv2d))
    mu = F.conv2d(F.relu(F.conv2d(F.relu(F.conv2d(fs, w1)), w2)), w3)
    v = (torch.log(1 + torch.exp(vid.alpha)) + 1e-6).view(1, -1, 1, 1)
    expected = (0.5 * (torch.log(v) + (mu - ft) ** 2 / v)).mean()
    assert torch.allclose(vid(fs, ft), expected)
    assert torch.isfinite(vid(fs[:1], ft[:1]))


# ---- OFD ------------------------------------------------------------------------------------
def test_ofd_exact():
    torch.manual_seed(2)
    ofd = OFD(3, 2).double()
    fs, ft = rand(2, 3, 3, 3), rand(2, 2, 3, 3)
    conv = F.conv2d(fs, ofd.connector[0].weight)
    mean, var = conv.mean(dim=(0, 2, 3), keepdim=True), conv.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    s = (conv - mean) / torch.sqrt(var + 1e-5)  # BN in training mode, weight 1, bias 0
    target = ft.clone()
    for c in range(2):
        neg = ft[:, c][ft[:, c] < 0]
        margin = neg.sum() / (len(neg) + 1e-6)
        target[:, c] = torch.maximum(ft[:, c], margin)
    keep = ~((s <= target) & (target <= 0))
    expected = ((s - target) ** 2 * keep).mean()
    assert torch.allclose(ofd(fs, ft), expected)


def test_ofd_margin_conventions():
    ft = torch.tensor([[[[-2.0, -1.0], [1.0, 3.0]]]], dtype=D)  # margin = -1.5
    target = torch.tensor([[[[-1.5, -1.0], [1.0, 3.0]]]], dtype=D)
    assert ofd_distance(target.clone(), ft).item() == 0.0  # student == margin-clipped teacher
    below = target - torch.tensor([[[[4.0, 0.5], [0.0, 0.0]]]], dtype=D)  # below a negative target
    assert ofd_distance(below, ft).item() == 0.0
    above = target + torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]], dtype=D)
    assert torch.allclose(ofd_distance(above, ft), torch.tensor(1.0 / 4, dtype=D))


# ---- AFD ------------------------------------------------------------------------------------
def test_afd_exact_and_batch1():
    torch.manual_seed(3)
    afd = AFD(4, 0.5).double()
    fs, ft = rand(3, 4, 3, 3), rand(3, 4, 3, 3)
    c1, c2 = afd.attention[0], afd.attention[2]
    pooled = ft.mean(dim=(2, 3))
    rho = torch.sigmoid(F.linear(F.relu(F.linear(pooled, c1.weight[:, :, 0, 0], c1.bias)),
                                 c2.weight[:, :, 0, 0], c2.bias))
    rho = rho / rho.sum(1, keepdim=True)
    ns = fs / (fs.pow(2).sum(dim=(2, 3), keepdim=True).sqrt() + 1e-6)
    nt = ft / (ft.pow(2).sum(dim=(2, 3), keepdim=True).sqrt() + 1e-6)
    per = torch.stack([sum(rho[b, c] * ((ns[b, c] - nt[b, c]) ** 2).mean() for c in range(4)) for b in range(3)])
    assert torch.allclose(afd(fs, ft), per.mean())
    assert afd(ft, ft.clone()).item() == 0.0
    assert torch.allclose(afd(fs[:1], ft[:1]), per[:1].mean())  # the reference's squeeze fails here


# ---- CRD ------------------------------------------------------------------------------------
def test_contrast_loss_exact():
    x = torch.rand(2, 4, dtype=D) + 0.1
    n, m, eps = 3, 10.0, 1e-7
    total = 0.0
    for b in range(2):
        total += math.log(x[b, 0] / (x[b, 0] + n / m + eps))
        total += sum(math.log((n / m) / (x[b, j] + n / m + eps)) for j in range(1, 4))
    assert torch.allclose(ContrastLoss(10)(x), torch.tensor(-total / 2, dtype=D))


@pytest.mark.parametrize("bs", [3, 1])
def test_crd_exact_and_memory_update(bs):
    torch.manual_seed(4)
    T, mom, n_data, nce_n = 0.1, 0.5, 10, 4
    crd = CRD(3, 5, 6, nce_n, T, mom, n_data).double()
    fs, ft = rand(bs, 3), rand(bs, 5)
    idx = torch.tensor([7, 2, 5][:bs])
    sample_idx = torch.cat([idx[:, None], torch.randint(0, n_data, (bs, nce_n))], 1)
    mem_s, mem_t = crd.contrast.memory_s.clone(), crd.contrast.memory_t.clone()
    es = F.normalize(F.linear(fs, crd.embed_s.linear.weight, crd.embed_s.linear.bias), dim=1)
    et = F.normalize(F.linear(ft, crd.embed_t.linear.weight, crd.embed_t.linear.bias), dim=1)

    def side(memory, anchor):
        out = torch.stack([torch.stack([torch.exp(memory[k] @ anchor[b] / T) for k in sample_idx[b]])
                           for b in range(bs)])
        out = out / (out.mean() * n_data)
        noise = nce_n / n_data
        pos = torch.log(out[:, 0] / (out[:, 0] + noise + 1e-7)).sum()
        neg = torch.log(noise / (out[:, 1:] + noise + 1e-7)).sum()
        return -(pos + neg) / bs

    expected = side(mem_t, es) + side(mem_s, et)
    assert torch.allclose(crd(fs, ft, idx, sample_idx), expected)
    others = [i for i in range(n_data) if i not in idx.tolist()]
    assert torch.equal(crd.contrast.memory_s[others], mem_s[others])
    assert torch.allclose(crd.contrast.memory_s[idx], F.normalize(mom * mem_s[idx] + (1 - mom) * es.detach(), dim=1))
    assert torch.allclose(crd.contrast.memory_t[idx], F.normalize(mom * mem_t[idx] + (1 - mom) * et.detach(), dim=1))
    z = float(crd.contrast.Z_s)
    crd(fs, ft, idx, sample_idx)
    assert float(crd.contrast.Z_s) == z  # the normaliser is fixed by the first batch


def test_crd_memory_frozen_in_eval():
    crd = CRD(3, 3, 4, 2, 0.1, 0.5, 6).eval()
    before = crd.contrast.memory_t.clone()
    crd(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1]), torch.tensor([[0, 3, 4], [1, 2, 5]]))
    assert torch.equal(before, crd.contrast.memory_t)


# ---- DML / BSS ------------------------------------------------------------------------------
def kl_batchmean(p_logits, q_logits, T=1.0):
    p = torch.softmax(q_logits / T, 1)
    return (p * (torch.log(p) - torch.log_softmax(p_logits / T, 1))).sum() / len(p)


def test_dml_and_bss_exact():
    a, b = rand(4, 5), rand(4, 5)
    assert torch.allclose(DML()(a, b), kl_batchmean(a, b))
    assert DML()(a, a.clone()).abs().item() < 1e-12
    assert torch.allclose(BSS(3.0)(a, b), kl_batchmean(a, b, 3.0))  # no T^2 factor


def test_bss_attacker_moves_toward_boundary():
    torch.manual_seed(5)
    lin = torch.nn.Linear(12, 4).double()
    model = lambda x: lin(x.flatten(1))  # noqa: E731
    img = rand(6, 3, 2, 2) * 0.5
    target = model(img).argmax(1)
    attack_class = (target + 1) % 4
    adv = BSSAttacker(step_alpha=0.3, num_steps=10).attack(model, img, target, attack_class)
    assert adv.shape == img.shape and not adv.requires_grad
    assert adv.abs().max() <= 2.5
    assert lin.weight.grad is None  # the attack differentiates w.r.t. the image only

    def margin(x):
        p = torch.softmax(model(x), 1)
        return p.gather(1, target[:, None]) - p.gather(1, attack_class[:, None])

    assert (margin(adv) < margin(img) - 1e-6).all()
    # One step, written out: x + a * (p_t - p_a + eps) * g / |g| with g = d(p_a - p_t)/dx.
    x = img.clone().requires_grad_(True)
    g = torch.autograd.grad(-margin(x).sum(), x)[0]
    step = 0.3 * (margin(img).detach().view(-1, 1, 1, 1) + 1e-4) * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    one = BSSAttacker(step_alpha=0.3, num_steps=1).attack(model, img, target, attack_class)
    assert torch.allclose(one, (img + step).clamp(-2.5, 2.5))


def test_bss_select_attack():
    out_t = torch.tensor([[5.0, 1, 0], [0, 5, 1], [0, 0, 5], [4, 0, 0]])
    out_s = torch.tensor([[5.0, 1, 0], [5, 0, 1], [0, 0, 5], [4, 3, 0]])
    target = torch.tensor([0, 1, 2, 0])
    idx, cls = select_attack(out_s, out_t, target, attack_size=8)
    assert idx.tolist() == [0, 2, 3]  # sample 1 is misclassified by the student
    assert all(c != t for c, t in zip(cls.tolist(), target[idx].tolist()))
    idx, _ = select_attack(out_s, out_t, target, attack_size=1)
    # largest sum over non-target classes of (p_t - p_s)^2: sample 3 (student puts mass on class 1)
    assert idx.tolist() == [3]


# ---- Sobolev / LwM ------------------------------------------------------------------------
def test_sobolev_exact_and_uses_input_gradient():
    torch.manual_seed(6)
    ws, wt = rand(5, 12), rand(5, 12)
    img = rand(3, 3, 2, 2).requires_grad_(True)
    target = torch.tensor([0, 3, 1])
    out_s, out_t = img.flatten(1) @ ws.t(), img.flatten(1) @ wt.t()
    gs, gt = F.normalize(ws[target], dim=1), F.normalize(wt[target], dim=1)  # d out[b, y_b] / d img = W[y_b]
    assert torch.allclose(Sobolev()(out_s, out_t, img, target), ((gs - gt) ** 2).mean())
    # Same teacher logits, different input gradient -> different loss.
    bent = out_t + ((img - img.detach()).flatten(1) @ rand(12, 5))
    assert torch.equal(bent, out_t)
    assert abs(Sobolev()(out_s, bent, img, target).item() - ((gs - gt) ** 2).mean().item()) > 1e-6


def test_lwm_exact_and_uses_feature_gradient():
    torch.manual_seed(7)
    fm_s, fm_t = rand(2, 3, 2, 2).requires_grad_(True), rand(2, 3, 2, 2).requires_grad_(True)
    vs, vt = rand(4, 3, 2, 2), rand(4, 3, 2, 2)
    target = torch.tensor([1, 2])
    out_s, out_t = fm_s.flatten(1) @ vs.flatten(1).t(), fm_t.flatten(1) @ vt.flatten(1).t()

    def cam(v):
        g = v[target]  # d out[b, y_b] / d fm
        c = F.relu((g.mean(dim=(2, 3), keepdim=True) * g).sum(1)).flatten(1)
        return c / c.norm(dim=1, keepdim=True).clamp_min(1e-12)

    expected = (cam(vs) - cam(vt)).abs().mean()
    assert torch.allclose(LwM()(out_s, fm_s, out_t, fm_t, target), expected)
    bent = out_t + (fm_t - fm_t.detach()).flatten(1) @ rand(12, 4)
    assert abs(LwM()(out_s, fm_s, bent, fm_t, target).item() - expected.item()) > 1e-6
