"""Colour jitter, grayscale and solarisation of the loader's crops, applied in torch on whole batches.

DALI's CPU colour kernels (``color_twist``, ``hsv``, ``coord_transform``) cost more
per image than decoding, resizing and blurring together, so the loader's DALI graph
stops at resize -> blur -> normalise, and the per-pixel colour step happens here,
fused with the copy of DALI's output into the batch tensor: one batched 3x3 matrix
multiply per crop (``torch.baddbmm`` over all B images), a clamp and, where a recipe
solarises, one masked select. On the GPU path the same code runs on CUDA tensors.

Colour jitter composes brightness ``b``, contrast ``c`` (blend with the crop's mean
grey, as torchvision's ``adjust_contrast``), saturation ``s`` (blend with the grey
image = scaling the YIQ chroma) and hue ``h`` (rotation of the YIQ chroma by ``h``
turns) into ``x -> M x + (1 - c) b * mean_grey``, clamped to [0, 255] once;
grayscale (after the jitter, as ``RandomGrayscale``) is saturation 0. Everything is
computed in the normalised space the crops arrive in (``(x - mean) / std``).

Differences from torchvision's ``ColorJitter``: a fixed order and one clamp instead
of a random order with a clamp after each step, hue as a YIQ rotation instead of an
HSV shift, and the blur (done in DALI) comes before the colour step instead of
after it (the two commute except at clamped pixels).

Draws come from a numpy generator the loader seeds by (seed, epoch, rank, batch),
so resumed runs see the same colours.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import LoaderConfig

# ITU-R 601 luma (torchvision's rgb_to_grayscale) and YIQ chroma rows made to sum to 0, so a grey
# pixel has no chroma and the inverse maps grey to grey exactly.
_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_INV = np.linalg.inv(_YIQ)
GREY = _YIQ[0]


def colour_matrices(brightness: np.ndarray, contrast: np.ndarray, saturation: np.ndarray,
                    hue_turns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(...) jitter factors -> (..., 3, 3) RGB matrix M and (...) grey-offset factor ``(1 - c) b``."""
    theta = -2 * np.pi * hue_turns  # the sign that turns hue the way torchvision's adjust_hue does
    cos, sin = np.cos(theta) * saturation, np.sin(theta) * saturation
    chroma = np.zeros(brightness.shape + (3, 3))
    chroma[..., 0, 0] = 1.0
    chroma[..., 1, 1], chroma[..., 1, 2] = cos, -sin
    chroma[..., 2, 1], chroma[..., 2, 2] = sin, cos
    m = _YIQ_INV @ chroma @ _YIQ * (brightness * contrast)[..., None, None]
    return m, (1.0 - contrast) * brightness


@dataclass
class PhotometricDraws:
    """One batch's colour and solarisation draws: ``matrix`` (B, n, 3, 3), ``grey_offset`` (B, n),
    ``solarize`` (B, n) bool, for the n = n_global + n_local crops."""

    matrix: np.ndarray
    grey_offset: np.ndarray
    solarize: np.ndarray


def colour_enabled(cfg: LoaderConfig) -> bool:
    """Whether the recipe jitters or greys any crop (MAE's does not: crops pass unchanged)."""
    return cfg.color_jitter_p > 0 or cfg.grayscale_p > 0


