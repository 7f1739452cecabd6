"""Imports go one way: no module imports one that imports it back (directly or inside a function)."""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "vitbudget"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """vitbudget modules `path` imports anywhere (top level or inside functions), resolved to module names."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("vitbudget"):
                found.add(target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("vitbudget")}
    return found


def test_no_module_pair_imports_each_other():
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    graph = {name: {t for t in imports_of(path) if t in modules and t != name} for name, path in modules.items()}
    pairs = sorted({tuple(sorted((a, b))) for a, targets in graph.items() for b in targets
                    if a in graph.get(b, set()) and not (a.startswith(b + ".") or b.startswith(a + "."))})
    assert pairs == [], f"modules that import each other: {pairs}"


def test_a_methods_facts_are_declared_once_at_registration():
    """Labels, kinds, training and recipes come from the registry; stacks inherit their reducer's."""
    from vitbudget.methods import METHODS, build_method, get_spec
    from vitbudget.methods.labels import display_name
    from vitbudget.models import VisionTransformer
    from vitbudget.train.recipes import RECIPES
    from conftest import TINY

    assert all(spec.label for spec in METHODS.values())
    assert {n for n, s in METHODS.items() if s.trains} == {"avit", "dynamicvit", "spot"}
    assert all(spec.recipe in RECIPES for spec in METHODS.values() if spec.trains)
    assert display_name("tome+abs") == "ToMe + ABS" == get_spec("tome+abs").label
    stack = get_spec("spot+abs")
    assert (stack.kind, stack.trains, stack.recipe) == ("stack", True, "spot_cifar10")
    avit_stack = build_method("avit+abs", VisionTransformer(TINY))
    assert avit_stack.data_dependent_shapes is not None and build_method("tome+abs", VisionTransformer(TINY), r=1).data_dependent_shapes is None
