"""The demo world's dataset, built from offline packages (issue 5).

Foregrounds (the class is carried by them):

* Tux Paint photo cut-outs with alpha (Debian ``tuxpaint-stamps-default``),
* Noto Color Emoji rendered with Pillow (Debian ``fonts-noto-color-emoji``),
* Twemoji 64 px PNGs (npm ``emoji-datasource-twitter``, class by ``short_name`` in its ``emoji.json``).

Backgrounds (they vary, as in the paper's datasets): scikit-image's bundled photos and
textures (tinted), scikit-learn's two sample photos, generated sky/ground gradients.

Each image: a random style (photo ~50 %, the rest split between the two emoji sets),
a random cut-out of its class with colour jitter and a small rotation, random scale
(large: ``min_scale``..``max_scale`` of the frame), position and horizontal flip, on a
random background crop. Every draw comes from ``numpy.random.default_rng([seed, part,
class, index])``, so the output is a pure function of the config.

Written by :func:`build_dataset`::

    <out>/birds/<class>/<class>-NNNN.png   ImageFolder of the demo birds (splits made later)
    <out>/pretrain/images/NNNNNN.png        the broader pre-training set (birds + other
    <out>/pretrain/captions.jsonl           animals and plants), one {file_name, caption, name} per line
    <out>/dataset.json                      what was built from what (written last: "done")
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont
from tqdm.auto import tqdm

from ..config import DemoDataConfig
from ..data import load_image
from ..models import CACHE_DIR
from ..records import read_jsonl, safe_name, save_png, write_jsonl_atomic, write_text_atomic
from . import DEMO_CLASSES

TUXPAINT_DIR = Path("/usr/share/tuxpaint/stamps")
NOTO_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
# Where `npm install --prefix` put the Twemoji package (.ci/run installs it there too).
NPM_PREFIX = Path(os.environ.get("DIFFMIX_DEMO_NPM", CACHE_DIR / "npm"))
TWEMOJI_PACKAGE = "emoji-datasource-twitter@16"
INSTALL = {   # what to run when a source is missing
    "tuxpaint": "apt-get install -y tuxpaint-stamps-default",
    "noto": "apt-get install -y fonts-noto-color-emoji",
    "twemoji": f"npm install --prefix {NPM_PREFIX} {TWEMOJI_PACKAGE}   (or set DIFFMIX_DEMO_NPM to its prefix)",
    "sklearn": "pip install scikit-learn   (in requirements.txt)",
}
NOTO_SIZE = 109   # the bitmap size NotoColorEmoji.ttf holds

# Tux Paint photo cut-outs per demo class (files under stamps/animals/birds/).
PHOTO_STAMPS: dict[str, tuple[str, ...]] = {
    "owl": ("owl",), "duck": ("duck", "drake"), "peacock": ("peacock", "albino_peahen"),
    "penguin": ("penguin", "little-penguin", "magellanic_penguin"), "flamingo": ("pink_flamingo",),
    "turkey": ("turkey",), "rooster": ("rooster", "chicken_profile"),
    "parrot": ("adelaide-rosella", "rainbow-lorikeet"), "goose": ("gander",), "crow": ("crow",),
}
# Twemoji short_name per class (Noto renders the same code points).
EMOJI_NAMES: dict[str, str] = {
    "owl": "owl", "duck": "duck", "peacock": "peacock", "penguin": "penguin", "flamingo": "flamingo",
    "turkey": "turkey", "rooster": "rooster", "parrot": "parrot", "goose": "goose", "crow": "black_bird",
}
OTHER_STAMP_DIRS = ("animals", "plants")          # Tux Paint folders of the broader pre-training set
OTHER_EMOJI = re.compile(r"^(animal-|plant-)")    # emoji.json subcategories of the broader set
SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg",
                  "horse.png", "retina.jpg", "motorcycle_left.png")
SKIMAGE_TEXTURES = ("grass.png", "gravel.png", "brick.png", "moon.png", "camera.png")   # grayscale: tinted


@dataclass(frozen=True)
class Sources:
    """Where the offline packages live."""

    tuxpaint: Path = TUXPAINT_DIR
    noto: Path = NOTO_FONT
    twemoji: Path = NPM_PREFIX / "node_modules" / "emoji-datasource-twitter"


def missing_sources(sources: Sources = Sources()) -> dict[str, str]:
    """{source: the command that installs it} for every offline source not found ({} = all there)."""
    missing = {}
    if not (sources.tuxpaint / "animals" / "birds" / "owl.png").is_file():
        missing["tuxpaint"] = INSTALL["tuxpaint"]
    if not sources.noto.is_file():
        missing["noto"] = INSTALL["noto"]
    if not (sources.twemoji / "emoji.json").is_file():
        missing["twemoji"] = INSTALL["twemoji"]
    try:
        import sklearn  # noqa: F401
    except ImportError:
        missing["sklearn"] = INSTALL["sklearn"]
    return missing


def check_sources(sources: Sources = Sources()) -> None:
    """FileNotFoundError naming the install command of every missing source."""
    missing = missing_sources(sources)
    if missing:
        raise FileNotFoundError("demo sources missing; install them with:\n  " + "\n  ".join(missing.values()))


# --------------------------------------------------------------------------- foregrounds
def _open_rgba(path: Path) -> Image.Image:
    """A cut-out with its alpha, trimmed to the opaque box. (data.load_image composites alpha on
    white, which a cut-out must not; this is the one place that keeps it.)"""
    with Image.open(path) as im:
        im = im.convert("RGBA")
    im.thumbnail((160, 160), Image.LANCZOS)
    box = im.getchannel("A").point(lambda a: 255 if a > 16 else 0).getbbox()
    return im.crop(box) if box else im


def _render_noto(text: str, font: ImageFont.FreeTypeFont) -> Image.Image | None:
    im = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
    ImageDraw.Draw(im).text((8, 8), text, font=font, embedded_color=True)
    box = im.getchannel("A").getbbox()
    return im.crop(box) if box else None   # None: the font lacks this emoji


def _emoji_table(sources: Sources) -> dict[str, dict]:
    rows = json.loads((sources.twemoji / "emoji.json").read_text(encoding="utf-8"))
    return {r["short_name"]: r for r in rows if r.get("has_img_twitter")}


def _emoji_images(row: dict, sources: Sources, font) -> dict[str, Image.Image]:
    """{'noto': ..., 'twemoji': ...} renderings of one emoji.json row (those that exist)."""
    out = {}
    text = "".join(chr(int(c, 16)) for c in row["unified"].split("-"))
    noto = _render_noto(text, font)
    if noto is not None:
        out["noto"] = noto
    png = sources.twemoji / "img" / "twitter" / "64" / row["image"]
    if png.is_file():
        out["twemoji"] = _open_rgba(png)
    return out


def _stamp_name(path: Path) -> str:
    """'magellanic_penguin-2.png' -> 'magellanic penguin'."""
    name = re.sub(r"[-_]+", " ", path.stem)
    return re.sub(r"\s*\d+$", "", name).strip().lower()


def load_foregrounds(sources: Sources = Sources()) -> tuple[dict, dict]:
    """(birds, others): birds = {class: {style: [RGBA]}}; others = {name: {style: [RGBA]}} for the
    broader pre-training set (other Tux Paint animals and plants, other animal/plant emoji)."""
    check_sources(sources)
    font = ImageFont.truetype(str(sources.noto), NOTO_SIZE)
    table = _emoji_table(sources)
    birds_dir = sources.tuxpaint / "animals" / "birds"
    birds: dict[str, dict[str, list]] = {}
    used = set()
    for c in DEMO_CLASSES:
        photos = [_open_rgba(birds_dir / f"{n}.png") for n in PHOTO_STAMPS[c]]
        used |= {birds_dir / f"{n}.png" for n in PHOTO_STAMPS[c]}
        if EMOJI_NAMES[c] not in table:
            raise FileNotFoundError(f"emoji {EMOJI_NAMES[c]!r} is not in {sources.twemoji / 'emoji.json'}; "
                                    f"install {TWEMOJI_PACKAGE}")
        emoji = _emoji_images(table[EMOJI_NAMES[c]], sources, font)
        birds[c] = {"photo": photos, **{k: [v] for k, v in emoji.items()}}
    others: dict[str, dict[str, list]] = {}
    for folder in OTHER_STAMP_DIRS:
        for path in sorted((sources.tuxpaint / folder).rglob("*.png")):
            if path not in used and "cartoon" not in path.parts:
                others.setdefault(_stamp_name(path), {}).setdefault("photo", []).append(_open_rgba(path))
    bird_emoji = set(EMOJI_NAMES.values())
    for name, row in sorted(table.items()):
        if OTHER_EMOJI.match(row.get("subcategory") or "") and name not in bird_emoji:
            for style, im in _emoji_images(row, sources, font).items():
                others.setdefault(name.replace("_", " "), {}).setdefault(style, []).append(im)
    return birds, others


# --------------------------------------------------------------------------- backgrounds
def load_backgrounds() -> dict[str, list[Image.Image]]:
    """{'photos': [...], 'textures': [...]} RGB images from scikit-image and scikit-learn."""
    import skimage.data

    root = Path(skimage.data.__file__).parent
    photos = [load_image(root / n) for n in SKIMAGE_PHOTOS if (root / n).is_file()]
    textures = [load_image(root / n) for n in SKIMAGE_TEXTURES if (root / n).is_file()]
    try:
        from sklearn.datasets import load_sample_images

        photos += [load_image(f) for f in load_sample_images().filenames]
    except ImportError as err:
        raise FileNotFoundError(f"scikit-learn is missing: {INSTALL['sklearn']}") from err
    if not photos:
        raise FileNotFoundError(f"no scikit-image sample photos under {root}; reinstall scikit-image")
    return {"photos": photos, "textures": textures}


def _gradient(rng: np.random.Generator, size: int) -> Image.Image:
    """A sky-over-ground picture: two vertical gradients split at a random horizon."""
    top, mid, ground = (rng.uniform(0, 255, 3) for _ in range(3))
    top = np.clip(top * 0.5 + np.array([120, 170, 230]) * 0.5, 0, 255)   # sky-ish
    horizon = int(rng.uniform(0.4, 0.85) * size)
    y = np.linspace(0, 1, size)[:, None]
    img = np.empty((size, size, 3))
    for ch in range(3):
        col = np.where(np.arange(size)[:, None] < horizon, top[ch] * (1 - y) + mid[ch] * y, ground[ch] * (0.7 + 0.3 * y))
        img[:, :, ch] = np.repeat(col, size, axis=1)
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def background(rng: np.random.Generator, backgrounds: dict, size: int) -> Image.Image:
    """A random background: gradient (25 %), tinted texture (20 %) or photo crop (55 %)."""
    u = rng.random()
    if u < 0.25 or not backgrounds["photos"]:
        return _gradient(rng, size)
    pool = backgrounds["textures"] if u < 0.45 and backgrounds["textures"] else backgrounds["photos"]
    im = pool[int(rng.integers(len(pool)))]
    side = int(min(im.size) * rng.uniform(0.25, 1.0))
    x, y = int(rng.integers(0, im.width - side + 1)), int(rng.integers(0, im.height - side + 1))
    crop = im.crop((x, y, x + side, y + side)).resize((size, size), Image.BICUBIC)
    if pool is backgrounds["textures"]:
        tint = rng.uniform(0.4, 1.0, 3)
        crop = Image.fromarray(np.clip(np.asarray(crop.convert("L"))[..., None] * tint, 0, 255).astype(np.uint8))
    return crop


# --------------------------------------------------------------------------- composition
def jitter(fg: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A cut-out variant: brightness / contrast / saturation jitter and a small rotation."""
    rgb, alpha = fg.convert("RGB"), fg.getchannel("A")
    for enhance, lo, hi in ((ImageEnhance.Brightness, 0.8, 1.2), (ImageEnhance.Contrast, 0.8, 1.2),
                            (ImageEnhance.Color, 0.75, 1.25)):
        rgb = enhance(rgb).enhance(float(rng.uniform(lo, hi)))
    out = rgb.convert("RGBA")
    out.putalpha(alpha)
    angle = float(rng.uniform(-12, 12))
    out = out.rotate(angle, resample=Image.BICUBIC, expand=True)
    box = out.getchannel("A").getbbox()
    return out.crop(box) if box else out