def draw_photometric(cfg: LoaderConfig, batch_size: int, rng: np.random.Generator) -> PhotometricDraws:
    """Colour jitter (probability ``color_jitter_p``, factors as torchvision's ``ColorJitter``),
    grayscale (``grayscale_p``) and solarisation (each crop's ``solarize_p``) of one batch."""
    crops = cfg.crops
    shape = (batch_size, len(crops))
    bj, cj, sj, hj = cfg.color_jitter
    jitter = rng.random(shape) < cfg.color_jitter_p
    brightness = np.where(jitter, rng.uniform(max(0.0, 1 - bj), 1 + bj, shape), 1.0)
    contrast = np.where(jitter, rng.uniform(max(0.0, 1 - cj), 1 + cj, shape), 1.0)
    saturation = np.where(jitter, rng.uniform(max(0.0, 1 - sj), 1 + sj, shape), 1.0)
    hue = np.where(jitter, rng.uniform(-hj, hj, shape), 0.0)  # a fraction of the colour circle
    gray = rng.random(shape) < cfg.grayscale_p
    saturation[gray] = 0.0
    matrix, grey_offset = colour_matrices(brightness, contrast, saturation, hue)
    solarize = rng.random(shape) < np.array([c.solarize_p for c in crops])[None, :]
    return PhotometricDraws(matrix, grey_offset, solarize)


class Photometric:
    """Applies one crop's draws while copying it into the batch (see the module docstring)."""

    def __init__(self, cfg: LoaderConfig, device):
        import torch

        f = dict(dtype=torch.float32, device=device)
        mean = torch.tensor([255.0 * m for m in cfg.mean], **f)
        std = torch.tensor([255.0 * s for s in cfg.std], **f)
        self.torch = torch
        self.device = device
        self.mean, self.std = mean, std
        # Per-channel Python scalars: clamp/where with scalars run ~6x faster than broadcast tensors.
        m255, s255 = [255.0 * m for m in cfg.mean], [255.0 * s for s in cfg.std]
        self.lo = [-m / s for m, s in zip(m255, s255)]  # raw 0 and 255 in normalised units
        self.hi = [(255.0 - m) / s for m, s in zip(m255, s255)]
        self.sol_threshold = [(float(cfg.solarize_threshold) - m) / s for m, s in zip(m255, s255)]
        self.sol_sum = [(255.0 - 2.0 * m) / s for m, s in zip(m255, s255)]  # x + normalised (255 - v)
        self.grey = torch.tensor(GREY, **f)
        self.colour = colour_enabled(cfg)
        self.solarize = [c.solarize_p > 0 for c in cfg.crops]

    def apply(self, src, out, draws: PhotometricDraws, crop: int) -> None:
        """Write crop ``crop`` of the batch: ``src`` (B, 3, S, S) normalised, from DALI, into ``out``
        (same shape), with colour and solarisation applied."""
        torch = self.torch
        B = src.shape[0]
        if self.colour:
            m = torch.as_tensor(draws.matrix[:, crop], dtype=torch.float32).to(self.device, non_blocking=True)
            off = torch.as_tensor(draws.grey_offset[:, crop], dtype=torch.float32).to(self.device, non_blocking=True)
            # In normalised units x = (v - mean) / std: M' = D^-1 M D and T' = D^-1 (M mean + T - mean),
            # T = offset * mean grey of the crop (raw), D = diag(std).
            raw_mean = src.mean(dim=(2, 3)) * self.std + self.mean  # (B, 3)
            t = (m @ self.mean) + (off * (raw_mean @ self.grey))[:, None] - self.mean  # (B, 3)
            m_n = m * self.std[None, None, :] / self.std[None, :, None]
            torch.baddbmm((t / self.std)[:, :, None], m_n, src.reshape(B, 3, -1), out=out.view(B, 3, -1))
            for ch in range(3):
                out[:, ch].clamp_(self.lo[ch], self.hi[ch])
        else:
            out.copy_(src)
        rows = np.flatnonzero(draws.solarize[:, crop]) if self.solarize[crop] else ()
        if len(rows):
            idx = torch.as_tensor(rows).to(self.device)
            sub = out.index_select(0, idx)
            for ch in range(3):
                v = sub[:, ch]
                torch.where(v >= self.sol_threshold[ch], self.sol_sum[ch] - v, v, out=v)
            out.index_copy_(0, idx, sub)


__all__ = ["PhotometricDraws", "Photometric", "draw_photometric", "colour_matrices", "colour_enabled", "GREY"]
