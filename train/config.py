"""Training configuration: DINOv2/iBOT recipe, model, optimiser, run settings and loader.

One nested dataclass, ``TrainConfig``, mirrors the YAML file section by section::

    model:   timm ViT name and architecture overrides (patch, dim, depth, registers, ...)
    dino:    DINO head + loss (prototypes, hidden/bottleneck dims, student temp, KoLeo weight)
    ibot:    iBOT patch loss and its head (shared with DINO or separate)
    teacher: EMA momentum schedule, teacher temperature warm-up, centering method
    optim:   AdamW, lr/wd cosine schedules, layer-wise decay, grad clip, last-layer freeze
    run:     Ray Train workers, GPU/FSDP/precision, steps, logging, checkpoints, seed
    loader:  the multi-crop loader (``webcurate.train.data.config.LoaderConfig``)

Defaults follow DINOv2's ``ssl_default_config.yaml``. ``load_config`` reads a
YAML file and applies ``section.key=value`` overrides (values parsed as YAML,
so ``optim.base_lr=1e-3`` and ``loader.global_scale=[0.4,1.0]`` both work);
unknown sections or keys raise ``ConfigError`` naming them.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any

from webcurate.shards.errors import ConfigError
from webcurate.train.data.config import LoaderConfig

CENTERING_MODES = ("centering", "sinkhorn_knopp")
SCALING_RULES = ("sqrt_wrt_1024", "linear_wrt_256", "none")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class ModelConfig:
    """A timm ViT by name; ``None`` fields keep the timm architecture's value."""

    name: str = "vit_small_patch16_224"
    img_size: int | None = None  # default: loader.global_size
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    reg_tokens: int | None = None  # register tokens (Darcet et al.); None keeps the arch's
    drop_path_rate: float = 0.1
    # DINOv2 drops every block's residual with the same probability instead of timm's linear ramp.
    drop_path_uniform: bool = True
    layerscale: float | None = 1e-5  # LayerScale init value; None disables LayerScale
    timm_kwargs: dict[str, Any] = field(default_factory=dict)  # anything else timm.create_model takes


@dataclass
class DinoConfig:
    loss_weight: float = 1.0
    n_prototypes: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    n_layers: int = 3
    student_temp: float = 0.1
    center_momentum: float = 0.9
    koleo_weight: float = 0.1  # KoLeo on the backbone CLS of global crops; 0 disables it


@dataclass
class IbotConfig:
    loss_weight: float = 1.0  # 0 disables iBOT (masks are then ignored)
    separate_head: bool = False
    n_prototypes: int = 65536  # only used with separate_head
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    n_layers: int = 3
    student_temp: float = 0.1
    center_momentum: float = 0.9


@dataclass
class TeacherConfig:
    centering: str = "centering"  # or "sinkhorn_knopp"
    sinkhorn_iterations: int = 3
    momentum: float = 0.992
    final_momentum: float = 1.0
    temp: float = 0.07
    warmup_temp: float = 0.04
    warmup_temp_epochs: float = 30


@dataclass
class OptimConfig:
    epochs: float = 100  # schedule length in epochs (fractions allowed: size it to the budget)
    base_lr: float = 0.004
    scaling_rule: str = "sqrt_wrt_1024"  # lr = base_lr * sqrt(global_batch / 1024)
    min_lr: float = 1e-6
    warmup_epochs: float = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    beta1: float = 0.9
    beta2: float = 0.999
    clip_grad: float = 3.0  # 0 disables clipping
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    freeze_last_layer_epochs: float = 1


@dataclass
class RunConfig:
    num_workers: int = 1
    use_gpu: bool | None = None  # None: use GPUs when the Ray cluster has them
    cpus_per_worker: float | None = None  # None: the cluster's CPUs shared by the workers
    fsdp: bool = False  # FSDP2 sharding (per block) instead of DDP: for models too large to replicate
    precision: str = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    max_steps: int | None = None  # stop after this global step (schedules keep their length)
    epoch_length: int | None = None  # steps per epoch; None: from the dataset size
    log_every: int = 1  # print a log line every N steps (rank 0)
    report_every: int = 50  # ray.train.report (~2 s each) and a metrics/ part every N steps
    checkpoint_every: int = 500  # checkpoint every N steps (and always at the end)
    keep_checkpoints: int = 3
    seed: int = 0
    torch_threads: int | None = None  # intra-op threads per worker; None: the worker's CPUs


