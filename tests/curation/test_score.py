"""`webcurate score`: user-brought timm classifiers and linear heads, with weights the test makes."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from helpers import load_helper
from webcurate.curation.filter import STAGE as FILTER, run_filter
from webcurate.curation.quality_params import FilterParams, ScoreParams
from webcurate.curation.score import read_scores, run_score, sampling_priority
from webcurate.shards.dataset import Dataset
from webcurate.shards.errors import ConfigError

qd = load_helper(os.path.join(os.path.dirname(os.path.abspath(__file__)), "quality_data.py"))
MODEL = "test_resnet"  # timm's 0.4M-parameter test net: 96-d features, classifier `fc`


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, ray_local):
    """6 photos + 1 undecodable file in 2 shards, embedded with the random-init test net."""
    from webcurate.curation.embed import run_embed

    root = str(tmp_path_factory.mktemp("score") / "pool")
    items = [(f"g{i:03d}", qd.jpeg_bytes(qd.photo(i)), None) for i in range(6)]
    qd.write(root, items[:3] + [("broken", b"\xff\xd8 not a jpeg", None)] + items[3:], shard_size=4)
    run_embed(root, MODEL, random_init=True, image_size=32, batch_size=8, summary=False)
    return root


@pytest.fixture
def pool(embedded, tmp_path):
    dst = str(tmp_path / "pool")
    shutil.copytree(embedded, dst)
    return dst


def _classifier(path: str, classes: int = 2) -> torch.nn.Module:
    import timm

    torch.manual_seed(3)
    model = timm.create_model(MODEL, pretrained=False, num_classes=classes).eval()
    save_file(model.state_dict(), path)
    return model


def test_a_timm_classifier_scores_each_image_with_its_softmax_output(pool, tmp_path):
    from webcurate.curation.embed import decode_image

    model = _classifier(str(tmp_path / "nsfw.safetensors"))
    res = run_score(pool, ScoreParams(model=MODEL, weights=str(tmp_path / "nsfw.safetensors"), image_size=32),
                    summary=False)
    assert res["stage"] == "score_nsfw" and res["outputs"] == 2
    assert res["counts"] == {"total": 7, "ok": 6, "failed": 1}
    t = Dataset(pool).read_sidecar("score_nsfw")
    rows = {r["key"]: r for r in t.to_pylist()}
    assert rows["broken"]["status"] == "failed" and rows["broken"]["score"] is None
    assert rows["broken"]["error"].startswith("decode:")
    # The same image through the same model by hand: timm's normalisation, softmax, last class.
    sample = next(s for s in Dataset(pool).iter_samples(0) if s.key == "g001")
    x = torch.from_numpy(decode_image(sample.image, 32)).permute(2, 0, 1)[None].float() / 255
    mean, std = torch.tensor(model.pretrained_cfg["mean"]), torch.tensor(model.pretrained_cfg["std"])
    with torch.no_grad():
        want = torch.softmax(model((x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)), 1)[0]
    assert rows["g001"]["score"] == pytest.approx(float(want[1]), abs=1e-5)
    assert rows["g001"]["outputs"] == pytest.approx(want.tolist(), abs=1e-5)
    # Re-running does nothing; the scores read back per key.
    assert run_score(pool, ScoreParams(model=MODEL, weights=str(tmp_path / "nsfw.safetensors"), image_size=32),
                     summary=False)["shards_done"] == []
    assert set(read_scores(Dataset(pool), "nsfw")) == {f"g{i:03d}" for i in range(6)}


def test_a_linear_head_on_the_embeddings_feeds_filter_min_score(pool, tmp_path):
    w = torch.randn(1, 96, generator=torch.Generator().manual_seed(0))
    save_file({"head.weight": w, "head.bias": torch.tensor([0.1])}, str(tmp_path / "aesthetic.safetensors"))
    res = run_score(pool, ScoreParams(head=str(tmp_path / "aesthetic.safetensors")), summary=False)
    assert res["stage"] == "score_aesthetic" and res["counts"]["ok"] == 6
    emb = Dataset(pool).read_sidecar("embeddings")
    scores = read_scores(Dataset(pool), "aesthetic")
    for key, e in zip(emb["key"].to_pylist(), emb["embedding"].to_pylist()):
        if e is not None:
            want = 1 / (1 + np.exp(-(np.asarray(e, np.float32) @ w[0].numpy() + 0.1)))
            assert scores[key] == pytest.approx(float(want), abs=1e-4)
    floor = float(np.median(list(scores.values())))
    run_filter(pool, FilterParams(min_score=[f"aesthetic={floor}"], allow_mass_removal=True), summary=False)
    t = Dataset(pool).read_sidecar(FILTER)
    got = dict(zip(t["key"].to_pylist(), t["reason"].to_pylist()))
    assert {k for k, r in got.items() if r and "score_aesthetic" in r} == \
        {k for k, s in scores.items() if s < floor} | {"broken"}


def test_widths_that_do_not_match_are_refused_before_any_part_is_written(pool, tmp_path):
    save_file({"weight": torch.zeros(3, 5)}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ConfigError, match=r"takes 5-d inputs .* gives 96-d features"):
        run_score(pool, ScoreParams(head=str(tmp_path / "wrong.safetensors")), summary=False)
    import timm

    save_file(timm.create_model(MODEL, pretrained=False, num_classes=0).state_dict(), str(tmp_path / "bb.safetensors"))
    with pytest.raises(ConfigError, match=r"takes 5-d inputs .* model test_resnet gives 96-d"):
        run_score(pool, ScoreParams(model=MODEL, weights=str(tmp_path / "bb.safetensors"),
                                    head=str(tmp_path / "wrong.safetensors"), image_size=32), summary=False)
    with pytest.raises(ConfigError, match="no classifier tensor `fc.weight`"):
        run_score(pool, ScoreParams(model=MODEL, weights=str(tmp_path / "bb.safetensors")), summary=False)
    _classifier(str(tmp_path / "two.safetensors"))
    with pytest.raises(ConfigError, match=r"--output 2 is out of range: the score model has 2 output"):
        run_score(pool, ScoreParams(model=MODEL, weights=str(tmp_path / "two.safetensors"), output=2, image_size=32),
                  summary=False)
    assert not any(d.startswith("score_") for d in os.listdir(pool))
    with pytest.raises(ValueError, match="needs --weights"):
        ScoreParams(model=MODEL)


def test_score_weighted_priority_favours_high_scores_and_top_mode_is_exact():
    s = np.array([0.1, 0.9, 0.5, np.nan])
    assert list(np.argsort(sampling_priority(s, weighted=False))) == [1, 2, 0, 3]
    firsts = np.bincount([np.argmin(sampling_priority(s, seed=i)) for i in range(2000)], minlength=4)
    assert firsts[1] > firsts[2] > firsts[0] > 0 and firsts[3] == 0
    with pytest.raises(ConfigError, match="scores >= 0"):
        sampling_priority(np.array([-1.0, 1.0]))


def test_sample_takes_min_score_floors_and_score_weighted_draws(pool, tmp_path):
    from webcurate.curation.cluster import run_cluster
    from webcurate.curation.sample import run_sample, selected_keys

    save_file({"weight": torch.randn(1, 96, generator=torch.Generator().manual_seed(1))},
              str(tmp_path / "aes.safetensors"))
    run_score(pool, ScoreParams(head=str(tmp_path / "aes.safetensors")), summary=False)
    scores = read_scores(Dataset(pool), "aes")
    floor = sorted(scores.values())[2]  # 4 of the 6 scored samples reach it
    run_cluster(pool, levels="2", resampling_steps="0", summary=False)
    res = run_sample(pool, 10, min_score=[f"aes={floor}"], summary=False)
    assert res.info["selected"] == 4 and set(selected_keys(Dataset(pool))) == {k for k, s in scores.items() if s >= floor}
    res = run_sample(pool, 3, weight_by="aes", seed=5, summary=False)
    assert res.info["selected"] == 3 and set(selected_keys(Dataset(pool))) <= set(scores)
    with pytest.raises(ConfigError, match="min_score: .*NAME=VALUE"):
        run_sample(pool, 3, min_score=["aes"], summary=False)
