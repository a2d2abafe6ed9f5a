"""Curation that proves itself: a curated subset vs N random images, same training recipe and budget.

1. A web-like pool from ../shared/data/cifar10.tar.gz (bench/_web_pool.py states the mix: a few
   target classes, a larger off-target share, repost bursts, junk, copies of eval photos), a
   labelled seed set of the target classes, an evaluation bank and the test photos (disjoint).
2. A backbone of our own training on the whole pool (`webcurate train`, same recipe and step
   budget as every arm), used to embed pool, seeds and test photos (`webcurate embed`).
3. Arms, each a `webcurate curate --config` run on its own copy of the embedded pool, exported
   to N images (`cluster` with one cluster + `sample` = N at random among what the stages kept):
     random     N images drawn at random from the pool (no curation stage); random2: another draw,
                the noise floor of every comparison (sampling and training randomness);
     filter     quality filters only;
     dedup      copy-dedup + relative dedup against the test photos;
     retrieval  retrieval from the seed set only;
     all        filter + dedup + relative dedup + retrieval + hierarchical k-means + balanced sampling.
   Diagnostic upper bounds (--arms ...,oracle,clean; they read the hidden columns, no stage does):
     oracle     N distinct target-class photos; clean: N random distinct originals (no junk, no reposts).
4. Each subset trains a backbone with the same recipe for the same number of steps (or the same
   --time-budget), then `webcurate eval knn` / `eval linear` on the test photos of the target
   classes (classifier fitted on the evaluation bank). The mix of each subset is counted from the
   pool's hidden `kind` / `true_class` / `origin` columns, which no stage reads.

    flock /tmp/webcurate-heavy.lock .venv/bin/python bench/curation_vs_random.py            # full size
    .venv/bin/python bench/curation_vs_random.py --small                                      # validation

Results (JSON and a markdown table) go to --workdir; finished steps are reused on a re-run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CIFAR = os.path.join(ROOT, "..", "shared", "data", "cifar10.tar.gz")
WEBCURATE = os.path.join(os.path.dirname(sys.executable), "webcurate")
sys.path.insert(0, HERE)
import _web_pool as web_pool  # noqa: E402

ARMS = ("random", "random2", "filter", "dedup", "retrieval", "all")
# Not a curation: upper bounds that read the hidden columns (--arms ...,oracle,clean).
DIAGNOSTIC_ARMS = ("oracle", "clean")
# Run 2 of bench/results/train.md: the CPU DINO settings that take off soonest.
RECIPE = ["loader.batch_size=32", "optim.base_lr=0.004", "dino.n_prototypes=256", "teacher.temp=0.04"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {msg}", flush=True)


def sh(args: list[str], logfile: str) -> float:
    """Run a webcurate command, its output to ``logfile``; seconds taken; exits with its tail on failure."""
    t0 = time.time()
    with open(logfile, "a") as f:
        f.write(f"\n$ {' '.join(args)}\n")
        f.flush()
        rc = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "WEBCURATE_QUIET": "1"}).returncode
    if rc != 0:
        tail = open(logfile).read()[-3000:]
        sys.exit(f"command failed ({rc}): {' '.join(args)}\n--- {logfile} ---\n{tail}")
    return time.time() - t0


def train(data: str, out: str, a: argparse.Namespace, steps: int | None = None, budget: str | None = None) -> dict:
    """Train a backbone on ``data`` with the shared recipe and budget (reused when already exported)."""
    stamp = os.path.join(out, "bench_train.json")
    if os.path.exists(stamp):
        return json.load(open(stamp))
    shutil.rmtree(out, ignore_errors=True)
    if budget is None and steps is None:
        budget = a.time_budget
    budget = ["--time-budget", budget] if budget else ["--max-steps", str(steps or a.steps)]
    recipe = [] if a.recipe == "cpu-default" else ["--config", a.train_config, *RECIPE]
    load0 = os.getloadavg()[0]
    secs = sh([WEBCURATE, "train", "--data", data, "--output", out, *recipe, *budget, *a.override],
              os.path.join(a.workdir, "train.log"))
    info = {"seconds": round(secs, 1), **trained_steps(out), "load_start": round(load0, 1),
            "load_end": round(os.getloadavg()[0], 1), "backbone": os.path.join(out, "backbone.safetensors")}
    json.dump(info, open(stamp, "w"))
    return info


def trained_steps(out: str) -> dict:
    """Steps, epochs and median s/step the run actually made (its per-step metrics), not what was asked."""
    import glob

    rows = [json.loads(line) for f in sorted(glob.glob(os.path.join(out, "metrics", "*.jsonl"))) for line in open(f)]
    if not rows:
        return {"steps": 0}
    secs = sorted(r["step_seconds"] for r in rows)
    return {"steps": rows[-1]["step"], "epochs": rows[-1]["epoch"] + 1, "s_per_step": round(secs[len(secs) // 2], 3),
            "step_seconds_total": round(sum(secs), 1)}


def evaluate(backbone: str, paths: dict[str, str], out: str, a: argparse.Namespace) -> dict:
    """k-NN and linear-probe top-1 on the test photos (classifier fitted on the bank)."""
    res = {}
    for kind in ("knn", "linear"):
        f = os.path.join(out, f"eval_{kind}.json")
        if not os.path.exists(f):
            sh([WEBCURATE, "eval", kind, "--checkpoint", backbone, "--train", paths["bank"], "--val", paths["test"],
                "--image-size", "32", "--batch-size", "256", "--device", "cpu", "--json", f],
               os.path.join(a.workdir, "eval.log"))
        res[kind] = json.load(open(f))["top1_accuracy"]
    return res


def model_name(backbone: str) -> str:
    """The timm architecture recorded in an exported backbone (embed's --model)."""
    from webcurate.shards.backbone_format import read_metadata

    return read_metadata(backbone)["model_name"]


def embed(root: str, backbone: str, a: argparse.Namespace) -> None:
    sh([WEBCURATE, "embed", "--input", root, "--model", model_name(backbone), "--checkpoint", backbone,
        "--image-size", "32", "--batch-size", "256"], os.path.join(a.workdir, "embed.log"))


def arm_config(arm: str, pool: str, out: str, paths: dict[str, str], backbone: str, a: argparse.Namespace) -> dict:
    """The `webcurate curate` config of one arm."""
    cfg: dict = {"input": pool, "output": out,
                 "embed": {"model": model_name(backbone), "checkpoint": backbone, "image_size": 32,
                           "batch_size": 256},
                 "filter": False, "dedup": False, "retrieve": False,
                 "cluster": {"levels": [1], "resampling_steps": 0},  # one cluster: N at random from what is kept
                 "sample": {"target": a.n, "seed": a.seed}, "report": False}
    dedup = {"method": "copy", "k": 32, "threshold": a.copy_threshold, "against": [paths["test"]],
             "against_threshold": against_threshold(pool, a)}
    retrieve = {"seeds": [paths["seeds"]], "k": a.retrieve_k, "mode": a.retrieve_mode,
                "exclude_duplicates": arm == "all"}
    if arm in ("filter", "all"):
        cfg["filter"] = {"allow_mass_removal": True}
    if arm in ("dedup", "all"):
        cfg["dedup"] = dedup
    if arm in ("retrieval", "all"):
        cfg["retrieve"] = retrieve
    if arm == "all":
        cfg["cluster"] = {"levels": a.levels, "resampling_steps": 10}
        cfg["report"] = {"output": os.path.join(os.path.dirname(out), "report.html")}
    return cfg


def against_threshold(pool: str, a: argparse.Namespace) -> float:
    """The relative-dedup cosine: given, or the copy threshold (calibrated by embed when `auto`)."""
    if a.against_threshold != "copy":
        return float(a.against_threshold)
    if a.copy_threshold != "auto":
        return float(a.copy_threshold)
    from webcurate.shards.dataset import Dataset

    cal = Dataset(pool).manifest.get("stages", {}).get("embeddings", {}).get("calibration") or {}
    return float(cal.get("threshold", 0.6))


def write_diagnostic(arm: str, pool: str, out: str, a: argparse.Namespace) -> None:
    """oracle: N distinct target-class photos (originals first); clean: N random distinct originals, no junk.

    Both choose by the hidden kind / true_class / origin columns: what perfect curation
    could give, to tell the limits of the stages from the limits of the training recipe.
    """
    import numpy as np

    from webcurate.shards.dataset import Dataset
    from webcurate.shards.subset import write_subset

    t = Dataset(pool).index(columns=["key", "kind", "true_class", "origin"], status="ok")
    rows = sorted(zip(*(t[c].to_pylist() for c in ("key", "kind", "true_class", "origin"))))
    targets = set(web_pool.PoolSpec().targets)
    rng = np.random.default_rng(a.seed)
    if arm == "oracle":
        first = [r for r in rows if r[1] == "target"]
        rest = [r for r in rows if r[1] == "repost" and r[2] in targets]
        seen = {r[3] for r in first}
        extra = []
        for i in rng.permutation(len(rest)):  # one repost per further photo, then any
            if rest[i][3] not in seen:
                seen.add(rest[i][3])
                extra.append(rest[i])
        extra += [rest[i] for i in rng.permutation(len(rest)) if rest[i] not in extra]
        pick = [r[0] for r in (first + extra)[:a.n]]
    else:
        originals = [r[0] for r in rows if r[1] in ("target", "offtarget")]
        pick = [originals[i] for i in sorted(rng.choice(len(originals), min(a.n, len(originals)), replace=False))]
    write_subset(pool, out, {k: {} for k in pick}, stage=arm, parameters={"n": a.n, "seed": a.seed},
                 summary=False)
    import ray

    ray.shutdown()


def run_arm(arm: str, base_pool: str, paths: dict[str, str], backbone: str, a: argparse.Namespace) -> str:
    """The arm's subset of N images (a dataset), made by our stages or at random."""
    import yaml

    arm_dir = os.path.join(a.workdir, "arms", arm)
    out = os.path.join(arm_dir, "subset")
    if os.path.exists(os.path.join(arm_dir, "done")):
        return out
    shutil.rmtree(arm_dir, ignore_errors=True)
    os.makedirs(arm_dir)
    if arm in DIAGNOSTIC_ARMS:
        write_diagnostic(arm, base_pool, out, a)
    elif arm.startswith("random"):
        import numpy as np

        from webcurate.shards.dataset import Dataset
        from webcurate.shards.subset import write_subset

        keys = sorted(Dataset(base_pool).ok_keys())
        seed = a.seed + (1 if arm == "random2" else 0)  # a second draw: the noise floor of the comparison
        pick = np.random.default_rng(seed).choice(len(keys), size=min(a.n, len(keys)), replace=False)
        write_subset(base_pool, out, {keys[i]: {} for i in sorted(pick)}, stage="random",
                     parameters={"n": a.n, "seed": seed}, summary=False)
        import ray

        ray.shutdown()  # the training subprocesses start their own Ray
    else:
        pool = os.path.join(arm_dir, "pool")
        shutil.copytree(base_pool, pool)  # each arm's sidecars stay its own; the embeddings come along
        cfg_path = os.path.join(arm_dir, "curate.yaml")
        yaml.safe_dump(arm_config(arm, pool, out, paths, backbone, a), open(cfg_path, "w"), sort_keys=False)
        sh([WEBCURATE, "curate", "--config", cfg_path], os.path.join(arm_dir, "curate.log"))
    open(os.path.join(arm_dir, "done"), "w").close()
    return out


def stage_stats(arm: str, targets: tuple[str, ...], a: argparse.Namespace) -> dict:
    """What each stage of an arm removed or selected, by the pool's hidden kind (read from its sidecars)."""
    from webcurate.shards.dataset import Dataset

    pool = os.path.join(a.workdir, "arms", arm, "pool")
    if not os.path.exists(pool):
        return {}
    ds = Dataset(pool)
    idx = ds.index(columns=["key", "kind", "true_class"])
    kind = dict(zip(idx["key"].to_pylist(), idx["kind"].to_pylist()))
    target = {k: c in targets for k, c in zip(idx["key"].to_pylist(), idx["true_class"].to_pylist())}
    out: dict = {}
    for stage, col, want in (("filter", "keep", False), ("dedup", "keep", False), ("retrieve", "selected", True)):
        if not ds.sidecar_completed(stage):
            continue
        t = ds.read_sidecar(stage, columns=["key", col])
        hit = [k for k, v in zip(t["key"].to_pylist(), t[col].to_pylist()) if bool(v) == want]
        by_kind: dict[str, int] = {}
        for k in hit:
            by_kind[kind.get(k)] = by_kind.get(kind.get(k), 0) + 1
        out[stage] = {"removed" if not want else "selected": len(hit), "by_kind": by_kind}
        if stage == "retrieve":
            out[stage]["target_share"] = round(sum(target[k] for k in hit) / max(len(hit), 1), 4)
            out[stage]["pool_target_share"] = round(sum(target.values()) / max(len(target), 1), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="validation size: ~2,500-image pool, N 500, 60 steps")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--n", type=int, default=None, help="images per subset [3000; 500 with --small]")
    ap.add_argument("--steps", type=int, default=None, help="training steps of every backbone [600; 60 small]")
    ap.add_argument("--pool-steps", type=int, default=None,
                    help="training steps of the curation backbone (on the whole pool) [--steps]")
    ap.add_argument("--pool-time-budget", default=None,
                    help="train the curation backbone on the pool for this long (default: --time-budget)")
    ap.add_argument("--time-budget", default=None, help="train each backbone for this long instead (e.g. 5m)")
    ap.add_argument("--equal-steps", action="store_true",
                    help="with --time-budget: only the first arm trains by time; every other arm makes the first arm's "
                         "step count (a VM whose speed drifts otherwise gives the arms different step counts)")
    ap.add_argument("--recipe", choices=["dino-vit", "cpu-default"], default="dino-vit",
                    help="dino-vit: --train-config with run 2's settings of bench/results/train.md; cpu-default: "
                         "no config, the trainer's own CPU recipe")
    ap.add_argument("--train-config", default=os.path.join(ROOT, "docs", "examples", "train_cifar_tiny.yaml"))
    ap.add_argument("--copy-threshold", default="auto",
                    help="copy-dedup cosine: a number, or auto (the threshold embed calibrated on the pool)")
    ap.add_argument("--against-threshold", default="copy",
                    help="relative-dedup cosine against the test photos: a number, or copy (= the copy threshold)")
    ap.add_argument("--retrieve-k", type=int, default=32)
    ap.add_argument("--retrieve-mode", default="both")
    ap.add_argument("--levels", default="100,10", help="k per level of the `all` arm's k-means")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--override", action="append", default=[], help="extra training override (section.key=value)")
    a = ap.parse_args()
    a.n = a.n or (500 if a.small else 3000)
    a.steps = a.steps or (60 if a.small else 600)
    a.levels = [int(x) for x in a.levels.split(",")]
    try:
        a.copy_threshold = float(a.copy_threshold)
    except ValueError:
        pass
    spec = web_pool.PoolSpec.small() if a.small else web_pool.PoolSpec()
    a.workdir = a.workdir or os.path.join(HERE, "_work", "curation_vs_random" + ("_small" if a.small else ""))
    os.makedirs(a.workdir, exist_ok=True)
    os.environ.setdefault("WEBCURATE_QUIET", "1")
    t_start = time.time()

    log("building the pool")
    paths = web_pool.build(CIFAR, os.path.join(a.workdir, "data"), spec)
    pool_mix = web_pool.mix(paths["pool"], spec.targets)
    log(f"pool: {pool_mix}")
    pool_budget = a.pool_time_budget or a.time_budget
    log(f"training the curation backbone on the whole pool ({pool_budget or f'{a.pool_steps or a.steps} steps'})")
    pool_bb = train(paths["pool"], os.path.join(a.workdir, "backbone_pool"), a, a.pool_steps, pool_budget)
    base = os.path.join(a.workdir, "pool_embedded")
    if not os.path.exists(os.path.join(base, "embedded")):
        shutil.rmtree(base, ignore_errors=True)
        shutil.copytree(paths["pool"], base)
        for root in (base, paths["seeds"], paths["test"]):
            embed(root, pool_bb["backbone"], a)
        open(os.path.join(base, "embedded"), "w").close()
    from webcurate.shards.dataset import Dataset

    results = {"spec": spec.__dict__, "pool": pool_mix, "n": a.n, "steps": a.steps, "time_budget": a.time_budget,
               "recipe": ["trainer CPU default"] if a.recipe == "cpu-default" else [
                   os.path.relpath(a.train_config, ROOT), *RECIPE, *a.override],
               "embeddings": {k: v for k, v in Dataset(base).manifest["stages"]["embeddings"].items()
                              if k in ("health", "calibration", "model", "dim")},
               "curation_backbone": {**pool_bb, **evaluate(pool_bb["backbone"], paths,
                                                           os.path.join(a.workdir, "backbone_pool"), a)},
               "arms": {}}
    for arm in a.arms.split(","):
        log(f"arm {arm}: curating")
        subset = run_arm(arm, base, paths, pool_bb["backbone"], a)
        mix = web_pool.mix(subset, spec.targets)
        log(f"arm {arm}: {mix}; training")
        first = next(iter(results["arms"].values()), None)
        steps = first["train"]["steps"] if a.equal_steps and first else None
        tr = train(subset, os.path.join(a.workdir, "arms", arm, "backbone"), a, steps)
        acc = evaluate(tr["backbone"], paths, os.path.join(a.workdir, "arms", arm), a)
        results["arms"][arm] = {"mix": mix, "train": tr, "stages": stage_stats(arm, spec.targets, a), **acc}
        log(f"arm {arm}: k-NN {acc['knn']:.4f}, linear {acc['linear']:.4f}")
        json.dump(results, open(os.path.join(a.workdir, "results.json"), "w"), indent=2)
    results["seconds"] = round(time.time() - t_start, 1)
    json.dump(results, open(os.path.join(a.workdir, "results.json"), "w"), indent=2)
    print(table(results))


def table(r: dict) -> str:
    """The results as a markdown table (one row per arm)."""
    head = ("| subset | images | target-class | distinct target photos | off-target | reposts | junk | eval copies "
            "| duplicates | k-NN top-1 | linear top-1 | steps (s/step) | train s (load) |\n|---|" + "---:|" * 12)
    rows = [head]
    base = r["arms"].get("random", {}).get("knn")
    for arm, v in r["arms"].items():
        m = v["mix"]
        delta = f" ({(v['knn'] - base) * 100:+.1f})" if base is not None and arm != "random" else ""
        rows.append(f"| {arm} | {m['total']} | {m['target_class_samples']} | {m['target_photos']} | "
                    f"{m.get('offtarget', 0)} | {m.get('repost', 0)} | {m.get('junk', 0)} | {m.get('contaminated', 0)} "
                    f"| {m['duplicates']} | {v['knn'] * 100:.1f}{delta} | {v['linear'] * 100:.1f} | "
                    f"{v['train']['steps']} ({v['train'].get('s_per_step', '?')}) | "
                    f"{v['train']['seconds']:.0f} ({v['train']['load_start']}-{v['train']['load_end']}) |")
    for arm, v in r["arms"].items():
        for stage, st in (v.get("stages") or {}).items():
            rows.append(f"\n{arm} / {stage}: {json.dumps(st)}")
    steps = [v["train"]["steps"] for v in r["arms"].values() if v["train"].get("steps")]
    if steps and max(steps) > 1.1 * min(steps):
        rows.append(f"\nwarning: the arms made {min(steps)}-{max(steps)} steps (more than 10 % apart): the "
                    "comparison mixes the data's effect with the machine's speed; --equal-steps fixes the count")
    cb = r["curation_backbone"]
    rows.append(f"\ncuration backbone (trained on the whole pool): k-NN {cb['knn'] * 100:.1f}, "
                f"linear {cb['linear'] * 100:.1f}")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