@dataclass
class TrainConfig:
    """The whole training recipe; see the module docstring for the sections."""

    model: ModelConfig = field(default_factory=ModelConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    ibot: IbotConfig = field(default_factory=IbotConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)

    def __post_init__(self) -> None:
        self.validate()

    # -- checks -----------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``ConfigError`` naming the first option that cannot work."""
        t, o, r, d, i = self.teacher, self.optim, self.run, self.dino, self.ibot
        if t.centering not in CENTERING_MODES:
            raise ConfigError(f"teacher.centering must be one of {CENTERING_MODES}, got {t.centering!r}")
        if o.scaling_rule not in SCALING_RULES:
            raise ConfigError(f"optim.scaling_rule must be one of {SCALING_RULES}, got {o.scaling_rule!r}")
        if r.precision not in PRECISIONS:
            raise ConfigError(f"run.precision must be one of {PRECISIONS}, got {r.precision!r}")
        positive = {
            "dino.n_prototypes": d.n_prototypes, "dino.hidden_dim": d.hidden_dim,
            "dino.bottleneck_dim": d.bottleneck_dim, "dino.n_layers": d.n_layers,
            "dino.student_temp": d.student_temp, "teacher.temp": t.temp,
            "teacher.warmup_temp": t.warmup_temp, "teacher.sinkhorn_iterations": t.sinkhorn_iterations,
            "optim.epochs": o.epochs, "run.num_workers": r.num_workers, "run.log_every": r.log_every,
            "run.report_every": r.report_every, "run.checkpoint_every": r.checkpoint_every,
            "run.keep_checkpoints": r.keep_checkpoints,
        }
        if i.separate_head:
            positive.update({"ibot.n_prototypes": i.n_prototypes, "ibot.hidden_dim": i.hidden_dim,
                             "ibot.bottleneck_dim": i.bottleneck_dim, "ibot.n_layers": i.n_layers})
        for name, v in positive.items():
            if not v > 0:
                raise ConfigError(f"{name} must be > 0, got {v!r}")
        for name, v in {"optim.warmup_epochs": o.warmup_epochs, "teacher.warmup_temp_epochs": t.warmup_temp_epochs,
                        "optim.freeze_last_layer_epochs": o.freeze_last_layer_epochs, "optim.clip_grad": o.clip_grad,
                        "optim.base_lr": o.base_lr, "optim.min_lr": o.min_lr,
                        "dino.loss_weight": d.loss_weight, "dino.koleo_weight": d.koleo_weight,
                        "ibot.loss_weight": i.loss_weight, "model.drop_path_rate": self.model.drop_path_rate}.items():
            if not v >= 0:
                raise ConfigError(f"{name} must be >= 0, got {v!r}")
        for name, v in {"optim.warmup_epochs": o.warmup_epochs, "teacher.warmup_temp_epochs": t.warmup_temp_epochs,
                        "optim.freeze_last_layer_epochs": o.freeze_last_layer_epochs}.items():
            if v > o.epochs:  # a warm-up cut short by the end of the run is almost never meant
                raise ConfigError(f"{name} ({v}) exceeds optim.epochs ({o.epochs}); scale it with the run length")
        for name, v in {"teacher.momentum": t.momentum, "teacher.final_momentum": t.final_momentum,
                        "dino.center_momentum": d.center_momentum, "optim.layerwise_decay": o.layerwise_decay}.items():
            if not 0 <= v <= 1:
                raise ConfigError(f"{name} must be in [0, 1], got {v!r}")
        if d.loss_weight == 0 and i.loss_weight == 0:
            raise ConfigError("dino.loss_weight and ibot.loss_weight are both 0: nothing to train")
        if r.max_steps is not None and r.max_steps < 0:
            raise ConfigError(f"run.max_steps must be >= 0, got {r.max_steps}")
        if r.cpus_per_worker is not None and r.cpus_per_worker <= 0:
            raise ConfigError(f"run.cpus_per_worker must be > 0, got {r.cpus_per_worker}")

    # -- derived ----------------------------------------------------------------
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
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "TrainConfig":
        """Build from a nested mapping (YAML); unknown sections/keys raise ``ConfigError``."""
        d = dict(d or {})
        sections = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(sections))
        if unknown:
            raise ConfigError(f"unknown config section(s): {', '.join(unknown)}; known: {', '.join(sections)}")
        kwargs: dict[str, Any] = {}
        for name, f in sections.items():
            value = d.get(name) or {}
            if not isinstance(value, dict):
                raise ConfigError(f"config section `{name}` must be a mapping, got {type(value).__name__}")
            sub_cls = _SECTION_TYPES[name]
            if sub_cls is LoaderConfig:
                value = dict(value)
                if "patch_size" not in value:
                    # iBOT masks are per patch: default the loader's patch size to the model's.
                    ps = _model_patch_hint(d.get("model") or {})
                    if ps:
                        value["patch_size"] = ps
                ps = int(value.get("patch_size") or 0)
                if ps and "local_size" not in value and LoaderConfig.local_size % ps:
                    # DINOv2 pairs patch 14 with 98 px local crops (96 is no multiple of 14):
                    # round the default to the nearest multiple instead of refusing it.
                    value["local_size"] = max(ps, round(LoaderConfig.local_size / ps) * ps)
                try:
                    kwargs[name] = LoaderConfig.from_dict(_coerce(name, LoaderConfig, value))
                except (TypeError, ValueError) as e:
                    raise ConfigError(str(e)) from e
                continue
            known = {sf.name for sf in fields(sub_cls)}
            bad = sorted(set(value) - known)
            if bad:
                raise ConfigError(f"unknown option(s) in `{name}`: {', '.join(bad)}; known: {', '.join(sorted(known))}")
            try:
                kwargs[name] = sub_cls(**_coerce(name, sub_cls, value))
            except TypeError as e:
                raise ConfigError(f"config section `{name}`: {e}") from e
        return cls(**kwargs)


