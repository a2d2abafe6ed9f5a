"""The ``webcurate label`` flow: LFs -> votes -> label model -> pseudo-labelled dataset.

1. load the LF file, resolve class names (``--classes`` / config / ``CLASSES``);
2. apply the LFs over the input's shards (Ray tasks, resumable sidecar
   ``lf_votes/``); stop with a clear error when an LF fails on more than
   ``max_error_rate`` of the samples (its first error message is shown);
3. with ``--dev``: apply the same LFs to the labelled dev dataset and read
   its ``label`` names;
4. fit the label model (or majority vote) on the votes; with a dev set,
   calibrate its temperature there and report dev accuracy against majority
   vote;
5. print the LF analysis table; export the selected items with
   ``pseudo_dataset.write_pseudo_labelled_dataset`` and save the model beside them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from webcurate.shards import storage
from webcurate.shards.errors import ConfigError
from webcurate.shards.params import load_yaml, parse
from webcurate.shards.dataset import Dataset, DatasetError

from . import analysis, apply as apply_mod, model_choice, pseudo_dataset
from .label_model import LabelModel, MajorityVote, check_label_matrix
from .lf import ABSTAIN, LFError, LFSet, load_lf_file, resolve_classes
from .params import LABEL_MODELS, LabelParams

MODELS = LABEL_MODELS
MODEL_FILE = "label_model.json"


@dataclass
class LabelRun:
    """What a labelling run produced (also returned to Python callers)."""

    classes: list[str]
    lf_names: list[str]
    keys: list[str]
    L: np.ndarray
    probs: np.ndarray
    pred: np.ndarray
    model: Any
    stats: list[analysis.LFStats]
    selection: pseudo_dataset.Selection | None = None
    dev: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)


def read_config_classes(config_path: str | None) -> list[str] | None:
    """``classes:`` from a YAML config (top level or under ``label:``)."""
    if not config_path:
        return None
    cfg, where = load_yaml(config_path, "config")
    label_sec = cfg.get("label")
    classes = cfg.get("classes", label_sec.get("classes") if isinstance(label_sec, dict) else None)
    if classes is None:
        return None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ConfigError(f"config {where}: `classes:` must be a list of names")
    return classes


def make_model(name: str, k: int, class_balance: Sequence[float] | None = None) -> Any:
    if name == "labelmodel":
        return LabelModel(k, class_balance=class_balance)
    if name == "majority":
        return MajorityVote(k, class_balance=class_balance)
    raise ConfigError(f"unknown label model {name!r}; choose one of {MODELS}")


def check_errors(summary: apply_mod.ApplySummary, max_error_rate: float, where: str) -> None:
    """Stop when an LF failed on more than ``max_error_rate`` of the samples."""
    if summary.total == 0:
        return
    bad = [(n, e) for n, e in summary.errors.items() if e / summary.total > max_error_rate]
    if bad:
        lines = "; ".join(f"LF `{n}` failed on {e} of {summary.total} samples "
                          f"(first error: {summary.first_errors.get(n, '?')})" for n, e in bad)
        raise LFError(f"{where}: {lines}. Fix the LF, or pass --max-lf-error-rate 1 to let it abstain there")


def dev_votes(dev_uri: str, lfset: LFSet, classes: list[str], workers: int | None,
              max_error_rate: float, sidecars: Sequence[str] | None = None,
              none_label: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Votes (n_dev, m) of the LFs on the dev dataset and its true classes (n_dev,; -1 for
    unlabelled and ``none_label`` samples)."""
    dev = Dataset(dev_uri)
    summ = apply_mod.apply_lfs(dev, lfset, classes, sidecars=sidecars, workers=workers, summary=False)
    check_errors(summ, max_error_rate, f"dev dataset {dev_uri}")
    votes = apply_mod.read_votes(dev, lfset.names)
    index = dev.index(columns=["key", "label"])
    if "label" not in index.column_names:
        raise ConfigError(f"dev dataset {dev_uri} has no `label` field")
    label_of = dict(zip(index.column("key").to_pylist(), index.column("label").to_pylist()))
    y = analysis.dev_labels([label_of.get(k) for k in votes.keys], classes, where=f"dev dataset {dev_uri}",
                            none_label=none_label)
    return votes.L, y


