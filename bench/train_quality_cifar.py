"""Quality for a fixed CPU budget: every SSL method trained on CIFAR-10 for the same wall-clock time, then k-NN.

1. CIFAR-10 (../shared/data/cifar10.tar.gz) is extracted and sharded with
   ``webcurate.shards.ingest.ingest_folder`` (train: 50k, test: 10k), cached in bench/_work.
2. Each method is pretrained on the train split WITHOUT labels by ``webcurate.train.driver.train``
   with ``run.time_budget`` = ``--budget-min`` (default 15 minutes of wall clock, startup
   and export included): the run measures its s/step, sizes every schedule to the steps
   that fit, stops on time and exports. The recipe of method M is
   docs/examples/train_cpu_<M>.yaml when it exists, else ``BASE`` + ``METHOD_OVERRIDES[M]``
   (ConvNets: a narrow ResNet-10 with the small-image stem at 32 px; ViT-only methods: a
   patch-4 ViT at 32 px).
3. k-NN (k=20, T=0.07, cosine; ``webcurate.train.evaluate.knn_eval``) and a linear probe
   (``linear_probe``: L-BFGS logistic regression on standardised frozen features) on the
   test split, with the features ``webcurate eval`` uses (resize 37, centre crop 32,
   ImageNet normalisation); beside them raw pixels (the same normalised 32 px crops,
   flattened) and the random initialisation of each backbone family.

Every method runs in one invocation; results go to <workdir>/quality-<time>.json and a
markdown table is printed (bench/results/train.md keeps the recorded ones).

    .venv/bin/python bench/train_quality_cifar.py [--methods simclr,byol] [--budget-min 15] [--quick]
        [--probe] [section.key=value ...]
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
EXAMPLES = os.path.join(ROOT, "docs", "examples")
ALL = ["simclr", "byol", "moco_v2", "moco_v3", "simsiam", "vicreg", "barlow_twins", "swav", "dino", "dinov2", "ibot",
       "mae"]

# The shared CPU recipe: a narrow ResNet-10 (timm resnet18 with one block per stage, widths 32-64-128-256)
# with the small-image stem on 32 px views: 2-3x the img/s of the ResNet-18 depth, which a 15-minute budget
# needs more (bench/results/train.md); docs/examples/train_cpu_<method>.yaml, where it exists, wins.
RESNET = ["model.name=resnet18", "model.stem=small_image", "model.drop_path_rate=0",
          "model.timm_kwargs={channels: [32, 64, 128, 256], stem_width: 32, layers: [1, 1, 1, 1]}"]
VIT = ["model.name=vit_tiny_patch16_224", "model.patch_size=4", "model.embed_dim=96", "model.depth=4",
       "model.num_heads=3", "model.drop_path_rate=0", "model.layerscale=null"]
BASE = ["loader.global_size=32", "loader.local_size=16", "loader.batch_size=256", "loader.num_threads=1",
        "optim.name=sgd", "optim.base_lr=0.06", "optim.scaling_rule=linear_wrt_256", "optim.min_lr=0",
        "optim.weight_decay=5e-4", "optim.weight_decay_end=5e-4", "optim.epochs=20", "optim.warmup_epochs=1",
        "optim.clip_grad=0", "head.proj_hidden_dim=512", "head.proj_dim=128", "head.pred_hidden_dim=512",
        "run.log_every=25", "run.report_every=200", "run.checkpoint_every=100000"]
METHOD_OVERRIDES = {
    "simclr": RESNET + ["simclr.temperature=0.2"],
    "byol": RESNET,
    "moco_v2": RESNET + ["moco.temperature=0.1", "moco.queue_size=4096"],
    "moco_v3": RESNET + ["head.proj_layers=3"],
    "simsiam": RESNET + ["head.proj_layers=3"],
    "vicreg": RESNET + ["head.proj_layers=3", "head.proj_dim=512", "optim.base_lr=0.03"],
    "barlow_twins": RESNET + ["head.proj_layers=3", "head.proj_dim=512", "barlow_twins.lambda_offdiag=0.005"],
    "swav": RESNET + ["loader.n_local=2", "swav.n_prototypes=100", "optim.freeze_last_layer_epochs=0.5"],
    "dino": RESNET + ["dino.n_prototypes=1024", "dino.hidden_dim=512", "dino.bottleneck_dim=128",
                      "teacher.warmup_temp_epochs=2", "teacher.temp=0.05", "optim.freeze_last_layer_epochs=0.2",
                      "loader.n_local=2"],
    "dinov2": VIT + ["dino.n_prototypes=1024", "dino.hidden_dim=512", "dino.bottleneck_dim=128",
                     "teacher.warmup_temp_epochs=2", "teacher.temp=0.05", "optim.freeze_last_layer_epochs=0.2",
                     "loader.n_local=2", "optim.name=adamw", "optim.base_lr=0.002", "optim.scaling_rule=sqrt_wrt_1024",
                     "optim.weight_decay=0.04", "optim.weight_decay_end=0.1", "optim.clip_grad=3.0",
                     "loader.batch_size=128"],
    "mae": VIT + ["optim.name=adamw", "optim.base_lr=1.5e-4", "optim.weight_decay=0.05",
                  "optim.weight_decay_end=0.05", "mae.decoder_dim=64", "mae.decoder_heads=2"],
}
METHOD_OVERRIDES["ibot"] = list(METHOD_OVERRIDES["dinov2"])


def extract(workdir: str) -> str:
    dst = os.path.join(workdir, "cifar10")
    for dirpath, dirnames, _ in os.walk(dst) if os.path.isdir(dst) else []:
        if "train" in dirnames and "test" in dirnames:
            return dirpath
    os.makedirs(dst, exist_ok=True)
    with tarfile.open(CIFAR) as tf:
        tf.extractall(dst, filter="data")
    for dirpath, dirnames, _ in os.walk(dst):  # the archive may hold a top folder
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


class RawPixels(nn.Module):
    """(B, 3, 32, 32) normalised images -> (B, 3072) features."""

    webcurate_info = {"image_size": 32}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


class Features:
    """Train/test features of a backbone and the two evaluations on them.

    The eval images are decoded and transformed once (``extract_features`` with
    ``RawPixels``: exactly the tensors ``webcurate eval`` feeds a backbone) and kept
    as (N, 3, 32, 32) float tensors; every backbone then only runs its forward.
    """

    def __init__(self, train_ds: str, test_ds: str, threads: int, probe: bool, cache: str | None = None,
                 subset: int = 0):
        from webcurate.train.evaluate import encode_labels, extract_features

        self.threads, self.probe = threads, probe
        torch.set_num_threads(threads)
        if cache and os.path.exists(cache):
            xtr, xte, ltr, lte = torch.load(cache, weights_only=True).values()
        else:
            _, xtr, ltr = extract_features(train_ds, RawPixels(), image_size=32, batch_size=256, device="cpu",
                                           num_threads=threads, desc="eval images: train")
            _, xte, lte = extract_features(test_ds, RawPixels(), image_size=32, batch_size=256, device="cpu",
                                           num_threads=threads, desc="eval images: test")
            if cache:
                torch.save({"xtr": xtr, "xte": xte, "ltr": ltr, "lte": lte}, cache)
        self.xtr, self.xte = xtr.view(-1, 3, 32, 32), xte.view(-1, 3, 32, 32)
        self.ytr, self.yte, self.classes = encode_labels(ltr, lte)
        if subset:  # tuning only: a fixed random subset (bank of `subset`, test of subset // 5)
            g = torch.Generator().manual_seed(0)
            itr = torch.randperm(len(self.xtr), generator=g)[:subset]
            ite = torch.randperm(len(self.xte), generator=g)[:max(1, subset // 5)]
            self.xtr, self.ytr, self.xte, self.yte = self.xtr[itr], self.ytr[itr], self.xte[ite], self.yte[ite]

    @torch.no_grad()
    def _embed(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        from webcurate.train.evaluate import _embed

        cl = not hasattr(model, "blocks")  # ConvNets: channels-last, as they trained
        if cl:
            model = model.to(memory_format=torch.channels_last)
        out = []
        for chunk in x.split(512):
            out.append(_embed(model, chunk.contiguous(memory_format=torch.channels_last) if cl else chunk).float())
        return torch.cat(out)

    def evaluate(self, model: nn.Module, name: str) -> dict:
        from webcurate.train.evaluate import knn_eval, linear_probe

        torch.set_num_threads(self.threads)
        t0 = time.time()
        model = model.eval()
        ftr, fte = self._embed(model, self.xtr), self._embed(model, self.xte)
        out = {"knn_top1": knn_eval(ftr, self.ytr, fte, self.yte, k=20, T=0.07, num_classes=len(self.classes)),
               "feature_dim": int(ftr.shape[1])}
        if self.probe:
            out["linear_top1"] = linear_probe(ftr, self.ytr, fte, self.yte, len(self.classes))["accuracy"]
        out["eval_seconds"] = round(time.time() - t0, 1)
        print(f"[eval] {name}: k-NN {out['knn_top1'] * 100:.1f} %"
              + (f", linear {out['linear_top1'] * 100:.1f} %" if "linear_top1" in out else "")
              + f" ({out['eval_seconds']} s)", flush=True)
        return out


def method_config(method: str, extra: list[str]):
    """(config source, overrides) of ``method``: its docs/examples recipe, else BASE + overrides."""
    path = os.path.join(EXAMPLES, f"train_cpu_{method}.yaml")
    if os.path.exists(path):
        return path, [f"method={method}", *extra]
    return None, [*BASE, *METHOD_OVERRIDES.get(method, RESNET), f"method={method}", *extra]


def random_init(cfg) -> nn.Module:
    from webcurate.train.backbone import build_backbone

    torch.manual_seed(cfg.run.seed)  # the workers build the student right after this seed: the same init
    bb = build_backbone(cfg.model, cfg.loader.global_size)
    model = bb.model.eval()
    model.webcurate_info = {"image_size": cfg.loader.global_size}
    return model


def run_method(method: str, a, train_ds: str, n_train: int, feats: Features, workdir: str) -> dict:
    from webcurate.train.config import load_config
    from webcurate.train.driver import train
    from webcurate.train.export_backbone import load_backbone
    from webcurate.train.models import resolve_config

    source, ov = method_config(method, [f"run.time_budget={a.budget_min * 60:.0f}s",
                                        f"run.num_workers={a.workers}",
                                        f"run.torch_threads={max(1, a.threads // a.workers)}",
                                        f"run.cpus_per_worker={a.threads / a.workers}", *a.overrides])
    cfg = resolve_config(load_config(source, ov))
    out = os.path.join(workdir, f"run_{method}_{time.strftime('%Y%m%d-%H%M%S')}")
    print(f"\n=== {method}: {source or 'bench BASE + METHOD_OVERRIDES'} {' '.join(ov)}", flush=True)
    t0 = time.time()
    summary = train(train_ds, out, cfg, quiet=False)
    t_train = time.time() - t0
    images = int(summary.get("step", 0)) * cfg.global_batch_size()
    res = {"method": method, "model": cfg.model.name, "config": source and os.path.relpath(source, ROOT),
           "overrides": ov, "steps": summary.get("step"), "plan_steps": summary.get("plan_steps"),
           "epochs": round(images / n_train, 2), "images_seen": images, "train_seconds": round(t_train, 1),
           "img_per_s": round(images / max(t_train, 1e-9), 1), "final_loss": summary.get("loss"),
           "embedding_std": summary.get("embedding_std"), "effective_rank": summary.get("effective_rank"),
           "collapse": summary.get("collapse"), "output": out}
    res.update(feats.evaluate(load_backbone(os.path.join(out, "backbone.safetensors")), method))
    print(json.dumps(res), flush=True)
    return res


def table(results: list[dict], baselines: dict) -> str:
    raw = baselines["raw_pixels"]["knn_top1"]
    rows = ["| method | backbone | k-NN top-1 | vs raw pixels | linear probe | img/s | epochs | steps | collapse |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, b in baselines.items():
        lin = f"{b['linear_top1'] * 100:.1f} %" if "linear_top1" in b else "-"
        rows.append(f"| {name} | {b.get('model', '-')} | {b['knn_top1'] * 100:.1f} % | "
                    f"{(b['knn_top1'] - raw) * 100:+.1f} | {lin} | - | - | - | - |")
    for r in sorted(results, key=lambda r: -r.get("knn_top1", 0)):
        lin = f"{r['linear_top1'] * 100:.1f} %" if "linear_top1" in r else "-"
        knn = r.get("knn_top1")
        if knn is None:
            rows.append(f"| {r['method']} | {r.get('model', '-')} | failed: {r.get('error', '')[:80]} | | | | | | |")
            continue
        rows.append(f"| {r['method']} | {r['model']} | {knn * 100:.1f} % | {(knn - raw) * 100:+.1f} | {lin} | "
                    f"{r['img_per_s']:.0f} | {r['epochs']} | {r['steps']} | {r.get('collapse', '')} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(ALL), help="comma-separated methods, in run order")
    ap.add_argument("--budget-min", type=float, default=15.0, help="wall-clock training budget per method")
    ap.add_argument("--workdir", default=os.path.join(HERE, "_work", "train_quality"))
    ap.add_argument("--quick", action="store_true", help="5k train / 1k test images (pair with a short --budget-min)")
    ap.add_argument("--probe", action="store_true", help="also a linear probe per method (a minute each)")
    ap.add_argument("--threads", type=int, default=2, help="CPU cores to use in all")
    ap.add_argument("--workers", type=int, default=1, help="Ray Train DDP workers (threads are split among them)")
    ap.add_argument("--no-baselines", action="store_true", help="skip raw pixels / random init")
    ap.add_argument("--eval-subset", type=int, default=0,
                    help="tuning only: k-NN bank of N train images, test on N/5 (0: the full splits)")
    ap.add_argument("overrides", nargs="*", help="section.key=value applied to every method")
    a = ap.parse_args()
    os.environ.setdefault("WEBCURATE_QUIET", "1")
    import ray

    ray.init(num_cpus=a.threads, include_dashboard=False, object_store_memory=500 * 1024 * 1024,
             log_to_driver=True)
    src = extract(a.workdir)
    tag = "quick" if a.quick else "full"
    tr_src, te_src = os.path.join(src, "train"), os.path.join(src, "test")
    if a.quick:
        tr_src = subset_tree(tr_src, os.path.join(a.workdir, "quick_train"), 500)
        te_src = subset_tree(te_src, os.path.join(a.workdir, "quick_test"), 100)
    train_ds = shard(tr_src, os.path.join(a.workdir, f"ds_train_{tag}"))
    test_ds = shard(te_src, os.path.join(a.workdir, f"ds_test_{tag}"))
    from webcurate.train.config import load_config
    from webcurate.train.driver import dataset_size

    _, n_train = dataset_size(train_ds)
    feats = Features(train_ds, test_ds, a.threads, a.probe, os.path.join(a.workdir, f"eval_images_{tag}.pt"),
                     a.eval_subset)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    baselines: dict = {}
    if not a.no_baselines:
        baselines["raw_pixels"] = feats.evaluate(RawPixels(), "raw pixels")
        families = {}
        for m in methods:  # one random init per architecture
            source, ov = method_config(m, list(a.overrides))
            cfg = load_config(source, ov)
            families.setdefault(cfg.model.name + json.dumps(cfg.model.timm_kwargs, sort_keys=True), cfg)
        for cfg in families.values():
            res = feats.evaluate(random_init(cfg), f"random init {cfg.model.name}")
            baselines[f"random init ({cfg.model.name})"] = {**res, "model": cfg.model.name}
        print(json.dumps(baselines), flush=True)
    results = []
    for m in methods:
        try:
            results.append(run_method(m, a, train_ds, n_train, feats, a.workdir))
        except Exception as e:  # one method failing must not lose the others' figures
            print(f"{m} failed: {type(e).__name__}: {e}", flush=True)
            results.append({"method": m, "error": f"{type(e).__name__}: {e}"})
    path = os.path.join(a.workdir, f"quality-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump({"budget_min": a.budget_min, "train_images": n_train, "baselines": baselines,
                   "results": results, "load": os.getloadavg()}, f, indent=2)
    if baselines:
        print("\n" + table(results, baselines))
    print(f"\nresults: {path}; load average at the end {os.getloadavg()}")


if __name__ == "__main__":
    sys.exit(main())
