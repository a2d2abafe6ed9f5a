"""Frozen-feature evaluation of a backbone: k-NN (DINO protocol) and a linear probe.

- ``extract_features`` embeds every ``ok`` sample of a labelled dataset in our
  format (``label`` = class name) with the eval transform of DINO: resize the
  shorter side to ``image_size * 256/224``, centre crop ``image_size``, ImageNet
  normalisation.
- ``knn_eval`` is DINO's weighted k-NN classifier: cosine similarity to all train
  features, the top ``k`` neighbours vote with weight ``exp(sim / T)``; top-1 accuracy.
- ``linear_probe`` trains one linear layer on the frozen (standardised) features
  and reports val top-1 accuracy.
"""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EvalError(ValueError):
    """Evaluation inputs do not fit (no labels, no samples, mismatched shapes)."""


# -- features ------------------------------------------------------------------------
def _eval_transform(image_size: int):
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(int(round(image_size * 256 / 224)), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def _labelled_samples(dataset_root: str) -> Iterator[tuple[str, bytes, str]]:
    """(key, image bytes, class name) of every ok sample with a label, shard by shard."""
    from webcurate.shards.dataset import Dataset

    ds = Dataset(dataset_root)
    shards = ds.completed_shards()
    if not shards:
        raise EvalError(f"{dataset_root} has no complete shards")
    for shard in shards:
        index = ds.read_index(shard, columns=None)
        cols = index.column_names
        if "label" not in cols:
            raise EvalError(f"{dataset_root} has no `label` column: evaluation needs a labelled dataset "
                            "(e.g. `webcurate shard --labels-from-dirs` on an ImageFolder tree)")
        status = index["status"].to_pylist() if "status" in cols else ["ok"] * index.num_rows
        labels = {k: lab for k, lab, st in zip(index["key"].to_pylist(), index["label"].to_pylist(), status)
                  if st == "ok" and lab is not None}
        for sample in ds.iter_samples(shard, keys=labels.keys()):
            yield sample.key, sample.image, str(labels[sample.key])


def _chunks(items: Iterator[Any], n: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _backbone_image_size(backbone: nn.Module) -> int:
    info = getattr(backbone, "webcurate_info", None) or {}
    if info.get("image_size"):
        return int(info["image_size"])
    cfg = getattr(backbone, "pretrained_cfg", None) or getattr(backbone, "default_cfg", None) or {}
    if cfg.get("input_size"):
        return int(cfg["input_size"][-1])
    return 224


def _embed(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = backbone(x)
    if isinstance(out, dict):  # a training wrapper: prefer the CLS token
        for key in ("x_norm_clstoken", "cls", "cls_token", "features"):
            if key in out:
                return out[key]
        raise EvalError(f"backbone returned a dict without a CLS entry: {sorted(out)}")
    if isinstance(out, (tuple, list)):
        out = out[0]
    if out.ndim == 3:  # (B, T, D) tokens: the first is CLS
        out = out[:, 0]
    return out


@torch.no_grad()
def extract_features(
    dataset_root: str,
    backbone: nn.Module,
    image_size: int | None = None,
    batch_size: int = 64,
    *,
    device: str | torch.device | None = None,
    num_threads: int = 2,
    desc: str = "features",
) -> tuple[list[str], torch.Tensor, list[str]]:
    """Embed the labelled ``ok`` samples of a dataset (local or ``s3://``).

    Returns ``(keys, feats, labels)``: N keys, float32 features (N, D) on CPU, and N
    class names. ``image_size`` defaults to the backbone's own (recorded at export,
    else timm's ``input_size``). Images that fail to decode are skipped and counted
    in a warning line.
    """
    from PIL import Image

    from webcurate.shards.progress import progress_bar

    size = int(image_size or _backbone_image_size(backbone))
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone = backbone.to(dev).eval()
    transform = _eval_transform(size)

    def load(item: tuple[str, bytes, str]):
        key, data, label = item
        try:
            with Image.open(io.BytesIO(data)) as im:
                return key, transform(im.convert("RGB")), label
        except Exception:  # a broken image is skipped, not fatal
            return key, None, label

    keys: list[str] = []
    labels: list[str] = []
    feats: list[torch.Tensor] = []
    failed = 0
    bar = progress_bar(desc=desc, unit="img")
    pending: list[tuple[str, torch.Tensor, str]] = []

    def flush() -> None:
        if not pending:
            return
        x = torch.stack([t for _, t, _ in pending]).to(dev, non_blocking=True)
        f = _embed(backbone, x).float().cpu()
        feats.append(f)
        keys.extend(k for k, _, _ in pending)
        labels.extend(lab for _, _, lab in pending)
        bar.update(len(pending))
        pending.clear()

    # PIL decodes and resizes with the GIL released: threads overlap with the model.
    # Executor.map submits its whole input at once: feed it bounded chunks so memory
    # stays at a few batches of images whatever the dataset size.
    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        for chunk in _chunks(_labelled_samples(dataset_root), batch_size):
            for key, tensor, label in pool.map(load, chunk):
                if tensor is None:
                    failed += 1
                    continue
                pending.append((key, tensor, label))
            if len(pending) >= batch_size:
                flush()
        flush()
    bar.close()
    if failed:
        print(f"warning: {failed} image(s) of {dataset_root} failed to decode and were skipped")
    if not feats:
        raise EvalError(f"{dataset_root} has no labelled ok samples to evaluate on")
    return keys, torch.cat(feats), labels


def encode_labels(train_labels: Sequence[str], val_labels: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Class names -> int ids (sorted train classes). Val classes unseen in train get id -1
    (never predicted, so they count as errors)."""
    classes = sorted(set(train_labels))
    ids = {c: i for i, c in enumerate(classes)}
    tr = torch.tensor([ids[c] for c in train_labels], dtype=torch.long)
    va = torch.tensor([ids.get(c, -1) for c in val_labels], dtype=torch.long)
    return tr, va, classes


# -- k-NN -------------------------------------------------------------------------------
def _check(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
           val_labels: torch.Tensor) -> None:
    if train_feats.ndim != 2 or val_feats.ndim != 2 or train_feats.shape[1] != val_feats.shape[1]:
        raise EvalError(f"features must be (N, D) with the same D, got {tuple(train_feats.shape)} and "
                        f"{tuple(val_feats.shape)}")
    if len(train_labels) != len(train_feats) or len(val_labels) != len(val_feats):
        raise EvalError("one label per feature row is needed")
    if len(train_feats) == 0 or len(val_feats) == 0:
        raise EvalError("empty train or val set")


@torch.no_grad()
def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    k: int = 20,
    T: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """DINO's weighted k-NN: predicted class (Nv,) for val feats (Nv, D) given train (Nt, D), labels (Nt,)."""
    train = nn.functional.normalize(train_feats.float(), dim=1)
    val = nn.functional.normalize(val_feats.float(), dim=1)
    train_labels = train_labels.long().to(train.device)
    C = int(num_classes if num_classes is not None else int(train_labels.max()) + 1)
    k = min(k, len(train))
    preds = []
    for start in range(0, len(val), chunk):
        sims = val[start:start + chunk].to(train.device) @ train.T  # (n, Nt)
        top, idx = sims.topk(k, dim=1)  # (n, k)
        votes = torch.zeros(len(top), C, device=train.device)
        votes.scatter_add_(1, train_labels[idx], (top / T).exp())
        preds.append(votes.argmax(1).cpu())
    return torch.cat(preds)


def knn_eval(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    k: int = 20,
    T: float = 0.07,
    num_classes: int | None = None,
) -> float:
    """Top-1 accuracy in [0, 1] of DINO's k-NN classifier (cosine, ``exp(sim/T)``-weighted votes of the top ``k``).

    Shapes: train_feats (Nt, D), train_labels (Nt,) int, val_feats (Nv, D), val_labels (Nv,) int.
    """
    train_labels = torch.as_tensor(train_labels)
    val_labels = torch.as_tensor(val_labels)
    _check(train_feats, train_labels, val_feats, val_labels)
    if k < 1:
        raise EvalError(f"k must be >= 1, got {k}")
    if T <= 0:
        raise EvalError(f"temperature must be > 0, got {T}")
    pred = knn_predict(train_feats, train_labels, val_feats, k=k, T=T, num_classes=num_classes)
    return float((pred == val_labels.long().cpu()).float().mean())


# -- linear probe -------------------------------------------------------------------------
def _train_linear(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, weight_decay: float,
                  max_iter: int) -> nn.Linear:
    """Multinomial logistic regression, full batch L-BFGS, L2 penalty ``weight_decay/2 * |W|^2``."""
    head = nn.Linear(x.shape[1], num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(head(x), y) + 0.5 * weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


def linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int | None = None,
    *,
    weight_decays: Sequence[float] = (1e-4, 1e-3, 1e-2),
    max_iter: int = 100,
    seed: int = 0,
) -> dict[str, Any]:
    """Train a linear classifier on frozen features; val top-1 accuracy and the chosen L2 penalty.

    Features are standardised with the train mean/std; the classifier is a
    multinomial logistic regression fitted with full-batch L-BFGS (deterministic, no
    learning rate to tune). With several ``weight_decays`` the best is picked on a
    10 % hold-out of train, then the head is refitted on all of train (val is never
    used for selection). Shapes as in ``knn_eval``. Returns ``{"accuracy": float,
    "weight_decay": float, "train_accuracy": float}``.
    """
    train_labels = torch.as_tensor(train_labels).long()
    val_labels = torch.as_tensor(val_labels).long()
    _check(train_feats, train_labels, val_feats, val_labels)
    if not weight_decays:
        raise EvalError("linear_probe needs at least one weight decay")
    C = int(num_classes if num_classes is not None else int(train_labels.max()) + 1)
    x = train_feats.float()
    mean, std = x.mean(0, keepdim=True), x.std(0, keepdim=True).clamp_min(1e-6)
    x = (x - mean) / std
    xv = (val_feats.float() - mean) / std
    wds = list(weight_decays)
    best = wds[0]
    if len(wds) > 1 and len(x) >= 20:
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        n_hold = max(1, len(x) // 10)
        hold, fit = perm[:n_hold], perm[n_hold:]
        scores = []
        for wd in wds:
            head = _train_linear(x[fit], train_labels[fit], C, weight_decay=wd, max_iter=max_iter)
            with torch.no_grad():
                scores.append(float((head(x[hold]).argmax(1) == train_labels[hold]).float().mean()))
        best = wds[int(np.argmax(scores))]  # ties go to the smallest penalty listed first
    head = _train_linear(x, train_labels, C, weight_decay=best, max_iter=max_iter)
    with torch.no_grad():
        acc = float((head(xv).argmax(1) == val_labels).float().mean())
        train_acc = float((head(x).argmax(1) == train_labels).float().mean())
    return {"accuracy": acc, "weight_decay": best, "train_accuracy": train_acc}
