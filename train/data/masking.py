"""iBOT block masks for the global crops of a batch, as DINOv2's collate makes them.

DINOv2 (``dinov2/data/masking.py`` + ``collate_data_and_cast``):

- each mask is built from random rectangles ("blocks") of at least
  ``min_num_patches`` patches with log-uniform aspect in [min_aspect, 1/min_aspect],
  added until the target count is reached (a block adds at most the remaining count);
- of the ``N`` global crops in a batch, ``int(N * mask_probability)`` are masked; their
  target ratios are *stratified*: crop ``i`` draws its ratio uniformly from the
  ``i``-th of equal sub-intervals of ``mask_ratio``, so one batch always spans the
  whole range; the rest get empty masks, and the list is shuffled.

Randomness comes from a ``numpy.random.Generator`` the caller seeds, so masks are
a pure function of (seed, epoch, rank, batch index) and a resumed run sees the
same masks.
"""
from __future__ import annotations

import math

import numpy as np


class BlockMaskGenerator:
    """Rectangular block masks on a ``height x width`` patch grid (DINOv2's MaskingGenerator)."""

    def __init__(
        self,
        height: int,
        width: int | None = None,
        *,
        min_num_patches: int = 4,
        max_num_patches: float | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        self.height = int(height)
        self.width = int(width if width is not None else height)
        self.num_patches = self.height * self.width
        self.min_num_patches = min_num_patches
        # DINOv2 caps one mask at half the grid by default.
        self.max_num_patches = 0.5 * self.num_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1.0 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def _add_block(self, mask: np.ndarray, max_mask_patches: float, rng: np.random.Generator) -> int:
        """Try up to 10 blocks; set the first that adds new patches. Returns patches added."""
        for _ in range(10):
            # like Python's random.uniform, also valid when max < min (small budgets)
            target_area = self.min_num_patches + (max_mask_patches - self.min_num_patches) * rng.random()
            aspect = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if w < self.width and h < self.height:
                top = int(rng.integers(0, self.height - h + 1))
                left = int(rng.integers(0, self.width - w + 1))
                block = mask[top:top + h, left:left + w]
                new = h * w - int(block.sum())
                if 0 < new <= max_mask_patches:
                    block[...] = True
                    return new
        return 0

    def __call__(self, num_masking_patches: int, rng: np.random.Generator) -> np.ndarray:
        """A bool mask (height, width) with about ``num_masking_patches`` True (never more)."""
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            budget = min(num_masking_patches - count, self.max_num_patches)
            delta = self._add_block(mask, budget, rng)
            if delta == 0:
                break
            count += delta
        return mask


def batch_masks(
    n_crops: int,
    grid: int,
    rng: np.random.Generator,
    *,
    mask_probability: float = 0.5,
    mask_ratio: tuple[float, float] = (0.1, 0.5),
    min_num_patches: int = 4,
    min_aspect: float = 0.3,
) -> np.ndarray:
    """Stratified iBOT masks for ``n_crops`` global crops on a ``grid x grid`` patch grid.

    Returns bool array (n_crops, grid*grid); ``int(n_crops * mask_probability)`` rows
    are masked, row ``i`` of those with a ratio drawn from the ``i``-th of equal
    sub-intervals of ``mask_ratio``; rows are shuffled.
    """
    if not 0.0 <= mask_probability <= 1.0:
        raise ValueError(f"mask_probability must be in [0, 1], got {mask_probability}")
    n_tokens = grid * grid
    gen = BlockMaskGenerator(grid, min_num_patches=min_num_patches, min_aspect=min_aspect)
    n_masked = int(n_crops * mask_probability)
    edges = np.linspace(mask_ratio[0], mask_ratio[1], n_masked + 1)
    masks = np.zeros((n_crops, n_tokens), dtype=bool)
    for i in range(n_masked):
        target = int(n_tokens * rng.uniform(edges[i], edges[i + 1]))
        masks[i] = gen(target, rng).reshape(-1)
    return masks[rng.permutation(n_crops)]


def random_masks(n_views: int, n_tokens: int, mask_ratio: float, rng: np.random.Generator) -> np.ndarray:
    """MAE's per-patch random masks: bool (n_views, n_tokens), each row with exactly
    ``n_tokens - int(n_tokens * (1 - mask_ratio))`` True (the count ``random_masking`` removes)."""
    keep = int(n_tokens * (1 - mask_ratio))
    order = np.argsort(rng.random((n_views, n_tokens)), axis=1)
    masks = np.ones((n_views, n_tokens), dtype=bool)
    np.put_along_axis(masks, order[:, :keep], False, axis=1)
    return masks
