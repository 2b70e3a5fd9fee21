"""``python -m topo.cli``: the same as ``topo-build``."""
import sys

from topo.cli.main import main

sys.exit(main())
