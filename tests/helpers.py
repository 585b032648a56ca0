"""Helpers shared by the test files: `from helpers import ...` (a test file never imports another
test file; tests/test_docs.py checks it). Fixtures shared by many files are in conftest.py."""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import socket
import struct
import subprocess
import sys
import sysconfig
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]

# The tiny classifier's CLI options (timm test_resnet, no pretrained weights): `diffmix train` in seconds.
FAST_CLASSIFIER = ["--model", "test_resnet", "--pretrained", "none", "--resolution", "32", "--batch-size", "8",
                   "--lr", "0.05", "--quiet"]


# =========================================================================== images
def shape_image(i: int, size: int = 16) -> Image.Image:
    """A flat random colour with a square of another in the middle (seeded by ``i``)."""
    rng = np.random.default_rng(i)
    a = np.zeros((size, size, 3), np.uint8) + rng.integers(0, 256, 3, dtype=np.uint8)
    a[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = rng.integers(0, 256, 3, dtype=np.uint8)
    return Image.fromarray(a)


def make_imagefolder(root, classes=("Black_footed_Albatross", "cardinal", "owl"), per_class=6, start=0):
    """An ImageFolder dataset of :func:`shape_image` PNGs; ``per_class`` a count or one count per class."""
    for c, name in enumerate(classes):
        n = per_class[c] if isinstance(per_class, (list, tuple)) else per_class
        (root / name).mkdir(parents=True, exist_ok=True)
        for j in range(n):
            shape_image(start + 100 * c + j).save(root / name / f"img_{j:03d}.png")
    return root


def disc(colour, seed: int, size: int = 32, spread: int = 12) -> Image.Image:
    """A ``colour`` disc half the side wide, at a random place within ``spread`` px of the top left
    corner, on a light random background (a class a tiny classifier or CLIP can learn)."""
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(150, 255, 3)))
    x, y = (int(v) for v in rng.integers(0, spread, 2))
    ImageDraw.Draw(im).ellipse([x, y, x + size // 2, y + size // 2], fill=colour)
    return im


def smooth_image(seed: int, size=(32, 32), with_disc: bool = False) -> Image.Image:
    """A smooth random colour image (not flat, not pure noise); ``with_disc``: plus a random-colour disc."""
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    if with_disc:
        ImageDraw.Draw(im).ellipse([4, 4, 20, 24], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return im


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims width x height (a decompression bomb's shape)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
                     + chunk(b"IEND", b""))
    return path


def gradient(w=24, h=16) -> np.ndarray:
    """(h, w, 3) uint8: red rises left to right, green top to bottom."""
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    return np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                           np.full((h, w, 1), 90, np.float32)], axis=2).astype(np.uint8)


def make_good_cases(folder):
    """name -> (path, expected RGB size). Each must decode to RGB."""
    rgb = Image.fromarray(gradient())
    cases = {}

    def save(name, im, **kw):
        p = folder / name
        im.save(p, **kw)
        return p

    cases["grayscale"] = (save("gray.png", rgb.convert("L")), (24, 16))
    cases["palette"] = (save("palette.png", rgb.convert("P", palette=Image.ADAPTIVE)), (24, 16))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 0))
    cases["transparent"] = (save("rgba.png", rgba), (24, 16))
    cases["cmyk"] = (save("cmyk.jpg", rgb.convert("CMYK")), (24, 16))
    cases["png16"] = (save("deep.png", Image.fromarray((gradient()[..., 0].astype(np.uint16) * 257))), (24, 16))
    cases["float_tiff"] = (save("float.tif", Image.fromarray(gradient()[..., 0].astype(np.float32) / 255)), (24, 16))
    exif = Image.Exif()
    exif[0x0112] = 6   # orientation: rotate 90° clockwise to display
    cases["exif_rotated"] = (save("exif.jpg", rgb, exif=exif), (16, 24))
    frames = [Image.new("RGB", (24, 16), c) for c in ((255, 0, 0), (0, 255, 0))]
    cases["animated_gif"] = (save("anim.gif", frames[0], save_all=True, append_images=frames[1:]), (24, 16))
    cases["animated_webp"] = (save("anim.webp", frames[0], save_all=True, append_images=frames[1:], lossless=True),
                              (24, 16))
    cases["one_pixel"] = (save("dot.png", Image.new("RGB", (1, 1), (9, 9, 9))), (1, 1))
    cases["thin"] = (save("thin.png", Image.new("RGB", (300, 1), (9, 90, 9))), (300, 1))
    return cases


