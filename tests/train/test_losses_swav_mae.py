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


# --- MAE (He et al. 2022: 75 % random masking, MSE on masked patches, normalised pixel targets) ----
def paper_patch(img, i, j, p):
    """Pixels of patch (row i, column j) of a (3, H, W) image, as (row, column, channel)."""
    return img[:, i * p:(i + 1) * p, j * p:(j + 1) * p].permute(1, 2, 0).reshape(-1)


def paper_mae_loss(pred, imgs, mask, p, norm_pix=True):
    """Mean over masked patches of the mean squared pixel error; targets normalised per patch."""
    n, _, hh, ww = imgs.shape
    w = ww // p
    total, count = 0.0, 0
    for b in range(n):
        for i in range(hh // p):
            for j in range(w):
                if not mask[b, i * w + j]:
                    continue
                t = paper_patch(imgs[b], i, j, p)
                if norm_pix:
                    t = (t - t.mean()) / torch.sqrt(t.var() + 1e-6)
                total = total + ((pred[b, i * w + j] - t) ** 2).mean()
                count += 1
    return total / count


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_loss_counts_masked_patches_only_against_the_papers_targets(norm_pix):
    p, n = 4, 3
    imgs = fixed((n, 3, 16, 12), 70)
    pred = fixed((n, 12, p * p * 3), 71).requires_grad_()
    mask = torch.rand(n, 12, generator=torch.Generator().manual_seed(72)) < 0.75
    got = L.MAELoss(p, norm_pix_loss=norm_pix)(pred, imgs, mask)
    pred2 = pred.detach().clone().requires_grad_()
    want = paper_mae_loss(pred2, imgs, mask, p, norm_pix)
    assert abs(got.item() - want.item()) < TOL
    got.backward()
    want.backward()
    assert torch.allclose(pred.grad.double(), pred2.grad, atol=TOL)
    assert (pred.grad[~mask] == 0).all() and (pred.grad[mask] != 0).any()  # visible patches: no gradient


def test_patchify_follows_the_papers_patch_order_and_unpatchify_inverts_it():
    imgs = fixed((2, 3, 8, 8), 73)
    x = L.patchify(imgs, 4)
    assert x.shape == (2, 4, 48)
    for i in range(2):
        for j in range(2):
            assert torch.equal(x[1, i * 2 + j], paper_patch(imgs[1], i, j, 4))
    assert torch.equal(L.unpatchify(x, 4), imgs)


def test_random_masking_keeps_a_quarter_of_the_patches_with_the_lowest_noise():
    x = fixed((3, 16, 5), 74)
    noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(75))
    kept, mask, ids_restore = L.random_masking(x, 0.75, noise=noise)
    assert kept.shape == (3, 4, 5) and mask.shape == (3, 16)
    assert (mask.sum(1) == 12).all()
    for b in range(3):
        order = sorted(range(16), key=lambda t: noise[b, t].item())[:4]  # lowest noise first
        assert torch.equal(kept[b], x[b, order])
        assert sorted(order) == (mask[b] == 0).nonzero().flatten().tolist()
    # decoder side: kept tokens + mask tokens, unshuffled by ids_restore, give back the patch order
    full = torch.cat([kept, torch.zeros(3, 12, 5, dtype=x.dtype)], dim=1)
    restored = torch.gather(full, 1, ids_restore.unsqueeze(-1).expand(-1, -1, 5))
    assert torch.equal(restored[mask == 0], x[mask == 0]) and (restored[mask == 1] == 0).all()
    # default noise: 75 % of 16 patches masked in every row
    _, m, _ = L.random_masking(x, generator=torch.Generator().manual_seed(0))
    assert (m.sum(1) == 12).all()


def test_keep_unmasked_uses_the_loaders_mask_exactly():
    x = fixed((2, 8, 3), 76)
    masks = torch.tensor([[1, 1, 0, 1, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    kept, mask, _ = L.keep_unmasked(x, masks)
    assert torch.equal(kept[0], x[0, [2, 4]]) and torch.equal(kept[1], x[1, [0, 7]])
    assert torch.equal(mask.bool(), masks)
    with pytest.raises(ValueError, match="equal masked counts"):
        L.keep_unmasked(x, torch.tensor([[1] * 8, [0] * 8], dtype=torch.bool))
