"""The view recipes (multi-crop, two views, one view) as one DALI pipeline (CPU or GPU decoding, one graph).

Graph per sample::

    webdataset reader -> peek shape ----------------------------------------.
           |                                                                v
           '-> decode (cpu | mixed) -> for each crop: resize(ROI = crop window, flipped by
               swapping x ends) -> [blur: two 1-D Gaussian filters] -> normalise to float CHW

Blur is a separable pair of ``filter`` calls (OpenCV underneath on CPU) with a
per-sample kernel (a unit impulse when the draw says no blur): no per-crop
conditional split and not DALI's slow ``gaussian_blur`` CPU kernel; crops whose
recipe never blurs skip it. Colour jitter, grayscale and solarisation are applied
by :mod:`.photometric` while the loader copies the crops into the batch (DALI's
CPU colour kernels cost more than everything else here together).

Why the random numbers come from Python: exact resume. Every random draw (crop
area/aspect/position, flip, jitter factors, grayscale, blur and its sigma,
solarisation) is sampled in numpy from a generator seeded by (seed, epoch, rank,
batch index) and fed through ``external_source``; DALI's own random operators
keep per-sample state that only advances by running them, so a resumed run could
not reproduce it without redoing all the work. The only stateful DALI operator is
the reader (its shuffle), and skipping batches then only needs the reader: the
whole decode/augment graph sits under a per-sample ``skip`` predicate
(``enable_conditionals``), so a skipped batch costs one read of its bytes.

Crop windows follow torchvision's ``RandomResizedCrop.get_params`` (10 attempts of
area ~ U(scale), log-aspect ~ U(log 3/4, log 4/3); the first that fits the image
wins), computed with DALI arithmetic from the image shape because the shape is
only known inside the graph. When no attempt fits, the whole image is used
(torchvision would centre-crop to the nearest allowed aspect; the two agree for
images whose aspect lies within [3/4, 4/3]).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .config import LoaderConfig

# Extensions the reader hands to the decoder (DALI decodes all of these on CPU and GPU).
DECODABLE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
READER_EXT = ";".join(DECODABLE_EXTS)
ATTEMPTS = 10  # torchvision RandomResizedCrop tries 10 windows
LOG_RATIO = (math.log(3.0 / 4.0), math.log(4.0 / 3.0))
# Order of the per-batch parameter arrays fed by external_source.
PARAM_NAMES = ("skip", "attempt", "area", "log_ratio", "pos_x", "pos_y", "flip", "kernel")


def param_names(cfg: LoaderConfig) -> tuple[str, ...]:
    """The parameter arrays the graph of ``cfg`` uses (stages off for every crop need none)."""
    blur = any(c.blur_p > 0 for c in cfg.crops)
    return tuple(k for k in PARAM_NAMES if k != "kernel" or blur)


def crop_sizes(cfg: LoaderConfig) -> list[int]:
    """Output side of every crop: ``n_global`` global then ``n_local`` local."""
    return [c.size for c in cfg.crops]


def blur_window(cfg: LoaderConfig) -> int:
    """Taps of the Gaussian kernel: ``blur_kernel_size``, or 2 ceil(3 sigma_max) + 1 when 0."""
    return int(cfg.blur_kernel_size) or 2 * int(math.ceil(3 * cfg.blur_sigma[1])) + 1


def gaussian_kernels(sigma: np.ndarray, blur: np.ndarray, window: int) -> np.ndarray:
    """(...) sigmas and blur flags -> (..., window) normalised 1-D kernels (a unit impulse where
    ``blur`` is False), torchvision's ``_get_gaussian_kernel1d``."""
    x = np.arange(window) - window // 2
    k = np.exp(-0.5 * (x / sigma[..., None]) ** 2)
    k /= k.sum(-1, keepdims=True)
    impulse = (x == 0).astype(k.dtype)
    return np.where(blur[..., None], k, impulse).astype(np.float32)


