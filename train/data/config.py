"""Configuration of the view loader: a named recipe (``recipe``) plus per-field overrides.

``recipe`` (``dinov2`` | ``simclr`` | ``byol`` | ``moco_v2`` | ``swav`` | ``mae``; see
:mod:`.recipes`) fills every augmentation field left ``None``; fields given
explicitly win. Each image becomes ``n_global`` views of ``global_size`` px and
``n_local`` views of ``local_size`` px. Per crop, in this order (DINOv2's
``DataAugmentationDINO`` order): random resized crop (area ~ U(scale), log-aspect
~ U(log 3/4, log 4/3)) with horizontal flip ``flip_p``; colour jitter with
probability ``color_jitter_p`` (brightness, contrast, saturation, hue factors drawn
as torchvision's ``ColorJitter``) then grayscale ``grayscale_p``; Gaussian blur
(sigma ~ U(blur_sigma), ``blur_kernel_size`` taps, reflect border) with the view's
probability (``blur_p[v]`` for global view v, ``blur_p_local``); solarisation
(``solarize_p[v]``, global views only); mean/std normalisation.

DINOv2 defaults: 2 global crops (scale 0.32-1) + 8 local (0.05-0.32), jitter
(0.4, 0.4, 0.2, 0.1) p=0.8, grayscale 0.2, blur 1.0 / 0.1 / 0.5, solarise 0 / 0.2,
iBOT block masks (``masking="block"``: each image masked with probability
``mask_probability``, ratios stratified over ``mask_ratio``). ``masking="random"``
(MAE) masks exactly ``1 - int(N * (1 - random_mask_ratio)) / N`` of each view's N
patches; ``"none"`` yields no masks.

The released DINOv2 code passes the blur probabilities to ``GaussianBlur(p=...)``,
which applies the blur with probability ``1 - p``; ``reference_blur_bug=True``
reproduces that (every blur probability p becomes 1 - p).

Differences from torchvision that remain: the four jitter adjustments compose into
one colour matrix in a fixed order (brightness, contrast around the crop's mean
grey, saturation, hue as a YIQ rotation) clamped once, where ``ColorJitter``
applies them in a random order, clamping after each, with hue shifted in HSV.

Old field names ``blur_p_global1``, ``blur_p_global2``, ``solarize_p_global2`` are
accepted by ``from_dict`` (they set entry 0 / 1 of ``blur_p`` / ``solarize_p``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from functools import cache
from typing import Any, get_type_hints

from pydantic import TypeAdapter, ValidationError

from .recipes import RECIPES, recipe_defaults

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DEVICES = ("auto", "cpu", "gpu")
MASKINGS = ("block", "random", "none")
# Old scalar names -> (per-view field, view index).
LEGACY_FIELDS = {"blur_p_global1": ("blur_p", 0), "blur_p_global2": ("blur_p", 1),
                 "solarize_p_global2": ("solarize_p", 1)}
_PER_VIEW = ("blur_p", "solarize_p")


@dataclass(frozen=True)
class CropSpec:
    """One crop of every image: output side, area range and its blur / solarise probabilities."""

    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float
    is_global: bool


@dataclass
class LoaderConfig:
    """Every knob of the view loader; ``None`` fields come from ``recipe`` (module docstring)."""

    recipe: str = "dinov2"
    # crops
    global_size: int = 224
    local_size: int = 96
    n_global: int | None = None
    n_local: int | None = None
    global_scale: tuple[float, float] | None = None
    local_scale: tuple[float, float] | None = None
    # photometric / geometric augmentations
    flip_p: float = 0.5
    color_jitter: tuple[float, float, float, float] | None = None  # brightness, contrast, saturation, hue
    color_jitter_p: float | None = None
    grayscale_p: float | None = None
    blur_p: tuple[float, ...] | float | None = None  # per global view
    blur_p_local: float | None = None
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_size: int | None = None  # odd; 0 sizes it from the largest sigma (2 ceil(3 sigma) + 1)
    # Reproduce the released DINOv2 code, whose GaussianBlur(p) blurs with 1 - p.
    reference_blur_bug: bool = False
    solarize_p: tuple[float, ...] | float | None = None  # per global view
    solarize_threshold: int = 128
    interpolation: str = "bicubic"  # "bicubic" (as DINOv2) or "bilinear" (faster)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # batching
    batch_size: int = 64  # images per step per worker; an epoch yields only full batches
    shuffle_buffer: int = 1024  # DALI initial_fill: samples held for random shuffling
    # Samples per index chunk: each epoch the reader visits the chunks of all shards in a
    # random order, so a batch mixes many shards (even when each shard holds one class).
    # 0 reads whole shards in a random order.
    shard_chunk: int = 64
    # masks: "block" (iBOT), "random" (MAE), "none"
    masking: str | None = None
    patch_size: int = 16
    mask_probability: float = 0.5
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    mask_min_patches: int = 4  # smallest block, in patches
    mask_min_aspect: float = 0.3  # block aspect in [0.3, 1/0.3]
    random_mask_ratio: float = 0.75
    # execution
    num_threads: int = 2
    prefetch: int = 2
    seed: int = 0
    device: str = "auto"  # "auto" picks "gpu" when a CUDA GPU is visible, else "cpu"
    # Local folder for copies of s3:// shards when DALI's own S3 reader is not used.
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"LoaderConfig.recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        for name, value in recipe_defaults(self.recipe, int(self.global_size)).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        # YAML/CLI overrides give lists; keep tuples so configs compare and hash.
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):
                setattr(self, f.name, tuple(v))
        for name in _PER_VIEW:  # one number applies to every global view
            v = getattr(self, name)
            if isinstance(v, (int, float)):
                setattr(self, name, (float(v),) * int(self.n_global))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad field when a value cannot work."""
        if self.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"LoaderConfig.interpolation must be 'bicubic' or 'bilinear', got {self.interpolation!r}")
        if self.device not in DEVICES:
            raise ValueError(f"LoaderConfig.device must be one of {DEVICES}, got {self.device!r}")
        if self.masking not in MASKINGS:
            raise ValueError(f"LoaderConfig.masking must be one of {MASKINGS}, got {self.masking!r}")
        for name in ("global_size", "local_size", "batch_size", "patch_size", "num_threads", "n_global"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"LoaderConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.shard_chunk < 0 or self.shuffle_buffer < 1:
            raise ValueError(f"LoaderConfig.shard_chunk must be >= 0 and shuffle_buffer >= 1, got "
                             f"{self.shard_chunk} and {self.shuffle_buffer}")
        if self.blur_kernel_size < 0 or (self.blur_kernel_size and self.blur_kernel_size % 2 == 0):
            raise ValueError(f"LoaderConfig.blur_kernel_size must be odd (or 0: from sigma), got {self.blur_kernel_size}")
        if self.n_local < 0:
            raise ValueError(f"LoaderConfig.n_local must be >= 0, got {self.n_local}")
        if self.masking != "none" and self.global_size % self.patch_size:
            raise ValueError(
                f"LoaderConfig.global_size ({self.global_size}) must be a multiple of "
                f"patch_size ({self.patch_size})"
            )
        for name in ("global_scale", "local_scale", "mask_ratio", "blur_sigma"):
            lo, hi = getattr(self, name)
            if not (0 <= lo <= hi):
                raise ValueError(f"LoaderConfig.{name} must be (low, high) with 0 <= low <= high, got {(lo, hi)}")
        if self.mask_ratio[1] > 1:
            raise ValueError(f"LoaderConfig.mask_ratio high must be <= 1, got {self.mask_ratio}")
        if not 0.0 <= self.random_mask_ratio < 1.0:
            raise ValueError(f"LoaderConfig.random_mask_ratio must be in [0, 1), got {self.random_mask_ratio}")
        for name in _PER_VIEW:
            if len(getattr(self, name)) != self.n_global:
                raise ValueError(f"LoaderConfig.{name} needs one value per global view (n_global="
                                 f"{self.n_global}), got {getattr(self, name)!r}")
        probabilities = [(n, getattr(self, n)) for n in ("flip_p", "color_jitter_p", "grayscale_p", "blur_p_local",
                                                         "mask_probability")]
        probabilities += [(f"{n}[{i}]", p) for n in _PER_VIEW for i, p in enumerate(getattr(self, n))]
        for name, p in probabilities:
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"LoaderConfig.{name} is a probability in [0, 1], got {p!r}")
        if len(self.color_jitter) != 4:
            raise ValueError("LoaderConfig.color_jitter is (brightness, contrast, saturation, hue)")

    # -- derived ----------------------------------------------------------------
    @property
    def n_patches(self) -> int:
        """Patch tokens per global crop: ``(global_size / patch_size) ** 2``."""
        side = self.global_size // self.patch_size
        return side * side

    @property
    def crops(self) -> list[CropSpec]:
        """Every crop of an image: ``n_global`` global views, then ``n_local`` local ones.

        Blur probabilities are the effective ones (``reference_blur_bug`` applied).
        """
        flip = (lambda p: 1.0 - p) if self.reference_blur_bug else (lambda p: p)
        out = [CropSpec(self.global_size, self.global_scale, flip(b), s, True)
               for b, s in zip(self.blur_p, self.solarize_p)]
        out += [CropSpec(self.local_size, self.local_scale, flip(self.blur_p_local), 0.0, False)] * self.n_local
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "LoaderConfig":
        """Build from a (YAML) mapping; unknown keys raise ``ValueError`` naming them."""
        d = dict(d or {})
        legacy = {k: d.pop(k) for k in list(d) if k in LEGACY_FIELDS}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown loader option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        cfg = cls(**{name: _coerce(name, value) for name, value in d.items()})
        for key, value in legacy.items():
            name, view = LEGACY_FIELDS[key]
            values = list(getattr(cfg, name))
            if view >= len(values):
                raise ValueError(f"loader option {key} needs n_global > {view}, got n_global={cfg.n_global}")
            values[view] = float(value)
            setattr(cfg, name, tuple(values))
        cfg.validate()
        return cfg


@cache
def _adapter(name: str) -> TypeAdapter:
    return TypeAdapter(get_type_hints(LoaderConfig)[name])


def _coerce(name: str, value: Any) -> Any:
    """``value`` as field ``name``'s declared type; a ``ValueError`` naming the field when it is not one."""
    try:
        return _adapter(name).validate_python(value)
    except ValidationError as e:
        why = e.errors()[0]["msg"] if e.errors() else str(e)
        raise ValueError(f"LoaderConfig.{name}: {why}, got {value!r}") from None


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"gpu"`` when a CUDA GPU is visible, else ``"cpu"``."""
    if device == "auto":
        try:
            import torch

            return "gpu" if torch.cuda.is_available() else "cpu"
        except Exception:  # a broken CUDA install means no usable GPU here
            return "cpu"
    if device == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("LoaderConfig.device='gpu' but no CUDA GPU is visible")
    return device


__all__ = ["LoaderConfig", "CropSpec", "IMAGENET_MEAN", "IMAGENET_STD", "resolve_device", "RECIPES"]
