"""Pixel views in bench/dedup_cifar.py: the product's pixel graph, run_dedup with it, and an audit of the
removals the planted ground truth calls false.

Why the audit: CIFAR-10's train split holds hundreds of near-identical photos of its own
(reposts of one picture, slightly cropped or re-coloured, that its web search
collected), so "precision = planted members among the removed" counts a
detector's correct removal of such a pair as a false one. Without a list of
those natural duplicates the only honest correction is a look: a seeded random
sample of the (removed, kept) pairs that are not planted is drawn side by side
into a numbered grid, a person marks each pair ``same`` (one photograph) or
``different`` in a labels file, and ``audit`` says how much of the "false"
share is real duplicates. The grid and the labels are committed with the
results so anyone can re-judge them.

    labels file: {"pairs": {"<removed name> | <kept name>": "same" | "different", ...}}
"""
from __future__ import annotations

import io
import json
import os
import time

import numpy as np

from dedup_cifar import NONE_T, PIXEL_VIEW_T, Truth, end_to_end, fmt, save, score

SIDE = 64  # each photo drawn at 64 px (CIFAR's 32 px, nearest-neighbour x2)
COLUMNS = 6


def false_pairs(keeper_of: dict[int, int], planted: set[tuple[int, int]]) -> list[tuple[int, int]]:
    """(removed, kept) item pairs whose two ends are not a planted (original, copy) pair, in removed order."""
    return [(r, k) for r, k in sorted(keeper_of.items()) if (min(r, k), max(r, k)) not in planted]


def pair_id(names: list[str], pair: tuple[int, int]) -> str:
    return f"{names[pair[0]]} | {names[pair[1]]}"


