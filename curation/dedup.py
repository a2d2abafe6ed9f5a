"""``webcurate dedup``: which samples to keep, written as the ``dedup`` sidecar.

Methods (the decision is global, computed as Ray tasks; the output per shard):

- ``exact``: samples with the same sha256 (from the index); one kept per group.
- ``copy`` (DINOv2 recipe): exact first, then the kNN graph of the embeddings
  (``k`` neighbours, cosine > ``threshold``; ``auto`` = the threshold ``embed``
  calibrated on augmented copies of this pool), connected components, the
  best-ranked sample of each component kept. With ``pixel_threshold`` the graph
  also holds the edges of the pixel views (``pixel_views.py``: thumbnails of the
  image and of zoomed-in centre crops, any view against any view): pixel-level
  copies that an embedding not trained for copy detection confuses with
  same-class photos.
- ``semdedup`` (Abbas et al. 2023): exact first, then spherical k-means; inside
  each cluster, samples in keep-policy order are dropped when their max cosine
  to an already kept sample is >= 1 - ``eps``.
- ``none``: no self-dedup (only ``against``).
- ``against`` (relative dedup, DINOv2 uses 0.45): pool samples whose cosine to
  any sample of another dataset is > ``against_threshold`` are dropped together
  with their whole component of the pool's kNN graph.

Part columns: key, keep (bool), duplicate_of (the kept sample, or the matched
key of the ``against`` dataset), similarity, reason
(exact|copy|semdedup|against|no_embedding|null), against_dataset. The
embedding-based methods do not keep samples without a usable embedding
(failed, all-zero or constant vector): ``no_embedding``.

Before writing anything, a run that would remove more than ``max_removal``
of the pool stops (unless ``allow_mass_removal``) and prints the component
sizes and the embedding health: a threshold that means nothing on these
embeddings must not silently empty the dataset.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from webcurate.shards.errors import ConfigError
from webcurate.shards.stage import StageResult

from .dedup_graph import Graph, PartPlan, knn_graph
from .embedding_parts import (EmbeddingSet, embedding_set, mismatch_counts, mismatch_warning, normalized,
                              read_index_part, read_part)
from .ray_tasks import map_tasks
from .stage_params import DedupParams, TaskResources

STAGE = "dedup"
REASONS = ("exact", "copy", "semdedup", "against", "no_embedding")
DINOV2_THRESHOLD = 0.6


class MassRemovalError(ConfigError):
    """A dedup/retrieve run would remove more of the pool than allowed; nothing was written."""


def resolve_threshold(params: DedupParams, emb: EmbeddingSet | None) -> tuple[float, str]:
    """The copy threshold and where it came from (``fixed``, ``calibrated`` or ``default``)."""
    if params.threshold != "auto":
        return float(params.threshold), "fixed"
    cal = (emb.info.get("calibration") or {}) if emb is not None else {}
    if cal.get("threshold") is not None:
        return float(cal["threshold"]), "calibrated"
    if emb is not None and params.method == "copy":
        warnings.warn(f"{emb.root}: its embeddings carry no calibration (re-run `webcurate embed` to add one); "
                      f"using DINOv2's copy threshold {DINOV2_THRESHOLD}, which assumes a copy-detection model",
                      stacklevel=3)
    return DINOV2_THRESHOLD, "default"


class Decisions:
    """What happened to the rows something happened to; later steps override earlier ones."""

    def __init__(self) -> None:
        self.steps: list[dict[str, np.ndarray]] = []

    def add(self, gid: np.ndarray, reason: str, key: list | np.ndarray, sim: np.ndarray | None = None,
            keeper: np.ndarray | None = None, dataset: list | np.ndarray | None = None) -> None:
        n = len(gid)
        self.steps.append({
            "gid": np.asarray(gid, np.int64), "reason": np.full(n, reason, dtype=object),
            "key": np.asarray(key, dtype=object).reshape(n),
            "sim": np.full(n, np.nan, np.float32) if sim is None else np.asarray(sim, np.float32),
            "keeper": np.full(n, -1, np.int64) if keeper is None else np.asarray(keeper, np.int64),
            "dataset": np.full(n, None, dtype=object) if dataset is None else np.asarray(dataset, dtype=object)})

    def final(self) -> dict[str, np.ndarray]:
        if not self.steps:
            return {"gid": np.zeros(0, np.int64), "reason": np.zeros(0, object), "key": np.zeros(0, object),
                    "sim": np.zeros(0, np.float32), "keeper": np.zeros(0, np.int64), "dataset": np.zeros(0, object)}
        cat = {k: np.concatenate([s[k] for s in self.steps]) for k in self.steps[0]}
        _, last = np.unique(cat["gid"][::-1], return_index=True)  # the latest decision per row wins
        take = len(cat["gid"]) - 1 - last
        return {k: v[take] for k, v in cat.items()}


def lookup_task(shard: int, *, root: str, rows: np.ndarray) -> tuple:
    """Keys and keep-policy fields of some ok index rows of one shard."""
    part = read_index_part(root, shard)
    return [part.keys[i] for i in rows], part.pixels[rows], part.nbytes[rows]


def node_info(plan: PartPlan, gids: np.ndarray, memory: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(keys, pixels, bytes) of the given sorted gids, read from their shards' index parts."""
    shard = plan.shard_of(gids)
    per = {int(s): {"rows": gids[shard == s] - plan.offsets[int(s)]} for s in np.unique(shard)}
    got = map_tasks(lookup_task, list(per), kwargs={"root": plan.root}, per_item=per, desc="lookup", memory=memory)
    keys = np.empty(len(gids), dtype=object)
    px, nb = np.zeros(len(gids)), np.zeros(len(gids))
    for s, (k, p, b) in got.items():
        sel = shard == s
        keys[sel], px[sel], nb[sel] = k, p, b
    return keys, px, nb


