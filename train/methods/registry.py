"""The self-supervised methods as small declarative specs (no torch import: the config reads them).

A method says which views the loader makes, which heads sit on the backbone,
whether a momentum (EMA) branch exists, which loss trains it, and the config
values it changes from the shared defaults (its published recipe). The code
that runs a family of methods lives beside this file (``dino.py``,
``siamese.py``, ``swav.py``, ``mae.py``); ``objective_for`` picks it.

=============  ===========  ======================  ========  ===========================
method         views        heads                   momentum  loss (train/losses/)
=============  ===========  ======================  ========  ===========================
dinov2         multi-crop   DINO + iBOT prototypes  EMA       DINO + iBOT + KoLeo
dino           multi-crop   DINO prototypes         EMA       DINO
ibot           multi-crop   DINO + iBOT prototypes  EMA       DINO + iBOT
simclr         two views    projector               -         NT-Xent
moco_v2        two views    projector               EMA       InfoNCE with a queue
moco_v3        two views    projector + predictor   EMA       symmetric in-batch InfoNCE
byol           two views    projector + predictor   EMA       normalised MSE
simsiam        two views    projector + predictor   -         negative cosine, stop-grad
swav           multi-crop   projector + prototypes  -         swapped prediction (Sinkhorn)
vicreg         two views    expander                -         VICReg
barlow_twins   two views    projector               -         Barlow Twins
mae            one view     decoder                 -         masked-pixel MSE
=============  ===========  ======================  ========  ===========================
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

MULTI_CROP, TWO_VIEW, ONE_VIEW = "multi_crop", "two_view", "one_view"

MethodName = Literal["dinov2", "dino", "ibot", "simclr", "moco_v2", "moco_v3", "byol", "simsiam", "swav",
                     "vicreg", "barlow_twins", "mae"]


@dataclass(frozen=True)
class MethodSpec:
    """One method: views, heads, momentum branch, loss, and its recipe's config defaults."""

    name: str
    family: str  # the module that runs it: dino | siamese | swav | mae
    views: str  # MULTI_CROP | TWO_VIEW | ONE_VIEW
    heads: tuple[str, ...]
    momentum: bool  # an EMA copy of the student provides the targets
    loss: str
    needs_vit: bool = False  # patch masking (iBOT, MAE) needs patch tokens
    masks: bool = False  # the loader's block masks are used (iBOT)
    batch_stats: bool = False  # the loss normalises or contrasts over the batch: batch >= 2
    # Config values of the published recipe, applied under the user's own values.
    defaults: dict[str, dict[str, Any]] = field(default_factory=dict)


# Views: the loader's recipes of the published augmentations (train/data/recipes.py).
_DINO_VIEWS = {"recipe": "dinov2"}
_SIMCLR_VIEWS = {"recipe": "simclr"}
_BYOL_VIEWS = {"recipe": "byol"}
_MOCO_V2_VIEWS = {"recipe": "moco_v2"}
_SWAV_VIEWS = {"recipe": "swav"}
# MAE draws its own 75 % random masks (mae.mask_ratio): the loader makes crops and flips only.
_MAE_VIEWS = {"recipe": "mae", "masking": "none"}
# Methods without DINO's schedule of weight decay and frozen prototypes keep weight decay constant.
_FLAT_WD = {"weight_decay": 1e-4, "weight_decay_end": 1e-4, "freeze_last_layer_epochs": 0.0,
            "layerwise_decay": 1.0, "patch_embed_lr_mult": 1.0}

_SPECS = [
    MethodSpec("dinov2", "dino", MULTI_CROP, ("dino_head", "ibot_head"), True, "dino + ibot + koleo",
               needs_vit=True, masks=True, defaults={"loader": _DINO_VIEWS}),
    MethodSpec("dino", "dino", MULTI_CROP, ("dino_head",), True, "dino",
               defaults={"ibot": {"loss_weight": 0.0}, "dino": {"koleo_weight": 0.0},
                         "teacher": {"momentum": 0.996}, "loader": {**_DINO_VIEWS, "masking": "none"}}),
    MethodSpec("ibot", "dino", MULTI_CROP, ("dino_head", "ibot_head"), True, "dino + ibot", needs_vit=True,
               masks=True, defaults={"dino": {"koleo_weight": 0.0}, "teacher": {"momentum": 0.996},
                                     "loader": _DINO_VIEWS}),
    MethodSpec("simclr", "siamese", TWO_VIEW, ("projector",), False, "nt_xent", batch_stats=True,
               defaults={"loader": _SIMCLR_VIEWS, "optim": _FLAT_WD, "head": {"proj_dim": 128}}),
    MethodSpec("moco_v2", "siamese", TWO_VIEW, ("projector",), True, "infonce_queue",
               defaults={"loader": _MOCO_V2_VIEWS, "optim": _FLAT_WD, "head": {"proj_dim": 128},
                         "teacher": {"momentum": 0.99, "final_momentum": 0.99}}),
    MethodSpec("moco_v3", "siamese", TWO_VIEW, ("projector", "predictor"), True, "infonce_symmetric",
               batch_stats=True,
               defaults={"loader": _BYOL_VIEWS, "optim": _FLAT_WD, "head": {"proj_dim": 256},
                         "teacher": {"momentum": 0.99, "final_momentum": 1.0}}),
    MethodSpec("byol", "siamese", TWO_VIEW, ("projector", "predictor"), True, "byol",
               defaults={"loader": _BYOL_VIEWS, "optim": _FLAT_WD, "head": {"proj_dim": 256},
                         "teacher": {"momentum": 0.99, "final_momentum": 1.0}}),
    MethodSpec("simsiam", "siamese", TWO_VIEW, ("projector", "predictor"), False, "simsiam",
               defaults={"loader": _SIMCLR_VIEWS, "optim": _FLAT_WD, "head": {"proj_dim": 2048}}),
    MethodSpec("swav", "swav", MULTI_CROP, ("projector", "prototypes"), False, "swav", batch_stats=True,
               defaults={"loader": _SWAV_VIEWS,
                         "optim": {**_FLAT_WD, "freeze_last_layer_epochs": 1.0}, "head": {"proj_dim": 128}}),
    MethodSpec("vicreg", "siamese", TWO_VIEW, ("projector",), False, "vicreg", batch_stats=True,
               defaults={"loader": _BYOL_VIEWS, "optim": _FLAT_WD, "head": {"proj_dim": 2048}}),
    MethodSpec("barlow_twins", "siamese", TWO_VIEW, ("projector",), False, "barlow_twins", batch_stats=True,
               defaults={"loader": _BYOL_VIEWS, "optim": _FLAT_WD, "head": {"proj_dim": 2048}}),
    MethodSpec("mae", "mae", ONE_VIEW, ("decoder",), False, "mae", needs_vit=True,
               defaults={"loader": _MAE_VIEWS, "optim": {**_FLAT_WD, "weight_decay": 0.05,
                                                         "weight_decay_end": 0.05}}),
]
METHODS: dict[str, MethodSpec] = {s.name: s for s in _SPECS}


def get_method(name: str) -> MethodSpec:
    """The spec of ``name``; ``KeyError`` lists the known methods."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(METHODS)}") from None


__all__ = ["MethodSpec", "METHODS", "MethodName", "get_method", "MULTI_CROP", "TWO_VIEW", "ONE_VIEW"]
