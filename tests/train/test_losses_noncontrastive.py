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
