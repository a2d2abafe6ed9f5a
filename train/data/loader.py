"""View loader (multi-crop, two views, one view): one DALI pipeline over this worker's share of the shards.

``make_loader`` yields one epoch of batches for worker ``rank`` of ``world_size``:

- shards are local paths or ``s3://`` URIs; DALI's ``fn.readers.webdataset`` reads
  them directly (its S3 client honours ``AWS_ENDPOINT_URL``), with index files built
  and cached by :mod:`.wds_index`;
- each shard's index is cut into chunks of ``cfg.shard_chunk`` consecutive samples;
  the chunks of all shards are permuted per epoch with a seed shared by all workers,
  and the reader splits the concatenated samples into ``world_size`` contiguous
  parts (``shard_id=rank``), so workers see disjoint samples and the whole dataset
  once per epoch; the reader then shuffles within its buffer (``shuffle_buffer``)
  with a seed from (seed, epoch, rank), so a batch mixes many shards;
- every worker yields the same number of full batches (``batches_per_epoch``) so
  DDP steps stay in lockstep;
- augmentation draws and iBOT masks are functions of (seed, epoch, rank, batch
  index), so ``skip_batches=k`` continues exactly where an uninterrupted run
  would be at batch ``k``, paying only the reads of the skipped batches;
- decoding runs on the GPU (``mixed``) when ``cfg.device`` resolves to ``gpu``,
  on CPU threads otherwise, in the same pipeline definition;
- an image DALI cannot decode does not stop the epoch: it is replaced by its
  neighbour in the same shard (so batch sizes and order stay fixed), counted in
  ``decode_failures``, and the pipeline restarts at the failing batch.
"""
from __future__ import annotations

import functools
import re
import time
from typing import Iterator

import numpy as np

from webcurate.shards.progress import progress_bar
from webcurate.shards.dataset import DatasetError

from .config import LoaderConfig, resolve_device
from .dali_pipeline import ParamSource, PipelineSpec, build_pipeline, decodes, read_batch
from .masking import batch_masks, random_masks
from .photometric import Photometric, draw_photometric
from .wds_index import ShardIndex, shard_index, substitute

# "Failed to decode sample #3 : s3://b/shards/00001.tar:123904:0a1b.jpg"
_DECODE_FAILURE = re.compile(r"Failed to decode sample #\d+\s*:\s*(?P<uri>\S+):(?P<offset>\d+):(?P<name>[^\s:]+)")

# Streams of the per-batch generators (kept fixed: changing them changes every run).
_AUG, _MASK, _READER, _ORDER, _COLOUR = 0, 1, 2, 3, 4


class LoaderError(DatasetError):
    """The loader cannot produce batches (no samples, unreadable shards, DALI failure)."""


def batches_per_epoch(num_samples: int, cfg: LoaderConfig, world_size: int = 1) -> int:
    """Full batches every worker yields per epoch for ``num_samples`` split over ``world_size``.

    The reader gives worker ``r`` the samples ``[N*r/W, N*(r+1)/W)``; the smallest share
    is ``N // W``, and every worker stops after ``(N // W) // batch_size`` batches.
    """
    if world_size <= 0:
        raise ValueError(f"world_size must be > 0, got {world_size}")
    return (int(num_samples) // world_size) // cfg.batch_size


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(e) & 0xFFFFFFFF for e in entropy]))


