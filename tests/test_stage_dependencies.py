"""Every DVC stage depends on exactly the project files its command imports, so that `dvc repro`
re-runs a stage whenever code it runs changes, and only then."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("common", "training", "serving", "pipelines")


def module_file(module: str) -> Path | None:
    """The project file that `import module` runs, or None for a module from outside the project."""
    if module.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = REPO.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement in `path` names, function-level imports included, with the
    packages that importing it runs first (`a.b.c` runs a/__init__.py and a/b/__init__.py)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pkg import module`
    with_parents = set(names)
    for name in names:
        parts = name.split(".")
        with_parents.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return with_parents


def import_closure(module: str) -> set[str]:
    """The project files that `python -m module` imports, transitively, as paths relative to the repo."""
    start = module_file(module)
    assert start is not None, f"{module} is not a project module"
    seen: set[Path] = set()
    packages = (module_file(".".join(module.split(".")[:i])) for i in range(1, module.count(".") + 1))
    todo = [start, *(f for f in packages if f)]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(f for f in map(module_file, imported_modules(path)) if f and f not in seen)
    return {p.relative_to(REPO).as_posix() for p in seen}


def stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def stage_module(stage: dict) -> str:
    match = re.search(r"-m\s+(\S+)", stage["cmd"])
    assert match, f"stage command {stage['cmd']!r} does not run a module with -m"
    return match.group(1)


def code_deps(stage: dict) -> set[str]:
    return {dep for dep in stage.get("deps", []) if dep.endswith(".py")}


@pytest.mark.parametrize("name", sorted(stages()))
def test_stage_depends_on_every_project_file_it_imports_and_no_other(name):
    stage = stages()[name]
    imported = import_closure(stage_module(stage))
    declared = code_deps(stage)
    assert not imported - declared, f"dvc.yaml stage {name!r} imports but does not list: {sorted(imported - declared)}"
    assert not declared - imported, f"dvc.yaml stage {name!r} lists but never imports: {sorted(declared - imported)}"


def test_the_closure_follows_imports_through_packages_and_functions(tmp_path):
    """The walk itself: export's lazy import of the BentoML store inside a function counts."""
    assert "common/model_store.py" in import_closure("pipelines.export")
    assert {"pipelines/__init__.py", "pipelines/fetch.py"} <= import_closure("pipelines.fetch")
    assert module_file("numpy") is None and module_file("training.no_such_module") is None


# what each package may not import: training and serving share `common`, which imports neither
FORBIDDEN = {
    "common": ("serving", "training", "pipelines"),
    "serving": ("training", "pipelines"),
    "training": ("serving",),
    "pipelines": ("serving",),
}
DOCUMENTS_BOTH = "pipelines/docs.py"  # renders the docs of both sides (the service's settings too); not a stage


def test_training_and_serving_share_common_and_never_import_each_other():
    crossing = {}
    for package, forbidden in FORBIDDEN.items():
        for path in sorted((REPO / package).rglob("*.py")):
            names = {m for m in imported_modules(path) if m.split(".")[0] in forbidden}
            if names and path.relative_to(REPO).as_posix() != DOCUMENTS_BOTH:
                crossing[path.relative_to(REPO).as_posix()] = sorted(names)
    assert crossing == {}
    assert not any(dep.startswith("serving/") for stage in stages().values() for dep in stage.get("deps", []))
