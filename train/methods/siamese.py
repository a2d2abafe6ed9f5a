"""The two-view methods: SimCLR, MoCo v2, MoCo v3, BYOL, SimSiam, VICReg, Barlow Twins.

One model shape for all: backbone -> projector (-> predictor), applied to each
view separately (BatchNorm statistics per view, as the reference code does).
What differs is the pairing, the target branch and the loss:

============  =====================================================  =========================
method        loss on views 1, 2 (p: predictor out, z: projector out)  target branch
============  =====================================================  =========================
simclr        NT-Xent(z1, z2), negatives gathered from all workers     -
moco_v2       (InfoNCE(z1, z2') + InfoNCE(z2, z1')) / 2 vs a queue      EMA: z'
moco_v3       symmetric in-batch InfoNCE(p1, z2') + (p2, z1')           EMA: z'
byol          normalised MSE(p1, z2') + (p2, z1')                       EMA: z'
simsiam       -cos(p1, sg(z2)) / 2 - cos(p2, sg(z1)) / 2                stop-gradient
vicreg        VICReg(z1, z2) over the global batch                      -
barlow_twins  Barlow Twins(z1, z2), batch-norm over the global batch    -
============  =====================================================  =========================

Batches: ``global_crops`` (V*B, 3, G, G) crop-major with V >= 2 views; only the
first two views are used.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..heads import projection_mlp
from ..losses import BarlowTwinsLoss, BYOLLoss, MoCoV2Loss, MoCoV3Loss, NTXentLoss, SimSiamLoss, VICRegLoss
from .base import Objective, SSLModel, StepLoss, n_images, to_device

# Per method: (predictor?, BatchNorm in the projector?, affine-free BatchNorm after the projector?)
_HEADS = {
    "simclr": (False, True, False), "moco_v2": (False, False, False), "moco_v3": (True, True, False),
    "byol": (True, True, False), "simsiam": (True, True, True), "vicreg": (False, True, False),
    "barlow_twins": (False, True, False),
}


class SiameseModel(SSLModel):
    """Backbone + ``projector`` (+ ``predictor``)."""

    def forward(self, views: torch.Tensor, n_views: int = 2, predict: bool = True) -> dict[str, torch.Tensor]:
        """Args:
            views: (V*B, 3, H, W) crop-major views; each view goes through the network on its own.
            n_views: V.
            predict: run the predictor (the EMA target branch does not).

        Returns:
            ``emb`` (V*B, D) backbone features, ``z`` (V*B, P) projections, ``p`` (V*B, P) predictions
            (with a predictor and ``predict``).
        """
        emb, z, p = [], [], []
        for x in views.chunk(n_views):
            e = self.backbone(x)["cls"]
            emb.append(e)
            z.append(self.heads["projector"](e))
            if predict and "predictor" in self.heads:
                p.append(self.heads["predictor"](z[-1]))
        out = {"emb": torch.cat(emb), "z": torch.cat(z)}
        if p:
            out["p"] = torch.cat(p)
        return out


def build_siamese_model(cfg, backbone: nn.Module) -> SiameseModel:
    h = cfg.head
    predictor, bn, last_bn = _HEADS[cfg.method]
    heads = nn.ModuleDict({"projector": projection_mlp(backbone.embed_dim, h.proj_hidden_dim, h.proj_dim,
                                                       h.proj_layers, bn and h.batch_norm, last_bn)})
    if predictor:
        heads["predictor"] = projection_mlp(h.proj_dim, h.pred_hidden_dim, h.proj_dim, 2, h.batch_norm)
    return SiameseModel(backbone, heads)


class SiameseObjective(Objective):
    """Pairs views and applies the method's loss; buffers: MoCo v2's queue."""

    def __init__(self, cfg):
        super().__init__(cfg)
        m = cfg.method
        self.method = m
        if m == "simclr":
            self.loss_fn = NTXentLoss(cfg.simclr.temperature)
        elif m == "moco_v2":
            self.loss_fn = MoCoV2Loss(cfg.head.proj_dim, cfg.moco.queue_size, cfg.moco.temperature, seed=cfg.run.seed)
        elif m == "moco_v3":
            self.loss_fn = MoCoV3Loss(cfg.moco.temperature)
        elif m == "byol":
            self.loss_fn = BYOLLoss()
        elif m == "simsiam":
            self.loss_fn = SimSiamLoss()
        elif m == "vicreg":
            v = cfg.vicreg
            self.loss_fn = VICRegLoss(v.inv_weight, v.var_weight, v.cov_weight)
        elif m == "barlow_twins":
            self.loss_fn = BarlowTwinsLoss(cfg.barlow_twins.lambda_offdiag)
        else:
            raise ValueError(f"{m} is not a two-view method")

    def prepare(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        gc = batch["global_crops"]
        B = n_images(batch)
        if gc.shape[0] < 2 * B:
            raise ValueError(f"method {self.method} needs 2 views per image, got {gc.shape[0]} crops for {B} images")
        return {"views": to_device(gc[: 2 * B], device), "n_views": 2}

    @torch.no_grad()
    def targets(self, teacher: nn.Module | None, inputs: dict[str, Any], values: Any) -> torch.Tensor | None:
        """The EMA branch's (2B, P) projections (MoCo, BYOL), else None."""
        if teacher is None:
            return None
        return teacher(inputs["views"], inputs["n_views"], predict=False)["z"].float()

    def loss(self, out: dict[str, torch.Tensor], targets: Any, inputs: dict[str, Any], values: Any) -> StepLoss:
        z1, z2 = out["z"].chunk(2)
        m, metrics = self.method, {}
        if m in ("simclr", "vicreg", "barlow_twins"):
            total = self.loss_fn(z1, z2)
            if m == "vicreg":
                metrics = {f"vicreg_{k}": v.detach() for k, v in self.loss_fn.terms(z1.detach(), z2.detach()).items()}
        elif m == "moco_v2":
            k1, k2 = targets.chunk(2)
            total = 0.5 * (self.loss_fn(z1, k2, update_queue=False) + self.loss_fn(z2, k1, update_queue=True))
        else:
            p1, p2 = out["p"].chunk(2)
            if m == "simsiam":
                total = self.loss_fn(p1, p2, z1, z2)
            else:  # moco_v3, byol: online predictions against the EMA branch's projections
                k1, k2 = targets.chunk(2)
                total = self.loss_fn(p1, p2, k1, k2)
        e1, e2 = out["emb"].detach().chunk(2)
        return StepLoss(total, metrics, (e1, e2))


__all__ = ["SiameseModel", "SiameseObjective", "build_siamese_model"]
