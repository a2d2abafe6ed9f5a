"""SimCLR's NT-Xent and MoCo's InfoNCE (v2 with a queue, v3 symmetric) against the papers' equations.

Each ``paper_*`` function writes the published equation out sample by sample, independently of the
implementation, and the loss must match it on fixed tensors (values and gradients).
"""
from __future__ import annotations

import math

import pytest
import torch

from webcurate.train.losses import NTXentLoss

TOL = 1e-5


def fixed(shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def cos(u, v):
    return torch.dot(u, v) / (u.norm() * v.norm())


# --- SimCLR (Chen et al. 2020, eq. 1 and Algorithm 1) ----------------------------------------------
def paper_nt_xent(z0, z1, temperature):
    """Algorithm 1: z_{2k-1}, z_{2k} are the two views of image k; L = 1/2N sum_k l(2k-1,2k) + l(2k,2k-1)."""
    n = z0.shape[0]
    z = [v for k in range(n) for v in (z0[k], z1[k])]  # interleaved as in the paper

    def l(i, j):
        num = torch.exp(cos(z[i], z[j]) / temperature)
        den = sum(torch.exp(cos(z[i], z[k]) / temperature) for k in range(2 * n) if k != i)
        return -torch.log(num / den)

    return sum(l(2 * k, 2 * k + 1) + l(2 * k + 1, 2 * k) for k in range(n)) / (2 * n)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_nt_xent_equals_the_papers_equation(temperature):
    z0, z1 = fixed((6, 16), 1), fixed((6, 16), 2, scale=3.0)  # norms differ: the loss must normalise
    got = NTXentLoss(temperature)(z0, z1)
    want = paper_nt_xent(z0, z1, temperature)
    assert got.dtype == torch.float32
    assert abs(got.item() - want.item()) < TOL * max(1.0, want.item())


def test_nt_xent_gradients_equal_the_papers_equation():
    a0, a1 = fixed((5, 8), 3).requires_grad_(), fixed((5, 8), 4).requires_grad_()
    b0, b1 = a0.detach().clone().requires_grad_(), a1.detach().clone().requires_grad_()
    NTXentLoss(0.2)(a0, a1).backward()
    paper_nt_xent(b0, b1, 0.2).backward()
    assert torch.allclose(a0.grad, b0.grad, atol=TOL) and torch.allclose(a1.grad, b1.grad, atol=TOL)


def test_nt_xent_is_log_of_2n_minus_1_for_identical_inputs_and_small_for_separated_pairs():
    # All 2N projections equal: every term is log(2N - 1).
    z = torch.ones(4, 8)
    assert math.isclose(NTXentLoss(0.5)(z, z).item(), math.log(7), rel_tol=1e-6)
    # Orthogonal images, identical views: positives dominate at low temperature.
    e = torch.eye(4, 8)
    assert NTXentLoss(0.1)(e, e).item() < 1e-3


def test_nt_xent_refuses_a_global_batch_of_one_image():
    with pytest.raises(ValueError, match="at least 2 samples.*batch_size"):
        NTXentLoss()(torch.randn(1, 8), torch.randn(1, 8))
