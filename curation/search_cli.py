"""CLI: ``webcurate embed``, ``webcurate dedup``, ``webcurate retrieve``.

Only click is imported here; torch, Ray and faiss load inside the commands
so ``webcurate --help`` stays fast.
"""
from __future__ import annotations

import click

from .stage_report import report_option, write_stage_report


@click.command("embed")
@click.option("--input", "input_", required=True, metavar="DATASET",
              help="Dataset folder or s3:// prefix to embed (made by `webcurate shard`).")
@click.option("--model", required=True, metavar="NAME",
              help="timm architecture name, e.g. vit_small_patch14_dinov2 or convnext_tiny.")
@click.option("--weights", default=None, metavar="FILE",
              help="Weights for --model: a .safetensors file or a torch state dict (loaded with "
                   "weights_only=True), local or s3://. Nothing is downloaded from a model hub.")
@click.option("--checkpoint", default=None, metavar="CKPT",
              help="A checkpoint of `webcurate train`; its backbone is used instead of --weights.")
@click.option("--random-init", is_flag=True,
              help="Use seeded random weights (tests and smoke runs only; the embeddings mean little).")
@click.option("--image-size", default=224, show_default=True, type=int,
              help="Images are resized (short side) and centre-cropped to this size.")
@click.option("--batch-size", default=64, show_default=True, type=int, help="Images per forward pass.")
@click.option("--num-gpus", default=0.0, show_default=True, type=float,
              help="GPUs per inference actor; 0 runs on CPU (also the fallback when the cluster has none).")
@click.option("--concurrency", default=None, type=int,
              help="Number of inference actors [default: one per --num-gpus share of the GPUs, else one per 8 CPUs].")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="Storage type of the embedding vectors.")
def embed_cmd(input_, model, weights, checkpoint, random_init, image_size, batch_size, num_gpus, concurrency, dtype):
    """Embed every image with a timm backbone into DATASET/embeddings/ (L2-normalised).

    Resumable: shards already embedded with the same model and weights are
    skipped. Undecodable images are recorded with status=failed, not fatal.
    """
    from .embed import run_embed

    run_embed(input_, model, weights=weights, checkpoint=checkpoint, random_init=random_init,
              image_size=image_size, batch_size=batch_size, num_gpus=num_gpus, concurrency=concurrency,
              dtype=dtype)


@click.command("dedup")
@click.option("--input", "input_", required=True, metavar="DATASET", help="Dataset to deduplicate.")
@click.option("--method", type=click.Choice(["exact", "copy", "semdedup", "none"]), default="copy",
              show_default=True,
              help="exact: same sha256. copy: kNN graph + connected components (DINOv2; runs exact first). "
                   "semdedup: k-means, then drop items within 1-eps of a kept one per cluster. "
                   "none: only --against.")
@click.option("--against", multiple=True, metavar="DATASET",
              help="Drop pool samples near any sample of this dataset (e.g. an eval set), whole "
                   "near-duplicate component. Repeatable. Needs embeddings from the same model.")
@click.option("--k", default=64, show_default=True, type=int, help="Neighbours per sample in the kNN graph.")
@click.option("--threshold", default=0.6, show_default=True, type=float,
              help="Cosine above which two samples are copies (copy method and --against components).")
@click.option("--against-threshold", default=0.45, show_default=True, type=float,
              help="Cosine above which a pool sample matches an --against sample.")
@click.option("--eps", default=0.07, show_default=True, type=float,
              help="SemDeDup: drop when the cosine to a kept sample is >= 1 - eps.")
@click.option("--n-clusters", default=None, type=int, help="SemDeDup k-means clusters [default: N/1000].")
@click.option("--keep", type=click.Choice(["largest", "first"]), default="largest", show_default=True,
              help="Which sample of a duplicate group survives: most pixels, or smallest key.")
@click.option("--index", type=click.Choice(["auto", "flat", "ivf"]), default="auto", show_default=True,
              help="kNN index: exact flat search, IVF, or auto (flat up to 30k samples).")
@click.option("--nprobe", default=None, type=int,
              help="IVF cells each sample searches [default: 10]; more finds more near-duplicates, slower.")
@report_option
def dedup_cmd(input_, method, against, k, threshold, against_threshold, eps, n_clusters, keep, index, nprobe,
              make_report):
    """Decide which samples to keep; writes DATASET/dedup/ (keep, duplicate_of, similarity, reason)."""
    from .dedup import run_dedup

    run_dedup(input_, method=method, k=k, threshold=threshold, against=list(against),
              against_threshold=against_threshold, eps=eps, keep=keep, n_clusters=n_clusters, index=index,
              nprobe=nprobe)
    write_stage_report(input_, make_report)


@click.command("retrieve")
@click.option("--input", "input_", required=True, metavar="DATASET", help="The pool dataset to select from.")
@click.option("--seed", "seeds", multiple=True, required=True, metavar="DATASET",
              help="Seed dataset (embedded with the same model). Repeatable.")
@click.option("--k", default=4, show_default=True, type=int,
              help="Sample mode: nearest pool samples per seed sample (DINOv2: 4; 32 for small seed sets).")
@click.option("--mode", type=click.Choice(["sample", "cluster", "both"]), default="sample", show_default=True,
              help="sample: kNN per seed. cluster: k-means over the pool, take clusters holding more than "
                   "--min-seed-per-cluster seeds. both: the union.")
@click.option("--n-clusters", default=None, type=int, help="Cluster mode: k-means clusters [default: sqrt(N)].")
@click.option("--per-cluster", default=100, show_default=True, type=int,
              help="Cluster mode: at most this many samples taken from each chosen cluster.")
@click.option("--min-seed-per-cluster", default=3, show_default=True, type=int,
              help="Cluster mode: a cluster is chosen when it holds MORE than this many seed samples.")
@click.option("--min-score", default=None, type=float, help="Drop hits whose cosine to their seed is below this.")
@click.option("--include-duplicates", is_flag=True,
              help="Also retrieve samples the dedup table drops (by default they are left out).")
@report_option
def retrieve_cmd(input_, seeds, k, mode, n_clusters, per_cluster, min_seed_per_cluster, min_score,
                 include_duplicates, make_report):
    """Select pool samples near seed datasets; writes DATASET/retrieve/ (selected, score, seed_key)."""
    from .retrieve import run_retrieve

    result = run_retrieve(input_, list(seeds), k=k, mode=mode, n_clusters=n_clusters, per_cluster=per_cluster,
                          min_seed_per_cluster=min_seed_per_cluster, exclude_duplicates=not include_duplicates,
                          min_score=min_score)
    if result.get("message"):
        click.echo(f"note: {result['message']}", err=True)
    write_stage_report(input_, make_report)


COMMANDS = [embed_cmd, dedup_cmd, retrieve_cmd]
