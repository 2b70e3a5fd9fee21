"""The clustering's building blocks against independent references (scipy, networkx, scikit-learn, brute force).

* the Hebbian edge test (Poisson tail, Bonferroni bar) and the test against a
  null recording (conditional binomial), recomputed here from raw activations
  with scipy.stats;
* ``eigengap_k`` on block affinities with a known number of blocks, and against
  numpy's eigenvalues;
* Arora's dense-core peeling against networkx (cliques, k-cores) and a
  one-step-at-a-time reference peel;
* ``builders.from_clusters.reduction_width`` against scikit-learn's PCA.
"""
from __future__ import annotations

import math

import networkx as nx
import numpy as np
import pytest
import torch
from scipy import stats as st

from topo.cluster.arora import anchored_groups, dense_core, dense_cores, grow
from topo.cluster.select import eigengap_k
from topo.cluster.window import build_window_graph, lift_floor
from topo.stats.layer_stats import from_activations

ALPHA = 0.01


# ---------------------------------------------------------------- data with known co-firing


STRENGTHS = np.r_[np.linspace(0.05, 0.16, 24), 0.4, 0.5]  # pairs (48, 49) at (0, 0), (50, 51) at (1, 2) strongest


def _coupled_maps(seed: int, strengths=STRENGTHS, n: int = 40, size: int = 8,
                  p: float = 0.08) -> np.ndarray:
    """0/1 maps of independent units, in pairs (2m, 2m + 1) where unit 2m + 1 copies unit 2m with
    probability ``strengths[m]``: at the same position for even m, at offset (1, 2) for odd m. The weak
    couplings sit near the test's bar, the strong ones far above it."""
    rng = np.random.default_rng(seed)
    x = (rng.random((n, 2 * len(strengths), size, size)) < p).astype(np.float32)
    for m, c in enumerate(strengths):
        source = x[:, 2 * m].copy()
        if m % 2:  # unit 2m + 1 at q + (1, 2) repeats unit 2m at q
            source = np.zeros_like(source)
            source[:, 1:, 2:] = x[:, 2 * m, :-1, :-2]
        x[:, 2 * m + 1] = np.where(rng.random((n, size, size)) < c, source, x[:, 2 * m + 1])
    return x


def _counts(x: np.ndarray, dy: int, dx: int) -> tuple[np.ndarray, int]:
    """Co-firing counts k[i, j] of unit i at p and unit j at p + (dy, dx), and the number of position pairs."""
    _, _, H, W = x.shape
    a = x[:, :, max(0, -dy):H - max(0, dy), max(0, -dx):W - max(0, dx)]
    b = x[:, :, max(0, dy):H + min(0, dy), max(0, dx):W + min(0, dx)]
    a = a.transpose(1, 0, 2, 3).reshape(x.shape[1], -1)
    b = b.transpose(1, 0, 2, 3).reshape(x.shape[1], -1)
    return a @ b.T, a.shape[1]


def _reference_edges(x, null, dy, dx, reach, min_lift):
    """Edges at (dy, dx) by the documented rule, computed directly: scipy tails, Bonferroni over all tests.

    Returns (edges, binomial-significant, the tails of the pairs with enough lift, the bar)."""
    C = x.shape[1]
    bar = ALPHA / (C * C * (2 * reach + 1) ** 2 / 2)
    k, pairs = _counts(x, dy, dx)
    rate = x.mean(axis=(0, 2, 3))
    expected = np.outer(rate, rate)
    with np.errstate(divide="ignore", invalid="ignore"):
        if null is None:
            lift = (k / pairs) / expected
            tail = st.poisson.sf(k - 1, pairs * expected)
            binomial = st.binom.sf(k - 1, pairs, expected) <= bar
        else:
            k0, pairs0 = _counts(null, dy, dx)
            rate0 = null.mean(axis=(0, 2, 3))
            scale = expected / np.outer(rate0, rate0)
            lift = (k / pairs) / (k0 / pairs0 * scale)
            pi = pairs * scale / (pairs * scale + pairs0)
            tail = np.where(k > 0, st.binom.sf(k - 1, k + k0, pi), 1.0)  # the one-sided binomial test's p-value
            i, j = np.unravel_index(np.argmax(k), k.shape)  # spot check: scipy's binomial test says the same
            assert tail[i, j] == pytest.approx(
                st.binomtest(int(k[i, j]), int(k[i, j] + k0[i, j]), pi[i, j], alternative="greater").pvalue, rel=1e-9)
            binomial = tail <= bar
    strong = (lift >= min_lift) & (k > 0)
    if (dy, dx) == (0, 0):
        np.fill_diagonal(strong, False)
    return strong & (tail <= bar), binomial, tail[strong], bar


