"""GoogLeNet's Table 1 ("Going deeper with convolutions") recomputed from its widths.

Params and multiply-adds come from `builders.cost` (FlopCounterMode on the
built network); this module only lays them out as the paper does and sets the
printed numbers beside them.
"""
from __future__ import annotations

import dataclasses

import pandas as pd
import torch

import builders
from builders.cost import cost_table
from builders.spec import ConvSpec, InceptionSpec, LRNSpec, NetworkSpec, PoolSpec

# Table 1 of Szegedy et al. (2014) as printed: (params in K = 1024, ops in M = 10^6).
# The "convolution 3x3" row covers conv2 (its 3x3 reduce) and conv3.
PAPER_TABLE1: dict[str, tuple[float, float]] = {
    "conv1": (2.7, 34),
    "conv3": (112, 360),
    "inception3a": (159, 128),
    "inception3b": (380, 304),
    "inception4a": (364, 73),
    "inception4b": (437, 88),
    "inception4c": (463, 100),
    "inception4d": (580, 119),
    "inception4e": (840, 170),
    "inception5a": (1072, 54),
    "inception5b": (1388, 71),
    "fc": (1000, 1),
}
PAPER_TOTALS = (6.8e6, 1.5e9)  # "about 6.8M parameters" and "1.5 billion multiply-adds" (text of the paper)


def _fmt_k(n: int) -> str:
    return f"{n / 1024:.1f}K" if n < 10 * 1024 else f"{n / 1024:.0f}K"