def composite(fg: Image.Image, bg: Image.Image, rng: np.random.Generator, min_scale: float,
              max_scale: float) -> Image.Image:
    """Paste ``fg`` (RGBA) on ``bg`` at a random scale (longer side = scale x frame), place and flip."""
    size = bg.width
    scale = rng.uniform(min_scale, max_scale) * size / max(fg.size)
    w, h = max(4, round(fg.width * scale)), max(4, round(fg.height * scale))
    fg = fg.resize((w, h), Image.LANCZOS)
    if rng.random() < 0.5:
        fg = fg.transpose(Image.FLIP_LEFT_RIGHT)
    # Up to 10 % of the bird may leave the frame on each side.
    x = int(rng.integers(-w // 10, max(-w // 10, size - w + w // 10) + 1))
    y = int(rng.integers(-h // 10, max(-h // 10, size - h + h // 10) + 1))
    out = bg.convert("RGB").copy()
    out.paste(fg, (x, y), fg)
    return out


def _style(rng: np.random.Generator, styles: dict, photo_share: float) -> str:
    have = [s for s in ("photo", "noto", "twemoji") if styles.get(s)]
    if "photo" in have and (rng.random() < photo_share or len(have) == 1):
        return "photo"
    emoji = [s for s in have if s != "photo"] or have
    return emoji[int(rng.integers(len(emoji)))]


def make_image(styles: dict, backgrounds: dict, rng: np.random.Generator, config: DemoDataConfig,
               soften: bool = False) -> tuple[Image.Image, str]:
    """One composited image of a foreground set ({style: [RGBA]}); returns (image, style)."""
    style = _style(rng, styles, config.photo_share)
    pool = styles[style]
    fg = jitter(pool[int(rng.integers(len(pool)))], rng)
    bg = background(rng, backgrounds, config.image_size)
    if soften:   # a slightly blurred background now and then: depth of field
        bg = bg.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.5))))
    return composite(fg, bg, rng, config.min_scale, config.max_scale), style


