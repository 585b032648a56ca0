"""Shipping where users are: a ready-to-push Hugging Face Space folder, bundles published
as Hub model repos with a model card, and bundles pulled back with their hashes checked.

A bundle whose base model is a local folder beside it (``../base``, as the demo world)
travels with that base: the Space folder or Hub repo then holds ``bundle/`` and ``base/``
side by side, so ``adapter.json`` and its hashes are unchanged. A bundle whose base is a
Hub id travels alone (its files at the repo root).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .bundle import ADAPTER_JSON, Bundle, load_bundle
from .paths import DEMO_BUNDLE, PROJECT_ROOT
from .records import check_apart, clean_leftovers, md_fence, md_text, user_mode, write_text_atomic

HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")   # owner/name
SPACE_BUNDLES_ENV = "DIFFMIX_SPACE_BUNDLES"   # os.pathsep-separated Hub ids a Space fetches at start-up
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.onnx", "*.png", "*.jpg", "*.jpeg",
                "*.webp", "*.gif", "*.zip")
APP_REQUIREMENTS_SKIP = ("pytest", "playwright", "import-linter")   # test-only lines of requirements.txt


# --------------------------------------------------------------------------- what travels with a bundle
@dataclass(frozen=True)
class BundleFiles:
    """A local bundle and the folder that must be copied to keep it loadable."""

    bundle: Bundle
    root: Path          # the folder copied: the bundle itself, or its parent holding bundle + base
    bundle_rel: str     # the bundle's path inside ``root`` ("" = root itself)


def bundle_files(bundle: Bundle | str | os.PathLike) -> BundleFiles:
    """Which folder to copy so ``bundle`` still loads elsewhere: itself when its base is a Hub
    id; itself and its sibling base folder when the base is stored as ``../<name>``."""
    bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    stored = str(bundle.meta["base_model"]["model"])
    if not Path(bundle.base_model).exists():          # a Hub id: the bundle travels alone
        return BundleFiles(bundle, bundle.path, "")
    rel = Path(stored)
    if rel.is_absolute() or len(rel.parts) != 2 or rel.parts[0] != "..":
        raise ValueError(f"bundle {bundle.path} names its base model as the local folder {stored!r}; to ship it, "
                         "keep the base beside the bundle and save the bundle with base '../<folder>' (as the "
                         "demo world does), or use a base model from the Hub")
    return BundleFiles(bundle, bundle.path.parent, bundle.path.name)


def _copy_tree(src: Path, dst: Path, only: Sequence[str] | None = None) -> None:
    """Copy ``src`` to ``dst`` (following symlinks); ``only``: top-level names. For the package's
    own code; bundles are published file by file (:func:`published_files`)."""
    dst.mkdir(parents=True, exist_ok=True)
    for item in sorted(src.iterdir()):
        if item.name.startswith(".") or item.name == "__pycache__" or (only is not None and item.name not in only):
            continue
        if item.is_dir():
            shutil.copytree(item, dst / item.name, ignore=shutil.ignore_patterns("__pycache__", ".*"),
                            dirs_exist_ok=True)
        else:
            shutil.copy2(item, dst / item.name)


EXAMPLE_FILES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", "metadata.jsonl", "metadata.csv")   # published examples


def _refuse_leaving(root: Path, path: Path, what: str) -> None:
    """ValueError when ``path`` (below ``root``) leads outside ``root`` through a symlink:
    nothing outside a bundle (or its base) is ever published."""
    if not path.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"{what} {root}: {path.relative_to(root).as_posix()} is a symlink to {path.resolve()}, "
                         "outside it; refused (only files inside the bundle and its base are published). Replace "
                         "the link by the file itself")


def _inside(root: Path, rel: str, what: str) -> Path:
    """``root / rel``: a regular file inside ``root`` once symlinks are resolved."""
    path = root / rel
    _refuse_leaving(root, path, what)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {root}: {rel} is not a regular file")
    return path


def _walk_files(root: Path, top: Path, what: str) -> list[str]:
    """Files below ``top`` (hidden ones skipped) as paths relative to ``root``; a symlinked folder
    that leaves ``root`` is refused, one inside it skipped (its files are published where they are)."""
    rels = []
    for dirpath, dirnames, filenames in os.walk(top):
        here = Path(dirpath)
        for d in list(dirnames):
            if (here / d).is_symlink():
                _refuse_leaving(root, here / d, what)
            if d.startswith(".") or (here / d).is_symlink():
                dirnames.remove(d)
        rels += [(here / f).relative_to(root).as_posix() for f in sorted(filenames) if not f.startswith(".")]
    return sorted(rels)


def _example_files(bundle: Bundle) -> list[str]:
    """The bundle's example images (and their metadata file), relative to the bundle."""
    rel = bundle.meta.get("examples")
    if not rel or not (bundle.path / rel).is_dir():
        return []
    return [r for r in _walk_files(bundle.path, bundle.path / rel, "bundle") if r.lower().endswith(EXAMPLE_FILES)]


