"""SwAV: multi-crop swapped prediction of Sinkhorn codes over learned prototypes (Caron et al. 2020).

backbone -> projector -> L2 normalise -> prototypes (a bias-free linear layer
whose rows are re-normalised before every forward). The two global crops give
codes (Sinkhorn-Knopp, epsilon 0.05, 3 iterations; ``train/losses/swav.py``)
that every other crop predicts. The prototypes follow the last-layer lr
schedule, so they stay frozen for ``optim.freeze_last_layer_epochs`` as in the
paper. With ``swav.queue_size`` the codes of small batches are computed
together with earlier embeddings.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..heads import projection_mlp
from ..losses import SwAVLoss
from .base import Objective, SSLModel, StepLoss, n_images, to_device


class SwAVModel(SSLModel):
    """Backbone + ``projector`` + ``prototypes`` (K, P)."""

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Args:
            global_crops: (2B, 3, G, G); local_crops: optional (n_local*B, 3, L, L).

        Returns:
            ``emb`` (2B, D) backbone features of the global crops, ``z`` ((2 + n_local)*B, P)
            normalised projections, ``scores`` ((2 + n_local)*B, K) prototype scores.
        """
        protos = self.heads["prototypes"]
        with torch.no_grad():  # SwAV keeps the prototypes on the unit sphere
            protos.weight.copy_(F.normalize(protos.weight, dim=1))
        g = self.backbone(global_crops)["cls"]
        feats = [g]
        if local_crops is not None and local_crops.shape[0]:
            feats.append(self.backbone(local_crops)["cls"])
        z = F.normalize(self.heads["projector"](torch.cat(feats)), dim=1)
        return {"emb": g, "z": z, "scores": protos(z)}


def build_swav_model(cfg, backbone: nn.Module) -> SwAVModel:
    h = cfg.head
    heads = nn.ModuleDict({
        "projector": projection_mlp(backbone.embed_dim, h.proj_hidden_dim, h.proj_dim, h.proj_layers, h.batch_norm),
        "prototypes": nn.Linear(h.proj_dim, cfg.swav.n_prototypes, bias=False),
    })
    return SwAVModel(backbone, heads)


class SwAVObjective(Objective):
    """Swapped prediction over all crops; buffers: the optional embedding queue."""

    def __init__(self, cfg):
        super().__init__(cfg)
        s = cfg.swav
        self.loss_fn = SwAVLoss(s.temperature, s.epsilon, s.sinkhorn_iterations, n_assign=2,
                                queue_length=s.queue_size, embed_dim=cfg.head.proj_dim if s.queue_size else None)

    def bind(self, student: SSLModel) -> None:
        # A plain reference (not a sub-module): the prototypes belong to the student's state.
        object.__setattr__(self, "_prototypes", student.heads["prototypes"])

    def prepare(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        B = n_images(batch)
        gc = batch["global_crops"]
        if gc.shape[0] < 2 * B:
            raise ValueError(f"SwAV needs 2 global crops per image, got {gc.shape[0]} for {B} images")
        lc = batch.get("local_crops")
        return {"global_crops": to_device(gc[: 2 * B], device),
                "local_crops": to_device(lc, device) if lc is not None and lc.shape[0] else None}

    def loss(self, out: dict[str, torch.Tensor], targets: Any, inputs: dict[str, Any], values: Any) -> StepLoss:
        B = inputs["global_crops"].shape[0] // 2
        n_crops = out["scores"].shape[0] // B
        scores = list(out["scores"].chunk(n_crops))
        z = list(out["z"].chunk(n_crops))
        protos = self._prototypes.weight if self.loss_fn.queue_length else None
        total = self.loss_fn(scores, z[:2], protos)
        e1, e2 = out["emb"].detach().chunk(2)
        return StepLoss(total, {}, (e1, e2))


__all__ = ["SwAVModel", "SwAVObjective", "build_swav_model"]
