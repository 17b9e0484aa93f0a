"""dvc.yaml's deps list exactly the project modules each stage runs, so "up to date" means up to date.

A stage's modules are the import closure of its `python -m stages.X` module: every `shear.*` /
`stages.*` import, followed transitively, including imports inside functions (a lazy import
still runs). A package's __init__.py counts when it holds code, not only a docstring. A
directory in deps stands for every module under it.

Params likewise: every key a stage module reads (`params.a.b`, through local aliases) must be
declared, in dvc.yaml's `params` or, for prune and retrain, in the settings the params
stage writes for them (shear.config.STAGE_SETTINGS, for every method).
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


# ----------------------------------------------------------------------------- params by key


def params_read(path) -> set[str]:
    """Dotted params keys a stage module reads: `params.a.b` chains, through local aliases
    (`depth = params.prune.depth`, then `depth.ratio`); a section used whole counts whole."""
    tree = ast.parse(path.read_text())
    aliases = {}  # local name -> dotted key it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
            pairs = (zip(target.elts, value.elts) if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple)
                     else [(target, value)])
            for name, expr in pairs:
                key = chain(expr, {})
                if isinstance(name, ast.Name) and key:
                    aliases[name.id] = key

    read, bases = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in bases:
            key = chain(node, aliases)
            if key:
                read.add(key)
                inner = node.value
                while isinstance(inner, ast.Attribute):  # a.b.c counts once, not also as a.b
                    bases.add(id(inner))
                    inner = inner.value
        elif isinstance(node, ast.Name) and node.id in aliases and isinstance(node.ctx, ast.Load):
            read.add(aliases[node.id])  # the alias itself, e.g. passed whole to a function
    # an alias that is only a prefix of keys read through it is not read whole
    return {k for k in read if not (k in aliases.values() and any(r.startswith(k + ".") for r in read)
                                    and not whole_use(tree, k, aliases))}


def whole_use(tree, key: str, aliases: dict) -> bool:
    """Whether an alias of `key` is used other than as the base of an attribute access."""
    names = {name for name, k in aliases.items() if k == key}
    bases = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    return any(isinstance(n, ast.Name) and n.id in names and isinstance(n.ctx, ast.Load) and id(n) not in bases
               for n in ast.walk(tree))


def chain(node, aliases: dict):
    """`params.a.b` (or `alias.c`) as "a.b" ("x.c" for an alias of x), else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    if node.id == "params" and parts:
        return ".".join(reversed(parts))
    if node.id in aliases:
        return ".".join([aliases[node.id], *reversed(parts)])
    return None


def leaves(key: str) -> set[str]:
    """The leaf keys under `key` in the Params tree (`mixture_kind()` reads data.mixture and prune.method)."""
    import dataclasses

    from shear.config import Params

    if key == "mixture_kind":
        return {"data.mixture", "prune.method"}
    node, parts = Params(), key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(node):  # an attribute of a value (criterion.rstrip): the value is the leaf
            return {".".join(parts[:i])}
        node = getattr(node, part)
    if not dataclasses.is_dataclass(node):
        return {key}
    return set().union(*(leaves(f"{key}.{f.name}") for f in dataclasses.fields(node)))


def declared_params(name: str, stage: dict) -> set[str]:
    """The keys a stage declares: dvc.yaml params, or the keys of its settings file for every method."""
    from shear.config import STAGE_SETTINGS, parse_params

    declared = {k for entry in stage.get("params", []) for k in ([entry] if isinstance(entry, str) else [])}
    if name in STAGE_SETTINGS:
        for override in ({"prune": {"method": "depth", "depth": {"mode": "iterative", "heal_tokens": 65536}}},
                         {"prune": {"method": "width"}}, {"prune": {"method": "sheared"}}):
            settings = STAGE_SETTINGS[name](parse_params(override))
            declared |= set(settings) | ({"data.mixture", "prune.method"} if "mixture_kind" in settings else set())
    return declared


@pytest.mark.parametrize("name", sorted(n for n in STAGES if n != "params"))  # the params stage reads the whole file
def test_stage_declares_every_param_it_reads(name):
    stage = STAGES[name]
    module = re.search(r"python -m (\S+)", stage["cmd"]).group(1)
    read = {leaf for path in import_closure(module) if path.startswith("stages/")
            for key in params_read(REPO / path) for leaf in leaves(key)}
    declared = declared_params(name, stage)
    missing = sorted(k for k in read if not any(k == d or k.startswith(d + ".") for d in declared))
    assert not missing, f"dvc.yaml stage {name} reads params it does not declare: {missing}"
