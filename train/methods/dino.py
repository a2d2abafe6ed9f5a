"""The DINO family (dinov2, dino, ibot): multi-crop, prototype heads, EMA teacher.

The arithmetic follows DINOv2's ``SSLMetaArch.forward_backward``:

- the teacher sees the 2 global crops unmasked; its CLS logits are swapped
  crop-wise so student crop A is matched with teacher crop B;
- the student sees the global crops with iBOT masks and the local crops;
  one head call covers local CLS, global CLS and masked patch tokens;
- ``dino_local = DINO(local x both teacher crops) / T`` and
  ``dino_global = 2 * DINO(global vs swapped teacher) / T`` with
  ``T = 2 * n_local + 2`` loss terms; KoLeo on each global crop's backbone CLS;
  iBOT on masked patches (weighted per image).

Batches are crop-major: ``global_crops`` (2B, 3, G, G) = crop 0 of all B images
then crop 1; ``local_crops`` (n_local*B, 3, L, L); ``masks`` (2B, N) bool.
DINO alone (``method: dino``) runs on ConvNets too: it needs only pooled features.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..heads import DINOHead
from ..losses import DINOLoss, iBOTPatchLoss, koleo_loss, masks_weight
from ..monitors import prototype_monitors
from .base import Objective, SSLModel, StepLoss, n_images, to_device


class DinoModel(SSLModel):
    """Backbone + DINO head (+ separate iBOT head): the student, or (frozen) the teacher."""

    @property
    def dino_head(self) -> nn.Module:
        return self.heads["dino_head"]

    @property
    def ibot_head(self) -> nn.Module | None:
        return self.heads["ibot_head"] if "ibot_head" in self.heads else None

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None = None,
                masks: torch.Tensor | None = None, mask_indices: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Backbone and heads over a multi-crop batch.

        Args:
            global_crops: (2B, 3, G, G).
            local_crops: optional (n_local*B, 3, L, L).
            masks: optional (2B, N) bool iBOT masks applied to the global crops.
            mask_indices: optional (M,) indices into the flattened (2B*N) patch tokens
                whose head logits are wanted (the masked patches).

        Returns:
            ``global_cls`` (2B, D) backbone CLS, ``global_logits`` (2B, K),
            ``local_logits`` (n_local*B, K) with local crops, ``patch_logits`` (M, K') with ``mask_indices``.
        """
        g = self.backbone(global_crops, masks) if masks is not None else self.backbone(global_crops)
        parts: list[torch.Tensor] = []
        names: list[str] = []
        if local_crops is not None and local_crops.shape[0]:
            parts.append(self.backbone(local_crops)["cls"])
            names.append("local_logits")
        parts.append(g["cls"])
        names.append("global_logits")
        masked = None
        if mask_indices is not None:
            masked = g["patch"].flatten(0, 1).index_select(0, mask_indices)
            if self.ibot_head is None:  # shared head: one call for all tokens
                parts.append(masked)
                names.append("patch_logits")
        sizes = [p.shape[0] for p in parts]
        out = dict(zip(names, self.dino_head(torch.cat(parts)).split(sizes)))
        if masked is not None and self.ibot_head is not None:
            out["patch_logits"] = self.ibot_head(masked)
        out["global_cls"] = g["cls"]
        return out


def build_dino_model(cfg, backbone: nn.Module) -> DinoModel:
    d, i = cfg.dino, cfg.ibot
    heads = nn.ModuleDict({"dino_head": DINOHead(backbone.embed_dim, d.n_prototypes, d.hidden_dim,
                                                 d.bottleneck_dim, d.n_layers)})
    if i.loss_weight > 0 and i.separate_head:
        heads["ibot_head"] = DINOHead(backbone.embed_dim, i.n_prototypes, i.hidden_dim, i.bottleneck_dim, i.n_layers)
    return DinoModel(backbone, heads)


