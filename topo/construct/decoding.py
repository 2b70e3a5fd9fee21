"""Threshold decoding: each Hebbian unit fires as often as its cluster's members fire together.

At ``--budget none`` with ``--init hebbian`` every cluster of layer l is one
unit of layer l + 1: a Conv-BN-ReLU whose filter sums the cluster's members at
their offsets (`topo.construct.hebbian`). With BatchNorm calibrated and its bias at 0
that unit fires whenever the sum is above its mean, far more often than the
unit the cluster stands for (docs/clustering.md, "Deep recovery"). The
threshold decoder (``decoder="threshold"``) sets each unit's BatchNorm bias
from the data instead:

- a decoded unit ``u`` of cluster ``c`` fires (is positive) when its sum ``s_u``
  is above the quantile at which it fires at rate ``r_u``, the least often any
  two members of ``c`` fire together at their relative offsets (the statistics'
  own co-firing, `topo.stats.LayerStats.coactivation`; one member: its firing
  rate). All members of a unit are on together at most that often, so ``r_u``
  bounds the rate at which they are all on; the theory's AND of the members
  fires at about that rate;
- a reduction in front of a 3x3 or 5x5 branch selects one channel per channel
  its clusters read; its bias passes that channel through rectified at 0
  (``relu(x) / std``), not at its mean.

``s_u`` is sampled at the BatchNorm's input over the calibration batches
(`topo.stats.ActivationSample`), and the bias is set against the calibrated
running statistics, so in eval mode ``u = relu(gamma * (s_u - threshold) / std)``.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from builders.from_clusters import clusters_by_branch
from builders.inception import Inception
from topo.cluster import Cluster, UnitClustering
from topo.common.errors import StatsError
from topo.stats.layer_stats import LayerStats
from topo.stats.sample import ActivationSample

DECODERS = ("threshold", "mean")

Member = tuple[int, int, int]


def pair_cofiring(stats: LayerStats, members: Sequence[Member]) -> list[tuple[int, int, float]]:
    """``(i, j, P(i at p and j at p + d fire))`` for every pair of ``members``, ``d`` their relative offset.

    Pairs whose displacement was not recorded (wider than the statistics' ``max_offset``) are skipped.
    """
    pairs = []
    for a, (i, ay, ax) in enumerate(members):
        for j, by, bx in members[a + 1:]:
            try:
                pairs.append((i, j, float(stats.coactivation(by - ay, bx - ax)[0][i, j])))
            except StatsError:
                continue
    return pairs


def cofiring_rate(stats: LayerStats, members: Sequence[Member]) -> float:
    """The least often any two ``members`` fire together at their relative offsets (one member: its rate)."""
    return min([float(stats.firing_rate[members[0][0]])] + [p for _, _, p in pair_cofiring(stats, members)])


def unit_rates(clusters: Sequence[Cluster], stats: LayerStats) -> np.ndarray:
    """Each cluster's decoded firing rate (:func:`cofiring_rate` of its members), shape (len(clusters),)."""
    return np.array([cofiring_rate(stats, c.members) for c in clusters], dtype=np.float64)


def thresholds_at_rates(values: np.ndarray, rates: np.ndarray) -> np.ndarray:
    """Per column of ``values`` (rows, units), the level exceeded at rate ``rates[u]``: its (1 - r)-quantile."""
    return np.array([np.quantile(values[:, u], 1.0 - rates[u]) for u in range(values.shape[1])])


def set_bn_threshold_(bn: nn.BatchNorm2d, channels: slice, thresholds: np.ndarray) -> None:
    """Bias of ``bn``'s ``channels`` so that, with its running statistics, output > 0 iff input > threshold."""
    with torch.no_grad():
        std = torch.sqrt(bn.running_var[channels] + bn.eps)
        level = torch.as_tensor(thresholds, dtype=bn.bias.dtype, device=bn.bias.device)
        bn.bias[channels] = bn.weight[channels] * (bn.running_mean[channels] - level) / std


def _bn_inputs(model: nn.Module, targets: Sequence[nn.BatchNorm2d], run: Callable[[], None],
               seed: int) -> list[np.ndarray]:
    """A sample of each target BatchNorm's input over ``run()`` (the model in eval mode), (rows, channels) each."""
    samples = [ActivationSample(seed=seed, stream=i) for i in range(len(targets))]

    def hook(sample: ActivationSample) -> Callable:
        def read(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            sample.update(inputs[0].detach())
        return read

    hooks = [bn.register_forward_hook(hook(s)) for bn, s in zip(targets, samples)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            run()
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return [s.values for s in samples]


def _output_units(module: Inception, clustering: UnitClustering, pool_clustering: UnitClustering | None,
                  stats: LayerStats, pooled: LayerStats | None) -> list[tuple[nn.BatchNorm2d, slice, np.ndarray]]:
    """(BatchNorm, its channels, their rates) for each branch whose units are exactly its clusters."""
    spec, by_branch = module.spec, clusters_by_branch(clustering.clusters_)
    out = []
    if spec.ch1x1 and len(by_branch[1]) == spec.ch1x1:
        bn = module.fused1x1.bn if module.fused1x1 is not None else module.branch1.bn
        out.append((bn, slice(0, spec.ch1x1), unit_rates(by_branch[1], stats)))
    for kernel, branch, width in ((3, module.branch2, spec.ch3x3), (5, module.branch3, spec.ch5x5)):
        if width and len(by_branch[kernel]) == width:
            out.append((branch[1].bn, slice(0, width), unit_rates(by_branch[kernel], stats)))
    if spec.pool_proj and pool_clustering is not None and pooled is not None \
            and pool_clustering.n_clusters_ == spec.pool_proj:
        out.append((module.branch4[1].bn, slice(0, spec.pool_proj), unit_rates(pool_clustering.clusters_, pooled)))
    return out


def _reduction_bns(module: Inception) -> list[tuple[nn.BatchNorm2d, slice]]:
    """(BatchNorm, channels) of the 1x1 reductions in front of the 3x3 and 5x5 branches."""
    spec = module.spec
    if module.fused1x1 is not None:
        start, out = spec.ch1x1, []
        for width in (spec.ch3x3red, spec.ch5x5red):
            if width:
                out.append((module.fused1x1.bn, slice(start, start + width)))
            start += width
        return out
    return [(branch[0].bn, slice(0, width)) for branch, width in
            ((module.branch2, spec.ch3x3red), (module.branch3, spec.ch5x5red)) if branch is not None and width]


def threshold_decode_(model: nn.Module, module: Inception, clustering: UnitClustering, stats: LayerStats, *,
                      pool_clustering: UnitClustering | None = None, pooled: LayerStats | None = None,
                      calibrate: Callable[[], None], run: Callable[[], None], seed: int = 0) -> dict[str, Any]:
    """Set ``module``'s BatchNorm biases for threshold decoding (module docstring), in place.

    ``module`` is the last module of ``model``, Hebbian-initialised at ``--budget none``; ``calibrate()``
    sets ``model``'s BatchNorm running statistics, ``run()`` passes the calibration batches through it.
    Returns, for the construction's records, how many units were decoded and their mean target rate.
    """
    calibrate()
    for bn, channels in _reduction_bns(module):
        set_bn_threshold_(bn, channels, np.zeros(channels.stop - channels.start))
    calibrate()  # the branches now see the reductions' pass-through
    units = _output_units(module, clustering, pool_clustering, stats, pooled)
    values = _bn_inputs(model, [bn for bn, _, _ in units], run, seed) if units else []
    for (bn, channels, rates), sample in zip(units, values):
        set_bn_threshold_(bn, channels, thresholds_at_rates(sample[:, channels], rates))
    return {"decoded_units": int(sum(len(r) for _, _, r in units)),
            "decoded_rate": float(np.mean(np.concatenate([r for _, _, r in units]))) if units else None}
