"""`webcurate shard --append`: a URL list's new URLs become new shards of an existing dataset.

The existing shards are not touched. URLs the dataset already holds (in the
shards that existed before this append) are counted and reported, not fetched.
New keys avoid every key already used, so keys stay unique in the dataset.
Each append is recorded in the manifest (``appends``: its input, first shard,
shard count, added and already-present counts) before any work, so a killed
append re-run with the same command resumes the same shards with the same
rows; an append already complete does nothing.
"""
from __future__ import annotations


import pyarrow as pa
import pyarrow.compute as pc

from . import manifest as manifest_mod
from .dataset import Dataset
from .download import FetchOptions
from .errors import DatasetError
from .image_ops import ImageOptions
from .ingest import IngestResult, ingest_shard, mark_cross_shard_duplicates, task_fetch_options
from .inputs import read_url_list
from .progress import print_summary
from .ray_runtime import cluster_cpus, init_ray
from .stage import raise_if_failed, run_shards


def _existing(ds: Dataset, below: int) -> tuple[set[str], set[str]]:
    """Sources and keys of the shards before ``below``."""
    sources: set[str] = set()
    keys: set[str] = set()
    for shard in ds.completed_shards():
        if shard < below:
            t = ds.read_index(shard, columns=["key", "source"])
            sources.update(s for s in t["source"].to_pylist() if s)
            keys.update(t["key"].to_pylist())
    return sources, keys


def append_urls(url_list: str, output: str, *, url_col: str = "url", caption_col: str | None = "caption",
                label_col: str | None = None, workers: int | None = None, threads: int = 16,
                fetch_opts: FetchOptions = FetchOptions(), max_task_pixels: int | None = None,
                summary: bool = True) -> IngestResult:
    """Append ``url_list``'s URLs that ``output`` does not hold yet as new shards of ``output``."""
    ds = Dataset(output)
    m = ds.manifest
    params = m.get("parameters") or {}
    if m.get("stage") != "shard" or params.get("kind") != "urls":
        raise DatasetError(f"{output} is not a dataset made from a URL list by `webcurate shard`; cannot append")
    entry = next((a for a in m.get("appends", []) if a.get("input") == url_list), None)
    first_shard = int(entry["first_shard"]) if entry else int(m.get("num_shards", 0))
    sources, keys = _existing(ds, first_shard)
    table = read_url_list(url_list, url_col=url_col, caption_col=caption_col, label_col=label_col, used=keys)
    present = pa.array([s in sources for s in table["source"].to_pylist()], pa.bool_())
    new = table.filter(pc.invert(present))
    shard_size = int(params.get("shard_size") or 1000)
    n_shards = -(-new.num_rows // shard_size)
    if entry is None:
        entry = {"input": url_list, "first_shard": first_shard, "num_shards": n_shards, "added": new.num_rows,
                 "already_present": table.num_rows - new.num_rows, "time": manifest_mod.now_iso()}
        m.setdefault("appends", []).append(entry)
        m["num_shards"] = max(int(m.get("num_shards", 0)), first_shard + n_shards)
        manifest_mod.save(output, m)
    elif entry["added"] != new.num_rows:
        raise DatasetError(f"{url_list} was appended to {output} before with {entry['added']} new URLs, now it "
                           f"gives {new.num_rows}: it changed since; append it under another name")
    image = {k: v for k, v in (params.get("image") or {}).items()}
    if max_task_pixels:
        image["max_task_pixels"] = max_task_pixels
    shards = list(range(first_shard, first_shard + n_shards))
    done = set(ds.reload().completed_shards()) & set(shards)
    init_ray()
    in_flight = max(1, min(workers or int(cluster_cpus()), len(set(shards) - done) or 1))
    result = run_shards(
        ingest_shard, shards, done=done, desc="append", workers=workers,
        kwargs=dict(root=output, table=new, shard_size=shard_size, base=None, image_opts=ImageOptions(**image),
                    fetch_opts=task_fetch_options(fetch_opts, in_flight), threads=threads,
                    dedup=bool(params.get("dedup", True)), first_shard=first_shard),
        on_done=lambda s, st: manifest_mod.record_shard(output, s, st),
    )
    if not result.failed and params.get("dedup", True):
        mark_cross_shard_duplicates(output)  # later rows only: the old shards stay as they were
    m = manifest_mod.load(output) or {}
    if summary:
        print_summary(result, title=f"append {url_list} -> {output}", totals=m.get("counts", {}))
        print(f"{entry['already_present']} URL(s) already in {output}: not fetched again; "
              f"{entry['added']} new in shard(s) {first_shard:05d}..{first_shard + max(n_shards, 1) - 1:05d}")
    raise_if_failed(result)
    return IngestResult(output, n_shards, m.get("counts", {}), result.seconds, result.failed, len(result.done),
                        already_present=int(entry["already_present"]))

