"""The construction: grow a network one Inception module at a time from the statistics of the last layer."""
from topo.construct.config import ConstructConfig
from topo.construct.loop import Construction, construct

__all__ = ["ConstructConfig", "Construction", "construct"]