class DinoObjective(Objective):
    """DINO + iBOT + KoLeo terms; buffers: the DINO (and iBOT) centers."""

    def __init__(self, cfg):
        super().__init__(cfg)
        d, i = cfg.dino, cfg.ibot
        self.do_dino = d.loss_weight > 0
        self.do_koleo = self.do_dino and d.koleo_weight > 0
        self.do_ibot = i.loss_weight > 0
        self.dino_loss = DINOLoss(d.n_prototypes, d.student_temp, d.center_momentum)
        self.ibot_loss = None
        if self.do_ibot:
            k = i.n_prototypes if i.separate_head else d.n_prototypes
            self.ibot_loss = iBOTPatchLoss(k, i.student_temp, i.center_momentum)

    def prepare(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        gc = to_device(batch["global_crops"], device)
        B = n_images(batch)
        if gc.shape[0] != 2 * B:
            raise ValueError(f"global_crops must hold 2 crops per image (2B rows), got {gc.shape[0]} for B={B}")
        lc = batch.get("local_crops")
        lc = to_device(lc, device) if lc is not None and lc.shape[0] else None
        inputs: dict[str, Any] = {"global_crops": gc, "local_crops": lc, "masks": None, "mask_indices": None}
        if self.do_ibot:
            if batch.get("masks") is None:
                raise ValueError("iBOT needs the loader's block masks (loader.masking=block)")
            masks = to_device(batch["masks"], device).to(torch.bool)
            inputs["masks"] = masks
            inputs["mask_indices"] = masks.flatten().nonzero().flatten()
        return inputs

    @torch.no_grad()
    def targets(self, teacher: nn.Module | None, inputs: dict[str, Any], values: Any) -> dict[str, torch.Tensor]:
        """Teacher forward and targets: ``dino`` (2, B, K) with crops swapped, ``ibot`` (M, K')."""
        t = self.cfg.teacher
        out = teacher(inputs["global_crops"], mask_indices=inputs["mask_indices"])
        cls = out["global_logits"].float()
        c0, c1 = cls.chunk(2)
        cls = torch.cat((c1, c0))  # swap: student crop 0 learns from teacher crop 1 and vice versa
        sk = t.centering == "sinkhorn_knopp"
        if sk:
            dino_t = self.dino_loss.sinkhorn_knopp_teacher(cls, values.teacher_temp, t.sinkhorn_iterations)
        else:
            dino_t = self.dino_loss.softmax_center_teacher(cls, values.teacher_temp)
            self.dino_loss.update_center(cls)
        res = {"dino": dino_t.view(2, -1, dino_t.shape[-1])}
        if self.do_ibot:
            pl = out["patch_logits"].float()
            if sk:
                res["ibot"] = self.ibot_loss.sinkhorn_knopp_teacher(pl, values.teacher_temp, t.sinkhorn_iterations)
            else:
                res["ibot"] = self.ibot_loss.softmax_center_teacher(pl, values.teacher_temp)
                self.ibot_loss.update_center(pl)
        return res

    def loss(self, out: dict[str, torch.Tensor], targets: Any, inputs: dict[str, Any], values: Any) -> StepLoss:
        cfg = self.cfg
        gc, lc, masks = inputs["global_crops"], inputs["local_crops"], inputs["masks"]
        B = gc.shape[0] // 2
        n_local = lc.shape[0] // B if lc is not None else 0
        # DINOv2's normaliser: global terms (2 * 1) + max(local terms (n_local * 2), 1).
        n_terms = 2 + max(n_local * 2, 1)
        metrics: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=gc.device)
        t_dino = targets["dino"]
        if self.do_dino:
            if n_local:
                loc = self.dino_loss(out["local_logits"].chunk(n_local), t_dino.unbind(0)) / n_terms
                metrics["dino_local_loss"] = loc.detach()
                total = total + cfg.dino.loss_weight * loc
            glo = self.dino_loss([out["global_logits"]], [t_dino.flatten(0, 1)]) * 2 / n_terms
            metrics["dino_global_loss"] = glo.detach()
            total = total + cfg.dino.loss_weight * glo
        if self.do_koleo:
            ko = cfg.dino.koleo_weight * sum(koleo_loss(p) for p in out["global_cls"].chunk(2))
            metrics["koleo_loss"] = ko.detach()
            total = total + ko
        if self.do_ibot:
            weights = masks_weight(masks)
            ib = self.ibot_loss.forward_masked(out["patch_logits"], targets["ibot"], masks, weights)
            # DINOv2 scales by loss_scales (2) * ibot_loss_scale (1 / n_global_crops = 1/2): net 1.
            metrics["ibot_loss"] = ib.detach()
            total = total + cfg.ibot.loss_weight * ib
            metrics["masked_patches"] = torch.tensor(float(inputs["mask_indices"].numel()))
        metrics.update(prototype_monitors(t_dino.flatten(0, 1)))
        cls = out["global_cls"].detach()
        return StepLoss(total, metrics, tuple(cls.chunk(2)))


__all__ = ["DinoModel", "DinoObjective", "build_dino_model"]
