"""The same DINOv2 multi-crop with torchvision/PIL in a torch DataLoader (baseline only).

This is DINOv2's ``DataAugmentationDINO`` written with stock torchvision
transforms over the same WebDataset shards, read with the ``webdataset``
library. It exists as the benchmark baseline for the DALI loader and as its
parity reference (same crop sizes, scales, probabilities and normalisation);
training uses :func:`webcurate.train.data.loader.make_loader`.

Local shard paths only (the baseline reads files, not ``s3://``).
"""
from __future__ import annotations

import random
from typing import Iterator

import numpy as np
import torch

from .config import LoaderConfig
from .dali_pipeline import DECODABLE_EXTS
from .masking import batch_masks


class MultiCropTransform:
    """PIL image -> list of ``2 + n_local`` normalised crops, as DINOv2's DataAugmentationDINO.

    Global crop 1: blur with ``blur_probabilities[0]``; global crop 2: blur with
    ``[1]`` and solarise with ``solarize_p_global2``; local crops: blur with ``[2]``.
    """

    def __init__(self, cfg: LoaderConfig):
        from torchvision import transforms as T

        interp = T.InterpolationMode.BICUBIC if cfg.interpolation == "bicubic" else T.InterpolationMode.BILINEAR
        b, c, s, h = cfg.color_jitter
        color = T.Compose([
            T.RandomHorizontalFlip(p=cfg.flip_p),
            T.RandomApply([T.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h)], p=cfg.color_jitter_p),
            T.RandomGrayscale(p=cfg.grayscale_p),
        ])
        normalize = T.Compose([T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])
        p_g1, p_g2, p_local = cfg.blur_probabilities

        def blur(p: float):
            # DINOv2's GaussianBlur: kernel 9, sigma ~ U(0.1, 2.0), applied with probability p
            return T.RandomApply([T.GaussianBlur(kernel_size=cfg.blur_kernel_size or 9, sigma=cfg.blur_sigma)], p=p)

        self.global1 = T.Compose([
            T.RandomResizedCrop(cfg.global_size, scale=cfg.global_scale, interpolation=interp),
            color, blur(p_g1), normalize,
        ])
        self.global2 = T.Compose([
            T.RandomResizedCrop(cfg.global_size, scale=cfg.global_scale, interpolation=interp),
            color, blur(p_g2), T.RandomSolarize(threshold=cfg.solarize_threshold, p=cfg.solarize_p_global2),
            normalize,
        ])
        self.local = T.Compose([
            T.RandomResizedCrop(cfg.local_size, scale=cfg.local_scale, interpolation=interp),
            color, blur(p_local), normalize,
        ])
        self.n_local = cfg.n_local

    def __call__(self, image) -> list[torch.Tensor]:
        """(PIL RGB image) -> [global1 (3, G, G), global2, local_1 (3, L, L), ...]."""
        return [self.global1(image), self.global2(image)] + [self.local(image) for _ in range(self.n_local)]


class _Collate:
    """Stack per-image crop lists crop-major and add iBOT masks (picklable for workers)."""

    def __init__(self, cfg: LoaderConfig, seed: int):
        self.cfg = cfg
        self.rng = np.random.default_rng(seed)

    def __call__(self, samples: list[list[torch.Tensor]]) -> dict:
        cfg = self.cfg
        n_local = len(samples[0]) - 2
        global_crops = torch.stack([s[i] for i in range(2) for s in samples])
        if n_local:
            local_crops = torch.stack([s[i] for i in range(2, 2 + n_local) for s in samples])
        else:
            local_crops = torch.empty((0, 3, cfg.local_size, cfg.local_size))
        masks = batch_masks(len(global_crops), cfg.global_size // cfg.patch_size, self.rng,
                            mask_probability=cfg.mask_probability, mask_ratio=cfg.mask_ratio,
                            min_num_patches=cfg.mask_min_patches, min_aspect=cfg.mask_min_aspect)
        return {"global_crops": global_crops, "local_crops": local_crops,
                "masks": torch.from_numpy(masks), "n_images": len(samples)}


def make_torchvision_loader(shard_paths: list[str], cfg: LoaderConfig, *, num_workers: int | None = None,
                            seed: int = 0, epoch: int = 0) -> Iterator[dict]:
    """A torch DataLoader yielding the same batch dicts as ``make_loader`` (one pass over the shards).

    ``num_workers`` defaults to ``cfg.num_threads`` (worker processes decode and
    augment; the main process only collates). Batches are full (``batch_size``
    images); shards are split over workers.
    """
    import webdataset as wds

    for p in shard_paths:
        if p.startswith("s3://"):
            raise ValueError(f"the torchvision baseline reads local shards only, got {p}")
    workers = cfg.num_threads if num_workers is None else num_workers
    transform = MultiCropTransform(cfg)
    image_keys = ";".join(DECODABLE_EXTS)
    random.seed(seed * 1000 + epoch)
    torch.manual_seed(seed * 1000 + epoch)
    shards = list(shard_paths)
    random.Random(seed * 1000 + epoch).shuffle(shards)
    dataset = (
        wds.WebDataset(shards, shardshuffle=False, nodesplitter=None, workersplitter=wds.split_by_worker,
                       handler=wds.warn_and_continue, empty_check=False)
        .shuffle(min(cfg.shuffle_buffer, 1000), rng=random.Random(seed + epoch))
        .decode("pil", handler=wds.warn_and_continue)
        .to_tuple(image_keys, handler=wds.warn_and_continue)
        .map(lambda t: transform(t[0].convert("RGB")))
    )
    if workers > len(shards):
        workers = len(shards)  # webdataset splits by shard: extra workers would idle
    return iter(torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, num_workers=workers, drop_last=True,
        collate_fn=_Collate(cfg, seed * 1000 + epoch), persistent_workers=False,
        prefetch_factor=cfg.prefetch if workers else None,
    ))


__all__ = ["MultiCropTransform", "make_torchvision_loader"]
