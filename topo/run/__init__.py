"""One `topo-build` run and what is done with it: configuration, preflight, stages, run directory, loading,
export, `analyze` and the study over seeds."""
