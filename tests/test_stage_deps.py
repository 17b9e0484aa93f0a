"""dvc.yaml's deps list exactly the project modules each stage runs, so "up to date" means up to date.

A stage's modules are the import closure of its `python -m stages.X` module: every `shear.*` /
`stages.*` import, followed transitively, including imports inside functions (a lazy import
still runs). A package's __init__.py counts when it holds code, not only a docstring. A
directory in deps stands for every module under it.
"""
from __future__ import annotations

import ast
import re
import typing

import pytest
import yaml

from tests.conftest import REPO

PACKAGES = ("shear", "stages")


def module_file(name: str):
    """The .py file of project module `name` (a dotted name), or None when it is not one."""
    path = REPO.joinpath(*name.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def runs_code(path) -> bool:
    """False for a package __init__.py that holds nothing but a docstring."""
    body = ast.parse(path.read_text()).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return bool(body)


def imported_names(path) -> set[str]:
    """Dotted names of the project modules `path` imports, anywhere in the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # `from shear.importance import blocks` imports the submodule shear.importance.blocks
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {n for n in names if n.split(".")[0] in PACKAGES}


def import_closure(module: str) -> set[str]:
    """Repository-relative paths of every project module that `python -m <module>` runs."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        # importing a.b.c runs a/__init__.py and a/b/__init__.py first
        for i in range(1, len(parts) + 1):
            path = module_file(".".join(parts[:i]))
            if path is not None and path not in seen:
                seen.add(path)
                todo.extend(imported_names(path))
    return {str(p.relative_to(REPO)) for p in seen if p.name != "__init__.py" or runs_code(p)}


def expand(dep: str) -> set[str]:
    """A project dep as module paths: a directory stands for every module under it."""
    path = REPO / dep
    if path.is_dir():
        return {str(p.relative_to(REPO)) for p in path.rglob("*.py")
                if "__pycache__" not in p.parts and (p.name != "__init__.py" or runs_code(p))}
    return {dep}


def dvc_stages() -> dict[str, dict]:
    """dvc.yaml's stages with `foreach` expanded, as DVC names them (evaluate@pruned)."""
    stages = {}
    for name, stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        if "foreach" in stage:
            for item in stage["foreach"]:
                text = yaml.safe_dump(stage["do"]).replace("${item}", str(item))
                stages[f"{name}@{item}"] = yaml.safe_load(text)
        else:
            stages[name] = stage
    return stages


STAGES = dvc_stages()


def test_closure_follows_lazy_and_from_imports():
    closure = import_closure("stages.prune")
    # the method table's modules, a from-import of a submodule, and the stage runner's lazy import
    for path in ("stages/prune_depth.py", "stages/prune_sheared.py", "shear/importance/blocks.py", "shear/stage.py"):
        assert path in closure, path


@pytest.mark.parametrize("name", sorted(STAGES))
def test_deps_list_exactly_the_modules_the_stage_imports(name):
    stage = STAGES[name]
    module = re.search(r"python -m (\S+)", stage["cmd"]).group(1)
    needed = import_closure(module)
    project_deps = [d for d in stage.get("deps", []) if d.split("/")[0] in PACKAGES]
    declared = set().union(*(expand(d) for d in project_deps)) if project_deps else set()
    missing, extra = sorted(needed - declared), sorted(declared - needed)
    assert not missing and not extra, f"dvc.yaml stage {name}: missing deps {missing}, extra deps {extra}"


def test_prune_method_table_matches_config():
    from shear.config import PruneParams
    from stages.prune import METHODS

    assert set(METHODS) == set(typing.get_args(typing.get_type_hints(PruneParams)["method"]))


def test_every_path_in_shear_paths_is_one_of_dvc_yamls():
    from pathlib import Path

    from shear import paths

    declared = set()
    for stage in STAGES.values():
        for field in ("deps", "outs", "metrics"):
            for entry in stage.get(field, []):
                declared |= set(entry) if isinstance(entry, dict) else {entry}
    for name, value in vars(paths).items():
        if isinstance(value, Path):
            assert any(d == str(value) or d.startswith(f"{value}/") for d in declared), (name, str(value))
    for name in paths.MODEL_NAMES:
        assert str(paths.model_dir(name)) in declared and str(paths.metrics_file(name)) in declared, name
