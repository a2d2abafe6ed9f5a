"""k-NN (DINO protocol) and linear-probe evaluation, feature extraction and `webcurate eval`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import load_helper
from webcurate.train.evaluate import (EvalError, encode_labels, extract_features, knn_eval, knn_predict,
                                      linear_probe)


H = load_helper(Path(__file__).with_name("loader_data.py"))


def blobs(n_per_class: int, n_classes: int, dim: int, spread: float, seed: int):
    """Gaussian clusters around random unit directions: (N, dim) feats, (N,) labels."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(n_classes, dim, generator=torch.Generator().manual_seed(0)), dim=1)
    labels = torch.arange(n_classes).repeat_interleave(n_per_class)
    feats = centres[labels] + spread * torch.randn(len(labels), dim, generator=g)
    return feats, labels


def test_knn_separates_clustered_features_and_is_at_chance_on_shuffled_labels():
    tr_x, tr_y = blobs(50, 5, 32, 0.15, seed=1)
    va_x, va_y = blobs(20, 5, 32, 0.15, seed=2)
    assert knn_eval(tr_x, tr_y, va_x, va_y, k=20, T=0.07) > 0.97
    shuffled = tr_y[torch.randperm(len(tr_y), generator=torch.Generator().manual_seed(3))]
    assert knn_eval(tr_x, shuffled, va_x, va_y, k=20, T=0.07) < 0.45  # chance is 0.2


def test_knn_votes_are_weighted_by_exp_similarity_over_temperature():
    # One neighbour of class 0 very close, two of class 1 farther: a low temperature
    # trusts the closest, a high one counts heads (the DINO weighting exp(sim / T)).
    train = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    labels = torch.tensor([0, 1, 1])
    val = torch.tensor([[1.0, 0.05]])
    assert knn_predict(train, labels, val, k=3, T=0.05).tolist() == [0]
    assert knn_predict(train, labels, val, k=3, T=10.0).tolist() == [1]
    # cosine, not Euclidean: scaling a train vector changes nothing
    assert knn_predict(train * torch.tensor([[100.0], [1.0], [1.0]]), labels, val, k=3, T=0.05).tolist() == [0]


def test_knn_rejects_mismatched_inputs():
    x, y = blobs(5, 2, 8, 0.1, seed=0)
    with pytest.raises(EvalError, match="same D"):
        knn_eval(x, y, torch.zeros(3, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(EvalError, match="one label"):
        knn_eval(x, y[:-1], x, y)
    with pytest.raises(EvalError, match="temperature"):
        knn_eval(x, y, x, y, T=0.0)


def test_linear_probe_learns_separable_features_better_than_chance_labels():
    tr_x, tr_y = blobs(60, 4, 16, 0.2, seed=4)
    va_x, va_y = blobs(25, 4, 16, 0.2, seed=5)
    res = linear_probe(tr_x, tr_y, va_x, va_y, max_iter=50)
    assert res["accuracy"] > 0.95 and res["weight_decay"] in (1e-4, 1e-3, 1e-2)
    noise = linear_probe(torch.randn(240, 16), tr_y, va_x, va_y, weight_decays=(1e-3,), max_iter=50)
    assert noise["accuracy"] < 0.5


def test_encode_labels_counts_unseen_val_classes_as_errors():
    tr, va, classes = encode_labels(["dog", "cat", "dog"], ["cat", "bird"])
    assert classes == ["cat", "dog"] and tr.tolist() == [1, 0, 1] and va.tolist() == [0, -1]


# -- on datasets ---------------------------------------------------------------------
CLASSES = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def labelled_dataset(root: str, per_class: int, seed: int, statuses: dict[str, str] | None = None) -> str:
    """Photos tinted by class colour: separable even for a random-init backbone."""
    samples = []
    for c, (name, rgb) in enumerate(CLASSES.items()):
        for i in range(per_class):
            photo = H.make_photo(seed * 1000 + 10 * c + i, (48, 40)).astype(np.float32)
            tinted = np.clip(0.3 * photo + 0.7 * np.array(rgb, np.float32), 0, 255).astype(np.uint8)
            samples.append((f"{name}{seed}_{i}", H.jpeg_bytes(tinted), name))
    H.write_dataset(root, samples, shard_size=7, statuses=statuses)
    return root


def tiny_vit():
    import timm

    kwargs = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=0)
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs), kwargs