def _with_pixel_edges(graph: Graph, plan: PartPlan, params: DedupParams, res: TaskResources,
                      info: dict[str, Any]) -> Graph:
    """The embedding graph joined with the pixel-view graph (``pixel_views.py``) over the same samples."""
    from .pixel_views import STAGE as PIXELS, run_pixels

    got = run_pixels(plan.root, side=params.pixel_side, zooms=tuple(params.pixel_zooms))
    pixel_plan = PartPlan(plan.root, plan.shards, plan.counts, got["dim"], plan.exclude, sidecar=PIXELS,
                          views=got["views"])
    px = knn_graph(pixel_plan, k=params.k, threshold=float(params.pixel_threshold), index=params.index,
                   nprobe=params.nprobe, seed=params.seed, memory=res.task_memory(), gpus=res.num_gpus)
    a = np.concatenate([graph.src, px.src])
    b = np.concatenate([graph.dst, px.dst])
    s = np.concatenate([graph.sim, px.sim])
    pairs, first = np.unique(np.stack([a, b], axis=1), axis=0, return_index=True)
    info.update(pixel_edges=int(len(px.src)), pixel_only_edges=int(len(pairs) - len(graph.src)),
                pixel_index=px.info.get("index"), pixel_descriptor_failures=int(got["counts"].get("failed", 0)))
    return Graph(pairs[:, 0], pairs[:, 1], s[first].astype(np.float32), graph.info)


def copy_step(plan: PartPlan, params: DedupParams, threshold: float, res: TaskResources, dec: Decisions,
              info: dict[str, Any]):
    """kNN graph + components; the best-ranked member of each component stays."""
    from .components import best_member, components, size_histogram
    from .exact_dedup import rank_of

    graph = knn_graph(plan, k=params.k, threshold=threshold, index=params.index, nprobe=params.nprobe,
                      seed=params.seed, memory=res.task_memory(), gpus=res.num_gpus)
    if params.pixel_threshold is not None:
        graph = _with_pixel_edges(graph, plan, params, res, info)
    nodes, labels = components(graph.src, graph.dst)
    keys, px, nb = node_info(plan, nodes, res.task_memory())
    keeper = best_member(labels, rank_of(list(keys), px, nb, params.keep))
    drop = np.flatnonzero(keeper != np.arange(len(nodes)))
    dec.add(nodes[drop], "copy", keys[keeper[drop]], keeper=nodes[keeper[drop]])
    sizes = np.bincount(labels) if len(labels) else np.zeros(0, np.int64)
    info.update({k: v for k, v in graph.info.items()},
                components=int(plan.total - sum(len(v) for v in plan.exclude.values()) - len(nodes) + len(sizes)),
                largest_components=sorted(sizes.tolist(), reverse=True)[:5],
                component_sizes=size_histogram(labels, singletons=0))
    return graph


