"""SwAV (Sinkhorn codes, swapped prediction, multi-crop, queue) and MAE (masked-patch pixel loss, random
masking) against the papers' equations on fixed tensors."""
from __future__ import annotations

import math

import pytest
import torch

from webcurate.train import losses as L

TOL = 1e-5


def fixed(shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


# --- SwAV (Caron et al. 2020, eq. 3-5 and the multi-crop loss) --------------------------------------
def paper_sinkhorn(scores, eps, iterations=3):
    """Q* = Diag(u) exp(C^T Z / eps) Diag(v): rows (prototypes) sum to 1/K, columns (samples) to 1/B,
    by alternating row and column normalisation; the codes are B * Q*^T (each sample's code sums to 1)."""
    B, K = scores.shape
    Q = [[math.exp(scores[b, k].item() / eps) for b in range(B)] for k in range(K)]  # (K, B)
    total = sum(map(sum, Q))
    Q = [[x / total for x in row] for row in Q]
    for _ in range(iterations):
        Q = [[x / sum(row) / K for x in row] for row in Q]
        col = [sum(Q[k][b] for k in range(K)) for b in range(B)]
        Q = [[Q[k][b] / col[b] / B for b in range(B)] for k in range(K)]
    return torch.tensor([[B * Q[k][b] for k in range(K)] for b in range(B)], dtype=torch.float64)


def paper_swav(scores, n_assign, temperature=0.1, eps=0.05, codes=None):
    """Each assign crop i gives codes q_i; every other crop v predicts them with p_v = softmax(z_v.c / T);
    l = -sum_k q log p, averaged over the batch, the other crops and the assign crops."""
    n_crops, (B, K) = len(scores), scores[0].shape
    total = 0.0
    for i in range(n_assign):
        q = paper_sinkhorn(scores[i].detach(), eps) if codes is None else codes[i]
        sub = 0.0
        for v in range(n_crops):
            if v == i:
                continue
            for b in range(B):
                logits = scores[v][b] / temperature
                p = torch.exp(logits - torch.logsumexp(logits, 0))
                sub = sub - (q[b] * torch.log(p)).sum() / B
        total = total + sub / (n_crops - 1)
    return total / n_assign


def _swav_scores(n_crops, B=6, K=5, D=8, seed=50):
    prototypes = unit(fixed((K, D), seed))
    emb = [unit(fixed((B, D), seed + 1 + c)) for c in range(n_crops)]
    return emb, prototypes, [e @ prototypes.t() for e in emb]


def test_swav_codes_are_the_papers_sinkhorn_knopp_assignment():
    _, _, scores = _swav_scores(2)
    codes = L.SwAVLoss().codes(scores[0], 0)
    want = paper_sinkhorn(scores[0], 0.05)
    assert torch.allclose(codes.double(), want, atol=TOL)
    assert torch.allclose(codes.sum(1), torch.ones(6, dtype=codes.dtype), atol=TOL)


@pytest.mark.parametrize("n_crops", [2, 5])  # two views; 2 high-res + 3 low-res crops (multi-crop)
def test_swav_swapped_prediction_equals_the_papers_loss_and_codes_carry_no_gradient(n_crops):
    _, _, scores = _swav_scores(n_crops)
    a = [s.clone().requires_grad_() for s in scores]
    b = [s.clone().requires_grad_() for s in scores]
    got, want = L.SwAVLoss()(a), paper_swav(b, 2)
    assert abs(got.item() - want.item()) < TOL * max(1.0, want.item())
    got.backward()
    want.backward()
    for x, y in zip(a, b):
        assert torch.allclose(x.grad.double(), y.grad, atol=TOL)


def test_swav_queue_joins_sinkhorn_once_full_with_the_current_prototypes():
    B, D = 6, 8
    loss = L.SwAVLoss(queue_length=12, embed_dim=D)
    steps = [_swav_scores(3, B=B, D=D, seed=60 + 10 * s) for s in range(3)]
    history = []
    for step, (emb, prototypes, scores) in enumerate(steps):
        got = loss(scores, embeddings=emb[:2], prototypes=prototypes)
        if step < 2:  # the queue holds 0 then 6 of 12 rows: not used yet
            want = paper_swav(scores, 2)
        else:  # queue = the two previous batches (newest first), scored with this step's prototypes
            codes = []
            for i in range(2):
                queued = torch.cat([history[1][i], history[0][i]]) @ prototypes.t()
                codes.append(paper_sinkhorn(torch.cat([queued, scores[i]]), 0.05)[-B:])
            want = paper_swav(scores, 2, codes=codes)
            assert abs(got.item() - paper_swav(scores, 2).item()) > 1e-4  # the queue changed the codes
        assert abs(got.item() - want.item()) < TOL * max(1.0, want.item()), step
        history.append(emb[:2])
    assert loss.queue_filled.item() == 12
    assert torch.allclose(loss.queue[0].double(), torch.cat([steps[2][0][0], steps[1][0][0]]), atol=1e-6)


def test_swav_with_a_queue_needs_embeddings_and_prototypes():
    with pytest.raises(ValueError, match="embed_dim"):
        L.SwAVLoss(queue_length=8)
    with pytest.raises(ValueError, match="embeddings and the prototypes"):
        L.SwAVLoss(queue_length=8, embed_dim=4)([torch.randn(2, 3), torch.randn(2, 3)])