def make_bad_cases(folder):
    """name -> (path, message fragment)."""
    buf = io.BytesIO()
    Image.fromarray(gradient(64, 64)).save(buf, format="PNG")
    (folder / "trunc.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
    (folder / "trunc.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not an image")
    png_header_only(folder / "bomb.png", 50_000, 50_000)
    return {
        "truncated_png": (folder / "trunc.png", "truncated"),
        "truncated_jpeg": (folder / "trunc.jpg", "truncated"),
        "zero_bytes": (folder / "empty.png", "empty file"),
        "not_an_image": (folder / "text.jpg", "not an image"),
        "bomb": (folder / "bomb.png", "exceeds the limit"),
        "missing": (folder / "nope.png", "does not exist"),
    }


def make_generated(folder: Path, names=("owl", "duck", "crow"), n: int = 4) -> Path:
    """A folder as `diffmix translate` leaves it: PNGs with their records + records.jsonl."""
    from diffmix_core.labels import soft_label
    from diffmix_core.records import save_png, write_jsonl_atomic

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        src, tgt = names[i % len(names)], names[(i + 1) % len(names)]
        rec = {"id": f"r{i}", "file_name": f"img-{i}.png", "plan_idx": i, "source_id": f"s{i}",
               "source_class": src, "target_class": tgt, "strength": 0.5, "strength_run": 0.5, "seed": i,
               "soft_label": soft_label(src, tgt, 0.5), "strategy": "diff-mix"}
        save_png(Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)), folder / rec["file_name"], rec)
        rows.append(rec)
    write_jsonl_atomic(folder / "records.jsonl", rows)
    return folder


# =========================================================================== folders
def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder``: relative path -> bytes (to prove a folder was left as it was)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def tree_digest(folder: Path) -> dict[str, str]:
    """As :func:`tree`, with each file's sha256 instead of its bytes (for large folders)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# =========================================================================== bundles and weights
CLASSES = ["black footed albatross", "sparrow", "tern"]   # the tiny test bundle's classes ...
TOKENS = ["<class_0>", "<class_1>", "<class_2>"]          # ... and their tokens
WIDTH = 32  # the tiny pipeline's text hidden size
TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def add_random_lora(unet, r: int = 4, alpha: float = 4, seed: int = 1) -> None:
    """A peft LoRA whose B matrices are non-zero, so it changes the UNet's output."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def random_vectors(width: int = WIDTH, seed: int = 3) -> dict[str, torch.Tensor]:
    """One random token vector per test token."""
    g = torch.Generator().manual_seed(seed)
    return {t: torch.randn(width, generator=g) for t in TOKENS}


def tiny_bundle(tmp_path: Path, tiny_model_dir, name="bundle", lora=True) -> Path:
    """A bundle of the test classes on the tiny pipeline: random tokens and (``lora``) a random rank-2 LoRA."""
    from diffmix_core import weights
    from diffmix_core.bundle import save_bundle
    from diffmix_core.models import load_pipeline

    sd = None
    if lora:
        pipe = load_pipeline(tiny_model_dir, device="cpu", dtype="fp32")
        add_random_lora(pipe.unet, r=2, alpha=2)
        sd = weights.lora_state_dict_from_unet(pipe.unet)
    save_bundle(tmp_path / name, classes=CLASSES, tokens=TOKENS, embeddings=random_vectors(), lora_state_dict=sd,
                base_model=str(tiny_model_dir), superclass="bird", resolution=32)
    return tmp_path / name


def bundle_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a bundle folder: its LoRA and its token embeddings."""
    out = dict(load_file(folder / "pytorch_lora_weights.safetensors"))
    for f in sorted((folder / "embeddings").iterdir()):
        out.update(load_file(f))
    return out


def to_old_keys(lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusers keys -> the authors' attention-processor keys
    (``...attn1.processor.to_q_lora.down.weight``)."""
    out = {}
    for k, v in lora.items():
        module, part = k.removeprefix("unet.").split(".lora.")
        parent, leaf = module.replace(".to_out.0", ".to_out").rsplit(".", 1)
        out[f"{parent}.processor.{leaf}_lora.{part}"] = v.clone()
    return out


def authors_checkpoint(folder: Path, lora: dict[str, torch.Tensor], width: int = WIDTH) -> Path:
    """The authors' learned_embeds file; name2placeholder deliberately out of order."""
    g = torch.Generator().manual_seed(5)
    n2p = {"Tern": "<class_10>", "Black_footed_Albatross": "<class_0>", "Sparrow": "<class_2>"}
    embeds = {p: torch.randn(width, generator=g) for p in n2p.values()}
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"learned_embeds_dict": embeds, "name2placeholder": n2p,
                "placeholder2name": {p: n for n, p in n2p.items()}}, folder / "learned_embeds-steps-last.bin")
    save_file(lora, folder / "pytorch_lora_weights.safetensors")
    return folder / "learned_embeds-steps-last.bin"


