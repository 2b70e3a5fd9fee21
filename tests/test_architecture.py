"""The shape of the code: imports go down the floors, no function-local import dodges a circle,
functions in topo/ stay short enough to read in one screen."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("topo", "builders", "analysis")
LONGEST = 60  # lines per function in topo/ (the CLI's parser aside)


def _modules() -> dict[str, ast.Module]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            out[name] = ast.parse(path.read_text(), filename=str(path))
    return out


def _imports(tree: ast.Module, *, top_level: bool) -> set[str]:
    """Project modules imported by ``tree``: at module level only, or inside functions only."""
    nodes = tree.body if top_level else [
        n for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {name for name in found if name.split(".")[0] in PACKAGES}


def _graph(modules: dict[str, ast.Module], *, top_level: bool) -> dict[str, set[str]]:
    return {name: {m for m in _imports(tree, top_level=top_level) if m in modules and m != name}
            for name, tree in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every module on a cycle (strongly connected components of more than one module)."""
    import networkx as nx

    g = nx.DiGraph([(a, b) for a, targets in graph.items() for b in targets])
    return [sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1]


def test_no_import_circles_even_counting_function_local_imports():
    modules = _modules()
    top, local = _graph(modules, top_level=True), _graph(modules, top_level=False)
    both = {name: top[name] | local[name] for name in modules}
    # a package's __init__ re-exporting its own modules is not a circle of the design
    for name in both:
        both[name] = {m for m in both[name] if not (m == name.rsplit(".", 1)[0] and name.count("."))}
    assert _cycles(both) == []


def test_builders_do_not_import_analysis_and_plots_do_not_import_the_report():
    modules = _modules()
    graph = {name: _imports(tree, top_level=True) | _imports(tree, top_level=False) for name, tree in modules.items()}
    for name, targets in graph.items():
        if name.startswith("builders"):
            assert not any(t.startswith("analysis") for t in targets), name
    assert not any(t.startswith("analysis.report") for t in graph["analysis.plots"])


@pytest.mark.parametrize("path", sorted((ROOT / "topo").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_functions_in_topo_fit_one_screen(path: Path):
    tree = ast.parse(path.read_text())
    long = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > LONGEST
            and not (path.relative_to(ROOT) == Path("topo/cli/parser.py") and node.name.startswith("_add"))]
    assert long == []


#: The stages of the house from the ground up (docs/design.md): a package imports only packages on lower floors.
FLOORS = {
    "topo.common": 0,
    "builders": 1, "topo.stats": 1, "topo.controls": 1,
    "topo.cluster": 2,
    "topo.planted": 3, "topo.construct": 3,
    "topo.data": 4, "analysis": 4,
    "topo.train": 5,
    "topo.run": 6,
    "topo.cli": 7,
}


def _package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "topo" and len(parts) > 2 else parts[0] if parts[0] != "topo" else module


def _stage_imports_going_up(modules: dict[str, ast.Module]) -> list[str]:
    """``importer -> imported`` for every import of a package on the same or a higher floor (any package not in
    `FLOORS` counts as going up: a new stage must be placed)."""
    wrong = []
    for name, tree in modules.items():
        for target in _imports(tree, top_level=True) | _imports(tree, top_level=False):
            if target not in modules:
                continue
            a, b = _package(name), _package(target)
            if a != b and FLOORS.get(b, 99) >= FLOORS.get(a, -1):
                wrong.append(f"{name} -> {target}")
    return sorted(wrong)


def test_each_stage_imports_only_the_stages_below_it():
    assert _stage_imports_going_up(_modules()) == []


def test_the_stage_check_sees_an_import_that_goes_up():
    """The check can fail: the construction importing the run's stages, or a package not on any floor."""
    modules = _modules()
    modules["topo.construct.loop"] = ast.parse("from topo.run.stages import run_all\n")
    modules["topo.newstage.thing"] = ast.parse("from topo.common.errors import UserError\n")
    assert _stage_imports_going_up(modules) == ["topo.construct.loop -> topo.run.stages",
                                                "topo.newstage.thing -> topo.common.errors"]


def test_loading_a_run_draws_nothing():
    """`topo.load_run` (and the run's configuration it reads) imports no plotting library."""
    code = "import sys, topo; topo.load_run; print(sorted(m for m in sys.modules if m.startswith('matplotlib')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_the_public_names_the_readme_shows_resolve():
    """The library names of the README stay where it says, whatever moves inside topo/."""
    import builders
    import topo
    from topo.cluster import UnitClustering
    from topo.construct import ConstructConfig, construct
    from topo.train import TrainConfig, train

    assert callable(topo.record) and callable(topo.load_run) and callable(topo.export)
    assert topo.LayerStats.__name__ == "LayerStats" and issubclass(topo.UserError, Exception)
    assert all(callable(f) for f in (UnitClustering, construct, train, builders.build, builders.from_clusters,
                                     builders.googlenet, builders.googlenet_spec))
    assert ConstructConfig().window is None and TrainConfig().epochs > 0
    readme = (ROOT / "README.md").read_text()
    for name in ("topo.record", "topo.load_run", "topo.export", "UnitClustering", "builders.from_clusters"):
        assert name in readme
