"""`webcurate demo`: the whole flow on the embedded default, in a few minutes on 2 cores.

Builds a web-like corpus of real photos (``demo_corpus``), serves it on
127.0.0.1 as a URL list, then runs one pipeline config (``config_run``):
shard the URLs → curate (embed with a random-init ViT, near-duplicate
removal, hierarchical k-means, balanced sampling, export) → train a tiny ViT
with DINO/iBOT for a few steps → embed with the trained backbone → label with
caption keywords and seed-set embedding LFs → self-train on the embeddings
with the label model as a prior, leaving the distractors (banners of no class)
unlabelled → HTML reports.
"""
from __future__ import annotations

import os
import shutil
from typing import Any

from .demo_corpus import LoopbackServer, _distractor, build_corpus, materialise_url_list

EMBED_MODEL = "vit_tiny_patch16_224"

# A tiny DINOv2/iBOT recipe sized for a CPU demo: 32 px global crops with
# patch 4 (64 tokens), 16 px locals, a small head.
DEMO_TRAIN_OVERRIDES = [
    "model.name=vit_tiny_patch16_224", "model.patch_size=4", "model.embed_dim=96", "model.depth=3",
    "model.num_heads=3", "model.drop_path_rate=0.0", "model.layerscale=null",
    "dino.n_prototypes=512", "dino.hidden_dim=256", "dino.bottleneck_dim=64",
    "teacher.momentum=0.99", "teacher.warmup_temp_epochs=0",
    "optim.epochs=2", "optim.base_lr=0.002", "optim.warmup_epochs=0.2", "optim.freeze_last_layer_epochs=0",
    "loader.global_size=32", "loader.local_size=16", "loader.n_local=2", "loader.batch_size=32",
    "loader.global_scale=[0.3,1.0]", "loader.local_scale=[0.1,0.3]", "loader.num_threads=2",
    "run.num_workers=1", "run.log_every=5", "run.report_every=20", "run.checkpoint_every=20",
]


def lf_file_text(classes: list[str], seed_root: str) -> str:
    """The demo's labelling functions: caption keywords plus seed-set embedding LFs."""
    return f'''"""Labelling functions written by `webcurate demo`."""
from webcurate.curation.labeling import factories as F

CLASSES = {classes!r}
SEED_DATASET = {seed_root!r}

# Captions such as "a photo of a coat" (some captions on the web are wrong).
captions = F.keyword_lfs({{c: [c] for c in CLASSES}}, CLASSES)

# A few labelled photos per class, embedded with the trained backbone.
seed = F.load_seed(SEED_DATASET, CLASSES)
knn_seed = F.knn_lf(seed, k=3, margin=0.1, name="knn_seed")
prototype = F.prototype_lf(seed, margin=0.01, name="prototype")
'''


def demo_pipeline(work: str, url_list: str, seed_root: str, dev_root: str, lfs: str, max_steps: int,
                  n_pool: int) -> dict[str, Any]:
    data = os.path.join(work, "data")
    return {
        "shard": {"input": url_list, "output": os.path.join(data, "raw"), "shard_size": 128, "image_size": 64,
                  "resize_mode": "keep_ratio", "threads": 8, "retries": 1, "timeout": 5.0,
                  "allow_private_addresses": True},  # the corpus is served from 127.0.0.1
        "curate": {
            "output": os.path.join(data, "curated"),
            "embed": {"model": EMBED_MODEL, "random_init": True, "image_size": 64, "batch_size": 64},
            # Random-init features are all fairly similar: only near-copies clear this bar.
            "dedup": {"method": "copy", "k": 8, "threshold": 0.99},
            "cluster": {"levels": [20, 5], "resampling_steps": 2},
            "sample": {"target": int(n_pool * 0.8)},
        },
        "train": {"output": os.path.join(work, "runs", "tiny-dino"), "max_steps": max_steps,
                  "overrides": DEMO_TRAIN_OVERRIDES},
        "embed_for_label": {"datasets": [os.path.join(data, "curated"), seed_root, dev_root], "model": EMBED_MODEL,
                            "checkpoint": os.path.join(work, "runs", "tiny-dino", "backbone.safetensors"),
                            "image_size": 32, "batch_size": 64},
        "label": {"input": os.path.join(data, "curated"), "lfs": lfs, "output": os.path.join(data, "labelled"),
                  "dev": dev_root, "min_confidence": 0.3},
        # The label step's output is the prior; the dev set's "none" banners calibrate the rejection.
        "selftrain": {"input": os.path.join(data, "curated"), "seed": seed_root, "dev": dev_root,
                      "output": os.path.join(data, "selftrained"), "max_rounds": 3},
    }


