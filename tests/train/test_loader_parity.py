"""The DALI loader and the torchvision/PIL baseline produce the same kind of batches."""
from __future__ import annotations

from pathlib import Path

import torch

from helpers import load_helper
from webcurate.train.data.config import LoaderConfig
from webcurate.train.data.loader import make_loader
from webcurate.train.data.torchvision_baseline import make_torchvision_loader


H = load_helper(Path(__file__).with_name("loader_data.py"))


def _stats(batches: list[dict], key: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.cat([b[key] for b in batches])
    return x.mean((0, 2, 3)), x.std((0, 2, 3))


def test_dali_and_torchvision_crops_agree_in_shape_and_statistics(tmp_path):
    samples = [(f"p{i:03d}", H.jpeg_bytes(H.make_photo(i, (150 + 5 * i, 110 + 2 * i))), None) for i in range(48)]
    shards = H.write_dataset(str(tmp_path / "ds"), samples, shard_size=16)
    cfg = LoaderConfig(global_size=64, local_size=32, n_local=2, patch_size=8, batch_size=8, device="cpu",
                       cache_dir=str(tmp_path / "cache"))
    dali = list(make_loader(shards, cfg, seed=0))
    tv = list(make_torchvision_loader(shards, cfg, num_workers=0, seed=0))
    assert len(dali) == len(tv) == 6
    for d, t in zip(dali, tv):
        for k in ("global_crops", "local_crops", "masks"):
            assert d[k].shape == t[k].shape and d[k].dtype == t[k].dtype, k
        assert d["n_images"] == t["n_images"]
    for key in ("global_crops", "local_crops"):
        d_mean, d_std = _stats(dali, key)
        t_mean, t_std = _stats(tv, key)
        # Same images, same augmentation recipe: per-channel moments within sampling noise.
        assert (d_mean - t_mean).abs().max() < 0.2, (key, d_mean, t_mean)
        assert ((d_std / t_std) - 1).abs().max() < 0.2, (key, d_std, t_std)
