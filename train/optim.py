"""AdamW parameter groups of the DINOv2 recipe, schedule application and gradient clipping.

Per parameter (DINOv2's ``get_params_groups_with_decay``):

- layer-wise lr decay in the backbone: block i gets ``decay ** (n_blocks - i)``,
  the embeddings (patch, position, CLS, mask token) ``decay ** (n_blocks + 1)``,
  everything after the blocks (final norm, registers, heads) 1;
- ``patch_embed`` parameters are further multiplied by ``patch_embed_lr_mult``;
- no weight decay on biases, norms (LayerNorm, BatchNorm) and LayerScale gammas;
- the heads' ``last_layer`` (DINO prototypes) and SwAV's ``prototypes`` follow
  the last-layer lr schedule, which is 0 during the first epoch(s).

AdamW (DINOv2) or SGD with momentum (the CIFAR recipes of the two-view methods).

Parameters with equal (lr multiplier, wd multiplier, last-layer flag) share one
group, in a deterministic order so optimizer state reloads onto the same groups.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

_EMBED_NAMES = ("pos_embed", "patch_embed", "mask_token", "cls_token")


def _layer_id(name: str, n_blocks: int) -> int:
    if any(k in name for k in _EMBED_NAMES):
        return 0
    if "blocks." in name:
        return int(name[name.find("blocks."):].split(".")[1]) + 1
    return n_blocks + 1


def param_groups(modules: dict[str, nn.Module], layerwise_decay: float = 1.0,
                 patch_embed_lr_mult: float = 1.0) -> list[dict]:
    """Fused AdamW groups for the student's sub-modules (``backbone``, ``dino_head``, ...).

    Each group holds ``params`` and the keys ``lr_multiplier``, ``wd_multiplier``,
    ``is_last_layer`` read by ``apply_schedule``.
    """
    fused: dict[tuple, dict] = {}
    for mod_name, module in modules.items():
        blocks = getattr(getattr(module, "model", module), "blocks", None)  # ViT blocks (ConvNets: none)
        n_blocks = len(blocks) if blocks is not None else 0
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            lr_mult = layerwise_decay ** (n_blocks + 1 - _layer_id(name, n_blocks)) if n_blocks else 1.0
            if "patch_embed" in name:
                lr_mult *= patch_embed_lr_mult
            # 1-D parameters are biases, norm scales (LayerNorm, BatchNorm) and LayerScale gammas.
            no_wd = p.ndim <= 1 or name.endswith(".bias") or "norm" in name or "gamma" in name
            wd_mult = 0.0 if no_wd else 1.0
            last = "last_layer" in name or mod_name == "prototypes"  # DINO's and SwAV's prototypes
            key = (lr_mult, wd_mult, last)
            g = fused.setdefault(key, {"params": [], "lr_multiplier": lr_mult, "wd_multiplier": wd_mult,
                                       "is_last_layer": last, "names": []})
            g["params"].append(p)
            g["names"].append(f"{mod_name}.{name}")
    return list(fused.values())


def build_optimizer(groups: list[dict], beta1: float = 0.9, beta2: float = 0.999, *, name: str = "adamw",
                    momentum: float = 0.9) -> torch.optim.Optimizer:
    """AdamW (or SGD with ``momentum``) over ``param_groups`` output; lr and weight decay are set
    each step by ``apply_schedule``."""
    groups = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, weight_decay=0.0, momentum=momentum, foreach=True)
    return torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0, betas=(beta1, beta2), foreach=True)


def apply_schedule(optimizer: torch.optim.Optimizer, lr: float, wd: float, last_layer_lr: float) -> None:
    """Set every group's lr and weight decay for this step from the schedules and its multipliers."""
    for g in optimizer.param_groups:
        g["weight_decay"] = wd * g["wd_multiplier"]
        g["lr"] = (last_layer_lr if g["is_last_layer"] else lr) * g["lr_multiplier"]


def clip_gradients(modules: Iterable[tuple[str, nn.Module]], max_norm: float) -> dict[str, float]:
    """Clip each sub-module's gradient norm to ``max_norm`` separately (as DINOv2); returns the
    pre-clip norms as tensors keyed ``grad_norm/<name>`` (0 disables clipping, norms still measured)."""
    norms = {}
    for name, m in modules:
        params = [p for p in m.parameters() if p.grad is not None]
        if not params:
            continue
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"), foreach=True)
        norms[f"grad_norm/{name}"] = norm
    return norms


__all__ = ["param_groups", "build_optimizer", "apply_schedule", "clip_gradients"]
