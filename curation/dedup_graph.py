"""The kNN graph of a dataset's embeddings as Ray tasks over its parts (see ``knn.py`` for the search).

A sample is identified by a global id ``gid = offset[shard] + row``, ``row``
its position among the shard's ok index rows. Rows in ``exclude`` (per shard,
e.g. exact duplicates already removed) take no part.

IVF (large pools):
1. ``sample_task``: a seeded share of each part's vectors -> ``train_task``
   trains the coarse cells (spherical k-means) on them;
2. ``assign_task``: each vector's ``nprobe`` nearest cells (kept in the
   object store) and the cell sizes (to the driver);
3. the driver groups nearby cells so a group's vectors fit a task (its
   queries estimated from a sample of the probe lists, ``size_groups``);
4. ``emit_task``: each part splits its vectors by group: a group gets the
   vectors of its cells (database) and every vector probing one of its cells
   (queries); ``group_task`` searches one group;
5. ``merge_edges`` keeps each query's best k over the groups (each task
   searched k+1 and dropped the self-hit, so only edges reach the driver).

Exact (small pools, or ``--index flat``): database and query blocks of whole
parts, every query block against every database block (``block_task``).
"""
from __future__ import annotations

import math
import resource
import warnings
from dataclasses import dataclass, field

import numpy as np

from webcurate.shards.ray_runtime import cluster_cpus, max_node_cpus

from . import knn
from .embedding_parts import Part, normalized, read_part
from .ray_tasks import map_tasks, waves

# Rows whose probe lists the driver samples to size the cell groups (~8 MB at nprobe 10).
PROBE_SAMPLE = 100_000
# Cell groups per cluster CPU at least: with one group per CPU the largest (cells are uneven) runs alone at
# the end; 1M x 384 on 2 CPUs had 2 groups and took 2.4x the wall of the per-part search
# (bench/results/curation_scale.md). Groups below MIN_GROUP_ROWS are not worth a task of their own.
GROUPS_PER_CPU = 2
MIN_GROUP_ROWS = 50_000
GROUPING_ROUNDS = 4
TRAIN_CPUS = 8


@dataclass
class PartPlan:
    """The parts a global stage reads: shards, ok rows per shard (-> gids), dim, rows left out."""

    root: str
    shards: list[int]
    counts: dict[int, int]
    dim: int
    exclude: dict[int, np.ndarray] = field(default_factory=dict)
    # Another sidecar of the embeddings schema, whose rows hold ``views`` vectors of ``dim`` each
    # (pixel_views.py); every view is searched, an edge joins the samples (gids), never two views.
    sidecar: str = "embeddings"
    views: int = 1

    def __post_init__(self) -> None:
        self.offsets = {}
        total = 0
        for s in self.shards:
            self.offsets[s] = total
            total += int(self.counts.get(s, 0))
        self.total = total

    def part_args(self, shard: int) -> dict:
        return {"offset": self.offsets[shard], "exclude": self.exclude.get(shard, np.zeros(0, np.int64))}

    def common(self) -> dict:
        """What every task needs to read a part: root, dim, sidecar, views."""
        return {"root": self.root, "dim": self.dim, "sidecar": self.sidecar, "views": self.views}

    def shard_of(self, gid: np.ndarray) -> np.ndarray:
        """Shard of each gid."""
        starts = np.array([self.offsets[s] for s in self.shards], dtype=np.int64)
        return np.asarray(self.shards, dtype=np.int64)[np.searchsorted(starts, gid, side="right") - 1]


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux: ru_maxrss is in KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def load(root: str, shard: int, dim: int, offset: int, exclude: np.ndarray, stored: bool = False,
         sidecar: str = "embeddings", views: int = 1) -> tuple[Part, np.ndarray, np.ndarray]:
    """A part's vectors minus ``exclude``: (part, gids (m V,), vectors (m V, D) float32 normalised).

    ``stored``: the vectors as stored instead (float16 mostly): what is shipped to other
    tasks, which apply ``normalized`` and so compute on the very same bits. With ``views``
    V > 1 each row's V vectors follow each other, all under the row's gid (so a search
    drops a sample's own views as self-hits).
    """
    part = read_part(root, shard, dim * views, sidecar=sidecar)
    keep = ~np.isin(part.rows, exclude)
    gid, x = offset + part.rows[keep], (part.stored if stored else part.vectors)[keep]
    if views > 1:
        gid, x = np.repeat(gid, views), x.reshape(-1, dim)
        x = x if stored else normalized(x)
    return part, gid, x