def _coerce(section: str, cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Convert YAML scalars to the annotated field types; ``ConfigError`` names a value that does not fit.

    YAML reads ``1e-3`` (no dot) as a string, and CLI overrides arrive as text.
    """
    types = {f.name: str(f.type) for f in fields(cls)}
    out = dict(values)
    for k, v in values.items():
        t = types.get(k, "")
        if v is None or not isinstance(v, (str, int, float)) or isinstance(v, bool) and "bool" in t:
            continue
        base = t.replace(" | None", "").replace("Optional[", "").rstrip("]").strip()
        try:
            if base == "float" and not isinstance(v, float):
                out[k] = float(v)
            elif base == "int" and not isinstance(v, int):
                if isinstance(v, float) and not v.is_integer():
                    raise ValueError
                out[k] = int(float(v)) if isinstance(v, str) and v.strip().lower() not in ("", "none") else int(v)
            elif base == "bool" and isinstance(v, str):
                if v.lower() not in ("true", "false", "yes", "no", "1", "0"):
                    raise ValueError
                out[k] = v.lower() in ("true", "yes", "1")
        except (TypeError, ValueError):
            raise ConfigError(f"{section}.{k} must be {base}, got {v!r}") from None
    return out


def _model_patch_hint(model: dict[str, Any]) -> int | None:
    """The patch size a model section implies: ``patch_size``, else ``patchNN`` in the timm name."""
    import re

    if model.get("patch_size"):
        return int(model["patch_size"])
    m = re.search(r"patch(\d+)", str(model.get("name") or ModelConfig.name))
    return int(m.group(1)) if m else None


_SECTION_TYPES = {
    "model": ModelConfig, "dino": DinoConfig, "ibot": IbotConfig, "teacher": TeacherConfig,
    "optim": OptimConfig, "run": RunConfig, "loader": LoaderConfig,
}


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"optim.base_lr=1e-3"`` -> ``(["optim", "base_lr"], 0.001)``; values parse as YAML."""
    import yaml

    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    path, _, raw = item.partition("=")
    parts = [p for p in path.strip().split(".") if p]
    if len(parts) < 2:
        raise ConfigError(f"override {item!r}: name a section and a key, e.g. optim.base_lr=1e-3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from e
    return parts, value


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides onto a nested mapping (returns a new dict)."""
    import copy

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


def load_config(path: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML training config (local or ``s3://``), apply overrides, validate.

    With no ``path`` the DINOv2 defaults are used. Raises ``ConfigError`` for a
    malformed file, unknown keys or invalid values, naming the offender.
    """
    import yaml

    data: dict[str, Any] = {}
    if path:
        from webcurate.shards import storage

        try:
            text = storage.read_bytes(path).decode("utf-8")
        except FileNotFoundError as e:
            raise ConfigError(f"config file {path} does not exist") from e
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of sections (model, dino, ...)")
    data = apply_overrides(data, overrides or [])
    return TrainConfig.from_dict(data)


def to_yaml(cfg: TrainConfig) -> str:
    """The config as YAML (tuples written as lists), loadable by ``load_config``."""
    import yaml

    def plain(x: Any) -> Any:
        if is_dataclass(x):
            return {k: plain(v) for k, v in asdict(x).items()}
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return yaml.safe_dump(plain(cfg), sort_keys=False)


__all__ = [
    "TrainConfig", "ModelConfig", "DinoConfig", "IbotConfig", "TeacherConfig", "OptimConfig", "RunConfig",
    "LoaderConfig", "load_config", "apply_overrides", "parse_override", "to_yaml", "ConfigError",
]
