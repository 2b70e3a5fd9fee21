"""Deep recovery: the building blocks of `topo.planted.recovery`, the strength tiers of the clustering, and a small
planted deep network recovered by the construction.
"""
from __future__ import annotations

import itertools
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from topo.cluster import Cluster, UnitClustering, recovery_scores
from topo.cluster.arora import strength_levels, tiered_groups
from topo.cluster.metrics import aligned_overlap, best_shift, codes_best_shifts, codes_covered, member_codes
from topo.cluster.select import TierTest, drop_unions
from topo.planted.generator import DeepPlantedConfig, PlantedTruth, generate_deep
from topo.planted.recovery import DecodedChannel, decoded_clusters, layer_recovery, match_channels, rewrite_truth
from topo.stats.layer_stats import from_activations


def _truth(supports, kernels) -> PlantedTruth:
    return PlantedTruth(supports=tuple(tuple(sorted(s)) for s in supports), kernel_sizes=tuple(kernels),
                        weights=tuple((1.0,) * len(s) for s in supports), labels=np.zeros(0, dtype=np.int64))


def _clustering(supports) -> SimpleNamespace:
    clusters = [Cluster.from_members(s) for s in supports]
    return SimpleNamespace(clusters_=clusters,
                           kernel_counts_={k: sum(c.kernel_size == k for c in clusters) for k in (1, 3, 5)})


# ---------------------------------------------------------------- building blocks


def test_best_shift_maximises_the_overlap_by_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(50):
        a = {(int(c), int(y), int(x)) for c, y, x in rng.integers(-2, 3, size=(6, 3)) % [4, 5, 5]}
        b = {(int(c), int(y), int(x)) for c, y, x in rng.integers(-2, 3, size=(5, 3)) % [4, 5, 5]}
        t = best_shift(a, b)
        shifted = {(c, y + t[0], x + t[1]) for c, y, x in b}
        brute = max(len(a & {(c, y + u, x + v) for c, y, x in b}) for u, v in itertools.product(range(-9, 10), repeat=2))
        assert len(a & shifted) == brute == aligned_overlap(a, b)


def test_shifts_and_covers_of_many_sets_at_once_match_each_set_by_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(20):
        a = {(int(c), int(y), int(x)) for c, y, x in rng.integers(0, 5, size=(8, 3)) - [0, 2, 2]}
        others = [{(int(c), int(y), int(x)) for c, y, x in rng.integers(0, 5, size=(rng.integers(1, 7), 3)) - [0, 2, 2]}
                  for _ in range(6)]
        overlaps, shifts = codes_best_shifts(member_codes(a), [member_codes(b) for b in others])
        inside = codes_covered(member_codes(a), [member_codes(b) for b in others], shifts)
        members = sorted(a)  # the order of member_codes: by channel, then dy, then dx
        for b, overlap, shift, row in zip(others, overlaps, shifts, inside):
            scored = [(len(a & {(c, y + u, x + v) for c, y, x in b}), u, v)
                      for u, v in itertools.product(range(-9, 10), repeat=2)]
            most = max(n for n, _, _ in scored)
            brute = min(((u, v) for n, u, v in scored if n == most), key=lambda t: (abs(t[0]) + abs(t[1]), t))
            assert overlap == most and tuple(shift) == brute  # sharing nothing: overlap 0 at shift (0, 0)
            assert {m for m, hit in zip(members, row) if hit} == a & {(c, y + brute[0], x + brute[1]) for c, y, x in b}


def test_counting_shifts_densely_or_sparsely_gives_the_same_best_shifts(monkeypatch):
    """`codes_best_shifts` counts the shifts of a small box densely, of a large one by `np.unique`: same answer."""
    import topo.cluster.metrics as metrics

    rng = np.random.default_rng(2)
    for _ in range(30):
        a = member_codes({(int(c), int(y), int(x)) for c, y, x in rng.integers(0, 6, size=(10, 3)) - [0, 3, 3]})
        others = [member_codes({(int(c), int(y), int(x)) for c, y, x in
                                rng.integers(0, 6, size=(rng.integers(1, 9), 3)) - [0, 3, 3]}) for _ in range(8)]
        others.append(member_codes({(50, 0, 0)}))  # shares no channel: overlap 0 at shift (0, 0)
        dense = codes_best_shifts(a, others)
        monkeypatch.setattr(metrics, "_BINCOUNT_LIMIT", 0)
        sparse = codes_best_shifts(a, others)
        monkeypatch.undo()
        np.testing.assert_array_equal(dense[0], sparse[0])
        np.testing.assert_array_equal(dense[1], sparse[1])
        assert dense[0][-1] == 0 and tuple(dense[1][-1]) == (0, 0)