class Payload:
    """Unpickling this creates a file: the kind of code a checkpoint or weight file must never run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


# =========================================================================== the app
# Every variable the app reads that a test sets: app_environment clears them all, then restores them.
APP_ENV = ("DIFFMIX_BUNDLES", "DIFFMIX_OUTPUT", "DIFFMIX_SESSIONS", "DIFFMIX_CLIP_MODEL", "DIFFMIX_MAX_JOBS",
           "DIFFMIX_MAX_CURATED", "DIFFMIX_MAX_UPLOAD_MB", "DIFFMIX_ALLOW_PROFILE_SAVE", "DIFFMIX_QUEUE_SIZE",
           "DIFFMIX_SESSIONS_MAX_MB", "DIFFMIX_EXPORTS_MAX_MB", "GRADIO_TEMP_DIR", "DIFFMIX_DATA",
           "DIFFMIX_MAX_CALIBRATION_JOBS")


@contextmanager
def app_environment(**values: str):
    """The app's environment for a module of tests: every APP_ENV variable unset, then ``values`` set;
    on exit every variable is as it was before."""
    old = {k: os.environ.get(k) for k in (*APP_ENV, *values)}
    for k in APP_ENV:
        os.environ.pop(k, None)
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def world_environment(root: Path, **extra: str):
    """:func:`app_environment` for an app world under ``root``: its bundles, outputs and sessions, CLIP off."""
    return app_environment(DIFFMIX_BUNDLES=str(root / "bundles"), DIFFMIX_OUTPUT=str(root / "out"),
                           DIFFMIX_SESSIONS=str(root / "sessions"), DIFFMIX_CLIP_MODEL="none", **extra)


def make_world(root: Path, cache: Path) -> Path:
    """A bundles root holding a copy of the placeholder bundle with a tiny reference classifier
    attached (timm test_resnet, random weights: it exercises the P(target) captions)."""
    import timm

    from diffmix_core.demo import placeholder_bundle
    from diffmix_core.reference import ReferenceClassifier, attach_reference, save_reference

    shared = placeholder_bundle(cache / "ui-placeholder")   # built once per test session
    bundle_dir = root / "bundles" / "birds"
    shutil.copytree(shared.path, bundle_dir)
    model = timm.create_model("test_resnet", num_classes=len(shared.classes))
    clf = ReferenceClassifier(model.eval(), "test_resnet", shared.classes, 32, (0.5,) * 3, (0.5,) * 3)
    ref = save_reference(clf, root / "ref", {"model_name": "test_resnet", "classes": list(shared.classes),
                                             "val_accuracy": 0.5, "preprocessing": {"input_size": 32}})
    attach_reference(bundle_dir, ref)
    return bundle_dir


def sweep(client, world: dict, *, upload=None, example=None, strengths="0.5", seeds="0", source="owl",
          target="duck", bundle=None):
    """/sweep over gradio_client on a :func:`make_world` bundle (2 steps, guidance 5, diff-mix)."""
    return client.predict(bundle or world["bundle"], upload, world["example"] if example is None else example,
                          source, target, strengths, seeds, 2, 5.0, "diff-mix", api_name="/sweep")


# =========================================================================== the app as a Space runs it
def clean_env(**extra: str) -> dict:
    """This process's environment without its package path and bundles, offline, one thread."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DIFFMIX_BUNDLES", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", DIFFMIX_CLIP_MODEL="none",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bare_python(tmp: Path) -> Path:
    """A Python that has every dependency but NOT the diffmix package: a fresh venv whose one
    .pth names this interpreter's site-packages (so their own .pth files, e.g. an editable
    install's finder, are not run). Proven here: `import diffmix_core` fails from elsewhere."""
    venv = tmp / "bare-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    deps = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    Path(site, "deps.pth").write_text("".join(f"{p}\n" for p in deps))
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    probe = subprocess.run([python, "-c", "import diffmix_core"], cwd=elsewhere, env=clean_env(),
                           capture_output=True, text=True)
    if probe.returncode == 0:
        pytest.skip("the diffmix package is installed non-editable here, so a Python without it cannot be made")
    assert "No module named 'diffmix_core'" in probe.stderr, probe.stderr
    return python


def run_app_and_sweep(folder: Path, python: Path, tmp: Path, bundle: Path, **env: str) -> dict:
    """`python app.py` in ``folder`` (offline); checks the app lists ``bundle``, then sweeps it
    (owl -> duck, 2 strengths, 4 steps) over gradio_client. Returns the sweep's outputs."""
    import json
    import urllib.request

    from gradio_client import Client

    from diffmix_core.ui import wait_until_served

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    log = tmp / "app.log"
    proc = subprocess.Popen([str(python), "app.py"], cwd=folder, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env=clean_env(GRADIO_SERVER_PORT=str(port), GRADIO_SERVER_NAME="127.0.0.1",
                                          DIFFMIX_OUTPUT=str(tmp / "outputs"),
                                          DIFFMIX_SESSIONS=str(tmp / "sessions"), **env))
    try:
        wait_until_served(url, proc, timeout=240, log=log)
        with urllib.request.urlopen(url + "config", timeout=30) as r:
            page = r.read().decode()
        assert json.dumps(str(bundle))[1:-1] in page, f"the app does not list {bundle}"
        client = Client(url, verbose=False)
        example = sorted((bundle / "examples" / "owl").glob("*.png"))[0]
        out = client.predict(str(bundle), None, str(example), "owl", "duck", "0.5, 0.9", "0", 4, 2.5, "diff-mix",
                             api_name="/sweep")
        # /sweep's outputs: grid picture, grid download, sweep checkboxes, table, plot, csv, status, ...
        return {"grid": out[0], "status": out[6], "table": out[3], "strengths": [row[4] for row in out[3]["data"]]}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
