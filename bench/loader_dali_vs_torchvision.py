"""Loader throughput: DALI views (webcurate) vs torchvision/PIL DataLoader, same shards, same cores.

Two presets, both by default, each measuring both loaders on the same WebDataset
shards of CIFAR-10 train photos with the same worker budget (DALI: ``num_threads``
CPU threads; torchvision: the same number of DataLoader worker processes):

- ``dinov2``: DINOv2 multi-crop batches of 64 (2 x 224 global + 8 x 96 local crops,
  flip, colour jitter, grayscale, blur, solarize, normalisation, iBOT masks) from
  2000 photos upscaled to 256 px (JPEG q90);
- ``cifar32``: the SimCLR two-view recipe at 32 px (CPU training on CIFAR-size
  images), batches of 256 from 10000 photos stored at 32 px.

    .venv/bin/python bench/loader_dali_vs_torchvision.py                   # both presets
    .venv/bin/python bench/loader_dali_vs_torchvision.py --preset dinov2   # one
    .venv/bin/python bench/loader_dali_vs_torchvision.py --quick           # 512 / 2560 images
    .venv/bin/python bench/loader_dali_vs_torchvision.py --device gpu --skip-torchvision  # DALI mixed on a GPU

Prints img/s and CPU-ms per image of both and the ratios; the first batch of each
(pipeline start, worker start) is excluded from the rate. ``uptime``'s load is
printed before and after: figures under load are not idle figures.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CIFAR = os.path.join(HERE, "..", "..", "shared", "data", "cifar10.tar.gz")


def make_shards(root: str, n: int, size: int, shard_size: int) -> list[str]:
    """The first ``n`` CIFAR-10 train images, upscaled to ``size`` px, as a webcurate dataset."""
    from PIL import Image

    from webcurate.shards import layout, manifest
    from webcurate.shards.writer import ShardWriter

    if os.path.exists(os.path.join(root, "_manifest.json")):
        m = manifest.load(root)
        p = (m or {}).get("parameters", {})
        if p.get("n") == n and p.get("size") == size and p.get("shard_size") == shard_size:
            return [layout.shard_uri(root, s) for s in m["completed_shards"]]
    if not os.path.exists(CIFAR):
        sys.exit(f"missing {CIFAR}: the benchmark reads CIFAR-10 from ../shared/data")
    images = []
    with tarfile.open(CIFAR) as tf:
        for m in tf:
            if m.isfile() and m.name.startswith("train/") and m.name.endswith(".jpg"):
                images.append((m.name, tf.extractfile(m).read()))
                if len(images) >= 4 * n:  # the archive is class-sorted: take a spread
                    break
    images = images[:: max(1, len(images) // n)][:n]
    num_shards = (len(images) + shard_size - 1) // shard_size
    manifest.save(root, manifest.new("bench", {"n": n, "size": size, "shard_size": shard_size}, None, num_shards))
    for s in range(num_shards):
        w = ShardWriter(root, s)
        for name, data in images[s * shard_size:(s + 1) * shard_size]:
            im = Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.BICUBIC)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=90)
            key = name.replace("/", "_").replace(".jpg", "")
            w.add(key, buf.getvalue(), "jpg", {"source": name, "label": name.split("/")[1], "width": size,
                                              "height": size})
        manifest.record_shard(root, s, w.commit())
    return [layout.shard_uri(root, s) for s in range(num_shards)]


def measure(batches, label: str) -> dict:
    """Time an iterator of batches; the first batch (start-up) is reported apart."""
    cpu0 = os.times()
    t0 = time.perf_counter()
    first = None
    n_img = 0
    count = 0
    for b in batches:
        count += 1
        if first is None:
            first = time.perf_counter() - t0
            t1 = time.perf_counter()
            continue
        n_img += b["n_images"]
        print(f"\r{label}: {count} batches", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    steady = time.perf_counter() - t1
    del batches  # let DataLoader workers exit so their CPU time is counted
    import gc

    gc.collect()
    time.sleep(0.5)
    cpu1 = os.times()
    # CPU seconds of this process and its (finished) worker processes, start-up included:
    # a load-independent cost measure when the machine is shared.
    cpu = sum(cpu1[:4]) - sum(cpu0[:4])
    total_img = n_img + (b["n_images"] if count else 0)
    return {"startup_s": first, "images": n_img, "seconds": steady, "img_per_s": n_img / steady if steady else 0.0,
            "batches": count, "cpu_ms_per_img": 1000 * cpu / max(total_img, 1)}


PRESETS = {
    # name: (images, stored px, loader overrides, quick images)
    "dinov2": (2000, 256, {"recipe": "dinov2", "batch_size": 64}, 512),
    "cifar32": (10000, 32, {"recipe": "simclr", "global_size": 32, "patch_size": 8, "batch_size": 256}, 2560),
}


def load_average() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def run_preset(name: str, args) -> None:
    from webcurate.train.data.config import LoaderConfig
    from webcurate.train.data.loader import make_loader
    from webcurate.train.data.torchvision_baseline import make_torchvision_loader

    n, size, overrides, quick = PRESETS[name]
    n = quick if args.quick else (args.images or n)
    # 8 equal shards: the torchvision workers split by shard, so every worker gets the same share.
    shards = make_shards(os.path.join(args.workdir, f"cifar{n}_{size}"), n, size, shard_size=-(-n // 8))
    cfg = LoaderConfig(**{**overrides, "num_threads": args.threads, "device": args.device,
                          "interpolation": args.interpolation, "cache_dir": os.path.join(args.workdir, "idx-cache")})
    print(f"[{name}] {n} images of {size}px in {len(shards)} shards; batch {cfg.batch_size}; recipe {cfg.recipe}: "
          f"{cfg.global_size}x{cfg.n_global} + {cfg.local_size}x{cfg.n_local} crops; {args.threads} threads/workers; "
          f"{os.cpu_count()} CPUs visible; interpolation {cfg.interpolation}; {load_average()}")
    dali = measure(make_loader(shards, cfg, seed=0), f"dali-{args.device}")
    print(f"[{name}] DALI ({args.device})        : {dali['img_per_s']:7.1f} img/s  "
          f"({dali['images']} images in {dali['seconds']:.1f} s; start-up {dali['startup_s']:.1f} s); "
          f"{dali['cpu_ms_per_img']:.1f} CPU-ms/img")
    if args.skip_torchvision:
        return
    tv = measure(make_torchvision_loader(shards, cfg, num_workers=args.threads, seed=0), "torchvision")
    print(f"[{name}] torchvision + PIL  : {tv['img_per_s']:7.1f} img/s  "
          f"({tv['images']} images in {tv['seconds']:.1f} s; start-up {tv['startup_s']:.1f} s); "
          f"{tv['cpu_ms_per_img']:.1f} CPU-ms/img")
    print(f"[{name}] ratio DALI / torchvision: {dali['img_per_s'] / max(tv['img_per_s'], 1e-9):.2f}x img/s, "
          f"{tv['cpu_ms_per_img'] / max(dali['cpu_ms_per_img'], 1e-9):.2f}x less CPU per image; {load_average()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["both", *PRESETS], default="both")
    ap.add_argument("--images", type=int, default=0, help="images in the shards (default: the preset's)")
    ap.add_argument("--quick", action="store_true", help="fewer images (about a minute in all)")
    ap.add_argument("--threads", type=int, default=2, help="DALI threads = torchvision workers (default 2)")
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="DALI decoding device")
    ap.add_argument("--interpolation", choices=["bicubic", "bilinear"], default="bicubic")
    ap.add_argument("--skip-torchvision", action="store_true", help="measure DALI only")
    ap.add_argument("--workdir", default=os.path.join(HERE, "_work", "loader"))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)  # the main process only copies/collates; workers do the work
    for name in (PRESETS if args.preset == "both" else [args.preset]):
        run_preset(name, args)


if __name__ == "__main__":
    main()
