"""The same view recipes with torchvision/PIL in a torch DataLoader (baseline only).

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


class MultiCropTransform:
    """PIL image -> list of ``n_global + n_local`` normalised crops, as DINOv2's DataAugmentationDINO.

    Each crop of ``cfg.crops`` gets its recipe's blur and solarisation probabilities.
    """

    def __init__(self, cfg: LoaderConfig):
        from torchvision import transforms as T

        from .dali_pipeline import blur_window

        interp = T.InterpolationMode.BICUBIC if cfg.interpolation == "bicubic" else T.InterpolationMode.BILINEAR
        b, c, s, h = cfg.color_jitter
        color = T.Compose([
            T.RandomHorizontalFlip(p=cfg.flip_p),
            T.RandomApply([T.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h)], p=cfg.color_jitter_p),
            T.RandomGrayscale(p=cfg.grayscale_p),
        ])
        normalize = T.Compose([T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])
        window = blur_window(cfg)

        def crop_transform(spec):
            steps = [T.RandomResizedCrop(spec.size, scale=spec.scale, interpolation=interp), color]
            if spec.blur_p > 0:  # DINOv2's GaussianBlur: sigma ~ U(0.1, 2.0), applied with probability p
                steps.append(T.RandomApply([T.GaussianBlur(kernel_size=window, sigma=cfg.blur_sigma)], p=spec.blur_p))
            if spec.solarize_p > 0:
                steps.append(T.RandomSolarize(threshold=cfg.solarize_threshold, p=spec.solarize_p))
            return T.Compose(steps + [normalize])

        self.crops = [crop_transform(spec) for spec in cfg.crops]
        self.n_global = cfg.n_global

    def __call__(self, image) -> list[torch.Tensor]:
        """(PIL RGB image) -> [global_1 (3, G, G), ..., local_1 (3, L, L), ...]."""
        return [t(image) for t in self.crops]


class _Collate:
    """Stack per-image crop lists crop-major and add iBOT masks (picklable for workers)."""

    def __init__(self, cfg: LoaderConfig, seed: int):
        self.cfg = cfg
        self.rng = np.random.default_rng(seed)

    def __call__(self, samples: list[list[torch.Tensor]]) -> dict:
        from .loader import view_masks

        cfg = self.cfg
        V = cfg.n_global
        n_local = len(samples[0]) - V
        global_crops = torch.stack([s[i] for i in range(V) for s in samples])
        local_crops = torch.stack([s[i] for i in range(V, V + n_local) for s in samples]) if n_local else None
        return {"global_crops": global_crops, "local_crops": local_crops,
                "masks": view_masks(cfg, len(global_crops), self.rng), "n_images": len(samples)}


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
