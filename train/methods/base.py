"""What every method provides to the shared training step.

- a student ``SSLModel`` (backbone + heads; its ``forward`` is what DDP/FSDP wrap);
- an optional teacher: an EMA copy of the student (``momentum`` methods);
- an ``Objective``: the loss side (centers, queues, prototypes' normalisation),
  which turns a batch into model inputs, the teacher's targets, and a loss.

The step (``webcurate.train.step.TrainStep``) runs, for every method::

    inputs = objective.prepare(batch, device)
    targets = objective.targets(teacher, inputs, values)      # no grad; None without a teacher
    out = student(**inputs)                                    # DDP forward
    result = objective.loss(out, targets, inputs, values)     # StepLoss
    result.total.backward(); clip; optimiser step; EMA update; objective.after_step(out, targets)

``StepLoss.views`` holds the backbone embeddings of two views of the same
images, (B, D) each, from which the collapse monitors are computed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


class SSLModel(nn.Module):
    """Backbone + named heads; subclasses define ``forward`` for their family."""

    def __init__(self, backbone: nn.Module, heads: nn.ModuleDict):
        super().__init__()
        self.backbone = backbone
        self.heads = heads

    def submodules(self) -> dict[str, nn.Module]:
        """The parts with their own lr-decay rule and gradient clipping (as DINOv2 clips per module)."""
        return {"backbone": self.backbone, **{k: v for k, v in self.heads.items()}}


@dataclass
class StepLoss:
    """A step's loss (scalar, with grad), its detached parts, and two views' (B, D) backbone embeddings."""

    total: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    views: tuple[torch.Tensor, torch.Tensor] | None = None


class Objective(nn.Module):
    """The loss side of a method; its buffers (centers, queues) are part of the checkpoint."""

    def __init__(self, cfg: Any):
        super().__init__()
        self.cfg = cfg

    def bind(self, student: SSLModel) -> None:
        """Called once with the (unwrapped) student, for objectives that read its parameters."""

    def prepare(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """Model inputs (keyword arguments of the student's ``forward``) on ``device``."""
        raise NotImplementedError

    @torch.no_grad()
    def targets(self, teacher: nn.Module | None, inputs: dict[str, Any], values: Any) -> Any:
        """Targets from the teacher (momentum methods); None by default."""
        return None

    def loss(self, out: dict[str, torch.Tensor], targets: Any, inputs: dict[str, Any], values: Any) -> StepLoss:
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self, out: dict[str, torch.Tensor], targets: Any) -> None:
        """State updates after the optimiser step (e.g. MoCo's queue)."""


def n_images(batch: dict[str, Any]) -> int:
    """Images per worker in ``batch`` (``n_images``, else global crops / 2)."""
    n = batch.get("n_images")
    return int(n) if n is not None else int(batch["global_crops"].shape[0]) // 2


def to_device(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device, non_blocking=True)


__all__ = ["SSLModel", "Objective", "StepLoss", "n_images", "to_device"]
