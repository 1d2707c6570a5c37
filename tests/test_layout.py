"""The house rules of the package, checked from its source: no import circle anywhere in zenlm/
(imports inside functions count too), and the ground floor imports nothing above it."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "zenlm"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the zenlm modules it imports, from every import statement in its source."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
                # `from . import kernels` depends on the module kernels, not on the package's __init__
                found = subs if len(subs) == len(node.names) else [target, *subs]
            elif isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            else:
                continue
            deps.update(d for d in found if d in modules and d != name)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_anywhere_in_zenlm():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_ground_floor_imports_nothing_above_it():
    graph = import_graph()
    assert graph["zenlm.config"] == set()
    assert graph["zenlm.kernels"] <= {"zenlm.cpu"}
    assert graph["zenlm.model"] <= {"zenlm.config", "zenlm.kernels"}


def test_names_say_one_thing_each():
    """No two modules define a top-level function of the same name, and no package attribute
    hides a submodule of the same name (``zenlm.generate`` is the function, ``zenlm.generation``
    the module)."""
    defined: dict[str, list[str]] = {}
    for path in ROOT.rglob("*.py"):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                defined.setdefault(node.name, []).append(_module_name(path))
    assert {name: mods for name, mods in defined.items() if len(mods) > 1} == {}

    import importlib
    import pkgutil

    import zenlm

    for package in [zenlm] + [importlib.import_module(f"zenlm.{m.name}") for m in pkgutil.iter_modules(zenlm.__path__)
                              if m.ispkg]:
        for sub in pkgutil.iter_modules(package.__path__):
            value = package.__dict__.get(sub.name)
            assert value is None or getattr(value, "__name__", None) == f"{package.__name__}.{sub.name}", \
                f"{package.__name__}.{sub.name} is both a module and {value!r}"
