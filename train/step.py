"""One DINOv2/iBOT training step: teacher forward, student forward/backward, losses, EMA.

The arithmetic follows DINOv2's ``SSLMetaArch.forward_backward``:

- the teacher sees the 2 global crops unmasked; its CLS logits are swapped
  crop-wise so student crop A is matched with teacher crop B;
- the student sees the global crops with iBOT masks and the local crops;
  one head call covers local CLS, global CLS and masked patch tokens;
- ``dino_local = DINO(local x both teacher crops) / T`` and
  ``dino_global = 2 * DINO(global vs swapped teacher) / T`` with
  ``T = 2 * n_local + 2`` loss terms; KoLeo on each global crop's backbone CLS;
  iBOT on masked patches (weighted per image);
- gradient clipping per sub-module, AdamW step, EMA update of the teacher.

Batches come from the loader in crop-major order: ``global_crops`` (2B, 3, G, G)
= crop 0 of all B images then crop 1; ``local_crops`` (n_local*B, 3, L, L);
``masks`` (2B, N) bool.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from .ema import EMAUpdater
from .losses import DINOLoss, iBOTPatchLoss, koleo_loss, masks_weight
from .monitors import collapse_monitors
from .optim import apply_schedule, clip_gradients
from .schedules import StepValues


class SSLModel(nn.Module):
    """Backbone + DINO head (+ separate iBOT head): the student, or (frozen) the teacher."""

    def __init__(self, backbone: nn.Module, heads: nn.ModuleDict):
        super().__init__()
        self.backbone = backbone
        self.dino_head = heads["dino_head"]
        self.ibot_head = heads["ibot_head"] if "ibot_head" in heads else None

    def submodules(self) -> dict[str, nn.Module]:
        """The parts that get their own lr-decay rule and gradient clipping."""
        out = {"backbone": self.backbone, "dino_head": self.dino_head}
        if self.ibot_head is not None:
            out["ibot_head"] = self.ibot_head
        return out

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None = None,
                masks: torch.Tensor | None = None,
                mask_indices: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Backbone and heads over a multi-crop batch.

        Args:
            global_crops: (2B, 3, G, G).
            local_crops: optional (n_local*B, 3, L, L).
            masks: optional (2B, N) bool iBOT masks applied to the global crops.
            mask_indices: optional (M,) indices into the flattened (2B*N) patch
                tokens whose head logits are wanted (the masked patches).

        Returns:
            ``global_cls`` (2B, D) backbone CLS, ``global_logits`` (2B, K),
            ``local_logits`` (n_local*B, K) if local crops, ``patch_logits`` (M, K')
            if ``mask_indices``.
        """
        g = self.backbone(global_crops, masks)
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


class TrainStep:
    """Callable running one optimisation step; holds models, losses, optimizer and EMA.

    ``student`` may be wrapped (DDP/FSDP); ``student_module`` is the bare
    ``SSLModel`` used for clipping. ``autocast_dtype`` (e.g. bfloat16 on GPU)
    enables autocast around the forwards; losses are computed in float32.
    """

    def __init__(self, cfg, student: nn.Module, student_module: SSLModel, teacher: SSLModel,
                 optimizer: torch.optim.Optimizer, dino_loss: DINOLoss, ibot_loss: iBOTPatchLoss | None,
                 device: torch.device, autocast_dtype: torch.dtype | None = None,
                 ema: EMAUpdater | None = None):
        self.cfg = cfg
        self.student = student
        self.student_module = student_module
        self.teacher = teacher
        self.optimizer = optimizer
        self.dino_loss = dino_loss
        self.ibot_loss = ibot_loss
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.ema = ema or EMAUpdater(student_module, teacher)
        self.do_dino = cfg.dino.loss_weight > 0
        self.do_koleo = self.do_dino and cfg.dino.koleo_weight > 0
        self.do_ibot = cfg.ibot.loss_weight > 0 and ibot_loss is not None

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def teacher_targets(self, global_crops: torch.Tensor, mask_indices: torch.Tensor | None,
                        teacher_temp: float) -> dict[str, torch.Tensor]:
        """Teacher forward and targets: ``dino`` (2, B, K) with crops swapped, ``ibot`` (M, K')."""
        cfg = self.cfg
        with self._autocast():
            out = self.teacher(global_crops, mask_indices=mask_indices)
        cls = out["global_logits"].float()
        c0, c1 = cls.chunk(2)
        cls = torch.cat((c1, c0))  # swap: student crop 0 learns from teacher crop 1 and vice versa
        sk = cfg.teacher.centering == "sinkhorn_knopp"
        its = cfg.teacher.sinkhorn_iterations
        if sk:
            dino_t = self.dino_loss.sinkhorn_knopp_teacher(cls, teacher_temp, its)
        else:
            dino_t = self.dino_loss.softmax_center_teacher(cls, teacher_temp)
            self.dino_loss.update_center(cls)
        res = {"dino": dino_t.view(2, -1, dino_t.shape[-1])}
        if self.do_ibot:
            pl = out["patch_logits"].float()
            if sk:
                res["ibot"] = self.ibot_loss.sinkhorn_knopp_teacher(pl, teacher_temp, its)
            else:
                res["ibot"] = self.ibot_loss.softmax_center_teacher(pl, teacher_temp)
                self.ibot_loss.update_center(pl)
        return res

    def __call__(self, batch: dict[str, Any], values: StepValues) -> dict[str, torch.Tensor]:
        """Run one step on ``batch`` with this step's scheduled ``values``; returns detached metrics."""
        cfg = self.cfg
        dev = self.device
        apply_schedule(self.optimizer, values.lr, values.wd, values.last_layer_lr)
        gc = batch["global_crops"].to(dev, non_blocking=True)
        lc = batch.get("local_crops")
        lc = lc.to(dev, non_blocking=True) if lc is not None and lc.shape[0] else None
        if gc.shape[0] % 2:
            raise ValueError(f"global_crops must hold 2 crops per image (2B rows), got {gc.shape[0]}")
        B = gc.shape[0] // 2
        n_local = lc.shape[0] // B if lc is not None else 0
        masks = mask_indices = weights = None
        if self.do_ibot:
            masks = batch["masks"].to(dev, non_blocking=True).to(torch.bool)
            mask_indices = masks.flatten().nonzero().flatten()
            weights = masks_weight(masks)

        targets = self.teacher_targets(gc, mask_indices, values.teacher_temp)

        with self._autocast():
            out = self.student(gc, lc, masks, mask_indices)

        # DINOv2's normaliser: global terms (2 * 1) + max(local terms (n_local * 2), 1).
        n_terms = 2 + max(n_local * 2, 1)
        metrics: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=dev)
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
            ib = self.ibot_loss.forward_masked(out["patch_logits"], targets["ibot"], masks, weights)
            # DINOv2 scales by loss_scales (2) * ibot_loss_scale (1 / n_global_crops = 1/2): net 1.
            metrics["ibot_loss"] = ib.detach()
            total = total + cfg.ibot.loss_weight * ib
        metrics["loss"] = total.detach()

        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        metrics.update(clip_gradients(self.student_module.submodules().items(), cfg.optim.clip_grad))
        self.optimizer.step()
        self.ema.update(values.momentum)

        metrics.update(collapse_monitors(t_dino.flatten(0, 1), out["global_cls"].detach()))
        if masks is not None:
            metrics["masked_patches"] = torch.tensor(float(mask_indices.numel()))
        return metrics


__all__ = ["SSLModel", "TrainStep"]
