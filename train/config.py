"""Training configuration: the method, model, heads, losses, optimiser, run settings and loader.

``TrainConfig`` (a ``shards.params.Params`` model) mirrors the YAML file::

    method:  dinov2 | dino | ibot | simclr | moco_v2 | moco_v3 | byol | simsiam | swav | vicreg
             | barlow_twins | mae  (see ``train/methods/registry.py``)
    model:   a timm ViT or ConvNet by name, architecture overrides, small-image stem
    dino / ibot / teacher:  DINO-family heads and losses; ``teacher`` is every EMA branch
    head:    projector / predictor of the two-view methods (and SwAV's projector)
    simclr / moco / swav / vicreg / barlow_twins / mae:  each method's own loss settings
    optim:   AdamW or SGD, lr/wd cosine schedules, warm-ups (in epochs of the recipe's length)
    run:     Ray Train workers, GPU/FSDP/precision, run length (epochs, steps or a time budget)
    loader:  the view/multi-crop loader (``webcurate.train.data.config.LoaderConfig``)

A method's published recipe (its views, momentum, weight decay) is applied
under the user's values, so ``method: byol`` alone gives BYOL's asymmetric
views. Defaults otherwise follow DINOv2's ``ssl_default_config.yaml``.
``load_config`` reads one YAML file (``shards.params.load_yaml``) and applies
``section.key=value`` overrides (values parsed as YAML; ``method=simclr`` sets
the top-level key); every error names the field.
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import asdict
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_serializer, field_validator

from webcurate.shards.errors import ConfigError
from webcurate.shards.params import Params, load_yaml, parse
from webcurate.train.data.config import LoaderConfig

from .methods.registry import METHODS, MethodName, get_method

Epochs = float  # epoch-valued settings are scaled with the run's length (see schedules.Plan)


class ModelConfig(Params):
    """A timm ViT or ConvNet by name; ``None`` fields keep the timm architecture's value."""

    name: str = "vit_small_patch16_224"
    img_size: int | None = Field(None, gt=0, description="ViT input size; default loader.global_size")
    patch_size: int | None = Field(None, gt=0)
    embed_dim: int | None = Field(None, gt=0)
    depth: int | None = Field(None, gt=0)
    num_heads: int | None = Field(None, gt=0)
    mlp_ratio: float | None = Field(None, gt=0)
    reg_tokens: int | None = Field(None, ge=0, description="ViT register tokens (Darcet et al.)")
    drop_path_rate: float = Field(0.1, ge=0, lt=1)
    drop_path_uniform: bool = Field(True, description="DINOv2: the same drop-path rate in every block")
    layerscale: float | None = Field(1e-5, description="ViT LayerScale init; null disables it")
    stem: Literal["standard", "small_image"] = Field(
        "standard", description="ConvNets: small_image = 3x3 stride-1 conv, no max-pool (32-64 px inputs)")
    timm_kwargs: dict[str, Any] = Field(default_factory=dict,
                                        description="more timm.create_model arguments (e.g. channels, layers)")


class DinoConfig(Params):
    loss_weight: float = Field(1.0, ge=0)
    n_prototypes: int = Field(65536, gt=0)
    hidden_dim: int = Field(2048, gt=0)
    bottleneck_dim: int = Field(256, gt=0)
    n_layers: int = Field(3, gt=0)
    student_temp: float = Field(0.1, gt=0)
    center_momentum: float = Field(0.9, ge=0, le=1)
    koleo_weight: float = Field(0.1, ge=0, description="KoLeo on the backbone CLS of global crops; 0: off")


class IbotConfig(Params):
    loss_weight: float = Field(1.0, ge=0, description="0 disables iBOT (masks are then ignored)")
    separate_head: bool = False
    n_prototypes: int = Field(65536, gt=0, description="only with separate_head")
    hidden_dim: int = Field(2048, gt=0)
    bottleneck_dim: int = Field(256, gt=0)
    n_layers: int = Field(3, gt=0)
    student_temp: float = Field(0.1, gt=0)
    center_momentum: float = Field(0.9, ge=0, le=1)


class TeacherConfig(Params):
    """The EMA branch of every momentum method, and DINO's teacher targets."""

    centering: Literal["centering", "sinkhorn_knopp"] = "centering"
    sinkhorn_iterations: int = Field(3, gt=0)
    momentum: float = Field(0.992, ge=0, le=1)
    final_momentum: float = Field(1.0, ge=0, le=1)
    temp: float = Field(0.07, gt=0)
    warmup_temp: float = Field(0.04, gt=0)
    warmup_temp_epochs: Epochs = Field(30, ge=0)


