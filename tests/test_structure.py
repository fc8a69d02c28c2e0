"""The house: imports run one way (no circle inside obcache/, lazy imports included), and the engine and the
policies never probe a selector for attributes it may lack."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "obcache"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking(node: ast.If) -> bool:
    return isinstance(node.test, (ast.Name, ast.Attribute)) and ast.unparse(node.test).endswith("TYPE_CHECKING")


def imports(path: Path, known: set[str]) -> set[str]:
    """The obcache modules `path` imports, at module level or inside functions; TYPE_CHECKING blocks left out."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # a submodule imported by name
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {name for name in found if name in known}


def graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(path) for path in paths}
    return {module_name(path): imports(path, known) - {module_name(path)} for path in paths}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in edges.get(node, ()):
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in edges:
        if node not in index:
            connect(node)
    return found


def test_the_cycle_finder_finds_a_planted_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_inside_obcache():
    edges = graph()
    assert "obcache.hooks" in edges and "obcache.selector" in edges["obcache.policies.base"]
    assert cycles(edges) == []


def test_the_engine_knows_policies_only_through_the_contract():
    """hooks, eviction, after_prefill, capture, forward, cache, layouts and attention import no policy module."""
    engine = ["obcache.hooks", "obcache.eviction", "obcache.after_prefill", "obcache.capture", "obcache.forward",
              "obcache.cache", "obcache.layouts", "obcache.attention", "obcache.layer_state"]
    edges = graph()
    for module in engine:
        assert not {name for name in edges[module] if name.startswith("obcache.policies")}, module


def test_no_attribute_probing_of_selectors_and_no_getattr_forwarding():
    for path in [*PACKAGE.glob("*.py"), *(PACKAGE / "policies").rglob("*.py")]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            assert not (isinstance(node, ast.FunctionDef) and node.name == "__getattr__"), path
            # probing = asking whether an attribute exists: hasattr, or getattr with a fallback (reading a declared
            # dataclass field by name, getattr(policy, field.name), is not)
            probe = isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and (
                node.func.id == "hasattr" or (node.func.id == "getattr" and len(node.args) == 3))
            if probe:
                target = ast.unparse(node.args[0])
                assert not any(word in target for word in ("policy", "selector", "base")), (path, ast.unparse(node))
