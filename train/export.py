"""Transitional name for ``webcurate.train.export_backbone`` while ``curation/backbones.py`` and its
tests still import it.

Curation is switching to the exported-backbone contract (``shards/backbone_format.py``: ``write_backbone``,
``read_backbone``, ``build_timm_backbone``); after that nothing imports this module and it is deleted.
"""
from __future__ import annotations

from typing import Any

from webcurate.shards.backbone_format import BackboneMeta, write_backbone

from .export_backbone import load_backbone, resolve_backbone_path


def backbone_metadata(model_name: str, model_kwargs: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, str]:
    """Contract metadata strings of a timm backbone (``model_kwargs`` holds ``num_classes=0``)."""
    size = int(model_kwargs.get("img_size") or 224)
    return BackboneMeta(model_name, dict(model_kwargs), size, extra={k: str(v) for k, v in (extra or {}).items()}).to_strings()


def save_safetensors(state: dict, path: str, meta: dict[str, str]) -> str:
    """``write_backbone`` with metadata strings from ``backbone_metadata``."""
    return write_backbone(state, BackboneMeta.from_strings(meta, path), path)


__all__ = ["load_backbone", "resolve_backbone_path", "backbone_metadata", "save_safetensors"]
