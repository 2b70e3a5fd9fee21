"""The two small planted layers the clustering tests fit (test_cluster.py) and the threshold calibration
tests record (test_stats_calibration.py): a spatial one (maps of 10 x 10) and a flat one (vectors, disjoint
supports)."""
from __future__ import annotations

from topo.planted.generator import PlantedConfig

SPATIAL = PlantedConfig(num_channels=64, num_hidden=12, degree=4, num_samples=48, height=10, width=10, seed=3)
FLAT = PlantedConfig(num_channels=64, num_hidden=16, degree=4, num_samples=1500, spatial=False, disjoint=True,
                     density=0.08, seed=4)
