"""View recipes of the loader (``loader.recipe``): each method's distinctive augmentation, on real DALI.

Also the colour step's math against torchvision's functional transforms, and the recipe selector's
overrides and errors.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import load_helper
from webcurate.train.data.config import LoaderConfig
from webcurate.train.data.dali_pipeline import param_names, sample_params
from webcurate.train.data.loader import make_loader
from webcurate.train.data.photometric import Photometric, PhotometricDraws, colour_matrices, draw_photometric

H = load_helper(Path(__file__).with_name("loader_data.py"))
NO_COLOUR = {"color_jitter_p": 0.0, "grayscale_p": 0.0}


def cfg_for(tmp_path, recipe, **kw) -> LoaderConfig:
    base = dict(recipe=recipe, global_size=64, local_size=32, patch_size=8, batch_size=8, shuffle_buffer=16,
                num_threads=2, device="cpu", cache_dir=str(tmp_path / "idx-cache"))
    return LoaderConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def checker_shards(tmp_path_factory) -> list[str]:
    """16 sharp black/white 4-px checker photos: a blur shows as a drop of neighbour differences."""
    rng = np.random.default_rng(0)
    samples = []
    for i in range(16):
        cells = rng.integers(0, 2, (24, 24, 1), dtype=np.uint8) * 255
        img = np.repeat(np.repeat(np.repeat(cells, 4, 0), 4, 1), 3, 2)
        samples.append((f"c{i:02d}", H.jpeg_bytes(img, 98), None))
    return H.write_dataset(str(tmp_path_factory.mktemp("checker")), samples, shard_size=8)


@pytest.fixture(scope="module")
def flat_shards(tmp_path_factory) -> list[str]:
    """16 flat-colour photos: any colour change of a crop is the augmentation's."""
    samples = []
    for i in range(16):
        arr = np.zeros((80, 96, 3), np.uint8)
        arr[:] = (40 + 10 * i, 160, 220 - 8 * i)
        samples.append((f"f{i:02d}", H.jpeg_bytes(arr, 98), None))
    return H.write_dataset(str(tmp_path_factory.mktemp("flat")), samples, shard_size=8)


