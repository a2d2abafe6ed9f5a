"""`webcurate run PIPELINE.yaml`: shard → curate → train → label from one config.

Each step reads the previous step's output unless its own input is set, and
each step is skipped (or resumed) when its output is already complete:

- shard: resumes per shard (complete shards are skipped);
- curate: each curation step is skipped when its sidecar is complete;
- train: skipped when ``<output>/backbone.safetensors`` exists, resumed from
  the newest checkpoint when the output holds an unfinished run;
- embed_for_label (optional): embeddings of the dataset to label and of the
  seed datasets with the trained backbone, so embedding LFs can use them;
- label: resumes per shard and refuses to overwrite another export;
- selftrain (optional): self-training on the embeddings from the seeds, with
  the label step's output as a prior; resumes per round, skipped when its
  output is complete with the same parameters.

A summary table lists every step with its outcome and time.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from pydantic import Field

from webcurate.shards.errors import ConfigError
from webcurate.shards.params import Params, parse

STEPS = ("shard", "curate", "train", "embed_for_label", "label", "selftrain")
TOP_LEVEL = {"ray_address", "workdir", *STEPS}


@dataclass
class StepResult:
    step: str
    outcome: str  # ran | resumed | complete already | off
    seconds: float = 0.0
    output: str | None = None
    detail: str = ""
    info: dict[str, Any] = field(default_factory=dict)


def load_pipeline(path_or_dict: str | dict[str, Any]) -> dict[str, Any]:
    """Read a pipeline config (YAML path, local or s3://, or a dict) and check its keys."""
    from webcurate.shards.params import load_yaml

    raw, where = load_yaml(path_or_dict, "pipeline config")
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping with steps {', '.join(STEPS)}")
    unknown = sorted(set(raw) - TOP_LEVEL)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(TOP_LEVEL))}")
    for step in STEPS:
        if raw.get(step) is not None and raw.get(step) is not False and not isinstance(raw[step], dict):
            raise ConfigError(f"{where}: `{step}` must be a mapping of options (or false)")
    if not any(isinstance(raw.get(s), dict) for s in STEPS):
        raise ConfigError(f"{where}: no steps configured; give at least one of {', '.join(STEPS)}")
    return raw


def _need(sec: dict[str, Any], key: str, step: str) -> Any:
    if not sec.get(key):
        raise ConfigError(f"pipeline step `{step}` needs `{key}`")
    return sec[key]


def check_shard_section(sec: dict[str, Any]):
    """The `shard:` section as validated ``IngestParams`` (a ``ConfigError`` names the bad field)."""
    from webcurate.shards.ingest_params import IngestParams

    return parse(IngestParams, sec, "pipeline config", section="shard")


def run_shard_step(sec: dict[str, Any]) -> StepResult:
    from webcurate.shards.ingest import ingest

    p = check_shard_section(sec)
    r = ingest(p.input, p.output, **p.ingest_kwargs())
    c = r.counts
    return StepResult("shard", "ran" if r.shards_written else "complete already", r.seconds, p.output,
                      f"{c.get('ok', 0)} ok, {c.get('failed', 0)} failed, {c.get('duplicate', 0)} duplicates")


def run_curate_step(sec: dict[str, Any]) -> StepResult:
    from webcurate.curation.curate import run_curate

    res = run_curate(sec, summary=True, verbose=False)
    ran = [s for s in res.get("steps", []) if s.get("outcome") == "ran" and s.get("step") != "report"]
    return StepResult("curate", "ran" if ran else "complete already", float(res.get("seconds", 0.0)),
                      res.get("output") or sec.get("input"),
                      f"report: {res.get('report')}", info={"report": res.get("report")})


def train_is_complete(output: str) -> bool:
    from webcurate.shards import storage

    return storage.exists(storage.join(output, "backbone.safetensors"))


class TrainStep(Params):
    """The `train:` section of a pipeline config."""

    data: str = Field(description="dataset to train on (default: the previous step's output)")
    output: str = Field(description="run folder: checkpoints, metrics and backbone.safetensors")
    config: Optional[str] = Field(None, description="training YAML (docs/examples/train*.yaml)")
    overrides: Union[list[str], dict[str, Any]] = Field(default_factory=list,
                                                        description="section.key=value overrides")
    max_steps: Optional[int] = Field(None, ge=1)
    num_workers: Optional[int] = Field(None, ge=1)
    model: Optional[str] = Field(None, description="timm architecture (model.name)")
    method: Optional[str] = Field(None, description="SSL method (dinov2, simclr, byol, ...)")
    time_budget: Optional[str] = Field(None, description="wall-clock budget, e.g. 15m")
    epochs: Optional[float] = Field(None, gt=0)

    def train_config(self):
        """The validated ``TrainConfig``: the file, then ``overrides``, then the shortcuts above."""
        from webcurate.train.config import load_config

        ov = self.overrides
        overrides = [f"{k}={v}" for k, v in ov.items()] if isinstance(ov, dict) else [str(o) for o in ov]
        for key, path in (("max_steps", "run.max_steps"), ("num_workers", "run.num_workers"),
                          ("model", "model.name"), ("method", "method"), ("time_budget", "run.time_budget"),
                          ("epochs", "run.epochs")):
            if getattr(self, key) is not None:
                overrides.append(f"{path}={getattr(self, key)}")
        return load_config(self.config, overrides)