class MultiCropLoader:
    """One epoch of multi-crop batches for one worker (an iterator; see ``make_loader``).

    Attributes after construction: ``num_samples`` (all workers together),
    ``num_batches`` (per worker per epoch), ``dropped`` (samples left out while
    indexing, by reason); during iteration ``decode_failures`` and ``wait_seconds``
    (time spent waiting for DALI).
    """

    MAX_DECODE_FAILURES = 1000

    def __init__(self, shard_uris: list[str], cfg: LoaderConfig, *, rank: int = 0, world_size: int = 1,
                 epoch: int = 0, seed: int = 0, skip_batches: int = 0, device_id: int | None = None):
        if not shard_uris:
            raise LoaderError("make_loader got no shards to read")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank} world_size={world_size}")
        if skip_batches < 0:
            raise ValueError(f"skip_batches must be >= 0, got {skip_batches}")
        self.cfg = cfg
        self.rank, self.world_size, self.epoch, self.seed = rank, world_size, epoch, seed
        self.skip_batches = skip_batches
        self.device = resolve_device(cfg.device)
        if self.device == "gpu" and device_id is None:
            import torch

            device_id = torch.cuda.current_device()
        self.device_id = device_id if self.device == "gpu" else None

        shards = []
        # Indexing reads each tar once (then it is cached): show it on big datasets, once.
        bar = progress_bar(total=len(shard_uris), desc="indexing shards", unit="shard") \
            if rank == 0 and len(shard_uris) >= 16 else None
        for u in shard_uris:
            shards.append(shard_index(u, cfg.cache_dir, cfg.shard_chunk))
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        self.dropped: dict[str, int] = {}
        for ix in shards:
            for k, v in ix.dropped.items():
                self.dropped[k] = self.dropped.get(k, 0) + v
        # DALI rejects empty index files; an empty shard holds nothing to train on anyway.
        self.shards: list[ShardIndex] = [ix for ix in shards if ix.num_samples > 0]
        self.num_samples = sum(ix.num_samples for ix in self.shards)
        self.num_batches = batches_per_epoch(self.num_samples, cfg, world_size)
        if self.num_batches == 0:
            raise LoaderError(
                f"{self.num_samples} trainable samples in {len(shard_uris)} shard(s) give no full batch of "
                f"{cfg.batch_size} per worker for {world_size} worker(s); lower batch_size or add data"
            )
        # The same chunk order on every worker (seeded without rank): the reader's
        # contiguous split then gives disjoint parts that cover the dataset.
        n_chunks = sum(len(ix.chunks) for ix in self.shards)
        self._chunk_order = _rng(cfg.seed, seed, epoch, _ORDER).permutation(n_chunks)
        self.reader_seed = int(np.random.SeedSequence(
            [cfg.seed & 0xFFFFFFFF, seed & 0xFFFFFFFF, epoch, rank, _READER]).generate_state(1)[0] & 0x7FFFFFFF)
        self.decode_failures = 0
        self.wait_seconds = 0.0
        self._photometric: Photometric | None = None
        self._gen: Iterator[dict] | None = None

    # -- iteration ----------------------------------------------------------------
    def __len__(self) -> int:
        return max(0, self.num_batches - self.skip_batches)

    def __iter__(self) -> "MultiCropLoader":
        return self

    def __next__(self) -> dict:
        if self._gen is None:
            self._gen = self._batches()
        return next(self._gen)

    def _aug_rng(self, batch: int) -> np.random.Generator:
        return _rng(self.cfg.seed, self.seed, self.epoch, self.rank, batch, _AUG)

    def _mask_rng(self, batch: int) -> np.random.Generator:
        return _rng(self.cfg.seed, self.seed, self.epoch, self.rank, batch, _MASK)

    def _colour_rng(self, batch: int) -> np.random.Generator:
        return _rng(self.cfg.seed, self.seed, self.epoch, self.rank, batch, _COLOUR)

    def _spec(self) -> PipelineSpec:
        chunks = [(ix.uri, path) for ix in self.shards for path, _ in ix.chunks]
        chunks = [chunks[i] for i in self._chunk_order]
        return PipelineSpec(
            paths=[uri for uri, _ in chunks], index_paths=[path for _, path in chunks],
            shard_id=self.rank, num_shards=self.world_size, reader_seed=self.reader_seed,
            device=self.device, device_id=self.device_id,
        )

    def _start(self, position: int):
        source = ParamSource(self.cfg, self.cfg.batch_size, self._aug_rng, skip_batches=position)
        try:
            pipe = build_pipeline(self._spec(), self.cfg, source)
            pipe.build()
        except RuntimeError as e:
            raise LoaderError(f"cannot start the DALI loader: {_first_lines(e)}") from e
        # Skipped batches only read bytes; their placeholder outputs are dropped.
        for _ in range(position):
            pipe.run()
        return pipe

    def _batches(self) -> Iterator[dict]:
        position = self.skip_batches
        while position < self.num_batches:
            pipe = self._start(position)
            try:
                while position < self.num_batches:
                    t0 = time.perf_counter()
                    outputs = pipe.run()
                    self.wait_seconds += time.perf_counter() - t0
                    batch = self._assemble(outputs, position)
                    position += 1
                    yield batch
            except RuntimeError as e:
                if not self._replace_failed_image(e, position):
                    raise LoaderError(f"DALI loader failed at batch {position} of epoch {self.epoch}: "
                                      f"{_first_lines(e)}") from e
            finally:
                del pipe

    def _replace_failed_image(self, error: RuntimeError, position: int) -> bool:
        """Substitute the image(s) behind a decoder error in batch ``position``.

        Returns False when the error is not about decoding or no culprit is found.
        """
        text = str(error)
        m = _DECODE_FAILURE.search(text)
        if m:
            culprits = [(m["uri"], int(m["offset"]))]
        elif "decoders.image" in text or "peek_image_shape" in text:
            # Some decoder errors name no sample: re-read that batch (reader only) and
            # try each image alone.
            culprits = []
            for info, data in read_batch(self._spec(), self.cfg, self.cfg.batch_size, position):
                if not decodes(data, self.device, self.device_id):
                    uri, offset, _ = info.rsplit(":", 2)
                    culprits.append((uri, int(offset)))
        else:
            return False
        replaced = 0
        for uri, offset in culprits:
            at = next((i for i, ix in enumerate(self.shards) if ix.uri == uri), None)
            updated = substitute(self.shards[at], offset, self.cfg.shard_chunk) if at is not None else None
            if updated is not None:
                self.shards[at] = updated  # same chunk sizes: the chunk order stays valid
                replaced += 1
        if not replaced:
            return False
        self.decode_failures += replaced
        self.dropped["decode_failed"] = self.dropped.get("decode_failed", 0) + replaced
        if self.decode_failures > self.MAX_DECODE_FAILURES:
            raise LoaderError(f"more than {self.MAX_DECODE_FAILURES} images failed to decode "
                              f"(last: {culprits[-1][0]}@{culprits[-1][1]}); check the shards") from error
        return True

    def _assemble(self, outputs, batch_index: int) -> dict:
        """DALI per-crop outputs -> crop-major torch tensors (colour applied while copying) plus masks."""
        import torch

        cfg = self.cfg
        B, V = cfg.batch_size, cfg.n_global
        if self.device == "gpu":
            dev = torch.device("cuda", self.device_id)
            stream = torch.cuda.current_stream(dev)
            empty = functools.partial(torch.empty, dtype=torch.float32, device=dev)
        else:
            dev, stream, empty = torch.device("cpu"), None, _host_empty
        if self._photometric is None:
            self._photometric = Photometric(cfg, dev)
        draws = draw_photometric(cfg, B, self._colour_rng(batch_index))
        G, L = cfg.global_size, cfg.local_size
        global_crops = empty((V * B, 3, G, G))
        local_crops = empty((cfg.n_local * B, 3, L, L)) if cfg.n_local else None
        for c in range(V + cfg.n_local):
            target = global_crops[c * B:(c + 1) * B] if c < V else local_crops[(c - V) * B:(c - V + 1) * B]
            self._photometric.apply(_as_torch(outputs[c], target, stream), target, draws, c)
        return {
            "global_crops": global_crops,
            "local_crops": local_crops,
            "masks": view_masks(cfg, V * B, self._mask_rng(batch_index), dev),
            "n_images": B,
        }


