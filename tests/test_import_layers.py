"""The package's import graph: no cycles, layers that only import downward, lazy imports explained.

Read from the source with `ast` (nothing is imported), counting imports inside functions too: a cycle
hidden in a function body is still a cycle, and it is how the weights wing once dodged one.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mefem_jax"
# The commands (`python -m mefem_jax.NAME`); `data.build_shards` is the builder's two-line command module,
# `data.leakage` the check for evaluation images in the pretraining data.
ENTRY_POINTS = ("train", "finetune", "evaluate", "export", "compile_check", "viz", "data.build_shards",
                "data.leakage")
# The package's top level: the entry points and these core modules; everything else lives in a wing.
CORE = ("cli", "config", "config_checks", "spec_options", "workdir_lock")
WINGS = ("training", "finetuning", "tpu", "weights", "evaluation", "data", "data.shards", "objective", "masking",
         "models", "reference")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts).removeprefix("mefem_jax.")


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported package module, line, inside a function) for each import of a mefem_jax module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            candidates = [[alias.name] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from mefem_jax.data import augment, decode` imports the modules data.augment and data.decode;
            # a name that is not a module (a function, a class) imports the package it comes from.
            candidates = [[f"{node.module}.{alias.name}", node.module] for alias in node.names]
        else:
            continue
        for names in candidates:
            short = next((n.removeprefix("mefem_jax.") for n in names
                          if n.startswith("mefem_jax.") and n.removeprefix("mefem_jax.") in MODULES), None)
            if short is not None and (short, node.lineno) not in {(d, ln) for d, ln, _ in found}:
                found.append((short, node.lineno, id(node) not in top_level))
    return found


GRAPH = {name: {dep for dep, _, _ in _imports(path) if dep != name} for name, path in MODULES.items()}
# Package __init__ files. Two (models, masking) re-export their package's public names, so an import of
# the package reaches its modules through them; the others hold only a docstring.
PACKAGES = {name for name, path in MODULES.items() if path.name == "__init__.py"}


def _reachable(start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for dep in GRAPH.get(stack.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                stack.append(dep)
    return seen


def test_the_graph_is_read():
    # Guards the test itself: a parser that found nothing would pass every rule below.
    assert {"train", "weights.encoders", "export", "models.vit", "weights.timm_keys"} <= set(MODULES)
    assert "weights.timm_keys" in GRAPH["weights.encoders"] and "weights.encoders" in GRAPH["export"]
    # Every module of a `from PACKAGE import a, b` counts, not only the first.
    assert {"data.augment", "data.device_augment"} <= GRAPH["data.pipeline"]


@pytest.mark.parametrize("name", sorted(set(MODULES) - PACKAGES))
def test_no_import_cycle(name):
    assert name not in _reachable(name), f"{name} imports itself through {sorted(_reachable(name) & set(GRAPH))}"


def test_models_import_only_models():
    for name in MODULES:
        if name.startswith("models"):
            outside = sorted(d for d in GRAPH[name] if not d.startswith("models") and d not in PACKAGES)
            assert not outside, f"{name} reaches up into {outside}"


def test_weights_loading_sits_below_its_users():
    above = {"export", "evaluate", "train", "compile_check"}
    for name in ("weights.encoders", "training.checkpoint", "weights.timm_keys"):
        bad = sorted(d for d in _reachable(name) if d in above or d.startswith("evaluation"))
        assert not bad, f"{name} imports {bad}, which sit above it"


def test_no_module_imports_an_entry_point():
    for name, deps in GRAPH.items():
        assert not deps & set(ENTRY_POINTS), f"{name} imports the entry point(s) {sorted(deps & set(ENTRY_POINTS))}"


def test_every_lazy_package_import_says_why():
    """An import inside a function hides a dependency from the reader: it must carry a comment."""
    unexplained = []
    for name, path in MODULES.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        for dep, lineno, lazy in _imports(path):
            context = lines[max(0, lineno - 4):lineno]  # the import line and the three above it
            if lazy and not any("#" in line for line in context):
                unexplained.append(f"{name}:{lineno} imports {dep}")
    assert not unexplained, unexplained


def _in(name: str, wing: str) -> bool:
    return name == wing or name.startswith(wing + ".")


def test_the_top_level_holds_entry_points_and_core_only():
    top = {n for n in MODULES if "." not in n and n not in WINGS} - {"mefem_jax"}  # the package itself
    assert top <= set(ENTRY_POINTS) | set(CORE), f"{sorted(top - set(ENTRY_POINTS) - set(CORE))}: put it in a wing"


@pytest.mark.parametrize("wing, forbidden", [
    ("tpu", ("weights", "evaluation", "data.shards", "reference")),
    ("weights", ("tpu", "evaluation", "data.pipeline", "data.sources", "data.shards", "training.run_setup",
                 "training.train_step", "reference")),
    ("data.shards", ("data.pipeline", "data.sources", "data.augment", "data.device_augment", "training", "tpu",
                     "weights", "evaluation", "models", "reference")),
    ("training", ("tpu", "weights", "evaluation.data", "data.shards", "reference")),
    ("evaluation", ("training", "tpu", "data.shards.build", "reference")),
    ("finetuning", ("tpu", "weights", "data.shards.build", "reference")),
])
def test_a_wing_reaches_nothing_above_or_beside_it(wing, forbidden):
    for name in (n for n in MODULES if _in(n, wing)):
        reached = _reachable(name)
        bad = sorted(d for d in reached if any(_in(d, f) for f in forbidden) or d in ENTRY_POINTS)
        assert not bad, f"{name} reaches {bad}"


def test_loading_a_config_reads_no_pipeline():
    """config.py and the section modules it reads hold data: no Grain pipeline, probe or TPU code."""
    reached = _reachable("config")
    bad = sorted(d for d in reached if d in ("data.pipeline", "data.sources", "evaluation.online_probe",
                                             "evaluation.data", "training.train_step", "training.run_setup")
                 or _in(d, "tpu") or _in(d, "weights"))
    assert not bad, f"config reaches {bad}"
