"""Where the layer-wise recovery of the planted deep network loses its units: firing rule, clusters or decoder.

The construction's recovery (docs/clustering.md, "Deep recovery") chains three
steps per layer: fire (the statistics' firing rule), cluster (arora), decode
(each cluster becomes a unit of the next layer). This probe runs the chain
outside the network, on exact statistics (``from_activations(positions=None)``,
no null), with an explicit decoder that does what a Hebbian-initialised
branch does at ``--budget none``: decoded unit ``u`` at ``p`` is
``relu((s_u(p) - mean) / std)`` where ``s_u(p)`` sums the cluster's member
channels at their offsets and mean and std are the sum's own (a calibrated
BatchNorm followed by ReLU). Beside it, the theory's threshold decoder
(``--and``, not in the network): ``u`` is on at ``p`` when every member fires
(is positive) at its offset, as every child of a planted unit does when the
unit is on; its maps are binary, so the decoded layers fire when positive.
``--rate``: the network's threshold decoder (`topo.construct.decoding`, ``--decoder
threshold``): the sum rectified above the level it exceeds as often as the
cluster's least co-firing pair of members fire together; ``--rate excess`` and
``--rate normalised``: two variants of that rule (``decode_rate``), firing when
positive.

Two decoders feed the next layer:

* ``true supports``: the planted layer's own supports decode it, so the next
  layer's clustering is scored with perfect clusters below it (the units keep
  the generator's order; truth as generated);
* ``found clusters``: the clusters found in this layer decode it (truth
  rewritten in the decoded channels by `topo.planted.recovery.layer_recovery`, as for
  the construction).

and each runs under three firing schedules, ``(q of the observed layer, q of
the decoded layers)``: a unit fires above its own q-quantile, or when positive
(``None``).

    python benchmarks/decoding_probe.py [--seeds 5] [--and | --rate [cofiring|excess|normalised]]

Prints markdown tables; writes nothing.
"""
from __future__ import annotations

import argparse
import functools
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from topo.cluster import UnitClustering, recovery_scores
from topo.construct.decoding import cofiring_rate, pair_cofiring
from topo.planted.generator import DeepPlantedConfig, generate_deep
from topo.planted.recovery import decoded_clusters, layer_recovery
from topo.stats.layer_stats import from_activations

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recovery_report import summarise

REACH = 4
SCHEDULES = {"0.9 / 0.9 (default)": (0.9, 0.9), "positive / positive": (None, None),
             "positive / 0.9": (None, 0.9)}


def _support_sums(x: np.ndarray, supports) -> np.ndarray:
    """``s_u(p)``: the sum of each support's channels of ``x`` at their offsets from ``p``."""
    weight = torch.zeros(len(supports), x.shape[1], 2 * REACH + 1, 2 * REACH + 1)
    for unit, members in enumerate(supports):
        for channel, dy, dx in members:
            weight[unit, channel, REACH + dy, REACH + dx] += 1.0
    return F.conv2d(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), weight,
                    padding=REACH).numpy().astype(np.float64)


def decode_and(x: np.ndarray, supports) -> np.ndarray:
    """1 where every member of the support is positive at its offset, else 0."""
    sizes = np.array([len(s) for s in supports], dtype=float)[None, :, None, None]
    return (_support_sums((x > 0).astype(np.float32), supports) >= sizes - 0.5).astype(np.float32)


def decode(x: np.ndarray, supports) -> np.ndarray:
    """Standardised, rectified sum of each support's channels at their offsets (a calibrated Conv-BN-ReLU)."""
    s = _support_sums(x, supports)
    mean, std = s.mean(axis=(0, 2, 3), keepdims=True), s.std(axis=(0, 2, 3), keepdims=True)
    return np.maximum((s - mean) / np.maximum(std, 1e-12), 0.0).astype(np.float32)


def excess_cofiring_rate(stats, members) -> float:
    """Variant: the least co-firing of two members *beyond chance*, ``P(i, j) - P(i) P(j)`` (floor 1e-4)."""
    fire = stats.firing_rate
    excess = [p - fire[i] * fire[j] for i, j, p in pair_cofiring(stats, members)]
    return max(min([float(fire[members[0][0]])] + excess), 1e-4)


