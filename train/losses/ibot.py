"""iBOT masked-patch loss, weighted per image (DINOv2's ``iBOTPatchLoss.forward_masked``).

Only masked patches of the global crops take part. Each masked patch's
cross-entropy is weighted by ``1 / (masked patches of its image)``, so every
image with a mask counts equally whatever its mask ratio, and the sum is
divided by the number of images (masked or not). Teacher targets come from
centering (EMA over masked patch logits) or Sinkhorn-Knopp over all masked
patches of all workers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._dist import all_reduce_
from .sinkhorn import sinkhorn_knopp


def masks_weight(masks: torch.Tensor) -> torch.Tensor:
    """(n_img, N) bool masks -> (M,) weight ``1 / n_masked(image)`` of each masked patch, in
    ``masks.flatten().nonzero()`` order."""
    per_image = 1.0 / masks.sum(-1).clamp(min=1.0)
    return per_image.unsqueeze(-1).expand_as(masks)[masks]


class iBOTPatchLoss(nn.Module):  # noqa: N801 - the method's name
    """iBOT patch loss with teacher centering / Sinkhorn-Knopp. Buffers: ``center`` (1, 1, K)."""

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = float(student_temp)
        self.center_momentum = float(center_momentum)
        self.register_buffer("center", torch.zeros(1, 1, patch_out_dim))

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """(M, K) masked-patch teacher logits -> (M, K) centred, sharpened softmax."""
        return F.softmax((teacher_logits.float() - self.center[0]) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_logits: torch.Tensor, teacher_temp: float,
                               n_iterations: int = 3) -> torch.Tensor:
        """(M, K) -> (M, K) Sinkhorn-Knopp targets; B = masked patches over all workers."""
        return sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations)

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """EMA of the mean masked-patch logit; each worker's mean counts once (as in DINOv2).

        A worker without masked patches this step contributes nothing (the
        reference would average in a NaN).
        """
        t = teacher_logits.float()
        has = torch.tensor([1.0 if len(t) else 0.0], device=t.device)
        local = t.mean(0, keepdim=True) if len(t) else t.new_zeros(1, self.center.shape[-1])
        buf = all_reduce_(torch.cat([local.reshape(-1), has]))
        n = buf[-1].item()
        if n > 0:
            self.center.mul_(self.center_momentum).add_(
                (buf[:-1] / n).view_as(self.center), alpha=1 - self.center_momentum)

    def forward_masked(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                       masks: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted masked-patch cross-entropy.

        Args:
            student_logits: (M, K) student logits of the M masked patches.
            teacher_probs: (M, K) teacher targets of the same patches.
            masks: (n_img, N) bool masks of the global crops (n_img = 2B).
            weights: (M,) per-patch weights; default ``masks_weight(masks)``.

        Returns:
            scalar ``-sum_m w_m sum_k t log_softmax(s / T_s) / n_img``.
        """
        if weights is None:
            weights = masks_weight(masks)
        lsm = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
        loss = torch.sum(teacher_probs * lsm, dim=-1)
        return -(loss * weights).sum() / masks.shape[0]


__all__ = ["iBOTPatchLoss", "masks_weight"]
