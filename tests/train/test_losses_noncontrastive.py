"""BYOL, SimSiam, VICReg and Barlow Twins against the papers' equations on fixed tensors.

Each ``paper_*`` function writes the published equation out, independently of the implementation;
values and gradients must match.
"""
from __future__ import annotations

import pytest
import torch

from webcurate.train import losses as L

TOL = 1e-5


def fixed(shape, seed, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift


def grads_match(loss_fn, paper_fn, tensors, atol=TOL):
    """Loss values and the gradients of every input that requires grad agree."""
    a = [t.clone().requires_grad_() for t in tensors]
    b = [t.clone().requires_grad_() for t in tensors]
    got, want = loss_fn(*a), paper_fn(*b)
    assert abs(got.item() - want.item()) < atol * max(1.0, abs(want.item())), (got.item(), want.item())
    got.backward()
    want.backward()
    for x, y in zip(a, b):
        assert (x.grad is None) == (y.grad is None)
        if x.grad is not None:
            assert torch.allclose(x.grad.double(), y.grad, atol=atol), (x.grad - y.grad).abs().max()


# --- BYOL (Grill et al. 2020, eq. 2 and the symmetrised loss) -------------------------------------
def paper_byol(p1, p2, z1, z2):
    """L = mean ||q/|q| - z'/|z'| ||^2 with q = prediction of one view, z' = target of the other; L + L~."""
    def l(q, z):
        z = z.detach()
        return sum(((qb / qb.norm() - zb / zb.norm()) ** 2).sum() for qb, zb in zip(q, z)) / len(q)

    return l(p1, z2) + l(p2, z1)


def test_byol_equals_the_papers_normalised_mse_and_stops_the_target_gradient():
    tensors = [fixed((6, 12), s, scale=1 + s) for s in range(4)]
    grads_match(L.BYOLLoss(), paper_byol, tensors)
    same = fixed((4, 8), 9)
    assert L.BYOLLoss()(same, same, 3 * same, same).item() < 1e-6  # scale-free: 0 for aligned vectors


# --- SimSiam (Chen & He 2021, eq. 1-3) -------------------------------------------------------------
def paper_simsiam(p1, p2, z1, z2):
    """D(p, z) = -p/|p| . z/|z| with z stop-gradient, batch mean; L = D(p1, z2)/2 + D(p2, z1)/2."""
    def d(p, z):
        z = z.detach()
        return -sum(torch.dot(pb / pb.norm(), zb / zb.norm()) for pb, zb in zip(p, z)) / len(p)

    return d(p1, z2) / 2 + d(p2, z1) / 2


def test_simsiam_equals_the_papers_negative_cosine_with_stop_gradient():
    grads_match(L.SimSiamLoss(), paper_simsiam, [fixed((5, 10), 10 + s) for s in range(4)])
    x = fixed((3, 4), 20)
    assert abs(L.SimSiamLoss()(x, x, x, x).item() + 1.0) < 1e-6


# --- VICReg (Bardes et al. 2022, eq. 1-6 / Algorithm 1) --------------------------------------------
def paper_vicreg(za, zb, lam=25.0, mu=25.0, nu=1.0, gamma=1.0, eps=1e-4):
    n, d = za.shape

    def var(col):  # unbiased variance of one dimension
        m = sum(col) / n
        return sum((x - m) ** 2 for x in col) / (n - 1)

    def v(z):  # eq. 1: hinge on the regularised std of every dimension
        return sum(torch.clamp(gamma - torch.sqrt(var(z[:, j]) + eps), min=0) for j in range(d)) / d

    def c(z):  # eq. 3-4: squared off-diagonal covariances over d
        mean = z.mean(0)
        cov = sum(torch.outer(zi - mean, zi - mean) for zi in z) / (n - 1)
        return sum(cov[i, j] ** 2 for i in range(d) for j in range(d) if i != j) / d

    s = sum(((za[i] - zb[i]) ** 2).sum() for i in range(n)) / (n * d)  # Algorithm 1's mse_loss
    return lam * s + mu * (v(za) + v(zb)) + nu * (c(za) + c(zb))


def test_vicreg_equals_the_papers_loss_with_weights_25_25_1():
    za, zb = fixed((8, 6), 30, scale=0.5), fixed((8, 6), 31, scale=1.5)  # std < 1 and > 1: hinge on and off
    grads_match(L.VICRegLoss(), paper_vicreg, [za, zb])
    terms = L.VICRegLoss().terms(za.float(), zb.float())
    assert terms["variance"] > 0 and terms["covariance"] > 0 and terms["invariance"] > 0


def test_vicreg_variance_hinge_is_zero_above_the_target_std():
    z = fixed((64, 4), 32, scale=3.0)
    assert L.VICRegLoss().terms(z, z)["variance"].item() == 0.0


# --- Barlow Twins (Zbontar et al. 2021, eq. 1-2) ----------------------------------------------------
def paper_barlow_twins(za, zb, lam=5e-3):
    """C_ij = sum_b za_bi zb_bj / (sqrt(sum_b za_bi^2) sqrt(sum_b zb_bj^2)) over batch-centred z;
    L = sum_i (1 - C_ii)^2 + lam sum_{i != j} C_ij^2."""
    za, zb = za - za.mean(0), zb - zb.mean(0)
    d = za.shape[1]
    C = torch.stack([torch.stack([
        (za[:, i] * zb[:, j]).sum() / (torch.sqrt((za[:, i] ** 2).sum()) * torch.sqrt((zb[:, j] ** 2).sum()))
        for j in range(d)]) for i in range(d)])
    return sum((1 - C[i, i]) ** 2 for i in range(d)) + lam * sum(
        C[i, j] ** 2 for i in range(d) for j in range(d) if i != j)


def test_barlow_twins_equals_the_papers_cross_correlation_loss():
    # std ~4: batch-norm's eps (1e-5) is negligible against the variance, as in eq. 2
    za, zb = fixed((10, 6), 40, scale=4.0, shift=2.0), fixed((10, 6), 41, scale=4.0)
    zb = zb + 3.0 * za  # correlated views: diagonal near 1
    grads_match(L.BarlowTwinsLoss(), paper_barlow_twins, [za, zb], atol=1e-4)
    c = L.BarlowTwinsLoss().cross_correlation(za.float(), zb.float())
    assert c.shape == (6, 6) and (c.abs() <= 1 + 1e-4).all() and torch.diagonal(c).min() > 0.8


@pytest.mark.parametrize("loss", [L.VICRegLoss(), L.BarlowTwinsLoss()], ids=["vicreg", "barlow_twins"])
def test_batch_statistics_losses_refuse_a_global_batch_of_one(loss):
    with pytest.raises(ValueError, match="at least 2 samples.*batch_size"):
        loss(torch.randn(1, 8), torch.randn(1, 8))
