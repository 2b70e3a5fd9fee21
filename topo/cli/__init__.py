"""`topo-build`, the command line (`main`)."""
from topo.cli.main import main

__all__ = ["main"]
