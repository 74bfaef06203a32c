"""The uncertainty layer: a cluster bootstrap that covers what it claims on correlated rows (where a
token-level bootstrap does not), replicates that recompute the whole statistic, seeded disjoint
halves, and the statistics of sufficient sums checked against numpy on the pooled data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from selfrepair.uncertainty import (MIN_CLUSTERS, Bootstrap, Clusters, least_squares, moments, pearson,
                                    ratio, share, t_quantile, tail)


def correlated_rows(rng, n_rows: int, per_row: int, tau: float = 1.0, sigma: float = 1.0) -> np.ndarray:
    """``[rows, tokens]`` values with true mean 0: a shared offset per row (sd ``tau``) plus
    token noise (sd ``sigma``) — tokens of one row are correlated, rows independent."""
    return rng.normal(0, tau, (n_rows, 1)) + rng.normal(0, sigma, (n_rows, per_row))


def mean_of_sums(t: np.ndarray) -> np.ndarray:
    return t[:, 1] / t[:, 0]


def covers(x: np.ndarray, clusters: Clusters, row_of_token: np.ndarray, n_boot: int, seed: int) -> bool:
    sums = clusters.sum_tokens(row_of_token, x.ravel())[:, 0]  # [cluster, (count, sum)]
    e = Bootstrap.over(clusters, n_boot, seed).estimate(mean_of_sums, sums)
    return e.lo <= 0.0 <= e.hi


def test_cluster_bootstrap_covers_the_true_mean_where_a_token_bootstrap_does_not():
    """Seeded simulations, 30 rows of 20 tokens with a shared per-row offset (intra-row
    correlation 0.5): the cluster bootstrap's 95% interval covers the true mean at least 93% of
    the time; resampling tokens as if independent covers markedly less."""
    rows, per_row, sims = 30, 20, 300
    rng = np.random.default_rng(2024)
    row_of_token = np.repeat(np.arange(rows), per_row)
    by_row, by_token = Clusters.rows(rows), Clusters.rows(rows * per_row, unit="tokens")
    hits_row = hits_token = 0
    for s in range(sims):
        x = correlated_rows(rng, rows, per_row)
        hits_row += covers(x, by_row, row_of_token, 1000, s)
        if s < 100:  # the token bootstrap is costlier (600 units) and far off: 100 runs show it
            hits_token += covers(x, by_token, np.arange(rows * per_row), 400, s)
    cluster_rate, token_rate = hits_row / sims, hits_token / 100
    msg = f"coverage of the true mean: cluster bootstrap {cluster_rate:.1%}, token bootstrap {token_rate:.1%}"
    assert cluster_rate >= 0.93, msg
    assert token_rate <= 0.75 and cluster_rate - token_rate >= 0.2, msg


def test_few_clusters_are_flagged_and_the_expansion_widens_the_interval():
    rng = np.random.default_rng(0)
    x = correlated_rows(rng, MIN_CLUSTERS - 1, 5)
    c = Clusters.rows(len(x))
    e = Bootstrap.over(c, 500, 0).estimate(mean_of_sums, c.sum_rows(np.c_[np.full(len(x), 5), x.sum(1)]))
    assert not e.reliable and f"only {MIN_CLUSTERS - 1} independent rows" in e.why
    assert np.isfinite(e.lo) and e.lo <= e.value <= e.hi  # still shown, but not decided on
    # the expanded percentile reads further into the tails for few clusters, 2.5% for many
    assert tail(10) < tail(30) < tail(1000) < 0.025 and tail(10_000) == pytest.approx(0.025, abs=1e-4)


@pytest.mark.parametrize("df, want, tol", [(5, 2.5706, 5e-4), (9, 2.2622, 1e-4), (29, 2.0452, 1e-4),
                                           (120, 1.9799, 1e-4)])
def test_t_quantile_matches_the_table(df, want, tol):
    assert t_quantile(0.975, df) == pytest.approx(want, abs=tol)


def test_documents_group_rows_by_their_main_document_and_rows_stand_alone():
    c = Clusters.documents([0, 0, 0, 3, 3, 4, 7])
    assert list(c.of_row) == [0, 0, 0, 1, 1, 2, 3] and c.n == 4 and c.unit == "documents"
    p = Clusters.rows(5, unit="prompts")
    assert list(p.of_row) == list(range(5)) and p.unit == "prompts"
    sums = c.sum_rows(np.arange(7.0)[:, None])
    assert sums[:, 0].tolist() == [0 + 1 + 2, 3 + 4, 5, 6]


def test_halves_are_disjoint_cover_every_cluster_and_follow_the_seed():
    c = Clusters.rows(41)
    a, b = c.halves(3)
    assert len(a) == 20 and len(b) == 21 and not set(a) & set(b) and set(a) | set(b) == set(range(41))
    rows_a, rows_b = c.rows_of(a), c.rows_of(b)
    assert not (rows_a & rows_b).any() and (rows_a | rows_b).all()
    assert all(np.array_equal(x, y) for x, y in zip(c.halves(3), (a, b)))
    assert not np.array_equal(c.halves(4)[0], a)


def test_replicates_are_multinomial_resamples_of_clusters():
    """Row 0 is the estimate; every other row of weights is a resample of the clusters with
    replacement (counts summing to n), the same for the same seed."""
    b = Bootstrap(12, n_boot=300, seed=5)
    assert (b.weights[0] == 1).all() and (b.weights[1:].sum(1) == 12).all()
    assert np.array_equal(b.weights, Bootstrap(12, n_boot=300, seed=5).weights)
    assert not np.array_equal(b.weights, Bootstrap(12, n_boot=300, seed=6).weights)
    sums = np.random.default_rng(0).normal(size=(12, 3, 2))
    t = b.totals(sums)
    i = 17  # replicate i: the clusters it drew, with their multiplicities
    drawn = np.repeat(np.arange(12), b.weights[i].astype(int))
    np.testing.assert_allclose(t[i], sums[drawn].sum(0))
    np.testing.assert_allclose(t[0], sums.sum(0))


def test_estimate_is_the_expanded_percentile_interval_of_the_replicates():
    rng = np.random.default_rng(1)
    x = correlated_rows(rng, 25, 8)
    c = Clusters.rows(25)
    sums = c.sum_rows(np.c_[np.full(25, 8.0), x.sum(1)])
    b = Bootstrap.over(c, 800, 9)
    e = b.estimate(mean_of_sums, sums, n=200, unit="tokens")
    reps = b.totals(sums)
    boots = reps[1:, 1] / reps[1:, 0]
    a = tail(25)
    assert e.value == pytest.approx(x.mean())
    assert (e.lo, e.hi) == pytest.approx(tuple(np.quantile(boots, [a, 1 - a])))
    assert (e.n, e.unit, e.clusters, e.cluster_unit, e.seed, e.n_boot) == (200, "tokens", 25, "rows", 9, 800)
    assert e.reliable and "25 rows" in e.describe() and "seed 9" in e.describe()


def test_a_share_of_heads_carries_each_heads_sampling_error():
    """Heads whose means sit on the classification threshold flip from replicate to replicate, so
    the share's interval is wide; heads far from it never flip, and the share is exact."""
    rng = np.random.default_rng(3)
    clusters, heads = 40, 12

    def sums(offset):  # [cluster, head, (count, sum)] of per-cluster means around `offset`
        vals = offset + rng.normal(0, 1, (clusters, heads))
        return np.stack([np.ones((clusters, heads)), vals], -1)

    b = Bootstrap(clusters, 1000, 0)
    stat = lambda t: share(t[..., 1] / t[..., 0] > 0)  # noqa: E731
    near, far = b.estimate(stat, sums(0.0)), b.estimate(stat, sums(5.0))
    assert near.hi - near.lo >= 0.25
    assert far.value == far.lo == far.hi == 1.0