def decode_rate(x: np.ndarray, supports, stats, variant: str = "cofiring") -> np.ndarray:
    """The sum of each support's channels, rectified above the quantile at which the unit fires at its rate
    (``stats``: the statistics of ``x``). ``variant``: ``"cofiring"``, the network's rule (`topo.construct.decoding`: its
    least co-firing pair of members); ``"excess"``, the least co-firing beyond chance; ``"normalised"``, the
    network's rule on members each divided by its mean when positive (so that no member dominates the sum)."""
    if variant == "normalised":
        positive = np.maximum(x, 0.0)
        on = positive.mean(axis=(0, 2, 3)) / np.maximum((x > 0).mean(axis=(0, 2, 3)), 1e-12)
        x = (positive / np.maximum(on, 1e-12)[None, :, None, None]).astype(np.float32)
    rate = excess_cofiring_rate if variant == "excess" else cofiring_rate
    s = _support_sums(x, supports)
    out = np.zeros_like(s)
    for unit, members in enumerate(supports):
        level = np.quantile(s[:, unit], 1.0 - rate(stats, members))
        out[:, unit] = np.maximum(s[:, unit] - level, 0.0)
    return out.astype(np.float32)


def statistics(x: np.ndarray, q: float | None):
    return from_activations(torch.from_numpy(np.ascontiguousarray(x)), max_offset=REACH, positions=None,
                            fire_quantile=q)


def fit(x: np.ndarray, q: float | None, seed: int) -> UnitClustering:
    return UnitClustering(method="arora", window=5, random_state=seed, progress=False).fit(statistics(x, q))


def true_chain(planted, schedule, seed: int, decode=decode) -> list[dict]:
    """Layers 2..L clustered from maps decoded with the true supports of the layer below."""
    rows, x = [], planted.activations
    for layer in range(2, planted.config.depth + 1):
        q = schedule[0] if layer == 2 else schedule[1]
        x = _decode(decode, x, planted.layer_truth(layer - 1).supports, q)
        scores = recovery_scores(planted.layer_truth(layer), fit(x, schedule[1], seed))
        rows.append({"layer": layer, "jaccard": scores["jaccard"], "precision": scores["precision_jaccard"]})
    return rows


def found_chain(planted, schedule, seed: int, decode=decode) -> list[dict]:
    """Every layer clustered from the maps its own found clusters below decode."""
    x, models = planted.activations, []
    for layer in range(1, planted.config.depth + 1):
        q = schedule[0] if layer == 1 else schedule[1]
        models.append(fit(x, q, seed))
        if layer < planted.config.depth:  # the top layer's decoding would feed nothing
            x = _decode(decode, x, [c.members for c in decoded_clusters(models[-1])], q)
    return [{"layer": r["layer"], "jaccard": r["jaccard"], "precision": r["precision_jaccard"],
             "units decoded": r["units_decoded"]} for r in layer_recovery(planted, models)]


def _decode(decoder, x: np.ndarray, supports, q: float | None) -> np.ndarray:
    """``decoder`` applied to ``x``; a rate-matched decoder also reads the statistics of ``x`` under ``q``."""
    if isinstance(decoder, functools.partial) and decoder.func is decode_rate:
        return decoder(x, supports, statistics(x, q))
    return decoder(x, supports)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--and", dest="and_decoder", action="store_true", help="the threshold (AND) decoder")
    ap.add_argument("--rate", nargs="?", const="cofiring", choices=("cofiring", "excess", "normalised"),
                    help="a rate-matched threshold decoder: cofiring (the network's --decoder threshold) or a variant")
    args = ap.parse_args()
    decoder_fn, schedules = (decode_and, {"positive / positive": (None, None)}) if args.and_decoder else \
        (functools.partial(decode_rate, variant=args.rate), SCHEDULES if args.rate == "cofiring" else
         {"positive / positive": (None, None)}) if args.rate else (decode, SCHEDULES)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)  # the power/dense warnings, reported elsewhere
    rows = []
    for seed in range(args.seeds):
        planted = generate_deep(DeepPlantedConfig(seed=seed))
        for name, schedule in schedules.items():
            for decoder, chain in (("true supports", true_chain), ("found clusters", found_chain)):
                rows += [{"decoder": decoder, "firing (observed / decoded)": name, "seed": seed, **r}
                         for r in chain(planted, schedule, seed, decoder_fn)]
            print(f"seed {seed} {name}: done", file=sys.stderr, flush=True)
    table = summarise(pd.DataFrame(rows).fillna(np.nan), ["decoder", "firing (observed / decoded)", "layer"],
                      ["jaccard", "precision", "units decoded"])
    print(table.to_markdown(index=False).replace("nan (nan-nan)", "-"))


if __name__ == "__main__":
    main()
