"""The kNN graph of a dataset's embeddings as Ray tasks over its parts (see ``knn.py`` for the search).

A sample is identified by a global id ``gid = offset[shard] + row``, ``row``
its position among the shard's ok index rows. Rows in ``exclude`` (per shard,
e.g. exact duplicates already removed) take no part.

IVF (large pools); the producer tasks (sample, assign, split) read blocks of
whole parts, and what passes between steps goes through the stage's scratch
folder on the dataset's storage (scratch.py), so the driver keeps no
per-part or per-bucket state:
1. ``sample_task``: a seeded share of each part's vectors -> ``train_task``
   trains the coarse cells (spherical k-means) on them;
2. ``assign_task``: each vector's ``nprobe`` nearest cells (to a scratch
   file) and the cell sizes (to the driver);
3. the driver groups nearby cells so a group's vectors fit a task (its
   queries estimated from a sample of the probe lists, ``size_groups``);
4. ``emit_task``: each block of parts splits its vectors by group into one
   scratch file: a group gets the vectors of its cells (database) and every
   vector probing one of its cells (queries); ``group_task`` reads its batch of
   every block's file and searches one group;
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

from webcurate.shards.ray_runtime import cluster_cpus, init_ray, max_node_cpus

from . import knn, scratch
from .embedding_parts import Part, normalized, read_part
from .ray_tasks import BLOCKS_PER_CPU, map_tasks

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

    def block_items(self, blocks: list[list[int]]) -> dict[int, dict]:
        """Per block: its shards and only their offsets and exclusions (not every part's, 1e5 at 1 B)."""
        return {b: {"shards": sh, "plan_args": {s: self.part_args(s) for s in sh}} for b, sh in enumerate(blocks)}

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


def load_block(shards: list[int], *, root: str, dim: int, plan_args: dict, stored: bool = False,
               sidecar: str = "embeddings", views: int = 1) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The vectors of a block of parts, in shard order: (gids (m V,), vectors (m V, D), rows per part)."""
    got = [load(root, s, dim, **plan_args[s], stored=stored, sidecar=sidecar, views=views)[1:] for s in shards]
    if not got:
        return np.zeros(0, np.int64), np.zeros((0, dim), np.float16 if stored else np.float32), []
    return np.concatenate([g for g, _ in got]), np.concatenate([x for _, x in got]), [len(g) for g, _ in got]


def _per_part(shards: list[int], counts: list[int], seed: list[int], rate: float) -> np.ndarray:
    """A seeded share ``rate`` of a block's rows, drawn part by part (blocks of any size draw the same rows)."""
    keep = [np.random.default_rng([seed[0], s, *seed[1:]]).random(n) < rate for s, n in zip(shards, counts)]
    return np.concatenate(keep) if keep else np.zeros(0, bool)


def sample_task(block: int, *, shards: list[int], out: str, rate: float, seed: int, **read) -> int:
    """Write a seeded share ``rate`` of a block's vectors, (m, D) float32 in row order, to ``out``; rows written."""
    _, x, counts = load_block(shards, **read)
    if rate < 1:
        x = x[_per_part(shards, counts, [seed], rate)]
    scratch.write_batches(out, [{"x": x}])
    return len(x)


def train_task(_: int, *, samples: list[str], nlist: int, seed: int, gpu: bool) -> np.ndarray:
    """Coarse cells from the sample files, concatenated in block order: (nlist, D) float32."""
    x = np.concatenate([scratch.read_batch(u, 0)["x"] for u in samples])
    return knn.train_cells(x, min(nlist, len(x)), seed, gpu=gpu)


def assign_task(block: int, *, shards: list[int], out: str, centroids: np.ndarray, nprobe: int, gpu: bool,
                probe_rate: float, seed: int, **read) -> tuple[np.ndarray, np.ndarray]:
    """Write each row's ``nprobe`` cells to ``out``; return (cell sizes (nlist,), sampled probe ids (m, nprobe)).

    The sampled probe lists (a seeded share ``probe_rate`` of the rows) let the
    driver estimate how many queries each cell group will receive.
    """
    gid, x, counts = load_block(shards, **read)
    pi, pd = knn.probes(x, centroids, nprobe, gpu=gpu)
    scratch.write_batches(out, [{"gid": gid, "pi": pi, "pd": pd}])
    picked = pi[_per_part(shards, counts, [seed, 1], probe_rate)]
    return np.bincount(pi[:, 0], minlength=centroids.shape[0]), picked


def emit_task(block: int, *, shards: list[int], probe: str, out: str, cell_group: np.ndarray, groups: list[int],
              **read) -> int:
    """Split a block by the groups of one wave into ``out``: batch j = group ``groups[j]``'s database rows
    and the rows probing its cells. Bytes written."""
    gid, x, _ = load_block(shards, stored=True, **read)
    got = scratch.read_batch(probe, 0)
    gid_p, pi, pd = got["gid"], got["pi"], got["pd"]
    assert np.array_equal(gid, gid_p), "parts changed between two passes"
    probe_groups = cell_group[pi]
    batches = []
    for g in groups:
        is_db = probe_groups[:, 0] == g
        is_q = (probe_groups == g).any(axis=1)
        sel = is_db | is_q
        batches.append({"gid": gid[sel], "x": x[sel], "is_db": is_db[sel], "is_q": is_q[sel],
                        "pi": pi[sel], "pd": pd[sel]})
    return scratch.write_batches(out, batches)


def group_task(group: int, *, buckets: list[str], j: int, centroids: np.ndarray, kk: int, threshold: float,
               gpu: bool) -> tuple:
    """Search one group (batch ``j`` of every block's split file): its queries against its cells.

    Returns ``(q, d, s, bytes held, peak RSS)``.
    """
    parts = list(scratch.read_batches(buckets, j))
    if not parts:
        z = np.zeros(0, np.int64)
        return z, z, np.zeros(0, np.float32), 0, peak_rss_bytes()
    cat = {k: np.concatenate([b[k] for b in parts]) for k in parts[0]}
    del parts
    x = normalized(cat["x"])
    db, q = cat["is_db"], cat["is_q"]
    held = int(x.nbytes + db.sum() * x.shape[1] * 4)
    out = knn.search_block(x[db], cat["gid"][db], x[q], cat["gid"][q], kk, threshold, centroids=centroids,
                           db_cell=cat["pi"][db, 0], q_probe=(cat["pi"][q], cat["pd"][q]), gpu=gpu)
    return (*out, held, peak_rss_bytes())


def block_task(pair: tuple[int, int], *, root: str, dim: int, blocks: list, plan_args: dict, kk: int,
               threshold: float, gpu: bool, sidecar: str = "embeddings", views: int = 1) -> tuple:
    """Exact search of query block ``pair[0]`` against database block ``pair[1]`` (each a list of shards)."""
    read = {"root": root, "dim": dim, "plan_args": plan_args, "sidecar": sidecar, "views": views}
    qg, qx, _ = load_block(blocks[pair[0]], **read)
    dg, dx = (qg, qx) if pair[0] == pair[1] else load_block(blocks[pair[1]], **read)[:2]
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


def producer_blocks(plan: PartPlan, budget_rows: int) -> list[list[int]]:
    """Parts grouped into the blocks the IVF producer tasks read: each fits half a task's row budget, and
    there are ``BLOCKS_PER_CPU`` per cluster CPU where the data allows (fewer files for every group to read)."""
    init_ray()  # may be the stage's first Ray call
    spread = math.ceil(plan.total * plan.views / max(1, BLOCKS_PER_CPU * cluster_cpus()))
    return _blocks(plan, max(1, min(budget_rows // 2, spread) // plan.views))


def _ivf_search(plan: PartPlan, choice, tmp: "scratch.Scratch", *, kk: int, threshold: float, seed: int,
                memory: int, gpus: float, budget_rows: int, live: int, on_result) -> dict:
    """Steps 1-4 of the module docstring; every intermediate goes through ``tmp``, so the driver holds only
    the centroids, the cell sizes, a bounded probe sample and the edges ``on_result`` receives."""
    gpu = gpus > 0
    blocks = producer_blocks(plan, budget_rows)
    nb = len(blocks)
    read = plan.common()
    per_block = plan.block_items(blocks)
    sample_uri = [tmp.file("sample", f"{b:06d}.arrow") for b in range(nb)]
    probe_uri = [tmp.file("probe", f"{b:06d}.arrow") for b in range(nb)]
    rate = min(1.0, choice.train_size / max(live, 1))
    map_tasks(sample_task, range(nb), kwargs={**read, "rate": rate, "seed": seed},
              per_item={b: {**per_block[b], "out": sample_uri[b]} for b in range(nb)}, desc="sample", memory=memory,
              on_result=lambda *_: None)
    centroids = map_tasks(train_task, [0], kwargs={"samples": sample_uri, "nlist": choice.nlist, "seed": seed,
                                                   "gpu": gpu},
                          desc="train cells", memory=memory, gpus=gpus,
                          cpus=min(max_node_cpus(), TRAIN_CPUS))[0]  # one task: let faiss use a node
    tmp.drop("sample")
    sizes = np.zeros(centroids.shape[0], dtype=np.int64)
    picked: dict[int, np.ndarray] = {}

    def add_sizes(b: int, r: tuple) -> None:
        nonlocal sizes
        sizes += r[0]
        picked[b] = r[1]

    map_tasks(assign_task, range(nb), kwargs={**read, "centroids": centroids, "nprobe": choice.nprobe, "gpu": gpu,
                                              "probe_rate": min(1.0, PROBE_SAMPLE / max(live, 1)), "seed": seed},
              per_item={b: {**per_block[b], "out": probe_uri[b]} for b in range(nb)}, desc="assign cells",
              memory=memory, gpus=gpus, on_result=add_sizes)
    probe_sample = np.concatenate([picked[b] for b in range(nb)]) if picked else np.zeros((0, 1), np.int32)
    picked.clear()
    cell_group, groups, est = size_groups(centroids, sizes, probe_sample, live / max(len(probe_sample), 1),
                                          budget_rows, seed, min_groups=min_task_groups(live))
    del probe_sample
    plan_waves = scratch.waves(plan.root, groups, 3 * live * (plan.dim * 2 + 8 * choice.nprobe + 10))
    for w, wave in enumerate(plan_waves):
        split_uri = [tmp.file(f"wave{w}", f"{b:06d}.arrow") for b in range(nb)]
        map_tasks(emit_task, range(nb), kwargs={**read, "cell_group": cell_group, "groups": wave},
                  per_item={b: {**per_block[b], "probe": probe_uri[b], "out": split_uri[b]} for b in range(nb)},
                  desc="split by cell", memory=memory, on_result=lambda *_: None)
        map_tasks(group_task, wave, kwargs={"buckets": split_uri, "centroids": centroids, "kk": kk,
                                            "threshold": threshold, "gpu": gpu},
                  per_item={g: {"j": j} for j, g in enumerate(wave)}, desc="ivf knn", memory=memory, gpus=gpus,
                  on_result=lambda _, r: on_result(r))
        tmp.drop(f"wave{w}")
    return {"index": "ivf", "nlist": int(centroids.shape[0]), "nprobe": choice.nprobe, "groups": groups,
            "largest_group_rows_estimate": est, "blocks": nb,
            "waves": len(plan_waves), "largest_cell": int(sizes.max()) if len(sizes) else 0}


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
        with scratch.Scratch(plan.root, "knn") as tmp:
            info = _ivf_search(plan, choice, tmp, kk=kk, threshold=threshold, seed=seed, memory=memory, gpus=gpus,
                               budget_rows=budget_rows, live=live, on_result=results.append)
    q = np.concatenate([r[0] for r in results]) if results else np.zeros(0, np.int64)
    d = np.concatenate([r[1] for r in results]) if results else np.zeros(0, np.int64)
    s = np.concatenate([r[2] for r in results]) if results else np.zeros(0, np.float32)
    src, dst, sim = knn.merge_edges(q, d, s, max(k, 1))
    info.update(edges=int(len(src)), largest_task_bytes=max((int(r[3]) for r in results), default=0),
                largest_task_rss=max((int(r[4]) for r in results), default=0))
    return Graph(src, dst, sim, info)
