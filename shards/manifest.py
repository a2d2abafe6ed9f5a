"""``_manifest.json``: what made a dataset, its lineage, counts and progress.

The per-shard output files are the ground truth for completion (a shard is
complete when its index parquet exists; a sidecar part when its parquet
exists). The manifest is the readable summary the driver keeps in step with
them; only the driver writes it, always as a whole object (atomic).
"""
from __future__ import annotations

import datetime as _dt
import json
import subprocess
from functools import lru_cache
from typing import Any

from . import storage

MANIFEST_NAME = "_manifest.json"
FORMAT = "webcurate-dataset/1"


@lru_cache(maxsize=1)
def code_version() -> str:
    """Package version plus the git commit when running from a checkout."""
    try:
        from importlib.metadata import version

        v = version("webcurate")
    except Exception:
        v = "unknown"
    try:
        import os

        here = os.path.dirname(os.path.abspath(__file__))
        sha = subprocess.run(
            ["git", "-C", here, "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
        if sha:
            v = f"{v}+g{sha}"
    except Exception:
        pass
    return v


def normalize(parameters: dict[str, Any]) -> dict[str, Any]:
    """Parameters as they read back from JSON (tuples become lists), so a
    re-run's parameters compare equal to the recorded ones."""
    return json.loads(json.dumps(parameters, sort_keys=True, default=str))


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def manifest_uri(root: str) -> str:
    return storage.join(root, MANIFEST_NAME)


def load(root: str) -> dict[str, Any] | None:
    """The manifest of the dataset at ``root``, or None when there is none."""
    try:
        data = storage.read_bytes(manifest_uri(root))
    except FileNotFoundError:
        return None
    try:
        return json.loads(data)
    except json.JSONDecodeError as e:
        raise storage.StorageError(f"{manifest_uri(root)} is not valid JSON: {e}") from e


def save(root: str, manifest: dict[str, Any]) -> None:
    manifest["updated"] = now_iso()
    data = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
    storage.write_bytes(manifest_uri(root), data)


def new(stage: str, parameters: dict[str, Any], parent: str | None, num_shards: int, **extra: Any) -> dict[str, Any]:
    """A fresh manifest for a dataset made by ``stage``."""
    parameters = normalize(parameters)
    m = {
        "format": FORMAT,
        "stage": stage,
        "parameters": parameters,
        "parent": parent,
        "code_version": code_version(),
        "created": now_iso(),
        "num_shards": num_shards,
        "completed_shards": [],
        "shard_stats": {},
        "counts": {},
        "stages": {},
    }
    m.update(extra)
    return m


def sum_counts(stats: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Add up the integer counters of per-shard stats."""
    total: dict[str, int] = {}
    for s in stats.values():
        for k, v in (s.get("counts") or {}).items():
            total[k] = total.get(k, 0) + int(v)
    return dict(sorted(total.items()))


def record_shard(root: str, shard: int, stats: dict[str, Any], stage: str | None = None) -> dict[str, Any]:
    """Mark ``shard`` complete (in the dataset, or in sidecar ``stage``) with its stats.

    Re-reads the manifest first so concurrent stages on one dataset lose as
    little as possible; returns the saved manifest.
    """
    m = load(root)
    if m is None:
        raise storage.StorageError(f"no {MANIFEST_NAME} under {root}")
    target = m if stage is None else m.setdefault("stages", {}).setdefault(stage, {})
    done = set(target.get("completed_shards", []))
    done.add(int(shard))
    target["completed_shards"] = sorted(done)
    target.setdefault("shard_stats", {})[f"{int(shard):05d}"] = stats
    target["counts"] = sum_counts(target["shard_stats"])
    save(root, m)
    return m


def record_stage(root: str, stage: str, parameters: dict[str, Any], **info: Any) -> dict[str, Any]:
    """Create or update the entry of sidecar stage ``stage`` in the manifest."""
    m = load(root)
    if m is None:
        raise storage.StorageError(f"no {MANIFEST_NAME} under {root}")
    parameters = normalize(parameters)
    entry = m.setdefault("stages", {}).setdefault(stage, {})
    if entry.get("parameters") not in (None, parameters):
        # Parameters changed: earlier parts were made differently; keep the
        # history but start counting completion again.
        entry.setdefault("history", []).append(
            {k: entry.get(k) for k in ("parameters", "completed_shards", "counts", "finished")}
        )
        entry["completed_shards"] = []
        entry["shard_stats"] = {}
    entry["parameters"] = parameters
    entry["code_version"] = code_version()
    entry.setdefault("started", now_iso())
    entry.update(info)
    save(root, m)
    return m