def _base_files(base: Path) -> list[str]:
    """A local diffusers base: model_index.json and the files of the components it names."""
    try:
        index = json.loads((base / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"base model {base} has no readable model_index.json ({err}); it is not a diffusers "
                         "folder that can be published") from None
    parts = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v and v[0]
             and (base / k).is_dir()]
    return ["model_index.json"] + [r for k in sorted(parts) for r in _walk_files(base, base / k, "base model")]


def published_files(files: BundleFiles) -> list[tuple[Path, str]]:
    """(file, path in the upload) of everything a Space or Hub repo gets from a bundle:
    adapter.json, the files it lists, its example images and, with a local ``../base``, that
    base's model_index.json and component files; each a regular file inside the bundle (or
    base) once symlinks are resolved. Anything else in the folders (notes, caches) stays."""
    bundle = files.bundle
    prefix = f"{files.bundle_rel}/" if files.bundle_rel else ""
    rels = dict.fromkeys([ADAPTER_JSON, *bundle.meta["files"], *_example_files(bundle)])
    out = [(_inside(bundle.path, rel, "bundle"), prefix + rel) for rel in rels]
    if files.bundle_rel:   # the base under the name adapter.json gives it (../<name>)
        name = Path(str(bundle.meta["base_model"]["model"])).parts[1]
        base = files.root / name
        out += [(_inside(base, rel, "base model"), f"{name}/{rel}") for rel in _base_files(base)]
    return out


def _copy_bundle(files: BundleFiles, dst: Path) -> Path:
    """Copy a bundle's published files (with its base when local) to ``dst`` as regular files;
    returns the copied bundle folder."""
    for src, rel in published_files(files):
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst / rel)
    return dst / files.bundle_rel if files.bundle_rel else dst


def unlisted_files(bundle: Bundle) -> list[str]:
    """Files in a bundle's folder that no hash covers and diffmix never publishes (not
    adapter.json, not listed in it, not an example image), and every symlink in it."""
    listed = {ADAPTER_JSON, *bundle.meta["files"], *_example_files(bundle)}
    extra = []
    for path in sorted(bundle.path.rglob("*")):
        rel = path.relative_to(bundle.path).as_posix()
        if path.is_symlink():
            extra.append(f"{rel} (symlink)")
        elif path.is_file() and rel not in listed:
            extra.append(rel)
    return extra


def find_bundle_in(folder: str | os.PathLike) -> Path:
    """The bundle inside a downloaded repo: ``adapter.json`` at its root, or in ``bundle/``."""
    folder = Path(folder)
    for candidate in (folder, folder / "bundle"):
        if (candidate / ADAPTER_JSON).is_file():
            return candidate
    raise FileNotFoundError(f"{folder} holds no adapter bundle ({ADAPTER_JSON} at its root or in bundle/)")


# --------------------------------------------------------------------------- pull
def pull_bundle(repo_id: str, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                local_only: bool = False) -> Bundle:
    """Download a bundle repo from the Hub (or take it from the Hub cache when offline) and
    load it, which checks every weight file against the sha256 in ``adapter.json``. With
    ``local_only``, only the Hub cache is used: nothing is downloaded (for a repo id read from a
    file rather than given by the user).

    Raises:
        FileNotFoundError: the repo cannot be had (offline and not cached, unknown, gated).
        ValueError: it is not a bundle, or a file differs from its recorded hash.
    """
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_only)
    except Exception as err:   # offline and not cached, unknown repo, gated, network
        raise FileNotFoundError(f"could not fetch bundle {repo_id} from the Hugging Face Hub "
                                f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}); "
                                "check the repo id and your connection, or download it and give the folder") from None
    try:
        root = _real_files(Path(folder))
        return _check_hub_base(load_bundle(find_bundle_in(root)), root)
    except ValueError as err:
        raise ValueError(f"bundle {repo_id} (downloaded to {folder}) failed its checks: {err} "
                         "Delete it from the Hub cache (`hf cache rm`) and pull again; if it fails again, the "
                         "repo itself is damaged") from None