class HeadConfig(Params):
    """Projector (and predictor) MLPs of the two-view methods and SwAV."""

    proj_hidden_dim: int = Field(2048, gt=0)
    proj_dim: int = Field(256, gt=0)
    proj_layers: int = Field(2, ge=1)
    pred_hidden_dim: int = Field(512, gt=0, description="BYOL / SimSiam / MoCo v3 predictor width")
    batch_norm: bool = Field(True, description="BatchNorm in the hidden layers (as the papers)")


class SimCLRConfig(Params):
    temperature: float = Field(0.2, gt=0)


class MocoConfig(Params):
    temperature: float = Field(0.2, gt=0)
    queue_size: int = Field(4096, gt=0, description="MoCo v2 negatives kept from earlier batches")


class SwAVConfig(Params):
    n_prototypes: int = Field(512, gt=0)
    temperature: float = Field(0.1, gt=0)
    epsilon: float = Field(0.05, gt=0)
    sinkhorn_iterations: int = Field(3, gt=0)
    queue_size: int = Field(0, ge=0, description="earlier embeddings added to the Sinkhorn codes (small batches)")


class VICRegConfig(Params):
    inv_weight: float = Field(25.0, ge=0)
    var_weight: float = Field(25.0, ge=0)
    cov_weight: float = Field(1.0, ge=0)


class BarlowTwinsConfig(Params):
    lambda_offdiag: float = Field(5e-3, ge=0)


class MAEConfig(Params):
    mask_ratio: float = Field(0.75, gt=0, lt=1)
    decoder_dim: int = Field(128, gt=0)
    decoder_depth: int = Field(2, gt=0)
    decoder_heads: int = Field(4, gt=0)
    norm_pix_loss: bool = True