def _check_graph_against_reference(graph, x, null):
    near_below = near_above = 0
    for o, (dy, dx) in enumerate(graph.offsets):
        reference, binomial, tails, bar = _reference_edges(x, null, int(dy), int(dx), graph.reach, 2.0)
        np.testing.assert_array_equal(graph.edges[o], reference, err_msg=f"offset {(dy, dx)}")
        assert not (reference & ~binomial).any()  # Poisson is conservative next to the binomial
        near_below += int(((tails <= bar) & (tails > bar / 10)).sum())
        near_above += int(((tails > bar) & (tails <= 10 * bar)).sum())
    # the data put pairs on both sides of the bar, within a factor 10: the Bonferroni correction matters
    assert near_below > 0 and near_above > 0, (near_below, near_above)


@pytest.mark.parametrize("seed", [0, 1])
def test_hebbian_edges_match_scipy_poisson_tail_with_bonferroni(seed):
    x = _coupled_maps(seed)
    stats = from_activations(torch.from_numpy(x), max_offset=2, positions=None, threshold=0.5)
    graph = build_window_graph(stats, 2, min_lift=2.0, alpha=ALPHA)
    _check_graph_against_reference(graph, x, None)
    assert graph.edges[graph.centre][48, 49] and graph.edges[graph.index(1, 2)][50, 51]  # the strongest couplings


def test_auto_lift_floor_is_the_documented_rule():
    rate = np.array([0.01, 0.2, 0.5, 0.9])
    expected = np.array([[min(2.0, 1 + 0.25 * (1 / max(a, b) - 1)) for b in rate] for a in rate])
    np.testing.assert_allclose(lift_floor(rate, rate), expected)


def test_null_edges_match_scipy_conditional_binomial_test():
    x = _coupled_maps(2)
    null = _coupled_maps(3)
    rng = np.random.default_rng(9)
    for m in range(1, len(STRENGTHS), 2):  # the null keeps the couplings at offset 0, loses those at (1, 2)
        null[:, 2 * m + 1] = null[rng.permutation(len(null)), 2 * m + 1]
    stats = from_activations(torch.from_numpy(x), max_offset=2, positions=None, threshold=0.5)
    null_stats = from_activations(torch.from_numpy(null), max_offset=2, positions=None, threshold=0.5)
    graph = build_window_graph(stats, 2, min_lift=2.0, alpha=ALPHA, null=null_stats)
    for o, (dy, dx) in enumerate(graph.offsets):
        reference, _, _, _ = _reference_edges(x, null, int(dy), int(dx), 2, 2.0)
        np.testing.assert_array_equal(graph.edges[o], reference, err_msg=f"offset {(dy, dx)}")
    assert graph.edges[graph.index(1, 2)][50, 51]  # in the data only
    assert not graph.edges[graph.centre][48, 49]  # in both
    plain = build_window_graph(stats, 2, min_lift=2.0, alpha=ALPHA)
    assert plain.edges[plain.centre][48, 49]  # an edge against independence


# ---------------------------------------------------------------- eigengap


