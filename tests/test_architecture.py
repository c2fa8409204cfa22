"""The import rule of the README's "Architecture" section, read from the source: every import of every
module (function-local ones included), no cycle between modules or between top-level packages, and
which parts may import which."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "kvshrink"

# method code: what a user's model runs through
METHOD = {"attention", "cache", "blocks", "fast_decode", "kernels", "accounting", "shapes", "shims", "attach", "policies", "dms", "kvtc", "generation", "loading", "zoo", "tasks", "corpora",
          "prompts", "errors", "jsonl", "progress"}
STUDIES_AND_SURFACE = {"cli", "serve", "evaluation", "train", "demo", "compare", "__main__"}
ALLOWED_EXTRA = {  # imports a part may make beyond the rules below
    "tasks": {"errors"},  # tasks know no model: generators, solvers and graders only
    "zoo": {"errors"},  # a registry of manifests
    "dms": {"errors", "prompts", "tasks"},  # the method's math and diagnostics; the core imports it, not the reverse
}


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the kvshrink modules it imports anywhere in its body."""
    mods = modules()
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                targets |= {module} | {f"{module}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
        graph[name] = {t for t in targets if t in mods and t != name}
    return graph


def third_party(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
    return names


def part(module: str) -> str:
    """kvshrink.dms.config -> dms; the package itself -> '' (it re-exports the public API)."""
    return module.split(".")[1] if "." in module else ""


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_walker_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_modules():
    assert cycles(import_graph()) == []


def test_no_import_cycle_between_parts():
    parts: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        if part(module):
            parts.setdefault(part(module), set()).update(part(t) for t in targets if part(t) not in ("", part(module)))
    assert cycles(parts) == []


def test_method_code_never_imports_the_cli_the_server_or_studies():
    graph = import_graph()
    assert set(map(part, graph)) - {""} <= METHOD | STUDIES_AND_SURFACE  # a new part must be placed in one
    wrong = sorted((m, t) for m, ts in graph.items() if part(m) in METHOD for t in ts if part(t) in STUDIES_AND_SURFACE)
    assert wrong == []


def test_small_parts_import_only_what_they_are_allowed():
    graph = import_graph()
    wrong = sorted((m, t) for m, ts in graph.items() if part(m) in ALLOWED_EXTRA
                   for t in ts if part(t) != part(m) and part(t) not in ALLOWED_EXTRA[part(m)])
    assert wrong == []


def test_tasks_know_no_model_and_the_codec_never_reaches_the_trainer():
    mods = modules()
    model_libraries = {"torch", "transformers", "peft", "accelerate"}
    assert {m: third_party(p) & model_libraries for m, p in mods.items() if part(m) == "tasks"} == {m: set() for m in mods if part(m) == "tasks"}
    graph = import_graph()
    assert [(m, t) for m, ts in graph.items() if part(m) == "kvtc" for t in ts if part(t) == "train"] == []
