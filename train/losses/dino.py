"""DINO loss: cross-entropy between teacher targets and student predictions over crop pairs.

Matches DINOv2's ``DINOLoss``: the student's prototype logits go through
``log_softmax(s / student_temp)``; the teacher's become targets either by
``centering`` (softmax of ``(t - center) / teacher_temp`` with an EMA center of
the teacher logits, all-reduced across workers) or by Sinkhorn-Knopp
(``webcurate.train.losses.sinkhorn``). ``forward`` sums, over every
(student chunk, teacher chunk) pair given, the batch-mean cross-entropy; the
caller (``webcurate.train.step``) pairs crops and scales terms as DINOv2 does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._dist import all_reduce_, world_size
from .sinkhorn import sinkhorn_knopp


class DINOLoss(nn.Module):
    """DINO cross-entropy with teacher centering / Sinkhorn-Knopp.

    Buffers: ``center`` (1, K), saved in checkpoints.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = float(student_temp)
        self.center_momentum = float(center_momentum)
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """(B, K) teacher logits -> (B, K) targets ``softmax((t - center) / teacher_temp)``."""
        return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_logits: torch.Tensor, teacher_temp: float,
                               n_iterations: int = 3) -> torch.Tensor:
        """(B, K) teacher logits -> (B, K) Sinkhorn-Knopp targets (balanced over all workers)."""
        return sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations)

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """EMA of the mean teacher logit over this step's (B, K) rows on all workers."""
        batch_center = torch.sum(teacher_logits.float(), dim=0, keepdim=True)
        batch_center = all_reduce_(batch_center) / (len(teacher_logits) * world_size())
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)

    def forward(self, student_logits: list[torch.Tensor] | tuple[torch.Tensor, ...],
                teacher_probs: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Sum over all (s, t) pairs of ``-mean_b sum_k t[b,k] log_softmax(s / T_s)[b,k]``.

        Args:
            student_logits: chunks of (B, K) student logits (one per crop).
            teacher_probs: chunks of (B, K) teacher targets (one per crop).

        Returns:
            scalar loss (float32).
        """
        total = 0.0
        for s in student_logits:
            lsm = F.log_softmax(s.float() / self.student_temp, dim=-1)
            for t in teacher_probs:
                total = total - torch.sum(t * lsm, dim=-1).mean()
        return total  # type: ignore[return-value]


__all__ = ["DINOLoss"]
