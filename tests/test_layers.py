"""Layering: low-level modules import nothing above them, not even lazily inside functions.

From the bottom up: ``mtkd.checkpoint`` (torch and ``mtkd.errors`` only); the
core packages ``heads``, ``models``, ``datasets`` and ``losses``
(:data:`ALSO_ABOVE` names the core packages each must not import); ``mtkd.teachers``
(teachers of every kind, over models and the Ultralytics adapter); then
``engine``; the task packages under ``mtkd.tasks`` (the engine reaches them
only through the task registry, :data:`mtkd.registry.TASKS`); ``yolo``'s
trainer, teacher and CLI, ``export`` and the CLIs.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import List, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1] / "mtkd"

#: What the core packages (models, heads, losses, datasets) must never import.
ABOVE_CORE = ("mtkd.engine", "mtkd.tasks", "mtkd.yolo", "mtkd.export", "mtkd.cli", "mtkd.teachers",
              "mtkd.adversarial.cli")
#: What each core package must not import besides :data:`ABOVE_CORE` (its neighbours that sit above it).
ALSO_ABOVE = {"heads": ("mtkd.models", "mtkd.losses", "mtkd.datasets"),
              "models": ("mtkd.losses", "mtkd.datasets"),
              "datasets": ("mtkd.heads", "mtkd.models", "mtkd.losses"),
              "losses": ()}
#: What the teacher builder must never import (it may use ``mtkd.yolo.adapter``).
ABOVE_TEACHERS = ("mtkd.engine", "mtkd.tasks", "mtkd.yolo.teacher", "mtkd.yolo.trainer", "mtkd.yolo.cli",
                  "mtkd.yolo.losses", "mtkd.export", "mtkd.cli")


def imports(path: Path, root: Path = ROOT) -> List[Tuple[int, str]]:
    """``(line, module)`` for every import in ``path``, at any depth (functions, classes, branches).

    ``from a import b`` yields ``a.b`` (``b`` may be a submodule); relative
    imports are resolved against the file's package (``root`` is the ``mtkd`` folder).
    """
    package = ".".join(path.relative_to(root.parent).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return sorted(found)


def violations(paths: List[Path], forbidden: Tuple[str, ...], root: Path = ROOT) -> List[str]:
    return [f"{p.relative_to(root.parent)}:{line} imports {mod}"
            for p in paths for line, mod in imports(p, root)
            if any(mod == f or mod.startswith(f + ".") for f in forbidden)]


def tree(*names: str) -> List[Path]:
    return sorted(p for name in names for p in (ROOT / name).rglob("*.py"))


def test_import_scan_sees_nested_and_relative_imports(tmp_path):
    pkg = tmp_path / "mtkd" / "models"
    pkg.mkdir(parents=True)
    src = pkg / "x.py"
    src.write_text("import torch\n"
                   "def f():\n"
                   "    if True:\n"
                   "        from mtkd.engine.checkpoint import load_checkpoint\n"
                   "    from mtkd import yolo\n"
                   "    from ..export import onnx\n"
                   "    from . import backbone\n")
    root = tmp_path / "mtkd"
    assert [m for _, m in imports(src, root)] == ["torch", "mtkd.engine.checkpoint.load_checkpoint", "mtkd.yolo",
                                            "mtkd.export.onnx", "mtkd.models.backbone"]
    assert len(violations([src], ABOVE_CORE, root)) == 3


@pytest.mark.parametrize("package", sorted(ALSO_ABOVE))
def test_core_packages_only_look_down(package):
    paths = tree(package)
    assert paths, f"no modules under mtkd/{package}"
    assert violations(paths, ABOVE_CORE + ALSO_ABOVE[package]) == []


def test_checkpoint_io_depends_on_errors_only():
    path = ROOT / "checkpoint.py"
    assert path.is_file()
    mtkd_imports = [m for _, m in imports(path) if m == "mtkd" or m.startswith("mtkd.")]
    assert all(m.startswith("mtkd.errors.") for m in mtkd_imports), mtkd_imports


def test_teacher_builder_sits_below_engine_and_the_yolo_bridge():
    path = ROOT / "teachers.py"
    assert path.is_file()
    assert violations([path], ABOVE_TEACHERS) == []


def test_engine_reaches_tasks_only_through_the_registry():
    paths = tree("engine")
    assert paths and (ROOT / "tasks" / "multitask" / "task.py").is_file()
    assert violations(paths, ("mtkd.tasks",)) == []