def _blocks(sizes, rng, noise=0.05):
    n = sum(sizes)
    aff = rng.uniform(0.0, noise, (n, n))
    start = 0
    for s in sizes:
        aff[start:start + s, start:start + s] = rng.uniform(0.7, 1.0, (s, s))
        start += s
    aff = (aff + aff.T) / 2
    perm = rng.permutation(n)
    return aff[np.ix_(perm, perm)]


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_eigengap_finds_the_number_of_blocks(k):
    rng = np.random.default_rng(k)
    for _ in range(5):
        aff = _blocks(rng.integers(3, 12, size=k).tolist(), rng)
        assert eigengap_k(aff, k_max=aff.shape[0] // 2) == k


def test_eigengap_agrees_with_numpy_eigenvalues():
    rng = np.random.default_rng(0)
    for _ in range(30):
        n = int(rng.integers(4, 60))
        aff = rng.random((n, n)) ** 3
        aff = (aff + aff.T) / 2
        k_max = int(rng.integers(2, n))
        inv = 1 / np.sqrt(aff.sum(axis=1))
        vals = np.linalg.eigvalsh(np.eye(n) - inv[:, None] * aff * inv[None, :])
        assert eigengap_k(aff, k_max) == int(np.argmax(np.diff(vals[: min(k_max, n - 1) + 1]))) + 1


# ---------------------------------------------------------------- Arora's peeling


def _reference_peel(adj: np.ndarray, members, density: float) -> list[int]:
    """The documented rule, one removal at a time: drop the earliest member of least degree inside the set
    while it has fewer than density * (size - 1) neighbours there and more than two members remain."""
    kept = list(members)
    while len(kept) > 2:
        degree = [sum(bool(adj[m, o]) for o in kept) for m in kept]
        worst = int(np.argmin(degree))
        if degree[worst] >= density * (len(kept) - 1):
            break
        kept.pop(worst)
    return kept


def _random_graph(rng, n, p):
    adj = np.triu(rng.random((n, n)) < p, 1)
    return adj | adj.T


def test_dense_core_is_the_planted_clique_networkx_finds():
    rng = np.random.default_rng(0)
    for trial in range(10):
        n, k = 40, int(rng.integers(8, 13))
        adj = _random_graph(rng, n, 0.06)
        clique = np.sort(rng.choice(n, size=k, replace=False))
        adj[np.ix_(clique, clique)] = True
        np.fill_diagonal(adj, False)
        biggest, _ = nx.max_weight_clique(nx.from_numpy_array(adj.astype(int)), weight=None)
        core = dense_core(adj, np.arange(n), 0.5)
        assert sorted(biggest) == clique.tolist() == core.tolist(), trial


def test_dense_core_lies_in_the_networkx_k_core_and_matches_a_reference_peel():
    rng = np.random.default_rng(1)
    sets, graphs = [], []
    for _ in range(60):
        n = int(rng.integers(3, 40))
        adj = _random_graph(rng, n, rng.uniform(0.1, 0.9))
        density = float(rng.choice([0.3, 0.5, 0.8]))
        members = np.sort(rng.choice(n, size=int(rng.integers(2, n + 1)), replace=False))
        core = dense_core(adj, members, density)
        assert core.tolist() == _reference_peel(adj, members.tolist(), density)
        if len(core) > 2:
            inside = adj[np.ix_(core, core)].sum(axis=1)
            assert inside.min() >= density * (len(core) - 1)
            k = math.ceil(density * (len(core) - 1))
            sub = nx.from_numpy_array(adj[np.ix_(members, members)].astype(int))
            kcore = {int(members[v]) for v in nx.k_core(sub, k=k)}
            assert set(core.tolist()) <= kcore
        sets.append(members)
        graphs.append((adj, density, core))
    # the batched peel gives each set's own result (one graph, many sets of different sizes)
    adj = _random_graph(rng, 80, 0.4)
    many = [np.sort(rng.choice(80, size=int(rng.integers(2, 80)), replace=False)) for _ in range(50)]
    batched = dense_cores(adj, many, 0.5)
    assert [b.tolist() for b in batched] == [_reference_peel(adj, m.tolist(), 0.5) for m in many]


def test_anchored_groups_are_the_maximal_cliques_through_the_anchor():
    """Disjoint cliques joined only by the anchor: the groups are networkx's maximal cliques containing it."""
    rng = np.random.default_rng(2)
    for trial in range(10):
        sizes = rng.integers(3, 8, size=int(rng.integers(1, 5)))
        n = 1 + int(sizes.sum())
        adj = np.zeros((n, n), dtype=bool)
        start = 1
        for s in sizes:
            block = np.r_[0, start:start + s]
            adj[np.ix_(block, block)] = True
            start += s
        np.fill_diagonal(adj, False)
        groups = sorted(g.tolist() for g in anchored_groups(adj, 0.5))
        cliques = sorted(sorted(c) for c in nx.find_cliques(nx.from_numpy_array(adj.astype(int))) if 0 in c)
        assert groups == cliques, trial


def test_grow_adds_a_member_missing_one_edge():
    """Anchor 0 with support {1, 2, 3, 4}; member 4 misses its edge to 1: the pair (0, 1) misses 4, grow adds it."""
    adj = np.zeros((6, 6), dtype=bool)
    support = [0, 1, 2, 3, 4]
    adj[np.ix_(support, support)] = True
    adj[1, 4] = adj[4, 1] = False
    adj[0, 5] = adj[5, 0] = True  # a stray neighbour of the anchor only
    np.fill_diagonal(adj, False)
    common = np.flatnonzero(adj[0] & adj[1])
    core = dense_core(adj, np.union1d([0, 1], common), 0.5)
    assert core.tolist() == [0, 1, 2, 3]
    assert grow(adj, core, 0.5).tolist() == support



def test_links_into_cores_are_the_edge_counts_by_brute_force_dense_or_sparse(monkeypatch):
    """`grow_all`'s count of the edges from every node into every core: the same exact integers from the dense
    product (small neighbourhoods) and the sparse one (hubs), and the same as counting edge by edge."""
    import topo.cluster.arora as arora

    rng = np.random.default_rng(5)
    adj = _random_graph(rng, 60, 0.3)
    cores = [np.sort(rng.choice(60, size=int(rng.integers(1, 30)), replace=False)) for _ in range(25)]
    sizes = np.array([len(c) for c in cores])
    want = np.array([[adj[v, c].sum() for v in range(60)] for c in cores])
    members = np.array([np.isin(np.arange(60), c) for c in cores])
    anchored = [np.r_[0, c[c > 0]] for c in cores]
    grown = []
    for limit in (1 << 24, 0):  # 25 x 60 x 60 multiply-adds: dense under the first limit, sparse under 0
        monkeypatch.setattr(arora, "_DENSE_LINKS", limit)
        links, member = arora._links_into(adj, cores, sizes)
        np.testing.assert_array_equal(links, want)
        np.testing.assert_array_equal(member, members)
        grown.append([g.tolist() for g in arora.grow_all(adj, anchored, 0.5)])
    assert grown[0] == grown[1]


# ---------------------------------------------------------------- reduction widths


def test_reduction_width_matches_sklearn_pca():
    from sklearn.decomposition import PCA

    from builders.from_clusters import reduction_width

    rng = np.random.default_rng(0)
    latent = rng.standard_normal((2000, 4))
    x = latent @ rng.standard_normal((4, 24)) + 0.3 * rng.standard_normal((2000, 24))
    x[:, 20:] *= 0.05  # a few nearly silent channels
    cov = np.cov(x, rowvar=False)
    for channels in (range(24), range(0, 24, 2), [3, 7, 11, 20, 21], [5]):
        channels = list(channels)
        ratio = np.cumsum(PCA().fit(x[:, channels]).explained_variance_ratio_)
        for share in (0.5, 0.8, 0.9, 0.99):
            expected = int(np.searchsorted(ratio, share - 1e-12) + 1)
            assert reduction_width(cov, channels, share) == min(expected, len(channels)), (channels, share)