def add_none_examples(dev_dir: str, n: int = 6, seed: int = 1) -> None:
    """A few banners of no class in the dev set (``none/``): open-set rejection is calibrated on them."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)  # other banners than the pool's distractors
    os.makedirs(os.path.join(dev_dir, "none"), exist_ok=True)
    for j in range(n):
        Image.fromarray(_distractor(rng)).save(os.path.join(dev_dir, "none", f"none{j:02d}.jpg"), quality=85)


def run_demo(workdir: str, keep: bool = False, max_steps: int = 30) -> dict[str, Any]:
    """Run the demo under ``workdir`` (wiped first unless ``keep``); returns the output paths."""
    from webcurate.shards.ingest import ingest_folder

    from .config_run import run_pipeline
    from webcurate.shards.ray_runtime import init_ray

    work = os.path.abspath(workdir)
    if os.path.exists(work) and not keep:
        shutil.rmtree(work)
    os.makedirs(work, exist_ok=True)
    corpus = build_corpus(os.path.join(work, "corpus"))
    print(f"corpus: {corpus.n_pool} photos from {corpus.source} ({len(corpus.classes)} classes), "
          f"{corpus.n_duplicates} planted near-duplicates, {corpus.n_distractors} distractors, "
          f"{corpus.n_broken} broken links")
    init_ray()
    add_none_examples(corpus.dev_dir)
    seed_root = os.path.join(work, "data", "seed")
    dev_root = os.path.join(work, "data", "dev")
    for src, dst in ((corpus.seed_dir, seed_root), (corpus.dev_dir, dev_root)):
        ingest_folder(src, dst, labels_from_dirs=True, shard_size=1000, summary=False, image_opts=_demo_image_opts())
    lfs = os.path.join(work, "demo_lfs.py")
    with open(lfs, "w") as f:
        f.write(lf_file_text(corpus.classes, seed_root))
    with LoopbackServer(corpus.folder) as server:
        url_list = materialise_url_list(corpus.url_list, server.url, os.path.join(work, "urls.parquet"))
        print(f"serving the corpus at {server.url} ({url_list})")
        cfg = demo_pipeline(work, url_list, seed_root, dev_root, lfs, max_steps, corpus.n_pool)
        results = run_pipeline(cfg)
    from webcurate.curation.report import write_report

    outputs = {r.step: r.output for r in results if r.output}
    # Re-written now that the curated set also carries the labelling functions' votes.
    outputs["curation report"] = write_report(os.path.join(work, "data", "curated"))
    outputs["label report"] = write_report(os.path.join(work, "data", "labelled"))
    outputs["selftrain report"] = write_report(os.path.join(work, "data", "selftrained"))
    for step, out in (("label", "labelled"), ("selftrain", "selftrained")):
        acc = pseudo_label_accuracy(os.path.join(work, "data", out))
        if acc is not None:
            n, right = acc
            print(f"\n{step}: pseudo-labels vs the corpus's hidden true labels: {right}/{n} = "
                  f"{right / max(n, 1):.1%} (distractors have no true label and count as wrong)")
        cover = class_coverage(os.path.join(work, "data", "curated"), os.path.join(work, "data", out))
        if cover is not None:
            print(f"{step}: distractors left unlabelled {cover[0]}/{cover[1]}, photos of the classes labelled "
                  f"{cover[2]}/{cover[3]}")
    print("\nwebcurate demo finished. Outputs:")
    for name, path in outputs.items():
        print(f"  {name:16s} {path}")
    print(f"\nOpen the reports: file://{outputs['curation report']}, file://{outputs['label report']}  and  "
          f"file://{outputs['selftrain report']}")
    return outputs


def _demo_image_opts():
    from webcurate.shards.image_ops import ImageOptions

    return ImageOptions(image_size=64)


def pseudo_label_accuracy(labelled: str) -> tuple[int, int] | None:
    """(exported samples, how many carry their true label) for the demo's labelled dataset;
    the URL list's hidden ``true_label`` column travels in the index as metadata."""
    from webcurate.shards.dataset import Dataset

    try:
        idx = Dataset(labelled).index(columns=["label", "true_label", "status"]).to_pylist()
    except Exception:  # noqa: BLE001 - the summary line is optional; the outputs are what matter
        return None
    rows = [r for r in idx if r["status"] == "ok" and r.get("label") is not None]
    return len(rows), sum(r["label"] == r.get("true_label") for r in rows)


def class_coverage(curated: str, labelled: str) -> tuple[int, int, int, int] | None:
    """(distractors left unlabelled, distractors, class photos labelled, class photos) of a labelled output."""
    from webcurate.shards.dataset import Dataset

    try:
        pool = Dataset(curated).index(columns=["key", "true_label", "status"]).to_pylist()
        got = set(Dataset(labelled).ok_keys())
    except Exception:  # noqa: BLE001 - the summary line is optional; the outputs are what matter
        return None
    pool = [r for r in pool if r["status"] == "ok"]
    none = [r["key"] for r in pool if r.get("true_label") is None]
    real = [r["key"] for r in pool if r.get("true_label") is not None]
    return sum(k not in got for k in none), len(none), sum(k in got for k in real), len(real)
