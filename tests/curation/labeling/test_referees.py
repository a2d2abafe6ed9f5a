"""Referee LFs: the label model keeps its LF links only when the LFs outside every
link do not side with the fit without them; leaving an unlinked LF out is exact."""
from __future__ import annotations

import numpy as np
import pytest

from webcurate.curation.labeling.label_model import LabelModel
from webcurate.curation.labeling.referees import mcnemar_z, referee_counts, unlinked
from webcurate.curation.labeling.synthetic import make_votes, structured_votes


def _acc(pred, y):
    cov = pred >= 0
    return float((pred[cov] == y[cov]).mean())


def test_unlinked_are_the_lfs_with_neither_parent_nor_child():
    assert unlinked([-1, 0, -1, -1, 3]) == [2]
    assert unlinked([-1, -1]) == [0, 1]


def test_mcnemar_z_follows_the_definition():
    assert mcnemar_z(30, 10) == pytest.approx(20 / np.sqrt(40))
    assert mcnemar_z(0, 0) == 0.0


def test_referee_counts_weigh_only_items_another_lf_also_voted_on():
    L = np.array([[0, 0, -1], [0, 1, -1], [1, -1, -1], [1, 1, 0]])
    w = np.array([1.0, 2.0, 5.0, 3.0])
    always0 = lambda j: np.zeros(4, dtype=int)  # noqa: E731
    always1 = lambda j: np.ones(4, dtype=int)  # noqa: E731
    # Referee 0 voted on every row, but row 2 has no other vote: rows 0, 1 side
    # with "always 0" (weight 3), row 3 with "always 1" (weight 3).
    assert referee_counts(L, w, always0, always1, [0]) == (3.0, 3.0, 1)
    # Referee 2 voted on row 3 only: 0 agrees with "always 0".
    assert referee_counts(L, w, always0, always1, [2]) == (3.0, 0.0, 1)


def test_leaving_out_the_only_voting_lf_gives_the_class_prior():
    d = make_votes(n=4000, seed=3, copies={})
    m = LabelModel(4, dependencies=False).fit(d.L)
    only0 = (d.L[:, 0] >= 0) & (d.L[:, 1:] < 0).all(axis=1)
    assert only0.any()
    prior_class = int(np.argmax(m.class_balance))
    assert np.all(m.predict_without(d.L[only0], 0) == prior_class)
    # With LF 0 voting as well as others, leaving it out changes some predictions, not all.
    other = (d.L[:, 0] >= 0) & (d.L[:, 1:] >= 0).sum(axis=1).astype(bool)
    changed = m.predict_without(d.L[other], 0) != m.predict(d.L[other])
    assert 0 < changed.mean() < 0.5


def test_a_linked_lf_cannot_be_left_out():
    d = make_votes(n=20_000, seed=0)  # LFs 8 and 9 copy LFs 0 and 1
    m = LabelModel(4).fit(d.L)
    assert m.dependencies
    child = m.dependencies[0].child
    with pytest.raises(ValueError, match="linked"):
        m.predict_without(d.L, child)


def test_links_that_the_referees_refute_are_dropped():
    # A group of four LFs sharing errors; on this draw the forest found for it
    # (a star) costs 3.5 points, and the eight unlinked LFs say so (z < -2).
    d = structured_votes("mixed", 20_300, seed=1)
    L, y = d.L[:20_000], d.y[:20_000]
    m = LabelModel(5).fit(L)
    independent = LabelModel(5, dependencies=False).fit(L)
    assert m.links_z < -2 and m.dropped_links and not m.dependencies
    assert m.parents == [-1] * L.shape[1]
    np.testing.assert_array_equal(m.predict_proba(L), independent.predict_proba(L))
    assert _acc(m.predict(L), y) > 0.635
    d_ = m.to_dict()
    assert d_["links_z"] == m.links_z and len(d_["dropped_links"]) == len(m.dropped_links)


@pytest.mark.parametrize("structure,seed", [("independent_copies", 0), ("correlated_groups", 2), ("mixed", 0)])
def test_links_the_referees_support_are_kept(structure, seed):
    d = structured_votes(structure, 20_000, seed)
    K = len(d.class_balance)
    m = LabelModel(K).fit(d.L)
    assert m.links_z > 2 and m.dependencies and not m.dropped_links
    assert _acc(m.predict(d.L), d.y) > _acc(LabelModel(K, dependencies=False).fit(d.L).predict(d.L), d.y)