def _fmt_m(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n < 10e6 else f"{n / 1e6:.0f}M"


def googlenet_rows(spec: NetworkSpec, input_size: int | None = None) -> pd.DataFrame:
    """GoogLeNet in Table 1's layout: one row per layer (LRN omitted, a 1x1 conv merged into the conv after it).

    Params and MACs come from :func:`cost_table` of the built network (eval mode,
    no auxiliary heads). Columns hold integers; :func:`googlenet_table` formats them.
    """
    size = spec.input_size if input_size is None else input_size
    with torch.device("meta"):  # shapes only: no memory, no arithmetic
        model = builders.build(dataclasses.replace(spec, aux_heads=()))
    costs = cost_table(model, (spec.in_channels, size, size))
    shapes = spec.feature_shapes(size)
    rows: list[dict] = []
    pending_reduce: ConvSpec | None = None
    layers = [layer for layer in spec.layers if not isinstance(layer, LRNSpec)]
    for i, layer in enumerate(layers):
        c, h, w = shapes[layer.name]
        row = {"layer": layer.name, "output size": f"{h}x{w}x{c}"}
        if isinstance(layer, ConvSpec):
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            if layer.kernel_size == 1 and isinstance(nxt, ConvSpec) and nxt.kernel_size > 1:
                pending_reduce = layer
                continue
            row.update(type="convolution", patch=f"{layer.kernel_size}x{layer.kernel_size}/{layer.stride}", depth=1)
            row["params"] = int(costs.loc[layer.name, "params"])
            row["ops"] = int(costs.loc[layer.name, "macs"])
            if pending_reduce is not None:
                row.update(depth=2, **{"#3x3 reduce": pending_reduce.out_channels, "#3x3": layer.out_channels})
                row["params"] += int(costs.loc[pending_reduce.name, "params"])
                row["ops"] += int(costs.loc[pending_reduce.name, "macs"])
                pending_reduce = None
        elif isinstance(layer, PoolSpec):
            row.update(type=f"{layer.mode} pool", patch=f"{layer.kernel_size}x{layer.kernel_size}/{layer.stride}", depth=0)
        elif isinstance(layer, InceptionSpec):
            row.update(type="inception", patch="", depth=2)
            row.update(
                {
                    "#1x1": layer.ch1x1,
                    "#3x3 reduce": layer.ch3x3red,
                    "#3x3": layer.ch3x3,
                    "#5x5 reduce": layer.ch5x5red,
                    "#5x5": layer.ch5x5,
                    "pool proj": layer.pool_proj,
                    "params": int(costs.loc[layer.name, "params"]),
                    "ops": int(costs.loc[layer.name, "macs"]),
                }
            )
        rows.append(row)
    c, h, w = spec.output_shape(size)
    rows.append({"layer": "avgpool", "type": "avg pool", "patch": f"{h}x{w}/1", "output size": f"1x1x{c}", "depth": 0})
    rows.append({"layer": "dropout", "type": f"dropout ({spec.head.dropout:.0%})", "output size": f"1x1x{c}", "depth": 0})
    rows.append(
        {
            "layer": "fc",
            "type": "linear",
            "output size": f"1x1x{spec.head.num_classes}",
            "depth": 1,
            "params": int(costs.loc["fc", "params"]),
            "ops": int(costs.loc["fc", "macs"]),
        }
    )
    rows.append(
        {"layer": "total", "type": "total", "params": int(costs.loc["total", "params"]), "ops": int(costs.loc["total", "macs"])}
    )
    columns = ["layer", "type", "patch", "output size", "depth", "#1x1", "#3x3 reduce", "#3x3", "#5x5 reduce",
               "#5x5", "pool proj", "params", "ops"]  # fmt: skip
    table = pd.DataFrame(rows, columns=columns).set_index("layer")
    for col in columns[4:]:
        table[col] = table[col].astype("Int64")
    return table


def googlenet_table(variant: str = "paper", input_size: int | None = None, **spec_options) -> str:
    """Markdown of GoogLeNet ``variant`` in the layout of the paper's Table 1 (params in K = 1024, ops in M = 10^6).

    For the paper variant at 224x224 and full width, the printed params and ops are added beside the computed ones.
    """
    spec = builders.googlenet_spec(variant, aux_logits=False, **spec_options)
    table = googlenet_rows(spec, input_size)
    out = table.copy().astype(object)
    out["params"] = [_fmt_k(v) if not pd.isna(v) else "" for v in table["params"]]
    out["ops"] = [_fmt_m(v) if not pd.isna(v) else "" for v in table["ops"]]
    size = spec.input_size if input_size is None else input_size
    if variant == "paper" and size == 224 and spec_options.get("width_mult", 1.0) == 1.0:
        out["params (paper)"] = [f"{PAPER_TABLE1[n][0]:g}K" if n in PAPER_TABLE1 else "" for n in table.index]
        out["ops (paper)"] = [f"{PAPER_TABLE1[n][1]:g}M" if n in PAPER_TABLE1 else "" for n in table.index]
        out.loc["total", ["params (paper)", "ops (paper)"]] = ["6.8M", "1.5G"]
    out = out.fillna("").reset_index()
    return out.to_markdown(index=False)


def paper_comparison(input_size: int = 224) -> pd.DataFrame:
    """Table 1's printed params and ops against those that follow from its widths.

    Columns: printed params (K = 1024), computed parameters without and with the
    convolution biases (the fc keeps its bias), printed ops (M = 10^6), computed
    MACs, and the ratios of computed (bias-free) to printed values.
    """
    spec = builders.googlenet_spec("paper", aux_logits=False)
    bias_free = dataclasses.replace(spec, conv_bias=False)
    with_bias = googlenet_rows(spec, input_size)
    weights = googlenet_rows(bias_free, input_size)
    rows = []
    for name, (p_k, ops_m) in PAPER_TABLE1.items():
        rows.append(
            {
                "layer": name if name != "conv3" else "conv2+conv3",
                "params printed": p_k * 1024,
                "params without conv bias": int(weights.loc[name, "params"]),
                "params with bias": int(with_bias.loc[name, "params"]),
                "ops printed": ops_m * 1e6,
                "MACs": int(weights.loc[name, "ops"]),
            }
        )
    table = pd.DataFrame(rows).set_index("layer")
    table.loc["total (sum of rows)"] = table.sum()
    table.loc["total (model)"] = [
        PAPER_TOTALS[0], int(weights.loc["total", "params"]), int(with_bias.loc["total", "params"]),
        PAPER_TOTALS[1], int(weights.loc["total", "ops"]),
    ]  # fmt: skip
    table["params / printed"] = table["params without conv bias"] / table["params printed"]
    table["MACs / printed"] = table["MACs"] / table["ops printed"]
    return table
