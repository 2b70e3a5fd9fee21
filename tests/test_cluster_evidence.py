"""`UnitClustering.evidence_` and its warnings: underpowered statistics, the dense regime."""
from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import stats as st

from topo.cluster import UnitClustering, recovery_scores
from topo.cluster.evidence import needed_against_null, smallest_passing
from topo.planted.generator import PlantedConfig, generate
from topo.stats.layer_stats import from_activations

BASE = PlantedConfig(num_channels=32, num_hidden=8, degree=4, height=10, width=10, seed=1)


def _fit(cfg: PlantedConfig, **params):
    planted = generate(cfg)
    stats = from_activations(torch.from_numpy(planted.activations), positions=None, threshold=0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = UnitClustering(progress=False, random_state=0, **params).fit(stats)
    ours = [str(w.message) for w in caught if issubclass(w.category, UserWarning)
            and str(w.message).startswith("UnitClustering")]
    return planted, stats, model, ours


def test_underpowered_statistics_warn_once_with_the_numbers():
    """10 images of 10 x 10 at hidden density 0.03: a pair at lift 2 shows ~2 co-firings, the bar is ~10."""
    _, stats, model, messages = _fit(replace(BASE, num_samples=10))
    ev = model.evidence_
    assert not ev.powered and not ev.dense
    [message] = [m for m in messages if "needs" in m]
    assert "\n" not in message
    assert f"{stats.count} observations" in message and f"needs {ev.needed:.0f}" in message
    assert "more images" in message and "positions" in message
    # the numbers, recomputed with scipy
    alive = np.setdiff1d(np.arange(stats.num_channels), stats.dead_units)
    rate = float(np.median(stats.firing_rate[alive]))
    assert ev.median_rate == pytest.approx(rate)
    assert ev.tests == pytest.approx(len(alive) ** 2 * 81 / 2)
    mu = stats.count * rate ** 2
    bar = ev.alpha / ev.tests
    k = int(ev.needed)
    assert st.poisson.sf(k - 1, mu) <= bar < st.poisson.sf(k - 2, mu)  # the smallest count that passes
    assert ev.expected_at_floor == pytest.approx(2.0 * mu) and ev.expected_at_floor < k


def test_well_powered_planted_statistics_do_not_warn():
    planted, _, model, messages = _fit(replace(BASE, density=0.1, num_samples=120))
    assert messages == []
    ev = model.evidence_
    assert ev.powered and not ev.dense and ev.expected_at_floor >= ev.needed
    assert recovery_scores(planted.truth, model)["jaccard"] >= 0.9


def test_dense_layer_warns():
    """A negative bias makes every unit fire on noise alone, most of the time."""
    _, stats, model, messages = _fit(replace(BASE, bias=-0.05, num_samples=40))
    assert model.evidence_.dense and model.evidence_.median_rate > 0.5
    [message] = [m for m in messages if "dense regime" in m]
    assert "\n" not in message and "threshold" in message
    assert f"{model.evidence_.median_rate:.0%}" in message


def test_evidence_is_a_plain_record():
    _, _, model, _ = _fit(replace(BASE, density=0.1, num_samples=120))
    d = model.evidence_.to_dict()
    assert set(d) >= {"observations", "median_rate", "needed", "expected_at_floor", "powered", "dense"}
    assert d["observations"] == 12000 and d["null_observations"] is None


def test_smallest_passing_count_against_brute_force():
    for mu in (0.5, 3.0, 40.0, 900.0):
        log_bar = np.log(1e-7)
        brute = next(k for k in range(1, 10**5) if st.poisson.logsf(k - 1, mu) <= log_bar)
        assert smallest_passing(lambda k: float(st.poisson.logsf(k - 1, mu)), log_bar) == brute
    assert smallest_passing(lambda k: 0.0, -1.0) == float("inf")  # a bar no count reaches


def test_needed_against_null_is_the_smallest_count_passing_the_binomial_test():
    pairs, rate, null_pairs, null_rate, log_bar = 5000.0, 0.1, 8000.0, 0.12, np.log(1e-6)
    k = needed_against_null(pairs, rate, null_pairs, null_rate, log_bar)
    k0 = round(null_pairs * null_rate ** 2)
    w = pairs * (rate / null_rate) ** 2
    pi = w / (w + null_pairs)
    p = lambda n: st.binomtest(int(n), int(n + k0), pi, alternative="greater").pvalue  # noqa: E731
    assert p(k) <= np.exp(log_bar) < p(k - 1)
    assert needed_against_null(pairs, rate, null_pairs, 0.0, log_bar) == float("inf")
