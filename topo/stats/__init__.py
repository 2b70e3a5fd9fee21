"""Statistics: forward hooks stream a layer's activations (`record`) into `LayerStats`."""
from topo.stats.layer_stats import DEAD_EPS, LayerStats, from_activations, read_stats
from topo.stats.positions import DEFAULT_POSITIONS
from topo.stats.recording import forward_macs, record
from topo.stats.sample import DEFAULT_FIRE_QUANTILE, ActivationSample, check_fire_quantile

__all__ = ["DEAD_EPS", "DEFAULT_FIRE_QUANTILE", "DEFAULT_POSITIONS", "ActivationSample", "LayerStats",
           "check_fire_quantile", "forward_macs", "from_activations", "read_stats", "record"]
