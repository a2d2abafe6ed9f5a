"""Per-step training metrics: parts under ``<output>/metrics/``, the log line, batch digests.

``metrics/<first step>-<last step>.jsonl`` holds one JSON record per step
(losses, lr, wd, momentum, teacher temp, img/s, collapse monitors, a digest of
each worker's batch), one part per flush: appending a whole file per flush
keeps long runs from rewriting their history (S3 objects cannot be appended
to). ``read_metrics`` joins the parts; a resumed run first cuts them back to
its checkpoint's step (``truncate_metrics``).
"""
from __future__ import annotations

import json
from typing import Any

from webcurate.shards import storage

METRICS_DIR = "metrics"
# Shown in the per-step line when present, with their formats.
LOG_KEYS = [("loss", ".4f"), ("dino_local_loss", ".4f"), ("dino_global_loss", ".4f"), ("ibot_loss", ".4f"),
            ("koleo_loss", ".4f"), ("lr", ".2e"), ("wd", ".3g"), ("momentum", ".4f"), ("teacher_temp", ".3f"),
            ("img_per_s", ".1f"), ("teacher_entropy", ".3f"), ("kl_to_uniform", ".3f"), ("embedding_std", ".3f"),
            ("effective_rank", ".1f"), ("alignment", ".3f"), ("uniformity", ".2f")]


def metric_parts(output: str) -> list[tuple[int, int, str]]:
    """``(first, last, uri)`` of the metrics parts under ``output``, by first step."""
    parts = []
    for e in storage.list_dir(storage.join(output, METRICS_DIR)):
        stem = e.name[:-len(".jsonl")] if e.name.endswith(".jsonl") else ""
        first, _, last = stem.partition("-")
        if first.isdigit() and last.isdigit():
            parts.append((int(first), int(last), e.uri))
    return sorted(parts)


def read_metrics(output: str, upto_step: int | None = None) -> list[dict[str, Any]]:
    """The per-step records of a run (``metrics/*.jsonl``), in step order, up to ``upto_step``."""
    by_step: dict[int, dict[str, Any]] = {}
    for _, _, uri in metric_parts(output):
        for line in storage.read_bytes(uri).decode().splitlines():
            if line.strip():
                r = json.loads(line)
                if upto_step is None or r["step"] <= upto_step:
                    by_step[r["step"]] = r
    return [by_step[k] for k in sorted(by_step)]


def write_metrics(output: str, records: list[dict[str, Any]]) -> None:
    """Write ``records`` (consecutive steps) as one part."""
    if not records:
        return
    data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()
    name = f"{records[0]['step']:08d}-{records[-1]['step']:08d}.jsonl"
    storage.write_bytes(storage.join(output, METRICS_DIR, name), data)


def truncate_metrics(output: str, step: int) -> None:
    """Drop records past ``step`` (written by a run that died after its last checkpoint)."""
    for first, last, uri in metric_parts(output):
        if first > step:
            storage.delete(uri)
        elif last > step:
            keep = [ln for ln in storage.read_bytes(uri).decode().splitlines()
                    if ln.strip() and json.loads(ln)["step"] <= step]
            write_metrics(output, [json.loads(ln) for ln in keep])
            storage.delete(uri)


def batch_digest(batch: dict[str, Any]) -> list[float]:
    """A cheap fingerprint of a batch (sums of crops and masks) to compare batch order across runs."""
    out = [float(batch["global_crops"].double().sum())]
    lc = batch.get("local_crops")
    out.append(float(lc.double().sum()) if lc is not None and lc.numel() else 0.0)
    m = batch.get("masks")
    out.append(float(m.sum()) if m is not None else 0.0)
    return out


def format_line(rec: dict[str, Any]) -> str:
    """The per-step log line of rank 0."""
    parts = [f"step {rec['step']}/{rec['max_steps']}", f"ep {rec['epoch']}"]
    parts += [f"{k}={rec[k]:{f}}" for k, f in LOG_KEYS if k in rec and isinstance(rec[k], (int, float))]
    return "[train] " + " ".join(parts)


__all__ = ["METRICS_DIR", "metric_parts", "read_metrics", "write_metrics", "truncate_metrics", "batch_digest",
           "format_line"]
