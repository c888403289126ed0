"""The engine is Qt-free and napari-free: a headless aggregator must not need a GUI stack; and only
the Flower adapter imports flwr, so nobody who does not use Flower needs it. Public functions say their
types."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import fedmix_engine
import napari_fedmix

GUI_MODULES = ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "superqt", "vispy",
               "napari_fedmix")
ENGINE = Path(fedmix_engine.__file__).parent
FLOWER_ADAPTER = ENGINE / "federation" / "flower"
NEEDS_FLWR = ("records", "strategy", "app", "final_model")  # the adapter's modules that import flwr; the rest must not


def test_json_text_is_parsed_only_through_parse_json() -> None:
    """``json.loads`` raises RecursionError (not ValueError) for text nested thousands deep, which each reader
    of a file or a peer's message met as a traceback (an HTTP 500 at the server); ``json_values.parse_json``
    turns it into the ValueError every reader catches. Static: a new reader cannot forget it."""
    offenders = []
    for path in [*ENGINE.rglob("*.py"), *Path(napari_fedmix.__file__).parent.rglob("*.py")]:
        if path == ENGINE / "json_values.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Attribute) and node.attr in ("loads", "load") and isinstance(node.value, ast.Name)
                    and node.value.id == "json"):
                offenders.append(f"{path.name}:{node.lineno} calls json.{node.attr}")
            if isinstance(node, ast.ImportFrom) and node.module == "json":
                offenders += [f"{path.name}:{node.lineno} imports {a.name} from json" for a in node.names
                              if a.name in ("loads", "load")]
    assert not offenders, offenders


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
            if not (path.parent == FLOWER_ADAPTER and path.stem in NEEDS_FLWR):
                offenders += [f"{path.relative_to(ENGINE)}:{node.lineno} imports {n}" for n in names
                              if n.split(".")[0] == "flwr"]
    assert not offenders, offenders


def test_engine_imports_and_runs_with_gui_modules_unavailable(tmp_path: Path) -> None:
    """Dynamic check: with every GUI module and flwr made unimportable, all engine modules import (the
    Flower adapter's flwr modules fail with an install hint) and the CLI works — as in a headless install
    without the [napari] and [flower] extras."""
    code = textwrap.dedent(f"""
        import importlib, importlib.abc, pkgutil, sys
        BLOCKED = {(*GUI_MODULES, "flwr")!r}
        NEEDS_FLWR = {tuple(f"fedmix_engine.federation.flower.{m}" for m in NEEDS_FLWR)!r}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"{{name}} is not installed (blocked by test)")
        sys.meta_path.insert(0, Block())
        import fedmix_engine
        for info in pkgutil.walk_packages(fedmix_engine.__path__, "fedmix_engine."):
            if info.name in NEEDS_FLWR:
                try:
                    importlib.import_module(info.name)
                except ImportError as exc:
                    assert "napari-fedmix[flower]" in str(exc), exc
                else:
                    raise AssertionError(info.name + " imported without flwr")
                continue
            importlib.import_module(info.name)
        from fedmix_engine.cli import main
        assert main(["make-sample", sys.argv[1], "--sites", "1", "--images", "2", "--eval-images", "1",
                     "--size", "32"]) == 0
        assert main(["flower-app", sys.argv[1] + "-flower", "--set", "num-server-rounds=2"]) == 0
        loaded = [m for m in sys.modules if m.split(".")[0] in BLOCKED]
        assert not loaded, loaded
        print("headless ok")
    """)
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "headless ok" in result.stdout


def _public_functions(tree: ast.Module) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    """A module's functions and its classes' methods whose names do not start with _ (not nested helpers)."""
    functions = ast.FunctionDef | ast.AsyncFunctionDef
    found = [node for node in tree.body if isinstance(node, functions)]
    for cls in (node for node in tree.body if isinstance(node, ast.ClassDef)):
        found += [node for node in cls.body if isinstance(node, functions)]
    return [f for f in found if not f.name.startswith("_")]


def test_public_functions_have_type_hints() -> None:
    """Every parameter (but self and cls) and every return of a public function or method is annotated, in
    the engine and the plugin: what a caller may pass is read from the signature."""
    missing = []
    for package in (ENGINE, Path(napari_fedmix.__file__).parent):
        for path in sorted(package.rglob("*.py")):
            for function in _public_functions(ast.parse(path.read_text(), str(path))):
                arguments = [*function.args.posonlyargs, *function.args.args, *function.args.kwonlyargs,
                             *filter(None, (function.args.vararg, function.args.kwarg))]
                bare = [a.arg for a in arguments if a.annotation is None and a.arg not in ("self", "cls")]
                if bare or function.returns is None:
                    where = f"{path.relative_to(package.parent)}:{function.lineno} {function.name}"
                    missing.append(f"{where}: " + (f"parameters {bare}" if bare else "") + (
                        f"{' and ' if bare else ''}return" if function.returns is None else ""))
    assert not missing, missing


def test_the_admins_reading_commands_load_no_torch(tmp_path: Path) -> None:
    """``status``, ``token add`` and ``token list`` only read the state directory (and write a token), yet
    imported torch through the server's state module: 1.4 s of their 1.3-2 s, each time an admin looked
    (``watch fedmix-engine status`` kept a core busy). The settings (``server_config``), the state's records
    (``status``) and the site weights (``fedmix.weights``) are now modules without torch."""
    from federation_helpers import fake_update
    from fedmix_engine.federation.server_config import ServerConfig
    from fedmix_engine.federation.state import ServerState
    from fedmix_engine.model import ModelConfig

    state_dir = tmp_path / "state"
    state = ServerState(state_dir, ServerConfig(sites=2, min_sites=2, model=ModelConfig(base_width=4)))
    body = tmp_path / "update.safetensors"
    body.write_bytes(fake_update(state.global_pair(0), seed=1))
    assert state.accept_upload("site-b", 1, body).status == 200
    code = textwrap.dedent("""
        import sys
        from fedmix_engine.cli import main
        state = sys.argv[1]
        assert main(["token", "add", "site-a", "--state", state]) == 0
        assert main(["token", "list", "--state", state]) == 0
        assert main(["status", "--state", state]) == 0
        assert main(["status", "--state", state, "--json"]) == 0
        assert main(["status", "--state", state, "--verify"]) == 0
        print("torch imported:", "torch" in sys.modules)
    """)
    result = subprocess.run([sys.executable, "-c", code, str(state_dir)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "uploaded: site-b" in result.stdout and '"uploaded": [' in result.stdout, result.stdout
    assert "\nmodels: 1 intact\n" in result.stdout, result.stdout
    assert result.stdout.endswith("torch imported: False\n"), result.stdout
