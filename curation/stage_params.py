"""The parameters of every curation stage, declared once.

Each model feeds the stage's click options (``click_options``), its section
of a ``curate`` YAML file (``parse_sections``) and the validation errors,
which name the field (``curate.yaml: dedup.k: Input should be a valid
integer (got 'lots')``). Defaults live here and nowhere else. Only pydantic
is imported, so the CLI stays fast.

``TaskResources`` (memory per Ray task, GPUs) shapes how a global stage runs,
not what it decides, so it is never part of a stage's recorded parameters.
"""
from __future__ import annotations

import re
from typing import Any, Literal, Optional, Union

from pydantic import Field, PrivateAttr, field_validator, model_validator

from webcurate.shards.params import Params
from .pixel_views import DEFAULT_ZOOMS as DEFAULT_PIXEL_ZOOMS

Cosine = Field(ge=-1.0, le=1.0)
# memory_per_task=auto stays within these: below, tasks get too small to amortise their start; above, one
# task's vectors no longer spread over a node's cores.
AUTO_TASK_MEMORY = (1 << 30, 8 << 30)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 10 ** 6, "mib": 1 << 20,
          "g": 1 << 30, "gb": 10 ** 9, "gib": 1 << 30, "t": 1 << 40, "tb": 10 ** 12, "tib": 1 << 40}


