"""EMA teacher: ``teacher = m * teacher + (1 - m) * student`` over matching parameters."""
from __future__ import annotations

import torch
from torch import nn


def teacher_mode(teacher: nn.Module) -> nn.Module:
    """Eval mode (no drop-path or dropout) except BatchNorm layers, which use batch statistics.

    That is how BYOL and MoCo run their target networks; with eval-mode BatchNorm a
    ConvNet teacher would use running statistics it never updates.
    """
    teacher.eval()
    for m in teacher.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
    return teacher


def teacher_from_student(student: nn.Module) -> nn.Module:
    """A frozen copy of ``student`` to serve as the EMA teacher (no gradients, ``teacher_mode``)."""
    import copy

    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher_mode(teacher)


def _local(p: torch.Tensor) -> torch.Tensor:
    p = p.detach()
    return p.to_local() if hasattr(p, "to_local") else p


class EMAUpdater:
    """Pairs the student's and teacher's parameters once; ``update(m)`` applies the EMA.

    Uses ``torch._foreach_*`` (one fused kernel per dtype/device group) since a
    parameter-by-parameter loop costs a visible share of a small model's step.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module):
        s = dict(student.named_parameters())
        t = dict(teacher.named_parameters())
        if s.keys() != t.keys():
            missing = sorted(set(s) ^ set(t))[:5]
            raise ValueError(f"student and teacher parameters differ (e.g. {missing})")
        # FSDP2 parameters are DTensors sharded alike on both sides: update the local shards.
        self.student_params = [_local(s[k]) for k in s]
        self.teacher_params = [_local(t[k]) for k in s]

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        torch._foreach_mul_(self.teacher_params, momentum)
        torch._foreach_add_(self.teacher_params, self.student_params, alpha=1.0 - momentum)


__all__ = ["EMAUpdater", "teacher_from_student", "teacher_mode"]