def test_sufficient_statistics_equal_numpy_on_the_pooled_data():
    rng = np.random.default_rng(4)
    frame = pd.DataFrame({"row": rng.integers(0, 15, 400), "head": rng.integers(0, 3, 400),
                          "x": rng.normal(size=400)})
    frame["y"] = 0.7 * frame["x"] + rng.normal(0, 0.5, 400)
    c = Clusters.rows(15)
    t = c.sum_tokens(frame["row"], moments(frame["x"], frame["y"]), frame["head"], 3).sum(0)  # [head, 6]
    for h, g in frame.groupby("head"):
        assert t[h, 0] == len(g)
        assert pearson(t[h]) == pytest.approx(np.corrcoef(g["x"], g["y"])[0, 1])
        slope, icpt = least_squares(t[h])
        assert (slope, icpt) == pytest.approx(tuple(np.polyfit(g["x"], g["y"], 1)))
    assert np.isnan(pearson(np.array([3.0, 3.0, 1.0, 3.0, 1.0, 1.0])))  # x constant: no correlation
    assert np.isnan(ratio(np.array([1.0]), np.array([0.0])))[0]
    assert np.isnan(share(np.zeros((2, 3), bool), np.zeros((2, 3), bool))).all()


def test_the_expansion_keeps_coverage_with_as_few_clusters_as_are_decided_on(monkeypatch):
    """At MIN_CLUSTERS clusters the expanded percentile interval still covers about 95%; the plain
    percentile interval (tails at 2.5%) covers less (print both)."""
    import selfrepair.uncertainty as u

    def rate(sims=400):
        rng = np.random.default_rng(11)
        c = Clusters.rows(MIN_CLUSTERS)
        hits = sum(covers(correlated_rows(rng, MIN_CLUSTERS, 10), c, np.repeat(np.arange(MIN_CLUSTERS), 10),
                          1000, s) for s in range(sims))
        return hits / sims

    expanded = rate()
    monkeypatch.setattr(u, "tail", lambda n, level=0.95: (1 - level) / 2)
    plain = rate()
    msg = f"coverage at {MIN_CLUSTERS} clusters: expanded {expanded:.1%}, plain percentile {plain:.1%}"
    assert expanded >= 0.92 and expanded - plain >= 0.02, msg