def parse_bytes(value: Any) -> int:
    """``"2GiB"``, ``"512MB"``, ``"1.5g"`` or an int -> bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"expected a size such as 2GiB, 512MB or a number of bytes, got {value!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def int_list(value: Any, name: str = "value") -> Any:
    """``"10000,1000,100"`` -> ``[10000, 1000, 100]``; ``"5"`` -> 5; ``"auto"``/None stay; lists pass."""
    if value is None or isinstance(value, (int, list, tuple)) and not isinstance(value, bool):
        return list(value) if isinstance(value, tuple) else value
    text = str(value).strip().strip("[]")
    if text in ("", "auto", "none", "null"):
        return None
    try:
        vals = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"{name} must be an integer or a comma-separated list like 10000,1000,100, "
                         f"got {value!r}") from None
    return vals[0] if len(vals) == 1 else vals


class TaskResources(Params):
    """How the Ray tasks of a global stage are sized (never recorded: results do not depend on it)."""

    memory_per_task: Union[str, int] = Field(
        "auto", description="Memory one Ray task may use (e.g. 2GiB): bounds the vectors each task holds "
                            "and is reserved with Ray, so tasks fit the nodes; auto: the smallest node's "
                            "memory per CPU, within 1-8 GiB.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per search task: faiss runs on them when it has GPU "
                                                   "support (faiss-gpu) and the cluster has GPUs; else CPU.")
    _resolved: Optional[int] = PrivateAttr(None)

    @field_validator("memory_per_task")
    @classmethod
    def _bytes(cls, v: Any) -> Union[int, str]:
        if str(v).strip().lower() == "auto":
            return "auto"
        n = parse_bytes(v)
        if n < 16 << 20:
            raise ValueError(f"must be at least 16MiB, got {v!r}")
        return n

    def task_memory(self) -> int:
        """Bytes per task: ``memory_per_task``, or for ``auto`` a CPU's share of the smallest node (starts Ray).

        Resolved once per instance: a stage sizes all its tasks alike.
        """
        if self._resolved is None:
            if self.memory_per_task != "auto":
                self._resolved = int(self.memory_per_task)
            else:
                from webcurate.shards.ray_runtime import init_ray, min_node_memory_per_cpu

                init_ray()
                self._resolved = int(min(max(min_node_memory_per_cpu(), AUTO_TASK_MEMORY[0]), AUTO_TASK_MEMORY[1]))
        return self._resolved


class EmbedParams(Params):
    """``webcurate embed``."""

    model: str = Field(description="timm architecture name, e.g. vit_small_patch14_dinov2 or convnext_tiny.")
    weights: Optional[str] = Field(None, description="Weights for --model: a .safetensors file or a torch state "
                                   "dict (loaded with weights_only=True), local or s3://. Nothing is downloaded.")
    checkpoint: Optional[str] = Field(None, description="A backbone exported by `webcurate train`: its "
                                      "backbone.safetensors, or the run/checkpoint folder holding it.")
    random_init: bool = Field(False, description="Seeded random weights (tests and smoke runs only).")
    image_size: int = Field(224, ge=16, description="Images are resized (short side) and centre-cropped to this.")
    batch_size: int = Field(64, ge=1, description="Images per forward pass.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per inference actor; 0 runs on CPU (also the fallback "
                                                   "when the cluster has none).")
    concurrency: Optional[int] = Field(None, ge=1, description="Inference actors [default: one per --num-gpus "
                                       "share of the GPUs, else one per 8 CPUs].")
    dtype: Literal["float16", "float32"] = Field("float16", description="Storage type of the vectors.")
    calibration_samples: int = Field(256, ge=0, description="Pool images embedded again as augmented copies "
                                     "to calibrate the copy threshold (dedup --threshold auto); 0 turns it off.")

    @model_validator(mode="after")
    def _one_source(self) -> "EmbedParams":
        given = [n for n, v in (("weights", self.weights), ("checkpoint", self.checkpoint)) if v]
        if len(given) > 1:
            raise ValueError("give either --weights or --checkpoint, not both")
        if given and self.random_init:
            raise ValueError(f"random_init cannot be combined with {given[0]}")
        if not given and not self.random_init:
            raise ValueError(f"no weights for model {self.model!r}: pass --weights FILE (safetensors or torch "
                             "state dict), --checkpoint (a `webcurate train` export), or --random-init for a test "
                             "run (YAML: weights, checkpoint, random_init); webcurate never downloads weights")
        return self


class DedupParams(Params):
    """``webcurate dedup``."""

    method: Literal["exact", "copy", "semdedup", "none"] = Field(
        "copy", description="exact: same sha256. copy: kNN graph + connected components (DINOv2; exact first). "
                            "semdedup: k-means, then drop items within 1-eps of a kept one. none: only --against.")
    k: int = Field(64, ge=1, description="Neighbours per sample in the kNN graph.")
    threshold: Union[Literal["auto"], float] = Field(
        "auto", description="Cosine above which two samples are copies; auto: the threshold `embed` calibrated "
                            "on augmented copies of the pool (0.6, DINOv2's, when it has none).")
    against: list[str] = Field(default_factory=list, description="Drop pool samples near any sample of this "
                               "dataset (e.g. an eval set), whole near-duplicate component. Repeatable.")
    against_threshold: float = Field(0.45, ge=-1.0, le=1.0,
                                     description="Cosine above which a pool sample matches an --against sample.")
    eps: float = Field(0.07, gt=0.0, lt=1.0, description="SemDeDup: drop when the cosine to a kept sample is "
                                                         ">= 1 - eps.")
    keep: Literal["largest", "first"] = Field("largest", description="Which sample of a duplicate group "
                                              "survives: most pixels, or smallest key.")
    n_clusters: Optional[int] = Field(None, ge=1, description="SemDeDup k-means clusters [default: N/1000].")
    index: Literal["auto", "flat", "ivf"] = Field("auto", description="kNN search: exact (flat), IVF cells, or "
                                                  "auto (exact up to 30k samples).")
    nprobe: Optional[int] = Field(None, ge=1, description="IVF cells each sample searches [default: 10]; more "
                                                          "finds more near-duplicates, slower.")
    pixel_threshold: Optional[float] = Field(
        None, gt=0.0, lt=1.0, description="copy: also join samples whose pixel views have a cosine above this "
        "(the `pixels` sidecar, computed on first use: the centre square and zoomed-in centre crops of each image, "
        "side x side RGB). Finds re-encodes, resizes and crops that an embedding not trained for copy detection "
        "misses or confuses with same-class photos; 0.96 measured on CIFAR-10 copies (BENCHMARKS.md). Off unless "
        "given.")
    pixel_side: int = Field(16, ge=4, le=64, description="Pixel views: side of each thumbnail.")
    pixel_zooms: list[float] = Field(default_factory=lambda: list(DEFAULT_PIXEL_ZOOMS), min_length=1, max_length=8,
                                     description="Pixel views: share of the centre square each view covers "
                                                 "(1 = whole; smaller = zoomed in, to meet crops). Repeatable.")
    seed: int = Field(0, description="Random seed (IVF cells, SemDeDup k-means).")
    max_removal: float = Field(0.5, gt=0.0, le=1.0, description="Refuse to remove more than this share of the "
                                                                "pool (prints why) ...")
    allow_mass_removal: bool = Field(False, description="... unless this is given.")

    @field_validator("threshold")
    @classmethod
    def _cosine(cls, v: Any) -> Any:
        if v != "auto" and not -1.0 <= float(v) <= 1.0:
            raise ValueError(f"a cosine must lie in [-1, 1], got {v}")
        return v

    @field_validator("pixel_zooms")
    @classmethod
    def _zooms(cls, v: list[float]) -> list[float]:
        bad = [z for z in v if not 0.25 <= z <= 1.0]
        if bad:
            raise ValueError(f"a pixel zoom is the share of the image side a view covers, in [0.25, 1]; got {bad}")
        return v

    @model_validator(mode="after")
    def _against_needed(self) -> "DedupParams":
        if self.method == "none" and not self.against:
            raise ValueError("method none only makes sense with against DATASET")
        if self.pixel_threshold is not None and self.method != "copy":
            raise ValueError(f"pixel_threshold joins copies in the copy graph; it needs method copy, not "
                             f"{self.method}")
        return self

    def record(self) -> dict[str, Any]:
        """The parameters that decide the result (the guard's settings do not)."""
        return self.model_dump(mode="json", exclude={"max_removal", "allow_mass_removal"})


class RetrieveParams(Params):
    """``webcurate retrieve``."""

    seeds: list[str] = Field(default_factory=list, description="Seed dataset (embedded with the same model). "
                                                               "Repeatable.")
    k: int = Field(4, ge=1, description="Sample mode: nearest pool samples per seed sample (DINOv2: 4; 32 for "
                                        "small seed sets).")
    mode: Literal["sample", "cluster", "both"] = Field(
        "sample", description="sample: kNN per seed. cluster: k-means over the pool, take clusters holding more "
                              "than --min-seed-per-cluster seeds. both: the union.")
    n_clusters: Optional[int] = Field(None, ge=1, description="Cluster mode: k-means clusters [default: sqrt(N)].")
    per_cluster: int = Field(100, ge=1, description="Cluster mode: at most this many samples per chosen cluster.")
    min_seed_per_cluster: int = Field(3, ge=0, description="Cluster mode: a cluster is chosen when it holds MORE "
                                                           "than this many seed samples.")
    exclude_duplicates: bool = Field(True, description="Leave out the samples the dedup table drops.")
    min_score: Optional[float] = Field(None, ge=-1.0, le=1.0, description="Drop hits whose cosine to their seed "
                                                                          "is below this.")
    seed: int = Field(0, description="Random seed of the cluster-mode k-means.")
    max_removal: float = Field(1.0, gt=0.0, le=1.0, description="Refuse to leave out more than this share of "
                                                                "the pool (1: no limit) ...")
    allow_mass_removal: bool = Field(False, description="... unless this is given.")

    def record(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"max_removal", "allow_mass_removal"})