def draw_grid(path: str, pairs: list[tuple[int, int]], images: list[bytes]) -> None:
    """Numbered grid of the pairs (removed left, kept right) as a PNG at ``path``."""
    from PIL import Image, ImageDraw

    rows = -(-len(pairs) // COLUMNS)
    cell_w, cell_h = 2 * SIDE + 10, SIDE + 14
    grid = Image.new("RGB", (COLUMNS * cell_w, max(rows, 1) * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for j, pair in enumerate(pairs):
        x0, y0 = (j % COLUMNS) * cell_w, (j // COLUMNS) * cell_h
        draw.text((x0 + 2, y0), str(j), fill="black")
        for t, idx in enumerate(pair):
            im = Image.open(io.BytesIO(images[idx])).convert("RGB").resize((SIDE, SIDE), Image.NEAREST)
            grid.paste(im, (x0 + t * SIDE, y0 + 12))
    grid.save(path)


def audit(names: list[str], images: list[bytes], keeper_of: dict[int, int], planted: set[tuple[int, int]],
          tp: int, removed: int, *, sample: int, grid: str | None, labels: str | None, seed: int = 0) -> dict:
    """Draw the audit sample (and grid); with a labels file, the audited precision estimate and its interval.

    Estimated precision = 1 - F (1 - q) / removed, where F = removed - tp are the
    removals the planted truth calls false and q the share of audited pairs
    judged the same photo (Wilson interval carried through).
    """
    pairs = false_pairs(keeper_of, planted)
    rng = np.random.default_rng(seed)
    picked = [pairs[i] for i in np.sort(rng.choice(len(pairs), min(sample, len(pairs)), replace=False))]
    out = {"false_pairs": len(pairs), "audited": [pair_id(names, p) for p in picked]}
    if grid:
        draw_grid(grid, picked, images)
        out["grid"] = grid
    if not labels:
        return out
    with open(labels) as f:
        marks = json.load(f)["pairs"]
    from scipy.stats import binomtest

    judged = [marks[p] for p in out["audited"] if p in marks]
    same = sum(m == "same" for m in judged)
    lo, hi = binomtest(same, len(judged)).proportion_ci(method="wilson") if judged else (0.0, 1.0)
    false = max(removed - tp, 0)

    def est(q: float) -> float:
        return 1.0 - false * (1.0 - q) / removed if removed else 1.0

    out.update(labelled=len(judged), unlabelled=len(picked) - len(judged), same=same,
               same_share=same / len(judged) if judged else None,
               audited_precision=est(same / len(judged)) if judged else None,
               audited_precision_95=(est(lo), est(hi)) if judged else None)
    return out


def pixel_graph_rows(root: str, names: list[str], truth: Truth, k: int) -> tuple[list[dict], dict]:
    """The product's pixel-view graph (``pixels`` sidecar, distributed kNN) scored at every PIXEL_VIEW_T."""
    from webcurate.curation.dedup_graph import PartPlan, knn_graph
    from webcurate.curation.embedding_parts import read_index_part
    from webcurate.curation.pixel_views import STAGE, run_pixels
    from webcurate.curation.stage_params import TaskResources
    from webcurate.shards.dataset import Dataset
    from webcurate.shards.keys import make_key

    t = time.time()
    got = run_pixels(root)
    shards = Dataset(root).completed_shards()
    keys = {s: read_index_part(root, s).keys for s in shards}
    plan = PartPlan(root, shards, {s: len(keys[s]) for s in shards}, got["dim"], sidecar=STAGE, views=got["views"])
    t_graph = time.time()
    g = knn_graph(plan, k=k, threshold=min(PIXEL_VIEW_T), memory=TaskResources().task_memory())
    pos = {make_key(nm): i for i, nm in enumerate(names)}
    item = np.array([pos[key] for s in shards for key in keys[s]], dtype=np.int64)  # gid -> item
    src, dst = item[g.src], item[g.dst]
    rows = [{"pixel_threshold": th, **score(len(names), src, dst, g.sim > th, truth)} for th in PIXEL_VIEW_T]
    info = {"views": got["views"], "sidecar_seconds": round(t_graph - t, 1),
            "graph_seconds": round(time.time() - t_graph, 1), **g.info}
    return rows, info


def pixel_section(root: str, items: list, truth: Truth, args, out: dict, work: str) -> None:
    """The product's pixel-view graph at PIXEL_VIEW_T, run_dedup end to end with it, and the audit."""
    names = [nm for nm, _, _ in items]
    rows, info = pixel_graph_rows(root, names, truth, args.k)
    print(f"\npixel views: {info['views']} views, sidecar {info['sidecar_seconds']}s, graph "
          f"{info['graph_seconds']}s ({info.get('index')} index, {info.get('edges'):,} edges)")
    print("| pixel views (graph + components) | pixel threshold | planted-pair recall | recall quality / crop / resize "
          "| precision | removed |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| pixel views | {r['pixel_threshold']} | {fmt(r)} |")
    save(args.json, out, pixel_rows=rows, pixel_graph=info)
    print("\n| run_dedup end to end | embedding threshold | pixel threshold | planted-pair recall "
          "| recall quality / crop / resize | precision | removed | seconds |\n|---|---|---|---|---|---|---|---|")
    e2e, keepers = out.get("end_to_end", {}), {}
    for emb_t in (NONE_T, "auto"):
        label = f"pixels {args.pixel_threshold}, embeddings {emb_t}"
        e2e[label] = r = end_to_end(root, names, truth, emb_t, args.k, args.pixel_threshold,
                                    keepers=keepers if emb_t == NONE_T else None)
        if "refused" in r:
            print(f"| copy + pixel views | {emb_t} | {args.pixel_threshold} | refused: {r['refused']} |")
            continue
        print(f"| copy + pixel views | {'none' if emb_t == NONE_T else r['threshold']} | {args.pixel_threshold} "
              f"| {fmt(r)} | {r['seconds']:.1f} |")
        save(args.json, out, end_to_end=e2e)
    alone = e2e[f"pixels {args.pixel_threshold}, embeddings {NONE_T}"]
    if args.audit and "refused" not in alone:
        planted = {(min(o, c), max(o, c)) for o, c in zip(truth.orig.tolist(), truth.copy.tolist())}
        a = audit(names, [d for _, d, _ in items], keepers, planted, alone["tp"], alone["removed"],
                  sample=args.audit, grid=args.audit_grid or os.path.join(work, "audit.png"),
                  labels=args.audit_labels)
        print(f"audit: {a['false_pairs']} (removed, kept) pairs not planted; {len(a['audited'])} drawn into "
              f"{a['grid']}")
        if a.get("labelled"):
            lo, hi = a["audited_precision_95"]
            print(f"audit labels: {a['same']} of {a['labelled']} judged the same photo ({a['unlabelled']} unlabelled); "
                  f"audited precision {a['audited_precision']:.3f} (95 % {lo:.3f}-{hi:.3f}) vs {alone['precision']:.3f} "
                  f"against the planted pairs alone")
        save(args.json, out, audit=a)