def test_member_codes_of_many_sets_match_one_set_at_a_time():
    from topo.cluster.metrics import many_member_codes

    rng = np.random.default_rng(3)
    sets = [[(int(c), int(y), int(x)) for c, y, x in rng.integers(0, 4, size=(rng.integers(1, 12), 3)) - [0, 2, 2]]
            for _ in range(40)]  # unsorted, with duplicates
    for got, members in zip(many_member_codes(sets), sets):
        np.testing.assert_array_equal(got, member_codes(members))
    with pytest.raises(ValueError, match="offsets"):
        many_member_codes([[(0, 0, 0)], [(1, 70, 0)]])


def test_the_tier_bar_is_where_the_tier_test_turns():
    """`TierTest.bar` solves the test's quadratic: just above it a tier is significantly stronger, just below not;
    and the union check's prefix cut finds exactly the candidates `above` finds."""
    from topo.cluster.select import _UnionIndex

    for test in (TierTest(10_000, 0.01, 5.0), TierTest(300, 0.0, 3.0), TierTest(0.5, 0.2, 4.0)):
        for lo in (0.0, 1e-4, 0.03, 0.4):
            bar = test.bar(lo)
            assert bar > lo
            assert test.above(np.array([bar * (1 + 1e-9) + 1e-12]), lo)[0]
            assert not test.above(np.array([bar * (1 - 1e-9) - 1e-12]), lo)[0]
    rng = np.random.default_rng(4)
    keys = [tuple((c, 0, 0) for c in range(k, k + int(n))) for k, n in enumerate(rng.integers(3, 9, size=300))]
    tiers = dict(zip(keys, np.round(rng.uniform(0.0, 0.08, size=300), 3)))  # with ties
    test = TierTest(observations=5_000, expected=0.005, z=3.0)
    index = _UnionIndex(keys, tiers, 0.8, test)
    sizes = np.array([len(k) for k in keys])
    tier = np.array([tiers[k] for k in keys])
    for g in range(0, 300, 7):
        want = np.flatnonzero((sizes < sizes[g]) & test.above(tier, float(tier[g])))
        np.testing.assert_array_equal(index.stronger(g), want)


def test_best_shift_prefers_the_smallest_shift_among_ties():
    assert best_shift([(0, 0, 0)], [(0, 0, 0)]) == (0, 0)
    assert best_shift([(0, 0, 0), (0, 0, 2)], [(0, 0, 1)]) == (0, -1)  # |t| = 1 both ways: the smaller t
    assert best_shift([(1, 0, 0)], [(2, 0, 0)]) == (0, 0)  # nothing shared


def test_match_channels_finds_each_clusters_unit_and_shift():
    supports = [((0, 0, 0), (1, 0, 1), (2, 1, 0)), ((3, 0, 0), (4, 0, 0), (5, 0, 0))]
    clusters = [Cluster.from_members([(c, y + 2, x - 1) for c, y, x in supports[0]]), Cluster.from_members(supports[1]),
                Cluster.from_members([(7, 0, 0), (8, 0, 0), (9, 0, 0)])]
    channels = match_channels(clusters, supports)
    assert [c.unit for c in channels] == [0, 1, None]
    assert channels[0].jaccard == channels[1].jaccard == 1.0
    for channel, cluster in zip(channels[:2], clusters):  # cluster = support + shift
        support = supports[channel.unit]
        assert set(cluster.members) == {(c, y + channel.shift[0], x + channel.shift[1]) for c, y, x in support}


def test_rewrite_truth_reads_each_unit_through_the_channels_that_decode_it():
    upper = _truth([((0, 0, 0), (1, 1, 1)), ((1, 0, 0), (2, 0, 0))], (3, 1))
    # unit 0 decoded by channel 0 shifted by (1, 0); unit 1 by channels 1 and 3; unit 2 by none
    channels = [DecodedChannel(0, (1, 0)), DecodedChannel(1, (0, 0)), DecodedChannel(None), DecodedChannel(1, (0, -1))]
    first, second = rewrite_truth(upper, channels)
    # d(p) ~ h(p + t): member (u, o) becomes (channel, o - t), then canonical
    assert Cluster.from_members(first) == Cluster.from_members([(0, -1, 0), (1, 1, 1), (3, 1, 2)])
    assert Cluster.from_members(second) == Cluster.from_members([(1, 0, 0), (3, 0, 1)])  # unit 2 is read by nobody


