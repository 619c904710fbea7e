"""The package's shape: old import paths still work (with a warning), imports run one way, and
no module reaches into another's private names."""
import ast
import importlib
import pathlib
import sys
import warnings

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "attnrhythm"

MOVED = {
    "attnrhythm.config": "attnrhythm.core.config", "attnrhythm.stats": "attnrhythm.core.stats",
    "attnrhythm.heads": "attnrhythm.core.heads", "attnrhythm.metrics": "attnrhythm.core.metrics",
    "attnrhythm.credit": "attnrhythm.core.credit", "attnrhythm.couplings": "attnrhythm.core.couplings",
    "attnrhythm.textstats": "attnrhythm.core.textstats", "attnrhythm.streaming": "attnrhythm.capture.streaming",
    "attnrhythm.analysis": "attnrhythm.studies.analyze", "attnrhythm.perturb": "attnrhythm.studies.perturb",
    "attnrhythm.reproduce": "attnrhythm.studies.reproduce", "attnrhythm.figures": "attnrhythm.studies.figures",
    "attnrhythm.report": "attnrhythm.studies.report", "attnrhythm.plot": "attnrhythm.train.plot",
    "attnrhythm.greedy": "attnrhythm.generation",
}


@pytest.mark.parametrize("old,new", sorted(MOVED.items()))
def test_old_module_paths_warn_and_alias_the_new_ones(old, new):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)


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


SHIMS = {m.rsplit(".", 1)[1] + ".py" for m in MOVED}
# who may import whom: a module in a layer imports only from its own folder and the layers below
LAYERS = {
    "core": {"core", "errors"},
    "capture": {"capture", "core", "errors", "io", "log"},
    "tasks": {"tasks", "errors", "io", "log"},
    "studies": {"studies", "capture", "core", "errors", "io", "log", "generation", "data", "models", "tasks"},
    "train": {"train", "capture", "core", "errors", "io", "log", "generation", "data", "models", "tasks"},
}


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if len(rel.parts) == 1 and rel.name in SHIMS:
            continue
        yield path, rel


def test_imports_run_one_way():
    bad = []
    for path, rel in _modules():
        if len(rel.parts) == 1 or rel.parts[0] not in LAYERS:
            continue
        for module, _ in _imports(path):
            parts = module.split(".")
            if parts[0] != "attnrhythm" or len(parts) == 1:
                continue
            if parts[1] not in LAYERS[rel.parts[0]]:
                bad.append(f"{rel} imports {module}")
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


def test_moved_modules_are_still_attributes_of_the_package():
    import attnrhythm
    sys.modules.pop("attnrhythm.metrics", None)
    attnrhythm.__dict__.pop("metrics", None)
    with pytest.warns(DeprecationWarning, match="attnrhythm.core.metrics"):
        assert attnrhythm.metrics.rhythm_from_stats is attnrhythm.rhythm_from_stats
