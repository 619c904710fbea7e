"""The package's shape: the public names, imports that run one way with no circles, and no module
that reaches into another's private names."""
import ast
import pathlib
import warnings

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "attnrhythm"

def test_public_api_names_unchanged():
    import attnrhythm as ar
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the public names themselves never warn
        for name in ("RhythmConfig", "rhythm_from_attentions", "rhythm_from_stats", "capture_statistics",
                     "credit_gamma", "AttentionStats", "HeadSets", "RhythmResult", "attention_maps",
                     "calibrate_heads", "classify_heads", "receiver_kurtosis", "select_layers"):
            assert callable(getattr(ar, name)), name
        from attnrhythm.tasks import score_choice, score_countdown, score_math  # noqa: F401


def _imports(path: pathlib.Path):
    """(imported module, imported names) of every import statement in a file, absolute."""
    tree = ast.parse(path.read_text())
    # `if __name__ == "__main__":` blocks are entry points, not imports of the module
    main_blocks = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)
                   for n in ast.walk(node)}
    package = ".".join(("attnrhythm",) + path.relative_to(ROOT).with_suffix("").parts)
    if path.name == "__init__.py":
        package = package.rsplit(".", 1)[0] + ".__init__"
    for node in ast.walk(tree):
        if id(node) in main_blocks:
            continue
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:-node.level] + ([base] if base else []))
            yield base, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


# who may import whom: a module imports only from its own folder and the layers below
BASE = {"errors", "io", "log"}
LAYERS = {
    "errors": set(), "log": set(), "io": {"errors"},
    "core": {"core", "errors"},
    "capture": {"capture", "core"} | BASE,
    "data": BASE, "models": BASE,
    "tasks": {"tasks", "data"} | BASE,
    "generation": {"capture", "core", "data"} | BASE,
    "studies": {"studies", "capture", "core", "generation", "data", "models", "tasks"} | BASE,
    "train": {"train", "capture", "core", "generation", "data", "models", "tasks"} | BASE,
}


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        yield path, path.relative_to(ROOT)


def _layer(module: str) -> str:
    """attnrhythm.tasks.math -> tasks; attnrhythm.data -> data."""
    return module.split(".")[1]


def test_imports_run_one_way():
    bad = [f"{module} imports {target}" for module, targets in sorted(_import_graph().items())
           if module.count(".") and _layer(module) in LAYERS
           for target in sorted(targets) if _layer(target) not in LAYERS[_layer(module)]]
    assert not bad, "\n".join(bad)


def test_nothing_imports_cli_or_another_modules_private_names():
    bad = []
    for path, rel in _modules():
        for module, names in _imports(path):
            if module == "attnrhythm.cli" and rel.name != "__main__.py":
                bad.append(f"{rel} imports the CLI")
            bad += [f"{rel} imports {module}.{n}" for n in names
                    if module.startswith("attnrhythm") and n.startswith("_") and n != "__version__"]
    assert not bad, "\n".join(bad)


def _module_name(rel: pathlib.Path) -> str:
    parts = ("attnrhythm",) + rel.with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """module -> the attnrhythm modules it imports, at module level or inside a function.

    ``from attnrhythm import data`` imports the module ``attnrhythm.data``; importing
    ``attnrhythm.tasks.math`` from outside ``attnrhythm.tasks`` runs ``attnrhythm/tasks/__init__.py``
    first, so it is an import of that package too (a package's own modules do not count their
    package: it is already being imported)."""
    known = {_module_name(rel) for _, rel in _modules()}
    graph = {}
    for path, rel in _modules():
        name = _module_name(rel)
        own_packages = {name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)} | {name}
        targets = set()
        for module, names in _imports(path):
            if not module.startswith("attnrhythm"):
                continue
            pieces = [module] + [f"{module}.{n}" for n in names if f"{module}.{n}" in known]
            for piece in pieces:
                parts = piece.split(".")
                targets |= {".".join(parts[:k]) for k in range(1, len(parts) + 1)}
        graph[name] = {t for t in targets if t in known and t not in own_packages and t != "attnrhythm"}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    """No two modules import each other, directly or through others, even inside a function: a
    lazy import that closes a circle hides a layering problem instead of solving it."""
    circles = _circles(_import_graph())
    assert not circles, "\n".join(" <-> ".join(c) for c in circles)


def test_the_circle_finder_finds_circles():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_at_most_ten_top_level_modules():
    top = sorted(p.name for p in ROOT.glob("*.py"))
    assert len(top) <= 10, top
