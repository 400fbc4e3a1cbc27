"""The package's folders are its architecture: the path of one token in moe/, the engine in train/,
the cluster concerns in cluster/, experiments in experiments/, and no two modules import each other
in a circle (lazy imports inside functions included)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "gatepro_dist"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every module of the package that ``path`` imports, at the top or inside a function."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from . import comm` imports the module comm
                if f"{target}.{alias.name}" in known:
                    found.add(f"{target}.{alias.name}")
                elif target in known:
                    found.add(target)
    found.discard(name)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def package_graph() -> dict[str, set[str]]:
    mods = modules()
    # A package's __init__ importing its own submodules is how a package exposes them, not a circle
    # between files; every other edge counts.
    return {name: {m for m in imports_of(path, set(mods)) if not (path.name == "__init__.py" and m.startswith(name + "."))}
            for name, path in mods.items()}


def test_no_module_imports_itself_through_a_circle():
    assert find_cycle(package_graph()) is None, " -> ".join(find_cycle(package_graph()))


def test_the_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_import_reader_sees_relative_and_lazy_imports(tmp_path):
    mods = modules()
    trainer = imports_of(mods["gatepro_dist.train.trainer"], set(mods))
    assert {"gatepro_dist.moe.comm", "gatepro_dist.cluster.faults", "gatepro_dist.train.step"} <= trainer
    engine = imports_of(mods["gatepro_dist.train.engine"], set(mods))  # both imports are inside a function
    assert {"gatepro_dist.backends.deepspeed_trainer", "gatepro_dist.train.trainer"} <= engine


def test_the_token_path_is_one_folder():
    moe = {p.name for p in (PACKAGE / "moe").glob("*.py")}
    assert {"router.py", "dispatch.py", "experts.py", "layer.py", "routing.py"} <= moe
    for folder in ("train", "cluster", "experiments"):
        assert (PACKAGE / folder / "__init__.py").is_file()
    top = {p.name for p in PACKAGE.glob("*.py")}
    assert top == {"__init__.py", "config.py", "config_checks.py"}, top


def test_neither_engine_imports_the_other():
    graph = package_graph()
    assert "gatepro_dist.backends.deepspeed_trainer" not in graph["gatepro_dist.train.trainer"]
    assert "gatepro_dist.train.trainer" not in graph["gatepro_dist.backends.deepspeed_trainer"]