def sample_params(cfg: LoaderConfig, batch_size: int, rng: np.random.Generator, *, skip: bool = False) -> dict[str, np.ndarray]:
    """Draw every augmentation decision of one batch.

    Returns arrays with leading dims (B, n_crops) (``area``/``log_ratio``/``attempt``
    have a trailing ``ATTEMPTS`` axis, ``kernel`` the blur window; ``skip`` is (B,)).
    Crops ``0..n_global-1`` are the global views, the rest local; their probabilities
    come from ``cfg.crops``. Colour and solarisation are drawn by
    :func:`.photometric.draw_photometric` from another generator.
    """
    crops = cfg.crops
    n = len(crops)
    B = batch_size
    f32 = np.float32
    lo = np.array([c.scale[0] for c in crops], f32)
    hi = np.array([c.scale[1] for c in crops], f32)
    area = lo[None, :, None] + (hi - lo)[None, :, None] * rng.random((B, n, ATTEMPTS), dtype=f32)
    log_ratio = rng.uniform(*LOG_RATIO, size=(B, n, ATTEMPTS)).astype(f32)
    pos_x = rng.random((B, n), dtype=f32)
    pos_y = rng.random((B, n), dtype=f32)
    flip = (rng.random((B, n)) < cfg.flip_p).astype(f32)

    blur = rng.random((B, n)) < np.array([c.blur_p for c in crops])[None, :]
    sigma = rng.uniform(*cfg.blur_sigma, (B, n))
    kernel = gaussian_kernels(np.maximum(sigma, 1e-6), blur, blur_window(cfg))

    attempt = np.broadcast_to(np.arange(ATTEMPTS, dtype=f32), (B, n, ATTEMPTS)).copy()
    return {
        "skip": np.full((B,), skip, dtype=bool), "attempt": attempt, "area": area, "log_ratio": log_ratio,
        "pos_x": pos_x, "pos_y": pos_y, "flip": flip, "kernel": kernel,
    }


class ParamSource:
    """``external_source`` callback: the parameters of batch ``i`` from ``rng_for(i)``.

    DALI calls it once per iteration, in order (also when prefetching), so a counter
    gives the batch index. Batches below ``skip_batches`` only carry ``skip=True``.
    """

    def __init__(self, cfg: LoaderConfig, batch_size: int, rng_for: Callable[[int], np.random.Generator],
                 skip_batches: int = 0):
        self.cfg = cfg
        self.batch_size = batch_size
        self.rng_for = rng_for
        self.skip_batches = skip_batches
        self.names = param_names(cfg)
        self.iteration = 0
        self._skipped: tuple[np.ndarray, ...] | None = None

    def __call__(self) -> tuple[np.ndarray, ...]:
        i = self.iteration
        self.iteration += 1
        if i < self.skip_batches:
            # Only the skip flag matters for a skipped batch; batch i's draws come from
            # its own generator, so not drawing them leaves later batches unchanged.
            if self._skipped is None:
                params = sample_params(self.cfg, self.batch_size, np.random.default_rng(0), skip=True)
                self._skipped = tuple(params[k] for k in self.names)
            return self._skipped
        params = sample_params(self.cfg, self.batch_size, self.rng_for(i))
        return tuple(params[k] for k in self.names)


@dataclass
class PipelineSpec:
    """What one worker's pipeline reads and how it runs."""

    paths: list[str]
    index_paths: list[str]
    shard_id: int
    num_shards: int
    reader_seed: int
    device: str  # "cpu" | "gpu"
    device_id: int | None


def _crop_windows(shape, attempt, area, log_ratio, pos_x, pos_y, flip):
    """ROI start/end (relative, (n_crops, 2) as (y, x)) per sample, torchvision-style.

    ``shape``: (3,) int (H, W, C) from ``peek_image_shape``; the other inputs are the
    per-sample arrays of ``sample_params`` ((n, A) or (n,)).
    """
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types

    h_img = fn.cast(shape[0], dtype=types.FLOAT)
    w_img = fn.cast(shape[1], dtype=types.FLOAT)
    q = h_img / w_img
    ratio = dmath.exp(log_ratio)
    # width and height of each attempt, relative to the image's width and height
    w = dmath.sqrt(area * ratio * q)
    h = dmath.sqrt(area / (ratio * q))
    fits = fn.cast((w <= 1.0) & (h <= 1.0), dtype=types.FLOAT)  # (n, A)
    key = attempt + (1.0 - fits) * float(ATTEMPTS)  # first fitting attempt has the smallest key
    first = fn.reductions.min(key, axes=[1], keep_dims=True)  # (n, 1)
    chosen = fn.cast(key == first, dtype=types.FLOAT) * fits  # one-hot, or all zero if none fits
    any_fit = fn.reductions.max(fits, axes=[1])  # (n,)
    w_sel = fn.reductions.sum(w * chosen, axes=[1]) + (1.0 - any_fit)  # whole image when none fits
    h_sel = fn.reductions.sum(h * chosen, axes=[1]) + (1.0 - any_fit)
    x0 = pos_x * (1.0 - w_sel)
    y0 = pos_y * (1.0 - h_sel)
    # resize flips a dimension whose ROI start lies after its end: that is the mirror.
    x_start = x0 + flip * w_sel
    x_end = x0 + (1.0 - flip) * w_sel
    start = fn.stack(y0, x_start, axis=1)
    end = fn.stack(y0 + h_sel, x_end, axis=1)
    return start, end


def _reader(spec: PipelineSpec, cfg: LoaderConfig):
    """The webdataset reader node: this worker's contiguous part, shuffled in a buffer."""
    import nvidia.dali.fn as fn

    return fn.readers.webdataset(
        paths=spec.paths, index_paths=spec.index_paths, ext=[READER_EXT],
        missing_component_behavior="skip", random_shuffle=True,
        initial_fill=max(1, int(cfg.shuffle_buffer)), seed=spec.reader_seed,
        shard_id=spec.shard_id, num_shards=spec.num_shards, name="reader",
    )