def accuracy(pred: np.ndarray, y: np.ndarray) -> tuple[float | None, float]:
    """(accuracy on covered items with a known label, coverage)."""
    known = y >= 0
    cov = pred[known] >= 0
    if not cov.any():
        return None, 0.0
    return float((pred[known][cov] == y[known][cov]).mean()), float(cov.mean())


def run_label(input_uri: str, lfs_path: str, output_uri: str | None = None, *, quiet: bool = False,
              **options: Any) -> LabelRun:
    """Label ``input_uri`` with the LFs in ``lfs_path``; export to ``output_uri`` when given.

    ``options``: any other ``LabelParams`` field (dev, classes, config, model,
    min_confidence, per_class_cap, class_balance, max_lf_error_rate, sidecars,
    workers); a bad one is a ``ConfigError`` naming it.
    """
    params = parse(LabelParams, {"input": input_uri, "lfs": lfs_path, "output": output_uri, **options},
                   "label options")
    return label_dataset(params, quiet=quiet)


def _fit_and_compare(p: LabelParams, L: np.ndarray, lfset: LFSet, cls: list[str],
                     L_dev: np.ndarray | None, y_dev: np.ndarray | None) -> tuple[Any, str, dict[str, Any]]:
    """Fit the chosen model; with a dev set calibrate it and compare it with majority vote.

    ``auto`` keeps the label model only where it is shown better than majority
    vote (``model_choice``: on the dev set, else by held-out LF agreement) and
    records which it chose and why. Returns (model, its name, dev summary).
    """
    K = len(cls)
    has_dev = L_dev is not None and y_dev is not None and bool(np.any(L_dev != ABSTAIN))
    dev: dict[str, Any] = {}
    chosen = p.model
    if p.model == "auto":
        chosen = "labelmodel"
        if not has_dev:
            chosen, evidence = model_choice.choose_without_dev(L, K, p.class_balance)
            dev.update(chosen_model=chosen, chosen_by="held-out LF agreement (no dev set)",
                       **{f"held_out_{k}": v for k, v in evidence.items()})
    m = make_model(chosen, K, p.class_balance).fit(L, lfset.names)
    if L_dev is not None and y_dev is not None:
        if isinstance(m, LabelModel) and has_dev:
            dev["temperature"] = m.calibrate(L_dev, y_dev)
        mv = MajorityVote(K, class_balance=m.class_balance).fit(L, lfset.names)
        for name, mod in ((chosen, m), ("majority", mv)):
            acc, cov = accuracy(mod.predict(L_dev) if has_dev else np.full(len(y_dev), ABSTAIN), y_dev)
            dev[f"{name}_accuracy"], dev[f"{name}_coverage"] = acc, cov
        if p.model == "auto" and has_dev:
            chosen = model_choice.choose_with_dev(dev.get("labelmodel_accuracy"), dev.get("majority_accuracy"))
            dev.update(chosen_model=chosen, chosen_by="dev accuracy")
            if chosen == "majority":  # the LFs break the label model's assumptions here; the dev set says so
                m = mv
    return m, chosen, dev


