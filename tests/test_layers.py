"""The module layering holds: the import-linter contracts of pyproject.toml (layers from the
ground floor up to the app and the CLI; no import circle) are kept by this checkout's
``diffmix_core``, and they do fail when an import runs back up."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lint_imports(root: Path, config: Path) -> subprocess.CompletedProcess:
    """`lint-imports` (this interpreter's) on the ``diffmix_core`` under ``root``, no cache written."""
    env = dict(os.environ, PYTHONPATH=str(root))   # this tree's package, not an installed one
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, "--no-cache", "--no-logo", str(config)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_layers_and_acyclic_contracts_are_kept():
    res = lint_imports(ROOT, ROOT / "pyproject.toml")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Contracts: 3 kept, 0 broken." in res.stdout, res.stdout


def test_an_import_running_back_up_breaks_the_contracts(tmp_path):
    """A ground-floor module importing the app closes a circle: the layers and the acyclic contracts break."""
    shutil.copytree(ROOT / "diffmix_core", tmp_path / "diffmix_core", ignore=shutil.ignore_patterns("__pycache__"))
    config = tmp_path / "diffmix_core" / "config.py"
    config.write_text(config.read_text(encoding="utf-8") + "\n\ndef _back_up():\n    from . import ui  # noqa\n",
                      encoding="utf-8")
    res = lint_imports(tmp_path, ROOT / "pyproject.toml")
    assert res.returncode == 1, res.stdout + res.stderr
    report = " ".join(res.stdout.split())   # the report wraps long contract names
    assert "up to the app and the CLI BROKEN" in report and "No import circle among the modules of any package " \
        "BROKEN" in report, res.stdout
    assert "diffmix_core.config -> diffmix_core.ui" in res.stdout, res.stdout


def test_every_subpackage_and_package_data_file_is_installed():
    """A non-editable install (a wheel, a Space's pip) carries every package and data file the code
    reads: each folder of diffmix_core with an __init__.py is in pyproject's package list."""
    import tomllib

    setup = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "diffmix_core").rglob("__init__.py")
             if "__pycache__" not in p.parts}
    assert found == set(setup["packages"]), found ^ set(setup["packages"])
    for pattern in setup["package-data"]["diffmix_core"]:
        assert list((ROOT / "diffmix_core").glob(pattern)), pattern


def test_scripts_import_only_names_the_library_has():
    """benchmarks/, docs/screenshot.py and app.py are not run by the default tests: every name they
    import from diffmix_core must still exist after a module moves (a moved name fails here, not in a
    user's benchmark run)."""
    import ast
    import importlib

    missing = []
    for script in [*(ROOT / "benchmarks").glob("*.py"), *(ROOT / "docs").glob("*.py"), ROOT / "app.py"]:
        for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("diffmix_core"):
                module = importlib.import_module(node.module)
                missing += [f"{script.name}: {node.module}.{a.name}" for a in node.names if not hasattr(module, a.name)
                            and importlib.util.find_spec(f"{node.module}.{a.name}") is None]
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("diffmix_core"):
                        importlib.import_module(alias.name)
    assert not missing, missing
