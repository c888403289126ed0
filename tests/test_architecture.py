"""The engine is Qt-free and napari-free: a headless aggregator must not need a GUI stack."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import fedmix_engine

GUI_MODULES = ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "superqt", "vispy",
               "napari_fedmix")
ENGINE = Path(fedmix_engine.__file__).parent


def test_engine_source_never_imports_gui_modules() -> None:
    """Static check: catches lazy imports inside functions too."""
    offenders = []
    for path in ENGINE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ENGINE)}:{node.lineno} imports {n}" for n in names
                          if n.split(".")[0] in GUI_MODULES]
    assert not offenders, offenders


def test_engine_imports_and_runs_with_gui_modules_unavailable(tmp_path: Path) -> None:
    """Dynamic check: with every GUI module made unimportable, all engine modules import and the
    CLI works — as in a headless install without the [napari] extra."""
    code = textwrap.dedent(f"""
        import importlib, importlib.abc, pkgutil, sys
        BLOCKED = {GUI_MODULES!r}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"{{name}} is not installed (blocked by test)")
        sys.meta_path.insert(0, Block())
        import fedmix_engine
        for info in pkgutil.walk_packages(fedmix_engine.__path__, "fedmix_engine."):
            importlib.import_module(info.name)
        from fedmix_engine.cli import main
        assert main(["make-sample", sys.argv[1], "--sites", "1", "--images", "2", "--eval-images", "1",
                     "--size", "32"]) == 0
        loaded = [m for m in sys.modules if m.split(".")[0] in BLOCKED]
        assert not loaded, loaded
        print("headless ok")
    """)
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "headless ok" in result.stdout
