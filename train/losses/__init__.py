"""webcurate.train.losses: one loss per file.

DINO (centering / Sinkhorn-Knopp), iBOT patch loss, KoLeo, and the SSL family:
SimCLR's NT-Xent, MoCo v2 (queue) / v3 InfoNCE, BYOL,
SimSiam, VICReg, Barlow Twins, SwAV, MAE.
"""
from .barlow_twins import BarlowTwinsLoss
from .byol import BYOLLoss, normalized_mse
from .dino import DINOLoss
from .ibot import iBOTPatchLoss, masks_weight
from .koleo import koleo_loss
from .mae import MAELoss, keep_unmasked, patchify, random_masking, unpatchify
from .moco import MoCoV2Loss, MoCoV3Loss
from .simclr import NTXentLoss
from .simsiam import SimSiamLoss
from .sinkhorn import sinkhorn_knopp
from .swav import SwAVLoss
from .vicreg import VICRegLoss

__all__ = ["DINOLoss", "iBOTPatchLoss", "masks_weight", "koleo_loss", "sinkhorn_knopp", "NTXentLoss",
           "MoCoV2Loss", "MoCoV3Loss",
           "BYOLLoss", "normalized_mse", "SimSiamLoss",
           "VICRegLoss", "BarlowTwinsLoss", "SwAVLoss",
           "MAELoss", "patchify", "unpatchify", "random_masking", "keep_unmasked"]