def sharpness(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, S, S) -> (N,) mean absolute horizontal neighbour difference."""
    return (x[..., 1:] - x[..., :-1]).abs().mean(dim=(1, 2, 3))


def test_byol_blurs_view_0_always_and_view_1_rarely_and_solarises_only_view_1(checker_shards, tmp_path):
    cfg = cfg_for(tmp_path, "byol", global_scale=(0.9, 1.0), blur_sigma=(1.5, 2.0), **NO_COLOUR)
    assert (cfg.n_global, cfg.n_local, cfg.blur_p, cfg.solarize_p) == (2, 0, (1.0, 0.1), (0.0, 0.2))
    # (solarising a black/white checker blanks it, so the pixels test the blur without it)
    batches = list(make_loader(checker_shards, dataclasses.replace(cfg, solarize_p=0.0), seed=0))
    B = cfg.batch_size
    v0 = torch.cat([sharpness(b["global_crops"][:B]) for b in batches])
    v1 = torch.cat([sharpness(b["global_crops"][B:]) for b in batches])
    sharp = float(v1.max())
    assert (v0 < 0.5 * sharp).all(), "view 0 of BYOL must always be blurred"
    assert (v1 > 0.5 * sharp).float().mean() >= 0.75  # p = 0.1
    assert batches[0]["local_crops"] is None and batches[0]["masks"] is None
    # The draws over many batches: solarisation only on view 1 at ~0.2, never on view 0.
    sol = np.concatenate([draw_photometric(cfg, 256, np.random.default_rng(s)).solarize for s in range(4)])
    assert not sol[:, 0].any() and 0.15 < sol[:, 1].mean() < 0.25


def test_simclr_has_no_blur_at_32_px_and_blurs_half_the_views_above(tmp_path):
    small = LoaderConfig(recipe="simclr", global_size=32, patch_size=8)
    assert small.blur_p == (0.0, 0.0) and small.color_jitter == (0.8, 0.8, 0.8, 0.2)
    assert (small.color_jitter_p, small.grayscale_p, small.global_scale) == (0.8, 0.2, (0.08, 1.0))
    big = LoaderConfig(recipe="simclr", global_size=96, patch_size=8)
    assert big.blur_p == (0.5, 0.5) and big.blur_kernel_size == 11  # 10 % of the side, odd
    p = sample_params(big, 512, np.random.default_rng(0))
    blurred = p["kernel"][..., big.blur_kernel_size // 2] < 1.0  # an impulse kernel is no blur
    assert 0.45 < blurred.mean() < 0.55
    assert "kernel" not in param_names(small)  # no blur anywhere: the graph has no blur stage


def test_mae_gives_one_unjittered_view_and_exact_75_percent_random_masks(flat_shards, tmp_path):
    cfg = cfg_for(tmp_path, "mae", flip_p=0.5)
    b = next(iter(make_loader(flat_shards, cfg, seed=1)))
    B = cfg.batch_size
    assert b["global_crops"].shape == (B, 3, 64, 64) and b["local_crops"] is None
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    rgb = (b["global_crops"] * std + mean) * 255
    # flat images stay flat and keep their colour: no jitter, grayscale, blur or solarisation
    per_image = rgb.mean(dim=(2, 3))
    assert (rgb - per_image[..., None, None]).abs().max() < 3.0
    assert (per_image[:, 1] - 160).abs().max() < 3.0
    assert per_image[:, 0].std() > 10  # different photos, not one colour for all
    masks = b["masks"]
    assert masks.shape == (B, 64) and masks.dtype == torch.bool
    assert (masks.sum(1) == 64 - int(64 * 0.25)).all()
    assert not torch.equal(masks[0], masks[1])


def test_colour_jitter_changes_flat_crops_only_where_the_recipe_says(flat_shards, tmp_path):
    cfg = cfg_for(tmp_path, "moco_v2", blur_p=0.0)
    assert cfg.color_jitter == (0.4, 0.4, 0.4, 0.1) and cfg.global_scale == (0.2, 1.0)
    b = next(iter(make_loader(flat_shards, cfg, seed=2)))
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    rgb = (b["global_crops"] * std + mean) * 255
    B = cfg.batch_size
    # the two views of one image differ in colour (jitter p = 0.8 each), but stay flat
    diff = (rgb[:B].mean(dim=(2, 3)) - rgb[B:].mean(dim=(2, 3))).abs().max(dim=1).values
    assert (diff > 4).float().mean() >= 0.5
    assert (rgb - rgb.mean(dim=(2, 3), keepdim=True)).abs().max() < 3.0


def test_swav_and_dinov2_multi_crop_shapes(tmp_path, flat_shards):
    swav = cfg_for(tmp_path, "swav", local_size=16)
    assert (swav.n_global, swav.n_local, swav.local_scale, swav.blur_p_local) == (2, 6, (0.05, 0.14), 0.5)
    b = next(iter(make_loader(flat_shards, swav, seed=0)))
    assert b["global_crops"].shape == (16, 3, 64, 64) and b["local_crops"].shape == (48, 3, 16, 16)
    assert b["masks"] is None
    dino = cfg_for(tmp_path, "dinov2")
    assert (dino.n_global, dino.n_local, dino.blur_p, dino.blur_p_local, dino.masking) == (2, 8, (1.0, 0.1), 0.5,
                                                                                          "block")


# --- the colour step against torchvision's functional transforms ----------------------------------
def _apply(cfg, raw: torch.Tensor, b, c, s, h=0.0, solarize=False) -> torch.Tensor:
    """Our colour step on raw (N, 3, S, S) values in [0, 255]; returns raw values."""
    n = raw.shape[0]
    mean = torch.tensor([255 * m for m in cfg.mean]).view(1, 3, 1, 1)
    std = torch.tensor([255 * v for v in cfg.std]).view(1, 3, 1, 1)
    f = lambda v: np.full((n, 1), v, dtype=np.float64)  # noqa: E731
    m, off = colour_matrices(f(b), f(c), f(s), f(h))
    draws = PhotometricDraws(m, off, np.full((n, 1), solarize))
    out = torch.empty_like(raw)
    Photometric(cfg, torch.device("cpu")).apply((raw - mean) / std, out, draws, 0)
    return out * std + mean


def test_colour_step_equals_torchvision_brightness_contrast_saturation_and_grayscale():
    import torchvision.transforms.functional as TF

    cfg = LoaderConfig(recipe="byol", global_size=32, patch_size=8, solarize_p=(0.5, 0.5))
    g = torch.Generator().manual_seed(0)
    raw = 60 + 120 * torch.rand(4, 3, 16, 16, generator=g)  # mid-range: no clamping in either
    got = _apply(cfg, raw, b=1.2, c=0.7, s=1.3)
    want = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(raw / 255, 1.2), 0.7), 1.3) * 255
    assert (got - want).abs().max() < 0.05
    grey = _apply(cfg, raw, b=1.0, c=1.0, s=0.0)
    assert (grey - TF.rgb_to_grayscale(raw / 255, 3) * 255).abs().max() < 0.05
    bright = _apply(cfg, raw, b=1.8, c=1.0, s=1.0)  # clamped at 255 as torchvision does
    assert (bright - (raw * 1.8).clamp(max=255)).abs().max() < 0.05
    sol = _apply(cfg, raw, b=1.0, c=1.0, s=1.0, solarize=True)
    assert (sol - TF.solarize(raw / 255, 128 / 255) * 255).abs().max() < 0.05


def test_hue_rotation_keeps_grey_and_turns_colours_the_way_torchvision_does():
    import torchvision.transforms.functional as TF

    cfg = LoaderConfig(recipe="simclr", global_size=32, patch_size=8)
    grey = torch.full((1, 3, 4, 4), 100.0)
    assert (_apply(cfg, grey, 1.0, 1.0, 1.0, h=0.25) - grey).abs().max() < 0.05
    raw = 40 + 170 * torch.rand(64, 3, 1, 1, generator=torch.Generator().manual_seed(1))
    for h in (0.05, -0.1):
        # a YIQ rotation is not HSV's hue shift, but it turns the same way, closer than the opposite turn
        ours = _apply(cfg, raw, 1.0, 1.0, 1.0, h=h)
        same, opposite = (TF.adjust_hue(raw / 255, s * h) * 255 for s in (1, -1))
        assert (ours - same).abs().mean() < 0.6 * (ours - opposite).abs().mean()


# --- the selector ------------------------------------------------------------------------------------
def test_recipe_fields_are_defaults_that_config_values_override():
    cfg = LoaderConfig.from_dict({"recipe": "byol", "blur_p": [0.9, 0.3], "solarize_p": 0.0})
    assert cfg.blur_p == (0.9, 0.3) and cfg.solarize_p == (0.0, 0.0) and cfg.color_jitter == (0.4, 0.4, 0.2, 0.1)
    legacy = LoaderConfig.from_dict({"recipe": "dinov2", "blur_p_global1": 0.2, "solarize_p_global2": 0.0})
    assert legacy.blur_p == (0.2, 0.1) and legacy.solarize_p == (0.0, 0.0)
    assert LoaderConfig.from_dict(cfg.to_dict()) == cfg  # a dumped config reloads to the same
    with pytest.raises(ValueError, match="recipe must be one of"):
        LoaderConfig(recipe="simclr2")
    with pytest.raises(ValueError, match="blur_p needs one value per global view"):
        LoaderConfig(recipe="byol", blur_p=(1.0, 0.1, 0.5))
    with pytest.raises(ValueError, match=r"solarize_p\[1\] is a probability"):
        LoaderConfig(recipe="byol", solarize_p=(0.0, 2.0))


def test_two_view_recipe_resumes_exactly_with_its_colour_draws(tmp_path):
    samples = [(f"p{i:02d}", H.jpeg_bytes(H.make_photo(i, (90 + 3 * i, 80))), None) for i in range(24)]
    shards = H.write_dataset(str(tmp_path / "ds"), samples, shard_size=8)
    cfg = cfg_for(tmp_path, "byol", batch_size=4)
    full = list(make_loader(shards, cfg, seed=7, epoch=1))
    resumed = list(make_loader(shards, cfg, seed=7, epoch=1, skip_batches=3))
    assert len(full) == 6 and len(resumed) == 3
    for a, b in zip(full[3:], resumed):
        assert torch.equal(a["global_crops"], b["global_crops"])
    assert not torch.equal(full[3]["global_crops"], full[4]["global_crops"])