def check_train_section(sec: dict[str, Any]):
    return parse(TrainStep, sec, "pipeline config", section="train").train_config()


def run_train_step(sec: dict[str, Any]) -> StepResult:
    from webcurate.train.checkpoint import list_checkpoints
    from webcurate.train.driver import train

    step = parse(TrainStep, sec, "pipeline config", section="train")
    out = step.output
    if train_is_complete(out):
        return StepResult("train", "complete already", 0.0, out, "backbone.safetensors exists")
    cfg = step.train_config()
    resume = bool(list_checkpoints(out))
    summary = train(step.data, out, cfg, resume=resume)
    detail = ", ".join(f"{k}={summary[k]:.4g}" if isinstance(summary.get(k), float) else f"{k}={summary.get(k)}"
                       for k in ("step", "loss", "img_per_s") if k in summary)
    return StepResult("train", "resumed" if resume else "ran", float(summary.get("seconds", 0.0)), out, detail,
                      info=summary)


def _embed_for_label_params():
    from webcurate.curation.stage_params import EmbedParams

    class EmbedForLabel(EmbedParams):
        """The `embed_for_label:` section: embed options plus the datasets to embed."""

        datasets: Union[str, list[str]] = Field(description="the dataset to label and its seed datasets")

    return EmbedForLabel


def check_embed_for_label_section(sec: dict[str, Any]):
    return parse(_embed_for_label_params(), sec, "pipeline config", section="embed_for_label")


def run_embed_for_label_step(sec: dict[str, Any]) -> StepResult:
    from webcurate.curation.embed import run_embed

    p = check_embed_for_label_section(sec)
    datasets = [p.datasets] if isinstance(p.datasets, str) else list(p.datasets)
    if not datasets:
        raise ConfigError("pipeline config: embed_for_label.datasets: give the dataset to label and its seeds")
    opts = {k: v for k, v in p.model_dump().items() if k != "datasets"}
    embedded = 0
    for d in datasets:
        embedded += len(run_embed(d, **opts).done)
    outcome = "ran" if embedded else "complete already"
    return StepResult("embed_for_label", outcome, 0.0, None, f"{len(datasets)} dataset(s), {embedded} shard(s) embedded")


def label_is_complete(sec: dict[str, Any]) -> bool:
    """True when ``sec['output']`` is a finished `webcurate label` export of the same LF file
    (by content: the file is read, not executed) with the same selection options."""
    from webcurate.curation.labeling.lf import read_source, source_sha
    from webcurate.curation.labeling.workflow import MODEL_FILE
    from webcurate.shards import manifest as manifest_mod, storage
    from webcurate.shards.dataset import Dataset

    from webcurate.curation.labeling.params import LabelParams

    p = parse(LabelParams, sec, "pipeline config", section="label")
    out = p.output
    if not out or not storage.exists(storage.join(out, MODEL_FILE)):
        return False
    m = manifest_mod.load(out) or {}
    params = m.get("parameters") or {}
    if m.get("stage") != "label" or params.get("lf_sha") != source_sha(read_source(p.lfs)):
        return False
    if (params.get("min_confidence"), params.get("per_class_cap")) != (p.min_confidence, p.per_class_cap):
        return False
    n = m.get("num_shards")
    return n is not None and len(Dataset(out).completed_shards()) == int(n)


def run_label_step(sec: dict[str, Any]) -> StepResult:
    from webcurate.curation.labeling.params import LabelParams
    from webcurate.curation.labeling.workflow import label_dataset

    _need(sec, "input", "label"), _need(sec, "lfs", "label")
    p = parse(LabelParams, sec, "pipeline config", section="label")
    if label_is_complete(sec):
        return StepResult("label", "complete already", 0.0, p.output, "same LFs and options")
    out = p.output
    run = label_dataset(p)
    covered = float((run.L != -1).any(axis=1).mean()) if run.L.size else 0.0
    detail = f"{len(run.keys)} samples, {len(run.lf_names)} LFs, coverage {covered:.2f}"
    if run.selection is not None:
        detail += f", exported {int(run.selection.selected.sum())}"
    for name, acc in sorted((run.dev or {}).items()):
        if name.endswith("_accuracy") and isinstance(acc, (int, float)):
            detail += f", dev {name} {acc:.3f}"
    return StepResult("label", "ran", 0.0, out, detail.strip())


