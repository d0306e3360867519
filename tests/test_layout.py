"""The layout is a contract: stages/ holds the dvc.yaml stages and nothing else, imports follow the
floors (stages -> lmforge -> nothing of ours; bento stands apart), and each stage's ``deps:`` cover
every file of ours its code reaches, so `dvc status` can never call a stale artifact up to date.

Pure ``ast`` walks over the checkout: nothing is imported or run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("stages", "lmforge", "bento", "benchmarks")
# Every file a stage reaches is a dep, the schema included: it derives values too.
NOT_DEPS: set[str] = set()
# Modules that load files of their folder at run time (not by import): the folder is the dep.
LOADS_FOLDER = {"lmforge/metrics/__init__.py": "lmforge/metrics"}


def module_file(name: str, root: Path = ROOT) -> str | None:
    """The repo file of a dotted module name (package: its __init__.py), or None when not ours."""
    base = root / name.replace(".", "/")
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path.relative_to(root).as_posix()
    return None


def imported_modules(path: Path) -> set[str]:
    """Dotted names a file imports anywhere in it (top level or inside functions), ours or not."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}  # submodules
    return names


def with_parents(name: str) -> list[str]:
    """``a.b.c`` -> [a, a.b, a.b.c]: importing a module runs its packages' __init__ first."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def has_code(path: Path) -> bool:
    """False for a file holding only a docstring (most __init__.py): it cannot change a result."""
    body = ast.parse(path.read_text()).body
    return any(not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)) for n in body)


def file_imports(path: str, root: Path = ROOT) -> set[str]:
    """Repo files a file imports (with the __init__.py of the packages on the way)."""
    found = set()
    for name in imported_modules(root / path):
        if name.split(".")[0] in PACKAGES:
            found |= {f for f in map(lambda n: module_file(n, root), with_parents(name)) if f}
    return found - {path}


def direct_imports(path: str, root: Path = ROOT) -> set[str]:
    """The repo modules a file names in its imports (a package's __init__.py only when nothing
    inside the package is named): what a rule judges."""
    named = {module_file(n, root) for n in imported_modules(root / path)
             if n.split(".")[0] in PACKAGES} - {None, path}
    inits = {f for f in named if f.endswith("__init__.py")
             and any(g != f and g.startswith(f.rsplit("/", 1)[0] + "/") for g in named)}
    return named - inits


def closure(path: str, root: Path = ROOT) -> set[str]:
    """Every repo file that running ``path`` may execute."""
    seen, todo = set(), [path]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo += file_imports(current, root)
    return {f for f in seen if has_code(root / f)}


def uncovered(files: set[str], deps: list[str]) -> set[str]:
    """The files no dep names, itself or by a folder above it (LOADS_FOLDER: the folder itself)."""
    def covered(f: str) -> bool:
        need = LOADS_FOLDER.get(f, f)
        return any(need == d or need.startswith(d.rstrip("/") + "/") for d in deps)

    return {f for f in files - NOT_DEPS if not covered(f)}


def stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def all_files(package: str, root: Path = ROOT) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in (root / package).rglob("*.py"))


def cycles(root: Path = ROOT) -> list[list[str]]:
    """Import cycles between repo files (lazy imports count: a cycle is a design knot)."""
    graph = {f: file_imports(f, root) for pkg in PACKAGES if (root / pkg).is_dir()
             for f in all_files(pkg, root)}
    found: list[list[str]] = []
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = "done"

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    return found


def rule_breaks(root: Path = ROOT) -> list[str]:
    """Imports that break the floors, one line each: file -> the file it must not import."""
    breaks = []
    for pkg in PACKAGES:
        for f in all_files(pkg, root) if (root / pkg).is_dir() else []:
            for target in sorted(direct_imports(f, root)):
                top = target.split("/")[0]
                if pkg == "stages" and top == "stages":
                    breaks.append(f"{f} -> {target}: a stage never imports another stage")
                elif pkg in ("lmforge", "benchmarks") and top == "stages":
                    breaks.append(f"{f} -> {target}: only dvc.yaml runs stages")
                elif pkg == "bento" and top in ("stages", "lmforge", "benchmarks"):
                    breaks.append(f"{f} -> {target}: the Bento ships bento/ alone")
                elif pkg == "lmforge" and top == "benchmarks":
                    breaks.append(f"{f} -> {target}: the library never imports benchmarks")
    return breaks


def test_check_runs_first_and_every_stage_depends_on_the_schema():
    """Stage check keeps DVC from deleting outputs over a bad params.yaml: it runs before the first
    data stage (ingest depends on its verdict). Every stage depends on the schema it loads."""
    all_stages = stages()
    assert "${paths.check}" in all_stages["ingest"]["deps"]
    assert all("lmforge/params.py" in s["deps"] for s in all_stages.values())


def test_stages_folder_is_the_stage_list_of_dvc_yaml():
    modules = {p.stem for p in (ROOT / "stages").glob("*.py")} - {"__init__"}
    assert modules == set(stages())
    assert not [p for p in (ROOT / "stages").iterdir() if p.is_dir() and p.name != "__pycache__"]


def test_every_stage_runs_its_own_module():
    for name, stage in stages().items():
        assert stage["cmd"] == f"python -m stages.{name}", name


def test_imports_follow_the_floors():
    assert rule_breaks() == []


def test_no_import_cycles():
    assert cycles() == []


@pytest.mark.parametrize("name", sorted(stages()))
def test_deps_cover_every_file_the_stage_reaches(name):
    deps = stages()[name]["deps"]
    missing = uncovered(closure(f"stages/{name}.py"), deps)
    assert not missing, f"stage {name}: add to its deps in dvc.yaml: {sorted(missing)}"


@pytest.mark.parametrize("name", sorted(stages()))
def test_deps_name_only_files_of_ours_that_exist(name):
    """A dep that does not exist would make `dvc repro` fail; one of ours must be reached."""
    for dep in stages()[name]["deps"]:
        if "${" in dep or dep.split("/")[0] not in PACKAGES:
            continue
        assert (ROOT / dep).exists(), f"stage {name}: dep {dep} does not exist"


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_the_checks_catch_a_stray_import_a_cycle_and_an_uncovered_file(tmp_path):
    """The checkers themselves, on a tree made to break each rule once."""
    write(tmp_path, {
        "stages/__init__.py": '"""Stages."""\n',
        "stages/a.py": "from stages import b\nfrom lmforge.x import f\n",
        "stages/b.py": "X = 1\n",
        "lmforge/__init__.py": '"""Library."""\n',
        "lmforge/x.py": "def f():\n    from lmforge import y\n",
        "lmforge/y.py": "from lmforge.x import f\n",
        "bento/s.py": "from lmforge.x import f\n",
    })
    assert sorted(rule_breaks(tmp_path)) == [
        "bento/s.py -> lmforge/x.py: the Bento ships bento/ alone",
        "stages/a.py -> stages/b.py: a stage never imports another stage",
    ]
    assert cycles(tmp_path) == [["lmforge/x.py", "lmforge/y.py", "lmforge/x.py"]]  # a lazy import
    reached = closure("stages/a.py", tmp_path)
    assert reached == {"stages/a.py", "stages/b.py", "lmforge/x.py", "lmforge/y.py"}
    assert uncovered(reached, ["stages/a.py", "lmforge"]) == {"stages/b.py"}


def test_tests_share_helpers_through_helpers_or_conftest_only():
    """A test module takes shared helpers from tests/helpers.py and fixtures from tests/conftest.py,
    never from another test module: importing one runs its module code and couples the two files."""
    found = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                # Relative imports in tests/ (`from .x import y`, `from . import x`) name tests.x.
                module = ".".join(filter(None, ["tests" if node.level else "", node.module or ""]))
                names = [module] + [f"{module}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if len(parts) >= 2 and parts[0] == "tests" and parts[1].startswith("test_"):
                    found.append(f"tests/{path.name}:{node.lineno} imports {parts[0]}.{parts[1]}")
                    break
    assert not found, "import shared test code from tests.helpers or tests.conftest:\n" + "\n".join(found)