def run_dedup(input: str, *, summary: bool = True, resources: TaskResources | dict | None = None,
              **options: Any) -> StageResult:
    """Deduplicate dataset ``input`` and write its ``dedup`` sidecar; ``options`` are ``DedupParams`` fields.

    Re-running with the same parameters on the same embeddings does nothing;
    parts missing after a killed run are recomputed and written. Returns the
    ``StageResult`` (``totals``: total, kept, removed, removed:<reason>;
    ``info``: edges, components, index, threshold, ...).
    """
    from webcurate.shards.dataset import Dataset
    from webcurate.shards.global_stage import GlobalStage
    from webcurate.shards.params import parse

    from .exact_dedup import buckets_for, find_exact

    params = parse(DedupParams, options, "dedup")
    res = resources if isinstance(resources, TaskResources) else parse(TaskResources, resources or {}, "resources")
    ds = Dataset(input)
    shards = ds.completed_shards()
    if not shards:
        raise ConfigError(f"{input} has no completed shards to deduplicate")
    needs_emb = params.method in ("copy", "semdedup") or bool(params.against)
    emb = embedding_set(input, what="dataset") if needs_emb else None
    threshold, source = resolve_threshold(params, emb)
    parameters = {**params.record(), "threshold_used": threshold,
                  **({"embeddings": emb.fingerprint()} if emb is not None else {})}
    stage = GlobalStage(ds, STAGE, parameters, command="dedup")
    if stage.is_complete():
        result = stage.skipped()
        result.message = "already complete with these parameters"
        _print(result, summary)
        return result
    stage.start()
    info: dict[str, Any] = {"method": params.method, "threshold": threshold, "threshold_source": source}
    mem = res.task_memory()
    exact_on = params.method in ("exact", "copy", "semdedup")
    counts, exact = find_exact(input, shards, policy=params.keep, with_duplicates=exact_on, memory=mem,
                               buckets=buckets_for(int((ds.manifest.get("counts") or {}).get("ok", 0)), mem))
    exclude = _per_shard(exact.shard, exact.row)
    plan = PartPlan(ds.root, shards, counts, emb.dim if emb else 0, exclude)
    dec = Decisions()
    e_gid = np.array([plan.offsets[int(s)] for s in exact.shard], np.int64) + exact.row
    e_keep = np.array([plan.offsets[int(s)] for s in exact.keep_shard], np.int64) + exact.keep_row
    dec.add(e_gid, "exact", exact.keep_key, sim=np.ones(len(e_gid)), keeper=e_keep)
    info["exact_removed"] = int(len(e_gid))
    graph = None
    if params.method == "copy":
        graph = copy_step(plan, params, threshold, res, dec, info)
    elif params.method == "semdedup":
        from .semdedup import semdedup_tasks

        (d, k, kk, s), sinfo = semdedup_tasks(plan, eps=params.eps, n_clusters=params.n_clusters, seed=params.seed,
                                              policy=params.keep, memory=mem, gpus=res.num_gpus)
        dec.add(d, "semdedup", kk, sim=s, keeper=k)
        info.update(sinfo)
    if params.method in ("copy", "semdedup"):
        _chain_exact(dec, e_gid, e_keep)
    against = None
    if params.against:
        against = _against_step(plan, params, threshold, res, dec, info, emb, graph, e_gid, e_keep)
    final = dec.final()
    guard(plan, params, final, emb, info)
    per_shard = _per_shard_decisions(plan, final, _gather(plan, final, mem))
    result = stage.write_parts(write_task, per_shard=per_shard, memory=mem, kwargs={
        "dim": plan.dim, "method": params.method, "against": against.vectors if against is not None else None})
    result = stage.finish(result, summary=False, **info)
    warning = mismatch_warning(result.totals, ds.root)
    if warning:
        result.warnings.append(warning)
    _print(result, summary)
    return result


def _per_shard(shard: np.ndarray, row: np.ndarray) -> dict[int, np.ndarray]:
    return {int(s): np.sort(row[shard == s]) for s in np.unique(shard)}


def _chain_exact(dec: Decisions, e_gid: np.ndarray, e_keep: np.ndarray) -> None:
    """Exact duplicates of a sample that was itself dropped point at that sample's survivor."""
    last = dec.steps[-1]
    order = np.argsort(last["gid"])
    g = last["gid"][order]
    pos = np.searchsorted(g, e_keep)
    hit = (pos < len(g)) & (g[np.minimum(pos, max(len(g) - 1, 0))] == e_keep) if len(g) else np.zeros(0, bool)
    if not hit.any():
        return
    src = order[pos[hit]]
    dec.add(e_gid[hit], "exact", last["key"][src], keeper=last["keeper"][src])


