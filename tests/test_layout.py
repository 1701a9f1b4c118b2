"""The architecture, checked from the code's own imports: the library (kdflow/) is plain Python that never
imports Prefect, tasks/ or flows/ (so it is testable and reusable without a server), and it is grouped in wings.
The data sources (data/) sit one floor above it: they use the library (its file readers, math-verify), the library
never imports them (it is handed a source's answer checker), and they import neither Prefect, tasks/ nor flows/."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WINGS = {
    "store",
    "config",
    "teacher",
    "curation",
    "logit_cache",
    "training",
    "evaluation",
    "reporting",
    "classic",
    "models",
}


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (imports inside functions count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)  # and `from kdflow.store import outputs`: the module kdflow.store.outputs
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def imports_of(folder: str, forbidden: set[str]) -> dict[str, list[str]]:
    """Each file under the folder that imports a module of a forbidden top-level package, with those modules."""
    offenders = {
        str(p.relative_to(ROOT)): sorted(m for m in imported_modules(p) if m.split(".")[0] in forbidden)
        for p in (ROOT / folder).rglob("*.py")
    }
    return {p: m for p, m in offenders.items() if m}


def test_the_library_never_imports_prefect_tasks_flows_or_data():
    assert imports_of("kdflow", {"prefect", "tasks", "flows", "data"}) == {}


def test_data_sources_use_the_library_and_nothing_above_it():
    """data/ -> kdflow/, one way: a data source may use the library, never Prefect, a task or a flow."""
    assert imports_of("data", {"prefect", "tasks", "flows"}) == {}


def test_the_library_is_in_wings():
    top = {p.name for p in (ROOT / "kdflow").iterdir() if not p.name.startswith((".", "__pycache__"))}
    assert {p for p in top if (ROOT / "kdflow" / p).is_dir()} == WINGS
    assert {p for p in top if p.endswith(".py")} == {"__init__.py"}  # nothing beside the wings
    for wing in WINGS:
        assert (ROOT / "kdflow" / wing / "__init__.py").read_text().startswith('"""'), f"{wing} says what it holds"


def test_no_import_cycle_between_wings_and_the_library_imports_no_task():
    # A wing may use another; the check that matters is that the graph between modules has no cycle.
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts): p for p in (ROOT / "kdflow").rglob("*.py")}
    graph = {m: {i for i in imported_modules(p) if i in modules and i != m} for m, p in modules.items()}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for n in graph[m]:
            assert state.get(n) != 1, f"import cycle: {' -> '.join(stack + [m, n])}"
            if n not in state:
                visit(n, stack + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


# ruff format lays a call or literal that does not fit on one line out one item per line: the same code takes ~18 %
# more lines than in the hanging-indent layout this limit was first set in (400).
MAX_MODULE_LINES = 500


def test_no_module_over_500_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for folder in ("kdflow", "tasks", "flows")
        for p in (ROOT / folder).rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}, "split these by what they do"


def test_tasks_import_no_other_task_for_domain_code():
    """A task body calls the library; tasks share only the cache policy, the report's artifacts, the training
    progress artifact, the artifact keys and the API-key reader (a key may sit in a Prefect Secret block)."""
    allowed = {"tasks.caching", "tasks.report", "tasks.progress", "tasks.api_keys", "tasks.artifacts"}
    found = {
        str(p.relative_to(ROOT)): sorted(
            {".".join(m.split(".")[:2]) for m in imported_modules(p) if m.startswith("tasks.")} - allowed
        )
        for p in (ROOT / "tasks").glob("*.py")
    }
    assert {p: m for p, m in found.items() if m} == {}


def test_the_wings_form_no_loop():
    """Wing A uses wing B, never both ways round (config, the recipes, is at the bottom; classic at the top)."""
    uses: dict[str, set[str]] = {w: set() for w in WINGS}
    for wing in WINGS:
        for p in (ROOT / "kdflow" / wing).rglob("*.py"):
            uses[wing] |= {
                m.split(".")[1] for m in imported_modules(p) if m.startswith("kdflow.") and m.split(".")[1] in WINGS
            } - {wing}
    loops = sorted((a, b) for a in WINGS for b in uses[a] if a in uses[b] and a < b)
    assert loops == [], f"wings that import each other: {loops}"