def run_selftrain_step(sec: dict[str, Any]) -> StepResult:
    from webcurate.curation.labeling.params import SelfTrainParams
    from webcurate.curation.labeling.selftrain_stage import run_selftrain, selftrain_is_complete

    _need(sec, "input", "selftrain"), _need(sec, "seed", "selftrain"), _need(sec, "output", "selftrain")
    p = parse(SelfTrainParams, sec, "pipeline config", section="selftrain")
    if selftrain_is_complete(p):
        return StepResult("selftrain", "complete already", 0.0, p.output, "same inputs and options")
    run = run_selftrain(p)
    f = run.final
    detail = (f"{len(run.state.summaries)} round(s), {int((run.state.label >= 0).sum())} pseudo-labels, "
              f"{int(run.rejected.sum())} rejected as no class")
    if f.dev_accuracy is not None:
        detail += f", dev accuracy {f.dev_accuracy:.3f}"
    return StepResult("selftrain", "resumed" if run.resumed_after else "ran", 0.0, p.output, detail)


RUNNERS: dict[str, Callable[[dict[str, Any]], StepResult]] = {
    "shard": run_shard_step, "curate": run_curate_step, "train": run_train_step,
    "embed_for_label": run_embed_for_label_step, "label": run_label_step, "selftrain": run_selftrain_step,
}


def check_curate_section(sec: dict[str, Any]):
    from webcurate.curation.curate import load_config

    return load_config(sec)


def check_label_section(sec: dict[str, Any]):
    from webcurate.curation.labeling.params import LabelParams

    return parse(LabelParams, sec, "pipeline config", section="label")


def check_selftrain_section(sec: dict[str, Any]):
    from webcurate.curation.labeling.params import SelfTrainParams

    return parse(SelfTrainParams, sec, "pipeline config", section="selftrain")


# Every section is validated before any step runs, so a wrong type never becomes a
# run that "succeeds" with every row failed, or a failure hours into the pipeline.
CHECKS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "shard": check_shard_section, "curate": check_curate_section, "train": check_train_section,
    "embed_for_label": check_embed_for_label_section, "label": check_label_section,
    "selftrain": check_selftrain_section,
}


def _chain_inputs(cfg: dict[str, Any]) -> None:
    """Fill each step's input from the previous step's output when not given."""
    prev: str | None = None
    for step in STEPS:
        sec = cfg.get(step)
        if not isinstance(sec, dict):
            continue
        if step == "curate":
            sec.setdefault("input", prev)
            prev = sec.get("output") or sec.get("input")
        elif step == "train":
            sec.setdefault("data", prev)
        elif step == "label":
            sec.setdefault("input", prev)
        elif step == "selftrain":  # the label step's input, its output as the prior
            label = cfg.get("label") if isinstance(cfg.get("label"), dict) else {}
            sec.setdefault("input", label.get("input") or prev)
            if label.get("output"):
                sec.setdefault("labels", label["output"])
        elif step == "shard":
            prev = sec.get("output")


def run_pipeline(config: str | dict[str, Any], *, only: list[str] | None = None) -> list[StepResult]:
    """Run the configured steps in order; returns one ``StepResult`` per step."""
    from webcurate.shards.progress import print_table
    from webcurate.shards.ray_runtime import init_ray

    cfg = load_pipeline(config)
    _chain_inputs(cfg)
    for step, check in CHECKS.items():  # sections with a parameter model: checked before any work starts
        if isinstance(cfg.get(step), dict) and (not only or step in only):
            check(dict(cfg[step]))
    init_ray(cfg.get("ray_address"))
    results: list[StepResult] = []
    for step in STEPS:
        sec = cfg.get(step)
        if not isinstance(sec, dict) or (only and step not in only):
            results.append(StepResult(step, "off"))
            continue
        print(f"\n== {step} ==", flush=True)
        t0 = time.time()
        r = RUNNERS[step](dict(sec))
        r.seconds = r.seconds or (time.time() - t0)
        if r.outcome == "ran":
            r.seconds = time.time() - t0
        results.append(r)
    print_table("pipeline", [(r.step, r.outcome, f"{r.seconds:.1f}", r.output or "", r.detail) for r in results],
                ("step", "outcome", "seconds", "output", "detail"))
    return results


def default_workdir() -> str:
    return os.path.abspath("webcurate-demo")
