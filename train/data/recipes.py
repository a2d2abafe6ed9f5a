"""Published view recipes of the SSL methods, as defaults of ``LoaderConfig`` (``loader.recipe``).

A recipe fills every augmentation field the user leaves unset; any field set in
the config (YAML ``loader:`` or ``loader.<field>=`` on the CLI) overrides it.
Per-view fields (``blur_p``, ``solarize_p``) hold one value per global view
(a single number applies to all).

========  ======  =====  ===========  ===================  ==========  ========  ===============  =========
recipe    global  local  scale g / l  jitter (b, c, s, h)  jitter p    gray p    blur p g / local solarize p
========  ======  =====  ===========  ===================  ==========  ========  ===============  =========
dinov2    2       8      .32-1/.05-.32 (.4, .4, .2, .1)    0.8         0.2       1.0, 0.1 / 0.5   0, 0.2
simclr    2       0      .08-1         (.8, .8, .8, .2)    0.8         0.2       0.5, 0.5 (0 at <= 32 px)  0
byol      2       0      .08-1         (.4, .4, .2, .1)    0.8         0.2       1.0, 0.1         0, 0.2
moco_v2   2       0      .2-1          (.4, .4, .4, .1)    0.8         0.2       0.5, 0.5         0
swav      2       6      .14-1/.05-.14 (.8, .8, .8, .2)    0.8         0.2       0.5 / 0.5        0
mae       1       0      .2-1          -                   0           0         0                0
========  ======  =====  ===========  ===================  ==========  ========  ===============  =========

Sources: DINOv2 ``DataAugmentationDINO``; SimCLR appendix A (colour strength 1.0:
ColorJitter(0.8, 0.8, 0.8, 0.2), blur kernel 10 % of the side, no blur on CIFAR's
32 px); BYOL table 6 (kernel 23 at 224 px); MoCo v2 ``moco/main_moco.py --aug-plus``;
SwAV ``src/multicropdataset.py`` (blur on every crop); MAE ``main_pretrain.py``
(RandomResizedCrop(0.2, 1) + flip only, 75 % random patch masking).
Masks: ``block`` (iBOT masks of DINOv2), ``random`` (MAE), ``none`` (the batch has no masks).
Blur kernels follow each recipe's code: 9 (DINOv2), 10 % of the crop side (SimCLR),
23 scaled to the crop side (BYOL), 0 = sized from sigma (MoCo v2, SwAV: PIL's radius blur).
"""
from __future__ import annotations

from typing import Any

RECIPES = ("dinov2", "simclr", "byol", "moco_v2", "swav", "mae")

_COLOUR_DINO = {"color_jitter": (0.4, 0.4, 0.2, 0.1), "color_jitter_p": 0.8, "grayscale_p": 0.2}
_COLOUR_STRONG = {"color_jitter": (0.8, 0.8, 0.8, 0.2), "color_jitter_p": 0.8, "grayscale_p": 0.2}
_TWO_VIEWS = {"n_global": 2, "n_local": 0, "local_scale": (0.05, 0.32), "blur_p_local": 0.0, "masking": "none"}


def _odd(x: float) -> int:
    k = max(3, int(round(x)))
    return k if k % 2 else k + 1


def recipe_defaults(recipe: str, global_size: int) -> dict[str, Any]:
    """The LoaderConfig values of ``recipe`` for crops of ``global_size`` px."""
    if recipe == "dinov2":
        return {"n_global": 2, "n_local": 8, "global_scale": (0.32, 1.0), "local_scale": (0.05, 0.32),
                **_COLOUR_DINO, "blur_p": (1.0, 0.1), "blur_p_local": 0.5, "blur_kernel_size": 9,
                "solarize_p": (0.0, 0.2), "masking": "block"}
    if recipe == "simclr":
        blur = 0.0 if global_size <= 32 else 0.5  # SimCLR's CIFAR recipe has no blur
        return {**_TWO_VIEWS, "global_scale": (0.08, 1.0), **_COLOUR_STRONG, "blur_p": (blur, blur),
                "blur_kernel_size": _odd(0.1 * global_size), "solarize_p": (0.0, 0.0)}
    if recipe == "byol":
        return {**_TWO_VIEWS, "global_scale": (0.08, 1.0), **_COLOUR_DINO, "blur_p": (1.0, 0.1),
                "blur_kernel_size": _odd(23 * global_size / 224), "solarize_p": (0.0, 0.2)}
    if recipe == "moco_v2":
        return {**_TWO_VIEWS, "global_scale": (0.2, 1.0), "color_jitter": (0.4, 0.4, 0.4, 0.1),
                "color_jitter_p": 0.8, "grayscale_p": 0.2, "blur_p": (0.5, 0.5), "blur_kernel_size": 0,
                "solarize_p": (0.0, 0.0)}
    if recipe == "swav":
        return {"n_global": 2, "n_local": 6, "global_scale": (0.14, 1.0), "local_scale": (0.05, 0.14),
                **_COLOUR_STRONG, "blur_p": (0.5, 0.5), "blur_p_local": 0.5, "blur_kernel_size": 0,
                "solarize_p": (0.0, 0.0), "masking": "none"}
    if recipe == "mae":
        return {"n_global": 1, "n_local": 0, "global_scale": (0.2, 1.0), "local_scale": (0.05, 0.32),
                "color_jitter": (0.0, 0.0, 0.0, 0.0), "color_jitter_p": 0.0, "grayscale_p": 0.0,
                "blur_p": (0.0,), "blur_p_local": 0.0, "blur_kernel_size": 0, "solarize_p": (0.0,),
                "masking": "random"}
    raise ValueError(f"LoaderConfig.recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")


__all__ = ["RECIPES", "recipe_defaults"]
