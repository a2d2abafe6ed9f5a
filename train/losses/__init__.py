"""webcurate.train.losses: one loss per file.

DINO (centering / Sinkhorn-Knopp), iBOT patch loss, KoLeo, and the SSL family:
SimCLR's NT-Xent.
"""
from .dino import DINOLoss
from .ibot import iBOTPatchLoss, masks_weight
from .koleo import koleo_loss
from .simclr import NTXentLoss
from .sinkhorn import sinkhorn_knopp

__all__ = ["DINOLoss", "iBOTPatchLoss", "masks_weight", "koleo_loss", "sinkhorn_knopp", "NTXentLoss"]
