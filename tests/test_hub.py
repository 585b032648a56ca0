"""Bundles on the Hub: the model card and upload folder (built and checked offline), the
thin upload call (a fake HfApi: the network call itself is not exercised here), and
pulling / loading by repo id through huggingface_hub's real cache code path, offline."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from diffmix_core.cli import main
from helpers import bare_python, make_generated, run_app_and_sweep

ROOT = Path(__file__).resolve().parents[1]
DEMO_BUNDLE = ROOT / "assets" / "demo" / "bundle"
REPO = "someone/demo-birds"
REV = "0123456789abcdef0123456789abcdef01234567"

pytestmark = pytest.mark.skipif(not (DEMO_BUNDLE / "adapter.json").is_file(), reason="the demo world is not here")


@pytest.fixture
def samples(tmp_path) -> Path:
    path = tmp_path / "grid.png"
    Image.new("RGB", (40, 20), (200, 120, 40)).save(path)
    return path


def build(tmp_path: Path, samples: Path, *extra: str) -> Path:
    folder = tmp_path / "upload"
    assert main(["push", "--bundle", str(DEMO_BUNDLE), "--repo", REPO, "--license", "gpl-2.0",
                 "--samples", str(samples), "--folder", str(folder), *extra]) == 0
    return folder


def hub_cache(folder: Path, cache: Path, repo: str = REPO) -> Path:
    """Put ``folder`` in a Hub cache as huggingface_hub lays it out: blobs by hash, a snapshot of
    symlinks, refs/main naming the revision."""
    owner, name = repo.split("/")
    repo_dir = cache / f"models--{owner}--{name}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(REV)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo_dir / "snapshots" / REV / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    return repo_dir


def test_push_folder_and_model_card(tmp_path, samples):
    from huggingface_hub import ModelCard

    from diffmix_core.bundle import load_bundle

    folder = build(tmp_path, samples, "--dry-run")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "base", "bundle", "samples.png"]
    bundle = load_bundle(folder / "bundle")          # adapter.json and every hash unchanged
    assert bundle.meta == load_bundle(DEMO_BUNDLE).meta
    card = ModelCard.load(folder / "README.md")
    assert card.data.license == "gpl-2.0" and card.data.library_name == "diffusers"
    assert "diffmix" in card.data.tags and card.data.pipeline_tag == "image-to-image"
    text = card.text
    for needle in ("| 4 | owl | &lt;class\\_4&gt; |", "1500 steps", "Recommended strength**: 0.9", "validation accuracy 0.990",
                   "![samples](samples.png)", "diffmix pull someone/demo-birds", "load_lora_weights",
                   "load_textual_inversion", '"strategy": "diff-mix"', "included in this repo (base/)"):
        assert needle in text, needle
    with pytest.raises(SystemExit):
        build(tmp_path, samples, "--dry-run")       # never over an existing folder


def test_push_is_create_repo_then_upload_folder(tmp_path, samples, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))

        def upload_folder(self, **kw):
            files = sorted(p.relative_to(kw["folder_path"]).as_posix() for p in Path(kw["folder_path"]).rglob("*")
                           if p.is_file())
            calls.append(("upload_folder", kw["repo_id"], kw["repo_type"], files))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert main(["push", "--bundle", str(DEMO_BUNDLE), "--repo", REPO, "--private", "--samples", str(samples)]) == 0
    assert calls[1] == ("create_repo", REPO, {"repo_type": "model", "private": True, "exist_ok": True})
    kind, repo, repo_type, files = calls[2]
    assert (kind, repo, repo_type) == ("upload_folder", REPO, "model")
    assert {"README.md", "samples.png", "bundle/adapter.json", "bundle/pytorch_lora_weights.safetensors",
            "base/model_index.json"} <= set(files)


def test_pull_and_load_by_id_offline_through_the_hub_cache(tmp_path, samples, monkeypatch):
    from huggingface_hub import constants

    from diffmix_core.hub import open_bundle

    cache = tmp_path / "hub"
    repo_dir = hub_cache(build(tmp_path, samples, "--dry-run"), cache)
    snapshot = repo_dir / "snapshots" / REV
    env = {k: v for k, v in os.environ.items() if k != "HF_HOME"}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-m", "diffmix_core", "pull", REPO], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    files = repo_dir / "diffmix-files" / REV   # the snapshot as real files (the cache holds symlinks)
    assert "every file adapter.json lists matches its sha256" in res.stdout and str(files / "bundle") in res.stdout
    # Loading by id (the CLI's --bundle, the app's bundle box) takes the same path.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    bundle = open_bundle(REPO)
    assert bundle.path == (files / "bundle").resolve() and bundle.classes[4] == "owl"
    assert open_bundle(REPO).path == bundle.path
    # A tampered download is refused, with what to do.
    blob = (snapshot / "bundle" / "pytorch_lora_weights.safetensors").resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.write_bytes(bytes(data))
    res = subprocess.run([sys.executable, "-m", "diffmix_core", "pull", REPO], env=env, capture_output=True, text=True)
    assert res.returncode == 2 and "changed or corrupted" in res.stderr and "hf cache rm" in res.stderr, res.stderr
    with pytest.raises(ValueError, match="failed its checks"):
        open_bundle(REPO)
    with pytest.raises(FileNotFoundError, match="could not fetch bundle someone/other"):
        open_bundle("someone/other")


def test_space_with_a_hub_bundle_fetches_it_at_start_up(tmp_path, samples):
    """`diffmix space --bundle USER/NAME`: the Space ships no weights; its app.py pulls the bundle
    (here from a Hub cache, offline), checks it, lists it and sweeps it."""
    import yaml

    cache = tmp_path / "hub"
    snapshot = hub_cache(build(tmp_path, samples, "--dry-run"), cache) / "snapshots" / REV
    space = tmp_path / "space"
    assert main(["space", "--out", str(space), "--bundle", REPO]) == 0
    assert not (space / "bundles").exists()
    front = yaml.safe_load((space / "README.md").read_text().split("---")[1])
    assert front["models"] == [REPO] and front["suggested_hardware"] == "t4-small"
    files = snapshot.parent.parent / "diffmix-files" / REV
    out = run_app_and_sweep(space, bare_python(tmp_path), tmp_path, (files / "bundle").resolve(),
                            HF_HUB_CACHE=str(cache))
    assert out["strengths"] == [0.5, 0.9] and Path(out["grid"]).is_file(), out["status"]


# --------------------------------------------------------------------------- issue 25: nothing leaves a bundle
def _world_copy(tmp_path: Path) -> Path:
    """The demo bundle and its ../base, copied, so a test may plant files in them."""
    world = tmp_path / "world"
    shutil.copytree(DEMO_BUNDLE, world / "bundle")
    shutil.copytree(DEMO_BUNDLE.parent / "base", world / "base")
    return world / "bundle"


def _files(folder: Path) -> dict[str, bool]:
    """{relative path: is a regular file (not a link)} of everything in ``folder``."""
    return {p.relative_to(folder).as_posix(): p.is_file() and not p.is_symlink() for p in folder.rglob("*")
            if not p.is_dir()}


def test_push_and_space_publish_only_the_bundles_own_listed_files(tmp_path, samples, capsys):
    import json

    secret = tmp_path / "secret.txt"
    secret.write_text("TOKEN=hunter2")
    bundle = _world_copy(tmp_path)
    (bundle / "leak.txt").symlink_to(secret)                    # unlisted links and files: never published
    (bundle / "notes").mkdir()
    (bundle / "notes" / "plan.txt").write_text("private notes")
    (bundle.parent / "base" / "leak.txt").symlink_to(secret)
    (bundle.parent / "base" / "notes.md").write_text("private")
    upload = tmp_path / "upload"
    assert main(["push", "--bundle", str(bundle), "--repo", REPO, "--samples", str(samples), "--folder", str(upload),
                 "--dry-run"]) == 0
    space = tmp_path / "space"
    assert main(["space", "--out", str(space), "--bundle", str(bundle)]) == 0
    meta = json.loads((bundle / "adapter.json").read_text())
    for folder, root in ((upload, upload), (space, space / "bundles" / f"b0-{bundle.name}")):
        files = _files(root)
        assert all(files.values()), [k for k, v in files.items() if not v]   # regular files only
        published = {k for k in files if k.startswith("bundle/")}
        assert published >= {f"bundle/{rel}" for rel in meta["files"]} | {"bundle/adapter.json"}
        assert not [k for k in files if "leak" in k or "notes" in k], files
        assert all("hunter2" not in p.read_text(errors="ignore") for p in folder.rglob("*") if p.is_file()
                   and p.stat().st_size < 100_000)
    # a symlink out of the bundle, out of its base, or out of an example, among what is published: refused
    planted = [bundle / "embeddings" / sorted(os.listdir(bundle / "embeddings"))[0],
               bundle.parent / "base" / "unet" / "config.json",
               next((bundle / "examples").rglob("*.png"))]
    for n, victim in enumerate(planted):
        keep = victim.read_bytes()
        victim.unlink()
        victim.symlink_to(secret)
        for cmd in (["push", "--bundle", str(bundle), "--repo", REPO, "--samples", str(samples), "--folder",
                     str(tmp_path / f"up{n}"), "--dry-run"], ["space", "--out", str(tmp_path / f"sp{n}"),
                                                              "--bundle", str(bundle)]):
            with pytest.raises(SystemExit):
                main(cmd)
            err = capsys.readouterr().err
            assert ("outside" in err or "leaves the bundle" in err) and "Traceback" not in err, err
            assert not (tmp_path / f"sp{n}").exists()
        victim.unlink()
        victim.write_bytes(keep)
    # the upload and Space folders never sit inside the bundle they copy
    for cmd in (["push", "--bundle", str(bundle), "--repo", REPO, "--samples", str(samples), "--folder",
                 str(bundle / "up"), "--dry-run"], ["space", "--out", str(bundle.parent / "sp"), "--bundle", str(bundle)]):
        with pytest.raises(SystemExit):
            main(cmd)
        assert "bundle folder" in capsys.readouterr().err


def _pull(cache: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HF_HOME"}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "diffmix_core", "pull", REPO], env=env, capture_output=True,
                          text=True)


def test_pull_refuses_links_out_of_the_cache_and_names_unlisted_files(tmp_path, samples):
    import json

    secret = tmp_path / "secret.txt"
    secret.write_text("TOKEN=hunter2")
    upload = build(tmp_path, samples, "--dry-run")
    (upload / "bundle" / "notes").mkdir()
    (upload / "bundle" / "notes" / "todo.txt").write_text("unlisted")
    snapshot = hub_cache(upload, tmp_path / "hub") / "snapshots" / REV
    res = _pull(tmp_path / "hub")
    assert res.returncode == 0, res.stderr
    assert "not covered by adapter.json" in res.stdout and "notes/todo.txt" in res.stdout
    (snapshot / "bundle" / "leak.txt").symlink_to(secret)
    res = _pull(tmp_path / "hub")
    assert res.returncode == 2 and "outside the cache" in res.stderr and "every file" not in res.stdout, res.stderr
    # a Hub bundle's base must be a Hub id or a folder of the same repo, never a local folder outside
    for n, base in enumerate(("../../x", "../../../../../../tmp", "/usr")):
        up = tmp_path / f"up{n}"
        shutil.copytree(upload, up)
        meta = json.loads((up / "bundle" / "adapter.json").read_text())
        meta["base_model"]["model"] = base
        (up / "bundle" / "adapter.json").write_text(json.dumps(meta))
        hub_cache(up, tmp_path / f"hub{n}")
        res = _pull(tmp_path / f"hub{n}")
        assert res.returncode == 2 and "outside the downloaded repo" in res.stderr, (base, res.stdout, res.stderr)


def test_score_never_downloads_the_bundle_its_records_name(tmp_path, samples):
    """`diffmix score --input F`: a Hub id in F's records is used from the Hub cache when there,
    and never fetched: a recording stand-in for the Hub sees no request."""
    import http.server
    import threading

    from diffmix_core.records import write_jsonl_atomic

    requests = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self):   # noqa: N802 (http.server's name)
            requests.append(self.path)
            self.send_response(404)
            self.end_headers()

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    gen = make_generated(tmp_path / "gen")
    rows = [json.loads(line) for line in (gen / "records.jsonl").read_text().splitlines()]
    write_jsonl_atomic(gen / "records.jsonl", [dict(r, bundle=REPO, bundle_hash="") for r in rows])
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HOME", "HF_HUB_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}", PYTHONPATH=str(ROOT))
    try:
        for cache, found in ((tmp_path / "empty", False), (tmp_path / "hub", True)):
            if found:
                hub_cache(build(tmp_path, samples, "--dry-run"), cache)
            res = subprocess.run([sys.executable, "-m", "diffmix_core", "score", "--input", str(gen), "--clip-model",
                                  "none", "--quiet"], env=dict(env, HF_HUB_CACHE=str(cache)), capture_output=True,
                                 text=True, timeout=300)
            assert res.returncode == 0, res.stderr
            assert ("(named in the records)" in res.stdout) == found, res.stdout
            assert requests == [], requests
    finally:
        server.shutdown()


HOSTILE = ["crow$(touch PWNED)", "duck`touch PWNED2`\n| x | y |", "<img src=x onerror=alert(1)>",
           "[click](javascript:alert(1))", "it's \"quoted\" & *bold*"]


def _rendered(markdown: str):
    """The HTML the Hub would show (CommonMark + GFM tables), and its table rows."""
    from markdown_it import MarkdownIt

    body = markdown.split("\n---\n", 1)[1] if markdown.startswith("---\n") else markdown
    md = MarkdownIt("commonmark").enable("table")
    rows, row = [], None
    for t in md.parse(body):
        if t.type == "tr_open":
            row = []
        elif t.type == "inline" and row is not None:
            row.append(t.content)
        elif t.type == "tr_close":
            rows.append(row)
            row = None
    return md.render(body), rows


def _assert_inert(html: str) -> None:
    assert "<img" not in html and "<b>" not in html and 'href="javascript:' not in html, html


def test_cards_quote_shell_arguments_and_escape_markdown_and_html(tmp_path, monkeypatch):
    """A bundle whose class names are shell and Markdown/HTML payloads: the model card's bash
    block, pasted into a shell, passes each name as one argument and runs nothing else; the
    model card's and the dataset card's class tables keep one row per class and render inert."""
    import torch

    from diffmix_core.bundle import save_bundle
    from diffmix_core.export import ExportWriter
    from diffmix_core.labels import soft_label

    tokens = [f"<h{i}>" for i in range(len(HOSTILE))]
    bundle = tmp_path / "hostile"
    save_bundle(bundle, classes=HOSTILE, tokens=tokens, embeddings={t: torch.randn(8) for t in tokens},
                lora_state_dict=None, base_model="someone/base", superclass="bird <b>x</b>", resolution=32)
    folder = tmp_path / "upload"
    assert main(["push", "--bundle", str(bundle), "--repo", REPO, "--no-samples", "--folder", str(folder),
                 "--dry-run"]) == 0
    card = (folder / "README.md").read_text()
    # paste the bash block into a shell, with a `diffmix` that prints its arguments
    block = card.split("```bash\n", 1)[1].split("\n```", 1)[0]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "diffmix").write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    (bin_dir / "diffmix").chmod(0o755)
    run = tmp_path / "shell"
    run.mkdir()
    res = subprocess.run(["bash", "-c", block], cwd=run, capture_output=True, text=True,
                         env=dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}"))
    assert res.returncode == 0, res.stderr
    calls = [json.loads(line) for line in res.stdout.splitlines()]
    assert calls[0] == ["pull", REPO] and calls[1][calls[1].index("--source-class") + 1] == HOSTILE[0]
    assert calls[1][calls[1].index("--target") + 1] == HOSTILE[1]
    assert list(run.iterdir()) == []   # nothing ran but diffmix
    html, rows = _rendered(card)
    _assert_inert(html)
    classes = [r for r in rows if len(r) == 3 and r[0].isdigit()]
    assert [int(r[0]) for r in classes] == list(range(len(HOSTILE))), rows
    # the dataset card of an export with the same class names
    out = tmp_path / "export"
    with ExportWriter(out, ("imagefolder",), classes=HOSTILE) as w:
        for n in range(3):
            src, tgt = HOSTILE[n], HOSTILE[n + 1]
            w.add(Image.new("RGB", (8, 8), (n, 0, 0)), {"id": f"r{n}", "source_class": src, "target_class": tgt,
                                                        "strength": 0.5, "soft_label": soft_label(src, tgt, 0.5)},
                  number=n)
    html, rows = _rendered((out / "imagefolder" / "README.md").read_text())
    _assert_inert(html)
    order = [r for r in rows if len(r) == 2 and r[0].isdigit()]
    assert [int(r[0]) for r in order] == list(range(len(HOSTILE))), rows