def sample_task(shard: int, *, root: str, dim: int, rate: float, seed: int, offset: int,
                exclude: np.ndarray, sidecar: str = "embeddings", views: int = 1) -> np.ndarray:
    """A seeded share ``rate`` of one part's vectors, in row order: (m, D) float32 (all of them at rate 1)."""
    _, _, x = load(root, shard, dim, offset, exclude, sidecar=sidecar, views=views)
    if rate >= 1:
        return x
    return x[np.random.default_rng([seed, shard]).random(len(x)) < rate]


def train_task(_: int, *, samples: list, nlist: int, seed: int, gpu: bool) -> np.ndarray:
    """Coarse cells from the concatenated samples (shard order): (nlist, D) float32."""
    import ray

    x = np.concatenate(ray.get(samples))
    return knn.train_cells(x, min(nlist, len(x)), seed, gpu=gpu)


def assign_task(shard: int, *, root: str, dim: int, centroids: np.ndarray, nprobe: int, offset: int,
                exclude: np.ndarray, gpu: bool, probe_rate: float, seed: int, sidecar: str = "embeddings",
                views: int = 1) -> tuple:
    """``((cell sizes (nlist,), sampled probe ids (m, nprobe)), (gids, probe ids, probe sims))`` of one part.

    The sampled probe lists (a seeded share ``probe_rate`` of the rows) let the
    driver estimate how many queries each cell group will receive.
    """
    _, gid, x = load(root, shard, dim, offset, exclude, sidecar=sidecar, views=views)
    pi, pd = knn.probes(x, centroids, nprobe, gpu=gpu)
    picked = pi[np.random.default_rng([seed, shard, 1]).random(len(pi)) < probe_rate]
    return (np.bincount(pi[:, 0], minlength=centroids.shape[0]), picked), (gid, pi, pd)


def emit_task(shard: int, *, root: str, dim: int, probe, cell_group: np.ndarray, groups: list[int], offset: int,
              exclude: np.ndarray, sidecar: str = "embeddings", views: int = 1) -> tuple:
    """One part split by the groups of one wave: per group, its database rows and the rows probing its cells."""
    import ray

    _, gid, x = load(root, shard, dim, offset, exclude, stored=True, sidecar=sidecar, views=views)
    gid_p, pi, pd = ray.get(probe) if not isinstance(probe, tuple) else probe
    assert np.array_equal(gid, gid_p), "parts changed between two passes"
    probe_groups = cell_group[pi]
    out = []
    for g in groups:
        is_db = probe_groups[:, 0] == g
        is_q = (probe_groups == g).any(axis=1)
        sel = is_db | is_q
        out.append({"gid": gid[sel], "x": x[sel], "is_db": is_db[sel], "is_q": is_q[sel],
                    "pi": pi[sel], "pd": pd[sel]})
    return tuple(out) if len(groups) > 1 else out[0]


def group_task(group: int, *, buckets: list, centroids: np.ndarray, kk: int, threshold: float,
               gpu: bool) -> tuple:
    """Search one group: its queries against its cells. Returns ``(q, d, s, bytes held, peak RSS)``."""
    import ray

    parts = [b for b in ray.get(buckets) if len(b["gid"])]
    if not parts:
        z = np.zeros(0, np.int64)
        return z, z, np.zeros(0, np.float32), 0, peak_rss_bytes()
    cat = {k: np.concatenate([b[k] for b in parts]) for k in parts[0]}
    x = normalized(cat["x"])
    db, q = cat["is_db"], cat["is_q"]
    held = int(x.nbytes + db.sum() * x.shape[1] * 4)
    out = knn.search_block(x[db], cat["gid"][db], x[q], cat["gid"][q], kk, threshold, centroids=centroids,
                           db_cell=cat["pi"][db, 0], q_probe=(cat["pi"][q], cat["pd"][q]), gpu=gpu)
    return (*out, held, peak_rss_bytes())


