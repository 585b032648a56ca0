"""The Hugging Face Space path: the build installs requirements.txt alone, then runs
`python app.py` in a checkout where the package is not installed. Both steps are
simulated here, and the app is driven over HTTP with gradio_client, offline."""
from __future__ import annotations

import fnmatch
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import bare_python, clean_env, run_app_and_sweep

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers
def tracked_copy(dst: Path) -> Path:
    """A clean checkout: the repository's tracked files (as they are in the working tree) copied to ``dst``."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: cannot tell which files a clean clone holds")
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, listed.decode().split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    return dst


# --------------------------------------------------------------------------- the Space build
@pytest.mark.slow   # resolves every pin against the package index (network, minutes)
def test_requirements_install_alone(tmp_path):
    """Step 1 of a Space build: `pip install -r requirements.txt` in a folder holding only that file
    (resolved with --dry-run against the package index; nothing is installed)."""
    folder = tmp_path / "space-build"
    folder.mkdir()
    shutil.copy(ROOT / "requirements.txt", folder / "requirements.txt")
    lines = [ln.split("#")[0].strip() for ln in (folder / "requirements.txt").read_text().splitlines()]
    assert not [ln for ln in lines if ln.startswith(("-e", "--editable", ".", "/"))], \
        "requirements.txt names a local path; a Space installs it before the repository is there"
    pip = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
           "--disable-pip-version-check"]
    probe = subprocess.run(pip + ["--no-deps", "pytest==9.2.0"], cwd=folder, capture_output=True, text=True,
                           timeout=300)
    if probe.returncode != 0:
        pytest.skip(f"pip cannot reach a package index here: {probe.stderr.strip().splitlines()[-1:]}")
    res = subprocess.run(pip + ["-r", "requirements.txt"], cwd=folder, capture_output=True, text=True, timeout=900)
    errors = [ln for ln in res.stderr.splitlines() if not ln.startswith("WARNING")]
    assert res.returncode == 0, "\n".join(errors[-20:])


def test_app_runs_from_a_checkout_without_the_package(tmp_path):
    """Step 2: `python app.py` in a clean checkout, with a Python that has the dependencies but
    not the package; the app imports diffmix_core from the checkout and serves a sweep."""
    checkout = tracked_copy(tmp_path / "checkout")
    python = bare_python(tmp_path)
    where = subprocess.run([str(python), "-c", "import diffmix_core; print(diffmix_core.__file__)"], cwd=checkout,
                           env=clean_env(), capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).resolve() == (checkout / "diffmix_core" / "__init__.py").resolve()
    out = run_app_and_sweep(checkout, python, tmp_path, checkout / "assets" / "demo" / "bundle")
    assert out["strengths"] == [0.5, 0.9], out["status"]   # one row per image that ran
    assert Path(out["grid"]).is_file()


# --------------------------------------------------------------------------- diffmix space
def test_space_folder_starts_offline(tmp_path):
    """`diffmix space --out DIR` (the demo world by default) writes a folder that starts the app
    with a Python lacking the package, lists the shipped bundle and serves a sweep."""
    import gradio
    import yaml

    from diffmix_core.cli import main

    space = tmp_path / "space"
    assert main(["space", "--out", str(space)]) == 0
    assert {p.name for p in space.iterdir()} >= {"README.md", "app.py", "requirements.txt", ".gitattributes",
                                                  "diffmix_core", "bundles"}
    front = yaml.safe_load((space / "README.md").read_text().split("---")[1])
    assert front["sdk"] == "gradio" and front["sdk_version"] == gradio.__version__ and front["app_file"] == "app.py"
    assert front["suggested_hardware"] == "cpu-basic" and front["python_version"] == f"{sys.version_info[0]}.{sys.version_info[1]}"
    readme = (space / "README.md").read_text()
    assert "hf repos create USER/NAME --type space --sdk gradio" in readme and "hf upload USER/NAME . . --type space" in readme
    reqs = (space / "requirements.txt").read_text()
    assert "gradio==" in reqs and "-e" not in reqs.split() and "pytest" not in reqs
    # Every weight file and image goes to LFS.
    patterns = [ln.split()[0] for ln in (space / ".gitattributes").read_text().splitlines() if "filter=lfs" in ln]
    binary = [p for p in space.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".png", ".jpg")]
    assert binary and all(any(fnmatch.fnmatch(p.name, pat) for pat in patterns) for p in binary)
    assert not list(space.rglob("__pycache__"))
    bundle = space / "bundles" / "demo" / "bundle"
    assert (space / "bundles" / "demo" / "base" / "model_index.json").is_file()
    out = run_app_and_sweep(space, bare_python(tmp_path), tmp_path, bundle)
    assert out["strengths"] == [0.5, 0.9] and Path(out["grid"]).is_file(), out["status"]


def test_space_refuses_a_bundle_that_cannot_travel(tmp_path, capsys):
    from diffmix_core.cli import main
    from diffmix_core.demo import placeholder_bundle

    bundle = placeholder_bundle(tmp_path / "ph")   # its base is an absolute local folder
    with pytest.raises(SystemExit) as exc:
        main(["space", "--out", str(tmp_path / "space"), "--bundle", str(bundle.path)])
    assert exc.value.code == 2 and "names its base model as the local folder" in capsys.readouterr().err
    assert not (tmp_path / "space").exists()
