"""dvc.yaml declares, for every stage, exactly the code it runs: its script and every module of the package it imports.

The imports are read from the source (``ast``), following imports inside
functions too, so a module imported lazily still counts. A stage whose deps
miss a module would not rerun when that module changes; this test fails then.
"""

import ast
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "nextword"


def imported_modules(path: Path) -> set[str]:
    """``nextword.*`` modules that the file at ``path`` imports anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("nextword.") and module_file(name)}


def module_file(name: str) -> Path | None:
    path = ROOT / "src" / Path(*name.split("."))
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def code_closure(script: Path) -> set[str]:
    """The script and every package module it reaches through imports, as paths relative to the root."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(module_file(name) for name in imported_modules(path))
    return {str(p.relative_to(ROOT)) for p in seen}


def stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def test_every_stage_runs_the_code_of_its_own_checkout():
    # Not the installed package, which may be another checkout's (or a queued experiment's workspace).
    for name, stage in stages().items():
        assert stage["cmd"].startswith("PYTHONPATH=src python src/stages/"), name


def test_every_stage_declares_exactly_the_code_it_imports():
    for name, stage in stages().items():
        script = next(word for word in stage["cmd"].split() if word.endswith(".py"))
        declared = {dep for dep in stage["deps"] if dep.startswith("src/")}
        needed = code_closure(ROOT / script)
        assert declared == needed, (f"stage {name}: add {sorted(needed - declared)} to its deps, "
                                    f"drop {sorted(declared - needed)}")


def test_the_closure_follows_lazy_imports(tmp_path):
    # cli imports nextword.server inside a function: the closure must still reach it.
    assert "src/nextword/server.py" in code_closure(PACKAGE / "cli.py")


def test_the_commands_default_model_is_the_pipelines_servable_folder():
    from nextword.cli import DEFAULT_MODEL

    paths = next(v["paths"] for v in yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["vars"]
                 if "paths" in v)
    assert DEFAULT_MODEL == paths["model"]
