"""SimCLR's NT-Xent and MoCo's InfoNCE (v2 with a queue, v3 symmetric) against the papers' equations.

Each ``paper_*`` function writes the published equation out sample by sample, independently of the
implementation, and the loss must match it on fixed tensors (values and gradients).
"""
from __future__ import annotations

import math

import pytest
import torch

from webcurate.train.losses import MoCoV2Loss, MoCoV3Loss, NTXentLoss

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


# --- MoCo v2 (He et al. 2020, eq. 1; queue of keys) --------------------------------------------------
def paper_infonce_queue(q, k, queue, temperature):
    """L_q = -log exp(q.k+/T) / (exp(q.k+/T) + sum_i exp(q.k_i/T)) over unit q, k, queue keys; mean over q."""
    total = 0.0
    for qi, ki in zip(q, k):
        qi, ki = qi / qi.norm(), ki / ki.norm()
        pos = torch.exp(torch.dot(qi, ki) / temperature)
        neg = sum(torch.exp(torch.dot(qi, kj / kj.norm()) / temperature) for kj in queue)
        total = total - torch.log(pos / (pos + neg))
    return total / len(q)


def test_moco_v2_equals_the_papers_infonce_over_the_queue_and_then_enqueues_the_keys():
    loss = MoCoV2Loss(dim=8, queue_size=10, temperature=0.2)
    queue0 = loss.queue.clone().double()
    assert torch.allclose(queue0.norm(dim=1), torch.ones(10, dtype=torch.float64), atol=1e-6)
    q, k = fixed((4, 8), 5).requires_grad_(), fixed((4, 8), 6, scale=2.0)
    got = loss(q, k)
    want = paper_infonce_queue(q, k, queue0, 0.2)
    assert abs(got.item() - want.item()) < TOL * max(1.0, want.item())
    # gradient reaches the queries only (keys are the momentum encoder's targets)
    q2 = q.detach().clone().requires_grad_()
    got.backward()
    paper_infonce_queue(q2, k, queue0, 0.2).backward()
    assert torch.allclose(q.grad.double(), q2.grad, atol=TOL)
    # the 4 keys (normalised) replaced the 4 oldest entries; the rest is untouched
    assert torch.allclose(loss.queue[:4].double(), k / k.norm(dim=1, keepdim=True), atol=1e-6)
    assert torch.equal(loss.queue[4:], queue0[4:].float())
    assert loss.queue_ptr.item() == 4


def test_moco_v2_queue_is_fifo_with_wraparound_and_the_next_step_uses_the_new_keys():
    loss = MoCoV2Loss(dim=4, queue_size=6)
    keys = [fixed((4, 4), 10 + i) for i in range(3)]
    for kk in keys[:2]:
        loss.dequeue_and_enqueue(kk.float())
    unit = [kk / kk.norm(dim=1, keepdim=True) for kk in keys]
    # 8 keys into 6 rows: rows 0-1 hold keys[1][2:], rows 2-5 keys[1][:2] after keys[0][2:]
    want = torch.cat([unit[1][2:], unit[0][2:], unit[1][:2]])
    assert torch.allclose(loss.queue.double(), want, atol=1e-6) and loss.queue_ptr.item() == 2
    q = fixed((4, 4), 20)
    assert abs(loss(q, keys[2], update_queue=False).item()
               - paper_infonce_queue(q, keys[2], want, 0.2).item()) < TOL
    loss.dequeue_and_enqueue(fixed((9, 4), 30).float())  # more keys than rows: the last 6 stay
    assert torch.allclose(loss.queue.double(), (lambda x: x / x.norm(dim=1, keepdim=True))(fixed((9, 4), 30))[3:],
                          atol=1e-6)


def test_moco_v2_queue_is_the_same_on_every_worker_from_a_fixed_seed():
    assert torch.equal(MoCoV2Loss(8, 16).queue, MoCoV2Loss(8, 16).queue)
    assert "queue" in MoCoV2Loss(8, 16).state_dict()


# --- MoCo v3 (Chen et al. 2021, Algorithm 1) ------------------------------------------------------
def paper_moco_v3(q1, q2, k1, k2, temperature):
    """ctr(q, k) = 2T * mean_n -log softmax(q_n . k_m / T)[m = n]; loss = ctr(q1, k2) + ctr(q2, k1)."""
    def ctr(q, k):
        total = 0.0
        for n in range(len(q)):
            qn = q[n] / q[n].norm()
            logits = torch.stack([torch.dot(qn, km / km.norm()) / temperature for km in k])
            total = total - (logits[n] - torch.logsumexp(logits, 0))
        return 2 * temperature * total / len(q)

    return ctr(q1, k2) + ctr(q2, k1)


def test_moco_v3_equals_the_papers_symmetric_in_batch_loss():
    q1, q2, k1, k2 = (fixed((6, 8), s) for s in (40, 41, 42, 43))
    q1.requires_grad_()
    got = MoCoV3Loss(0.2)(q1, q2, k1, k2)
    q1b = q1.detach().clone().requires_grad_()
    want = paper_moco_v3(q1b, q2, k1, k2, 0.2)
    assert abs(got.item() - want.item()) < TOL
    got.backward()
    want.backward()
    assert torch.allclose(q1.grad.double(), q1b.grad, atol=TOL)
