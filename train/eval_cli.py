"""``webcurate eval knn|linear``: frozen-feature evaluation (imports only click at module level)."""
from __future__ import annotations

import click

_COMMON = [
    click.option("--checkpoint", required=True, metavar="PATH",
                 help="Backbone to evaluate: backbone.safetensors, a `webcurate train` checkpoint (file or "
                      "folder) or run --output folder (the backbone it exported), or a torch state dict (needs --model)."),
    click.option("--train", "train_data", required=True, metavar="DATASET",
                 help="Labelled dataset (folder or s3://) whose `label` field (class name) gives the classes "
                      "the classifier learns from."),
    click.option("--val", "val_data", required=True, metavar="DATASET",
                 help="Labelled dataset (folder or s3://) the accuracy is measured on; classes absent from "
                      "--train count as errors."),
    click.option("--model", default=None, metavar="NAME",
                 help="timm architecture; only needed for plain state dicts (our files record it)."),
    click.option("--image-size", type=int, default=None,
                 help="Eval crop size (resize shorter side to size*256/224, centre crop); default: the "
                      "backbone's training size."),
    click.option("--batch-size", type=int, default=64, show_default=True,
                 help="Images per forward pass when extracting features."),
    click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                 help="Where the backbone runs; auto = cuda when a GPU is visible."),
    click.option("--json", "json_out", default=None, metavar="PATH",
                 help="Also write the result as JSON to this local path or s3:// URI."),
]


def _common(f):
    for opt in reversed(_COMMON):
        f = opt(f)
    return f


def _features(checkpoint: str, train_data: str, val_data: str, model: str | None, image_size: int | None,
              batch_size: int, device: str):
    import time

    import torch

    from webcurate.train.evaluate import encode_labels, extract_features
    from webcurate.train.export_backbone import load_backbone

    from webcurate.train.evaluate import EvalError

    t0 = time.time()
    try:
        backbone = load_backbone(checkpoint, model_name=model)
    except ValueError as e:  # not a backbone we can read: say so in one line
        raise click.ClickException(f"cannot load --checkpoint {checkpoint}: {e}") from e
    if device == "cuda" and not torch.cuda.is_available():
        raise click.ClickException("--device cuda but no CUDA GPU is visible")
    dev = None if device == "auto" else torch.device(device)
    try:
        _, tr_f, tr_l = extract_features(train_data, backbone, image_size, batch_size, device=dev,
                                         desc="train features")
        _, va_f, va_l = extract_features(val_data, backbone, image_size, batch_size, device=dev,
                                         desc="val features")
    except EvalError as e:
        raise click.ClickException(str(e)) from e
    tr_y, va_y, classes = encode_labels(tr_l, va_l)
    return tr_f, tr_y, va_f, va_y, classes, time.time() - t0


def _report(title: str, result: dict, json_out: str | None) -> None:
    import json

    from webcurate.shards.progress import print_table

    rows = [(k, f"{v:.4f}" if isinstance(v, float) else v) for k, v in result.items()]
    print_table(title, rows, ("what", "value"))
    if json_out:
        from webcurate.shards import storage

        storage.write_bytes(json_out, json.dumps(result, indent=2, sort_keys=True).encode())


@click.group("eval")
def eval_group() -> None:
    """Evaluate a backbone on frozen features: k-NN (DINO protocol) or a linear probe.

    Both take a labelled train and val dataset in webcurate format (the `label`
    field holds the class name, as `webcurate shard --labels-from-dirs` writes it).
    """


@eval_group.command("knn", context_settings={"show_default": True})
@_common
@click.option("--k", "k", type=int, default=20, help="Neighbours that vote (DINO uses 20).")
@click.option("--temperature", type=float, default=0.07, help="Vote weight exp(cosine / temperature).")
def knn(checkpoint, train_data, val_data, model, image_size, batch_size, device, json_out, k, temperature) -> None:
    """Weighted k-NN top-1 accuracy: cosine similarity to every train feature, the
    top k vote with weight exp(sim / temperature)."""
    import time

    from webcurate.train.evaluate import knn_eval

    tr_f, tr_y, va_f, va_y, classes, t_feat = _features(checkpoint, train_data, val_data, model, image_size,
                                                         batch_size, device)
    t0 = time.time()
    acc = knn_eval(tr_f, tr_y, va_f, va_y, k=k, T=temperature, num_classes=len(classes))
    _report(f"eval knn: {checkpoint}", {
        "top1_accuracy": acc, "k": k, "temperature": temperature, "classes": len(classes),
        "train_samples": len(tr_y), "val_samples": len(va_y), "feature_dim": int(tr_f.shape[1]),
        "feature_seconds": round(t_feat, 1), "knn_seconds": round(time.time() - t0, 2),
    }, json_out)


@eval_group.command("linear", context_settings={"show_default": True})
@_common
@click.option("--weight-decay", "weight_decays", type=float, multiple=True, default=(1e-4, 1e-3, 1e-2),
              help="L2 penalty of the logistic regression; several are compared on a 10% hold-out of train.")
@click.option("--max-iter", type=int, default=100, help="L-BFGS iterations per fit.")
@click.option("--seed", type=int, default=0, help="Seed of the hold-out split.")
def linear(checkpoint, train_data, val_data, model, image_size, batch_size, device, json_out, weight_decays,
           max_iter, seed) -> None:
    """Linear probe top-1 accuracy: a logistic regression (L-BFGS) on standardised frozen features."""
    import time

    from webcurate.train.evaluate import linear_probe

    tr_f, tr_y, va_f, va_y, classes, t_feat = _features(checkpoint, train_data, val_data, model, image_size,
                                                         batch_size, device)
    t0 = time.time()
    res = linear_probe(tr_f, tr_y, va_f, va_y, num_classes=len(classes), weight_decays=weight_decays,
                       max_iter=max_iter, seed=seed)
    _report(f"eval linear: {checkpoint}", {
        "top1_accuracy": res["accuracy"], "train_accuracy": res["train_accuracy"],
        "weight_decay": res["weight_decay"], "classes": len(classes), "train_samples": len(tr_y),
        "val_samples": len(va_y), "feature_dim": int(tr_f.shape[1]), "feature_seconds": round(t_feat, 1),
        "probe_seconds": round(time.time() - t0, 2),
    }, json_out)


COMMANDS: list[click.Command] = [eval_group]
