"""Heads: DINO / iBOT prototype heads (DINOv2's ``DINOHead``) and the projector/predictor MLPs.

An MLP (``n_layers`` linear layers, GELU between, hidden ``hidden_dim``) maps a
token to a ``bottleneck_dim`` vector, which is L2-normalised and scored
against ``n_prototypes`` prototypes by a weight-normalised linear layer without
bias (``last_layer``; its gain is initialised to 1). The iBOT head is either
this same module applied to masked patch tokens (``separate_head=False``, the
DINOv2 default) or a second instance.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.init import trunc_normal_
from torch.nn.utils.parametrizations import weight_norm


def _mlp(n_layers: int, in_dim: int, bottleneck_dim: int, hidden_dim: int) -> nn.Module:
    if n_layers == 1:
        return nn.Linear(in_dim, bottleneck_dim)
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
    for _ in range(n_layers - 2):
        layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
    layers.append(nn.Linear(hidden_dim, bottleneck_dim))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """MLP -> L2 normalise -> weight-normalised prototypes.

    ``forward``: (..., in_dim) -> (..., n_prototypes) logits.
    The prototype layer is ``last_layer`` (its parameters' names contain
    ``last_layer``, which the optimiser uses to freeze it during the first epoch).
    """

    def __init__(self, in_dim: int, n_prototypes: int = 65536, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, n_layers: int = 3):
        super().__init__()
        self.mlp = _mlp(max(int(n_layers), 1), in_dim, bottleneck_dim, hidden_dim)
        self.apply(self._init_weights)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, n_prototypes, bias=False))
        with torch.no_grad():
            self.last_layer.parametrizations.weight.original0.fill_(1.0)  # the gain g
        self.n_prototypes = int(n_prototypes)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) tokens -> (..., n_prototypes) prototype logits."""
        x = self.mlp(x)
        eps = 1e-6 if x.dtype in (torch.float16, torch.bfloat16) else 1e-12
        x = nn.functional.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)


def build_heads(embed_dim: int, dino_cfg, ibot_cfg) -> nn.ModuleDict:
    """``{"dino_head": DINOHead[, "ibot_head": DINOHead]}`` from the dino/ibot config sections."""
    heads = nn.ModuleDict({"dino_head": DINOHead(embed_dim, dino_cfg.n_prototypes, dino_cfg.hidden_dim,
                                                 dino_cfg.bottleneck_dim, dino_cfg.n_layers)})
    if ibot_cfg.loss_weight > 0 and ibot_cfg.separate_head:
        heads["ibot_head"] = DINOHead(embed_dim, ibot_cfg.n_prototypes, ibot_cfg.hidden_dim,
                                      ibot_cfg.bottleneck_dim, ibot_cfg.n_layers)
    return heads


def projection_mlp(in_dim: int, hidden_dim: int, out_dim: int, n_layers: int = 2, batch_norm: bool = True,
                   last_bn: bool = False) -> nn.Sequential:
    """SimCLR/BYOL-style MLP: ``n_layers`` linear layers, BatchNorm + ReLU between them.

    ``(B, in_dim) -> (B, out_dim)``; ``last_bn`` adds an affine-free BatchNorm at the
    end (SimSiam's projector, Barlow Twins' normalised embeddings need it).
    """
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(max(int(n_layers), 1) - 1):
        layers.append(nn.Linear(dim, hidden_dim, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.ReLU(inplace=True))
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=not last_bn))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


__all__ = ["DINOHead", "build_heads", "projection_mlp"]