class OptimConfig(Params):
    name: Literal["adamw", "sgd"] = "adamw"
    epochs: Epochs = Field(100, gt=0, description="the recipe's length; warm-ups are fractions of it")
    base_lr: float = Field(0.004, ge=0)
    scaling_rule: Literal["sqrt_wrt_1024", "linear_wrt_256", "none"] = "sqrt_wrt_1024"
    min_lr: float = Field(1e-6, ge=0)
    warmup_epochs: Epochs = Field(10, ge=0)
    weight_decay: float = Field(0.04, ge=0)
    weight_decay_end: float = Field(0.4, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    sgd_momentum: float = Field(0.9, ge=0, lt=1)
    clip_grad: float = Field(3.0, ge=0, description="0 disables clipping")
    layerwise_decay: float = Field(0.9, ge=0, le=1)
    patch_embed_lr_mult: float = Field(0.2, ge=0)
    freeze_last_layer_epochs: Epochs = Field(1, ge=0)


def parse_duration(value: Any) -> float | None:
    """``"15m"``, ``"90s"``, ``"1h30m"``, ``"1.5h"`` or a number of seconds -> seconds (None stays None)."""
    if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
        return None if value is None else float(value)
    text = str(value).strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|min|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration like 15m, 90s or 1h30m: {value!r}")
    return sum(float(n) * {"h": 3600, "m": 60, "min": 60, "s": 1}[u] for n, u in parts)


class RunConfig(Params):
    num_workers: int = Field(1, gt=0)
    use_gpu: bool | None = Field(None, description="null: use GPUs when the Ray cluster has them")
    cpus_per_worker: float | None = Field(None, gt=0, description="null: the cluster's CPUs shared by the workers")
    fsdp: bool = Field(False, description="FSDP2 sharding instead of DDP (models too large to replicate)")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on GPUs, and for ConvNets on CPUs with AVX-512 BF16 or AMX "
                            "(about 2x faster there); fp32 otherwise (ViTs on CPU, CPUs without bf16 instructions)")
    channels_last: bool = Field(True, description="ConvNets: channels-last weights and inputs (ignored for ViTs)")
    epochs: float | None = Field(None, gt=0, description="run length in epochs (default optim.epochs)")
    max_steps: int | None = Field(None, ge=0, description="run length in optimiser steps; schedules fit it")
    time_budget: float | None = Field(None, gt=0, description="wall-clock budget (15m, 1h, seconds): the run "
                                                               "length is what fits, measured in the first steps")
    stop_at_step: int | None = Field(None, ge=0, description="pause at this step (checkpoint; --resume continues)")
    epoch_length: int | None = Field(None, gt=0, description="steps per epoch; null: from the dataset size")
    log_every: int = Field(1, gt=0)
    report_every: int = Field(50, gt=0, description="ray.train.report (~2 s each) and a metrics part every N steps")
    checkpoint_every: int = Field(500, gt=0)
    keep_checkpoints: int = Field(3, gt=0)
    seed: int = 0
    torch_threads: int | None = Field(None, gt=0, description="intra-op threads per worker; null: its CPUs")
    check_memory: bool = Field(True, description="estimate per-worker memory before starting workers")

    @field_validator("time_budget", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float | None:
        return parse_duration(v)


class TrainConfig(Params):
    """The whole training recipe; see the module docstring for the sections."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True,
                              arbitrary_types_allowed=True)

    method: MethodName = "dinov2"
    model: ModelConfig = Field(default_factory=ModelConfig)
    dino: DinoConfig = Field(default_factory=DinoConfig)
    ibot: IbotConfig = Field(default_factory=IbotConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    head: HeadConfig = Field(default_factory=HeadConfig)
    simclr: SimCLRConfig = Field(default_factory=SimCLRConfig)
    moco: MocoConfig = Field(default_factory=MocoConfig)
    swav: SwAVConfig = Field(default_factory=SwAVConfig)
    vicreg: VICRegConfig = Field(default_factory=VICRegConfig)
    barlow_twins: BarlowTwinsConfig = Field(default_factory=BarlowTwinsConfig)
    mae: MAEConfig = Field(default_factory=MAEConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    loader: LoaderConfig = Field(default_factory=LoaderConfig)

    @field_validator("loader", mode="before")
    @classmethod
    def _loader(cls, v: Any) -> LoaderConfig:
        if isinstance(v, LoaderConfig):
            return v
        if not isinstance(v, dict):
            raise ValueError(f"must be a mapping of loader options, got {v!r}")
        return LoaderConfig.from_dict(v)  # its ValueError names the option

    @field_serializer("loader")
    def _dump_loader(self, v: LoaderConfig) -> dict[str, Any]:
        return {k: list(x) if isinstance(x, tuple) else x for k, x in asdict(v).items()}

    # -- derived ----------------------------------------------------------------
    @property
    def spec(self):
        """The ``MethodSpec`` of ``method``."""
        return get_method(self.method)

    def global_batch_size(self) -> int:
        """Images per optimiser step over all workers."""
        return self.loader.batch_size * self.run.num_workers

    def scaled_lr(self) -> float:
        """Peak lr after the batch-size scaling rule (DINOv2's ``apply_scaling_rules_to_cfg``)."""
        b = self.global_batch_size()
        if self.optim.scaling_rule == "sqrt_wrt_1024":
            return self.optim.base_lr * math.sqrt(b / 1024.0)
        if self.optim.scaling_rule == "linear_wrt_256":
            return self.optim.base_lr * b / 256.0
        return self.optim.base_lr

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, where: str = "config") -> "TrainConfig":
        """Validate a nested mapping (YAML) with the method's recipe under it; ``ConfigError`` names the field.

        Each section is validated by its own model, so an unknown key lists that section's keys.
        """
        raw = with_method_defaults(dict(d or {}), where)
        unknown = sorted(set(raw) - set(cls.model_fields))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: "
                              f"{', '.join(cls.model_fields)}")
        parts: dict[str, Any] = {"method": raw["method"]} if "method" in raw else {}
        for name in SECTIONS:
            model = cls.model_fields[name].annotation
            if model is LoaderConfig:
                try:
                    parts[name] = LoaderConfig.from_dict(raw.get(name) or {})
                except (TypeError, ValueError) as e:
                    raise ConfigError(f"{where}: " + str(e).replace("LoaderConfig.", "loader.")) from None
            else:
                parts[name] = parse(model, raw.get(name) or {}, where, section=name)
        cfg = parse(cls, parts, where)
        check_recipe(cfg, where)
        return cfg


SECTIONS = tuple(n for n in TrainConfig.model_fields if n != "method")