def _against_step(plan, params, threshold, res, dec, info, emb, graph, e_gid, e_keep):
    from .dedup_against import against_components, find_hits, read_against

    t_against = read_against(emb, params.against)
    if len(t_against.vectors) == 0:
        warnings.warn(f"--against dataset(s) {', '.join(params.against)} hold no embeddings to compare with",
                      stacklevel=3)
    hit_gid, hit_sim, hit_idx = find_hits(plan, t_against, params.against_threshold, res.task_memory())
    if graph is None:  # components need the pool's own near-duplicate graph
        graph = knn_graph(plan, k=params.k, threshold=threshold, index=params.index, nprobe=params.nprobe,
                          seed=params.seed, memory=res.task_memory(), gpus=res.num_gpus)
    # Exact duplicates share a component with the sample they duplicate.
    src, dst = np.concatenate([graph.src, e_gid]), np.concatenate([graph.dst, e_keep])
    dropped, via = against_components(src, dst, hit_gid, hit_sim)
    own_sim = np.full(len(dropped), np.nan, np.float32)
    is_hit = np.isin(dropped, hit_gid)
    own_sim[is_hit] = hit_sim[via[is_hit]]
    keys = np.array(t_against.keys, dtype=object)[hit_idx[via]] if len(via) else np.zeros(0, object)
    names = np.array(t_against.datasets, dtype=object)[hit_idx[via]] if len(via) else np.zeros(0, object)
    dec.add(dropped, "against", keys, sim=own_sim, dataset=names)
    info.update(against_hits=int(len(hit_gid)), against_removed=int(len(dropped)))
    return t_against


def guard(plan: PartPlan, params: DedupParams, final: dict[str, np.ndarray], emb: EmbeddingSet | None,
          info: dict[str, Any]) -> None:
    """Refuse a run that removes more than ``max_removal`` of the pool, before anything is written."""
    removed = len(final["gid"])
    if params.method in ("copy", "semdedup") and emb is not None:
        removed += int((emb.info.get("counts") or {}).get("failed", 0))
    share = removed / max(plan.total, 1)
    info["removed_share"] = round(share, 4)
    if share <= params.max_removal or params.allow_mass_removal:
        return
    lines = [f"dedup would remove {removed} of {plan.total} samples ({share:.1%}), more than --max-removal "
             f"{params.max_removal:.0%}; nothing was written. Check the threshold ({info.get('threshold')}, "
             f"{info.get('threshold_source')}) and the embeddings, or pass --allow-mass-removal."]
    if info.get("component_sizes"):
        lines.append("  components by size: " + ", ".join(f"{b}: {c}" for b, c in info["component_sizes"] if c))
        lines.append(f"  largest components: {info.get('largest_components')}")
    health = (emb.info.get("health") if emb is not None else None) or {}
    if health:
        lines.append("  embedding health: " + ", ".join(f"{k} {v}" for k, v in health.items() if k != "warning"))
        if health.get("warning"):
            lines.append(f"  {health['warning']}")
    raise MassRemovalError("\n".join(lines))


def _per_shard_decisions(plan: PartPlan, final: dict[str, np.ndarray],
                         gathered: dict[int, Any]) -> dict[int, dict[str, Any]]:
    """Each shard's decided rows, with the refs of the keeper vectors its similarities need."""
    shard = plan.shard_of(final["gid"]) if len(final["gid"]) else np.zeros(0, np.int64)
    out = {}
    for s in np.unique(shard):
        sel = shard == s
        keepers = final["keeper"][sel]
        keepers = keepers[(keepers >= 0) & np.isnan(final["sim"][sel])]
        sources = np.unique(plan.shard_of(keepers)) if len(keepers) else []
        out[int(s)] = {"decided": {"row": final["gid"][sel] - plan.offsets[int(s)],
                                   **{k: v[sel] for k, v in final.items() if k != "gid"}},
                       "gather": [gathered[int(src)] for src in sources if int(src) in gathered]}
    return out


def gather_task(shard: int, *, root: str, dim: int, rows: np.ndarray, offset: int) -> tuple:
    """The stored vectors of some rows of one part: ``(gids, vectors)``."""
    part = read_part(root, shard, dim)
    pos = {int(r): i for i, r in enumerate(part.rows)}
    have = np.array([r for r in rows if int(r) in pos], dtype=np.int64)
    return offset + have, part.stored[[pos[int(r)] for r in have]] if len(have) else part.stored[:0]


