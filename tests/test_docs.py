"""The documentation holds together: the README stays short and first-of-all a Space card, every
relative link in the README and docs/ reaches a file (and a heading) that exists, nothing cites
files that are not in the repository, the README's Python example runs, and no test file
imports another (shared helpers live in tests/helpers.py and tests/conftest.py)."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from helpers import ROOT

README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 300
TEST_COMMAND = ("python3 -m venv .venv && .venv/bin/pip install -r requirements.txt -e . "
                "&& .venv/bin/python -m pytest")
# Notes that live outside the repository; users do not have them. Spelled in pieces so this file
# does not cite them itself.
FOREIGN = ("../" + "shared", "DESIGN" + ".md", "REFERENCE" + ".md", "DEMO" + "-NOTES")
TEXT_SUFFIXES = {".py", ".md", ".toml", ".yaml", ".yml", ".json", ".txt", ".cfg", ".ini", ".sh", ""}
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def repository_text_files() -> list[Path]:
    """The repository's text files: tracked and new ones (git's view), else a walk of the checkout."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, check=True, timeout=60).stdout.decode()
        paths = [ROOT / p for p in filter(None, listed.split("\0"))]
    except (OSError, subprocess.SubprocessError):
        skip = {".git", ".venv", "outputs", "runs", "__pycache__", "node_modules"}
        paths = []
        for folder, dirs, files in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in skip]
            paths += [Path(folder, f) for f in files]
    return [p for p in paths if p.is_file() and p.suffix in TEXT_SUFFIXES and p.stat().st_size < 2_000_000]


def markdown_pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    heads = re.findall(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def relative_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)   # code is not a link
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def test_readme_is_short_and_opens_with_the_space_card():
    text = README.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines (at most {MAX_README_LINES}): " \
        "move reference material into a page under docs/ and link it"
    assert lines[0] == "---", "the README must open with the Space's YAML front matter"
    front = yaml.safe_load(text.split("---")[1])
    assert front["sdk"] == "gradio" and front["app_file"] == "app.py", front


def test_readme_test_command_is_the_one_ci_runs():
    assert TEST_COMMAND in README.read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    assert ci[-1] == TEST_COMMAND, ci[-1]


def test_nothing_cites_files_outside_the_repository():
    found = []
    for path in repository_text_files():
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            found += [f"{path.relative_to(ROOT)}:{n}: {name}" for name in FOREIGN if name in line]
    assert not found, "cite files in the repository (docs/method.md, docs/design.md ...):\n" + "\n".join(found)


def test_relative_links_in_readme_and_docs_reach_files_and_headings():
    broken = []
    for page in markdown_pages():
        for target in relative_links(page):
            rel, _, anchor = target.partition("#")
            dest = (page.parent / rel).resolve() if rel else page
            where = f"{page.relative_to(ROOT)} -> {target}"
            if not dest.exists():
                broken.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in heading_anchors(dest):
                broken.append(f"{where}: no such heading")
    assert not broken, "\n".join(broken)


def test_every_docs_page_is_linked_from_the_readme_or_another_page():
    linked = {(page.parent / t.partition("#")[0]).resolve() for page in markdown_pages() for t in relative_links(page)
              if t.partition("#")[0]}
    orphans = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not orphans, f"pages nobody links to: {orphans}"


def test_no_test_file_imports_another():
    offenders = [f"{p.name}:{n}: {line.strip()}" for p in sorted((ROOT / "tests").glob("*.py"))
                 for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
                 if re.match(r"\s*(from|import)\s+test_\w+", line)]
    assert not offenders, "move shared helpers to tests/helpers.py:\n" + "\n".join(offenders)


@pytest.mark.skipif(not (ROOT / "assets" / "demo" / "bundle" / "adapter.json").is_file(),
                    reason="the demo world is not here")
def test_readme_python_example_runs(monkeypatch, one_torch_thread):
    """The README's Python API block, as written, on the shipped demo bundle."""
    code = re.search(r"## Python API\n.*?```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert code, "the README has a Python API example"
    monkeypatch.chdir(ROOT)
    scope: dict = {}
    exec(compile(code.group(1), "README.md", "exec"), scope)   # noqa: S102 - the project's own README
    results = scope["results"]
    assert len(results) == 6 and all(r.image.size == (64, 64) for r in results)
    assert {r.record["target_class"] for r in results} == {"crow"}
