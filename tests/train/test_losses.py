"""Loss parity with DINOv2's definitions on fixed tensors, and the documented improvements.

The ``ref_*`` functions below transcribe facebookresearch/dinov2 ``dinov2/loss/*.py``
(single process) so the comparison needs no download.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from webcurate.train.losses import DINOLoss, iBOTPatchLoss, koleo_loss, masks_weight, sinkhorn_knopp

TOL = 1e-5


# --- DINOv2 reference definitions (dinov2/loss/*.py, world size 1) ---------------------------
def ref_sinkhorn_knopp(teacher_output, teacher_temp, n_iterations=3, n_samples=None):
    teacher_output = teacher_output.float()
    Q = torch.exp(teacher_output / teacher_temp).t()
    B = Q.shape[1] if n_samples is None else n_samples
    K = Q.shape[0]
    Q /= torch.sum(Q)
    for _ in range(n_iterations):
        Q /= torch.sum(Q, dim=1, keepdim=True)
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def ref_dino_forward(student_output_list, teacher_list, student_temp=0.1):
    total = 0
    for s in student_output_list:
        lsm = F.log_softmax(s / student_temp, dim=-1)
        for t in teacher_list:
            total -= torch.sum(t * lsm, dim=-1).mean()
    return total


class RefCentering:
    """DINOLoss.softmax_center_teacher + update_center (deferred apply, as the reference)."""

    def __init__(self, out_dim, momentum=0.9, patch=False):
        self.center = torch.zeros(1, 1, out_dim) if patch else torch.zeros(1, out_dim)
        self.m, self.patch, self.pending = momentum, patch, None

    def softmax(self, t, temp):
        if self.pending is not None:
            self.center = self.center * self.m + self.pending * (1 - self.m)
            self.pending = None
        return F.softmax((t - self.center) / temp, dim=-1)

    def update(self, t):
        if self.patch:  # (1, M, K) as ssl_meta_arch passes it
            self.pending = torch.sum(t.mean(1), dim=0, keepdim=True) / len(t)
        else:
            self.pending = torch.sum(t, dim=0, keepdim=True) / len(t)


def ref_ibot_forward_masked(s, t, student_masks_flat, student_temp=0.1, masks_weight=None):
    loss = torch.sum(t * F.log_softmax(s / student_temp, dim=-1), dim=-1)
    if masks_weight is None:
        masks_weight = (1 / student_masks_flat.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(
            student_masks_flat)[student_masks_flat]
    return -(loss * masks_weight).sum() / student_masks_flat.shape[0]


def ref_koleo(student_output, eps=1e-8):
    student_output = F.normalize(student_output, eps=eps, p=2, dim=-1)
    dots = torch.mm(student_output, student_output.t())
    n = student_output.shape[0]
    dots.view(-1)[:: (n + 1)].fill_(-1)
    _, I = torch.max(dots, dim=1)  # noqa: E741
    distances = torch.nn.PairwiseDistance(2, eps=eps)(student_output, student_output[I])
    return -torch.log(distances + eps).mean()


# --- fixtures ---------------------------------------------------------------------------------
def fixed(shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


B, K, N_LOCAL = 6, 64, 4


# --- DINO ---------------------------------------------------------------------------------------
def test_dino_loss_with_centering_equals_reference_over_several_steps():
    ours = DINOLoss(K, student_temp=0.1, center_momentum=0.9)
    ref = RefCentering(K)
    for step in range(4):
        teacher = fixed((2 * B, K), 10 + step)
        student_g = fixed((2 * B, K), 20 + step)
        student_l = fixed((N_LOCAL * B, K), 30 + step)
        t_ours = ours.softmax_center_teacher(teacher, 0.04)
        ours.update_center(teacher)
        t_ref = ref.softmax(teacher, 0.04)
        ref.update(teacher)
        assert torch.allclose(t_ours, t_ref, atol=TOL)
        t2 = t_ours.view(2, B, K)
        got = ours(student_l.chunk(N_LOCAL), t2.unbind(0)) + ours([student_g], [t2.flatten(0, 1)])
        want = ref_dino_forward(student_l.chunk(N_LOCAL), list(t_ref.view(2, B, K))) + ref_dino_forward(
            [student_g], [t_ref])
        assert abs(got.item() - want.item()) < TOL * max(1.0, abs(want.item()))


def test_dino_loss_with_sinkhorn_knopp_equals_reference():
    ours = DINOLoss(K)
    teacher = fixed((2 * B, K), 1, scale=0.5)
    student = fixed((2 * B, K), 2)
    t_ours = ours.sinkhorn_knopp_teacher(teacher, 0.04, 3)
    t_ref = ref_sinkhorn_knopp(teacher, 0.04, 3)
    assert torch.allclose(t_ours, t_ref, atol=TOL)
    assert torch.allclose(t_ours.sum(-1), torch.ones(2 * B), atol=TOL)
    assert abs(ours([student], [t_ours]).item() - ref_dino_forward([student], [t_ref]).item()) < TOL * 10


@pytest.mark.parametrize("temp", [0.04, 0.07, 1.0])
def test_sinkhorn_equals_reference_for_typical_logits(temp):
    logits = torch.tanh(fixed((32, 256), 3))  # in [-1, 1] like the weight-normalised head's output
    assert torch.allclose(sinkhorn_knopp(logits, temp), ref_sinkhorn_knopp(logits, temp), atol=TOL)


def test_sinkhorn_log_domain_path_equals_reference():
    # A spread of logits / temp of ~75 takes the log-sum-exp path; the reference is still finite here.
    logits = 1.5 * torch.tanh(fixed((32, 256), 11))
    assert (logits.max() - logits.min()) / 0.04 > 60
    assert torch.allclose(sinkhorn_knopp(logits, 0.04), ref_sinkhorn_knopp(logits, 0.04), atol=TOL)


def test_sinkhorn_stays_finite_and_exact_where_the_reference_overflows():
    # Cosine-like logits plus a constant: / 0.04 the scores reach ~275 and exp overflows float32.
    logits = torch.tanh(fixed((16, 128), 4)) + 10.0
    ref = ref_sinkhorn_knopp(logits, 0.04)
    assert not torch.isfinite(ref).all(), "the reference was expected to overflow on these logits"
    ours = sinkhorn_knopp(logits, 0.04)
    assert torch.isfinite(ours).all()
    # A global shift cancels in the reference's first normalisation, so the shifted reference is the truth.
    exact = ref_sinkhorn_knopp(logits - 10.0, 0.04)
    assert torch.isfinite(exact).all()
    assert torch.allclose(ours, exact, atol=TOL)


def test_sinkhorn_stays_finite_for_logits_spanning_thousands():
    logits = fixed((16, 128), 5, scale=40.0)  # / 0.04: a range of ~6000, beyond any float32 exp
    assert not torch.isfinite(ref_sinkhorn_knopp(logits, 0.04)).all()
    assert not torch.isfinite(ref_sinkhorn_knopp(logits - logits.max(), 0.04)).all()  # max-shift alone underflows
    ours = sinkhorn_knopp(logits, 0.04)
    assert torch.isfinite(ours).all()
    assert torch.allclose(ours.sum(-1), torch.ones(16), atol=TOL)


# --- iBOT ---------------------------------------------------------------------------------------
def _masks(n_img=2 * B, n_patch=16, seed=5):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(n_img, n_patch, generator=g) < 0.4
    m[0] = False  # an image without mask must count in the denominator only
    return m


def test_ibot_patch_loss_with_centering_equals_reference():
    masks = _masks()
    M = int(masks.sum())
    ours = iBOTPatchLoss(K)
    ref = RefCentering(K, patch=True)
    for step in range(3):
        t_logits = fixed((M, K), 40 + step)
        s_logits = fixed((M, K), 50 + step)
        t_ours = ours.softmax_center_teacher(t_logits, 0.07)
        ours.update_center(t_logits)
        t_ref = ref.softmax(t_logits.unsqueeze(0), 0.07).squeeze(0)
        ref.update(t_logits.unsqueeze(0))
        assert torch.allclose(t_ours, t_ref, atol=TOL)
        got = ours.forward_masked(s_logits, t_ours, masks)
        want = ref_ibot_forward_masked(s_logits, t_ref, masks)
        assert abs(got.item() - want.item()) < TOL * max(1.0, abs(want.item()))


def test_ibot_patch_loss_with_sinkhorn_equals_reference():
    masks = _masks(seed=6)
    M = int(masks.sum())
    t_logits, s_logits = fixed((M, K), 60, 0.5), fixed((M, K), 61)
    ours = iBOTPatchLoss(K)
    t_ours = ours.sinkhorn_knopp_teacher(t_logits, 0.04, 3)
    t_ref = ref_sinkhorn_knopp(t_logits, 0.04, 3, n_samples=M)
    assert torch.allclose(t_ours, t_ref, atol=TOL)
    got = ours.forward_masked(s_logits, t_ours, masks)
    assert abs(got.item() - ref_ibot_forward_masked(s_logits, t_ref, masks).item()) < 1e-4


def test_ibot_weights_each_masked_image_equally():
    masks = torch.zeros(2, 8, dtype=torch.bool)
    masks[0, :1] = True  # 1 masked patch
    masks[1, :4] = True  # 4 masked patches
    w = masks_weight(masks)
    assert w.tolist() == [1.0, 0.25, 0.25, 0.25, 0.25]
    assert math.isclose(w[:1].sum().item(), w[1:].sum().item())


# --- KoLeo --------------------------------------------------------------------------------------
def test_koleo_equals_reference():
    x = fixed((12, 32), 7)
    assert abs(koleo_loss(x).item() - ref_koleo(x).item()) < TOL


def test_koleo_gradient_equals_reference():
    x1 = fixed((10, 16), 8).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    koleo_loss(x1).backward()
    ref_koleo(x2).backward()
    assert torch.allclose(x1.grad, x2.grad, atol=TOL)


def test_koleo_is_finite_with_zero_gradient_at_batch_size_one():
    x = fixed((1, 16), 9).requires_grad_()
    loss = koleo_loss(x)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(x.grad).all() and (x.grad == 0).all()


def test_koleo_is_finite_for_duplicate_vectors():
    x = fixed((4, 8), 10)
    x[1] = x[0]
    x.requires_grad_()
    loss = koleo_loss(x)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