class ClusterParams(Params):
    """``webcurate cluster``."""

    levels: Union[str, list[int]] = Field(
        "10000,1000,100", description="k per level, finest first: level 1 clusters the samples, level t "
                                      "clusters level t-1's centroids. A k above what it clusters is lowered.")
    resampling_steps: Union[int, str, list[int]] = Field(
        10, description="Resampling steps per level (re-run k-means on the points closest to each centroid, then "
                        "re-assign); one number for every level (level 1 skipped when large) or a list like 0,10,10.")
    sample_size: Union[int, str, list[int], None] = Field(
        None, description="Points taken per cluster in a resampling step: a number, a list per level, or auto "
                          "(half the mean cluster size of the level).")
    sample_strategy: Literal["closest", "random"] = Field("closest", description="Which points of a cluster a "
                                                                                 "resampling step takes.")
    niter: int = Field(20, ge=1, description="Lloyd iterations of each k-means.")
    seed: int = Field(0, description="Random seed: the same seed gives the same clusters.")
    method: Literal["auto", "flat", "split"] = Field(
        "auto", description="Level-1 k-means: flat, split (coarse cells split by size, then refined; for "
                            "millions of points x thousands of clusters), or auto by problem size.")
    subset: Literal["auto", "all", "dedup", "retrieve"] = Field(
        "auto", description="Which samples to cluster: retrieved ones, dedup survivors, or all embedded ones; "
                            "auto takes the latest of these that exists.")

    @field_validator("levels")
    @classmethod
    def _levels(cls, v: Any) -> list[int]:
        vals = int_list(v, "levels")
        vals = [vals] if isinstance(vals, int) else vals
        if not vals or any(int(x) < 1 for x in vals):
            raise ValueError(f"must be positive integers, finest first (e.g. 10000,1000,100), got {v!r}")
        return [int(x) for x in vals]

    @field_validator("resampling_steps")
    @classmethod
    def _steps(cls, v: Any) -> Any:
        vals = int_list(v, "resampling_steps")
        vals = 10 if vals is None else vals
        if any(int(x) < 0 for x in ([vals] if isinstance(vals, int) else vals)):
            raise ValueError(f"must be >= 0, got {v!r}")
        return vals

    @field_validator("sample_size")
    @classmethod
    def _sizes(cls, v: Any) -> Any:
        vals = int_list(v, "sample_size")
        if vals is not None and any(int(x) < 1 for x in ([vals] if isinstance(vals, int) else vals)):
            raise ValueError(f"must be >= 1 or auto, got {v!r}")
        return vals

    @model_validator(mode="after")
    def _per_level(self) -> "ClusterParams":
        for name in ("resampling_steps", "sample_size"):
            v = getattr(self, name)
            if isinstance(v, list) and len(v) != len(self.levels):
                raise ValueError(f"{name} has {len(v)} entries for {len(self.levels)} levels")
        return self