def open_bundle(path_or_id: str | os.PathLike) -> Bundle:
    """The one way a user-given bundle is opened (CLI ``--bundle``, the app's bundle box, an
    experiment's ``bundle``): an existing folder (or its adapter.json) is loaded and verified
    (``bundle.load_bundle``); text that is no local path but a Hub repo id (``owner/name``) is
    pulled through the Hub cache (:func:`pull_bundle`) and verified the same way.

    Raises:
        ValueError: empty text, or a bundle that fails its checks.
        FileNotFoundError: neither an existing folder nor a Hub repo id, or the repo cannot be had.
    """
    text = str(path_or_id).strip()
    if not text:
        raise ValueError("give a bundle folder or a Hugging Face Hub repo id (owner/name)")
    path = Path(text).expanduser()
    if path.exists():
        return load_bundle(path)
    if not HUB_REPO_ID.match(text):
        raise FileNotFoundError(f"{text} is neither an existing folder nor a Hub repo id (owner/name)")
    return pull_bundle(text)   # downloaded (or from the Hub cache), every file's sha256 checked


def _check_hub_base(bundle: Bundle, root: Path) -> Bundle:
    """A downloaded bundle's base model is a Hub id, or a folder of the same repo (``../base``):
    never an absolute path nor one that leads out of the download (``../../x``) to a local folder."""
    stored = str(bundle.meta["base_model"]["model"])
    if Path(stored).is_absolute() or stored.startswith("~") or (
            stored.startswith(("./", "../")) and not Path(bundle.base_model).is_relative_to(root.resolve())):
        raise ValueError(f"its base model {stored!r} is a folder outside the downloaded repo; a Hub bundle's base "
                         "must be a Hub id or a folder in the same repo (../base).")
    return bundle


def _real_files(snapshot: Path) -> Path:
    """The Hub cache stores a snapshot as symlinks into ``blobs/``, which a bundle's own checks
    refuse (no file may leave the bundle through a symlink): copy it, as real files, beside the
    snapshots (``<repo cache>/diffmix-files/<revision>``), afresh on every pull so the hashes
    are checked against what is in the cache now."""
    repo_cache = snapshot.parent.parent
    for path in snapshot.rglob("*"):   # huggingface_hub's links point into blobs/; any other is refused
        if path.is_symlink() and not path.resolve().is_relative_to(repo_cache.resolve()):
            raise ValueError(f"Hub cache snapshot {snapshot}: {path.relative_to(snapshot).as_posix()} is a symlink "
                             f"to {path.resolve()}, outside the cache; refused. Delete the repo from the cache "
                             "(`hf cache rm`) and pull again")
    dest = repo_cache / "diffmix-files" / snapshot.name
    clean_leftovers(dest.parent, dest.name)   # of killed pulls
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(snapshot, tmp, symlinks=False)
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


def space_bundle_roots(entries: Sequence[str]) -> list[str]:
    """For a Space's app.py: each entry a folder (kept) or a Hub id (pulled, checked); an
    entry that cannot be had is reported on stderr and skipped so the app still starts."""
    roots = []
    for entry in entries:
        try:
            roots.append(str(Path(entry).resolve()) if Path(entry).exists() else str(pull_bundle(entry).path))
        except (FileNotFoundError, ValueError) as err:
            print(f"diffmix: bundle {entry} skipped: {err}", file=sys.stderr)
    return roots


# --------------------------------------------------------------------------- the Space folder
def _requirements_text() -> str:
    source = PROJECT_ROOT / "requirements.txt"
    if not source.is_file():
        raise FileNotFoundError(f"{source} is missing: run `diffmix space` from a diffmix checkout "
                                "(pip install -r requirements.txt -e .)")
    pins = [ln.split("#")[0].strip() for ln in source.read_text(encoding="utf-8").splitlines()]
    keep = [p for p in pins if p and not p.lower().startswith(APP_REQUIREMENTS_SKIP)]
    return ("# The app's dependencies, pinned as in diffmix's requirements.txt (written by `diffmix space`);\n"
            "# the Space installs this file, then runs app.py, which imports diffmix_core from this folder.\n"
            + "\n".join(keep) + "\n")


def _is_hub_id(text: str) -> bool:
    return bool(HUB_REPO_ID.match(text)) and not Path(text).exists()