def caption(name: str, style: str, bird: bool, rng: np.random.Generator) -> str:
    """'a photo of a {c} bird' / 'an emoji of a {c} bird'; 15 % short variants. (Empty captions
    for classifier-free guidance are drawn at training time.)"""
    noun = f"{name} bird" if bird else name
    if rng.random() < 0.15:
        return noun if rng.random() < 0.5 else name
    article = "an" if noun[0] in "aeiou" else "a"
    return f"a photo of {article} {noun}" if style == "photo" else f"an emoji of {article} {noun}"


# --------------------------------------------------------------------------- the dataset
DONE_FILE = "dataset.json"


def _rng(seed: int, part: int, group: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, part, group, index])


def build_dataset(out: str | os.PathLike, config: DemoDataConfig = DemoDataConfig(), *,
                  sources: Sources = Sources(), show_progress: bool = True) -> Path:
    """Write the demo birds ImageFolder and the pre-training set (see the module docstring).

    Skips the work when ``<out>/dataset.json`` says the same config was built already.
    Returns ``out``.
    """
    out = Path(out)
    done = out / DONE_FILE
    if done.is_file() and json.loads(done.read_text(encoding="utf-8")).get("config") == asdict(config):
        return out
    birds, others = load_foregrounds(sources)
    backgrounds = load_backgrounds()
    counts = {}
    for label, c in enumerate(tqdm(DEMO_CLASSES, desc="demo birds", disable=not show_progress)):
        for i in range(config.birds_per_class):
            rng = _rng(config.seed, 1, label, i)
            image, _ = make_image(birds[c], backgrounds, rng, config, soften=rng.random() < 0.2)
            save_png(image, out / "birds" / safe_name(c) / f"{safe_name(c)}-{i:04d}.png")
        counts[c] = config.birds_per_class
    rows = _pretrain_set(out / "pretrain", birds, others, backgrounds, config, show_progress)
    write_jsonl_atomic(out / "pretrain" / "captions.jsonl", rows)
    meta = {"config": asdict(config), "classes": list(DEMO_CLASSES), "birds": counts, "pretrain_images": len(rows),
            "pretrain_names": len({r["name"] for r in rows}), "photo_stamps": PHOTO_STAMPS, "emoji": EMOJI_NAMES,
            "sources": {k: str(v) for k, v in asdict(sources).items()}}
    write_text_atomic(done, json.dumps(meta, indent=1) + "\n")
    return out


