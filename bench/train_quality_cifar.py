"""Quality for a fixed CPU budget: DINOv2-recipe pretraining of a tiny ViT on CIFAR-10, then k-NN.

1. CIFAR-10 (../shared/data/cifar10.tar.gz) is extracted and sharded with
   ``webcurate.shards.ingest.ingest_folder`` (train: 50k, test: 10k), cached in bench/_work.
2. ``webcurate.train.loop.train`` pretrains docs/examples/train_cifar_tiny.yaml on the train
   split WITHOUT labels for about ``--budget-min`` minutes of training: a short calibration
   measures seconds per step, and the schedules (lr/wd/momentum/teacher temp, in epochs)
   are sized to the number of steps that fit, so warm-ups and decays complete in the run.
3. k-NN (k=20, T=0.07, cosine; ``webcurate.train.evaluate.knn_eval``) on the test split,
   using CLS features of: the trained teacher backbone, the same backbone at its random
   initialisation (the very weights training started from), and raw pixels.

    .venv/bin/python bench/train_quality_cifar.py [--budget-min 10] [--quick] [section.key=value ...]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import time

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CIFAR = os.path.join(ROOT, "..", "shared", "data", "cifar10.tar.gz")


def extract(workdir: str) -> str:
    dst = os.path.join(workdir, "cifar10")
    if os.path.isdir(os.path.join(dst, "test")) and os.path.isdir(os.path.join(dst, "train")):
        return dst
    os.makedirs(dst, exist_ok=True)
    with tarfile.open(CIFAR) as tf:
        tf.extractall(dst, filter="data")
    # The archive may hold a top folder: find the one with train/ and test/.
    for dirpath, dirnames, _ in os.walk(dst):
        if "train" in dirnames and "test" in dirnames:
            return dirpath
    raise SystemExit(f"{CIFAR} has no train/ and test/ folders")


def subset_tree(src: str, dst: str, per_class: int) -> str:
    """A smaller ImageFolder tree of hard links (for --quick)."""
    if os.path.isdir(dst):
        return dst
    for cls in sorted(os.listdir(src)):
        os.makedirs(os.path.join(dst, cls), exist_ok=True)
        for name in sorted(os.listdir(os.path.join(src, cls)))[:per_class]:
            os.link(os.path.join(src, cls, name), os.path.join(dst, cls, name))
    return dst


def shard(src: str, dst: str) -> str:
    from webcurate.shards.dataset import Dataset
    from webcurate.shards.ingest import ingest_folder

    if not (os.path.exists(os.path.join(dst, "_manifest.json")) and Dataset(dst).completed_shards()):
        ingest_folder(src, dst, labels_from_dirs=True, shard_size=5000, summary=False)
    return dst


def seconds_per_step(cfg, threads: int) -> float:
    """Median wall time of a TrainStep at the config's shapes (compute only)."""
    from webcurate.train.loop import build_models
    from webcurate.train.optim import build_optimizer, param_groups
    from webcurate.train.schedules import Schedules
    from webcurate.train.step import TrainStep

    sys.path.insert(0, HERE)
    from train_step_overhead import make_batch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    s, t, dl, il = build_models(cfg, torch.device("cpu"))
    opt = build_optimizer(param_groups(s.submodules(), cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult))
    step = TrainStep(cfg, s, s, t, opt, dl, il, torch.device("cpu"))
    sched = Schedules.from_config(cfg, 100)
    batch = make_batch(cfg, 0)
    times = []
    for i in range(6):
        t0 = time.perf_counter()
        step(batch, sched.at(10 + i))
        times.append(time.perf_counter() - t0)
    return sorted(times[2:])[len(times[2:]) // 2]


def features(dataset: str, model: nn.Module, desc: str):
    from webcurate.train.evaluate import encode_labels, extract_features  # noqa: F401

    _, f, labels = extract_features(dataset, model, image_size=32, batch_size=256, device="cpu",
                                    num_threads=2, desc=desc)
    return f, labels


def knn(model: nn.Module, train_ds: str, test_ds: str, name: str) -> float:
    from webcurate.train.evaluate import encode_labels, knn_eval

    ftr, ltr = features(train_ds, model, f"{name}: train")
    fte, lte = features(test_ds, model, f"{name}: test")
    ytr, yte, classes = encode_labels(ltr, lte)
    return knn_eval(ftr, ytr, fte, yte, k=20, T=0.07, num_classes=len(classes))


class RawPixels(nn.Module):
    """(B, 3, 32, 32) normalised images -> (B, 3072) features."""

    webcurate_info = {"image_size": 32}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-min", type=float, default=10.0, help="training wall-clock budget in minutes")
    ap.add_argument("--config", default=os.path.join(ROOT, "docs", "examples", "train_cifar_tiny.yaml"))
    ap.add_argument("--workdir", default=os.path.join(HERE, "_work", "train_quality"))
    ap.add_argument("--quick", action="store_true", help="1 minute on 5k train / 1k test images")
    ap.add_argument("--threads", type=int, default=2, help="CPU cores to use in all")
    ap.add_argument("--workers", type=int, default=2,
                    help="Ray Train DDP workers; each gets threads/workers torch threads and 1 DALI thread")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    os.environ.setdefault("WEBCURATE_QUIET", "1")

    import ray

    from webcurate.train.backbone import build_backbone
    from webcurate.train.config import load_config
    from webcurate.train.data.loader import batches_per_epoch
    from webcurate.train.export import load_backbone
    from webcurate.train.loop import dataset_size, resolve_config, train

    ray.init(num_cpus=a.threads, include_dashboard=False, object_store_memory=500 * 1024 * 1024,
             log_to_driver=True)
    t_prep = time.time()
    src = extract(a.workdir)
    tag = "quick" if a.quick else "full"
    tr_src, te_src = os.path.join(src, "train"), os.path.join(src, "test")
    if a.quick:
        tr_src = subset_tree(tr_src, os.path.join(a.workdir, "quick_train"), 500)
        te_src = subset_tree(te_src, os.path.join(a.workdir, "quick_test"), 100)
        a.budget_min = min(a.budget_min, 1.0)
    train_ds = shard(tr_src, os.path.join(a.workdir, f"ds_train_{tag}"))
    test_ds = shard(te_src, os.path.join(a.workdir, f"ds_test_{tag}"))
    t_prep = time.time() - t_prep

    per_worker = max(1, a.threads // a.workers)
    base = [f"run.num_workers={a.workers}", f"run.torch_threads={per_worker}",
            f"run.cpus_per_worker={a.threads / a.workers}", "loader.num_threads=1"]
    cfg = resolve_config(load_config(a.config, base + a.overrides))
    _, n_train = dataset_size(train_ds)
    epoch_length = batches_per_epoch(n_train, cfg.loader, cfg.run.num_workers)
    sps = seconds_per_step(cfg, per_worker)
    # Workers run in parallel on their own cores; the loaders share them: leave ~15% of the budget.
    steps = max(10, int(a.budget_min * 60 / (sps * 1.15)))
    epochs = steps / epoch_length
    scale = epochs / cfg.optim.epochs  # shrink every epoch-sized schedule setting to this run
    ov = base + list(a.overrides) + [
        f"optim.epochs={epochs:.4f}", f"run.max_steps={steps}", f"run.checkpoint_every={steps}",
        f"optim.warmup_epochs={cfg.optim.warmup_epochs * scale:.4f}",
        f"teacher.warmup_temp_epochs={cfg.teacher.warmup_temp_epochs * scale:.4f}",
        f"optim.freeze_last_layer_epochs={cfg.optim.freeze_last_layer_epochs * scale:.4f}",
    ]
    cfg = resolve_config(load_config(a.config, ov))
    out = os.path.join(a.workdir, f"run_{tag}_{time.strftime('%Y%m%d-%H%M%S')}")
    print(f"calibration: {sps:.3f} s/step -> {steps} steps = {epochs:.2f} epochs of {n_train} images "
          f"(epoch = {epoch_length} steps of {cfg.loader.batch_size})", flush=True)
    t0 = time.time()
    summary = train(train_ds, out, cfg)
    t_train = time.time() - t0

    torch.set_num_threads(a.threads)
    trained = load_backbone(os.path.join(out, "backbone.safetensors"))
    torch.manual_seed(cfg.run.seed)  # the loop builds the student right after this seed: same init
    init = build_backbone(cfg.model, cfg.loader.global_size).vit.eval()
    init.webcurate_info = {"image_size": cfg.loader.global_size}
    t1 = time.time()
    acc = {"trained": knn(trained, train_ds, test_ds, "trained"),
           "random_init": knn(init, train_ds, test_ds, "random init"),
           "raw_pixels": knn(RawPixels(), train_ds, test_ds, "raw pixels")}
    t_eval = time.time() - t1
    result = {
        "config": os.path.relpath(a.config, ROOT), "overrides": ov, "train_images": n_train,
        "steps": steps, "epochs": round(epochs, 3), "train_seconds": round(t_train, 1),
        "fit_seconds": summary.get("seconds"), "img_per_s_last_step": summary.get("img_per_s"),
        "images_seen": steps * cfg.loader.batch_size * cfg.run.num_workers,
        "knn_top1": acc, "prep_seconds": round(t_prep, 1), "eval_seconds": round(t_eval, 1),
        "final_loss": summary.get("loss"), "teacher_entropy": summary.get("teacher_entropy"),
        "kl_to_uniform": summary.get("kl_to_uniform"), "output": out,
    }
    with open(os.path.join(out, "quality.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    print(f"k-NN top-1 (k=20, T=0.07) on CIFAR-10 test: trained {acc['trained'] * 100:.1f}% | "
          f"random init {acc['random_init'] * 100:.1f}% | raw pixels {acc['raw_pixels'] * 100:.1f}%  "
          f"(trained / raw = {acc['trained'] / max(acc['raw_pixels'], 1e-9):.2f}x, "
          f"{t_train / 60:.1f} min training)")


if __name__ == "__main__":
    sys.exit(main())