def read_batch(spec: PipelineSpec, cfg: LoaderConfig, batch_size: int, batch_index: int) -> list[tuple[str, bytes]]:
    """The encoded images of batch ``batch_index`` as the training pipeline reads them.

    Returns ``(source_info, bytes)`` per sample, source_info being DALI's
    ``"<tar uri>:<offset>:<member name>"``. Runs the reader alone (no decoding), so it is
    cheap; used to find the image behind a decoder error that names no sample.
    """
    import nvidia.dali.fn as fn  # noqa: F401  (registers the operators)
    from nvidia.dali import pipeline_def

    @pipeline_def
    def reader_only():
        return _reader(spec, cfg)

    pipe = reader_only(batch_size=batch_size, num_threads=1, device_id=None,
                       seed=spec.reader_seed & 0x7FFFFFFF, prefetch_queue_depth=1)
    pipe.build()
    out = None
    for _ in range(batch_index + 1):
        (out,) = pipe.run()
    assert out is not None
    return [(out[i].source_info(), np.array(out[i]).tobytes()) for i in range(len(out))]


def decodes(data: bytes, device: str = "cpu", device_id: int | None = None) -> bool:
    """Whether DALI's image decoder (on ``device``) accepts ``data``."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    @pipeline_def
    def one():
        encoded = fn.external_source(source=lambda: [np.frombuffer(data, dtype=np.uint8)], batch=True)
        return fn.decoders.image(encoded, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)

    try:
        pipe = one(batch_size=1, num_threads=1, device_id=device_id if device == "gpu" else None,
                   prefetch_queue_depth=1)
        pipe.build()
        pipe.run()
        return True
    except RuntimeError:
        return False


def _blur(x, c: int, cfg: LoaderConfig, p: dict):
    """Gaussian blur of crop ``c`` (uint8 HWC) as two 1-D filters with this sample's kernel; crops
    whose recipe never blurs are returned unchanged."""
    import nvidia.dali.fn as fn

    if cfg.crops[c].blur_p <= 0:
        return x
    k = blur_window(cfg)
    x = fn.filter(x, fn.reshape(p["kernel"][c], shape=[1, k]), border="reflect_101")
    return fn.filter(x, fn.reshape(p["kernel"][c], shape=[k, 1]), border="reflect_101")


def build_pipeline(spec: PipelineSpec, cfg: LoaderConfig, source: ParamSource):
    """Build (not yet run) the view pipeline for ``spec``.

    Outputs, per sample: crop ``c`` as float32 (3, S_c, S_c) normalised with
    ``cfg.mean``/``cfg.std``; ``n_global + n_local`` outputs. Skipped samples give
    (3, 1, 1) zeros.
    """
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    sizes = crop_sizes(cfg)
    n_crops = len(sizes)
    interp = types.INTERP_CUBIC if cfg.interpolation == "bicubic" else types.INTERP_LINEAR
    mean = [255.0 * m for m in cfg.mean]
    std = [255.0 * s for s in cfg.std]
    decoder_device = "mixed" if spec.device == "gpu" else "cpu"

    @pipeline_def(enable_conditionals=True)
    def views():
        encoded = _reader(spec, cfg)
        p = dict(zip(source.names, fn.external_source(source=source, num_outputs=len(source.names), batch=True)))
        if p["skip"]:
            # A placeholder per crop: skipped batches are dropped by the loader.
            dummy = fn.cast(fn.reshape(p["flip"][0], shape=[1, 1, 1]) * 0.0, dtype=types.FLOAT)
            dummy = fn.cat(dummy, dummy, dummy, axis=0)
            if spec.device == "gpu":
                dummy = dummy.gpu()
            crops = [dummy] * n_crops
        else:
            shape = fn.peek_image_shape(encoded)
            start, end = _crop_windows(shape, p["attempt"], p["area"], p["log_ratio"], p["pos_x"], p["pos_y"],
                                       p["flip"])
            image = fn.decoders.image(encoded, device=decoder_device, output_type=types.RGB)
            crops = []
            for c, size in enumerate(sizes):
                x = fn.resize(image, size=[size, size], roi_start=start[c], roi_end=end[c],
                              roi_relative=True, interp_type=interp, antialias=True)
                x = _blur(x, c, cfg, p)
                crops.append(fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="CHW", mean=mean,
                                                      std=std))
        return tuple(crops)

    return views(
        batch_size=source.batch_size, num_threads=max(1, int(cfg.num_threads)),
        device_id=spec.device_id, seed=spec.reader_seed & 0x7FFFFFFF,
        prefetch_queue_depth=max(1, int(cfg.prefetch)),
    )