def build_heldout(out: str | os.PathLike, per_class: int, config: DemoDataConfig = DemoDataConfig(), *,
                  sources: Sources = Sources(), show_progress: bool = True) -> Path:
    """``per_class`` NEW images of each bird class in ``<out>/<class>/<class>-NNNN.png``: the birds
    build continued past its ``birds_per_class`` (indices ``birds_per_class`` ...), the same draws
    and sources, so images nothing was trained or selected on (a held-out test set). Skips images
    already written. Returns ``out``."""
    out = Path(out)
    todo = [(label, c, i) for label, c in enumerate(DEMO_CLASSES)
            for i in range(config.birds_per_class, config.birds_per_class + per_class)
            if not (out / safe_name(c) / f"{safe_name(c)}-{i:04d}.png").is_file()]
    if not todo:
        return out
    birds, _ = load_foregrounds(sources)
    backgrounds = load_backgrounds()
    for label, c, i in tqdm(todo, desc="held-out birds", disable=not show_progress):
        rng = _rng(config.seed, 1, label, i)
        image, _ = make_image(birds[c], backgrounds, rng, config, soften=rng.random() < 0.2)
        save_png(image, out / safe_name(c) / f"{safe_name(c)}-{i:04d}.png")
    return out


def _pretrain_set(folder: Path, birds: dict, others: dict, backgrounds: dict, config: DemoDataConfig,
                  show_progress: bool) -> list[dict]:
    """The broader pre-training images + caption rows (birds first, then the other names)."""
    jobs = [(c, birds[c], True, config.pretrain_per_class) for c in DEMO_CLASSES]
    jobs += [(n, s, False, config.pretrain_per_other) for n, s in sorted(others.items())]
    rows, k = [], 0
    bar = tqdm(total=sum(j[3] for j in jobs), desc="pre-training set", disable=not show_progress)
    for group, (name, styles, is_bird, n) in enumerate(jobs):
        for i in range(n):
            rng = _rng(config.seed, 2, group, i)
            image, style = make_image(styles, backgrounds, rng, config, soften=rng.random() < 0.2)
            file_name = f"images/{k:06d}.png"
            save_png(image, folder / file_name)
            rows.append({"file_name": file_name, "caption": caption(name, style, is_bird, rng), "name": name,
                         "style": style})
            k += 1
            bar.update(1)
    bar.close()
    return rows


def read_captions(folder: str | os.PathLike) -> list[dict]:
    """Rows of ``<folder>/captions.jsonl`` ({file_name, caption, ...}); FileNotFoundError if absent."""
    file = Path(folder) / "captions.jsonl"
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist; build the demo dataset first (`diffmix demo build`)")
    return read_jsonl(file)
