"""`webcurate curate --config curate.yaml`: the whole curation flow in one command.

embed -> filter (when configured) -> dedup -> retrieve (when seeds are given)
-> cluster -> sample -> export, then the HTML report. Every step is the same function its own
subcommand runs, so every step resumes: a step whose output is complete
with the same parameters does nothing, a step killed half-way continues
where it stopped. A step can be turned off with ``<step>: false``. The keys
are documented in ``docs/examples/curate.yaml``; unknown keys are refused so a
typo never silently falls back to a default.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from webcurate.shards.errors import ConfigError

# Allowed keys per section, with defaults (None = the step function's default).
SECTIONS: dict[str, dict[str, Any]] = {
    "embed": {"model": None, "weights": None, "checkpoint": None, "random_init": False, "image_size": 224,
              "batch_size": 64, "num_gpus": 0.0, "concurrency": None, "dtype": "float16"},
    "dedup": {"method": "copy", "k": 64, "threshold": 0.6, "against": [], "against_threshold": 0.45,
              "eps": 0.07, "keep": "largest", "n_clusters": None, "index": "auto", "nprobe": None, "seed": 0},
    "retrieve": {"seeds": [], "k": 4, "mode": "sample", "n_clusters": None, "per_cluster": 100,
                 "min_seed_per_cluster": 3, "exclude_duplicates": True, "min_score": None, "seed": 0},
    "cluster": {"levels": [10000, 1000, 100], "resampling_steps": 10, "sample_size": None,
                "sample_strategy": "closest", "niter": 20, "seed": 0, "method": "auto", "subset": "auto"},
    "sample": {"target": None, "strategy": "random", "seed": 0, "min_score": [], "weight_by": None},
    "export": {"selection": "auto", "workers": None},
    "report": {"output": None},
}
# `filter:` (quality filters, curation/quality_params.FilterParams) is off unless the config has the section.
TOP_LEVEL = {"input", "output", "ray_address", "filter", *SECTIONS}
# The stage (sidecar) each step writes, to tell "ran" from "was complete".
_SIDECAR = {"embed": "embeddings", "filter": "filter", "dedup": "dedup", "retrieve": "retrieve",
            "cluster": "clusters", "sample": "sample"}


@dataclass
class StepOutcome:
    step: str
    outcome: str  # "ran" | "complete already" | "off"
    seconds: float = 0.0
    detail: str = ""
    result: dict[str, Any] = field(default_factory=dict)


def load_config(path_or_dict: str | dict[str, Any]) -> dict[str, Any]:
    """Read and validate a curate config (YAML file, local or s3://, or a dict).

    Returns the config with every section filled with defaults; a section set
    to ``false`` is ``None`` (step off). Raises ConfigError naming the bad key.
    """
    import yaml

    from webcurate.shards import storage

    if isinstance(path_or_dict, dict):
        raw = dict(path_or_dict)
        where = "config"
    else:
        where = path_or_dict
        try:
            raw = yaml.safe_load(storage.read_bytes(path_or_dict).decode("utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{where} is not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{where} must be a mapping of keys (input, output, embed, ...)")
    unknown = sorted(set(raw) - TOP_LEVEL)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(TOP_LEVEL))}")
    if not raw.get("input"):
        raise ConfigError(f"{where}: `input` (the dataset to curate, from `webcurate shard`) is required")
    cfg: dict[str, Any] = {"input": str(raw["input"]), "output": raw.get("output"),
                           "ray_address": raw.get("ray_address")}
    for name, defaults in SECTIONS.items():
        sec = raw.get(name, {})
        if sec is False:
            cfg[name] = None
            continue
        if sec is None or sec is True:
            sec = {}
        if not isinstance(sec, dict):
            raise ConfigError(f"{where}: `{name}` must be a mapping of options or false, got {sec!r}")
        bad = sorted(set(sec) - set(defaults))
        if bad:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(f'{name}.{b}' for b in bad)}; "
                              f"allowed: {', '.join(sorted(defaults))}")
        cfg[name] = {**defaults, **sec}
    fsec = raw.get("filter", False)
    if fsec in (False, None):
        cfg["filter"] = None
    else:
        from webcurate.shards.params import parse

        from .quality_params import FilterParams

        cfg["filter"] = parse(FilterParams, {} if fsec is True else fsec, where, section="filter").as_record()
    if cfg["embed"] is not None and not cfg["embed"]["model"]:
        raise ConfigError(f"{where}: `embed.model` (a timm architecture name) is required")
    if cfg["sample"] is not None and not cfg["sample"]["target"]:
        raise ConfigError(f"{where}: `sample.target` (how many samples to keep) is required, or set `sample: false`")
    if cfg["export"] is not None and not cfg["output"]:
        raise ConfigError(f"{where}: `output` (where export writes the curated dataset) is required, "
                          "or set `export: false`")
    if cfg["retrieve"] is not None:
        seeds = cfg["retrieve"]["seeds"]
        cfg["retrieve"]["seeds"] = [seeds] if isinstance(seeds, str) else list(seeds or [])
    if cfg["dedup"] is not None:
        against = cfg["dedup"]["against"]
        cfg["dedup"]["against"] = [against] if isinstance(against, str) else list(against or [])
    return cfg


def _fingerprint(root: str, stage: str) -> tuple[bool, Any]:
    """(complete?, recorded parameters) of sidecar ``stage``, to tell afterwards whether a step ran."""
    from webcurate.shards.dataset import Dataset

    from . import global_stage

    ds = Dataset(root)
    return global_stage.is_complete(ds, stage), global_stage.stage_entry(ds, stage).get("parameters")


def _run_step(outcomes: list[StepOutcome], name: str, root: str, fn: Callable[[], dict[str, Any]],
              detail: Callable[[dict[str, Any]], str], label: str | None = None) -> dict[str, Any]:
    """Run one step and record whether it did work or found its output complete."""
    before = _fingerprint(root, _SIDECAR[name]) if name in _SIDECAR else (False, None)
    t0 = time.time()
    result = fn() or {}
    after = _fingerprint(root, _SIDECAR[name]) if name in _SIDECAR else (True, None)
    was_complete = (before[0] and before == after and not result.get("shards_written")
                    and not result.get("shards_done"))
    if name == "export":
        was_complete = bool(result.get("was_complete"))
    outcomes.append(StepOutcome(label or name, "complete already" if was_complete else "ran",
                                round(time.time() - t0, 1), detail(result), result))
    return result


def _counts(result: dict[str, Any], *names: str) -> str:
    c = result.get("counts") or {}
    return ", ".join(f"{n} {c[n]}" for n in names if n in c)


def run_curate(config: str | dict[str, Any], *, summary: bool = True, verbose: bool = True) -> dict[str, Any]:
    """Run the configured curation flow; returns ``{"steps": [...], "report": URI, "output": URI}``.

    ``summary`` prints the final table of steps; ``verbose`` also each step's own summary.

    Steps that raise stop the flow (their finished parts are kept; re-running
    the same command resumes).
    """
    from webcurate.shards.progress import print_table
    from webcurate.shards.ray_runtime import init_ray
    from webcurate.shards.dataset import Dataset

    cfg = load_config(config)
    root = cfg["input"]
    _ = Dataset(root).manifest  # a clear error when input is not a dataset
    init_ray(cfg["ray_address"])
    outcomes: list[StepOutcome] = []
    t0 = time.time()

    if cfg["embed"] is not None:
        from .embed import run_embed

        e = cfg["embed"]
        # Seed and evaluation sets must live in the same embedding space as
        # the pool, so the embed step covers them too (each resumes on its own).
        others = [*(cfg["retrieve"] or {}).get("seeds", []), *(cfg["dedup"] or {}).get("against", [])]
        for target in [root, *dict.fromkeys(o for o in others if o != root)]:
            _run_step(outcomes, "embed", target, lambda target=target: run_embed(
                target, e["model"], weights=e["weights"], checkpoint=e["checkpoint"],
                random_init=bool(e["random_init"]), image_size=int(e["image_size"]), batch_size=int(e["batch_size"]),
                num_gpus=float(e["num_gpus"]), concurrency=e["concurrency"], dtype=e["dtype"], summary=verbose),
                lambda r: f"model {e['model']}; " + _counts(r, "total", "ok", "failed"),
                label="embed" if target == root else f"embed {target}")
    else:
        outcomes.append(StepOutcome("embed", "off"))

    if cfg["filter"] is not None:
        from .filter import run_filter
        from .quality_params import FilterParams

        fp = FilterParams.model_validate(cfg["filter"])
        _run_step(outcomes, "filter", root, lambda: run_filter(root, fp, summary=verbose),
                  lambda r: _counts(r, "total", "kept", "removed"))
    else:
        outcomes.append(StepOutcome("filter", "off"))

    if cfg["dedup"] is not None:
        from .dedup import run_dedup

        d = cfg["dedup"]
        _run_step(outcomes, "dedup", root, lambda: run_dedup(
            root, method=d["method"], k=int(d["k"]), threshold=float(d["threshold"]), against=d["against"],
            against_threshold=float(d["against_threshold"]), eps=float(d["eps"]), keep=d["keep"],
            n_clusters=d["n_clusters"], index=d["index"], nprobe=d["nprobe"], seed=int(d["seed"]), summary=verbose),
            lambda r: _counts(r, "total", "kept", "removed"))
    else:
        outcomes.append(StepOutcome("dedup", "off"))

    if cfg["retrieve"] is not None and cfg["retrieve"]["seeds"]:
        from .retrieve import run_retrieve

        r_ = cfg["retrieve"]
        _run_step(outcomes, "retrieve", root, lambda: run_retrieve(
            root, r_["seeds"], k=int(r_["k"]), mode=r_["mode"], n_clusters=r_["n_clusters"],
            per_cluster=int(r_["per_cluster"]), min_seed_per_cluster=int(r_["min_seed_per_cluster"]),
            exclude_duplicates=bool(r_["exclude_duplicates"]), min_score=r_["min_score"], seed=int(r_["seed"]),
            summary=verbose),
            lambda r: _counts(r, "total", "selected"))
    else:
        outcomes.append(StepOutcome("retrieve", "off", detail="no seeds given"))

    if cfg["cluster"] is not None:
        from .cluster import run_cluster

        c = cfg["cluster"]
        _run_step(outcomes, "cluster", root, lambda: run_cluster(
            root, levels=c["levels"], resampling_steps=c["resampling_steps"], sample_size=c["sample_size"],
            sample_strategy=c["sample_strategy"], niter=int(c["niter"]), seed=int(c["seed"]), method=c["method"],
            subset=c["subset"], summary=verbose),
            lambda r: "k per level " + "/".join(str(lv.get("k")) for lv in r.get("levels", [])) + "; "
            + _counts(r, "clustered"))
    else:
        outcomes.append(StepOutcome("cluster", "off"))

    if cfg["sample"] is not None and cfg["cluster"] is not None:
        from .sample import run_sample

        s = cfg["sample"]
        _run_step(outcomes, "sample", root, lambda: run_sample(
            root, int(s["target"]), strategy=s["strategy"], seed=int(s["seed"]), min_score=s["min_score"],
            weight_by=s["weight_by"], summary=verbose),
            lambda r: f"selected {r.get('selected')} of {r.get('clustered')}")
    else:
        outcomes.append(StepOutcome("sample", "off"))

    output = None
    if cfg["export"] is not None:
        from webcurate.shards import manifest as manifest_mod

        from .export import run_export

        x = cfg["export"]
        output = cfg["output"]

        def do_export() -> dict[str, Any]:
            prev = manifest_mod.load(output)
            done_before = bool(prev and prev.get("num_shards") and
                               len(prev.get("completed_shards", [])) >= prev["num_shards"])
            res = run_export(root, output, selection=x["selection"], workers=x["workers"], summary=verbose)
            return {**res, "was_complete": done_before}

        _run_step(outcomes, "export", root, do_export,
                  lambda r: f"{r.get('exported')} samples ({r.get('selection')}) -> {output}")
    else:
        outcomes.append(StepOutcome("export", "off"))

    report_uri = None
    if cfg["report"] is not None:
        from .report import write_report

        t1 = time.time()
        report_uri = write_report(root, cfg["report"]["output"])
        outcomes.append(StepOutcome("report", "ran", round(time.time() - t1, 1), report_uri))

    if summary:
        rows = [(o.step, o.outcome, f"{o.seconds:.1f}", o.detail) for o in outcomes]
        rows.append(("total", "", f"{time.time() - t0:.1f}", ""))
        print_table(f"curate: {root}", rows, ("step", "outcome", "seconds", "detail"))
        if report_uri:
            print(f"report: {report_uri}")
    return {"steps": [o.__dict__ for o in outcomes], "report": report_uri, "output": output,
            "seconds": round(time.time() - t0, 1)}