def space_front_matter(*, title: str, models: Sequence[str], hardware: str) -> dict:
    """The Space's README front matter (the Hub's Spaces configuration keys)."""
    import gradio

    meta = {"title": title, "emoji": "🐦", "colorFrom": "indigo", "colorTo": "green", "sdk": "gradio",
            "sdk_version": gradio.__version__, "app_file": "app.py",
            "python_version": f"{sys.version_info.major}.{sys.version_info.minor}",
            "suggested_hardware": hardware, "short_description": "Diff-Mix inter-class image mixup (diffmix)",
            "tags": ["diffusion", "data-augmentation", "lora", "textual-inversion", "diffmix"]}
    if models:
        meta["models"] = list(models)
    return meta


SPACE_APP = '''"""diffmix on a Hugging Face Space (written by `diffmix space`)."""
import os

from diffmix_core.hub import SPACE_BUNDLES_ENV, space_bundle_roots

# Bundles shipped in this folder, then Hub ids fetched (and hash-checked) at start-up.
HERE = os.path.dirname(os.path.abspath(__file__))
SHIPPED = [os.path.join(HERE, p) for p in {shipped!r}]
HUB = [p for p in os.environ.get(SPACE_BUNDLES_ENV, {hub!r}).split(os.pathsep) if p]
roots = space_bundle_roots(SHIPPED + HUB)
os.environ["DIFFMIX_BUNDLES"] = os.pathsep.join(filter(None, [os.environ.get("DIFFMIX_BUNDLES", "")] + roots))

from diffmix_core.ui import build_demo  # noqa: E402  (reads DIFFMIX_BUNDLES)

demo = build_demo()
if __name__ == "__main__":
    demo.launch()
'''