def label_dataset(p: LabelParams, *, quiet: bool = False) -> LabelRun:
    """The label stage for validated parameters ``p`` (see the module docstring for the steps)."""
    lfset = load_lf_file(p.lfs)
    cls = resolve_classes(p.classes, read_config_classes(p.config), lfset.classes)
    if p.class_balance is not None and len(p.class_balance) != len(cls):
        raise ConfigError(f"--class-balance has {len(p.class_balance)} values for {len(cls)} classes")
    ds = Dataset(p.input)
    ds.manifest  # a clear error when the input is not a dataset
    summ = apply_mod.apply_lfs(ds, lfset, cls, sidecars=p.sidecars, workers=p.workers, summary=not quiet)
    check_errors(summ, p.max_lf_error_rate, f"dataset {p.input}")
    votes = apply_mod.read_votes(ds, lfset.names)
    if not votes.keys:
        raise DatasetError(f"{p.input} has no `ok` samples to label")
    L = check_label_matrix(votes.L, len(cls), lfset.names)
    L_dev = y_dev = None
    if p.dev:
        L_dev, y_dev = dev_votes(p.dev, lfset, cls, p.workers, p.max_lf_error_rate, p.sidecars, p.none_label)
    m, chosen, dev = _fit_and_compare(p, L, lfset, cls, L_dev, y_dev)
    probs = m.predict_proba(L)
    pred = m.predict(L)
    stats = analysis.lf_stats(L, lfset.names, cls, L_dev=L_dev, y_dev=y_dev, model=m, errors=summ.errors)
    run = LabelRun(classes=cls, lf_names=lfset.names, keys=votes.keys, L=L, probs=probs, pred=pred,
                   model=m, stats=stats, dev=dev)
    if not quiet:
        analysis.print_lf_table(stats, title=f"LF analysis: {p.input}")
    if p.output:
        _export(p, run, lfset, chosen, quiet)
    if not quiet:
        print_run_summary(run, p.output)
    return run


def _export(p: LabelParams, run: LabelRun, lfset: LFSet, chosen: str, quiet: bool) -> None:
    """Write the pseudo-labelled dataset and the model (with LF stats and dev summary) beside it."""
    run.selection = pseudo_dataset.select(run.keys, run.probs, run.pred, min_confidence=p.min_confidence,
                                          per_class_cap=p.per_class_cap)
    params = {"lfs": lfset.names, "lf_sha": lfset.sha, "model": chosen, "min_confidence": p.min_confidence,
              "per_class_cap": p.per_class_cap, "class_balance": p.class_balance, "dev": p.dev}
    fields = pseudo_dataset.label_fields(run.keys, run.probs, run.selection, run.classes, model_name=chosen,
                                         sources=pseudo_dataset.lf_sources(run.L, lfset.names, run.selection))
    table = pseudo_dataset.pseudo_label_table(run.keys, run.probs, run.classes, run.selection,
                                              num_votes=(run.L != ABSTAIN).sum(axis=1))
    run.manifest = pseudo_dataset.write_pseudo_labelled_dataset(
        p.input, p.output, fields, table, run.classes, stage="label", parameters=params, workers=p.workers,
        summary=not quiet)
    storage.write_bytes(storage.join(p.output, MODEL_FILE),
                        json.dumps({**run.model.to_dict(), "classes": run.classes, "dev": run.dev,
                                    "lf_stats": [st.to_dict() for st in run.stats]}, indent=1).encode())


def print_run_summary(run: LabelRun, output_uri: str | None) -> None:
    """Counts per class, confidence, coverage and dev accuracy."""
    from webcurate.shards.progress import print_table

    n = len(run.keys)
    covered = int((run.pred >= 0).sum())
    rows: list[tuple[Any, ...]] = [("items", n), ("covered (>= 1 vote)", f"{covered} ({covered / max(n, 1):.1%})")]
    if run.selection is not None:
        sel = run.selection
        rows.append(("exported", int(sel.selected.sum())))
        for reason, c in sel.reasons.items():
            rows.append((f"left out: {reason}", c))
        for c, name in enumerate(run.classes):
            k = sel.selected & (sel.pred == c)
            mean = float(sel.confidence[k].mean()) if k.any() else float("nan")
            rows.append((f"class {name}", f"{int(k.sum())} (mean confidence {mean:.3f})"))
    bal = getattr(run.model, "class_balance", None)
    if bal is not None:
        rows.append(("class balance (model)", ", ".join(f"{c}={b:.3f}" for c, b in zip(run.classes, bal))))
    for k, v in run.dev.items():
        rows.append((f"dev {k}", "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else v)))
    if output_uri:
        rows.append(("output", output_uri))
    print_table("label: summary", rows, ("what", "value"))
