"""Configuration of the multi-crop training loader (DINOv2 augmentations + iBOT masks).

Defaults follow DINOv2's ``DataAugmentationDINO`` and its collate function:

- 2 global crops of ``global_size`` (scale 0.32-1.0), ``n_local`` local crops of
  ``local_size`` (scale 0.05-0.32), horizontal flip p=0.5, colour jitter
  (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1) with p=0.8, grayscale p=0.2;
- Gaussian blur per crop: global crop 1 always, global crop 2 with p=0.1, local
  crops with p=0.5; solarisation only on global crop 2 with p=0.2;
- ImageNet mean/std normalisation;
- iBOT block masks: each image is masked with probability ``mask_probability``;
  masked images get ratios stratified over ``mask_ratio`` across the batch.

The released DINOv2 code passes the blur probabilities to ``GaussianBlur(p=...)``,
which applies the blur with probability ``1 - p`` (``RandomApply`` is given
``p = 1 - p``): global crop 1 is never blurred, global crop 2 is blurred with
probability 0.9 and local crops with 0.5. ``reference_blur_bug=True`` reproduces
that behaviour for parity with released checkpoints; the default is the
documented (paper) probabilities.

One known difference from torchvision remains: ``ColorJitter`` applies its four
adjustments in a random order per image, while DALI's ``color_twist`` applies
them as one fixed colour transform (the strengths are drawn the same way).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DEVICES = ("auto", "cpu", "gpu")


@dataclass
class LoaderConfig:
    """Every knob of the multi-crop loader; see the module docstring for the recipe."""

    # crops
    global_size: int = 224
    local_size: int = 96
    n_local: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    # photometric / geometric augmentations
    flip_p: float = 0.5
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p_global1: float = 1.0
    blur_p_global2: float = 0.1
    blur_p_local: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_size: int = 9  # DINOv2's GaussianBlur(kernel_size=9); 0 lets DALI size it from sigma
    # Reproduce the released DINOv2 code, whose GaussianBlur(p) blurs with 1 - p.
    reference_blur_bug: bool = False
    solarize_p_global2: float = 0.2
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
    # iBOT masking
    patch_size: int = 16
    mask_probability: float = 0.5
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    mask_min_patches: int = 4  # smallest block, in patches
    mask_min_aspect: float = 0.3  # block aspect in [0.3, 1/0.3]
    # execution
    num_threads: int = 2
    prefetch: int = 2
    seed: int = 0
    device: str = "auto"  # "auto" picks "gpu" when a CUDA GPU is visible, else "cpu"
    # Local folder for copies of s3:// shards when DALI's own S3 reader is not used.
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        # YAML/CLI overrides give lists; keep tuples so configs compare and hash.
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):
                setattr(self, f.name, tuple(v))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad field when a value cannot work."""
        if self.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"LoaderConfig.interpolation must be 'bicubic' or 'bilinear', got {self.interpolation!r}")
        if self.device not in DEVICES:
            raise ValueError(f"LoaderConfig.device must be one of {DEVICES}, got {self.device!r}")
        for name in ("global_size", "local_size", "batch_size", "patch_size", "num_threads"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"LoaderConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.shard_chunk < 0 or self.shuffle_buffer < 1:
            raise ValueError(f"LoaderConfig.shard_chunk must be >= 0 and shuffle_buffer >= 1, got "
                             f"{self.shard_chunk} and {self.shuffle_buffer}")
        if self.blur_kernel_size < 0 or (self.blur_kernel_size and self.blur_kernel_size % 2 == 0):
            raise ValueError(f"LoaderConfig.blur_kernel_size must be odd (or 0: from sigma), got {self.blur_kernel_size}")
        if self.n_local < 0:
            raise ValueError(f"LoaderConfig.n_local must be >= 0, got {self.n_local}")
        if self.global_size % self.patch_size:
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
        for name in ("flip_p", "color_jitter_p", "grayscale_p", "blur_p_global1", "blur_p_global2",
                     "blur_p_local", "solarize_p_global2", "mask_probability"):
            p = getattr(self, name)
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
    def blur_probabilities(self) -> tuple[float, float, float]:
        """Effective blur probability of (global 1, global 2, each local crop).

        With ``reference_blur_bug`` the released code's ``1 - p`` is applied.
        """
        ps = (self.blur_p_global1, self.blur_p_global2, self.blur_p_local)
        if self.reference_blur_bug:
            return tuple(1.0 - p for p in ps)  # type: ignore[return-value]
        return ps

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "LoaderConfig":
        """Build from a (YAML) mapping; unknown keys raise ``ValueError`` naming them."""
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown loader option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**d)


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


__all__ = ["LoaderConfig", "IMAGENET_MEAN", "IMAGENET_STD", "resolve_device"]