def write_space(out: str | os.PathLike, bundles: Sequence[str] = (), *, title: str = "diffmix",
                hardware: str | None = None) -> Path:
    """Write a ready-to-push Space folder at ``out`` (must not exist or be empty).

    Args:
        bundles: local bundle folders (copied in, with a local ``../base``) and Hub repo ids
            (fetched by the Space at start-up); empty = the shipped demo world.
        hardware: ``suggested_hardware``; default cpu-basic for the demo world alone, else t4-small.
    """
    import yaml

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; give a new folder for the Space")
    local, hub = [], []
    for entry in bundles or [str(DEMO_BUNDLE)]:
        (hub if _is_hub_id(entry) else local).append(entry)
    copies = [bundle_files(b) for b in local]
    check_apart(out, [("the bundle folder", f.root) for f in copies])
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(out.parent, out.name)   # of killed runs; a live run's staging folder is kept
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-{os.getpid()}-", dir=out.parent))
    user_mode(stage)   # mkdtemp's 0700 is not the Space folder's mode
    try:
        shipped = []
        _copy_tree(PROJECT_ROOT / "diffmix_core", stage / "diffmix_core")
        for n, files in enumerate(copies):
            name = "demo" if not bundles else f"b{n}-{files.bundle.path.name}"
            copied = _copy_bundle(files, stage / "bundles" / name)
            shipped.append(copied.relative_to(stage).as_posix())
        (stage / "app.py").write_text(SPACE_APP.format(shipped=shipped, hub=os.pathsep.join(hub)), encoding="utf-8")
        (stage / "requirements.txt").write_text(_requirements_text(), encoding="utf-8")
        (stage / ".gitattributes").write_text(
            "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS), encoding="utf-8")
        models = [h for h in hub] + [f.bundle.base_model for f in copies if _is_hub_id(f.bundle.base_model)]
        suggested = hardware or ("cpu-basic" if not hub and all(f.bundle_rel for f in copies) else "t4-small")
        meta = space_front_matter(title=title, models=list(dict.fromkeys(models)), hardware=suggested)
        lines = [f"- {md_text(s)} (shipped)" for s in shipped] + [f"- {md_text(h)} (fetched from the Hub at start-up)"
                                                                   for h in hub]
        (stage / "README.md").write_text(
            f"---\n{yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)}---\n\n# {md_text(title)}\n\n"
            "Diff-Mix (Wang et al., CVPR 2024): translate an image of one class toward another at a chosen "
            "strength, score the results, curate them and export labelled training sets.\n\nBundles:\n\n"
            + "\n".join(lines) + "\n\n## Push this folder\n\n```bash\n"
            "hf repos create USER/NAME --type space --sdk gradio --exist-ok\n"
            "hf upload USER/NAME . . --type space\n```\n\n"
            "(`hf auth login` first.) With git instead: `git lfs install`, then commit this folder and push "
            "it to `https://huggingface.co/spaces/USER/NAME`; `.gitattributes` puts the weights and images in "
            "LFS. More Hub bundles: set the Space variable `" + SPACE_BUNDLES_ENV + "` (os.pathsep-separated ids).\n",
            encoding="utf-8")
        if out.exists():
            out.rmdir()
        os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out


# --------------------------------------------------------------------------- push: model card + upload folder
SAMPLES_PNG = "samples.png"


DIFFUSERS_SNIPPET = """\
import json, os

import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionImg2ImgPipeline
from PIL import Image
{fetch}
source_path, target_class = {source!r}, {target!r}
strength, steps, guidance, seed = {strength!r}, {steps!r}, {guidance!r}, 0

meta = json.load(open(os.path.join(bundle_dir, "adapter.json")))
base = meta["base_model"]["model"]                  # a Hub id, or a folder relative to the bundle
if base.startswith("."):
    base = os.path.join(bundle_dir, base)
pipe = StableDiffusionImg2ImgPipeline.from_pretrained(base, dtype=torch.float32, safety_checker=None,
                                                      requires_safety_checker=False)   # on a GPU: .to("cuda")
pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)   # DPM-Solver++
pipe.load_lora_weights(bundle_dir, weight_name="pytorch_lora_weights.safetensors")
pipe.load_textual_inversion([os.path.join(bundle_dir, f) for f in sorted(meta["files"]) if f.startswith("embeddings/")])

token = meta["tokens"][meta["classes"].index(target_class)]
prompt = " ".join(meta["template"].format(word=token, superclass=meta["superclass"]).split())
source = Image.open(source_path).convert("RGB")
size = meta["resolution"]                             # squashed to the model's size, then back
image = pipe(prompt, image=source.resize((size, size), Image.LANCZOS), strength=strength,
             num_inference_steps=steps, guidance_scale=guidance,
             generator=torch.Generator().manual_seed(seed)).images[0]
image = image.resize(source.size, Image.LANCZOS)
"""


def diffusers_snippet(bundle: Bundle, *, repo_id: str | None = None, sub: str = "", bundle_dir: str | None = None,
                      source: str = "source.png", source_class: str | None = None) -> str:
    """Python that loads ``bundle`` into a plain diffusers img2img pipeline and translates one
    image toward another class with the bundle's profile settings, as diffmix does."""
    profile = bundle.profile
    if repo_id is not None:
        fetch = (f"from huggingface_hub import snapshot_download\n\n"
                 f"bundle_dir = os.path.join(snapshot_download({repo_id!r}), {sub!r})")
    else:
        fetch = f"\nbundle_dir = {bundle_dir or str(bundle.path)!r}"
    source_class = source_class or bundle.classes[0]
    target = next((c for c in bundle.classes if c != source_class), source_class)
    return DIFFUSERS_SNIPPET.format(
        fetch=fetch, source=source, target=target,
        strength=profile.start_strength(bundle),
        steps=int(profile.num_inference_steps or 25),
        guidance=float(7.5 if profile.guidance_scale is None else profile.guidance_scale))


def model_card_text(bundle: Bundle, repo_id: str, *, sub: str = "", license: str = "other",
                    license_name: str | None = None, license_link: str | None = None,
                    samples: str | None = SAMPLES_PNG) -> str:
    """The Hub model card (metadata header + body) of a bundle published as ``repo_id``;
    ``sub`` is the bundle's folder in the repo ("" or "bundle")."""
    from huggingface_hub import ModelCard, ModelCardData

    meta = bundle.meta
    local_base = Path(bundle.base_model).exists()
    data = ModelCardData(
        license=license, license_name=license_name, license_link=license_link, library_name="diffusers",
        base_model=None if local_base else bundle.base_model, pipeline_tag="image-to-image",
        tags=["diffmix", "diff-mix", "lora", "textual-inversion", "stable-diffusion", "diffusers",
              "data-augmentation", bundle.superclass or "image-classification"])
    training = meta.get("training") or {}
    settings = ", ".join(f"{md_text(k)} = {md_text(v)}" for k, v in training.items()   # not the maker's local paths
                         if not isinstance(v, (dict, list)) and not (isinstance(v, str) and os.path.isabs(v)))
    profile = meta.get("profile") or {}
    reference = _reference_summary(bundle)
    classes = "\n".join(f"| {i} | {md_text(c)} | {md_text(t)} |" for i, (c, t) in enumerate(zip(bundle.classes,
                                                                                                 bundle.tokens)))
    base = (md_text(bundle.base_model) if not local_base else
            f"included in this repo ({md_text(Path(str(meta['base_model']['model'])).name + '/')})")
    revision = f" (revision {md_text(bundle.base_revision)})" if bundle.base_revision else ""
    pull = shlex.join(["diffmix", "pull", repo_id])
    translate = shlex.join(["diffmix", "translate", "--bundle", repo_id, "--image", "x.png", "--source-class",
                            bundle.classes[0], "--target", bundle.classes[1 % bundle.num_classes], "--strength",
                            "0.5", "0.7", "0.9", "--out", "out/"])
    prefix = f"{sub}/" if sub else ""
    body = f"""
# Diff-Mix adapter bundle: {bundle.num_classes} {md_text(bundle.superclass)} classes

Class tokens (textual inversion) and a UNet LoRA that personalise a Stable-Diffusion-architecture
pipeline to a dataset, for Diff-Mix inter-class image translation (Wang et al., CVPR 2024), made with
diffmix. Translating a real image of one class toward another at strength s gives
a training image with the soft label k((1 − s^γ) onehot(source) + s^γ onehot(target)).

- **Base model**: {base}{revision}
- **Prompt**: {md_text(bundle.template)} (word = the class token, superclass = {md_text(bundle.superclass)}), resolution {bundle.resolution} px
- **LoRA**: rank {(meta.get('lora') or {}).get('rank', '-')}, alpha {(meta.get('lora') or {}).get('alpha', '-')}
- **Training**: {meta.get('steps', '-')} steps; {settings or '-'}
- **Recommended strength**: {meta.get('recommended_strength', '-')}
- **Profile** (saved sweep settings): {md_text(json.dumps(profile)) if profile else '-'}
- **Reference classifier**: {reference}
- **Files**: {md_text(prefix + 'adapter.json')} (classes, tokens, settings, sha256 of every weight file),
  {md_text(prefix + 'pytorch_lora_weights.safetensors')} (diffusers LoRA), {md_text(prefix + 'embeddings/<token>.safetensors')}

## Classes

| index | class | token |
| --- | --- | --- |
{classes}
"""
    if samples:
        body += f"\n## Samples\n\nExample sources, then diff-mix translations at increasing strength:\n\n![samples]({samples})\n"
    body += f"""
## Use with diffmix

{md_fence(pull + "   # download and check every file's sha256" + chr(10) + translate, "bash")}
## Use with plain diffusers

{md_fence(diffusers_snippet(bundle, repo_id=repo_id, sub=sub), "python")}

This is diffmix's translation at the same seed, strength, steps and guidance: diffmix's engine
batches many such jobs through one denoising loop and gives the same image as this pipeline.
"""
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
    return str(card)


def _reference_summary(bundle: Bundle) -> str:
    rel = bundle.meta.get("reference_classifier")
    if not rel:
        return "none attached"
    try:
        ref = json.loads((bundle.path / rel).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return md_text(rel)
    acc = ref.get("val_accuracy")
    acc_text = f"validation accuracy {acc:.3f}" if isinstance(acc, (int, float)) else "validation accuracy unknown"
    return f"{md_text(ref.get('model_name', '?'))} ({acc_text}; {md_text(rel)})"


def build_push_folder(bundle: Bundle | str | os.PathLike, out: str | os.PathLike, repo_id: str, *,
                      license: str = "other", license_name: str | None = None, license_link: str | None = None,
                      samples: str | os.PathLike | None = None) -> Path:
    """The folder uploaded to the model repo: the bundle (with a local ``../base``, as
    ``bundle/`` + ``base/``), ``README.md`` (the model card) and ``samples.png``."""
    files = bundle_files(bundle)
    out = Path(out)
    check_apart(out, [("the bundle folder", files.root)])
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty")
    copied = _copy_bundle(files, out)
    load_bundle(copied)   # the copy loads and its hashes hold
    sub = files.bundle_rel
    if samples is not None:
        shutil.copyfile(samples, out / SAMPLES_PNG)
    write_text_atomic(out / "README.md", model_card_text(
        files.bundle, repo_id, sub=sub, license=license, license_name=license_name, license_link=license_link,
        samples=SAMPLES_PNG if samples is not None else None))
    return out


def push_bundle(folder: str | os.PathLike, repo_id: str, *, private: bool = False, api=None, token: str | None = None):
    """Create ``repo_id`` (a model repo) if needed and upload ``folder`` to it: the thin network
    call. ``api`` defaults to ``huggingface_hub.HfApi(token=token)``."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                             commit_message="Upload diffmix adapter bundle")
