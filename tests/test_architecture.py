"""The package tree's one-way architecture: pages -> headvis_ui -> headvis_core subpackages.

Read from the source with ``ast`` (nothing imported), so the test holds for optional modules too.
"""

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "headvis_core"
FIGURE_LIBRARIES = ("plotly", "pyvis")


def imported_modules(path: Path) -> list[str]:
    """Every module an ``import`` or ``from ... import`` in ``path`` names (``from X import y`` as ``X.y``)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names.extend(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def unit_of(module: str) -> str:
    """``headvis_core.scan.run`` -> ``scan``; a top-level module is its own unit."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def core_files() -> list[Path]:
    return sorted(CORE.rglob("*.py"))


def unit_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for path in core_files():
        source = unit_of(".".join(path.relative_to(ROOT).with_suffix("").parts))
        for module in imported_modules(path):
            if module.startswith("headvis_core."):
                target = unit_of(module)
                if target != source and ((CORE / target).is_dir() or (CORE / f"{target}.py").is_file()):
                    graph[source].add(target)
    return graph


def test_the_core_never_imports_streamlit_or_the_glue():
    offenders = [str(p.relative_to(ROOT)) for p in core_files()
                 if any(m.split(".")[0] in ("streamlit", "headvis_ui") for m in imported_modules(p))]
    assert offenders == []


def test_only_viz_builds_figures():
    offenders = [str(p.relative_to(ROOT)) for p in core_files() if "viz" not in p.relative_to(CORE).parts
                 and any(m.split(".")[0] in FIGURE_LIBRARIES for m in imported_modules(p))]
    assert offenders == []


def test_subpackages_import_each_other_one_way():
    graph = unit_graph()
    assert {"hooks", "models"} <= graph["atlas"] | graph["scan"], "the import graph was not read"

    def reachable(start: str) -> set[str]:
        seen: set[str] = set()
        stack = [start]
        while stack:
            for target in graph.get(stack.pop(), ()):
                if target not in seen:
                    seen.add(target)
                    stack.append(target)
        return seen

    cycles = sorted(unit for unit in graph if unit in reachable(unit))
    assert cycles == [], f"subpackages in an import cycle: {cycles}"


def test_models_and_hooks_sit_at_the_bottom():
    graph = unit_graph()
    analysis = {"atlas", "scan", "lab", "ablation", "circuits", "sweeps", "attribution", "viz", "cli", "tours"}
    for bottom in ("models", "hooks", "errors", "heads", "tokens", "weights"):
        assert not graph.get(bottom, set()) & analysis, f"{bottom} imports analysis: {graph[bottom] & analysis}"


def test_every_subpackage_has_a_map_naming_its_modules():
    for package in sorted(p for p in CORE.iterdir() if (p / "__init__.py").exists()):
        readme = package / "README.md"
        assert readme.is_file(), f"{package.name}/ has no README.md"
        text = readme.read_text(encoding="utf-8")
        missing = [m.name for m in package.glob("*.py") if m.name != "__init__.py" and m.stem not in text]
        assert missing == [], f"{package.name}/README.md does not map {missing}"