def _gather(plan: PartPlan, final: dict[str, np.ndarray], memory: int) -> dict[int, Any]:
    """Object refs of the keepers' vectors (shard -> ref), for the similarities the write tasks compute."""
    need = np.unique(final["keeper"][(final["keeper"] >= 0) & np.isnan(final["sim"])])
    if not len(need) or not plan.dim:
        return {}
    shard = plan.shard_of(need)
    per = {int(s): {"rows": need[shard == s] - plan.offsets[int(s)], "offset": plan.offsets[int(s)]}
           for s in np.unique(shard)}
    return map_tasks(gather_task, list(per), kwargs={"root": plan.root, "dim": plan.dim}, per_item=per,
                     desc="gather", memory=memory, keep_refs=True)


def write_task(shard: int, *, root: str, dim: int, method: str, against: np.ndarray | None,
               decided: dict | None = None, gather: list | None = None) -> dict:
    """Write one shard's dedup part from the decisions about its rows."""
    import pyarrow as pa

    from webcurate.shards.dataset import Dataset

    index = read_index_part(root, shard)
    n = len(index.keys)
    keep = np.ones(n, dtype=bool)
    dup = np.full(n, None, dtype=object)
    sim = np.full(n, np.nan, dtype=np.float32)
    reason = np.full(n, None, dtype=object)
    dataset = np.full(n, None, dtype=object)
    part = read_part(root, shard, dim, index=index) if dim else None
    if part is not None and method in ("copy", "semdedup"):
        missing = np.ones(n, dtype=bool)
        missing[part.rows] = False
        keep[missing], reason[missing] = False, "no_embedding"
    if decided is not None and len(decided["row"]):
        r = decided["row"]
        keep[r], dup[r], sim[r], reason[r], dataset[r] = False, decided["key"], decided["sim"], decided["reason"], \
            decided["dataset"]
        _fill_similarities(r, decided, sim, part, against, gather)
    table = pa.table({
        "key": pa.array(index.keys, pa.string()), "keep": pa.array(keep, pa.bool_()),
        "duplicate_of": pa.array(dup.tolist(), pa.string()),
        "similarity": pa.array(sim, pa.float32(), mask=np.isnan(sim)),
        "reason": pa.array(reason.tolist(), pa.string()),
        "against_dataset": pa.array(dataset.tolist(), pa.string())})
    Dataset(root).write_sidecar(STAGE, shard, table)
    counts = {"total": n, "kept": int(keep.sum()), "removed": int((~keep).sum()),
              **(mismatch_counts(part) if part is not None else {})}
    for name in REASONS:
        c = int(np.sum(reason == name))
        if c:
            counts[f"removed:{name}"] = c
    return {"counts": counts}


def _fill_similarities(r, decided, sim, part, against, gather) -> None:
    """Cosine to the kept sample (copy, semdedup chains) or to the best --against match, where not known yet."""
    import ray

    if part is None:
        return
    pos = np.full(int(max(part.rows.max(initial=-1), r.max(initial=-1))) + 1, -1, dtype=np.int64)
    pos[part.rows] = np.arange(len(part.rows))
    todo = np.isnan(decided["sim"]) & (pos[r] >= 0)
    keeper_rows = todo & (decided["keeper"] >= 0)
    if keeper_rows.any() and gather:
        vecs: dict[int, np.ndarray] = {}
        for gids, stored in ray.get(list(gather)):
            vecs.update(zip(gids.tolist(), normalized(stored)))
        idx = np.flatnonzero(keeper_rows)
        have = np.array([int(decided["keeper"][i]) in vecs for i in idx], dtype=bool)
        idx = idx[have]
        if len(idx):
            kv = np.stack([vecs[int(decided["keeper"][i])] for i in idx])
            sim[r[idx]] = np.einsum("ij,ij->i", part.vectors[pos[r[idx]]], kv)
    other = todo & (decided["reason"] == "against")
    if other.any() and against is not None and len(against):
        from .dedup_against import best_match

        sim[r[other]] = best_match(part.vectors[pos[r[other]]], against)[0]


def _print(result: StageResult, summary: bool) -> None:
    if not summary:
        return
    from webcurate.shards.global_stage import print_stage_table

    keys = ("threshold", "threshold_source", "exact_removed", "edges", "components", "largest_components",
            "index", "clusters", "against_hits", "against_removed", "removed_share")
    rows = [(k, result.info[k]) for k in keys if k in result.info]
    print_stage_table(result, f"dedup ({result.info.get('method', '')}): {result.root}".replace(" ()", ""), rows)
