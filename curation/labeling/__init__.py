"""Weak labelling: labelling functions, LF analysis, label model, self-training, pseudo-labelled datasets.

The common names are importable from here (lazily, so ``webcurate --help``
stays fast)::

    from webcurate.curation.labeling import labeling_function, ABSTAIN
"""
from __future__ import annotations

from typing import Any

_EXPORTS = {
    "ABSTAIN": "lf", "labeling_function": "lf", "LabelingFunction": "lf", "load_lf_file": "lf",
    "LabelModel": "label_model", "MajorityVote": "majority",
    "Record": "records", "apply_lfs": "apply", "read_votes": "apply",
    "lf_stats": "analysis", "run_label": "workflow",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)
