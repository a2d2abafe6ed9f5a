"""``webcurate curate --config curate.yaml``: the whole curation flow in one command.

embed -> filter (when configured) -> dedup -> retrieve (when seeds are given)
-> cluster -> sample -> export, then the HTML report. Every step is the same
function its own subcommand runs, so every step resumes: a step whose output
is complete with the same parameters does nothing, a step killed half-way
continues where it stopped. A step can be turned off with ``<step>: false``.

Each section is validated by the step's own parameter model
(``stage_params.py``; ``filter`` by ``quality_params.FilterParams``) before
any work starts, so ``k: lots`` or a typo stops the run with the field named.
What each step did ("ran" or "complete already") comes from its result.
The keys are documented in ``docs/examples/curate.yaml``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from webcurate.shards.errors import ConfigError
from webcurate.shards.params import Params, load_yaml, parse_sections

from .stage_params import (ClusterParams, DedupParams, EmbedParams, ExportParams, ReportParams, RetrieveParams,
                           SampleParams, TaskResources)


def sections() -> dict[str, type[Params]]:
    """Section name -> its parameter model, in the order the steps run."""
    from .quality_params import FilterParams

    return {"embed": EmbedParams, "filter": FilterParams, "dedup": DedupParams, "retrieve": RetrieveParams,
            "cluster": ClusterParams, "sample": SampleParams, "export": ExportParams, "report": ReportParams,
            "resources": TaskResources}


TOP_LEVEL = ("input", "output", "ray_address")
OFF_UNLESS_GIVEN = ("filter",)


@dataclass
class StepOutcome:
    step: str
    outcome: str  # "ran" | "complete already" | "off"
    seconds: float = 0.0
    detail: str = ""
    result: Any = field(default=None, repr=False)


def load_config(path_or_dict: str | dict[str, Any]) -> dict[str, Any]:
    """Read and validate a curate config (YAML file, local or s3://, or a dict).

    Returns ``{input, output, ray_address, <section>: validated values | None}``;
    a section set to ``false`` (and ``filter`` when absent) is None: step off.
    Raises ConfigError naming the file, section and field.
    """
    raw, where = load_yaml(path_or_dict, "config")
    if not raw.get("input"):
        raise ConfigError(f"{where}: `input` (the dataset to curate, from `webcurate shard`) is required")
    models = sections()
    given = {k: v for k, v in raw.items() if k not in OFF_UNLESS_GIVEN or v not in (None, False)}
    parsed = parse_sections(given, models, where, top_level=TOP_LEVEL)
    cfg: dict[str, Any] = {k: raw.get(k) for k in TOP_LEVEL}
    for name, model in parsed.items():
        if name in OFF_UNLESS_GIVEN and name not in given:
            cfg[name] = None
        else:
            cfg[name] = model.as_record() if model is not None else None
    cfg["input"] = str(cfg["input"])
    if cfg["export"] is not None and not cfg["output"]:
        raise ConfigError(f"{where}: `output` (where export writes the curated dataset) is required, "
                          "or set `export: false`")
    return cfg


def _ran(result: Any) -> bool:
    if hasattr(result, "ran"):
        return bool(result.ran)
    return bool((result or {}).get("shards_done") or (result or {}).get("shards_written"))


def _totals(result: Any, *names: str) -> str:
    c = getattr(result, "totals", None) or (result or {}).get("counts") or {}
    return ", ".join(f"{n} {c[n]}" for n in names if n in c)


def _step(outcomes: list[StepOutcome], name: str, fn: Callable[[], Any], detail: Callable[[Any], str]) -> Any:
    t0 = time.time()
    result = fn()
    outcomes.append(StepOutcome(name, "ran" if _ran(result) else "complete already", round(time.time() - t0, 1),
                                detail(result), result))
    return result


def run_curate(config: str | dict[str, Any], *, summary: bool = True, verbose: bool = True) -> dict[str, Any]:
    """Run the configured curation flow; returns ``{"steps": [...], "report": URI, "output": URI}``.

    ``summary`` prints the final table of steps; ``verbose`` also each step's own summary.
    Steps that raise stop the flow (their finished parts are kept; re-running the
    same command resumes).
    """
    from webcurate.shards.dataset import Dataset
    from webcurate.shards.progress import print_table
    from webcurate.shards.ray_runtime import init_ray

    cfg = load_config(config)
    root = cfg["input"]
    _ = Dataset(root).manifest  # a clear error when input is not a dataset
    init_ray(cfg["ray_address"])
    res = TaskResources.model_validate(cfg["resources"] or {})
    outcomes: list[StepOutcome] = []
    t0 = time.time()
    for name, run in _steps(cfg, root, res, verbose):
        if cfg.get(name) is None or run is None:
            outcomes.append(StepOutcome(name, "off", detail="no seeds given" if name == "retrieve" and cfg.get(name)
                                        else ""))
            continue
        run(outcomes)
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
    steps = [{"step": o.step, "outcome": o.outcome, "seconds": o.seconds, "detail": o.detail} for o in outcomes]
    return {"steps": steps, "report": report_uri, "output": cfg["output"] if cfg["export"] else None,
            "seconds": round(time.time() - t0, 1)}


def _steps(cfg: dict[str, Any], root: str, res: TaskResources, verbose: bool):
    """(step name, runner or None) in order; a runner appends its outcomes."""
    def embed(outcomes: list[StepOutcome]) -> None:
        from .embed import run_embed

        e = dict(cfg["embed"])
        # Seed and evaluation sets must live in the pool's embedding space, so the embed
        # step covers them too (each resumes on its own).
        others = [*(cfg["retrieve"] or {}).get("seeds", []), *(cfg["dedup"] or {}).get("against", [])]
        for target in [root, *dict.fromkeys(o for o in others if o != root)]:
            _step(outcomes, "embed" if target == root else f"embed {target}",
                  lambda target=target: run_embed(target, summary=verbose, **e),
                  lambda r: f"model {e['model']}; " + _totals(r, "total", "ok", "failed"))

    def filter_(outcomes: list[StepOutcome]) -> None:
        from .filter import run_filter
        from .quality_params import FilterParams

        fp = FilterParams.model_validate(cfg["filter"])
        _step(outcomes, "filter", lambda: run_filter(root, fp, summary=verbose),
              lambda r: _totals(r, "total", "kept", "removed"))

    def dedup(outcomes: list[StepOutcome]) -> None:
        from .dedup import run_dedup

        _step(outcomes, "dedup", lambda: run_dedup(root, summary=verbose, resources=res, **cfg["dedup"]),
              lambda r: _totals(r, "total", "kept", "removed"))

    def retrieve(outcomes: list[StepOutcome]) -> None:
        from .retrieve import run_retrieve

        _step(outcomes, "retrieve", lambda: run_retrieve(root, summary=verbose, resources=res, **cfg["retrieve"]),
              lambda r: _totals(r, "total", "selected"))

    def cluster(outcomes: list[StepOutcome]) -> None:
        from .cluster import run_cluster

        _step(outcomes, "cluster", lambda: run_cluster(root, summary=verbose, resources=res, **cfg["cluster"]),
              lambda r: "k per level " + "/".join(str(lv.get("k")) for lv in r.info.get("levels", []))
              + "; " + _totals(r, "clustered"))

    def sample(outcomes: list[StepOutcome]) -> None:
        from .sample import run_sample

        _step(outcomes, "sample", lambda: run_sample(root, summary=verbose, resources=res, **cfg["sample"]),
              lambda r: f"selected {r.info.get('selected')} of {r.info.get('clustered')}")

    def export(outcomes: list[StepOutcome]) -> None:
        from .export_selection import run_export

        _step(outcomes, "export", lambda: run_export(root, cfg["output"], summary=verbose, **cfg["export"]),
              lambda r: f"{r.info.get('exported')} samples ({r.info.get('selection')}) -> {cfg['output']}")

    has_seeds = bool((cfg["retrieve"] or {}).get("seeds"))
    return [("embed", embed), ("filter", filter_), ("dedup", dedup), ("retrieve", retrieve if has_seeds else None),
            ("cluster", cluster), ("sample", sample if cfg["cluster"] is not None else None), ("export", export)]