def test_extract_features_embeds_ok_labelled_samples_of_a_dataset(tmp_path):
    root = labelled_dataset(str(tmp_path / "train"), 4, seed=1, statuses={"red1_0": "duplicate"})
    model, _ = tiny_vit()
    keys, feats, labels = extract_features(root, model, image_size=32, batch_size=5)
    assert feats.shape == (11, 48) and feats.dtype == torch.float32 and torch.isfinite(feats).all()
    assert len(set(keys)) == 11 and "red1_0" not in keys
    assert sorted(set(labels)) == sorted(CLASSES) and labels.count("red") == 3
    assert all(k.startswith(lab) for k, lab in zip(keys, labels))
    # same image -> same feature, independent of batching
    _, again, _ = extract_features(root, model, image_size=32, batch_size=64)
    torch.testing.assert_close(feats, again, atol=1e-4, rtol=1e-4)


def test_extract_features_needs_labels(tmp_path):
    root = str(tmp_path / "unlabelled")
    H.write_dataset(root, [("a", H.jpeg_bytes(H.make_photo(0, (32, 32))), None)], shard_size=4)
    model, _ = tiny_vit()
    with pytest.raises(EvalError, match="no labelled ok samples"):
        extract_features(root, model, image_size=32)


def test_eval_cli_reports_knn_and_linear_accuracy_of_a_checkpoint(tmp_path):
    from click.testing import CliRunner

    from webcurate.train.eval_cli import eval_group
    from webcurate.shards.backbone_format import BackboneMeta, write_backbone

    train = labelled_dataset(str(tmp_path / "train"), 8, seed=1)
    val = labelled_dataset(str(tmp_path / "val"), 4, seed=2)
    model, kwargs = tiny_vit()
    ckpt = str(tmp_path / "backbone.safetensors")
    write_backbone(model.state_dict(), BackboneMeta("vit_tiny_patch16_224", kwargs, 32), ckpt)
    runner = CliRunner()
    out_json = tmp_path / "knn.json"
    res = runner.invoke(eval_group, ["knn", "--checkpoint", ckpt, "--train", train, "--val", val, "--k", "5",
                                     "--device", "cpu", "--json", str(out_json)])
    assert res.exit_code == 0, res.output
    assert "top1_accuracy" in res.output
    knn = json.loads(out_json.read_text())
    assert knn["train_samples"] == 24 and knn["val_samples"] == 12 and knn["classes"] == 3 and knn["k"] == 5
    assert knn["top1_accuracy"] > 0.8  # colour classes are easy even for random features
    res = runner.invoke(eval_group, ["linear", "--checkpoint", ckpt, "--train", train, "--val", val,
                                     "--weight-decay", "0.01", "--device", "cpu",
                                     "--json", str(tmp_path / "lin.json")])
    assert res.exit_code == 0, res.output
    lin = json.loads((tmp_path / "lin.json").read_text())
    assert lin["top1_accuracy"] > 0.8 and lin["weight_decay"] == 0.01
    unlabelled = str(tmp_path / "unlabelled")
    H.write_dataset(unlabelled, [("a", H.jpeg_bytes(H.make_photo(0, (32, 32))), None)], shard_size=4)
    res = runner.invoke(eval_group, ["knn", "--checkpoint", ckpt, "--train", unlabelled, "--val", val])
    assert res.exit_code == 1 and "no labelled ok samples" in res.output and "Traceback" not in res.output
    res = runner.invoke(eval_group, ["knn", "--help"])
    assert "--temperature" in res.output and "--checkpoint" in res.output
