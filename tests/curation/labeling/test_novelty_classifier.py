"""The pieces under self-training: classifiers on embeddings, temperature, novelty calibration."""
from __future__ import annotations

import numpy as np

from webcurate.curation.labeling.calibration import fit_temperature, softmax
from webcurate.curation.labeling.classifier import FeatureMap, balanced_weights, make_classifier
from webcurate.curation.labeling.novelty import Calibration, auto_threshold, knn_novelty


def _blobs(n, K=3, D=8, spread=0.6, seed=0):
    rng = np.random.default_rng(seed)
    C = np.random.default_rng(42).normal(size=(K, D)) * 2
    y = rng.integers(0, K, n)
    return C[y] + spread * rng.normal(size=(n, D)), y


def test_classifiers_learn_blobs_and_are_deterministic():
    E, y = _blobs(300)
    fmap = FeatureMap.fit(E)
    X = fmap(E)
    w = balanced_weights(y, 3)
    for name in ("logreg", "mlp"):
        a = make_classifier(name, 3, l2=1e-2, hidden=16, max_iter=200, seed=1).fit(X, y, w)
        b = make_classifier(name, 3, l2=1e-2, hidden=16, max_iter=200, seed=1).fit(X, y, w)
        assert (a.logits(X).argmax(axis=1) == y).mean() > 0.95
        np.testing.assert_array_equal(a.logits(X), b.logits(X))


def test_balanced_weights_give_each_class_the_same_total():
    y = np.array([0] * 90 + [1] * 10)
    w = balanced_weights(y, 3, base=np.where(np.arange(100) < 5, 1.0, 0.5))
    per = np.bincount(y, weights=w, minlength=3)
    assert abs(per[0] - per[1]) < 1e-9 and per[2] == 0 and abs(w.sum() - 52.5) < 1e-9


def test_temperature_softens_an_overconfident_model():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 2000)
    logits = rng.normal(size=(2000, 4))
    logits[np.arange(2000), y] += 1.0
    T = fit_temperature(logits * 5, y)  # the same evidence, five times too sharp
    assert 3.5 < T < 7.0
    P = softmax(logits * 5, T)
    assert abs(P.max(axis=1).mean() - (P.argmax(axis=1) == y).mean()) < 0.05


def test_in_set_scores_are_conformal_p_values():
    cal = Calibration.from_scores(np.arange(10, dtype=float))
    np.testing.assert_allclose(cal.in_set(np.array([-1.0, 9.0, 9.5, 100.0])), [1.0, 2 / 11, 1 / 11, 1 / 11])
    rng = np.random.default_rng(0)
    cal = Calibration.from_scores(rng.normal(size=500))
    fresh = cal.in_set(rng.normal(size=5000))  # exchangeable items: about a of them fall below a
    assert abs((fresh < 0.1).mean() - 0.1) < 0.03


def test_auto_threshold_rejects_none_examples_but_keeps_the_known_share():
    known = np.linspace(0.02, 1.0, 50)
    a, bal = auto_threshold(known, np.full(5, 0.01))
    assert a <= 0.02 and bal == 1.0  # the smallest threshold that rejects them all
    a, _ = auto_threshold(known, np.full(5, 0.5), keep_known=0.9)
    assert (known >= a).mean() >= 0.9


def test_knn_novelty_excludes_the_sample_itself():
    R = np.eye(4)
    assert np.allclose(knn_novelty(R, R, 1), 0.0)
    assert np.allclose(knn_novelty(R, R, 1, self_index=np.arange(4)), 1.0)