def view_masks(cfg: LoaderConfig, n_views: int, rng: np.random.Generator, device=None):
    """(n_views, n_patches) bool masks of the global views for ``cfg.masking``, or None for ``"none"``."""
    import torch

    grid = cfg.global_size // cfg.patch_size
    if cfg.masking == "none":
        return None
    if cfg.masking == "random":
        masks = random_masks(n_views, grid * grid, cfg.random_mask_ratio, rng)
    else:
        masks = batch_masks(n_views, grid, rng, mask_probability=cfg.mask_probability,
                            mask_ratio=cfg.mask_ratio, min_num_patches=cfg.mask_min_patches,
                            min_aspect=cfg.mask_min_aspect)
    return torch.from_numpy(masks).to(device) if device is not None else torch.from_numpy(masks)


def _as_torch(tensor_list, like, stream):
    """A dense DALI batch (B, 3, S, S) as a torch tensor shaped like ``like``, valid until the next run.

    CPU: a view of DALI's own buffer (no copy); GPU: one device copy on torch's stream, which
    orders it after DALI's work.
    """
    import ctypes

    import torch
    from nvidia.dali.backend import TensorListGPU

    dense = tensor_list.as_tensor()
    if list(dense.shape()) != list(like.shape):
        raise LoaderError(f"DALI produced a batch of shape {dense.shape()}, expected {list(like.shape)}")
    if isinstance(tensor_list, TensorListGPU):
        out = torch.empty_like(like)
        dense.copy_to_external(ctypes.c_void_p(out.data_ptr()), stream.cuda_stream, non_blocking=True)
        return out
    return torch.from_numpy(np.asarray(dense))