def test_layer_recovery_of_perfect_clusterings_is_perfect_at_every_layer():
    """Clusterings that are each layer's truth, written in the channels the module below decodes
    (`decoded_clusters` order), score 1 at every layer."""
    sample = generate_deep(DeepPlantedConfig(num_samples=8, height=8, width=8), seed=0)
    clusterings, truth = [], sample.layer_truth(1).supports
    for layer in range(1, sample.config.depth + 1):
        clusterings.append(_clustering(truth))
        if layer < sample.config.depth:
            channels = match_channels(decoded_clusters(clusterings[-1]), truth)
            truth = [s for s in rewrite_truth(sample.layer_truth(layer + 1), channels) if s]
    rows = layer_recovery(sample, clusterings)
    assert [r["layer"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["jaccard"] == r["precision_jaccard"] == 1.0
        assert r["units_decoded"] == 1.0
    # a layer-1 clustering that misses units lowers the score of the layers above it
    partial = [_clustering(sample.layer_truth(1).supports[:6])] + clusterings[1:]
    assert layer_recovery(sample, partial)[1]["jaccard"] < 1.0


def test_the_unmatched_clusters_are_those_equal_to_no_support_and_carry_their_own_kernels():
    """A cluster equal to a true support up to translation is matched (its kernel is the support's); one member more
    or less, or a member at another offset, is not, and the scores count those per kernel."""
    one = [(0, 0, 0), (1, 0, 0), (2, 0, 0)]
    three = [(3, 0, 0), (4, 1, 1), (5, -1, 0)]
    truth = _truth([one, three], (1, 3))
    found = [[(c, y + 1, x + 1) for c, y, x in one],  # the 1x1 support, moved: matched
             three + [(6, 2, 2)],  # a member more, reaching 5x5: unmatched
             [(0, 0, 0), (1, 0, 0), (2, 0, 1)],  # one member at another offset: unmatched, 3x3
             [(3, 0, 0), (4, 1, 1)]]  # a member less: unmatched
    scores = recovery_scores(truth, _clustering(found))
    assert scores["n_unmatched"] == 3
    assert scores["unmatched_counts"] == {1: 0, 3: 2, 5: 1}
    assert scores["unmatched_mean_size"] == pytest.approx((4 + 3 + 2) / 3)
    exact = recovery_scores(truth, _clustering([one, three]))
    assert exact["n_unmatched"] == 0 and exact["unmatched_counts"] == {1: 0, 3: 0, 5: 0}
    assert exact["found_counts"] == exact["true_counts"]  # matched clusters carry the truth's kernels


# ---------------------------------------------------------------- strength tiers


def test_strength_levels_are_the_distinct_strengths_or_their_quantiles():
    np.testing.assert_array_equal(strength_levels(np.array([0.2, 0.0, 0.5, 0.2])), [0.5, 0.2])
    many = np.linspace(0.01, 1.0, 100)
    levels = strength_levels(many, max_levels=5)
    assert len(levels) == 5 and levels[0] == 1.0 and levels[-1] == 0.01 and np.all(np.diff(levels) < 0)


def _two_supports_graph(strong: float, weak: float):
    """Anchor 0 with support {0, 1, 2} (strong), a sibling support {3, 4, 5} (strong inside), weak across."""
    n = 6
    strength = np.full((n, n), weak)
    for block in ((0, 1, 2), (3, 4, 5)):
        strength[np.ix_(block, block)] = strong
    np.fill_diagonal(strength, 0.0)
    return strength > 0, strength


def test_tiered_groups_find_a_support_inside_the_union_of_siblings():
    adj, strength = _two_supports_graph(0.06, 0.03)
    groups = {tuple(int(i) for i in g): base for g, base in tiered_groups(adj, strength, 0.5)}
    assert groups[(0, 1, 2)] is False  # the support, at its own level only
    assert groups[(0, 1, 2, 3, 4, 5)] is True  # the whole graph: the union, as without tiers


def test_drop_unions_replaces_a_union_of_significantly_stronger_parts():
    union = ((0, 0, 0), (1, 0, 0), (2, 0, 0), (3, 0, 1), (4, 0, 1), (5, 0, 1))
    parts = (union[:3], union[3:])
    candidates = {union: {0, 1, 2, 3, 4, 5}, parts[0]: {0, 1}, parts[1]: {3, 4}}
    tiers = {union: 0.035, parts[0]: 0.06, parts[1]: 0.06}
    test = TierTest(observations=10_000, expected=0.01, z=5.0)
    assert set(drop_unions(candidates, tiers, {union}, 0.8, test)) == set(parts)
    # equal up to sampling error (sd of the difference about 0.003 here): one support, kept whole
    close = {union: 0.058, parts[0]: 0.06, parts[1]: 0.06}
    assert set(drop_unions(candidates, close, {union}, 0.8, test)) == {union}
    assert set(drop_unions(candidates, tiers, {union}, 0.8, None)) == {union}  # without tiers: the base candidates
    # one stronger part with weakly attached members: the part alone
    one = {union: candidates[union], parts[0]: {0, 1}}
    assert set(drop_unions(one, tiers, {union}, 0.8, test)) == {parts[0]}
    # a stronger group the candidate does not hold (2 of its 3 members) changes nothing
    other = ((0, 0, 0), (1, 0, 0), (9, 0, 0))
    apart = {union: candidates[union], other: {0, 1}}
    assert set(drop_unions(apart, {union: 0.035, other: 0.06}, {union}, 0.8, test)) == {union}


def test_tier_test_tells_equal_rates_from_doubled_ones_at_its_bar():
    """Tiers estimated from Poisson counts: equal rates pass the bar about as often as the normal tail
    allows (z = 3: 0.13%), rates twice apart nearly always."""
    rng = np.random.default_rng(0)
    n, test = 10_000, TierTest(observations=10_000, expected=0.0, z=3.0)
    same = rng.poisson(0.04 * n, size=(20_000, 2)) / n
    assert test.above(same[:, 0], 0.0).all()  # anything positive is above nothing at these counts
    false = np.mean([test.above(np.array([a]), b)[0] for a, b in same[:4000]])
    assert false < 0.005
    double = np.column_stack([rng.poisson(0.06 * n, 2000), rng.poisson(0.03 * n, 2000)]) / n
    assert np.mean([test.above(np.array([a]), b)[0] for a, b in double]) > 0.99


# ---------------------------------------------------------------- small planted deep network


@pytest.fixture(scope="module")
def small_deep(one_thread_module):
    return generate_deep(DeepPlantedConfig(num_samples=256), seed=0)


def _fit(stats, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return UnitClustering(method="arora", random_state=0, progress=False, **kwargs).fit(stats)


def _layer_scores(sample, layer: int, **kwargs) -> dict:
    """Layer ``layer`` clustered from the true maps of the layer below (exact statistics, firing when positive)."""
    x = np.ascontiguousarray(sample.layer_activations(layer - 1))
    return recovery_scores(sample.layer_truth(layer), _fit(from_activations(torch.from_numpy(x), threshold=0.0),
                                                           **kwargs))


@pytest.mark.parametrize("layer, level", [(1, 0.8), (2, 0.7)])
def test_tiers_recover_each_layer_beside_its_siblings(small_deep, layer, level):
    """The supports of layers 1 and 2 (both with siblings: their units share parents) are found from the true
    maps below, far better than without tiers (measured at 256 images, seed 0: layer 1 0.90 against 0.51,
    layer 2 0.82 against 0.40; docs/clustering.md, "Deep recovery")."""
    tiered = _layer_scores(small_deep, layer)
    flat = _layer_scores(small_deep, layer, tiers=False)
    assert tiered["jaccard"] >= level, tiered
    assert tiered["jaccard"] >= flat["jaccard"] + 0.25, (tiered, flat)


def test_the_clustering_in_worker_processes_finds_the_same_clusters(small_deep, monkeypatch):
    """``n_jobs=2``: the per-anchor search and the union check (which replaces unions here: layer 1 has
    siblings) run in two forked workers and give the same clusters, votes and counts as one process."""
    import topo.cluster.estimator as estimator
    import topo.cluster.select as select

    calls = []

    def spy(real):
        def forked(function, shared, items, processes, **kwargs):
            calls.append((function.__name__, processes, len(items)))
            return real(function, shared, items, processes, **kwargs)
        return forked

    monkeypatch.setattr(estimator, "MIN_FORKED_EDGES", 0)  # whatever this small layer's edges
    monkeypatch.setattr(estimator, "forked_map", spy(estimator.forked_map))
    monkeypatch.setattr(select, "forked_map", spy(select.forked_map))
    stats = from_activations(torch.from_numpy(np.ascontiguousarray(small_deep.layer_activations(0))), threshold=0.0)
    alone, apart = _fit(stats), _fit(stats, n_jobs=2)
    assert {name for name, processes, items in calls if processes == 2 and items > 1} == {"_search_anchor", "_parts_of"}
    assert [(c.members, c.votes) for c in apart.clusters_] == [(c.members, c.votes) for c in alone.clusters_]
    assert (apart.n_candidates_, apart.n_window_cuts_) == (alone.n_candidates_, alone.n_window_cuts_)
    flat = _fit(stats, tiers=False)
    assert [c.members for c in flat.clusters_] != [c.members for c in alone.clusters_]  # the union check acted


def test_the_top_layer_without_siblings_loses_nothing_to_tiers(small_deep):
    """The top units are independent: no unions to resolve, so tiers find what the plain procedure finds
    (here they also trim a member stuck to one support: precision 0.96 -> 1.00)."""
    top = small_deep.config.depth
    tiered, flat = _layer_scores(small_deep, top), _layer_scores(small_deep, top, tiers=False)
    assert tiered["jaccard"] >= flat["jaccard"] and tiered["precision_jaccard"] >= flat["precision_jaccard"]
    assert tiered["found_counts"] == flat["found_counts"]
    assert tiered["jaccard"] >= 0.85  # 0.94 measured


def test_the_construction_recovers_layer_one_when_units_fire_when_positive(small_deep):
    """Through `topo.construct.construct` (no stem, Hebbian, no budget, exact statistics), one module on the
    observed planted data recovers layer 1 at the clustering's level when a unit fires when positive (0.88
    measured). With the default ``fire_quantile=0.9`` it is far lower (0.38): the observed channels fire 16-24%
    of the time, and keeping each one's top 10% loses the firings of its weaker parents (docs/clustering.md)."""
    import builders
    from topo.construct.config import ConstructConfig
    from topo.construct.loop import BuiltLayers, construct
    from topo.data import make_loader
    from topo.data.tensors import bundle_from_arrays

    bundle = bundle_from_arrays(small_deep.activations, small_deep.labels, name="planted", where="test")
    reference = builders.googlenet_spec("small", num_classes=bundle.num_classes, width_mult=0.25, in_channels=16,
                                        input_size=16)

    def layer_one(fire_quantile):
        config = ConstructConfig(skeleton="1", stem="none", init="hebbian", budget_macs="none", positions=None,
                                 stats_batches=None, fire_quantile=fire_quantile, seed=0)
        loader = lambda d: make_loader(d, batch_size=64, train=True, seed=0, workers=0, device="cpu",
                                       distributed=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            built = BuiltLayers()
            construct(reference, bundle.train, config, input_hw=(16, 16), loader=loader, progress=False,
                      on_layer=built)
        return layer_recovery(small_deep, list(built.clusterings.values()))[0]

    positive, quantile = layer_one(None), layer_one(0.9)
    assert positive["jaccard"] >= 0.75, positive
    assert positive["units_decoded"] >= 0.75
    assert quantile["jaccard"] < positive["jaccard"]


@pytest.mark.slow
def test_bench_recovery_prints_every_layer_of_the_construction_and_the_clustering_alone():
    from benchmark_runs import run_benchmark, table_rows

    out = run_benchmark("bench_recovery.py", "--seeds", "1", "--cli", "--overlap")
    rows = table_rows(out, "construct()")
    assert [int(r[1]) for r in rows[:3]] == [1, 2, 3]  # the summary, one row per layer
    for r in rows[:3]:
        assert 0.0 <= float(r[2].split()[0]) <= 1.0  # the mean best-match Jaccard
    oracle = [r for r in (table_rows(out, str(layer)) for layer in (1, 2, 3))]
    assert all(len(r) >= 1 for r in oracle)
    assert "Each layer from the true maps of the layer below" in out
    overlap = table_rows(out, "False") + table_rows(out, "True")  # units sharing half their support, and the rest
    assert sum(int(r[1]) for r in overlap) == 12  # every unit of layer 1 (the generator's 12), in one group or the other
    # the main job on --data planted and on the same data saved as .npz (--data tensors): the same recovery
    name = "topo-build construct --data {} (inception3a, inception3b, inception3c)"
    planted, tensors = table_rows(out, name.format("planted")), table_rows(out, name.format("tensors"))
    assert len(planted) == 6 and [r[1:-2] for r in planted] == [r[1:-2] for r in tensors]  # all but the times


def test_a_bad_max_levels_is_a_one_line_error(small_deep):
    from topo.common.errors import UserError

    stats = from_activations(torch.from_numpy(small_deep.activations[:8]), threshold=0.0)
    with pytest.raises(UserError, match="max_levels must be a positive int"):
        UnitClustering(max_levels=0, progress=False).fit(stats)