def block_task(pair: tuple[int, int], *, root: str, dim: int, blocks: list, plan_args: dict, kk: int,
               threshold: float, gpu: bool, sidecar: str = "embeddings", views: int = 1) -> tuple:
    """Exact search of query block ``pair[0]`` against database block ``pair[1]`` (each a list of shards)."""
    def read(shards: list[int]) -> tuple[np.ndarray, np.ndarray]:
        got = [load(root, s, dim, **plan_args[s], sidecar=sidecar, views=views)[1:] for s in shards]
        if not got:
            return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
        return np.concatenate([g for g, _ in got]), np.concatenate([x for _, x in got])

    qg, qx = read(blocks[pair[0]])
    dg, dx = (qg, qx) if pair[0] == pair[1] else read(blocks[pair[1]])
    out = knn.search_block(dx, dg, qx, qg, kk, threshold, gpu=gpu)
    return (*out, int(qx.nbytes + (dx.nbytes if pair[0] != pair[1] else 0)), peak_rss_bytes())


def group_rows(cell_group: np.ndarray, sizes: np.ndarray, probe_sample: np.ndarray, scale: float,
               groups: int) -> np.ndarray:
    """(groups,) estimated rows per group: its database (exact) + the queries probing one of its cells.

    ``probe_sample`` (m, nprobe) are the probe lists of a random share of the
    rows, each standing for ``scale`` rows; a query counts once per group.
    """
    db = np.bincount(cell_group, weights=sizes, minlength=groups)
    if len(probe_sample) == 0:
        return db
    g = np.sort(cell_group[probe_sample], axis=1)
    first = np.ones_like(g, dtype=bool)
    first[:, 1:] = g[:, 1:] != g[:, :-1]
    return db + scale * np.bincount(g[first], minlength=groups)


def size_groups(centroids: np.ndarray, sizes: np.ndarray, probe_sample: np.ndarray, scale: float,
                budget_rows: int, seed: int, min_groups: int = 1) -> tuple[np.ndarray, int, int]:
    """Cell groups whose largest estimated task (database + queries) fits ``budget_rows``.

    Starts from 3x the database rows (queries visit ~2-3 groups), or
    ``min_groups`` if more, and adds groups until the estimate fits; more
    groups spread a query over more of them, hence the re-estimate each round.
    Returns ``(cell_group, groups, largest estimated rows)``.
    """
    live = int(sizes.sum())
    groups = min(len(sizes), max(1, min_groups, math.ceil(3 * live / budget_rows)))
    for _ in range(GROUPING_ROUNDS):
        cell_group = knn.group_cells(centroids, sizes, groups, seed)
        largest = float(group_rows(cell_group, sizes, probe_sample, scale, groups).max(initial=0))
        if largest <= budget_rows or groups >= len(sizes):
            break
        groups = min(len(sizes), math.ceil(groups * largest / budget_rows * 1.05))
    return cell_group, groups, int(largest)