class SampleParams(Params):
    """``webcurate sample``."""

    target: int = Field(ge=1, description="How many samples to select (all of them if fewer exist).")
    strategy: Literal["random", "closest"] = Field("random", description="Within a level-1 cluster take random "
                                                   "samples, or those closest to the centroid.")
    seed: int = Field(0, description="Random seed for ties and the random strategy.")
    min_score: list[str] = Field(default_factory=list, description="Leave out samples whose `webcurate score "
                                 "--name NAME` score is below VALUE (NAME=VALUE, repeatable).")
    weight_by: Optional[str] = Field(None, description="Within each cluster, draw with probability growing "
                                                       "with score NAME (replaces --strategy).")

    @field_validator("min_score")
    @classmethod
    def _floors(cls, v: list[str]) -> list[str]:
        for item in v:
            name, eq, value = item.partition("=")
            try:
                float(value)
            except ValueError:
                raise ValueError(f"expected NAME=VALUE with a number, got {item!r}") from None
            if not eq or not name.strip():
                raise ValueError(f"expected NAME=VALUE, got {item!r}")
        return sorted(v)

    def record(self) -> dict[str, Any]:
        """Recorded parameters; the score options only when used, so older runs keep theirs."""
        out = self.as_record()
        if not self.min_score and not self.weight_by:
            out.pop("min_score"), out.pop("weight_by")
        return out

    def floors(self) -> dict[str, float]:
        """``{score name: minimum}`` from ``min_score``."""
        return {k.strip(): float(v) for k, _, v in (s.partition("=") for s in self.min_score)}


class ExportParams(Params):
    """``webcurate export``."""

    selection: Literal["auto", "sample", "retrieve", "dedup"] = Field(
        "auto", description="Which selection to export; auto takes the latest: sample, else retrieve, else dedup "
                            "survivors.")
    workers: Optional[int] = Field(None, ge=1, description="Shards copied at once (default: one per Ray CPU).")


class ReportParams(Params):
    """The HTML report at the end of ``curate``."""

    output: Optional[str] = Field(None, description="HTML file (default: <input>/report.html).")
