"""iBOT block masks: DINOv2's generator and the stratified batch masks of its collate."""
from __future__ import annotations

import numpy as np
import pytest

from webcurate.train.data.masking import BlockMaskGenerator, batch_masks


def _isolated(mask: np.ndarray) -> int:
    """Masked patches with no masked 4-neighbour (a block mask has few: only leftovers)."""
    p = np.pad(mask, 1)
    neighbours = p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
    return int((mask & ~neighbours).sum())


def test_generator_never_exceeds_target_and_builds_blocks():
    gen = BlockMaskGenerator(14)  # 224 / 16
    rng = np.random.default_rng(0)
    for target in (0, 4, 20, 50, 98):
        for _ in range(20):
            m = gen(target, rng)
            assert m.shape == (14, 14) and m.dtype == bool
            assert m.sum() <= target
            if target:
                # blocks: at least one block of >= 2 patches, at most a leftover patch or two alone
                assert m.sum() >= 2 and _isolated(m) <= 2
    # Blocks keep being added until close to the target.
    reached = [gen(60, rng).sum() for _ in range(50)]
    assert np.mean(reached) > 0.85 * 60


def test_batch_masks_are_stratified_over_the_ratio_range_with_half_the_crops_masked():
    rng = np.random.default_rng(1)
    n_crops, grid = 128, 14
    masks = batch_masks(n_crops, grid, rng, mask_probability=0.5, mask_ratio=(0.1, 0.5))
    assert masks.shape == (n_crops, grid * grid) and masks.dtype == bool
    ratios = masks.mean(1)
    masked = np.sort(ratios[ratios > 0])
    assert len(masked) == 64
    # Stratified: the i-th smallest ratio stays below the top of the i-th sub-interval.
    edges = np.linspace(0.1, 0.5, 65)
    assert np.all(masked <= edges[1:] + 1e-9)
    assert masked[0] < 0.15 and masked[-1] > 0.42  # the whole range is covered in one batch
    # Masked crops are shuffled over the batch, not the first half.
    assert 0 < (ratios[:64] > 0).sum() < 64


def test_batch_masks_follow_probability_and_seed():
    a = batch_masks(10, 8, np.random.default_rng(7), mask_probability=0.3)
    b = batch_masks(10, 8, np.random.default_rng(7), mask_probability=0.3)
    assert np.array_equal(a, b)
    assert (a.sum(1) > 0).sum() == 3  # int(10 * 0.3)
    assert not batch_masks(6, 8, np.random.default_rng(0), mask_probability=0.0).any()
    with pytest.raises(ValueError, match="mask_probability"):
        batch_masks(4, 8, np.random.default_rng(0), mask_probability=1.5)