def min_task_groups(live: int) -> int:
    """Cell groups enough to keep every cluster CPU busy to the end, for ``live`` database rows."""
    return max(1, min(int(GROUPS_PER_CPU * cluster_cpus()), live // MIN_GROUP_ROWS))


@dataclass
class Graph:
    """Edges above the threshold (src < dst gids, cosine) and how they were found."""

    src: np.ndarray
    dst: np.ndarray
    sim: np.ndarray
    info: dict


def _blocks(plan: PartPlan, budget_rows: int) -> list[list[int]]:
    blocks, cur, rows = [], [], 0
    for s in plan.shards:
        n = plan.counts.get(s, 0)
        if cur and rows + n > budget_rows:
            blocks.append(cur)
            cur, rows = [], 0
        cur.append(s)
        rows += n
    return blocks + ([cur] if cur else [])


def knn_graph(plan: PartPlan, *, k: int, threshold: float, index: str = "auto", nprobe: int | None = None,
              seed: int = 0, memory: int, gpus: float = 0.0) -> Graph:
    """The thresholded kNN graph over the plan's parts (see the module docstring)."""
    samples = plan.total - sum(len(v) for v in plan.exclude.values())
    live = samples * plan.views  # vectors searched
    choice = knn.choose_index(max(live, 0), kind=index, nprobe=nprobe)
    if k > samples - 1 > 0:
        warnings.warn(f"k={k} is larger than the {samples - 1} other samples searched; using k={samples - 1}",
                      stacklevel=3)
    k = int(min(k, max(samples - 1, 0)))
    kk = int(min(k + plan.views, max(live, 1)))  # + the query itself (its V views) as self-hits
    gpu = gpus > 0
    common = plan.common()
    per_part = {s: plan.part_args(s) for s in plan.shards}
    # A group task holds its R rows as float16 twice (buckets, concatenated) and float32 twice (normalised,
    # query copy), its D database rows twice more in float32 (copy, faiss lists): 12 R + 8 D bytes per
    # dimension, D ~ R / 5 measured at 1M (bench/results/curation_scale.md) -> ~14 R.
    budget_rows = max(1024, memory // (14 * max(plan.dim, 1)))
    results: list[tuple] = []
    if choice.kind == "flat":
        blocks = _blocks(plan, budget_rows // (2 * plan.views))
        pairs = [(i, j) for i in range(len(blocks)) for j in range(len(blocks))]
        map_tasks(block_task, pairs, kwargs={**common, "blocks": blocks, "plan_args": per_part, "kk": kk,
                                            "threshold": threshold, "gpu": gpu},
                  desc="exact knn", memory=memory, gpus=gpus, on_result=lambda _, r: results.append(r))
        info = {"index": "flat", "tasks": len(pairs)}
    else:
        rate = min(1.0, choice.train_size / max(live, 1))
        samples = map_tasks(sample_task, plan.shards, kwargs={**common, "rate": rate, "seed": seed},
                            per_item=per_part, desc="sample", memory=memory, keep_refs=True)
        centroids = map_tasks(train_task, [0], kwargs={"samples": [samples[s] for s in plan.shards],
                                                       "nlist": choice.nlist, "seed": seed, "gpu": gpu},
                              desc="train cells", memory=memory, gpus=gpus,
                              cpus=min(max_node_cpus(), TRAIN_CPUS))[0]  # one task: let faiss use a node
        del samples
        assigned = map_tasks(assign_task, plan.shards, kwargs={
                                 **common, "centroids": centroids, "nprobe": choice.nprobe, "gpu": gpu,
                                 "probe_rate": min(1.0, PROBE_SAMPLE / max(live, 1)), "seed": seed},
                             per_item=per_part, desc="assign cells", memory=memory, num_returns=2,
                             gpus=gpus, keep_refs=True)
        import ray

        sizes = np.zeros(centroids.shape[0], dtype=np.int64)
        probe_sample = []
        for s in plan.shards:
            part_sizes, picked = ray.get(assigned[s][0])
            sizes += part_sizes
            probe_sample.append(picked)
        probe_sample = np.concatenate(probe_sample)
        cell_group, groups, est = size_groups(centroids, sizes, probe_sample, live / max(len(probe_sample), 1),
                                              budget_rows, seed, min_groups=min_task_groups(live))
        del probe_sample
        plan_waves = waves(groups, 3 * live * plan.dim * 2)  # float16 rows, ~3 copies over the groups
        for wave in plan_waves:
            emitted = map_tasks(emit_task, plan.shards,
                                kwargs={**common, "cell_group": cell_group, "groups": wave},
                                per_item={s: {**per_part[s], "probe": assigned[s][1]} for s in plan.shards},
                                desc="split by cell", memory=memory, num_returns=len(wave), keep_refs=True)
            per_group = {g: {"buckets": [emitted[s][j] if len(wave) > 1 else emitted[s] for s in plan.shards]}
                         for j, g in enumerate(wave)}
            del emitted
            map_tasks(group_task, wave, kwargs={"centroids": centroids, "kk": kk, "threshold": threshold,
                                                "gpu": gpu},
                      per_item=per_group, desc="ivf knn", memory=memory, gpus=gpus,
                      on_result=lambda _, r: results.append(r))
            del per_group
        del assigned
        info = {"index": "ivf", "nlist": int(centroids.shape[0]), "nprobe": choice.nprobe, "groups": groups,
                "largest_group_rows_estimate": est,
                "waves": len(plan_waves), "largest_cell": int(sizes.max()) if len(sizes) else 0}
    q = np.concatenate([r[0] for r in results]) if results else np.zeros(0, np.int64)
    d = np.concatenate([r[1] for r in results]) if results else np.zeros(0, np.int64)
    s = np.concatenate([r[2] for r in results]) if results else np.zeros(0, np.float32)
    src, dst, sim = knn.merge_edges(q, d, s, max(k, 1))
    info.update(edges=int(len(src)), largest_task_bytes=max((int(r[3]) for r in results), default=0),
                largest_task_rss=max((int(r[4]) for r in results), default=0))
    return Graph(src, dst, sim, info)