def check_recipe(cfg: TrainConfig, where: str = "config") -> None:
    """Checks across sections (``ConfigError`` naming the options); model/method fit is checked
    where the timm model is known (``models.resolve_config``)."""
    o, t, spec = cfg.optim, cfg.teacher, cfg.spec
    warmups = {"optim.warmup_epochs": o.warmup_epochs}
    if spec.family == "dino":  # only DINO has a teacher temperature; DINO and SwAV freeze prototypes
        warmups["teacher.warmup_temp_epochs"] = t.warmup_temp_epochs
    if spec.family in ("dino", "swav"):
        warmups["optim.freeze_last_layer_epochs"] = o.freeze_last_layer_epochs
    for name, v in warmups.items():
        if v > o.epochs:  # a warm-up longer than the recipe is never meant
            raise ConfigError(f"{where}: {name} ({v}) exceeds optim.epochs ({o.epochs}); "
                              "warm-ups are parts of the recipe's length")
    if spec.family == "dino" and cfg.dino.loss_weight == 0 and cfg.ibot.loss_weight == 0:
        raise ConfigError(f"{where}: dino.loss_weight and ibot.loss_weight are both 0: nothing to train")
    if spec.batch_stats and cfg.loader.batch_size < 2:
        raise ConfigError(f"{where}: loader.batch_size=1: method {cfg.method} ({spec.loss}) compares or "
                          "normalises over the batch; use loader.batch_size >= 2")
TOP_LEVEL = ("method",)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _model_patch_hint(model: dict[str, Any]) -> int | None:
    """The patch size a model section implies: ``patch_size``, else ``patchNN`` in the timm name."""
    if model.get("patch_size"):
        return int(model["patch_size"])
    m = re.search(r"patch(\d+)", str(model.get("name") or ModelConfig.model_fields["name"].default))
    return int(m.group(1)) if m else None


def with_method_defaults(raw: dict[str, Any], where: str = "config") -> dict[str, Any]:
    """``raw`` over its method's recipe defaults, with the loader's patch size aligned to the model's."""
    method = raw.get("method") or TrainConfig.model_fields["method"].default
    if method not in METHODS:
        raise ConfigError(f"{where}: method: unknown method {method!r}; known: {', '.join(METHODS)}")
    for name, sec in raw.items():
        if name in SECTIONS and sec is not None and not isinstance(sec, dict):
            raise ConfigError(f"{where}: `{name}` must be a mapping of options, got {sec!r}")
    out = _merge(METHODS[method].defaults, {k: v for k, v in raw.items() if v is not None})
    loader = dict(out.get("loader") or {})
    if "patch_size" not in loader:
        # iBOT masks are per patch: default the loader's patch size to the model's (ViTs only).
        ps = _model_patch_hint(out.get("model") or {})
        if ps:
            loader["patch_size"] = ps
    ps = int(loader.get("patch_size") or 0)
    if ps and "local_size" not in loader and LoaderConfig.local_size % ps:
        # DINOv2 pairs patch 14 with 98 px local crops (96 is no multiple of 14).
        loader["local_size"] = max(ps, round(LoaderConfig.local_size / ps) * ps)
    out["loader"] = loader
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"optim.base_lr=1e-3"`` -> ``(["optim", "base_lr"], 0.001)``; values parse as YAML."""
    import yaml

    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    path, _, raw = item.partition("=")
    parts = [p for p in path.strip().split(".") if p]
    if len(parts) < 2 and parts != ["method"]:
        raise ConfigError(f"override {item!r}: name a section and a key, e.g. optim.base_lr=1e-3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from e
    return parts, value


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides onto a nested mapping (returns a new dict)."""
    out = copy.deepcopy(d)
    for item in overrides:
        parts, value = parse_override(item)
        node = out
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: `{p}` is not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def load_raw(path: str | dict[str, Any] | None, overrides: list[str] | None = None) -> tuple[dict[str, Any], str]:
    """The config mapping of ``path`` (YAML file, local or ``s3://``; or a dict) with ``overrides`` applied."""
    if path is None or isinstance(path, dict):
        raw, where = dict(path or {}), "config"
    else:
        raw, where = load_yaml(path, "config file")
    return apply_overrides(raw, list(overrides or [])), where


def load_config(path: str | dict[str, Any] | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML training config (local or ``s3://``), apply overrides, validate.

    With no ``path`` the DINOv2 defaults are used. Raises ``ConfigError`` for a
    malformed file, unknown keys or invalid values, naming the offender.
    """
    raw, where = load_raw(path, overrides)
    return TrainConfig.from_dict(raw, where)


def to_yaml(cfg: TrainConfig) -> str:
    """The whole resolved config as YAML, loadable by ``load_config`` into an equal config."""
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)




__all__ = ["TrainConfig", "ModelConfig", "DinoConfig", "IbotConfig", "TeacherConfig", "HeadConfig", "OptimConfig",
           "RunConfig", "LoaderConfig", "load_config", "load_raw", "apply_overrides", "parse_override", "to_yaml",
           "parse_duration", "with_method_defaults", "check_recipe", "ConfigError", "SECTIONS"]