def _host_empty(shape: tuple[int, ...]):
    """``torch.empty`` in anonymous memory advised for transparent huge pages.

    A batch is tens of MB; from plain malloc every batch is a fresh mmap that the kernel
    faults in 4 KiB at a time, which cost more than the copy itself (about 4x the CPU of
    this allocation). The tensor keeps the mapping alive and frees it with the batch.
    """
    import mmap

    import torch

    n = int(np.prod(shape))
    if n * 4 < (4 << 20):
        return torch.empty(shape, dtype=torch.float32)
    buf = mmap.mmap(-1, n * 4, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        buf.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(buf, dtype=torch.float32).view(shape)


def _first_lines(e: BaseException, n: int = 6) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip() and "pipeline object is no longer valid" not in ln]
    return " | ".join(lines[-n:])


def make_loader(
    shard_uris: list[str],
    cfg: LoaderConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    seed: int = 0,
    skip_batches: int = 0,
) -> MultiCropLoader:
    """One epoch of view batches (``cfg.recipe``) for worker ``rank`` of ``world_size``.

    Yields ``batches_per_epoch(loader.num_samples, cfg, world_size) - skip_batches``
    items, each::

        {"global_crops": float32 (V*B, 3, G, G),         # crop-major: view 0 of all images, then view 1, ...
         "local_crops":  float32 (n_local*B, 3, L, L)    # crop-major as well; None when n_local == 0
         "masks":        bool (V*B, (G/patch_size)**2)   # iBOT block / MAE random masks; None for masking "none"
         "n_images":     B}

    with ``B = cfg.batch_size``, ``V = cfg.n_global``, ``G = cfg.global_size``,
    ``L = cfg.local_size``, normalised with ``cfg.mean``/``cfg.std``, on the GPU when
    ``cfg.device`` resolves to ``gpu``. The stream is a pure function of (cfg.seed, seed,
    epoch, rank, world_size, shards): batches ``k..`` of ``make_loader(..., skip_batches=k)``
    equal batches ``k..`` of an uninterrupted loader.
    """
    return MultiCropLoader(shard_uris, cfg, rank=rank, world_size=world_size, epoch=epoch, seed=seed,
                           skip_batches=skip_batches)
