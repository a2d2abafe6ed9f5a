"""webcurate.train.losses: DINO (centering / Sinkhorn-Knopp), iBOT patch loss, KoLeo."""
from .dino import DINOLoss
from .ibot import iBOTPatchLoss, masks_weight
from .koleo import koleo_loss
from .sinkhorn import sinkhorn_knopp

__all__ = ["DINOLoss", "iBOTPatchLoss", "masks_weight", "koleo_loss", "sinkhorn_knopp"]
